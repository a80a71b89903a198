/* A tiny test harness: CHECK counts, test programs end with check_summary(). */
#ifndef FQ_TEST_CHECK_H
#define FQ_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>

static int g_pass, g_fail, g_skip;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (cond) g_pass++;                                                \
        else {                                                             \
            g_fail++;                                                      \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fputc('\n', stderr);                                           \
        }                                                                  \
    } while (0)

/* Checks a status and, on failure, prints the context's message. */
#define CHECK_OK(ctx, expr)                                                         \
    do {                                                                            \
        fq_status cs_ = (expr);                                                     \
        CHECK(cs_ == FQ_OK, "%s -> %s: %s", #expr, fq_status_str(cs_), fq_ctx_error(ctx)); \
    } while (0)

#define SKIP(...)                                  \
    do {                                           \
        g_skip++;                                  \
        fprintf(stderr, "skip: " __VA_ARGS__);     \
        fputc('\n', stderr);                       \
    } while (0)

/* Prints this program's counts (read by tests/run.sh) and returns its exit code. */
static inline int check_summary(const char *name) {
    printf("%s: %d passed, %d failed, %d skipped\n", name, g_pass, g_fail, g_skip);
    return g_fail ? 1 : 0;
}

#endif

/* Option parsing, errors and progress for the fluxq command. */
#include "cli/cli.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int cli_fail(fq_ctx *ctx, const char *cmd, fq_status s) {
    cli_progress_done();
    fprintf(stderr, "fluxq %s: %s\n", cmd, ctx && fq_ctx_error(ctx)[0] ? fq_ctx_error(ctx) : fq_status_str(s));
    return EXIT_ERR;
}

int cli_usage_error(const char *cmd, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "fluxq %s: ", cmd);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n(see fluxq %s --help)\n", cmd);
    va_end(ap);
    return EXIT_USAGE;
}

const char *cli_opt(int argc, char **argv, int *i, const char *name, bool *missing) {
    const char *a = argv[*i];
    size_t n = strlen(name);
    if (strncmp(a, name, n) != 0) return NULL;
    if (a[n] == '=') return a + n + 1;
    if (a[n] != '\0') return NULL;
    if (*i + 1 >= argc) { *missing = true; return NULL; }
    *i += 1;
    return argv[*i];
}

bool cli_wants_help(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return true;
    return false;
}

bool cli_parse_i64(const char *s, long long *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end) return false;
    *out = v;
    return true;
}

static bool g_progress_open;

void cli_progress(const char *label, long long done, long long total) {
    static int tty = -1;
    if (tty < 0) tty = isatty(2);
    if (tty) {
        fprintf(stderr, "\r%-60.60s [%lld/%lld]", label, done, total);
        g_progress_open = true;
    } else if (done == total || done % 64 == 0) {
        fprintf(stderr, "%s [%lld/%lld]\n", label, done, total);
    }
    fflush(stderr);
}

void cli_progress_done(void) {
    if (g_progress_open) fputc('\n', stderr);
    g_progress_open = false;
}

void cli_log(void *user, fq_log_level lvl, const char *msg) {
    (void)user;
    static const char *names[] = {"debug", "info", "warning", "error"};
    cli_progress_done();
    fprintf(stderr, "fluxq: %s: %s\n", names[lvl], msg);
}

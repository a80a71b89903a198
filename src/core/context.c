/* Context, error messages, logging and the assert handler. */
#include "core/core.h"
#include "core/cuda_device.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

const char *fq_status_str(fq_status s) {
    switch (s) {
    case FQ_OK: return "ok";
    case FQ_ERR_INVALID_ARG: return "invalid argument";
    case FQ_ERR_OUT_OF_MEMORY: return "out of memory";
    case FQ_ERR_DEVICE_MISMATCH: return "device mismatch";
    case FQ_ERR_SHAPE: return "shape or dtype mismatch";
    case FQ_ERR_IO: return "i/o error";
    case FQ_ERR_FORMAT: return "bad file format";
    case FQ_ERR_UNSUPPORTED: return "unsupported";
    case FQ_ERR_NO_DEVICE: return "no such device";
    case FQ_ERR_CUDA: return "cuda error";
    case FQ_ERR_NONFINITE: return "non-finite value";
    }
    return "unknown status";
}

fq_status fq_ctx_create(fq_ctx **out) {
    if (!out) return FQ_ERR_INVALID_ARG;
    fq_ctx *c = calloc(1, sizeof *c);
    if (!c) return FQ_ERR_OUT_OF_MEMORY;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    c->nthreads = n > 0 ? (int)n : 1;
    c->log_min = FQ_LOG_INFO;
    *out = c;
    return FQ_OK;
}

void fq_ctx_free(fq_ctx *ctx) {
    if (!ctx) return;
    fq_pool_free(ctx->pool);
#ifdef FQ_HAVE_CUDA
    fq_cuda_dev_release_all(ctx);
#endif
    free(ctx);
}

const char *fq_ctx_error(const fq_ctx *ctx) { return ctx ? ctx->err : "no context"; }

void fq_ctx_set_log(fq_ctx *ctx, fq_log_fn fn, void *user, fq_log_level min_level) {
    ctx->log_fn = fn;
    ctx->log_user = user;
    ctx->log_min = min_level;
}

fq_status fq_err(fq_ctx *ctx, fq_status s, const char *fmt, ...) {
    if (!ctx) return s;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->err, sizeof ctx->err, fmt, ap);
    va_end(ap);
    fq_log(ctx, FQ_LOG_DEBUG, "error: %s", ctx->err);
    return s;
}

fq_status fq_err_prefix(fq_ctx *ctx, fq_status s, const char *fmt, ...) {
    if (!ctx) return s;
    char pre[512], old[sizeof ctx->err];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pre, sizeof pre, fmt, ap);
    va_end(ap);
    memcpy(old, ctx->err, sizeof old);
    size_t k = strlen(pre);
    if (k + 2 >= sizeof ctx->err) k = sizeof ctx->err - 3;
    memcpy(ctx->err, pre, k);
    memcpy(ctx->err + k, ": ", 2);
    size_t rest = sizeof ctx->err - k - 3, ol = strlen(old);
    if (ol > rest) ol = rest;
    memcpy(ctx->err + k + 2, old, ol);
    ctx->err[k + 2 + ol] = '\0';
    return s;
}

void fq_log(fq_ctx *ctx, fq_log_level lvl, const char *fmt, ...) {
    if (!ctx || !ctx->log_fn || lvl < ctx->log_min) return;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    ctx->log_fn(ctx->log_user, lvl, msg);
}

static void default_assert(const char *expr, const char *file, int line) {
    fprintf(stderr, "fluxq: internal invariant broken: %s (%s:%d)\n", expr, file, line);
    abort(); /* the one sanctioned abort: a bug in fluxq, never bad input */
}
static fq_assert_handler g_assert = default_assert;
void fq_set_assert_handler(fq_assert_handler h) { g_assert = h ? h : default_assert; }
void fq_assert_fail(const char *expr, const char *file, int line) { g_assert(expr, file, line); }

char *fq_strdup(const char *s) {
    if (!s) return NULL;
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

int64_t fq_shape_numel(int ndim, const int64_t *shape) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
}

char *fq_shape_str(int ndim, const int64_t *shape, char *buf, size_t n) {
    size_t o = 0;
    o += (size_t)snprintf(buf + o, n - o, "[");
    for (int i = 0; i < ndim && o < n; i++)
        o += (size_t)snprintf(buf + o, n - o, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (o < n) snprintf(buf + o, n - o, "]");
    return buf;
}

void fq_ctx_set_linear_kernel(fq_ctx *ctx, fq_linear_kernel k) { ctx->linear_kernel = (int)k; }

/* Internal core: context, errors, buffers, tensors. Every layer above includes this. */
#ifndef FQ_CORE_H
#define FQ_CORE_H

#include "fluxq.h"

#include <stdarg.h>
#include <stdbool.h>

#define FQ_MAX_CUDA_DEVICES 64

struct fq_cuda_dev; /* per-device CUDA state, defined in cuda_device.c */

struct fq_ctx {
    char err[2048];
    fq_log_fn log_fn;
    void *log_user;
    fq_log_level log_min;
    int nthreads;                               /* CPU kernels; default: online cores */
    struct fq_pool *pool;                       /* worker threads, made on first use  */
    struct fq_cuda_dev *cuda[FQ_MAX_CUDA_DEVICES]; /* created on first use of cuda:N   */
    int linear_kernel;                          /* fq_linear_kernel; 0 = auto      */
    /* Test hook: when > 0, counts allocations down and fails the one reaching 0. */
    int64_t test_fail_alloc_in;
};

/* Sets the context's message (printf-style) and returns status s. */
fq_status fq_err(fq_ctx *ctx, fq_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prepends "what: " to the current message, keeping the status. */
fq_status fq_err_prefix(fq_ctx *ctx, fq_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void fq_log(fq_ctx *ctx, fq_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Broken internal invariants (never bad input) go through one handler. */
typedef void (*fq_assert_handler)(const char *expr, const char *file, int line);
void fq_set_assert_handler(fq_assert_handler h);
void fq_assert_fail(const char *expr, const char *file, int line);
#define FQ_ASSERT(e) ((e) ? (void)0 : fq_assert_fail(#e, __FILE__, __LINE__))

#define FQ_TRY(expr)                          \
    do {                                      \
        fq_status fq_try_s_ = (expr);         \
        if (fq_try_s_ != FQ_OK) return fq_try_s_; \
    } while (0)

/* ---- buffers: raw memory that belongs to exactly one device ---------------- */

typedef struct {
    fq_device dev;
    void *ptr;     /* host pointer for cpu, device pointer for cuda */
    size_t bytes;
} fq_buffer;

/* The one allocator: every host or device allocation for tensor data goes here. */
fq_status fq_buf_alloc(fq_ctx *ctx, fq_device dev, size_t bytes, fq_buffer *out);
void fq_buf_free(fq_buffer *b);
/* Bytes of buffers fq_buf_alloc holds on one device (all contexts of the
 * process together): now, the most since the last fq_mem_reset_peak, and the
 * number of live buffers. Statistics for reports; nothing depends on them. */
typedef struct {
    int64_t current, peak, count;
} fq_mem_stats;
void fq_mem_get(fq_device dev, fq_mem_stats *out);
void fq_mem_reset_peak(fq_device dev);
/* Copies bytes between any two buffers (cpu/cuda:N/cuda:M); synchronous. */
fq_status fq_buf_copy(fq_ctx *ctx, const fq_buffer *dst, size_t dst_off, const fq_buffer *src,
                      size_t src_off, size_t bytes);
/* Host <-> buffer copies. */
fq_status fq_buf_write(fq_ctx *ctx, const fq_buffer *dst, size_t off, const void *src, size_t bytes);
fq_status fq_buf_read(fq_ctx *ctx, const fq_buffer *src, size_t off, void *dst, size_t bytes);
fq_status fq_buf_zero(fq_ctx *ctx, const fq_buffer *dst, size_t off, size_t bytes);

/* ---- tensors ---------------------------------------------------------------- */

struct fq_tensor {
    fq_buffer buf;
    fq_dtype dtype;
    int ndim;
    int64_t shape[FQ_MAX_DIMS];
    int64_t numel;
    char *name;
};

/* Placement/dtype/shape check of one operand before an op runs on `exec`.
 * `role` names the operand in the message ("x", "out"). */
fq_status fq_check_tensor(fq_ctx *ctx, const char *op, const char *role, const fq_tensor *t,
                          fq_device exec);
fq_status fq_check_float(fq_ctx *ctx, const char *op, const char *role, const fq_tensor *t);

/* ---- threads ---------------------------------------------------------------- */

/* Runs fn(arg, i) for i in [0, n) over the context's threads; returns when done.
 * Called from inside a task, or while another thread uses the context's pool,
 * it runs the tasks on the calling thread. */
void fq_parallel_for(fq_ctx *ctx, int64_t n, void (*fn)(void *arg, int64_t i), void *arg);
struct fq_pool;
void fq_pool_free(struct fq_pool *p);

/* ---- small helpers ---------------------------------------------------------- */

char *fq_strdup(const char *s); /* NULL on OOM or NULL input; caller frees */
int64_t fq_shape_numel(int ndim, const int64_t *shape);
/* Formats "[a, b, c]" into buf. */
char *fq_shape_str(int ndim, const int64_t *shape, char *buf, size_t n);

#endif

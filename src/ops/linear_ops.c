/* fq_linear_4bit: y = x · Wᵀ (+ bias). Checks every operand, then runs the CPU
 * kernels here or hands over to the CUDA backend (fq_linear4_cuda).
 *
 * The op runs on the weight's device. Before anything runs, every member of
 * the weight's quantization state and x, bias and y are checked to be there
 * (the diffusers#10798 family: a 16-float code table left on cuda:0 must be an
 * error naming it, not a crash or a silent cross-device read). */
#include "kernels/cpu/linear4_cpu.h"
#include "ops/linear_internal.h"

#include <limits.h>

static const char OP[] = "linear_4bit";

fq_w4_view fq_w4_view_of(const fq_qtensor *w) {
    const fq_qtensor_info *in = &w->info;
    fq_w4_view v = {0};
    v.packed = w->m[FQ_QMEMBER_PACKED].ptr;
    v.nested = in->double_quant != 0;
    if (v.nested) {
        v.qabsmax = w->m[FQ_QMEMBER_ABSMAX].ptr;
        v.nested_absmax = w->m[FQ_QMEMBER_NESTED_ABSMAX].ptr;
        v.nested_code = w->m[FQ_QMEMBER_NESTED_QUANT_MAP].ptr;
        v.offset = in->offset;
    } else {
        v.absmax = w->m[FQ_QMEMBER_ABSMAX].ptr;
    }
    v.blocksize = in->blocksize;
    v.type = in->type;
    v.n = in->ndim == 2 ? in->shape[0] : 0;
    v.k = in->ndim == 2 ? in->shape[1] : 0;
    return v;
}

static const char *tname(const fq_tensor *t, const char *role) { return t->name ? t->name : role; }
static const char *qname(const fq_qtensor *q) { return q->name ? q->name : "(unnamed)"; }

/* Shapes: w [N, K]; x [..., K]; y [..., N] with x's leading dims; bias [N].
 * *m receives the product of the leading dims (rows of x). */
static fq_status check_shapes(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *w, const fq_tensor *bias,
                              const fq_tensor *y, int64_t *m) {
    char a[160], b[160];
    const fq_qtensor_info *wi = &w->info;
    if (wi->ndim != 2)
        return fq_err(ctx, FQ_ERR_SHAPE, "%s: weight '%s' has shape %s; expected 2-D [out_features, in_features]",
                      OP, qname(w), fq_shape_str(wi->ndim, wi->shape, a, sizeof a));
    const int64_t N = wi->shape[0], K = wi->shape[1];
    if (x->ndim < 1 || x->shape[x->ndim - 1] != K)
        return fq_err(ctx, FQ_ERR_SHAPE, "%s: x '%s' has shape %s but weight '%s' is %s: x must be [..., %lld]", OP,
                      tname(x, "x"), fq_shape_str(x->ndim, x->shape, a, sizeof a), qname(w),
                      fq_shape_str(2, wi->shape, b, sizeof b), (long long)K);
    int same = y->ndim == x->ndim && y->shape[y->ndim - 1] == N;
    for (int i = 0; same && i < x->ndim - 1; i++) same = y->shape[i] == x->shape[i];
    if (!same)
        return fq_err(ctx, FQ_ERR_SHAPE, "%s: y '%s' has shape %s; expected x's leading dims then %lld (x is %s)", OP,
                      tname(y, "y"), fq_shape_str(y->ndim, y->shape, a, sizeof a), (long long)N,
                      fq_shape_str(x->ndim, x->shape, b, sizeof b));
    if (bias && (bias->ndim != 1 || bias->shape[0] != N))
        return fq_err(ctx, FQ_ERR_SHAPE, "%s: bias '%s' has shape %s; expected [%lld]", OP, tname(bias, "bias"),
                      fq_shape_str(bias->ndim, bias->shape, a, sizeof a), (long long)N);
    *m = fq_shape_numel(x->ndim - 1, x->shape);
    return FQ_OK;
}

static fq_status check_dtypes(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *bias, const fq_tensor *y) {
    FQ_TRY(fq_check_float(ctx, OP, "x", x));
    FQ_TRY(fq_check_float(ctx, OP, "y", y));
    if (bias && bias->dtype != FQ_F64) FQ_TRY(fq_check_float(ctx, OP, "bias", bias));
    return FQ_OK;
}

static fq_status linear_cpu(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *w, const fq_tensor *bias,
                            fq_tensor *y, int64_t m) {
    fq_cpu_linear4_args a = {x->buf.ptr, x->dtype, bias ? bias->buf.ptr : NULL, bias ? bias->dtype : FQ_F32,
                             y->buf.ptr, y->dtype, m, fq_w4_view_of(w), 0};
    const fq_cpu_isa isa = fq_cpu_isa_best();
    fq_linear_kernel kern = (fq_linear_kernel)ctx->linear_kernel;
    if (kern == FQ_LINEAR_AUTO) kern = fq_cpu_linear4_pick(m, a.w.n, a.w.k, isa);
    if (kern == FQ_LINEAR_DEQUANT_BLAS && (m > INT_MAX || a.w.n > INT_MAX || a.w.k > INT_MAX - 64))
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "%s: the BLAS kernel takes 32-bit sizes; [%lld x %lld] · [%lld x %lld]ᵀ "
                      "is larger (use AUTO or GEMM)", OP, (long long)m, (long long)a.w.k, (long long)a.w.n,
                      (long long)a.w.k);
    /* Scratch (x in the kernels' layout, BLAS panels) is host memory owned
     * here for the duration of the call. */
    const size_t bytes = fq_cpu_linear4_scratch_bytes(kern, isa, &a);
    fq_buffer scratch = {FQ_CPU, NULL, 0};
    if (bytes) {
        fq_status s = fq_buf_alloc(ctx, FQ_CPU, bytes, &scratch);
        if (s != FQ_OK) return fq_err_prefix(ctx, s, "%s: scratch for weight '%s'", OP, qname(w));
    }
    fq_cpu_linear4(ctx, kern, isa, &a, scratch.ptr);
    fq_buf_free(&scratch);
    return FQ_OK;
}

fq_status fq_linear_4bit(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *w, const fq_tensor *bias,
                         fq_tensor *y) {
    if (!ctx) return FQ_ERR_INVALID_ARG;
    if (!x || !w || !y)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: %s is NULL", OP, !x ? "x" : !w ? "weight" : "y");
    if ((const fq_tensor *)y == x || (bias && (const fq_tensor *)y == bias))
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: y must not be the same tensor as x or bias", OP);
    if ((unsigned)ctx->linear_kernel > FQ_LINEAR_DEQUANT_BLAS)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: unknown linear kernel %d", OP, ctx->linear_kernel);
    /* Placement first (invariant 3): the weight's device is where the op runs. */
    const fq_device exec = w->info.device;
    FQ_TRY(fq_check_qtensor(ctx, OP, w, exec));
    FQ_TRY(fq_check_tensor(ctx, OP, "x", x, exec));
    if (bias) FQ_TRY(fq_check_tensor(ctx, OP, "bias", bias, exec));
    FQ_TRY(fq_check_tensor(ctx, OP, "y", y, exec));
    FQ_TRY(check_dtypes(ctx, x, bias, y));
    int64_t m;
    FQ_TRY(check_shapes(ctx, x, w, bias, y, &m));
    if (m == 0 || w->info.shape[0] == 0) return FQ_OK;
    if (exec.type == FQ_DEVICE_CPU) return linear_cpu(ctx, x, w, bias, y, m);
#ifdef FQ_HAVE_CUDA
    return fq_linear4_cuda(ctx, x, w, bias, y, m);
#else
    char d[16];
    return fq_err(ctx, FQ_ERR_UNSUPPORTED, "%s: weight '%s' is on %s but this build has no CUDA backend", OP,
                  qname(w), fq_device_name(exec, d, sizeof d));
#endif
}

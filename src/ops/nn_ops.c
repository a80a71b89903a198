/* Transformer ops: operand checks, then dispatch to a backend (see nn_ops.h). */
#include "ops/nn_ops.h"

#include "kernels/cpu/linear4_cpu.h"
#include "kernels/cpu/nn_cpu.h"
#include "kernels/cuda/nn_cuda.h"
#include "kernels/kernels.h"
#include "ops/nn_ops_cuda.h"

#include <stdio.h>
#include <string.h>

/* ---- views -------------------------------------------------------------------- */

fq_tensor fq_nn_view(const fq_buffer *base, size_t off, fq_dtype dtype, int ndim, const int64_t *shape,
                  const char *name) {
    fq_tensor t;
    memset(&t, 0, sizeof t);
    t.dtype = dtype;
    t.ndim = ndim;
    for (int i = 0; i < ndim; i++) t.shape[i] = shape[i];
    t.numel = fq_shape_numel(ndim, shape);
    t.buf.dev = base->dev;
    t.buf.ptr = (char *)base->ptr + off;
    t.buf.bytes = (size_t)t.numel * fq_dtype_size(dtype);
    t.name = (char *)name; /* never freed: views are not passed to fq_tensor_free */
    return t;
}

fq_tensor fq_nn_view_rows(const fq_tensor *t, int64_t r0, int64_t nrows) {
    fq_tensor v = *t;
    int64_t row = t->ndim > 1 ? t->numel / t->shape[0] : 1;
    v.shape[0] = nrows;
    v.numel = nrows * row;
    v.buf.ptr = (char *)t->buf.ptr + (size_t)(r0 * row) * fq_dtype_size(t->dtype);
    v.buf.bytes = (size_t)v.numel * fq_dtype_size(t->dtype);
    return v;
}

/* ---- checks ------------------------------------------------------------------- */

static const char *tname(const fq_tensor *t, const char *role) {
    return t->name && t->name[0] ? t->name : role;
}

/* Operand `t` (role) of op: present, on dev, of dtype f32 when want_f32, else any float. */
static fq_status check(fq_ctx *ctx, const char *op, const char *role, const fq_tensor *t, fq_device dev,
                       int want_f32) {
    FQ_TRY(fq_check_tensor(ctx, op, role, t, dev));
    if (want_f32 && t->dtype != FQ_F32)
        return fq_err(ctx, FQ_ERR_SHAPE, "%s: tensor '%s' (%s) has dtype %s; activations must be f32", op,
                      tname(t, role), role, fq_dtype_name(t->dtype));
    if (!want_f32) FQ_TRY(fq_check_float(ctx, op, role, t));
    return FQ_OK;
}

fq_dtype fq_nn_act_dtype(fq_device dev, fq_dtype rnd) {
    return dev.type == FQ_DEVICE_CUDA && rnd == FQ_BF16 ? FQ_BF16 : FQ_F32;
}

/* Activation operand `t` (role) of op: on dev, of dtype f32 or
 * fq_nn_act_dtype(dev, rnd), and of the dtype of `like` when given. */
static fq_status check_act(fq_ctx *ctx, const char *op, const char *role, const fq_tensor *t, fq_device dev,
                           fq_dtype rnd, const fq_tensor *like) {
    FQ_TRY(fq_check_tensor(ctx, op, role, t, dev));
    const fq_dtype alt = fq_nn_act_dtype(dev, rnd);
    if (t->dtype != FQ_F32 && t->dtype != alt)
        return fq_err(ctx, FQ_ERR_SHAPE, "%s: tensor '%s' (%s) has dtype %s; activations must be f32%s%s", op,
                      tname(t, role), role, fq_dtype_name(t->dtype), alt != FQ_F32 ? " or " : "",
                      alt != FQ_F32 ? fq_dtype_name(alt) : "");
    if (like && t->dtype != like->dtype)
        return fq_err(ctx, FQ_ERR_SHAPE, "%s: tensor '%s' (%s) has dtype %s, its partner '%s' %s", op,
                      tname(t, role), role, fq_dtype_name(t->dtype), tname(like, "?"), fq_dtype_name(like->dtype));
    return FQ_OK;
}

static fq_status shape_err(fq_ctx *ctx, const char *op, const char *role, const fq_tensor *t,
                           const char *want) {
    char s[96];
    return fq_err(ctx, FQ_ERR_SHAPE, "%s: tensor '%s' (%s) has shape %s; expected %s", op, tname(t, role),
                  role, fq_shape_str(t->ndim, t->shape, s, sizeof s), want);
}

static fq_status same_shape(fq_ctx *ctx, const char *op, const char *role, const fq_tensor *t,
                            const fq_tensor *ref) {
    char s[96];
    if (t->ndim == ref->ndim && memcmp(t->shape, ref->shape, sizeof(int64_t) * (size_t)t->ndim) == 0)
        return FQ_OK;
    return shape_err(ctx, op, role, t, fq_shape_str(ref->ndim, ref->shape, s, sizeof s));
}

static fq_status rnd_ok(fq_ctx *ctx, const char *op, fq_dtype rnd) {
    if (rnd == FQ_F32 || rnd == FQ_BF16 || rnd == FQ_F16) return FQ_OK;
    return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: compute dtype %s is not f32, bf16 or f16", op,
                  fq_dtype_name(rnd));
}

/* Every op runs where its output lives: the CPU code below, or on a CUDA
 * device the call `cu` (src/ops/nn_ops_cuda.c), which the op returns. */
#ifdef FQ_HAVE_CUDA
#define DISPATCH(dev, cu)                                    \
    do {                                                     \
        (void)op;                                            \
        if ((dev).type == FQ_DEVICE_CUDA) return (cu);       \
    } while (0)
#else
static fq_status no_cuda(fq_ctx *ctx, const char *op, fq_device dev) {
    char dn[16];
    return fq_err(ctx, FQ_ERR_UNSUPPORTED, "%s: built without CUDA (operands on %s)", op,
                  fq_device_name(dev, dn, sizeof dn));
}

/* (cu is not evaluated: it only keeps the operands it names "used") */
#define DISPATCH(dev, cu)                                                \
    do {                                                                 \
        (void)sizeof(cu);                                                \
        if ((dev).type == FQ_DEVICE_CUDA) return no_cuda(ctx, op, (dev)); \
    } while (0)
#endif

static float *F(const fq_tensor *t) { return (float *)t->buf.ptr; }

/* ---- elementwise -------------------------------------------------------------- */

fq_status fq_nn_cast(fq_ctx *ctx, const fq_tensor *x, fq_tensor *y, fq_dtype rnd) {
    const char *op = "cast";
    FQ_TRY(check_act(ctx, op, "y", y, y->buf.dev, rnd, NULL));
    FQ_TRY(check(ctx, op, "x", x, y->buf.dev, 0));
    FQ_TRY(rnd_ok(ctx, op, rnd));
    if (x->numel != y->numel) return shape_err(ctx, op, "x", x, "as many elements as y");
    DISPATCH(y->buf.dev, fq_nncu_cast(ctx, x, y, rnd));
    fq_cpu_to_f32(x->buf.ptr, x->dtype, x->numel, F(y));
    fq_cpu_round(F(y), y->numel, rnd);
    return FQ_OK;
}

fq_status fq_nn_scale(fq_ctx *ctx, const fq_tensor *x, float alpha, fq_tensor *y, fq_dtype rnd) {
    const char *op = "scale";
    FQ_TRY(check(ctx, op, "y", y, y->buf.dev, 1));
    FQ_TRY(check(ctx, op, "x", x, y->buf.dev, 1));
    FQ_TRY(rnd_ok(ctx, op, rnd));
    FQ_TRY(same_shape(ctx, op, "x", x, y));
    DISPATCH(y->buf.dev, fq_nncu_scale(ctx, x, alpha, y, rnd));
    fq_cpu_scale(F(x), alpha, F(y), y->numel, rnd);
    return FQ_OK;
}

fq_status fq_nn_add(fq_ctx *ctx, const fq_tensor *a, const fq_tensor *b, fq_tensor *y, fq_dtype rnd) {
    const char *op = "add";
    FQ_TRY(check(ctx, op, "y", y, y->buf.dev, 1));
    FQ_TRY(check(ctx, op, "a", a, y->buf.dev, 1));
    FQ_TRY(check(ctx, op, "b", b, y->buf.dev, 1));
    FQ_TRY(rnd_ok(ctx, op, rnd));
    FQ_TRY(same_shape(ctx, op, "a", a, y));
    FQ_TRY(same_shape(ctx, op, "b", b, y));
    DISPATCH(y->buf.dev, fq_nncu_add(ctx, a, b, y, rnd));
    fq_cpu_add(F(a), F(b), F(y), y->numel, rnd);
    return FQ_OK;
}

static fq_status unary(fq_ctx *ctx, const char *op, const fq_tensor *x, fq_tensor *y, fq_dtype rnd,
                       void (*fn)(const float *, float *, int64_t, fq_dtype), int cuda_kind) {
    FQ_TRY(check_act(ctx, op, "y", y, y->buf.dev, rnd, NULL));
    FQ_TRY(check_act(ctx, op, "x", x, y->buf.dev, rnd, y));
    FQ_TRY(rnd_ok(ctx, op, rnd));
    FQ_TRY(same_shape(ctx, op, "x", x, y));
    DISPATCH(y->buf.dev, fq_nncu_act(ctx, cuda_kind, x, y, rnd));
    fn(F(x), F(y), y->numel, rnd);
    return FQ_OK;
}

fq_status fq_nn_silu(fq_ctx *ctx, const fq_tensor *x, fq_tensor *y, fq_dtype rnd) {
    return unary(ctx, "silu", x, y, rnd, fq_cpu_silu, 0);
}

fq_status fq_nn_gelu_tanh(fq_ctx *ctx, const fq_tensor *x, fq_tensor *y, fq_dtype rnd) {
    return unary(ctx, "gelu_tanh", x, y, rnd, fq_cpu_gelu_tanh, 1);
}

fq_status fq_nn_clamp(fq_ctx *ctx, fq_tensor *x, float lo, float hi) {
    const char *op = "clamp";
    FQ_TRY(check(ctx, op, "x", x, x->buf.dev, 1));
    DISPATCH(x->buf.dev, fq_nncu_clamp(ctx, x, lo, hi));
    fq_cpu_clamp(F(x), x->numel, lo, hi);
    return FQ_OK;
}

/* Shared checks of concat/split: whole = cat(a, b) along dim. */
static fq_status cat_shapes(fq_ctx *ctx, const char *op, const fq_tensor *whole, const fq_tensor *a,
                            const fq_tensor *b, int dim, int64_t *outer, size_t *ia, size_t *ib) {
    FQ_TRY(check(ctx, op, "whole", whole, whole->buf.dev, 0));
    FQ_TRY(fq_check_tensor(ctx, op, "a", a, whole->buf.dev));
    FQ_TRY(fq_check_tensor(ctx, op, "b", b, whole->buf.dev));
    if (dim < 0 || dim >= whole->ndim)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: dim %d out of range for rank %d", op, dim, whole->ndim);
    if (a->dtype != whole->dtype || b->dtype != whole->dtype)
        return fq_err(ctx, FQ_ERR_SHAPE, "%s: dtypes differ (%s, %s, %s)", op, fq_dtype_name(a->dtype),
                      fq_dtype_name(b->dtype), fq_dtype_name(whole->dtype));
    if (a->ndim != whole->ndim || b->ndim != whole->ndim)
        return shape_err(ctx, op, "a", a, "the rank of the concatenation");
    for (int i = 0; i < whole->ndim; i++) {
        int ok = i == dim ? a->shape[i] + b->shape[i] == whole->shape[i]
                          : a->shape[i] == whole->shape[i] && b->shape[i] == whole->shape[i];
        if (!ok) return shape_err(ctx, op, "a", a, "the concatenation's shape but at dim");
    }
    int64_t o = 1, in = 1;
    for (int i = 0; i < dim; i++) o *= whole->shape[i];
    for (int i = dim + 1; i < whole->ndim; i++) in *= whole->shape[i];
    *outer = o;
    *ia = (size_t)(a->shape[dim] * in) * fq_dtype_size(whole->dtype);
    *ib = (size_t)(b->shape[dim] * in) * fq_dtype_size(whole->dtype);
    return FQ_OK;
}

fq_status fq_nn_concat(fq_ctx *ctx, const fq_tensor *a, const fq_tensor *b, int dim, fq_tensor *out) {
    int64_t outer;
    size_t ia, ib;
    const char *op = "concat";
    FQ_TRY(cat_shapes(ctx, op, out, a, b, dim, &outer, &ia, &ib));
    DISPATCH(out->buf.dev, fq_nncu_cat(ctx, 0, out, a, b, outer, ia, ib));
    char *o = out->buf.ptr;
    for (int64_t i = 0; i < outer; i++) {
        memcpy(o + (size_t)i * (ia + ib), (const char *)a->buf.ptr + (size_t)i * ia, ia);
        memcpy(o + (size_t)i * (ia + ib) + ia, (const char *)b->buf.ptr + (size_t)i * ib, ib);
    }
    return FQ_OK;
}

/* Checks of copy_cols / gelu_tanh_cols: x [B, S, F] into columns c0.. of out [B, S, W]. */
static fq_status cols_shapes(fq_ctx *ctx, const char *op, const fq_tensor *x, const fq_tensor *out, int64_t c0) {
    if (x->dtype != out->dtype)
        return fq_err(ctx, FQ_ERR_SHAPE, "%s: dtypes differ (x %s, out %s)", op, fq_dtype_name(x->dtype),
                      fq_dtype_name(out->dtype));
    if (x->ndim != 3 || out->ndim != 3 || x->shape[0] != out->shape[0] || x->shape[1] != out->shape[1])
        return shape_err(ctx, op, "x", x, "[batch, tokens, cols] with out's batch and tokens");
    if (c0 < 0 || c0 + x->shape[2] > out->shape[2])
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: columns %lld..%lld outside out's %lld", op, (long long)c0,
                      (long long)(c0 + x->shape[2]), (long long)out->shape[2]);
    return FQ_OK;
}

fq_status fq_nn_copy_cols(fq_ctx *ctx, const fq_tensor *x, fq_tensor *out, int64_t c0) {
    const char *op = "copy_cols";
    FQ_TRY(check(ctx, op, "out", out, out->buf.dev, 0));
    FQ_TRY(fq_check_tensor(ctx, op, "x", x, out->buf.dev));
    FQ_TRY(cols_shapes(ctx, op, x, out, c0));
    DISPATCH(out->buf.dev, fq_nncu_cols(ctx, 0, x, out, c0, FQ_F32));
    const size_t es = fq_dtype_size(x->dtype), w = (size_t)x->shape[2] * es, ow = (size_t)out->shape[2] * es;
    const int64_t rows = x->shape[0] * x->shape[1];
    for (int64_t r = 0; r < rows; r++)
        memcpy((char *)out->buf.ptr + (size_t)r * ow + (size_t)c0 * es, (const char *)x->buf.ptr + (size_t)r * w, w);
    return FQ_OK;
}

fq_status fq_nn_gelu_tanh_cols(fq_ctx *ctx, const fq_tensor *x, fq_tensor *out, int64_t c0, fq_dtype rnd) {
    const char *op = "gelu_tanh_cols";
    FQ_TRY(check_act(ctx, op, "out", out, out->buf.dev, rnd, NULL));
    FQ_TRY(check_act(ctx, op, "x", x, out->buf.dev, rnd, out));
    FQ_TRY(rnd_ok(ctx, op, rnd));
    FQ_TRY(cols_shapes(ctx, op, x, out, c0));
    DISPATCH(out->buf.dev, fq_nncu_cols(ctx, 1, x, out, c0, rnd));
    const int64_t rows = x->shape[0] * x->shape[1], f = x->shape[2], w = out->shape[2];
    for (int64_t r = 0; r < rows; r++) fq_cpu_gelu_tanh(F(x) + r * f, F(out) + r * w + c0, f, rnd);
    return FQ_OK;
}

fq_status fq_nn_split(fq_ctx *ctx, const fq_tensor *x, int dim, fq_tensor *a, fq_tensor *b) {
    int64_t outer;
    size_t ia, ib;
    const char *op = "split";
    FQ_TRY(cat_shapes(ctx, op, x, a, b, dim, &outer, &ia, &ib));
    DISPATCH(x->buf.dev, fq_nncu_cat(ctx, 1, x, a, b, outer, ia, ib));
    const char *s = x->buf.ptr;
    for (int64_t i = 0; i < outer; i++) {
        memcpy((char *)a->buf.ptr + (size_t)i * ia, s + (size_t)i * (ia + ib), ia);
        memcpy((char *)b->buf.ptr + (size_t)i * ib, s + (size_t)i * (ia + ib) + ia, ib);
    }
    return FQ_OK;
}

/* ---- linear layers ------------------------------------------------------------ */

int64_t fq_nn_linear_scratch(fq_ctx *ctx, const fq_tensor *w, const fq_tensor *bias, int64_t m, fq_dtype rnd) {
    return fq_nn_linear_scratch_io(ctx, w, bias, m, rnd, FQ_F32, FQ_F32);
}

int64_t fq_nn_linear_scratch_io(fq_ctx *ctx, const fq_tensor *w, const fq_tensor *bias, int64_t m, fq_dtype rnd,
                                fq_dtype xt, fq_dtype yt) {
    (void)ctx;
#ifdef FQ_HAVE_CUDA
    if (w->buf.dev.type == FQ_DEVICE_CUDA && w->ndim == 2)
        return fq_nncu_linear_scratch(0, w->dtype, bias ? (int)bias->dtype : -1, m, w->shape[0], w->shape[1], rnd,
                                      xt, yt);
#else
    (void)m;
    (void)rnd;
#endif
    (void)xt;
    (void)yt;
    int64_t n = 0;
    if (w->dtype != FQ_F32) n += w->numel;
    if (bias && bias->dtype != FQ_F32) n += bias->numel;
    return n;
}

/* The CPU 4-bit kernel fq_nn_linear_q4 runs for f32 compute (m rows). */
static fq_linear_kernel q4_kernel(fq_ctx *ctx, int64_t m, const fq_qtensor *w, fq_cpu_isa isa) {
    fq_linear_kernel k = ctx ? (fq_linear_kernel)ctx->linear_kernel : FQ_LINEAR_AUTO;
    if (k == FQ_LINEAR_AUTO || k > FQ_LINEAR_DEQUANT_BLAS) k = fq_cpu_linear4_pick(m, w->info.shape[0], w->info.shape[1], isa);
    return k;
}

int64_t fq_nn_linear_q4_scratch(fq_ctx *ctx, const fq_qtensor *w, const fq_tensor *bias, int64_t m, fq_dtype rnd) {
    return fq_nn_linear_q4_scratch_io(ctx, w, bias, m, rnd, FQ_F32, FQ_F32);
}

int64_t fq_nn_linear_q4_scratch_io(fq_ctx *ctx, const fq_qtensor *w, const fq_tensor *bias, int64_t m, fq_dtype rnd,
                                   fq_dtype xt, fq_dtype yt) {
    if (w->info.ndim != 2) return 0;
#ifdef FQ_HAVE_CUDA
    if (w->info.device.type == FQ_DEVICE_CUDA)
        return fq_nncu_linear_scratch(1, FQ_F32, bias ? (int)bias->dtype : -1, m, w->info.shape[0], w->info.shape[1],
                                      rnd, xt, yt);
#endif
    (void)xt;
    (void)yt;
    if (rnd == FQ_F32) {
        fq_cpu_linear4_args a = {NULL, FQ_F32, NULL, bias ? bias->dtype : FQ_F32, NULL, FQ_F32, m, fq_w4_view_of(w), 0};
        fq_cpu_isa isa = fq_cpu_isa_best();
        return (int64_t)((fq_cpu_linear4_scratch_bytes(q4_kernel(ctx, m, w, isa), isa, &a) + 3) / 4);
    }
    /* the dequantized weight, the reconstructed absmax, the widened bias */
    int64_t n = w->info.numel + (w->info.double_quant ? w->info.nblocks : 0);
    if (bias && bias->dtype != FQ_F32) n += bias->numel;
    return n;
}

/* Checks x [..., K] -> y [..., N] against a weight [N, K]; *m = rows. */
static fq_status linear_shapes(fq_ctx *ctx, const char *op, const fq_tensor *x, int64_t n, int64_t k,
                               const fq_tensor *bias, fq_tensor *y, const char *wname, fq_dtype rnd, int64_t *m) {
    FQ_TRY(check_act(ctx, op, "y", y, y->buf.dev, rnd, NULL));
    FQ_TRY(check_act(ctx, op, "x", x, y->buf.dev, rnd, NULL));
    if (bias) FQ_TRY(check(ctx, op, "bias", bias, y->buf.dev, 0));
    char want[96];
    if (x->ndim < 1 || x->shape[x->ndim - 1] != k) {
        snprintf(want, sizeof want, "[..., %lld] for weight '%s'", (long long)k, wname);
        return shape_err(ctx, op, "x", x, want);
    }
    int64_t rows = k ? x->numel / k : 0;
    if (y->ndim != x->ndim || y->shape[y->ndim - 1] != n || (n ? y->numel / n : 0) != rows ||
        memcmp(y->shape, x->shape, sizeof(int64_t) * (size_t)(x->ndim - 1)) != 0) {
        snprintf(want, sizeof want, "x's leading dims and %lld for weight '%s'", (long long)n, wname);
        return shape_err(ctx, op, "y", y, want);
    }
    if (bias && (bias->ndim != 1 || bias->shape[0] != n)) {
        snprintf(want, sizeof want, "[%lld]", (long long)n);
        return shape_err(ctx, op, "bias", bias, want);
    }
    *m = rows;
    return FQ_OK;
}

static fq_status scratch_check(fq_ctx *ctx, const char *op, const fq_tensor *scratch, int64_t need,
                               fq_device dev) {
    if (need == 0) return FQ_OK;
    if (!scratch) return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: needs %lld scratch floats, got none", op,
                                (long long)need);
    FQ_TRY(check(ctx, op, "scratch", scratch, dev, 1));
    if (scratch->numel < need)
        return fq_err(ctx, FQ_ERR_SHAPE, "%s: scratch holds %lld floats, needs %lld", op,
                      (long long)scratch->numel, (long long)need);
    return FQ_OK;
}

/* The bias as f32: itself, or widened into *spare (advancing it). */
static const float *bias_f32(const fq_tensor *bias, float **spare) {
    if (!bias) return NULL;
    if (bias->dtype == FQ_F32) return F(bias);
    float *b = *spare;
    fq_cpu_to_f32(bias->buf.ptr, bias->dtype, bias->numel, b);
    *spare += bias->numel;
    return b;
}

fq_status fq_nn_linear(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *w, const fq_tensor *bias,
                       fq_tensor *y, fq_tensor *scratch, fq_dtype rnd) {
    const char *op = "linear";
    int64_t m;
    FQ_TRY(check(ctx, op, "w", w, y->buf.dev, 0));
    if (w->ndim != 2) return shape_err(ctx, op, "w", w, "[out_features, in_features]");
    FQ_TRY(linear_shapes(ctx, op, x, w->shape[0], w->shape[1], bias, y, tname(w, "w"), rnd, &m));
    FQ_TRY(rnd_ok(ctx, op, rnd));
    FQ_TRY(scratch_check(ctx, op, scratch, fq_nn_linear_scratch_io(ctx, w, bias, m, rnd, x->dtype, y->dtype),
                         y->buf.dev));
    DISPATCH(y->buf.dev, fq_nncu_linear(ctx, x, w, NULL, bias, y, m, scratch, rnd));
    float *spare = scratch ? F(scratch) : NULL;
    const float *wf = F(w);
    if (w->dtype != FQ_F32) {
        fq_cpu_to_f32(w->buf.ptr, w->dtype, w->numel, spare);
        wf = spare;
        spare += w->numel;
    }
    const float *bf = bias_f32(bias, &spare);
    fq_cpu_linear(m, w->shape[0], w->shape[1], F(x), wf, bf, F(y), rnd);
    return FQ_OK;
}

int64_t fq_nn_linear_q4_group_scratch(fq_ctx *ctx, const fq_qtensor *w, const fq_tensor *bias, int g, int64_t m,
                                      fq_dtype rnd, fq_dtype xt, fq_dtype yt) {
    int64_t n = fq_nn_linear_q4_scratch_io(ctx, w, bias, m, rnd, xt, yt);
#ifdef FQ_HAVE_CUDA
    if (w->info.device.type == FQ_DEVICE_CUDA && w->info.ndim == 2 && g > 1) {
        const int64_t b = fq_nncu_linear_q4_group_scratch(g, w->info.shape[0], w->info.shape[1], rnd);
        n = b > n ? b : n;
    }
#else
    (void)g;
#endif
    return n;
}

int fq_nn_linear_group_batched(fq_device dev, fq_dtype rnd) {
#ifdef FQ_HAVE_CUDA
    return dev.type == FQ_DEVICE_CUDA && rnd != FQ_F32;
#else
    (void)dev;
    (void)rnd;
    return 0;
#endif
}

fq_status fq_nn_linear_q4_group(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *const *w,
                                const fq_tensor *const *bias, const fq_tensor *bias_cat, fq_tensor *const *y, int g,
                                fq_tensor *scratch, fq_dtype rnd) {
    const char *op = "linear_4bit group";
    if (!x || !w || !bias || !y || g < 2 || g > 7)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: NULL operand or %d weights (expected 2..7)", op, g);
#ifdef FQ_HAVE_CUDA
    /* the batched path where every operand allows it (each is checked as by the single op) */
    int ok = bias_cat != NULL && bias[0] != NULL && y[0]->buf.dev.type == FQ_DEVICE_CUDA;
    int64_t m = 0;
    for (int j = 0; ok && j < g; j++) {
        const fq_qtensor_info *wi = &w[j]->info;
        FQ_TRY(fq_check_qtensor(ctx, op, w[j], y[j]->buf.dev));
        if (wi->ndim != 2)
            return fq_err(ctx, FQ_ERR_SHAPE, "%s: weight '%s' has rank %d; expected [out_features, in_features]", op,
                          fq_qtensor_name(w[j]), wi->ndim);
        int64_t mj;
        FQ_TRY(linear_shapes(ctx, op, x, wi->shape[0], wi->shape[1], bias[j], y[j], fq_qtensor_name(w[j]), rnd, &mj));
        if (j == 0) m = mj;
        ok = bias[j] != NULL && mj == m;
    }
    if (ok) {
        FQ_TRY(rnd_ok(ctx, op, rnd));
        FQ_TRY(check(ctx, op, "bias_cat", bias_cat, y[0]->buf.dev, 0));
        FQ_TRY(scratch_check(ctx, op, scratch,
                             fq_nn_linear_q4_group_scratch(ctx, w[0], bias[0], g, m, rnd, x->dtype, y[0]->dtype),
                             y[0]->buf.dev));
        fq_status s = fq_nncu_linear_q4_group(ctx, x, w, bias_cat, y, g, m, scratch, rnd);
        if (s != FQ_ERR_UNSUPPORTED) return s;
    }
#else
    (void)bias_cat;
#endif
    for (int j = 0; j < g; j++) FQ_TRY(fq_nn_linear_q4(ctx, x, w[j], bias[j], y[j], scratch, rnd));
    return FQ_OK;
}

fq_status fq_nn_linear_q4(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *w, const fq_tensor *bias,
                          fq_tensor *y, fq_tensor *scratch, fq_dtype rnd) {
    const char *op = "linear_4bit";
    const fq_qtensor_info *wi = &w->info;
    int64_t m;
    FQ_TRY(fq_check_qtensor(ctx, op, w, y->buf.dev));
    if (wi->ndim != 2) {
        return fq_err(ctx, FQ_ERR_SHAPE, "%s: weight '%s' has rank %d; expected [out_features, in_features]",
                      op, fq_qtensor_name(w), wi->ndim);
    }
    FQ_TRY(linear_shapes(ctx, op, x, wi->shape[0], wi->shape[1], bias, y, fq_qtensor_name(w), rnd, &m));
    FQ_TRY(rnd_ok(ctx, op, rnd));
    FQ_TRY(scratch_check(ctx, op, scratch, fq_nn_linear_q4_scratch_io(ctx, w, bias, m, rnd, x->dtype, y->dtype),
                         y->buf.dev));
    DISPATCH(y->buf.dev, fq_nncu_linear(ctx, x, NULL, w, bias, y, m, scratch, rnd));
    if (m == 0 || wi->shape[0] == 0) return FQ_OK;
    if (rnd == FQ_F32) {
        /* f32 compute: the fused 4-bit CPU kernels of fq_linear_4bit, with the
         * caller's (planned) scratch instead of a per-call allocation. */
        fq_cpu_linear4_args a = {x->buf.ptr, FQ_F32, bias ? bias->buf.ptr : NULL, bias ? bias->dtype : FQ_F32,
                                 y->buf.ptr, FQ_F32, m, fq_w4_view_of(w), 0};
        fq_cpu_isa isa = fq_cpu_isa_best();
        fq_cpu_linear4(ctx, q4_kernel(ctx, m, w, isa), isa, &a, scratch ? scratch->buf.ptr : NULL);
        return FQ_OK;
    }
    /* bf16/f16 compute: bitsandbytes' Linear4bit with M > 1 rows dequantizes the
     * weight to the compute dtype (f32 code*absmax, one rounding) and runs a
     * dense GEMM; doing the same here reproduces its numerics exactly. */
    float *wf = F(scratch), *spare = wf + wi->numel;
    const float *absmax = w->m[FQ_QMEMBER_ABSMAX].ptr;
    if (wi->double_quant) {
        fq_cpu_dequantize8(w->m[FQ_QMEMBER_ABSMAX].ptr, w->m[FQ_QMEMBER_NESTED_ABSMAX].ptr,
                           w->m[FQ_QMEMBER_NESTED_QUANT_MAP].ptr, wi->offset, wi->nblocks, 256, spare);
        absmax = spare;
        spare += wi->nblocks;
    }
    fq_cpu_dequantize4(ctx, w->m[FQ_QMEMBER_PACKED].ptr, absmax, wi->numel, wi->blocksize, wi->type, wf,
                       FQ_F32);
    fq_cpu_round(wf, wi->numel, rnd);
    const float *bf = bias_f32(bias, &spare);
    fq_cpu_linear(m, wi->shape[0], wi->shape[1], F(x), wf, bf, F(y), rnd);
    return FQ_OK;
}

int fq_nn_linear_gelu_fused(fq_device dev, fq_dtype rnd) {
#ifdef FQ_HAVE_CUDA
    return dev.type == FQ_DEVICE_CUDA && fq_nncu_linear_gelu_ok(rnd, fq_nn_act_dtype(dev, rnd));
#else
    (void)dev, (void)rnd;
    return 0;
#endif
}

fq_status fq_nn_linear_gelu_cols(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *w, const fq_qtensor *qw,
                                 const fq_tensor *bias, fq_tensor *out, int64_t c0, fq_tensor *scratch, fq_dtype rnd) {
    const char *op = "linear_gelu";
    if (!w == !qw) return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: give exactly one of a dense and a 4-bit weight", op);
    int64_t n, k, m;
    const char *wname;
    if (qw) {
        FQ_TRY(fq_check_qtensor(ctx, op, qw, out->buf.dev));
        if (qw->info.ndim != 2) return fq_err(ctx, FQ_ERR_SHAPE, "%s: weight '%s' is not 2-D", op, fq_qtensor_name(qw));
        n = qw->info.shape[0], k = qw->info.shape[1], wname = fq_qtensor_name(qw);
    } else {
        FQ_TRY(check(ctx, op, "w", w, out->buf.dev, 0));
        if (w->ndim != 2) return shape_err(ctx, op, "w", w, "[out_features, in_features]");
        n = w->shape[0], k = w->shape[1], wname = tname(w, "w");
    }
    if (out->ndim != 3 || c0 < 0 || c0 + n > out->shape[2])
        return shape_err(ctx, op, "out", out, "[batch, tokens, >= c0 + out_features]");
    fq_tensor y = *out; /* the columns the linear fills, for the shape checks */
    y.shape[2] = n;
    y.numel = out->shape[0] * out->shape[1] * n;
    FQ_TRY(linear_shapes(ctx, op, x, n, k, bias, &y, wname, rnd, &m));
    FQ_TRY(rnd_ok(ctx, op, rnd));
    if (!fq_nn_linear_gelu_fused(out->buf.dev, rnd) || out->dtype != rnd || x->dtype != rnd)
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "%s: no fused GELU for %s compute with %s activations here", op,
                      fq_dtype_name(rnd), fq_dtype_name(out->dtype));
    if ((w && w->dtype != rnd) || (bias && bias->dtype != rnd))
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "%s: the weight and bias must be 4-bit or %s", op, fq_dtype_name(rnd));
    FQ_TRY(scratch_check(ctx, op, scratch,
                         qw ? fq_nn_linear_q4_scratch_io(ctx, qw, bias, m, rnd, x->dtype, out->dtype)
                            : fq_nn_linear_scratch_io(ctx, w, bias, m, rnd, x->dtype, out->dtype),
                         out->buf.dev));
    DISPATCH(out->buf.dev, fq_nncu_linear_gelu_cols(ctx, x, w, qw, bias, out, c0, m, scratch, rnd));
    return fq_err(ctx, FQ_ERR_UNSUPPORTED, "%s: CUDA only", op);
}

/* ---- normalization ------------------------------------------------------------ */

/* mod [B, n*D] for x [B, S, D]: checks and returns n. */
static fq_status mod_shape(fq_ctx *ctx, const char *op, const fq_tensor *mod, const fq_tensor *x,
                           int c0, int c1, int64_t *nchunks) {
    FQ_TRY(check(ctx, op, "mod", mod, x->buf.dev, 1));
    if (x->ndim != 3) return shape_err(ctx, op, "x", x, "[batch, tokens, dim]");
    int64_t d = x->shape[2];
    if (mod->ndim != 2 || mod->shape[0] != x->shape[0] || d == 0 || mod->shape[1] % d != 0)
        return shape_err(ctx, op, "mod", mod, "[batch, chunks*dim]");
    int64_t n = mod->shape[1] / d;
    if (c0 < 0 || c0 >= n || c1 < 0 || c1 >= n)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: chunk index out of range (mod has %lld chunks)", op,
                      (long long)n);
    *nchunks = n;
    return FQ_OK;
}

fq_status fq_nn_adaln(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *mod, int shift_chunk,
                      int scale_chunk, float eps, fq_tensor *y, fq_dtype rnd) {
    const char *op = "adaln";
    int64_t n;
    FQ_TRY(check_act(ctx, op, "y", y, y->buf.dev, rnd, NULL));
    FQ_TRY(check_act(ctx, op, "x", x, y->buf.dev, rnd, y));
    FQ_TRY(rnd_ok(ctx, op, rnd));
    FQ_TRY(same_shape(ctx, op, "y", y, x));
    FQ_TRY(mod_shape(ctx, op, mod, x, shift_chunk, scale_chunk, &n));
    DISPATCH(y->buf.dev, fq_nncu_adaln(ctx, x, mod, shift_chunk, scale_chunk, n, eps, y, rnd));
    int64_t d = x->shape[2];
    fq_cpu_adaln(F(x), F(y), x->shape[0], x->shape[1], d, F(mod) + shift_chunk * d, F(mod) + scale_chunk * d,
                 n * d, eps, rnd);
    return FQ_OK;
}

fq_status fq_nn_gated_add(fq_ctx *ctx, fq_tensor *h, const fq_tensor *mod, int gate_chunk,
                          const fq_tensor *a, fq_dtype rnd) {
    const char *op = "gated_add";
    int64_t n;
    FQ_TRY(check_act(ctx, op, "h", h, h->buf.dev, rnd, NULL));
    FQ_TRY(check_act(ctx, op, "a", a, h->buf.dev, rnd, h));
    FQ_TRY(rnd_ok(ctx, op, rnd));
    FQ_TRY(same_shape(ctx, op, "a", a, h));
    FQ_TRY(mod_shape(ctx, op, mod, h, gate_chunk, gate_chunk, &n));
    DISPATCH(h->buf.dev, fq_nncu_gated_add(ctx, h, mod, gate_chunk, n, a, rnd));
    int64_t d = h->shape[2];
    fq_cpu_gated_add(F(h), F(mod) + gate_chunk * d, n * d, F(a), h->shape[0], h->shape[1], d, rnd);
    return FQ_OK;
}

fq_status fq_nn_gated_add_adaln(fq_ctx *ctx, fq_tensor *h, const fq_tensor *mod, int gate_chunk, const fq_tensor *a,
                                int shift_chunk, int scale_chunk, float eps, fq_tensor *y, fq_dtype rnd) {
    return fq_nn_gated_add_adaln2(ctx, h, mod, gate_chunk, a, mod, shift_chunk, scale_chunk, eps, y, rnd);
}

fq_status fq_nn_gated_add_adaln2(fq_ctx *ctx, fq_tensor *h, const fq_tensor *gmod, int gate_chunk, const fq_tensor *a,
                                 const fq_tensor *nmod, int shift_chunk, int scale_chunk, float eps, fq_tensor *y,
                                 fq_dtype rnd) {
    const char *op = "gated_add_adaln";
    int64_t gn, nn;
    FQ_TRY(check_act(ctx, op, "h", h, h->buf.dev, rnd, NULL));
    FQ_TRY(check_act(ctx, op, "a", a, h->buf.dev, rnd, h));
    FQ_TRY(check_act(ctx, op, "y", y, h->buf.dev, rnd, h));
    FQ_TRY(rnd_ok(ctx, op, rnd));
    FQ_TRY(same_shape(ctx, op, "a", a, h));
    FQ_TRY(same_shape(ctx, op, "y", y, h));
    FQ_TRY(mod_shape(ctx, op, gmod, h, gate_chunk, gate_chunk, &gn));
    FQ_TRY(mod_shape(ctx, op, nmod, h, shift_chunk, scale_chunk, &nn));
    if (y->buf.ptr == h->buf.ptr) return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: y must not be h", op);
    DISPATCH(h->buf.dev,
             fq_nncu_gated_add_adaln(ctx, h, gmod, gate_chunk, gn, a, nmod, shift_chunk, scale_chunk, nn, eps, y, rnd));
    const int64_t d = h->shape[2];
    /* the two CPU kernels in order: the gated add has read all of a before y is written */
    fq_cpu_gated_add(F(h), F(gmod) + gate_chunk * d, gn * d, F(a), h->shape[0], h->shape[1], d, rnd);
    fq_cpu_adaln(F(h), F(y), h->shape[0], h->shape[1], d, F(nmod) + shift_chunk * d, F(nmod) + scale_chunk * d,
                 nn * d, eps, rnd);
    return FQ_OK;
}

fq_status fq_nn_rmsnorm_heads(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *weight, float eps,
                              fq_tensor *y, fq_dtype rnd) {
    const char *op = "rmsnorm";
    FQ_TRY(check_act(ctx, op, "y", y, y->buf.dev, rnd, NULL));
    FQ_TRY(check_act(ctx, op, "x", x, y->buf.dev, rnd, y));
    FQ_TRY(check(ctx, op, "weight", weight, y->buf.dev, 0));
    FQ_TRY(rnd_ok(ctx, op, rnd));
    FQ_TRY(same_shape(ctx, op, "y", y, x));
    int64_t dh = weight->ndim == 1 ? weight->shape[0] : 0;
    if (dh <= 0 || dh > 4096 || x->ndim < 1 || x->shape[x->ndim - 1] % dh != 0)
        return shape_err(ctx, op, "weight", weight, "[head_dim] dividing x's last dim (head_dim <= 4096)");
    DISPATCH(y->buf.dev, fq_nncu_rmsnorm(ctx, x, weight, eps, y, rnd));
    float w[4096]; /* one head's weights widened to f32 */
    fq_cpu_to_f32(weight->buf.ptr, weight->dtype, dh, w);
    fq_cpu_rmsnorm(F(x), w, F(y), x->numel / dh, dh, eps, rnd);
    return FQ_OK;
}

/* ---- positions, time, attention ------------------------------------------------ */

fq_status fq_nn_rope_table(fq_ctx *ctx, const fq_tensor *ids, const int64_t axes[3], double theta,
                           fq_tensor *cos_t, fq_tensor *sin_t) {
    const char *op = "rope_table";
    FQ_TRY(check(ctx, op, "cos", cos_t, cos_t->buf.dev, 1));
    FQ_TRY(check(ctx, op, "sin", sin_t, cos_t->buf.dev, 1));
    FQ_TRY(check(ctx, op, "ids", ids, cos_t->buf.dev, 1));
    int64_t dh = axes[0] + axes[1] + axes[2];
    for (int a = 0; a < 3; a++)
        if (axes[a] < 0 || axes[a] % 2)
            return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: axis width %lld is not even", op, (long long)axes[a]);
    if (ids->ndim != 2 || ids->shape[1] != 3) return shape_err(ctx, op, "ids", ids, "[tokens, 3]");
    if (cos_t->ndim != 2 || cos_t->shape[0] != ids->shape[0] || cos_t->shape[1] != dh)
        return shape_err(ctx, op, "cos", cos_t, "[tokens, sum(axes_dims_rope)]");
    FQ_TRY(same_shape(ctx, op, "sin", sin_t, cos_t));
    DISPATCH(cos_t->buf.dev, fq_nncu_rope_table(ctx, ids, axes, theta, cos_t, sin_t));
    fq_cpu_rope_table(F(ids), ids->shape[0], axes, theta, F(cos_t), F(sin_t), dh);
    return FQ_OK;
}

fq_status fq_nn_rope(fq_ctx *ctx, fq_tensor *x, const fq_tensor *cos_t, const fq_tensor *sin_t,
                     int64_t heads, fq_dtype rnd) {
    const char *op = "rope";
    FQ_TRY(check_act(ctx, op, "x", x, x->buf.dev, rnd, NULL));
    FQ_TRY(check(ctx, op, "cos", cos_t, x->buf.dev, 1));
    FQ_TRY(check(ctx, op, "sin", sin_t, x->buf.dev, 1));
    FQ_TRY(rnd_ok(ctx, op, rnd));
    if (x->ndim != 3 || heads <= 0 || x->shape[2] % heads != 0)
        return shape_err(ctx, op, "x", x, "[batch, tokens, heads*head_dim]");
    int64_t dh = x->shape[2] / heads;
    if (cos_t->ndim != 2 || cos_t->shape[0] != x->shape[1] || cos_t->shape[1] != dh || dh % 2)
        return shape_err(ctx, op, "cos", cos_t, "[tokens, head_dim] with an even head_dim");
    FQ_TRY(same_shape(ctx, op, "sin", sin_t, cos_t));
    DISPATCH(x->buf.dev, fq_nncu_rope(ctx, x, cos_t, sin_t, heads, rnd));
    fq_cpu_rope(F(x), F(cos_t), F(sin_t), x->shape[0], x->shape[1], heads, dh, rnd);
    return FQ_OK;
}

/* fq_nn_rmsnorm_rope's operand checks. */
static fq_status rmsnorm_rope_check(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *weight,
                                    const fq_tensor *cos_t, const fq_tensor *sin_t, int64_t t0, int64_t heads,
                                    fq_dtype rnd) {
    const char *op = "rmsnorm_rope";
    FQ_TRY(check_act(ctx, op, "x", x, x->buf.dev, rnd, NULL));
    FQ_TRY(check(ctx, op, "cos", cos_t, x->buf.dev, 1));
    FQ_TRY(check(ctx, op, "sin", sin_t, x->buf.dev, 1));
    if (weight) FQ_TRY(check(ctx, op, "weight", weight, x->buf.dev, 0));
    FQ_TRY(rnd_ok(ctx, op, rnd));
    if (x->ndim != 3 || heads <= 0 || x->shape[2] % heads != 0)
        return shape_err(ctx, op, "x", x, "[batch, tokens, heads*head_dim]");
    const int64_t n = x->shape[1], dh = x->shape[2] / heads;
    if (cos_t->ndim != 2 || cos_t->shape[1] != dh || t0 < 0 || t0 + n > cos_t->shape[0])
        return shape_err(ctx, op, "cos", cos_t, "[tokens >= t0 + x's tokens, head_dim]");
    FQ_TRY(same_shape(ctx, op, "sin", sin_t, cos_t));
    if (weight && (weight->ndim != 1 || weight->shape[0] != dh))
        return shape_err(ctx, op, "weight", weight, "[head_dim]");
    return FQ_OK;
}

fq_status fq_nn_rmsnorm_rope(fq_ctx *ctx, fq_tensor *x, const fq_tensor *weight, float eps, const fq_tensor *cos_t,
                             const fq_tensor *sin_t, int64_t t0, int64_t heads, fq_dtype rnd) {
    FQ_TRY(rmsnorm_rope_check(ctx, x, weight, cos_t, sin_t, t0, heads, rnd));
    const int64_t n = x->shape[1];
#ifdef FQ_HAVE_CUDA
    if (weight && x->buf.dev.type == FQ_DEVICE_CUDA && (x->shape[2] / heads) % 32 == 0)
        return fq_nncu_rmsnorm_rope(ctx, x, weight, eps, cos_t, sin_t, t0, heads, rnd);
#endif
    /* the two ops (the CPU, odd head dims, no norm) on the tables' rows t0.. */
    fq_tensor cv = fq_nn_view_rows(cos_t, t0, n), sv = fq_nn_view_rows(sin_t, t0, n);
    if (weight) FQ_TRY(fq_nn_rmsnorm_heads(ctx, x, weight, eps, x, rnd));
    return fq_nn_rope(ctx, x, &cv, &sv, heads, rnd);
}

fq_status fq_nn_rmsnorm_rope_n_impl(fq_ctx *ctx, const fq_nn_rope_part *parts, int n, float eps,
                                    const fq_tensor *cos_t, const fq_tensor *sin_t, int64_t heads, fq_dtype rnd,
                                    int impl) {
    if (n < 0 || n > 4 || (n && !parts))
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "rmsnorm_rope: %d tensors (at most 4)", n);
    for (int i = 0; i < n; i++)
        FQ_TRY(rmsnorm_rope_check(ctx, parts[i].x, parts[i].weight, cos_t, sin_t, parts[i].t0, heads, rnd));
#ifdef FQ_HAVE_CUDA
    /* one launch when every tensor has a norm and they share dtype and head
     * dim (the checks put them all on the tables' device) */
    int one = n > 0 && parts[0].x->buf.dev.type == FQ_DEVICE_CUDA;
    for (int i = 0; i < n && one; i++) {
        const fq_tensor *x = parts[i].x;
        one = parts[i].weight && x->dtype == parts[0].x->dtype && x->shape[2] == parts[0].x->shape[2] &&
              (x->shape[2] / heads) % 32 == 0;
    }
    if (one) return fq_nncu_rmsnorm_rope_n(ctx, parts, n, eps, cos_t, sin_t, heads, rnd, impl);
#else
    (void)impl;
#endif
    for (int i = 0; i < n; i++)
        FQ_TRY(fq_nn_rmsnorm_rope(ctx, parts[i].x, parts[i].weight, eps, cos_t, sin_t, parts[i].t0, heads, rnd));
    return FQ_OK;
}

fq_status fq_nn_rmsnorm_rope_n(fq_ctx *ctx, const fq_nn_rope_part *parts, int n, float eps, const fq_tensor *cos_t,
                               const fq_tensor *sin_t, int64_t heads, fq_dtype rnd) {
    return fq_nn_rmsnorm_rope_n_impl(ctx, parts, n, eps, cos_t, sin_t, heads, rnd, FQ_NN_ROPE_AUTO);
}

fq_status fq_nn_timestep_proj(fq_ctx *ctx, const fq_tensor *t, fq_tensor *out) {
    const char *op = "timestep_proj";
    FQ_TRY(check(ctx, op, "out", out, out->buf.dev, 1));
    FQ_TRY(check(ctx, op, "t", t, out->buf.dev, 1));
    if (t->ndim != 1) return shape_err(ctx, op, "t", t, "[batch]");
    if (out->ndim != 2 || out->shape[0] != t->shape[0] || out->shape[1] % 2)
        return shape_err(ctx, op, "out", out, "[batch, even channels]");
    DISPATCH(out->buf.dev, fq_nncu_timestep_proj(ctx, t, out));
    fq_cpu_timestep_proj(F(t), t->shape[0], out->shape[1] / 2, F(out));
    return FQ_OK;
}

static int64_t attention_scratch(fq_device dev, int64_t batch, int64_t s, int64_t heads, int64_t dh, fq_dtype rnd,
                                 int impl, fq_dtype xt) {
#ifdef FQ_HAVE_CUDA
    if (dev.type == FQ_DEVICE_CUDA) return fq_nncu_attention_scratch(batch, s, heads, dh, rnd, impl, xt);
#else
    (void)dev;
    (void)batch;
    (void)heads;
    (void)dh;
    (void)rnd;
    (void)impl;
#endif
    (void)xt;
    return fq_cpu_attention_scratch(s);
}

int64_t fq_nn_attention_scratch_impl(fq_device dev, int64_t batch, int64_t s, int64_t heads, int64_t dh,
                                     fq_dtype rnd, int impl) {
    return attention_scratch(dev, batch, s, heads, dh, rnd, impl, FQ_F32);
}

int64_t fq_nn_attention_scratch_io(fq_device dev, int64_t batch, int64_t s, int64_t heads, int64_t dh, fq_dtype rnd,
                                   fq_dtype xt) {
    return attention_scratch(dev, batch, s, heads, dh, rnd, FQ_NN_ATTN_AUTO, xt);
}

int64_t fq_nn_attention_scratch(fq_device dev, int64_t batch, int64_t s, int64_t heads, int64_t dh, fq_dtype rnd) {
    return fq_nn_attention_scratch_impl(dev, batch, s, heads, dh, rnd, FQ_NN_ATTN_AUTO);
}

fq_status fq_nn_attention_plan(fq_ctx *ctx, fq_device dev, int64_t batch, int64_t s, int64_t heads, int64_t dh,
                               fq_dtype rnd, fq_dtype xt, int impl, int64_t *scratch) {
    FQ_TRY(fq_device_check(ctx, dev));
    if (batch < 1 || s < 1 || heads < 1 || dh < 1 || impl < FQ_NN_ATTN_AUTO || impl > FQ_NN_ATTN_CUDNN)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "attention_plan: bad sizes or implementation %d", impl);
    *scratch = attention_scratch(dev, batch, s, heads, dh, rnd, impl, xt);
#ifdef FQ_HAVE_CUDA
    if (dev.type == FQ_DEVICE_CUDA)
        return fq_nncu_attention_plan(ctx, dev.index, batch, s, heads, dh, rnd, xt, impl, 0, scratch);
#endif
    return FQ_OK;
}

fq_status fq_nn_attention_plan_cols(fq_ctx *ctx, fq_device dev, int64_t batch, int64_t s, int64_t heads, int64_t dh,
                                    fq_dtype rnd, fq_dtype xt, int64_t width, int64_t *scratch) {
    FQ_TRY(fq_device_check(ctx, dev));
    if (batch < 1 || s < 1 || heads < 1 || dh < 1 || width < heads * dh)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "attention_plan_cols: bad sizes");
#ifdef FQ_HAVE_CUDA
    if (dev.type == FQ_DEVICE_CUDA)
        return fq_nncu_attention_plan(ctx, dev.index, batch, s, heads, dh, rnd, xt, FQ_NN_ATTN_AUTO, width, scratch);
#else
    (void)rnd, (void)xt, (void)scratch;
#endif
    return FQ_ERR_UNSUPPORTED;
}

fq_status fq_nn_attention(fq_ctx *ctx, const fq_tensor *q, const fq_tensor *k, const fq_tensor *v,
                          int64_t heads, fq_tensor *out, fq_tensor *scratch, fq_dtype rnd) {
    return fq_nn_attention_impl(ctx, q, k, v, heads, out, scratch, rnd, FQ_NN_ATTN_AUTO);
}

fq_status fq_nn_attention_impl(fq_ctx *ctx, const fq_tensor *q, const fq_tensor *k, const fq_tensor *v,
                               int64_t heads, fq_tensor *out, fq_tensor *scratch, fq_dtype rnd, int impl) {
    const char *op = "attention";
    FQ_TRY(check_act(ctx, op, "out", out, out->buf.dev, rnd, NULL));
    FQ_TRY(check_act(ctx, op, "q", q, out->buf.dev, rnd, out));
    FQ_TRY(check_act(ctx, op, "k", k, out->buf.dev, rnd, out));
    FQ_TRY(check_act(ctx, op, "v", v, out->buf.dev, rnd, out));
    FQ_TRY(rnd_ok(ctx, op, rnd));
    if (q->ndim != 3 || heads <= 0 || q->shape[2] % heads != 0)
        return shape_err(ctx, op, "q", q, "[batch, tokens, heads*head_dim]");
    FQ_TRY(same_shape(ctx, op, "k", k, q));
    FQ_TRY(same_shape(ctx, op, "v", v, q));
    FQ_TRY(same_shape(ctx, op, "out", out, q));
    const fq_device dev = out->buf.dev;
    const int64_t B = q->shape[0], S = q->shape[1], dh = q->shape[2] / heads;
    if (impl < FQ_NN_ATTN_AUTO || impl > FQ_NN_ATTN_CUDNN)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: unknown implementation %d", op, impl);
#ifdef FQ_HAVE_CUDA
    if (dev.type == FQ_DEVICE_CUDA && !fq_nncu_attention_supported(dh, rnd, impl))
        return fq_err(ctx, FQ_ERR_UNSUPPORTED,
                      "%s: head dim %lld with %s rounding is not supported on CUDA by the %s kernel "
                      "(tensor cores: bf16/f16, head dim <= %d; f32 kernel: head dim <= %d; cuDNN: "
                      "bf16/f16, head dim a multiple of 8 <= 256, builds with cuDNN)",
                      op, (long long)dh, fq_dtype_name(rnd),
                      impl == FQ_NN_ATTN_MMA || impl == FQ_NN_ATTN_MMA1 ? "tensor-core"
                      : impl == FQ_NN_ATTN_SIMT                          ? "f32"
                      : impl == FQ_NN_ATTN_CUDNN                         ? "cuDNN"
                                                                         : "any",
                      FQ_ATTN_MMA_MAX_DH, FQ_ATTN_SIMT_MAX_DH);
    if (dev.type == FQ_DEVICE_CUDA && B * heads > 65535)
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "%s: batch * heads = %lld exceeds 65535 on CUDA", op,
                      (long long)(B * heads));
#endif
    FQ_TRY(scratch_check(ctx, op, scratch, attention_scratch(dev, B, S, heads, dh, rnd, impl, q->dtype), dev));
    DISPATCH(dev, fq_nncu_attention(ctx, q, k, v, heads, out, 0, scratch, rnd, impl));
    fq_cpu_attention(F(q), F(k), F(v), F(out), B, S, heads, dh, F(scratch), rnd);
    return FQ_OK;
}

fq_status fq_nn_attention_cols(fq_ctx *ctx, const fq_tensor *q, const fq_tensor *k, const fq_tensor *v,
                               int64_t heads, fq_tensor *out, int64_t c0, fq_tensor *scratch, fq_dtype rnd) {
    const char *op = "attention_cols";
    const fq_device dev = out->buf.dev;
    FQ_TRY(check_act(ctx, op, "out", out, dev, rnd, NULL));
    FQ_TRY(check_act(ctx, op, "q", q, dev, rnd, out));
    FQ_TRY(check_act(ctx, op, "k", k, dev, rnd, out));
    FQ_TRY(check_act(ctx, op, "v", v, dev, rnd, out));
    FQ_TRY(rnd_ok(ctx, op, rnd));
    if (q->ndim != 3 || heads <= 0 || q->shape[2] % heads != 0)
        return shape_err(ctx, op, "q", q, "[batch, tokens, heads*head_dim]");
    FQ_TRY(same_shape(ctx, op, "k", k, q));
    FQ_TRY(same_shape(ctx, op, "v", v, q));
    if (out->ndim != 3 || out->shape[0] != q->shape[0] || out->shape[1] != q->shape[1] || c0 < 0 ||
        c0 + q->shape[2] > out->shape[2])
        return shape_err(ctx, op, "out", out, "[batch, tokens, >= c0 + heads*head_dim]");
    if (dev.type != FQ_DEVICE_CUDA) return FQ_ERR_UNSUPPORTED;
    const int64_t B = q->shape[0], S = q->shape[1], dh = q->shape[2] / heads;
    FQ_TRY(scratch_check(ctx, op, scratch, attention_scratch(dev, B, S, heads, dh, rnd, FQ_NN_ATTN_AUTO, q->dtype),
                         dev));
    fq_tensor o = *q; /* out's first row, for the placement of the columns */
    o.buf = out->buf;
    o.buf.ptr = (char *)out->buf.ptr + (size_t)c0 * fq_dtype_size(out->dtype);
    o.name = out->name;
    DISPATCH(dev, fq_nncu_attention(ctx, q, k, v, heads, &o, out->shape[2], scratch, rnd, FQ_NN_ATTN_AUTO));
    return FQ_ERR_UNSUPPORTED;
}

/* ---- devices, random values, timing --------------------------------------------- */

fq_status fq_nn_prepare(fq_ctx *ctx, fq_device dev) {
    const char *op = "prepare";
    FQ_TRY(fq_device_check(ctx, dev));
    DISPATCH(dev, fq_nncu_prepare(ctx, dev.index));
    return FQ_OK;
}

fq_status fq_nn_sync(fq_ctx *ctx, fq_device dev) {
    const char *op = "sync";
    DISPATCH(dev, fq_nncu_sync(ctx, dev.index));
    return FQ_OK;
}

fq_status fq_nn_graph_begin(fq_ctx *ctx, fq_device dev) {
    const char *op = "graph_begin";
    DISPATCH(dev, fq_nncu_graph_begin(ctx, dev.index));
    return fq_err(ctx, FQ_ERR_UNSUPPORTED, "%s: CUDA graphs need a CUDA device", op);
}

fq_status fq_nn_graph_end(fq_ctx *ctx, fq_device dev, fq_nn_graph **out) {
    const char *op = "graph_end";
    *out = NULL;
    DISPATCH(dev, fq_nncu_graph_end(ctx, dev.index, out));
    return fq_err(ctx, FQ_ERR_UNSUPPORTED, "%s: CUDA graphs need a CUDA device", op);
}

fq_status fq_nn_graph_launch(fq_ctx *ctx, fq_nn_graph *g) {
    if (!g) return fq_err(ctx, FQ_ERR_INVALID_ARG, "graph_launch: NULL graph");
#ifdef FQ_HAVE_CUDA
    return fq_nncu_graph_launch(ctx, g);
#else
    return fq_err(ctx, FQ_ERR_UNSUPPORTED, "graph_launch: built without CUDA");
#endif
}

void fq_nn_graph_free(fq_nn_graph *g) {
#ifdef FQ_HAVE_CUDA
    fq_nncu_graph_free(g);
#else
    (void)g; /* never created without CUDA */
#endif
}

fq_status fq_nn_device_describe(fq_ctx *ctx, fq_device dev, char *buf, size_t n) {
    const char *op = "device_describe";
    if (n) buf[0] = 0;
    DISPATCH(dev, fq_nncu_describe(ctx, dev.index, buf, n));
    snprintf(buf, n, "cpu");
    return FQ_OK;
}

fq_status fq_nn_device_memory(fq_ctx *ctx, fq_device dev, size_t *free_bytes, size_t *total_bytes) {
    const char *op = "device_memory";
    *free_bytes = *total_bytes = 0;
    DISPATCH(dev, fq_nncu_memory(ctx, dev.index, free_bytes, total_bytes));
    return FQ_OK;
}

fq_status fq_nn_random(fq_ctx *ctx, fq_tensor *t, uint64_t seed, float scale, float shift) {
    const char *op = "random";
    FQ_TRY(fq_check_tensor(ctx, op, "t", t, t->buf.dev));
    FQ_TRY(fq_check_float(ctx, op, "t", t));
    DISPATCH(t->buf.dev, fq_nncu_random(ctx, t, seed, scale, shift));
    for (int64_t i = 0; i < t->numel; i++) {
        float v = fq_nn_hash_uniform(seed, (uint64_t)i) * scale + shift;
        if (t->dtype == FQ_F32) ((float *)t->buf.ptr)[i] = v;
        else if (t->dtype == FQ_BF16) ((uint16_t *)t->buf.ptr)[i] = fq_f32_to_bf16_bits(v);
        else ((uint16_t *)t->buf.ptr)[i] = fq_f32_to_f16_bits(v);
    }
    return FQ_OK;
}

fq_status fq_nn_prof_create(fq_ctx *ctx, fq_device dev, int events, fq_nn_prof **out) {
    const char *op = "nn_prof";
    if (dev.type != FQ_DEVICE_CUDA) return fq_err(ctx, FQ_ERR_UNSUPPORTED, "%s: op timing needs a CUDA device", op);
    DISPATCH(dev, fq_nncu_prof_create(ctx, dev.index, events, out));
    (void)out;
    (void)events;
    return FQ_ERR_UNSUPPORTED;
}

fq_status fq_nn_prof_start(fq_ctx *ctx, fq_nn_prof *p) {
#ifdef FQ_HAVE_CUDA
    return fq_nncu_prof_start(ctx, p);
#else
    (void)p;
    return fq_err(ctx, FQ_ERR_UNSUPPORTED, "nn_prof: built without CUDA");
#endif
}

fq_status fq_nn_prof_stop(fq_ctx *ctx, fq_nn_prof *p, double ms[FQ_NN_CLASSES], int64_t ops[FQ_NN_CLASSES]) {
#ifdef FQ_HAVE_CUDA
    return fq_nncu_prof_stop(ctx, p, ms, ops);
#else
    (void)p;
    (void)ms;
    (void)ops;
    return fq_err(ctx, FQ_ERR_UNSUPPORTED, "nn_prof: built without CUDA");
#endif
}

int fq_nn_prof_ops(const fq_nn_prof *p, int cap, const char **names, double *ms, int64_t *count) {
#ifdef FQ_HAVE_CUDA
    return p ? fq_nncu_prof_ops(p, cap, names, ms, count) : 0;
#else
    (void)p, (void)cap, (void)names, (void)ms, (void)count;
    return 0;
#endif
}

void fq_nn_prof_free(fq_nn_prof *p) {
#ifdef FQ_HAVE_CUDA
    fq_nncu_prof_free(p);
#else
    (void)p;
#endif
}

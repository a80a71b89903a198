/* The CUDA side of the transformer ops (see nn_ops_cuda.h).
 *
 * Every function enters the guard of its operands' device, queues its kernels
 * on that device's stream and leaves; nothing waits. Kernels come from
 * src/kernels/cuda/nn_*.cu; dense products run on cuBLASLt with f32
 * accumulation:
 *
 *   compute f32                 f32 GEMM on f32 x and the weight in f32 (dense f32
 *                               as is; f16/bf16 widened, 4-bit dequantized to f32)
 *   compute bf16/f16, weight    x converted to the compute dtype (exact: activations
 *   of that dtype or 4-bit      are already rounded to it), the weight as is or
 *                               dequantized to the compute dtype (bitsandbytes'
 *                               numerics: f32 code*absmax, one rounding), 16-bit GEMM
 *   any other dense weight      f32 GEMM with the weight widened to f32
 *
 * The bias is added to the f32 accumulator in cuBLASLt's epilogue, the f32
 * result is then rounded once to the compute dtype: the CPU path's numerics.
 * Descriptors live on the stack and heuristic results are cached per device,
 * so a forward allocates nothing; scratch comes from the caller's plan. */
#ifdef FQ_HAVE_CUDA
#include "ops/nn_ops_cuda.h"

#include "core/cuda_device.h"
#include "kernels/cuda/nn_cuda.h"
#include "ops/attn_cudnn.h"
#include "ops/linear_internal.h"
#include "kernels/kernels.h"

#include <cublasLt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NN_PREP_ATTENTION 1u
#define NN_WORKSPACE_BYTES ((size_t)32 << 20)
#define NN_ALIGN 256

/* ---- running on a device ----------------------------------------------------------- */

struct fq_nn_prof {
    int device;
    int cap, n, overflow;
    cudaEvent_t *ev;
    unsigned char *cls;
    const char **name; /* the op of each event (string literals) */
    float *dt;         /* ms from the previous event, filled by stop */
};

typedef struct {
    fq_cuda_dev *d;
    fq_cuda_guard g;
} run_t;

static fq_status begin(fq_ctx *ctx, fq_device dev, run_t *r) {
    FQ_TRY(fq_cuda_dev_get(ctx, dev.index, &r->d));
    return fq_cuda_guard_enter(ctx, dev.index, &r->g);
}

/* Records the profiler's event for an op of class cls (when one is running). */
static int prof_mark(fq_cuda_dev *d, fq_nn_class cls, const char *op) {
    fq_nn_prof *p = d->nn_prof;
    if (!p) return 0;
    if (p->n >= p->cap) {
        p->overflow = 1;
        return 0;
    }
    int e = (int)cudaEventRecord(p->ev[p->n], d->stream);
    p->name[p->n] = op;
    p->cls[p->n++] = (unsigned char)cls;
    return e;
}

/* Leaves the guard; rc: a launcher's cudaError_t. */
static fq_status end(fq_ctx *ctx, run_t *r, int rc, const char *op, fq_nn_class cls) {
    if (rc == 0) rc = prof_mark(r->d, cls, op);
    fq_cuda_guard_exit(&r->g);
    if (rc) return fq_cuda_status(ctx, (cudaError_t)rc, op, r->d->index);
    return FQ_OK;
}

static float *F(const fq_tensor *t) { return (float *)t->buf.ptr; }

/* ---- elementwise --------------------------------------------------------------------- */

fq_status fq_nncu_cast(fq_ctx *ctx, const fq_tensor *x, fq_tensor *y, fq_dtype rnd) {
    run_t r;
    FQ_TRY(begin(ctx, y->buf.dev, &r));
    int e = fq_cuda_nn_cast(x->buf.ptr, x->dtype, y->buf.ptr, y->dtype, y->numel, rnd, r.d->stream);
    return end(ctx, &r, e, "cast", FQ_NN_CLASS_OTHER);
}

fq_status fq_nncu_scale(fq_ctx *ctx, const fq_tensor *x, float alpha, fq_tensor *y, fq_dtype rnd) {
    run_t r;
    FQ_TRY(begin(ctx, y->buf.dev, &r));
    int e = fq_cuda_nn_scale(F(x), alpha, F(y), y->numel, rnd, r.d->stream);
    return end(ctx, &r, e, "scale", FQ_NN_CLASS_OTHER);
}

fq_status fq_nncu_add(fq_ctx *ctx, const fq_tensor *a, const fq_tensor *b, fq_tensor *y, fq_dtype rnd) {
    run_t r;
    FQ_TRY(begin(ctx, y->buf.dev, &r));
    int e = fq_cuda_nn_add(F(a), F(b), F(y), y->numel, rnd, r.d->stream);
    return end(ctx, &r, e, "add", FQ_NN_CLASS_OTHER);
}

fq_status fq_nncu_act(fq_ctx *ctx, int kind, const fq_tensor *x, fq_tensor *y, fq_dtype rnd) {
    run_t r;
    FQ_TRY(begin(ctx, y->buf.dev, &r));
    int e = kind == 0 ? fq_cuda_nn_silu(x->buf.ptr, y->buf.ptr, x->dtype, y->numel, rnd, r.d->stream)
                      : fq_cuda_nn_gelu_tanh(x->buf.ptr, y->buf.ptr, x->dtype, y->numel, rnd, r.d->stream);
    return end(ctx, &r, e, kind == 0 ? "silu" : "gelu_tanh", FQ_NN_CLASS_OTHER);
}

fq_status fq_nncu_clamp(fq_ctx *ctx, fq_tensor *x, float lo, float hi) {
    run_t r;
    FQ_TRY(begin(ctx, x->buf.dev, &r));
    int e = fq_cuda_nn_clamp(F(x), x->numel, lo, hi, r.d->stream);
    return end(ctx, &r, e, "clamp", FQ_NN_CLASS_OTHER);
}

/* dst rows of dpitch bytes <- src rows of spitch bytes, width bytes each. */
static int copy2d(char *dst, size_t dpitch, const char *src, size_t spitch, size_t width, int64_t rows,
                  cudaStream_t st) {
    if (width == 0 || rows == 0) return 0;
    if (rows == 1 || (dpitch == width && spitch == width))
        return (int)cudaMemcpyAsync(dst, src, width * (size_t)rows, cudaMemcpyDeviceToDevice, st);
    if (dpitch < ((size_t)1 << 31) && spitch < ((size_t)1 << 31))
        return (int)cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, (size_t)rows, cudaMemcpyDeviceToDevice, st);
    for (int64_t i = 0; i < rows; i++) {
        cudaError_t e = cudaMemcpyAsync(dst + (size_t)i * dpitch, src + (size_t)i * spitch, width,
                                        cudaMemcpyDeviceToDevice, st);
        if (e != cudaSuccess) return (int)e;
    }
    return 0;
}

fq_status fq_nncu_cat(fq_ctx *ctx, int split, const fq_tensor *whole, const fq_tensor *a, const fq_tensor *b,
                      int64_t outer, size_t ia, size_t ib) {
    run_t r;
    FQ_TRY(begin(ctx, whole->buf.dev, &r));
    char *w = whole->buf.ptr, *pa = a->buf.ptr, *pb = b->buf.ptr;
    cudaStream_t st = r.d->stream;
    if (outer > 1) {
        /* one kernel of 16-byte copies when everything is aligned (cudaMemcpy2D
         * moved such rows at about half the memory's speed) */
        int e = fq_cuda_nn_cat_rows(w, pa, pb, ia, ib, outer, split, st);
        if (e != -1) return end(ctx, &r, e, split ? "split" : "concat", FQ_NN_CLASS_OTHER);
    }
    int e = split ? copy2d(pa, ia, w, ia + ib, ia, outer, st) : copy2d(w, ia + ib, pa, ia, ia, outer, st);
    if (!e) e = split ? copy2d(pb, ib, w + ia, ia + ib, ib, outer, st) : copy2d(w + ia, ia + ib, pb, ib, ib, outer, st);
    return end(ctx, &r, e, split ? "split (cudaMemcpy2DAsync)" : "concat (cudaMemcpy2DAsync)", FQ_NN_CLASS_OTHER);
}

fq_status fq_nncu_cols(fq_ctx *ctx, int kind, const fq_tensor *x, fq_tensor *out, int64_t c0, fq_dtype rnd) {
    run_t r;
    FQ_TRY(begin(ctx, out->buf.dev, &r));
    const size_t es = fq_dtype_size(x->dtype);
    const int64_t rows = x->shape[0] * x->shape[1], f = x->shape[2], w = out->shape[2];
    char *o = (char *)out->buf.ptr + (size_t)c0 * es;
    cudaStream_t st = r.d->stream;
    int e;
    if (kind == 1) {
        e = fq_cuda_nn_gelu_tanh_rows(x->buf.ptr, f, o, w, x->dtype, rows, f, rnd, st);
        return end(ctx, &r, e, "gelu_tanh", FQ_NN_CLASS_OTHER);
    }
    e = fq_cuda_nn_copy_rows(o, (size_t)w * es, x->buf.ptr, (size_t)f * es, (size_t)f * es, rows, st);
    if (e == -1) e = copy2d(o, (size_t)w * es, x->buf.ptr, (size_t)f * es, (size_t)f * es, rows, st);
    return end(ctx, &r, e, "copy_cols", FQ_NN_CLASS_OTHER);
}

/* ---- linear ---------------------------------------------------------------------------- */

static size_t al(size_t b) { return (b + NN_ALIGN - 1) & ~(size_t)(NN_ALIGN - 1); }

/* The dtype the GEMM runs in, and which operands need scratch. */
typedef struct {
    fq_dtype gt;        /* GEMM operand dtype                                        */
    int out16;          /* cuBLASLt writes the rounded result in gt, then widened   */
    size_t w_bytes;     /* dequantized / widened weight (0: use w)                   */
    size_t x_bytes;     /* x converted to gt (0: use x)                              */
    size_t b_bytes;     /* bias widened to f32 (0: none or use bias)                 */
    size_t d_bytes;     /* the 16-bit result (out16)                                 */
    size_t total;       /* scratch bytes including the workspace                     */
} lin_plan;

static lin_plan plan_linear(int qw, fq_dtype wt, int bt, int64_t m, int64_t n, int64_t k, fq_dtype rnd, fq_dtype xt,
                            fq_dtype yt) {
    lin_plan p;
    memset(&p, 0, sizeof p);
    if (qw) p.gt = rnd;
    else if (wt == FQ_F32) p.gt = FQ_F32;
    else if (wt == rnd) p.gt = rnd;
    else p.gt = FQ_F32;
    const size_t gsz = fq_dtype_size(p.gt);
    if (qw || wt != p.gt) p.w_bytes = al((size_t)(n * k) * gsz);
    /* x converted to gt unless it has that dtype (bf16 activations of a bf16 model) */
    if (xt != p.gt) p.x_bytes = al((size_t)(m * k) * gsz);
    /* A 16-bit GEMM writes its result in 16 bits (cuBLASLt rounds acc + bias to
     * nearest even once: the value the f32 result rounded by us would have) when
     * the bias, if any, is of that dtype too; 8 bytes per output instead of 12. */
    p.out16 = p.gt != FQ_F32 && (bt < 0 || bt == (int)p.gt);
    /* an f32 y: the 16-bit result before its widening; a 16-bit y takes the
     * 16-bit result directly, and when there is none, the f32 result of up to
     * 64 rows at a time goes through here */
    if (yt == FQ_F32 && p.out16) p.d_bytes = al((size_t)(m * n) * gsz);
    if (yt != FQ_F32) p.d_bytes = al((size_t)((m < 64 ? (m > 1 ? m : 1) : 64) * n) * 4);
    if (bt >= 0 && bt != FQ_F32) p.b_bytes = al((size_t)n * 4); /* for the f32 fallback */
    p.total = NN_ALIGN + p.w_bytes + p.x_bytes + p.b_bytes + p.d_bytes + NN_WORKSPACE_BYTES;
    return p;
}

int64_t fq_nncu_linear_scratch(int qw, fq_dtype wt, int bt, int64_t m, int64_t n, int64_t k, fq_dtype rnd,
                               fq_dtype xt, fq_dtype yt) {
    return (int64_t)((plan_linear(qw, wt, bt, m, n, k, rnd, xt, yt).total + 3) / 4);
}

static cudaDataType_t blas_type(fq_dtype t) {
    return t == FQ_F32 ? CUDA_R_32F : t == FQ_F16 ? CUDA_R_16F : CUDA_R_16BF;
}

static uint32_t align_log2(const void *p) {
    uintptr_t a = (uintptr_t)p;
    uint32_t l = 0;
    while (l < 8 && !(a & ((uintptr_t)1 << l))) l++;
    return l; /* 2^l bytes, at most 256 */
}

static fq_status blas_err(fq_ctx *ctx, cublasStatus_t st, const char *what, int dev) {
    return fq_err(ctx, st == CUBLAS_STATUS_ALLOC_FAILED ? FQ_ERR_OUT_OF_MEMORY : FQ_ERR_CUDA,
                  "cuda:%d: %s failed: %s", dev, what, cublasLtGetStatusString(st));
}

#define BLAS_TRY(ctx, call, dev)                                                  \
    do {                                                                          \
        cublasStatus_t bst_ = (call);                                             \
        if (bst_ != CUBLAS_STATUS_SUCCESS) return blas_err((ctx), bst_, #call, (dev)); \
    } while (0)

/* Cache entry flag: no algorithm with the bias epilogue. An f32 result then
 * gets the bias prefilled (beta = 1); a 16-bit one is not attempted. */
#define KEY_NO_EPILOGUE 0x80000000u

/* Returned (without a message) when a 16-bit result has no bias-epilogue algorithm. */
#define GEMM_TRY_F32 ((fq_status)-1)

/* out[m, n] (dtype ot: f32, or gt) = x[m, k] · w[n, k]ᵀ (+ bias[n] of dtype bt)
 * with x and w of dtype gt and f32 accumulation, in cuBLASLt's column-major
 * terms: outᵀ (n x m, ld ldc >= n) = op(A) · B with A = w stored k x n (ld k,
 * transposed) and B = x stored k x m (ld k). gelu: cuBLASLt's GELU epilogue
 * on the f32 result (after the bias) before the output's one rounding; a
 * 16-bit out only, GEMM_TRY_F32 when no algorithm offers it. batch > 1
 * runs `batch` such products in one call, weight j at w + j n k, output j at
 * out + j ostride, bias j at bias + j n, all reading the same x (a 16-bit out
 * with the bias epilogue only: GEMM_TRY_F32 otherwise). */
static fq_status gemm_ld(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype gt, const void *w, const void *x, const void *bias,
                         fq_dtype bt, void *out, fq_dtype ot, int64_t m, int64_t n, int64_t k, void *ws, int64_t ldc,
                         int gelu, int batch, int64_t ostride) {
    cublasLtHandle_t h;
    FQ_TRY(fq_cuda_dev_blaslt(ctx, d, &h));
    cublasLtMatmulDescOpaque_t desc;
    cublasLtMatrixLayoutOpaque_t la, lb, lc;
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const int dev = d->index;
    BLAS_TRY(ctx, cublasLtMatmulDescInit(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), dev);
    BLAS_TRY(ctx, cublasLtMatmulDescSetAttribute(&desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), dev);
    BLAS_TRY(ctx, cublasLtMatmulDescSetAttribute(&desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), dev);
    BLAS_TRY(ctx, cublasLtMatrixLayoutInit(&la, blas_type(gt), (uint64_t)k, (uint64_t)n, k), dev);
    BLAS_TRY(ctx, cublasLtMatrixLayoutInit(&lb, blas_type(gt), (uint64_t)k, (uint64_t)m, k), dev);
    BLAS_TRY(ctx, cublasLtMatrixLayoutInit(&lc, blas_type(ot), (uint64_t)n, (uint64_t)m, ldc), dev);
    if (gelu && ot == FQ_F32) return fq_err(ctx, FQ_ERR_UNSUPPORTED, "linear: GELU epilogue with an f32 output");
    if (batch > 1) {
        if (ot == FQ_F32 || batch > 7) return GEMM_TRY_F32;
        const int32_t cnt = batch;
        const int64_t sa = n * k, sb = 0, bs = n; /* every product reads the same x */
        BLAS_TRY(ctx, cublasLtMatrixLayoutSetAttribute(&la, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &cnt, sizeof cnt), dev);
        BLAS_TRY(ctx, cublasLtMatrixLayoutSetAttribute(&la, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sa, sizeof sa), dev);
        BLAS_TRY(ctx, cublasLtMatrixLayoutSetAttribute(&lb, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &cnt, sizeof cnt), dev);
        BLAS_TRY(ctx, cublasLtMatrixLayoutSetAttribute(&lb, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sb, sizeof sb), dev);
        BLAS_TRY(ctx, cublasLtMatrixLayoutSetAttribute(&lc, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &cnt, sizeof cnt), dev);
        BLAS_TRY(ctx, cublasLtMatrixLayoutSetAttribute(&lc, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &ostride,
                                                       sizeof ostride), dev);
        if (bias)
            BLAS_TRY(ctx, cublasLtMatmulDescSetAttribute(&desc, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, &bs, sizeof bs),
                     dev);
    }

    const uint32_t aw = align_log2(w), ax = align_log2(x), ay = align_log2(out), ab = bias ? align_log2(bias) : 8;
    const uint32_t key = 1u | (uint32_t)gt << 1 | (bias ? 1u : 0u) << 3 | (uint32_t)ot << 4 | (uint32_t)bt << 6 |
                         aw << 8 | ax << 12 | ay << 16 | ab << 20 | (uint32_t)(gelu != 0) << 24 |
                         (uint32_t)(ldc != n) << 25 | (uint32_t)(batch > 1 ? batch : 0) << 26;
    cublasLtMatmulAlgo_t algo;
    uint32_t no_epi = 0;
    int found = 0;
    for (int i = 0; i < 32 && !found; i++) {
        const fq_cuda_nn_algo *c = &d->nn_algo[i];
        if ((c->key & ~KEY_NO_EPILOGUE) == key && c->m == m && c->n == n && c->k == k) {
            memcpy(&algo, c->algo, sizeof algo);
            no_epi = c->key & KEY_NO_EPILOGUE;
            found = 1;
        }
    }
    if (found && (bias || gelu) && no_epi && ot != FQ_F32) return GEMM_TRY_F32;
    const cublasLtEpilogue_t epi = gelu ? (bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU)
                                        : CUBLASLT_EPILOGUE_BIAS;
    const cudaDataType_t bias_type = blas_type(bt);
    if ((bias || gelu) && !no_epi)
        BLAS_TRY(ctx, cublasLtMatmulDescSetAttribute(&desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi), dev);
    if (bias && !no_epi) {
        BLAS_TRY(ctx, cublasLtMatmulDescSetAttribute(&desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                                     sizeof bias_type), dev);
        BLAS_TRY(ctx, cublasLtMatmulDescSetAttribute(&desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias), dev);
    }
    if (!found) {
        cublasLtMatmulPreferenceOpaque_t pref;
        const uint64_t wsz = NN_WORKSPACE_BYTES;
        const uint32_t a_w = 1u << aw, a_x = 1u << ax, a_y = 1u << ay;
        BLAS_TRY(ctx, cublasLtMatmulPreferenceInit(&pref), dev);
        BLAS_TRY(ctx, cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsz, sizeof wsz), dev);
        BLAS_TRY(ctx, cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &a_w, sizeof a_w), dev);
        BLAS_TRY(ctx, cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &a_x, sizeof a_x), dev);
        BLAS_TRY(ctx, cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &a_y, sizeof a_y), dev);
        BLAS_TRY(ctx, cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &a_y, sizeof a_y), dev);
        cublasLtMatmulHeuristicResult_t res;
        int nres = 0;
        cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(h, &desc, &la, &lb, &lc, &lc, &pref, 1, &res, &nres);
        if ((bias || gelu) && (st != CUBLAS_STATUS_SUCCESS || nres < 1)) {
            /* no algorithm offers this bias epilogue */
            no_epi = KEY_NO_EPILOGUE;
            if (ot != FQ_F32) {
                fq_cuda_nn_algo *c = &d->nn_algo[d->nn_algo_next];
                d->nn_algo_next = (d->nn_algo_next + 1) % 32;
                c->m = m, c->n = n, c->k = k, c->key = key | no_epi;
                return GEMM_TRY_F32;
            }
            const cublasLtEpilogue_t none = CUBLASLT_EPILOGUE_DEFAULT;
            BLAS_TRY(ctx, cublasLtMatmulDescSetAttribute(&desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &none, sizeof none), dev);
            nres = 0;
            st = cublasLtMatmulAlgoGetHeuristic(h, &desc, &la, &lb, &lc, &lc, &pref, 1, &res, &nres);
        }
        if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED)
            return blas_err(ctx, st, "cublasLtMatmulAlgoGetHeuristic", dev);
        if (nres < 1) {
            if (ot != FQ_F32) return GEMM_TRY_F32;
            return fq_err(ctx, FQ_ERR_UNSUPPORTED,
                          "cuda:%d: cuBLASLt offers no algorithm for a %s GEMM with f32 output (m %lld, n %lld, k %lld)",
                          dev, fq_dtype_name(gt), (long long)m, (long long)n, (long long)k);
        }
        algo = res.algo;
        fq_cuda_nn_algo *c = &d->nn_algo[d->nn_algo_next];
        d->nn_algo_next = (d->nn_algo_next + 1) % 32;
        c->m = m, c->n = n, c->k = k, c->key = key | no_epi;
        memcpy(c->algo, &algo, sizeof algo);
    }
    const float one = 1.0f, zero = 0.0f;
    const int prefill = bias && no_epi; /* f32 output only (see above) */
    if (prefill) {
        int e = fq_cuda_nn_fill_rows((float *)out, (const float *)bias, m, n, d->stream);
        if (e) return fq_cuda_status(ctx, (cudaError_t)e, "bias fill", dev);
    }
    BLAS_TRY(ctx,
             cublasLtMatmul(h, &desc, &one, w, &la, x, &lb, prefill ? &one : &zero, out, &lc, out, &lc, &algo, ws,
                            NN_WORKSPACE_BYTES, d->stream),
             dev);
    return FQ_OK;
}

static fq_status gemm(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype gt, const void *w, const void *x, const void *bias,
                      fq_dtype bt, void *out, fq_dtype ot, int64_t m, int64_t n, int64_t k, void *ws) {
    return gemm_ld(ctx, d, gt, w, x, bias, bt, out, ot, m, n, k, ws, n, 0, 1, 0);
}

/* y = x · Wᵀ + b, rounded once; ldy: y's row stride (n: contiguous); gelu: the
 * GELU epilogue (a 16-bit y of the GEMM dtype only; when cuBLASLt has no such
 * algorithm, the plain GEMM then our GELU kernel on y: the exact two-op bits). */
/* A 4-bit linear of at most NN_GEMV_MAX_M rows (the modulation and embedding
 * linears: one row per image) through the streaming GEMV, which reads the packed
 * weight once instead of dequantizing it into the bf16 scratch first (0.5 instead
 * of 4.5 bytes moved per weight). It computes what dequantize + cuBLASLt computes:
 * W rounded exactly as dequantize_4bit writes it, x rounded to gt, f32 sums, the
 * bias added before the one rounding to gt (an f32 y gets that value widened).
 * FQ_ERR_UNSUPPORTED: no GEMV for these operands (the caller takes the GEMM path). */
#define NN_GEMV_MAX_M 2
static fq_status linear_gemv(fq_ctx *ctx, fq_cuda_dev *d, const fq_tensor *x, const fq_qtensor *qw,
                             const fq_tensor *bias, fq_tensor *y, int64_t m, int64_t n, int64_t k, fq_dtype gt,
                             void *xbuf, void *dbuf) {
    fq_tensor xv = *x, yv = *y;
    xv.ndim = yv.ndim = 2;
    xv.shape[0] = yv.shape[0] = m;
    xv.shape[1] = k;
    yv.shape[1] = n;
    xv.numel = m * k;
    yv.numel = m * n;
    int e;
    if (x->dtype != gt) {
        e = fq_cuda_nn_convert(x->buf.ptr, x->dtype, xbuf, gt, m * k, d->stream);
        if (e) return fq_cuda_status(ctx, (cudaError_t)e, "input conversion", d->index);
        xv.buf.ptr = xbuf;
        xv.dtype = gt;
    }
    if (y->dtype != gt) {
        yv.buf.ptr = dbuf;
        yv.dtype = gt;
    }
    FQ_TRY(fq_linear4_cuda_exact(ctx, &xv, qw, bias, &yv, m));
    if (y->dtype == gt) return FQ_OK;
    e = fq_cuda_nn_convert(dbuf, gt, y->buf.ptr, y->dtype, m * n, d->stream); /* exact */
    return e ? fq_cuda_status(ctx, (cudaError_t)e, "output widening", d->index) : FQ_OK;
}

/* The 4-bit weight qw dequantized into dst as dtype gt (bitsandbytes' values). */
static int dequant_to(const fq_qtensor *qw, void *dst, fq_dtype gt, cudaStream_t st) {
    const fq_qtensor_info *qi = &qw->info;
    if (qi->double_quant)
        return fq_cuda_dequantize4_nested(qw->m[FQ_QMEMBER_PACKED].ptr, qw->m[FQ_QMEMBER_ABSMAX].ptr,
                                          qw->m[FQ_QMEMBER_NESTED_ABSMAX].ptr, qw->m[FQ_QMEMBER_NESTED_QUANT_MAP].ptr,
                                          qi->offset, qi->numel, qi->blocksize, qi->type, dst, gt, st);
    return fq_cuda_dequantize4(qw->m[FQ_QMEMBER_PACKED].ptr, qw->m[FQ_QMEMBER_ABSMAX].ptr, qi->numel, qi->blocksize,
                               qi->type, dst, gt, st);
}

static fq_status linear_run(fq_ctx *ctx, fq_cuda_dev *d, const fq_tensor *x, const fq_tensor *w,
                            const fq_qtensor *qw, const fq_tensor *bias, fq_tensor *y, int64_t m, fq_tensor *scratch,
                            fq_dtype rnd, int64_t ldy, int gelu) {
    const int64_t n = qw ? qw->info.shape[0] : w->shape[0], k = qw ? qw->info.shape[1] : w->shape[1];
    const lin_plan p =
        plan_linear(qw != NULL, qw ? FQ_F32 : w->dtype, bias ? (int)bias->dtype : -1, m, n, k, rnd, x->dtype, y->dtype);
    if ((gelu || ldy != n) && !(p.out16 && y->dtype == p.gt && k > 0))
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "linear: a fused GELU or strided output needs a %s output (and bias)",
                      fq_dtype_name(p.gt));
    if ((size_t)scratch->numel * 4 < p.total)
        return fq_err(ctx, FQ_ERR_SHAPE, "linear: scratch holds %lld bytes, needs %zu", (long long)scratch->numel * 4,
                      p.total);
    char *base = (char *)(((uintptr_t)scratch->buf.ptr + NN_ALIGN - 1) & ~(uintptr_t)(NN_ALIGN - 1));
    void *wbuf = base, *xbuf = base + p.w_bytes;
    float *bbuf = (float *)(base + p.w_bytes + p.x_bytes);
    void *dbuf = base + p.w_bytes + p.x_bytes + p.b_bytes;
    void *ws = base + p.w_bytes + p.x_bytes + p.b_bytes + p.d_bytes;
    cudaStream_t st = d->stream;
    const int dev = d->index;
    int e = 0;

    /* few rows: the GEMV, unless the context asks for the reference path */
    if (qw && m <= NN_GEMV_MAX_M && k > 0 && !gelu && ldy == n && p.out16 && (y->dtype == p.gt || y->dtype == FQ_F32) &&
        ctx->linear_kernel != FQ_LINEAR_DEQUANT_BLAS) {
        fq_status s = linear_gemv(ctx, d, x, qw, bias, y, m, n, k, p.gt, xbuf, dbuf);
        if (s != FQ_ERR_UNSUPPORTED) return s;
    }

    /* the weight in the GEMM dtype */
    const void *wg = w ? w->buf.ptr : NULL;
    if (qw) {
        e = dequant_to(qw, wbuf, p.gt, st);
        if (e) return fq_cuda_status(ctx, (cudaError_t)e, "dequantize4", dev);
        wg = wbuf;
    } else if (p.w_bytes) {
        e = fq_cuda_nn_convert(w->buf.ptr, w->dtype, wbuf, p.gt, w->numel, st);
        if (e) return fq_cuda_status(ctx, (cudaError_t)e, "weight conversion", dev);
        wg = wbuf;
    }
    /* x as is when it already has the GEMM dtype (bf16 activations of a bf16
     * model), else converted exactly (its values are rounded to rnd) */
    const void *xg = x->buf.ptr;
    const int y16 = y->dtype != FQ_F32;
    if (x->dtype != p.gt) {
        e = fq_cuda_nn_convert(x->buf.ptr, x->dtype, xbuf, p.gt, m * k, st);
        if (e) return fq_cuda_status(ctx, (cudaError_t)e, "input conversion", dev);
        xg = xbuf;
    }
    if (k == 0 && y16) return fq_err(ctx, FQ_ERR_UNSUPPORTED, "linear: in_features 0 with a 16-bit output");
    if (k == 0) {
        /* no products: y = bias (or 0), rounded */
        const float *bg = bias ? (const float *)bias->buf.ptr : NULL;
        if (bias && bias->dtype != FQ_F32) {
            e = fq_cuda_nn_convert(bias->buf.ptr, bias->dtype, bbuf, FQ_F32, n, st);
            if (e) return fq_cuda_status(ctx, (cudaError_t)e, "bias conversion", dev);
            bg = bbuf;
        }
        e = fq_cuda_nn_fill_rows(F(y), bg, m, n, st);
        if (!e) e = fq_cuda_nn_round(F(y), m * n, rnd, st);
        return e ? fq_cuda_status(ctx, (cudaError_t)e, "bias fill", dev) : FQ_OK;
    }
    if (p.out16 && (!y16 || y->dtype == p.gt)) {
        /* a bf16 y takes the GEMM's 16-bit result directly */
        fq_status s = gemm_ld(ctx, d, p.gt, wg, xg, bias ? bias->buf.ptr : NULL, bias ? bias->dtype : p.gt,
                              y16 ? y->buf.ptr : dbuf, p.gt, m, n, k, ws, ldy, gelu, 1, 0);
        if (s == GEMM_TRY_F32 && gelu) {
            /* no GELU epilogue here: the GEMM, then GELU in place (the two ops' bits) */
            s = gemm_ld(ctx, d, p.gt, wg, xg, bias ? bias->buf.ptr : NULL, bias ? bias->dtype : p.gt, y->buf.ptr, p.gt,
                        m, n, k, ws, ldy, 0, 1, 0);
            if (s == FQ_OK) {
                e = fq_cuda_nn_gelu_tanh_rows(y->buf.ptr, ldy, y->buf.ptr, ldy, y->dtype, m, n, rnd, st);
                return e ? fq_cuda_status(ctx, (cudaError_t)e, "GELU after the GEMM", dev) : FQ_OK;
            }
        }
        if (s == GEMM_TRY_F32 && ldy != n)
            return fq_err(ctx, FQ_ERR_UNSUPPORTED, "linear: no cuBLASLt algorithm for a strided 16-bit output");
        if (s == FQ_OK) {
            if (y16) return FQ_OK;
            e = fq_cuda_nn_convert(dbuf, p.gt, F(y), FQ_F32, m * n, st); /* exact */
            return e ? fq_cuda_status(ctx, (cudaError_t)e, "output widening", dev) : FQ_OK;
        }
        if (s != GEMM_TRY_F32) return s;
    }
    if (gelu || ldy != n) return fq_err(ctx, FQ_ERR_UNSUPPORTED, "linear: no 16-bit GEMM with a bias epilogue here");
    /* f32 result, rounded to rnd afterwards */
    const float *bg = bias ? (const float *)bias->buf.ptr : NULL;
    if (bias && bias->dtype != FQ_F32) {
        e = fq_cuda_nn_convert(bias->buf.ptr, bias->dtype, bbuf, FQ_F32, n, st);
        if (e) return fq_cuda_status(ctx, (cudaError_t)e, "bias conversion", dev);
        bg = bbuf;
    }
    if (y16) {
        /* a 16-bit y: f32 results of as many rows as dbuf holds, each narrowed
         * with one rounding (round to nearest even, as fq_round_to) */
        const int64_t per = (int64_t)(p.d_bytes / ((size_t)n * 4));
        if (per < 1) return fq_err(ctx, FQ_ERR_SHAPE, "linear: no room for one f32 output row");
        const size_t xrow = (size_t)k * fq_dtype_size(p.gt);
        for (int64_t r0 = 0; r0 < m; r0 += per) {
            const int64_t rows = m - r0 < per ? m - r0 : per;
            FQ_TRY(gemm(ctx, d, p.gt, wg, (const char *)xg + (size_t)r0 * xrow, bg, FQ_F32, dbuf, FQ_F32, rows, n, k,
                        ws));
            e = fq_cuda_nn_convert(dbuf, FQ_F32, (char *)y->buf.ptr + (size_t)(r0 * n) * fq_dtype_size(y->dtype),
                                   y->dtype, rows * n, st);
            if (e) return fq_cuda_status(ctx, (cudaError_t)e, "output narrowing", dev);
        }
        return FQ_OK;
    }
    FQ_TRY(gemm(ctx, d, p.gt, wg, xg, bg, FQ_F32, F(y), FQ_F32, m, n, k, ws));
    e = fq_cuda_nn_round(F(y), m * n, rnd, st);
    if (e) return fq_cuda_status(ctx, (cudaError_t)e, "output rounding", dev);
    return FQ_OK;
}

fq_status fq_nncu_linear(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *w, const fq_qtensor *qw,
                         const fq_tensor *bias, fq_tensor *y, int64_t m, fq_tensor *scratch, fq_dtype rnd) {
    const int64_t n = qw ? qw->info.shape[0] : w->shape[0];
    if (m == 0 || n == 0) return FQ_OK;
    run_t r;
    FQ_TRY(begin(ctx, y->buf.dev, &r));
    fq_status s = linear_run(ctx, r.d, x, w, qw, bias, y, m, scratch, rnd, n, 0);
    if (s == FQ_OK) return end(ctx, &r, 0, "linear", FQ_NN_CLASS_LINEAR);
    fq_cuda_guard_exit(&r.g);
    return fq_err_prefix(ctx, s, "linear '%s'", qw ? fq_qtensor_name(qw) : (w->name ? w->name : "w"));
}

/* Scratch of fq_nncu_linear_q4_group's batched path: the g dequantized weights
 * side by side, then the workspace. */
int64_t fq_nncu_linear_q4_group_scratch(int g, int64_t n, int64_t k, fq_dtype rnd) {
    const size_t w = al((size_t)(g * n * k) * fq_dtype_size(rnd));
    return (int64_t)((NN_ALIGN + w + NN_WORKSPACE_BYTES + 3) / 4);
}

/* y[j] = x · w[j]ᵀ + bias_cat[j n .. (j + 1) n) for j < g as one strided-batched
 * cuBLASLt call: the weights dequantized side by side into the scratch, the
 * outputs at one stride from y[0]. Runs only where that computes what g calls of
 * fq_nncu_linear would (token rows, 16-bit x, y and bias of the GEMM dtype, the
 * bias epilogue available); FQ_ERR_UNSUPPORTED without a message otherwise, and
 * the caller makes the g calls. */
fq_status fq_nncu_linear_q4_group(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *const *w,
                                  const fq_tensor *bias_cat, fq_tensor *const *y, int g, int64_t m, fq_tensor *scratch,
                                  fq_dtype rnd) {
    if (g < 2 || g > 7 || m <= NN_GEMV_MAX_M || rnd == FQ_F32 || x->dtype != rnd || !bias_cat ||
        bias_cat->dtype != rnd)
        return FQ_ERR_UNSUPPORTED;
    const int64_t n = w[0]->info.shape[0], k = w[0]->info.shape[1];
    const size_t es = fq_dtype_size(rnd);
    const int64_t ostride = (int64_t)(((const char *)y[1]->buf.ptr - (const char *)y[0]->buf.ptr) / (ptrdiff_t)es);
    if (k < 1 || n < 1 || bias_cat->numel != g * n || ostride < m * n ||
        (size_t)ostride * es != (size_t)((const char *)y[1]->buf.ptr - (const char *)y[0]->buf.ptr))
        return FQ_ERR_UNSUPPORTED;
    for (int j = 0; j < g; j++)
        if (w[j]->info.shape[0] != n || w[j]->info.shape[1] != k || y[j]->dtype != rnd ||
            (const char *)y[j]->buf.ptr != (const char *)y[0]->buf.ptr + (size_t)(j * ostride) * es)
            return FQ_ERR_UNSUPPORTED;
    const size_t wstep = (size_t)(n * k) * es, wbytes = al(wstep * (size_t)g);
    if ((size_t)scratch->numel * 4 < NN_ALIGN + wbytes + NN_WORKSPACE_BYTES) return FQ_ERR_UNSUPPORTED;
    run_t r;
    FQ_TRY(begin(ctx, y[0]->buf.dev, &r));
    char *wbuf = (char *)(((uintptr_t)scratch->buf.ptr + NN_ALIGN - 1) & ~(uintptr_t)(NN_ALIGN - 1));
    cudaStream_t st = r.d->stream;
    int e = 0;
    for (int j = 0; j < g && !e; j++) e = dequant_to(w[j], wbuf + j * wstep, rnd, st);
    if (e) {
        fq_cuda_guard_exit(&r.g);
        return fq_cuda_status(ctx, (cudaError_t)e, "dequantize4", r.d->index);
    }
    fq_status s = gemm_ld(ctx, r.d, rnd, wbuf, x->buf.ptr, bias_cat->buf.ptr, rnd, y[0]->buf.ptr, rnd, m, n, k,
                          wbuf + wbytes, n, 0, g, ostride);
    if (s == FQ_OK) return end(ctx, &r, 0, "linear", FQ_NN_CLASS_LINEAR);
    fq_cuda_guard_exit(&r.g);
    if (s == GEMM_TRY_F32) return FQ_ERR_UNSUPPORTED; /* no batched bias epilogue: the caller's g calls */
    return fq_err_prefix(ctx, s, "linear group '%s'", fq_qtensor_name(w[0]));
}

int fq_nncu_linear_gelu_ok(fq_dtype rnd, fq_dtype act) { return rnd != FQ_F32 && act == rnd; }

fq_status fq_nncu_linear_gelu_cols(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *w, const fq_qtensor *qw,
                                   const fq_tensor *bias, fq_tensor *out, int64_t c0, int64_t m, fq_tensor *scratch,
                                   fq_dtype rnd) {
    const int64_t n = qw ? qw->info.shape[0] : w->shape[0], ld = out->shape[2];
    if (m == 0 || n == 0) return FQ_OK;
    run_t r;
    FQ_TRY(begin(ctx, out->buf.dev, &r));
    fq_tensor y = *out; /* columns c0.. of out, rows ld apart */
    y.buf.ptr = (char *)out->buf.ptr + (size_t)c0 * fq_dtype_size(out->dtype);
    fq_status s = linear_run(ctx, r.d, x, w, qw, bias, &y, m, scratch, rnd, ld, 1);
    if (s == FQ_OK) return end(ctx, &r, 0, "linear+gelu", FQ_NN_CLASS_LINEAR);
    fq_cuda_guard_exit(&r.g);
    return fq_err_prefix(ctx, s, "linear '%s'", qw ? fq_qtensor_name(qw) : (w->name ? w->name : "w"));
}

/* ---- norms, positions, attention -------------------------------------------------------- */

fq_status fq_nncu_adaln(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *mod, int shift_chunk, int scale_chunk,
                        int64_t nchunks, float eps, fq_tensor *y, fq_dtype rnd) {
    run_t r;
    FQ_TRY(begin(ctx, y->buf.dev, &r));
    const int64_t d = x->shape[2];
    int e = fq_cuda_nn_adaln(x->buf.ptr, y->buf.ptr, x->dtype, x->shape[0], x->shape[1], d, F(mod) + shift_chunk * d,
                             F(mod) + scale_chunk * d, nchunks * d, eps, rnd, r.d->stream);
    return end(ctx, &r, e, "adaln", FQ_NN_CLASS_OTHER);
}

fq_status fq_nncu_gated_add(fq_ctx *ctx, fq_tensor *h, const fq_tensor *mod, int gate_chunk, int64_t nchunks,
                            const fq_tensor *a, fq_dtype rnd) {
    run_t r;
    FQ_TRY(begin(ctx, h->buf.dev, &r));
    const int64_t d = h->shape[2];
    int e = fq_cuda_nn_gated_add(h->buf.ptr, F(mod) + gate_chunk * d, nchunks * d, a->buf.ptr, h->dtype, h->shape[0], h->shape[1], d, rnd,
                                 r.d->stream);
    return end(ctx, &r, e, "gated_add", FQ_NN_CLASS_OTHER);
}

fq_status fq_nncu_gated_add_adaln(fq_ctx *ctx, fq_tensor *h, const fq_tensor *gmod, int gate_chunk, int64_t gn,
                                  const fq_tensor *a, const fq_tensor *nmod, int shift_chunk, int scale_chunk,
                                  int64_t nn, float eps, fq_tensor *y, fq_dtype rnd) {
    run_t r;
    FQ_TRY(begin(ctx, h->buf.dev, &r));
    const int64_t d = h->shape[2], B = h->shape[0];
    int e;
    if (B == 1 || gn == nn) {
        /* one pass: the kernel steps the gate and the modulation by one stride (unused at batch 1) */
        e = fq_cuda_nn_gated_add_adaln(h->buf.ptr, a->buf.ptr, F(gmod) + gate_chunk * d, y->buf.ptr, h->dtype, B,
                                       h->shape[1], d, F(nmod) + shift_chunk * d, F(nmod) + scale_chunk * d, nn * d,
                                       eps, rnd, r.d->stream);
    } else {
        e = fq_cuda_nn_gated_add(h->buf.ptr, F(gmod) + gate_chunk * d, gn * d, a->buf.ptr, h->dtype, B, h->shape[1],
                                 d, rnd, r.d->stream);
        if (!e)
            e = fq_cuda_nn_adaln(h->buf.ptr, y->buf.ptr, h->dtype, B, h->shape[1], d, F(nmod) + shift_chunk * d,
                                 F(nmod) + scale_chunk * d, nn * d, eps, rnd, r.d->stream);
    }
    return end(ctx, &r, e, "gated_add_adaln", FQ_NN_CLASS_OTHER);
}

fq_status fq_nncu_rmsnorm(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *weight, float eps, fq_tensor *y,
                          fq_dtype rnd) {
    run_t r;
    FQ_TRY(begin(ctx, y->buf.dev, &r));
    const int64_t dh = weight->shape[0];
    int e = fq_cuda_nn_rmsnorm(x->buf.ptr, weight->buf.ptr, weight->dtype, y->buf.ptr, x->dtype, x->numel / dh, dh, eps, rnd, r.d->stream);
    return end(ctx, &r, e, "rmsnorm", FQ_NN_CLASS_OTHER);
}

fq_status fq_nncu_rmsnorm_rope(fq_ctx *ctx, fq_tensor *x, const fq_tensor *weight, float eps, const fq_tensor *cos_t,
                               const fq_tensor *sin_t, int64_t t0, int64_t heads, fq_dtype rnd) {
    run_t r;
    FQ_TRY(begin(ctx, x->buf.dev, &r));
    const int64_t dh = weight->shape[0];
    int e = fq_cuda_nn_rmsnorm_rope(x->buf.ptr, x->dtype, weight->buf.ptr, weight->dtype, F(cos_t), F(sin_t),
                                    x->shape[0], x->shape[1], heads, t0, dh, eps, rnd, r.d->stream);
    return end(ctx, &r, e, "rmsnorm_rope", FQ_NN_CLASS_OTHER);
}

fq_status fq_nncu_rmsnorm_rope_n(fq_ctx *ctx, const fq_nn_rope_part *parts, int n, float eps,
                                 const fq_tensor *cos_t, const fq_tensor *sin_t, int64_t heads, fq_dtype rnd,
                                 int impl) {
    run_t r;
    FQ_TRY(begin(ctx, parts[0].x->buf.dev, &r));
    fq_cuda_rope_part cp[FQ_CUDA_ROPE_PARTS];
    for (int i = 0; i < n; i++) {
        const fq_tensor *x = parts[i].x, *w = parts[i].weight;
        cp[i].x = x->buf.ptr, cp[i].w = w->buf.ptr, cp[i].wt = w->dtype;
        cp[i].batch = x->shape[0], cp[i].n = x->shape[1], cp[i].t0 = parts[i].t0;
    }
    int e = fq_cuda_nn_rmsnorm_rope_n(cp, n, parts[0].x->dtype, F(cos_t), F(sin_t), heads,
                                      parts[0].weight->shape[0], eps, rnd, impl, r.d->stream);
    return end(ctx, &r, e, "rmsnorm_rope", FQ_NN_CLASS_OTHER);
}

fq_status fq_nncu_rope_table(fq_ctx *ctx, const fq_tensor *ids, const int64_t axes[3], double theta,
                             fq_tensor *cos_t, fq_tensor *sin_t) {
    run_t r;
    FQ_TRY(begin(ctx, cos_t->buf.dev, &r));
    int e = fq_cuda_nn_rope_table(F(ids), ids->shape[0], axes, theta, F(cos_t), F(sin_t), cos_t->shape[1],
                                  r.d->stream);
    return end(ctx, &r, e, "rope_table", FQ_NN_CLASS_OTHER);
}

fq_status fq_nncu_rope(fq_ctx *ctx, fq_tensor *x, const fq_tensor *cos_t, const fq_tensor *sin_t, int64_t heads,
                       fq_dtype rnd) {
    run_t r;
    FQ_TRY(begin(ctx, x->buf.dev, &r));
    int e = fq_cuda_nn_rope(x->buf.ptr, x->dtype, F(cos_t), F(sin_t), x->shape[0], x->shape[1], heads, x->shape[2] / heads, rnd,
                            r.d->stream);
    return end(ctx, &r, e, "rope", FQ_NN_CLASS_OTHER);
}

fq_status fq_nncu_timestep_proj(fq_ctx *ctx, const fq_tensor *t, fq_tensor *out) {
    run_t r;
    FQ_TRY(begin(ctx, out->buf.dev, &r));
    int e = fq_cuda_nn_timestep_proj(F(t), t->shape[0], out->shape[1] / 2, (float)(-log(10000.0)), F(out),
                                     r.d->stream);
    return end(ctx, &r, e, "timestep_proj", FQ_NN_CLASS_OTHER);
}

int fq_nncu_attention_supported(int64_t dh, fq_dtype rnd, int impl) {
    if (impl == FQ_NN_ATTN_CUDNN) return fq_attn_cudnn_available() && fq_attn_cudnn_shape_ok(dh, rnd, rnd);
    return fq_cuda_nn_attention_supported(dh, rnd, (fq_attn_impl)impl);
}

/* Our kernels' scratch; cuDNN's workspace is added by fq_nncu_attention_plan. */
int64_t fq_nncu_attention_scratch(int64_t batch, int64_t s, int64_t heads, int64_t dh, fq_dtype rnd, int impl,
                                  fq_dtype xt) {
    if (impl == FQ_NN_ATTN_CUDNN) return 0;
    size_t b = fq_cuda_nn_attention_scratch_bytes(batch, s, heads, dh, rnd, (fq_attn_impl)impl, xt);
    return b ? (int64_t)((b + NN_ALIGN + 3) / 4) : 0;
}

/* Whether impl sends these operands to cuDNN (AUTO: whenever cuDNN takes them). */
static int use_cudnn(int impl, int64_t dh, fq_dtype rnd, fq_dtype xt) {
    return impl == FQ_NN_ATTN_CUDNN || (impl == FQ_NN_ATTN_AUTO && fq_attn_cudnn_available() &&
                                        fq_attn_cudnn_shape_ok(dh, rnd, xt));
}

fq_status fq_nncu_attention_plan(fq_ctx *ctx, int device, int64_t batch, int64_t s, int64_t heads, int64_t dh,
                                 fq_dtype rnd, fq_dtype xt, int impl, int64_t ldo, int64_t *scratch) {
    const int strided = ldo > 0 && ldo != heads * dh;
    if (!use_cudnn(impl, dh, rnd, xt)) return strided ? FQ_ERR_UNSUPPORTED : FQ_OK;
    if (impl == FQ_NN_ATTN_CUDNN && !fq_attn_cudnn_available())
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "attention_plan: this build has no cuDNN (cudnn.h was not found)");
    if (impl == FQ_NN_ATTN_CUDNN && !fq_attn_cudnn_shape_ok(dh, rnd, xt))
        return fq_err(ctx, FQ_ERR_UNSUPPORTED,
                      "attention_plan (cuDNN): needs bf16/f16 q, k, v stored as the compute dtype and a head dim "
                      "that is a multiple of 8 <= 256 (got %s storage, %s compute, head dim %lld)",
                      fq_dtype_name(xt), fq_dtype_name(rnd), (long long)dh);
    fq_cuda_dev *d;
    FQ_TRY(fq_cuda_dev_get(ctx, device, &d));
    int ok = 0;
    size_t ws = 0;
    FQ_TRY(fq_attn_cudnn_plan(ctx, d, rnd, batch, s, heads, dh, ldo, impl == FQ_NN_ATTN_CUDNN, &ok, &ws));
    if (!ok && strided) return FQ_ERR_UNSUPPORTED; /* no strided output without cuDNN's plan */
    const int64_t need = ok && ws ? (int64_t)((ws + NN_ALIGN + 3) / 4) : 0;
    if (need > *scratch) *scratch = need;
    return FQ_OK;
}

fq_status fq_nncu_attention(fq_ctx *ctx, const fq_tensor *q, const fq_tensor *k, const fq_tensor *v, int64_t heads,
                            fq_tensor *out, int64_t ldo, fq_tensor *scratch, fq_dtype rnd, int impl) {
    run_t r;
    const int64_t dh = q->shape[2] / heads;
    const int strided = ldo > 0 && ldo != q->shape[2];
    if (strided && !use_cudnn(impl, dh, rnd, q->dtype)) return FQ_ERR_UNSUPPORTED;
    if (impl == FQ_NN_ATTN_CUDNN && !fq_attn_cudnn_shape_ok(dh, rnd, q->dtype))
        return fq_err(ctx, FQ_ERR_UNSUPPORTED,
                      "attention (cuDNN): q, k, v, out must be stored as the compute dtype (bf16/f16); got %s "
                      "storage with %s compute",
                      fq_dtype_name(q->dtype), fq_dtype_name(rnd));
    FQ_TRY(begin(ctx, out->buf.dev, &r));
    void *sp = NULL; /* the scratch, 256-byte aligned: our packed q, k, v or cuDNN's workspace */
    size_t sb = 0;
    if (scratch && scratch->buf.ptr) {
        uintptr_t a = ((uintptr_t)scratch->buf.ptr + NN_ALIGN - 1) & ~(uintptr_t)(NN_ALIGN - 1);
        size_t skip = a - (uintptr_t)scratch->buf.ptr, have = (size_t)scratch->numel * 4;
        sp = (void *)a;
        sb = have > skip ? have - skip : 0;
    }
    if (use_cudnn(impl, dh, rnd, q->dtype)) {
        int ran = 0;
        fq_status s = fq_attn_cudnn_run(ctx, r.d, rnd, q->shape[0], q->shape[1], heads, dh, q->buf.ptr, k->buf.ptr,
                                        v->buf.ptr, out->buf.ptr, ldo, sp, sb, impl == FQ_NN_ATTN_CUDNN, &ran);
        if (s != FQ_OK) {
            fq_cuda_guard_exit(&r.g);
            return s;
        }
        if (ran) return end(ctx, &r, 0, "attention", FQ_NN_CLASS_ATTENTION);
        if (strided) {
            fq_cuda_guard_exit(&r.g);
            return FQ_ERR_UNSUPPORTED;
        }
        /* AUTO and no cuDNN plan for these sizes: our kernel */
    }
    if (!(r.d->nn_prepared & NN_PREP_ATTENTION)) {
        /* fq_nn_prepare does this ahead of a forward; a bare op call gets it here */
        int e = fq_cuda_nn_attention_prepare();
        if (e) return end(ctx, &r, e, "attention (cudaFuncSetAttribute)", FQ_NN_CLASS_ATTENTION);
        r.d->nn_prepared |= NN_PREP_ATTENTION;
    }
    int e = fq_cuda_nn_attention(q->buf.ptr, k->buf.ptr, v->buf.ptr, out->buf.ptr, q->dtype, q->shape[0], q->shape[1], heads, q->shape[2] / heads, sp,
                                 sb, rnd, (fq_attn_impl)impl, r.d->stream);
    return end(ctx, &r, e, "attention", FQ_NN_CLASS_ATTENTION);
}

/* ---- devices ------------------------------------------------------------------------------ */

fq_status fq_nncu_prepare(fq_ctx *ctx, int device) {
    fq_cuda_dev *d;
    FQ_TRY(fq_cuda_dev_get(ctx, device, &d));
    struct cublasLtContext *h;
    FQ_TRY(fq_cuda_dev_blaslt(ctx, d, &h));
    if (!(d->nn_prepared & NN_PREP_ATTENTION)) {
        fq_cuda_guard g;
        FQ_TRY(fq_cuda_guard_enter(ctx, device, &g));
        int e = fq_cuda_nn_attention_prepare();
        fq_cuda_guard_exit(&g);
        if (e) return fq_cuda_status(ctx, (cudaError_t)e, "cudaFuncSetAttribute (attention kernels)", device);
        d->nn_prepared |= NN_PREP_ATTENTION;
    }
    return FQ_OK;
}

fq_status fq_nncu_sync(fq_ctx *ctx, int device) {
    fq_cuda_dev *d;
    FQ_TRY(fq_cuda_dev_get(ctx, device, &d));
    fq_cuda_guard g;
    FQ_TRY(fq_cuda_guard_enter(ctx, device, &g));
    cudaError_t e = cudaStreamSynchronize(d->stream);
    fq_cuda_guard_exit(&g);
    if (e != cudaSuccess) return fq_cuda_status(ctx, e, "cudaStreamSynchronize", device);
    return FQ_OK;
}

/* ---- CUDA graphs of a device's stream -------------------------------------------------------- */

struct fq_nn_graph {
    int device;
    cudaGraphExec_t exec; /* owned */
};

fq_status fq_nncu_graph_begin(fq_ctx *ctx, int device) {
    fq_cuda_dev *d;
    FQ_TRY(fq_cuda_dev_get(ctx, device, &d));
    fq_cuda_guard g;
    FQ_TRY(fq_cuda_guard_enter(ctx, device, &g));
    /* relaxed: the launchers' device queries (cudaStreamGetDevice, occupancy) stay allowed; a wait on
     * the stream still ends the capture with an error */
    cudaError_t e = cudaStreamBeginCapture(d->stream, cudaStreamCaptureModeRelaxed);
    fq_cuda_guard_exit(&g);
    return e == cudaSuccess ? FQ_OK : fq_cuda_status(ctx, e, "cudaStreamBeginCapture", device);
}

fq_status fq_nncu_graph_end(fq_ctx *ctx, int device, fq_nn_graph **out) {
    fq_cuda_dev *d;
    FQ_TRY(fq_cuda_dev_get(ctx, device, &d));
    fq_cuda_guard g;
    FQ_TRY(fq_cuda_guard_enter(ctx, device, &g));
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    cudaError_t e = cudaStreamEndCapture(d->stream, &graph);
    if (e == cudaSuccess) e = cudaGraphInstantiate(&exec, graph, 0);
    if (graph) (void)cudaGraphDestroy(graph);
    fq_nn_graph *r = NULL;
    if (e == cudaSuccess && !(r = malloc(sizeof *r))) {
        (void)cudaGraphExecDestroy(exec);
        fq_cuda_guard_exit(&g);
        return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "graph_end: out of host memory");
    }
    fq_cuda_guard_exit(&g);
    if (e != cudaSuccess) return fq_cuda_status(ctx, e, "capturing the ops into a CUDA graph", device);
    r->device = device;
    r->exec = exec;
    *out = r;
    return FQ_OK;
}

fq_status fq_nncu_graph_launch(fq_ctx *ctx, fq_nn_graph *gr) {
    fq_cuda_dev *d;
    FQ_TRY(fq_cuda_dev_get(ctx, gr->device, &d));
    fq_cuda_guard g;
    FQ_TRY(fq_cuda_guard_enter(ctx, gr->device, &g));
    cudaError_t e = cudaGraphLaunch(gr->exec, d->stream);
    fq_cuda_guard_exit(&g);
    return e == cudaSuccess ? FQ_OK : fq_cuda_status(ctx, e, "cudaGraphLaunch", gr->device);
}

void fq_nncu_graph_free(fq_nn_graph *gr) {
    if (!gr) return;
    fq_cuda_guard g;
    if (fq_cuda_guard_enter(NULL, gr->device, &g) == FQ_OK) {
        (void)cudaGraphExecDestroy(gr->exec);
        fq_cuda_guard_exit(&g);
    }
    free(gr);
}

fq_status fq_nncu_memory(fq_ctx *ctx, int device, size_t *free_bytes, size_t *total_bytes) {
    fq_cuda_dev *d;
    FQ_TRY(fq_cuda_dev_get(ctx, device, &d));
    fq_cuda_guard g;
    FQ_TRY(fq_cuda_guard_enter(ctx, device, &g));
    cudaError_t e = cudaMemGetInfo(free_bytes, total_bytes);
    fq_cuda_guard_exit(&g);
    if (e != cudaSuccess) return fq_cuda_status(ctx, e, "cudaMemGetInfo", device);
    return FQ_OK;
}

fq_status fq_nncu_describe(fq_ctx *ctx, int device, char *buf, size_t n) {
    fq_cuda_dev *d;
    FQ_TRY(fq_cuda_dev_get(ctx, device, &d));
    struct cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, device);
    if (e != cudaSuccess) return fq_cuda_status(ctx, e, "cudaGetDeviceProperties", device);
    snprintf(buf, n, "%s, %d SMs, sm_%d%d", p.name, p.multiProcessorCount, p.major, p.minor);
    return FQ_OK;
}

fq_status fq_nncu_random(fq_ctx *ctx, fq_tensor *t, uint64_t seed, float scale, float shift) {
    run_t r;
    FQ_TRY(begin(ctx, t->buf.dev, &r));
    int e = fq_cuda_nn_random(t->buf.ptr, t->dtype, t->numel, seed, scale, shift, r.d->stream);
    return end(ctx, &r, e, "random", FQ_NN_CLASS_OTHER);
}

void fq_nncu_prof_free(fq_nn_prof *p) {
    if (!p) return;
    fq_cuda_guard g;
    if (fq_cuda_guard_enter(NULL, p->device, &g) == FQ_OK) {
        for (int i = 0; i < p->cap; i++)
            if (p->ev[i]) (void)cudaEventDestroy(p->ev[i]);
        fq_cuda_guard_exit(&g);
    }
    free(p->ev);
    free(p->cls);
    free(p->name);
    free(p->dt);
    free(p);
}

fq_status fq_nncu_prof_create(fq_ctx *ctx, int device, int events, fq_nn_prof **out) {
    if (events < 2) return fq_err(ctx, FQ_ERR_INVALID_ARG, "nn_prof: needs at least 2 events");
    fq_cuda_dev *d;
    FQ_TRY(fq_cuda_dev_get(ctx, device, &d));
    fq_nn_prof *p = calloc(1, sizeof *p);
    if (!p) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    p->device = device;
    p->ev = calloc((size_t)events, sizeof *p->ev);
    p->cls = calloc((size_t)events, 1);
    p->name = calloc((size_t)events, sizeof *p->name);
    p->dt = calloc((size_t)events, sizeof *p->dt);
    if (!p->ev || !p->cls || !p->name || !p->dt) {
        fq_nncu_prof_free(p);
        return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    }
    p->cap = events;
    fq_cuda_guard g;
    fq_status s = fq_cuda_guard_enter(ctx, device, &g);
    if (s != FQ_OK) {
        fq_nncu_prof_free(p);
        return s;
    }
    cudaError_t e = cudaSuccess;
    for (int i = 0; i < events && e == cudaSuccess; i++) e = cudaEventCreate(&p->ev[i]);
    fq_cuda_guard_exit(&g);
    if (e != cudaSuccess) {
        fq_nncu_prof_free(p);
        return fq_cuda_status(ctx, e, "cudaEventCreate", device);
    }
    *out = p;
    return FQ_OK;
}

fq_status fq_nncu_prof_start(fq_ctx *ctx, fq_nn_prof *p) {
    fq_cuda_dev *d;
    FQ_TRY(fq_cuda_dev_get(ctx, p->device, &d));
    fq_cuda_guard g;
    FQ_TRY(fq_cuda_guard_enter(ctx, p->device, &g));
    p->n = 0;
    p->overflow = 0;
    d->nn_prof = p;
    int e = prof_mark(d, FQ_NN_CLASS_OTHER, "start"); /* the start */
    fq_cuda_guard_exit(&g);
    if (e) {
        d->nn_prof = NULL;
        return fq_cuda_status(ctx, (cudaError_t)e, "cudaEventRecord", p->device);
    }
    return FQ_OK;
}

fq_status fq_nncu_prof_stop(fq_ctx *ctx, fq_nn_prof *p, double ms[FQ_NN_CLASSES], int64_t ops[FQ_NN_CLASSES]) {
    fq_cuda_dev *d;
    FQ_TRY(fq_cuda_dev_get(ctx, p->device, &d));
    d->nn_prof = NULL;
    for (int c = 0; c < FQ_NN_CLASSES; c++) ms[c] = 0.0, ops[c] = 0;
    fq_cuda_guard g;
    FQ_TRY(fq_cuda_guard_enter(ctx, p->device, &g));
    cudaError_t e = cudaStreamSynchronize(d->stream);
    for (int i = 1; i < p->n && e == cudaSuccess; i++) {
        float t = 0.0f;
        e = cudaEventElapsedTime(&t, p->ev[i - 1], p->ev[i]);
        p->dt[i] = t;
        ms[p->cls[i]] += t;
        ops[p->cls[i]]++;
    }
    fq_cuda_guard_exit(&g);
    if (e != cudaSuccess) return fq_cuda_status(ctx, e, "nn_prof (cudaEventElapsedTime)", p->device);
    if (p->overflow)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "nn_prof: more than %d ops ran; the profile is incomplete", p->cap);
    return FQ_OK;
}
int fq_nncu_prof_ops(const fq_nn_prof *p, int cap, const char **names, double *ms, int64_t *count) {
    int n = 0;
    for (int i = 1; i < p->n; i++) {
        int j = 0;
        while (j < n && strcmp(names[j], p->name[i]) != 0) j++;
        if (j == n) {
            if (n == cap) continue;
            names[n] = p->name[i], ms[n] = 0.0, count[n] = 0;
            n++;
        }
        ms[j] += p->dt[i];
        count[j]++;
    }
    return n;
}
#else
typedef int fq_nn_ops_cuda_unused; /* ISO C forbids an empty translation unit */
#endif

/* fq_linear4_cuda: the CUDA side of fq_linear_4bit. Picks a kernel by M, shape,
 * format and architecture, and keeps "dequantize into a scratch + cuBLASLt" as the
 * reference and the fallback for whatever the fast kernels do not cover.
 *
 * Everything runs under the guard of the weight's device, on that device's stream,
 * with that device's state (cuBLASLt handle, workspaces, kernel attributes). The
 * call is asynchronous: it returns once the work is queued on the stream.
 *
 * Automatic choice (measured on an H100, bench/results/bench_linear_h100_*.txt):
 *   M <= 2    gemv4_bulk (sm_90) up to 2^24 weights (gemv4_win at M = 1 when
 *             the weight is ready, see fq_qtensor.ready), gemv4_win above (and
 *             wherever bulk cannot run), else gemv4_tc, else gemv4_stream;
 *   M <= 16   gemv4_tc if it supports the operands, else gemv4_simple;
 *   M > 16    below LIN_DQ_MIN_M rows (and up to 320 rows when K >= 4N)
 *             gemm4_wgmma on sm_90 (when built), else gemm4_mma on sm_80+, when
 *             they support the operands; from LIN_DQ_MIN_M to 512 rows (640 when
 *             N >= K) gemm4_ws (sm_90a) on weights of more than 2^24 elements - with
 *             bf16 x its fast decode, up to 640 rows (768 when N >= K); otherwise
 *             dequantize + cuBLASLt, which is faster there (so the automatic choice
 *             never loses to it).
 * ctx->linear_kernel forces a family (FQ_LINEAR_GEMV / GEMM / DEQUANT_BLAS);
 * a forced family that cannot run the operands falls back to one that can
 * (GEMV -> gemv4_simple, GEMM -> dequantize + cuBLASLt). The internal values
 * FQ_LIN4_SELECT(impl, cfg) (tests, benchmarks) select one implementation and
 * fail with FQ_ERR_UNSUPPORTED instead of falling back; FQ_LIN4_AUTO_EXACT is the
 * automatic choice restricted to kernels whose weights are bit-identical to
 * dequantize_4bit's (the small-M fast kernels round W differently). */
#ifdef FQ_HAVE_CUDA
#include "core/cuda_device.h"
#include "kernels/cuda/linear_cuda.h"
#include "kernels/kernels.h"
#include "ops/linear_internal.h"

#include <cublasLt.h>
#include <string.h>

#define LIN_GEMV_MAX_M 16
#define LIN_STREAM_MAX_M 2
#define LIN_BULK_MAX_NK ((int64_t)1 << 24)        /* gemv4_bulk (fast) up to this many weights  */
#define LIN_BULK_EXACT_MAX_NK ((int64_t)10 << 20) /* gemv4_bulk (exact) up to this many weights */
#define LIN_DQ_MIN_M 192
#define LIN_PREP_GEMM_MMA 1u
#define LIN_PREP_GEMM_WGMMA 2u
#define LIN_PREP_GEMV_STREAM 4u
#define LIN_PREP_GEMV_BULK 8u
#define LIN_PREP_GEMM_WS 16u
#define LIN_PREP_GEMV_FLAT 32u
#define LIN_PREP_GEMV_WIN 64u
/* gemm4_ws from LIN_DQ_MIN_M rows up to LIN_WS_MAX_M (N >= K) or LIN_WS_MAX_M_KBIG
 * (K > N). H100 (session 9, in turn with cuBLASLt): at 512 rows 0.67-0.76x cuBLAS on the
 * five large FLUX shapes against 0.58-0.62x for dequantize + cuBLASLt; at 640 rows
 * dequantize + cuBLASLt is faster where K > N (3072x12288: 103 vs 115-121 us) and
 * gemm4_ws still where N >= K (21504x3072: 162-165 vs 185 us; 12288x3072 about even);
 * from 768 rows on dequantize + cuBLASLt is as fast or faster except on 21504x3072.
 * With bf16 x and the fast decode (session 13, bench/results/gemm4_ws_fast_range_h100_*):
 * at 640 rows faster where K > N too (3072x12288: 90 vs 106 us), at 768 where N >= K
 * (21504x3072: 176 vs 211 us), not where K > N (3072x15360: 164 vs 150 us). */
#define LIN_WS_MAX_M 640
#define LIN_WS_MAX_M_KBIG 512
#define LIN_WS_FAST_MAX_M 768
#define LIN_WS_FAST_MAX_M_KBIG 640
#define LIN_WS_MIN_NK ((int64_t)1 << 24) /* ... for weights larger than this (smaller: dequantize + cuBLASLt) */
#define LIN_WORKSPACE_BYTES ((size_t)32 << 20)

static const char *g_impl_names[FQ_LIN4_COUNT] = {"none",        "gemv4_simple",     "gemv4_tc",    "gemm4_mma",
                                                  "gemm4_wgmma", "dequant_cublaslt", "gemv4_stream", "gemv4_bulk",
                                                  "gemm4_ws",    "gemv4_flat",      "gemv4_win"};

const char *fq_lin4_impl_name(fq_lin4_impl k) {
    return (unsigned)k < FQ_LIN4_COUNT ? g_impl_names[k] : "?";
}

/* ---- operands ------------------------------------------------------------------ */

typedef struct {
    fq_lin4_weight w;
    fq_lin4_io io;
    fq_lin4_epilogue e;
    fq_quant_type qtype;
    int device;
} lin_op;

static int io_dtype_ok(fq_dtype t) { return t == FQ_F32 || t == FQ_F16 || t == FQ_BF16; }

/* Fills op from the tensors; checks what the kernels rely on (the ops layer has
 * checked placement already). */
static fq_status make_op(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *w, const fq_tensor *bias,
                         fq_tensor *y, int64_t m, lin_op *op) {
    memset(op, 0, sizeof *op);
    if (!x || !w || !y) return fq_err(ctx, FQ_ERR_INVALID_ARG, "linear_4bit: NULL operand");
    if (w->info.device.type != FQ_DEVICE_CUDA)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "linear_4bit: weight '%s' is not on a CUDA device",
                      fq_qtensor_name(w));
    if (x->ndim < 1 || y->ndim < 1) return fq_err(ctx, FQ_ERR_SHAPE, "linear_4bit: x and y need a last dim");
    if (!io_dtype_ok(x->dtype) || !io_dtype_ok(y->dtype))
        return fq_err(ctx, FQ_ERR_SHAPE, "linear_4bit: x is %s and y is %s (expected f32, f16 or bf16)",
                      fq_dtype_name(x->dtype), fq_dtype_name(y->dtype));
    const int64_t k = x->shape[x->ndim - 1], n = y->shape[y->ndim - 1];
    if (m < 0 || m * k != x->numel || m * n != y->numel || n * k != w->info.numel)
        return fq_err(ctx, FQ_ERR_SHAPE,
                      "linear_4bit: x has %lld elements, y %lld and weight '%s' %lld; they do not "
                      "fit M=%lld, N=%lld, K=%lld",
                      (long long)x->numel, (long long)y->numel, fq_qtensor_name(w), (long long)w->info.numel,
                      (long long)m, (long long)n, (long long)k);
    if (bias) {
        if (!fq_dtype_is_float(bias->dtype) || bias->numel != n)
            return fq_err(ctx, FQ_ERR_SHAPE, "linear_4bit: bias has %lld %s elements (expected %lld floats)",
                          (long long)bias->numel, fq_dtype_name(bias->dtype), (long long)n);
        op->e.bias = bias->buf.ptr;
        op->e.bias_dtype = (int)bias->dtype;
    }
    op->e.act = FQ_EPI_NONE;
    op->w.packed = (const uint8_t *)w->m[FQ_QMEMBER_PACKED].ptr;
    op->w.quant_map = (const float *)w->m[FQ_QMEMBER_QUANT_MAP].ptr;
    op->w.nested = w->info.double_quant ? 1 : 0;
    op->w.ready = w->ready;
    if (op->w.nested) {
        op->w.qabsmax = (const uint8_t *)w->m[FQ_QMEMBER_ABSMAX].ptr;
        op->w.nested_absmax = (const float *)w->m[FQ_QMEMBER_NESTED_ABSMAX].ptr;
        op->w.nested_code = (const float *)w->m[FQ_QMEMBER_NESTED_QUANT_MAP].ptr;
        op->w.offset = w->info.offset;
    } else {
        op->w.absmax = (const float *)w->m[FQ_QMEMBER_ABSMAX].ptr;
    }
    op->w.blocksize = w->info.blocksize;
    op->w.n = n;
    op->w.k = k;
    op->io.x = x->buf.ptr;
    op->io.x_dtype = (int)x->dtype;
    op->io.y = y->buf.ptr;
    op->io.y_dtype = (int)y->dtype;
    op->io.m = m;
    op->qtype = w->info.type;
    op->device = w->info.device.index;
    return FQ_OK;
}

/* ---- choice ---------------------------------------------------------------------- */

static int can_run(const fq_cuda_dev *d, fq_lin4_impl k, const lin_op *op) {
    switch (k) {
    case FQ_LIN4_GEMV_SIMPLE:
    case FQ_LIN4_DEQUANT_BLAS: return 1;
    case FQ_LIN4_GEMV_TC: return d->cc_major >= 8 && fq_cuda_gemv4_tc_supported(&op->w, &op->io);
    case FQ_LIN4_GEMV_STREAM: return d->cc_major >= 8 && fq_cuda_gemv4_stream_supported(&op->w, &op->io);
    case FQ_LIN4_GEMV_BULK: return d->cc_major >= 9 && fq_cuda_gemv4_bulk_supported(&op->w, &op->io);
    case FQ_LIN4_GEMV_FLAT: return d->cc_major >= 8 && fq_cuda_gemv4_flat_supported(&op->w, &op->io);
    case FQ_LIN4_GEMV_WIN: return d->cc_major >= 8 && fq_cuda_gemv4_win_supported(&op->w, &op->io);
    case FQ_LIN4_GEMM_MMA: return d->cc_major >= 8 && fq_cuda_gemm4_mma_supported(&op->w, &op->io);
    case FQ_LIN4_GEMM_WGMMA:
        return d->cc_major == 9 && d->cc_minor == 0 && fq_cuda_gemm4_wgmma_built() &&
               fq_cuda_gemm4_wgmma_supported(&op->w, &op->io);
    case FQ_LIN4_GEMM_WS:
        return d->cc_major == 9 && d->cc_minor == 0 && fq_cuda_gemm4_ws_built() &&
               fq_cuda_gemm4_ws_supported(&op->w, &op->io);
    default: return 0;
    }
}

static fq_lin4_impl best_gemm(const fq_cuda_dev *d, const lin_op *op);

/* The best GEMV-family kernel for op (M <= LIN_GEMV_MAX_M). H100, M = 1 and 2
 * (bench/results/bench_linear_gemv3_h100_2026-11-27.txt, one run): gemv4_bulk is
 * fastest on small weights (3072x3072 M = 1: 6.3 us vs 6.7 gemv4_win; 3072x4096
 * 7.6 vs 7.6), gemv4_win on every larger FLUX shape at M = 1 and 2 (M = 1: 21504x3072
 * 19.4 us vs 24.1 gemv4_flat, 28.6 gemv4_tc; 12288x3072 13.2 vs 16.1 gemv4_tc;
 * 3072x15360 15.3 vs 19.5 gemv4_flat; M = 2: 21504x3072 22.5 vs 27.0). gemv4_tc and
 * gemv4_stream are the fallbacks where it cannot run (K % 32 != 0, K > 16384,
 * blocksize < 32). All of these round W differently from dequantize (gemv4_win
 * not at all; the others within the bf16/f16 tolerance); FQ_LIN4_AUTO_EXACT keeps
 * dequantize's rounding. */
static fq_lin4_impl best_gemv(const fq_cuda_dev *d, const lin_op *op) {
    if (op->io.m <= LIN_STREAM_MAX_M) {
        const int small = op->w.n * op->w.k <= LIN_BULK_MAX_NK;
        /* a ready weight at M = 1 streams before the PDL wait in gemv4_win, whose
         * 8-warp blocks then overlap the previous call (session 7: 3072x3072 4.3 us
         * vs 6.4 for gemv4_bulk, 3072x4096 5.0 vs 7.6) */
        if (small && op->io.m == 1 && op->w.ready && d->cc_major >= 9 && can_run(d, FQ_LIN4_GEMV_WIN, op))
            return FQ_LIN4_GEMV_WIN;
        if (small && can_run(d, FQ_LIN4_GEMV_BULK, op)) return FQ_LIN4_GEMV_BULK;
        if (can_run(d, FQ_LIN4_GEMV_WIN, op)) return FQ_LIN4_GEMV_WIN;
        if (!small && can_run(d, FQ_LIN4_GEMV_TC, op)) return FQ_LIN4_GEMV_TC;
        if (can_run(d, FQ_LIN4_GEMV_STREAM, op)) return FQ_LIN4_GEMV_STREAM;
    }
    return can_run(d, FQ_LIN4_GEMV_TC, op) ? FQ_LIN4_GEMV_TC : FQ_LIN4_GEMV_SIMPLE;
}

/* FQ_LIN4_AUTO_EXACT for M <= LIN_GEMV_MAX_M: the fastest kernel whose weights are
 * bit-identical to dequantize_4bit's (gemv4_bulk exact on small weights: 3072x3072
 * 6.7 us vs 7.1; else gemv4_stream), or FQ_LIN4_NONE (the caller goes on to the
 * GEMM choice, whose kernels round that way too). */
static fq_lin4_impl best_gemv_exact(const fq_cuda_dev *d, const lin_op *op, int *cfg) {
    if (op->io.m <= LIN_STREAM_MAX_M && op->w.n * op->w.k <= LIN_BULK_EXACT_MAX_NK &&
        can_run(d, FQ_LIN4_GEMV_BULK, op)) {
        *cfg = FQ_GEMV4_BULK_EXACT;
        return FQ_LIN4_GEMV_BULK;
    }
    if (can_run(d, FQ_LIN4_GEMV_STREAM, op)) return FQ_LIN4_GEMV_STREAM; /* cfg 0: exact */
    if (can_run(d, FQ_LIN4_GEMV_SIMPLE, op) && op->io.x_dtype == FQ_F32) return FQ_LIN4_GEMV_SIMPLE;
    return FQ_LIN4_NONE;
}

/* Automatic choice for M > LIN_GEMV_MAX_M: the fused GEMM where it beats dequantize
 * + cuBLASLt on the H100 (bench/results/bench_linear_h100_*.txt), else the latter. */
static fq_lin4_impl auto_gemm(const fq_cuda_dev *d, const lin_op *op, int fast) {
    fq_lin4_impl k = best_gemm(d, op);
    if (k == FQ_LIN4_NONE) return FQ_LIN4_DEQUANT_BLAS;
    /* H100 (2026-11-27): gemm4_wgmma / gemm4_mma win below ~192 rows; at 256 rows only
     * where K >= 4N (3072x12288: 75 vs 80 us, 3072x15360: 88 vs 98 us); from 512 rows on
     * dequantize + cuBLASLt beats them everywhere (0.94x cuBLAS at 4608 rows vs 0.29-0.52x). */
    const int64_t m = op->io.m;
    /* gemm4_ws (sm_90) at 192..512 rows (..640 where N >= K): faster than dequantize +
     * cuBLASLt at M = 256 and 512 on 5 of the 7 FLUX shapes (M = 256, 3072x12288: 44 vs 78
     * us; M = 512, 21504x3072: 129 vs 163 us); dequantize + cuBLASLt is faster on 3072x3072
     * and 3072x4096, the two shapes of at most 2^24 weights, which therefore take it, and
     * above the limits (bench/results/bench_linear_m512_h100_2026-11-27_session9.txt,
     * bench_linear_m768_h100_2026-11-27_session9.txt). */
    const int64_t ws_max = fast ? (op->w.k > op->w.n ? LIN_WS_FAST_MAX_M_KBIG : LIN_WS_FAST_MAX_M)
                                : (op->w.k > op->w.n ? LIN_WS_MAX_M_KBIG : LIN_WS_MAX_M);
    if (m >= LIN_DQ_MIN_M && m <= ws_max && can_run(d, FQ_LIN4_GEMM_WS, op))
        return op->w.n * op->w.k > LIN_WS_MIN_NK ? FQ_LIN4_GEMM_WS : FQ_LIN4_DEQUANT_BLAS;
    if (m < LIN_DQ_MIN_M || (m <= 320 && op->w.k >= 4 * op->w.n)) return k;
    return FQ_LIN4_DEQUANT_BLAS;
}

static fq_lin4_impl best_gemm(const fq_cuda_dev *d, const lin_op *op) {
    if (can_run(d, FQ_LIN4_GEMM_WGMMA, op)) return FQ_LIN4_GEMM_WGMMA;
    if (can_run(d, FQ_LIN4_GEMM_MMA, op)) return FQ_LIN4_GEMM_MMA;
    return FQ_LIN4_NONE;
}

/* The implementation and its tile configuration for op under the choice `sel`
 * (ctx->linear_kernel). FQ_LIN4_NONE (with a message) if an exact choice cannot run. */
static fq_lin4_impl choose(fq_ctx *ctx, const fq_cuda_dev *d, int sel, const lin_op *op, int *cfg) {
    *cfg = 0;
    if (sel >= FQ_LIN4_EXACT) {
        const int impl = (sel - FQ_LIN4_EXACT) / 256;
        *cfg = (sel - FQ_LIN4_EXACT) % 256;
        if (impl <= FQ_LIN4_NONE || impl >= FQ_LIN4_COUNT) {
            fq_err(ctx, FQ_ERR_INVALID_ARG, "linear_4bit: unknown kernel selection %d", sel);
            return FQ_LIN4_NONE;
        }
        if (!can_run(d, (fq_lin4_impl)impl, op)) {
            fq_err(ctx, FQ_ERR_UNSUPPORTED,
                   "linear_4bit: kernel %s cannot run x %s [M=%lld, K=%lld], y %s, blocksize %lld on "
                   "cuda:%d (sm_%d%d)",
                   fq_lin4_impl_name((fq_lin4_impl)impl), fq_dtype_name((fq_dtype)op->io.x_dtype),
                   (long long)op->io.m, (long long)op->w.k, fq_dtype_name((fq_dtype)op->io.y_dtype),
                   (long long)op->w.blocksize, d->index, d->cc_major, d->cc_minor);
            return FQ_LIN4_NONE;
        }
        return (fq_lin4_impl)impl;
    }
    if (sel == FQ_LIN4_AUTO_EXACT) {
        fq_lin4_impl k = op->io.m <= LIN_GEMV_MAX_M ? best_gemv_exact(d, op, cfg) : FQ_LIN4_NONE;
        return k != FQ_LIN4_NONE ? k : auto_gemm(d, op, 0);
    }
    switch (sel) {
    case FQ_LINEAR_GEMV: return best_gemv(d, op);
    case FQ_LINEAR_GEMM: {
        fq_lin4_impl k = best_gemm(d, op);
        return k != FQ_LIN4_NONE ? k : FQ_LIN4_DEQUANT_BLAS;
    }
    case FQ_LINEAR_DEQUANT_BLAS: return FQ_LIN4_DEQUANT_BLAS;
    default: break;
    }
    if (op->io.m <= LIN_GEMV_MAX_M) return best_gemv(d, op);
    /* gemm4_ws with bf16 x: the fast decode, bitsandbytes' own inference rounding of W
     * (2-17 % faster at 256 rows on the H100, 12-22 % at 512; FQ_LIN4_AUTO_EXACT keeps
     * dequantize's rounding) */
    const int fast = op->io.x_dtype == FQ_BF16;
    const fq_lin4_impl k = auto_gemm(d, op, fast);
    if (k == FQ_LIN4_GEMM_WS && fast) *cfg = FQ_GEMM4_WS_FAST_OK;
    return k;
}

/* ---- dequantize + cuBLASLt ---------------------------------------------------------- */

static size_t dtype_bytes(int t) { return t == FQ_F32 ? 4 : 2; }

static cudaDataType_t blas_type(int t) {
    return t == FQ_F32 ? CUDA_R_32F : t == FQ_F16 ? CUDA_R_16F : CUDA_R_16BF;
}

static fq_status blas_err(fq_ctx *ctx, cublasStatus_t st, const char *what, int dev) {
    return fq_err(ctx, st == CUBLAS_STATUS_ALLOC_FAILED ? FQ_ERR_OUT_OF_MEMORY : FQ_ERR_CUDA,
                  "cuda:%d: %s failed: %s", dev, what, cublasLtGetStatusString(st));
}

#define BLAS_TRY(ctx, call, dev)                                              \
    do {                                                                      \
        cublasStatus_t bst_ = (call);                                         \
        if (bst_ != CUBLAS_STATUS_SUCCESS) { s = blas_err((ctx), bst_, #call, (dev)); goto done; } \
    } while (0)

/* Grows d's scratch to at least `bytes` (contents are not kept). */
static fq_status ensure_buffer(fq_ctx *ctx, fq_cuda_dev *d, fq_buffer *b, size_t bytes) {
    if (b->ptr && b->bytes >= bytes) return FQ_OK;
    /* The old buffer may still be read by queued work: wait for it first. */
    if (b->ptr) {
        cudaError_t e = cudaStreamSynchronize(d->stream);
        if (e != cudaSuccess) return fq_cuda_status(ctx, e, "cudaStreamSynchronize", d->index);
        fq_buf_free(b);
    }
    return fq_buf_alloc(ctx, FQ_CUDA(d->index), bytes, b);
}

/* D[m, n] (dtype dt, row-major) = x[m, k] . W[n, k]^T with W, x of dtype ct, in
 * cuBLASLt's column-major terms: D^T (n x m) = W^T... op(A) = A^T with A = W^T
 * stored as k x n (ld k), B = x^T stored as k x m (ld k), D stored n x m (ld n). */
static fq_status blas_gemm(fq_ctx *ctx, fq_cuda_dev *d, int ct, int dt, const void *wdq, const void *x,
                           void *out, int64_t m, int64_t n, int64_t k) {
    fq_status s = FQ_OK;
    struct cublasLtContext *h;
    FQ_TRY(fq_cuda_dev_blaslt(ctx, d, &h));
    FQ_TRY(ensure_buffer(ctx, d, &d->lin_workspace, LIN_WORKSPACE_BYTES));
    cublasLtMatmulDesc_t op = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, lc = NULL;
    cublasLtMatmulPreference_t pref = NULL;
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const float alpha = 1.0f, beta = 0.0f;
    BLAS_TRY(ctx, cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F), d->index);
    BLAS_TRY(ctx, cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), d->index);
    BLAS_TRY(ctx, cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), d->index);
    BLAS_TRY(ctx, cublasLtMatrixLayoutCreate(&la, blas_type(ct), (uint64_t)k, (uint64_t)n, k), d->index);
    BLAS_TRY(ctx, cublasLtMatrixLayoutCreate(&lb, blas_type(ct), (uint64_t)k, (uint64_t)m, k), d->index);
    BLAS_TRY(ctx, cublasLtMatrixLayoutCreate(&lc, blas_type(dt), (uint64_t)n, (uint64_t)m, n), d->index);

    const int types = 1 | ct << 8 | dt << 16;
    cublasLtMatmulAlgo_t algo;
    int found = 0;
    for (int i = 0; i < 8 && !found; i++) {
        const fq_cuda_lin_algo *c = &d->lin_algo[i];
        if (c->types == types && c->m == m && c->n == n && c->k == k) {
            memcpy(&algo, c->algo, sizeof algo);
            found = 1;
        }
    }
    if (!found) {
        const uint64_t wsz = LIN_WORKSPACE_BYTES;
        cublasLtMatmulHeuristicResult_t res;
        int nres = 0;
        BLAS_TRY(ctx, cublasLtMatmulPreferenceCreate(&pref), d->index);
        BLAS_TRY(ctx,
                 cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsz,
                                                      sizeof wsz),
                 d->index);
        BLAS_TRY(ctx, cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, lc, lc, pref, 1, &res, &nres), d->index);
        if (nres < 1) {
            s = fq_err(ctx, FQ_ERR_UNSUPPORTED, "cuda:%d: cuBLASLt has no algorithm for %s x %s -> %s (%lld x %lld x %lld)",
                       d->index, fq_dtype_name((fq_dtype)ct), fq_dtype_name((fq_dtype)ct),
                       fq_dtype_name((fq_dtype)dt), (long long)m, (long long)n, (long long)k);
            goto done;
        }
        algo = res.algo;
        fq_cuda_lin_algo *c = &d->lin_algo[d->lin_algo_next];
        d->lin_algo_next = (d->lin_algo_next + 1) % 8;
        c->m = m;
        c->n = n;
        c->k = k;
        c->types = types;
        memcpy(c->algo, &algo, sizeof algo);
    }
    BLAS_TRY(ctx,
             cublasLtMatmul(h, op, &alpha, wdq, la, x, lb, &beta, out, lc, out, lc, &algo, d->lin_workspace.ptr,
                            d->lin_workspace.bytes, d->stream),
             d->index);
done:
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (op) cublasLtMatmulDescDestroy(op);
    return s;
}

static fq_status run_dequant_blas(fq_ctx *ctx, fq_cuda_dev *d, const lin_op *op) {
    const int ct = op->io.x_dtype, yt = op->io.y_dtype;
    const int64_t m = op->io.m, n = op->w.n, k = op->w.k;
    /* cuBLASLt writes y itself for bf16->bf16, f16->f16, any->f32; else via f32. */
    const int direct = yt == ct || yt == FQ_F32;
    const size_t wbytes = ((size_t)(n * k) * dtype_bytes(ct) + 255) & ~(size_t)255;
    const size_t abytes = direct ? 0 : (size_t)(m * n) * 4;
    FQ_TRY(ensure_buffer(ctx, d, &d->lin_scratch, wbytes + abytes));
    void *wdq = d->lin_scratch.ptr;
    float *acc = direct ? NULL : (float *)((char *)d->lin_scratch.ptr + wbytes);
    int rc = 0;
    if (n * k == 0) {
        /* nothing to dequantize */
    } else if (op->w.nested)
        rc = fq_cuda_dequantize4_nested(op->w.packed, op->w.qabsmax, op->w.nested_absmax, op->w.nested_code,
                                        op->w.offset, n * k, op->w.blocksize, op->qtype, wdq, (fq_dtype)ct,
                                        d->stream);
    else
        rc = fq_cuda_dequantize4(op->w.packed, op->w.absmax, n * k, op->w.blocksize, op->qtype, wdq, (fq_dtype)ct,
                                 d->stream);
    if (rc) return fq_cuda_status(ctx, (cudaError_t)rc, "dequantize4 kernel", d->index);
    if (k == 0) {
        /* No products: y = epilogue(0). */
        cudaError_t e = cudaMemsetAsync(op->io.y, 0, (size_t)(m * n) * dtype_bytes(yt), d->stream);
        if (e != cudaSuccess) return fq_cuda_status(ctx, e, "cudaMemsetAsync", d->index);
    } else {
        FQ_TRY(blas_gemm(ctx, d, ct, direct ? yt : FQ_F32, wdq, op->io.x, direct ? op->io.y : (void *)acc, m, n, k));
    }
    rc = direct || k == 0 ? fq_cuda_lin4_epilogue_inplace(&op->io, n, &op->e, d->stream)
                          : fq_cuda_lin4_finish(acc, &op->io, n, &op->e, d->stream);
    if (rc) return fq_cuda_status(ctx, (cudaError_t)rc, "linear epilogue kernel", d->index);
    return FQ_OK;
}

/* ---- running -------------------------------------------------------------------------- */

static fq_status prepare(fq_ctx *ctx, fq_cuda_dev *d, unsigned bit) {
    if (d->lin_prepared & bit) return FQ_OK;
    int rc = bit == LIN_PREP_GEMM_MMA    ? fq_cuda_gemm4_mma_prepare(d->smem_optin)
             : bit == LIN_PREP_GEMV_STREAM ? fq_cuda_gemv4_stream_prepare()
             : bit == LIN_PREP_GEMV_BULK   ? fq_cuda_gemv4_bulk_prepare()
             : bit == LIN_PREP_GEMM_WS     ? fq_cuda_gemm4_ws_prepare()
             : bit == LIN_PREP_GEMV_FLAT   ? fq_cuda_gemv4_flat_prepare()
             : bit == LIN_PREP_GEMV_WIN    ? fq_cuda_gemv4_win_prepare()
                                           : fq_cuda_gemm4_wgmma_prepare();
    if (rc) return fq_cuda_status(ctx, (cudaError_t)rc, "cudaFuncSetAttribute (linear kernels)", d->index);
    d->lin_prepared |= bit;
    return FQ_OK;
}

/* Runs impl under d's guard (entered by the caller). */
static fq_status run_impl(fq_ctx *ctx, fq_cuda_dev *d, fq_lin4_impl impl, int cfg, const lin_op *op) {
    int rc = 0;
    switch (impl) {
    case FQ_LIN4_GEMV_SIMPLE: rc = fq_cuda_gemv4_simple(&op->w, &op->io, &op->e, d->stream); break;
    case FQ_LIN4_GEMV_TC: rc = fq_cuda_gemv4_tc(&op->w, &op->io, &op->e, d->sm_count, cfg, d->stream); break;
    case FQ_LIN4_GEMV_STREAM:
        FQ_TRY(prepare(ctx, d, LIN_PREP_GEMV_STREAM));
        rc = fq_cuda_gemv4_stream(&op->w, &op->io, &op->e, d->sm_count, cfg | (d->cc_major < 9 ? 0x80 : 0),
                                  d->stream);
        break;
    case FQ_LIN4_GEMV_BULK:
        FQ_TRY(prepare(ctx, d, LIN_PREP_GEMV_BULK));
        rc = fq_cuda_gemv4_bulk(&op->w, &op->io, &op->e, d->sm_count, cfg, d->stream);
        break;
    case FQ_LIN4_GEMV_FLAT:
        FQ_TRY(prepare(ctx, d, LIN_PREP_GEMV_FLAT));
        rc = fq_cuda_gemv4_flat(&op->w, &op->io, &op->e, d->sm_count, cfg | (d->cc_major < 9 ? 0x80 : 0),
                                d->stream);
        break;
    case FQ_LIN4_GEMV_WIN:
        FQ_TRY(prepare(ctx, d, LIN_PREP_GEMV_WIN));
        rc = fq_cuda_gemv4_win(&op->w, &op->io, &op->e, d->sm_count, cfg | (d->cc_major < 9 ? 0x80 : 0), d->stream);
        break;
    case FQ_LIN4_GEMM_MMA:
        FQ_TRY(prepare(ctx, d, LIN_PREP_GEMM_MMA));
        rc = fq_cuda_gemm4_mma(&op->w, &op->io, &op->e, d->sm_count, d->smem_optin, cfg, d->stream);
        break;
    case FQ_LIN4_GEMM_WGMMA: {
        FQ_TRY(prepare(ctx, d, LIN_PREP_GEMM_WGMMA));
        const size_t ws = fq_cuda_gemm4_wgmma_workspace(&op->w, &op->io, d->sm_count, cfg);
        if (ws) FQ_TRY(ensure_buffer(ctx, d, &d->lin_scratch, ws));
        rc = fq_cuda_gemm4_wgmma(&op->w, &op->io, &op->e, d->sm_count, cfg, (float *)d->lin_scratch.ptr,
                                 d->lin_scratch.bytes, d->stream);
        break;
    }
    case FQ_LIN4_GEMM_WS: {
        FQ_TRY(prepare(ctx, d, LIN_PREP_GEMM_WS));
        const size_t ws = fq_cuda_gemm4_ws_workspace(&op->w, &op->io, d->sm_count, cfg);
        if (ws) FQ_TRY(ensure_buffer(ctx, d, &d->lin_scratch, ws));
        if (!d->lin_flags.ptr && fq_cuda_gemm4_ws_streamk(&op->w, &op->io, d->sm_count, cfg)) {
            /* zeroed once; every launch leaves the flags zero again */
            const size_t fb = 2 * FQ_GEMM4_WS_MAX_SMS * sizeof(int);
            FQ_TRY(fq_buf_alloc(ctx, FQ_CUDA(d->index), fb, &d->lin_flags));
            const cudaError_t e = cudaMemsetAsync(d->lin_flags.ptr, 0, fb, d->stream);
            if (e != cudaSuccess) {
                fq_buf_free(&d->lin_flags);
                return fq_cuda_status(ctx, e, "cudaMemsetAsync (gemm4_ws flags)", d->index);
            }
        }
        rc = fq_cuda_gemm4_ws(&op->w, &op->io, &op->e, d->sm_count, cfg, (float *)d->lin_scratch.ptr,
                              d->lin_scratch.bytes, (int *)d->lin_flags.ptr, d->stream);
        break;
    }
    case FQ_LIN4_DEQUANT_BLAS: return run_dequant_blas(ctx, d, op);
    default: return fq_err(ctx, FQ_ERR_INVALID_ARG, "linear_4bit: no kernel");
    }
    if (rc) return fq_cuda_status(ctx, (cudaError_t)rc, fq_lin4_impl_name(impl), d->index);
    return FQ_OK;
}

static fq_status linear4_sel(fq_ctx *ctx, int sel, const fq_tensor *x, const fq_qtensor *w, const fq_tensor *bias,
                             fq_tensor *y, int64_t m);

fq_status fq_linear4_cuda(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *w, const fq_tensor *bias,
                          fq_tensor *y, int64_t m) {
    return linear4_sel(ctx, ctx->linear_kernel, x, w, bias, y, m);
}

fq_status fq_linear4_cuda_exact(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *w, const fq_tensor *bias,
                                fq_tensor *y, int64_t m) {
    return linear4_sel(ctx, FQ_LIN4_AUTO_EXACT, x, w, bias, y, m);
}

static fq_status linear4_sel(fq_ctx *ctx, int sel, const fq_tensor *x, const fq_qtensor *w, const fq_tensor *bias,
                             fq_tensor *y, int64_t m) {
    lin_op op;
    FQ_TRY(make_op(ctx, x, w, bias, y, m, &op));
    if (m == 0 || op.w.n == 0) return FQ_OK;
    fq_cuda_dev *d;
    FQ_TRY(fq_cuda_dev_get(ctx, op.device, &d));
    int cfg = 0;
    fq_lin4_impl impl = choose(ctx, d, sel, &op, &cfg);
    if (impl == FQ_LIN4_NONE) return FQ_ERR_UNSUPPORTED;
    fq_log(ctx, FQ_LOG_DEBUG, "linear_4bit '%s' on cuda:%d: M=%lld N=%lld K=%lld %s -> %s (cfg %d)",
           fq_qtensor_name(w), op.device, (long long)m, (long long)op.w.n, (long long)op.w.k,
           fq_dtype_name((fq_dtype)op.io.x_dtype), fq_lin4_impl_name(impl), cfg);
    fq_cuda_guard g;
    FQ_TRY(fq_cuda_guard_enter(ctx, op.device, &g));
    fq_status s = run_impl(ctx, d, impl, cfg, &op);
    fq_cuda_guard_exit(&g);
    if (s != FQ_OK) return fq_err_prefix(ctx, s, "linear_4bit '%s'", fq_qtensor_name(w));
    return FQ_OK;
}

static int64_t rows_of(const fq_tensor *x) {
    const int64_t k = x->ndim ? x->shape[x->ndim - 1] : 0;
    return k ? x->numel / k : 0;
}

fq_lin4_impl fq_linear4_cuda_choice_cfg(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *w, const fq_tensor *y,
                                        int *cfg) {
    lin_op op;
    fq_cuda_dev *d;
    *cfg = 0;
    if (make_op(ctx, x, w, NULL, (fq_tensor *)y, rows_of(x), &op) != FQ_OK) return FQ_LIN4_NONE;
    if (fq_cuda_dev_get(ctx, op.device, &d) != FQ_OK) return FQ_LIN4_NONE;
    return choose(ctx, d, ctx->linear_kernel, &op, cfg);
}

fq_lin4_impl fq_linear4_cuda_choice(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *w, const fq_tensor *y) {
    int cfg;
    return fq_linear4_cuda_choice_cfg(ctx, x, w, y, &cfg);
}

int fq_linear4_cuda_can_run(fq_ctx *ctx, fq_lin4_impl k, const fq_tensor *x, const fq_qtensor *w,
                            const fq_tensor *y) {
    lin_op op;
    fq_cuda_dev *d;
    if (make_op(ctx, x, w, NULL, (fq_tensor *)y, rows_of(x), &op) != FQ_OK) return 0;
    if (fq_cuda_dev_get(ctx, op.device, &d) != FQ_OK) return 0;
    return can_run(d, k, &op);
}
#else
typedef int fq_linear_cuda_unused; /* ISO C forbids an empty translation unit */
#endif

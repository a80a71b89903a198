/* Would FLUX gain from running its same-input projections (q, k, v: three GEMMs
 * that read the same activations) as one cuBLASLt call?
 *
 * For each (M, N, K, G) it times, dense bf16 on the GPU, in the same run:
 *   separate  G calls of [M, K] x [N, K]^T, each with its own weight and output
 *             (what the forward does now);
 *   batched   one strided-batched call of batch G: weights G * N * K apart, the
 *             activations shared (batch stride 0), outputs M * N apart;
 *   wide      one call of [M, K] x [G N, K]^T into [M, G N] (the weights stacked).
 * Each variant is a CUDA graph of --iters rounds (G GEMMs a round); the replays of
 * the three variants are interleaved round-robin, --reps times, and the median is
 * reported, so that all see the same clock and power state (the H100 sits at its
 * power limit during a FLUX step; short isolated runs would not). Also reported:
 * TFLOP/s and the ratio to `separate`. All three compute the same numbers; the
 * check compares batched and wide against separate on the first round's output.
 *
 * --gated instead times, per shape (G unused), the plain GEMM with the bias epilogue
 * against the same GEMM with a FLUX block's gated residual add in its epilogue
 * (bench_gated below): is that fusion available in cuBLASLt, and what does it cost?
 *
 * Usage: bench_gemm_group [--device cuda:N] [--iters N] [--reps N]
 *                         [--shapes MxNxKxG,...] [--gated]
 *                         (default shapes: FLUX's q/k/v at 1024x1024)
 * (also: fluxq bench gemm-group ...) */
#include "core/core.h"
#ifdef FQ_HAVE_CUDA
#include "core/cuda_device.h"

#include <cublasLt.h>
#include <cuda_runtime_api.h>
#endif

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int fq_bench_gemm_group(int argc, char **argv);

typedef struct {
    int64_t m, n, k, g;
} gg_shape;

#ifdef FQ_HAVE_CUDA
enum { GG_SEPARATE = 0, GG_BATCHED, GG_WIDE, GG_VARIANTS };
static const char *const k_variant_names[GG_VARIANTS] = {"separate", "batched", "wide"};

/* One cuBLASLt call y = x w^T with bf16 in and out, f32 accumulation; batch > 1:
 * strided batch with w and y strides as given and x shared (stride 0). */
typedef struct {
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;
    int ok;
} gg_call;

static void gg_call_free(gg_call *c) {
    if (c->lc) cublasLtMatrixLayoutDestroy(c->lc);
    if (c->lb) cublasLtMatrixLayoutDestroy(c->lb);
    if (c->la) cublasLtMatrixLayoutDestroy(c->la);
    if (c->op) cublasLtMatmulDescDestroy(c->op);
    memset(c, 0, sizeof *c);
}

static cublasStatus_t set_batch(cublasLtMatrixLayout_t l, int32_t count, int64_t stride) {
    cublasStatus_t st = cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count);
    if (!st)
        st = cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride);
    return st;
}

/* Sets c up for y[m, n] = x[m, k] w[n, k]^T, `batch` of them (w stride n*k, y stride m*n). */
static cublasStatus_t gg_call_init(cublasLtHandle_t h, gg_call *c, int64_t m, int64_t n, int64_t k, int batch,
                                   size_t ws) {
    memset(c, 0, sizeof *c);
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const uint64_t wsz = ws;
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulHeuristicResult_t res;
    int nres = 0;
    cublasStatus_t st = cublasLtMatmulDescCreate(&c->op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    if (!st) st = cublasLtMatmulDescSetAttribute(c->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
    if (!st) st = cublasLtMatmulDescSetAttribute(c->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
    if (!st) st = cublasLtMatrixLayoutCreate(&c->la, CUDA_R_16BF, (uint64_t)k, (uint64_t)n, k);
    if (!st) st = cublasLtMatrixLayoutCreate(&c->lb, CUDA_R_16BF, (uint64_t)k, (uint64_t)m, k);
    if (!st) st = cublasLtMatrixLayoutCreate(&c->lc, CUDA_R_16BF, (uint64_t)n, (uint64_t)m, n);
    if (!st && batch > 1) st = set_batch(c->la, batch, n * k);
    if (!st && batch > 1) st = set_batch(c->lb, batch, 0);
    if (!st && batch > 1) st = set_batch(c->lc, batch, m * n);
    if (!st) st = cublasLtMatmulPreferenceCreate(&pref);
    if (!st)
        st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsz, sizeof wsz);
    if (!st) st = cublasLtMatmulAlgoGetHeuristic(h, c->op, c->la, c->lb, c->lc, c->lc, pref, 1, &res, &nres);
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (!st && nres < 1) st = CUBLAS_STATUS_NOT_SUPPORTED;
    if (!st) {
        c->algo = res.algo;
        c->ok = 1;
    }
    return st;
}

static cublasStatus_t gg_run(cublasLtHandle_t h, const gg_call *c, const void *w, const void *x, void *y, void *ws,
                             size_t wsb, cudaStream_t s) {
    const float one = 1.0f, zero = 0.0f;
    return cublasLtMatmul(h, c->op, &one, w, c->la, x, c->lb, &zero, y, c->lc, y, c->lc, &c->algo, ws, wsb, s);
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Random bf16 in [-1, 1) from a fixed seed. */
static void fill_bf16(uint16_t *p, size_t n, uint64_t *st) {
    for (size_t i = 0; i < n; i++) {
        *st = *st * 6364136223846793005ull + 1442695040888963407ull;
        const float f = (float)((*st >> 40) & 0xffffff) / 8388608.0f - 1.0f;
        uint32_t u;
        memcpy(&u, &f, 4);
        p[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}

#define GG_CUDA(e, what)                                                                     \
    do {                                                                                     \
        cudaError_t e_ = (e);                                                                \
        if (e_ != cudaSuccess) {                                                             \
            fprintf(stderr, "bench_gemm_group: %s: %s\n", what, cudaGetErrorString(e_));     \
            goto fail;                                                                       \
        }                                                                                    \
    } while (0)

static int bench_shape(fq_ctx *ctx, fq_cuda_dev *d, const gg_shape *sh, int iters, int reps) {
    const int64_t m = sh->m, n = sh->n, k = sh->k, g = sh->g;
    const size_t wsb = (size_t)32 << 20;
    cublasLtHandle_t h = NULL;
    gg_call calls[GG_VARIANTS] = {{0}};
    cudaGraphExec_t exec[GG_VARIANTS] = {0};
    cudaEvent_t e0 = NULL, e1 = NULL;
    void *w = NULL, *x = NULL, *y[GG_VARIANTS] = {0}, *ws = NULL;
    uint16_t *hbuf = NULL, *hy[GG_VARIANTS] = {0};
    double *t[GG_VARIANTS] = {0};
    int rc = 1;
    const size_t wn = (size_t)(g * n * k), xn = (size_t)(m * k), yn = (size_t)(g * m * n);
    cudaStream_t s = d->stream;
    struct cublasLtContext *hc;
    if (fq_cuda_dev_blaslt(ctx, d, &hc) != FQ_OK) {
        fprintf(stderr, "bench_gemm_group: %s\n", fq_ctx_error(ctx));
        return 1;
    }
    h = (cublasLtHandle_t)hc;
    GG_CUDA(cudaMalloc(&w, wn * 2), "cudaMalloc");
    GG_CUDA(cudaMalloc(&x, xn * 2), "cudaMalloc");
    GG_CUDA(cudaMalloc(&ws, wsb), "cudaMalloc");
    for (int v = 0; v < GG_VARIANTS; v++) GG_CUDA(cudaMalloc(&y[v], yn * 2), "cudaMalloc");
    hbuf = malloc((wn > xn ? wn : xn) * 2);
    for (int v = 0; v < GG_VARIANTS; v++) {
        hy[v] = malloc(yn * 2);
        t[v] = malloc(sizeof(double) * (size_t)reps);
    }
    if (!hbuf || !hy[0] || !hy[1] || !hy[2] || !t[0] || !t[1] || !t[2]) {
        fprintf(stderr, "bench_gemm_group: out of host memory\n");
        goto fail;
    }
    uint64_t seed = 0x5eed1234abcdull;
    fill_bf16(hbuf, wn, &seed);
    GG_CUDA(cudaMemcpy(w, hbuf, wn * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
    fill_bf16(hbuf, xn, &seed);
    GG_CUDA(cudaMemcpy(x, hbuf, xn * 2, cudaMemcpyHostToDevice), "cudaMemcpy");

    /* the wide call writes [m, g n]; separate and batched write g blocks of [m, n] */
    cublasStatus_t st = gg_call_init(h, &calls[GG_SEPARATE], m, n, k, 1, wsb);
    if (!st) st = gg_call_init(h, &calls[GG_WIDE], m, g * n, k, 1, wsb);
    if (st) {
        fprintf(stderr, "bench_gemm_group: cuBLASLt setup: %s\n", cublasLtGetStatusString(st));
        goto fail;
    }
    if (gg_call_init(h, &calls[GG_BATCHED], m, n, k, (int)g, wsb))
        printf("  (cuBLASLt has no strided-batched algorithm with shared activations here)\n");

    for (int v = 0; v < GG_VARIANTS; v++) {
        if (!calls[v].ok) continue;
        cudaGraph_t graph = NULL;
        GG_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "capture");
        st = CUBLAS_STATUS_SUCCESS;
        for (int i = 0; i < iters && !st; i++) {
            if (v == GG_SEPARATE)
                for (int j = 0; j < g && !st; j++)
                    st = gg_run(h, &calls[v], (uint16_t *)w + j * n * k, x, (uint16_t *)y[v] + j * m * n, ws, wsb, s);
            else
                st = gg_run(h, &calls[v], w, x, y[v], ws, wsb, s);
        }
        cudaError_t ce = cudaStreamEndCapture(s, &graph);
        if (st || ce != cudaSuccess) {
            fprintf(stderr, "bench_gemm_group: %s: capture failed (%s)\n", k_variant_names[v],
                    st ? cublasLtGetStatusString(st) : cudaGetErrorString(ce));
            if (graph) cudaGraphDestroy(graph);
            goto fail;
        }
        ce = cudaGraphInstantiate(&exec[v], graph, 0);
        cudaGraphDestroy(graph);
        GG_CUDA(ce, "cudaGraphInstantiate");
        GG_CUDA(cudaGraphLaunch(exec[v], s), "cudaGraphLaunch"); /* warm-up */
    }
    GG_CUDA(cudaEventCreate(&e0), "cudaEventCreate");
    GG_CUDA(cudaEventCreate(&e1), "cudaEventCreate");
    for (int r = 0; r < reps; r++)
        for (int v = 0; v < GG_VARIANTS; v++) {
            if (!exec[v]) continue;
            float ms = 0;
            GG_CUDA(cudaEventRecord(e0, s), "cudaEventRecord");
            GG_CUDA(cudaGraphLaunch(exec[v], s), "cudaGraphLaunch");
            GG_CUDA(cudaEventRecord(e1, s), "cudaEventRecord");
            GG_CUDA(cudaEventSynchronize(e1), "cudaEventSynchronize");
            GG_CUDA(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
            t[v][r] = (double)ms * 1e3 / iters; /* us per round of g GEMMs */
        }

    /* same numbers? the wide output is [m, g n]: block j of row i is batched's [j][i] */
    for (int v = 0; v < GG_VARIANTS; v++)
        if (exec[v]) GG_CUDA(cudaMemcpy(hy[v], y[v], yn * 2, cudaMemcpyDeviceToHost), "cudaMemcpy");
    int64_t diff_b = 0, diff_w = 0;
    for (int64_t j = 0; j < g; j++)
        for (int64_t i = 0; i < m; i++)
            for (int64_t c = 0; c < n; c++) {
                const uint16_t ref = hy[GG_SEPARATE][(j * m + i) * n + c];
                if (exec[GG_BATCHED] && hy[GG_BATCHED][(j * m + i) * n + c] != ref) diff_b++;
                if (hy[GG_WIDE][i * g * n + j * n + c] != ref) diff_w++;
            }

    const double flop = 2.0 * (double)(m * n * k * g);
    double base = NAN;
    printf("M=%lld N=%lld K=%lld, %lld GEMMs of the same x (%d rounds per replay, median of %d interleaved replays):\n",
           (long long)m, (long long)n, (long long)k, (long long)g, iters, reps);
    for (int v = 0; v < GG_VARIANTS; v++) {
        if (!exec[v]) continue;
        qsort(t[v], (size_t)reps, sizeof(double), cmp_double);
        const double us = t[v][reps / 2];
        if (v == GG_SEPARATE) base = us;
        printf("  %-9s %9.2f us per round  %6.1f TFLOP/s  %.3fx separate", k_variant_names[v], us, flop / us * 1e-6,
               base / us);
        if (v == GG_BATCHED) printf("  (%lld of %lld outputs differ from separate)", (long long)diff_b, (long long)yn);
        if (v == GG_WIDE) printf("  (%lld of %lld outputs differ from separate)", (long long)diff_w, (long long)yn);
        printf("\n");
    }
    rc = 0;
fail:
    for (int v = 0; v < GG_VARIANTS; v++) {
        if (exec[v]) cudaGraphExecDestroy(exec[v]);
        gg_call_free(&calls[v]);
        cudaFree(y[v]);
        free(hy[v]);
        free(t[v]);
    }
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    cudaFree(w);
    cudaFree(x);
    cudaFree(ws);
    free(hbuf);
    return rc;
}

#endif

#ifdef FQ_HAVE_CUDA
/* --gated: can the residual add of a FLUX block, h += gate * (x W^T + b), go into the
 * GEMM's epilogue? cuBLASLt with a per-output alpha vector (the gate, f32, device),
 * beta = 1 and C = D = h in place, the bias epilogue carrying gate * b: timed against
 * the plain GEMM with the bias epilogue into a separate y, interleaved; prints whether
 * cuBLASLt offers such an algorithm at all. */
static int bench_gated(fq_ctx *ctx, fq_cuda_dev *d, const gg_shape *sh, int iters, int reps) {
    const int64_t m = sh->m, n = sh->n, k = sh->k;
    const size_t wsb = (size_t)32 << 20;
    struct cublasLtContext *hc;
    if (fq_cuda_dev_blaslt(ctx, d, &hc) != FQ_OK) return 1;
    cublasLtHandle_t h = (cublasLtHandle_t)hc;
    void *w = NULL, *x = NULL, *y = NULL, *hres = NULL, *bias = NULL, *ws = NULL;
    float *gate = NULL;
    uint16_t *hb = NULL;
    cudaGraphExec_t ex[2] = {NULL, NULL};
    cudaEvent_t e0 = NULL, e1 = NULL;
    double *t[2] = {NULL, NULL};
    cublasLtMatmulDesc_t op[2] = {NULL, NULL};
    cublasLtMatrixLayout_t la = NULL, lb = NULL, lc = NULL;
    cublasLtMatmulAlgo_t algo[2];
    int ok[2] = {0, 0}, rc = 1;
    cudaStream_t s = d->stream;
    const size_t big = (size_t)(m > n ? m : n) * (size_t)k;
    GG_CUDA(cudaMalloc(&w, (size_t)(n * k) * 2), "cudaMalloc");
    GG_CUDA(cudaMalloc(&x, (size_t)(m * k) * 2), "cudaMalloc");
    GG_CUDA(cudaMalloc(&y, (size_t)(m * n) * 2), "cudaMalloc");
    GG_CUDA(cudaMalloc(&hres, (size_t)(m * n) * 2), "cudaMalloc");
    GG_CUDA(cudaMalloc(&bias, (size_t)n * 2), "cudaMalloc");
    GG_CUDA(cudaMalloc((void **)&gate, (size_t)n * 4), "cudaMalloc");
    GG_CUDA(cudaMalloc(&ws, wsb), "cudaMalloc");
    hb = malloc(big * 2 > (size_t)n * 4 ? big * 2 : (size_t)n * 4);
    t[0] = malloc(sizeof(double) * (size_t)reps);
    t[1] = malloc(sizeof(double) * (size_t)reps);
    if (!hb || !t[0] || !t[1]) goto fail;
    uint64_t seed = 0x9a7ed5eedull;
    fill_bf16(hb, (size_t)(n * k), &seed);
    GG_CUDA(cudaMemcpy(w, hb, (size_t)(n * k) * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
    fill_bf16(hb, (size_t)(m * k), &seed);
    GG_CUDA(cudaMemcpy(x, hb, (size_t)(m * k) * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
    fill_bf16(hb, (size_t)(m * n), &seed);
    GG_CUDA(cudaMemcpy(hres, hb, (size_t)(m * n) * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
    fill_bf16(hb, (size_t)n, &seed);
    GG_CUDA(cudaMemcpy(bias, hb, (size_t)n * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
    for (int64_t i = 0; i < n; i++) ((float *)hb)[i] = 0.5f + (float)(i % 7) * 0.125f;
    GG_CUDA(cudaMemcpy(gate, hb, (size_t)n * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    const cudaDataType_t bt = CUDA_R_16BF;
    const cublasLtPointerMode_t pm = CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST;
    cublasStatus_t st = cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, (uint64_t)k, (uint64_t)n, k);
    if (!st) st = cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, (uint64_t)k, (uint64_t)m, k);
    if (!st) st = cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, (uint64_t)n, (uint64_t)m, n);
    for (int v = 0; v < 2 && !st; v++) {
        st = cublasLtMatmulDescCreate(&op[v], CUBLAS_COMPUTE_32F, CUDA_R_32F);
        if (!st) st = cublasLtMatmulDescSetAttribute(op[v], CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
        if (!st) st = cublasLtMatmulDescSetAttribute(op[v], CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
        if (!st) st = cublasLtMatmulDescSetAttribute(op[v], CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi);
        if (!st) st = cublasLtMatmulDescSetAttribute(op[v], CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof bt);
        if (!st) st = cublasLtMatmulDescSetAttribute(op[v], CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
        if (!st && v == 1) st = cublasLtMatmulDescSetAttribute(op[v], CUBLASLT_MATMUL_DESC_POINTER_MODE, &pm, sizeof pm);
        if (st) break;
        cublasLtMatmulPreference_t pref = NULL;
        const uint64_t wsz = wsb;
        cublasLtMatmulHeuristicResult_t res;
        int nres = 0;
        cublasStatus_t hs = cublasLtMatmulPreferenceCreate(&pref);
        if (!hs) hs = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsz, sizeof wsz);
        if (!hs) hs = cublasLtMatmulAlgoGetHeuristic(h, op[v], la, lb, lc, lc, pref, 1, &res, &nres);
        if (pref) cublasLtMatmulPreferenceDestroy(pref);
        ok[v] = !hs && nres > 0;
        if (ok[v]) algo[v] = res.algo;
        printf("  %s: %s\n", v ? "gated (alpha vector = gate, beta 1, C = D = h, bias epilogue)" : "plain (bias epilogue)",
               ok[v] ? "cuBLASLt offers an algorithm" : hs ? cublasLtGetStatusString(hs) : "no algorithm");
    }
    if (st) {
        fprintf(stderr, "bench_gemm_group: cuBLASLt setup: %s\n", cublasLtGetStatusString(st));
        goto fail;
    }
    const float one = 1.0f, zero = 0.0f;
    for (int v = 0; v < 2; v++) {
        if (!ok[v]) continue;
        cudaGraph_t graph = NULL;
        GG_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "capture");
        for (int i = 0; i < iters && !st; i++)
            st = v ? cublasLtMatmul(h, op[v], gate, w, la, x, lb, &one, hres, lc, hres, lc, &algo[v], ws, wsb, s)
                   : cublasLtMatmul(h, op[v], &one, w, la, x, lb, &zero, y, lc, y, lc, &algo[v], ws, wsb, s);
        cudaError_t ce = cudaStreamEndCapture(s, &graph);
        if (st || ce != cudaSuccess) {
            fprintf(stderr, "bench_gemm_group: gated capture: %s\n",
                    st ? cublasLtGetStatusString(st) : cudaGetErrorString(ce));
            if (graph) cudaGraphDestroy(graph);
            ok[v] = 0;
            st = CUBLAS_STATUS_SUCCESS;
            continue;
        }
        ce = cudaGraphInstantiate(&ex[v], graph, 0);
        cudaGraphDestroy(graph);
        GG_CUDA(ce, "cudaGraphInstantiate");
        GG_CUDA(cudaGraphLaunch(ex[v], s), "cudaGraphLaunch");
    }
    GG_CUDA(cudaEventCreate(&e0), "cudaEventCreate");
    GG_CUDA(cudaEventCreate(&e1), "cudaEventCreate");
    for (int r = 0; r < reps; r++)
        for (int v = 0; v < 2; v++) {
            if (!ex[v]) continue;
            float ms = 0;
            GG_CUDA(cudaEventRecord(e0, s), "cudaEventRecord");
            GG_CUDA(cudaGraphLaunch(ex[v], s), "cudaGraphLaunch");
            GG_CUDA(cudaEventRecord(e1, s), "cudaEventRecord");
            GG_CUDA(cudaEventSynchronize(e1), "cudaEventSynchronize");
            GG_CUDA(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
            t[v][r] = (double)ms * 1e3 / iters;
        }
    printf("M=%lld N=%lld K=%lld (%d GEMMs per replay, median of %d interleaved replays):\n", (long long)m,
           (long long)n, (long long)k, iters, reps);
    for (int v = 0; v < 2; v++) {
        if (!ex[v]) continue;
        qsort(t[v], (size_t)reps, sizeof(double), cmp_double);
        printf("  %-6s %9.2f us\n", v ? "gated" : "plain", t[v][reps / 2]);
    }
    rc = 0;
fail:
    for (int v = 0; v < 2; v++) {
        if (ex[v]) cudaGraphExecDestroy(ex[v]);
        if (op[v]) cublasLtMatmulDescDestroy(op[v]);
        free(t[v]);
    }
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    cudaFree(w);
    cudaFree(x);
    cudaFree(y);
    cudaFree(hres);
    cudaFree(bias);
    cudaFree(gate);
    cudaFree(ws);
    free(hb);
    return rc;
}
#endif

static int parse_shapes(const char *s, gg_shape *out, int max) {
    int n = 0;
    while (*s && n < max) {
        long long a, b, c, d;
        int used = 0;
        if (sscanf(s, "%lldx%lldx%lldx%lld%n", &a, &b, &c, &d, &used) != 4 || a < 1 || b < 1 || c < 1 || d < 1)
            return -1;
        out[n++] = (gg_shape){a, b, c, d};
        s += used;
        if (*s == ',') s++;
        else if (*s) return -1;
    }
    return n;
}
int fq_bench_gemm_group(int argc, char **argv) {
    const char *device = "cuda:0";
    int iters = 50, reps = 9, gated = 0;
    /* FLUX.1 at 1024x1024: single blocks (4608 rows), double blocks' image (4096) and text (512) streams */
    gg_shape shapes[16] = {{4608, 3072, 3072, 3}, {4096, 3072, 3072, 3}, {512, 3072, 3072, 3}};
    int nshapes = 3;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--device") && i + 1 < argc) device = argv[++i];
        else if (!strcmp(a, "--iters") && i + 1 < argc) iters = atoi(argv[++i]);
        else if (!strcmp(a, "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(a, "--gated")) gated = 1;
        else if (!strcmp(a, "--shapes") && i + 1 < argc) {
            nshapes = parse_shapes(argv[++i], shapes, 16);
            if (nshapes < 1) {
                fprintf(stderr, "bench_gemm_group: --shapes wants MxNxKxG[,...]\n");
                return 2;
            }
        } else {
            const int help = !strcmp(a, "--help") || !strcmp(a, "-h");
            fprintf(help ? stdout : stderr,
                    "usage: bench_gemm_group [--device cuda:N] [--iters N] [--reps N] [--shapes MxNxKxG,...] [--gated]\n");
            return help ? 0 : 2;
        }
    }
    if (iters < 1 || reps < 1) {
        fprintf(stderr, "bench_gemm_group: --iters and --reps must be >= 1\n");
        return 2;
    }
#ifdef FQ_HAVE_CUDA
    fq_ctx *ctx = NULL;
    if (fq_ctx_create(&ctx) != FQ_OK) {
        fprintf(stderr, "bench_gemm_group: no context\n");
        return 1;
    }
    fq_device dev;
    int rc = 1;
    fq_cuda_dev *d = NULL;
    fq_cuda_guard gd;
    if (fq_device_parse(ctx, device, &dev) != FQ_OK || dev.type != FQ_DEVICE_CUDA ||
        fq_cuda_dev_get(ctx, dev.index, &d) != FQ_OK) {
        fprintf(stderr, "bench_gemm_group: %s\n", fq_ctx_error(ctx));
        fq_ctx_free(ctx);
        return 1;
    }
    if (fq_cuda_guard_enter(ctx, dev.index, &gd) == FQ_OK) {
        struct cudaDeviceProp prop;
        if (cudaGetDeviceProperties(&prop, dev.index) != cudaSuccess) prop.name[0] = 0;
        printf("fluxq bench gemm-group: dense bf16 cuBLASLt on %s (%s, %d SMs)\n", device, prop.name, d->sm_count);
        rc = 0;
        for (int i = 0; i < nshapes; i++)
            rc |= gated ? bench_gated(ctx, d, &shapes[i], iters, reps) : bench_shape(ctx, d, &shapes[i], iters, reps);
        fq_cuda_guard_exit(&gd);
    } else {
        fprintf(stderr, "bench_gemm_group: %s\n", fq_ctx_error(ctx));
    }
    fq_ctx_free(ctx);
    return rc;
#else
    (void)device;
    (void)shapes;
    (void)nshapes;
    (void)gated;
    fprintf(stderr, "bench_gemm_group: built without CUDA\n");
    return 1;
#endif
}

#ifdef FQ_BENCH_MAIN
int main(int argc, char **argv) { return fq_bench_gemm_group(argc, argv); }
#endif

/* The CUDA side of the core: device guard, per-device state, device memory.
 * Only cuda_device.c touches the CUDA current device or allocates device memory. */
#ifndef FQ_CUDA_DEVICE_H
#define FQ_CUDA_DEVICE_H

#include "core/core.h"

#ifdef FQ_HAVE_CUDA
#include <cuda_runtime_api.h>

/* Scoped guard: makes `device` current for the calls that follow and, on exit,
 * restores the caller's device only if that device already had a live primary
 * context (restoring blindly would create a context, ~500 MB, on cuda:0). */
typedef struct {
    int prev;
    int target;
    bool restore;
} fq_cuda_guard;

fq_status fq_cuda_guard_enter(fq_ctx *ctx, int device, fq_cuda_guard *g);
void fq_cuda_guard_exit(fq_cuda_guard *g);

struct cublasLtContext; /* cublasLtHandle_t, without pulling cublasLt.h in here */

/* One cached cuBLASLt algorithm choice (the 4-bit linear fallback). */
typedef struct {
    int64_t m, n, k;
    int types; /* packed operand dtypes; 0 = empty slot */
    uint64_t algo[8]; /* cublasLtMatmulAlgo_t */
} fq_cuda_lin_algo;

/* One cached cuBLASLt algorithm choice of the transformer ops' dense GEMMs. */
typedef struct {
    int64_t m, n, k;
    uint32_t key;     /* operand dtypes, epilogue and pointer alignments; 0 = empty slot */
    uint64_t algo[8]; /* cublasLtMatmulAlgo_t */
} fq_cuda_nn_algo;

struct fq_nn_prof; /* op timing of src/ops/nn_ops_cuda.c */

/* Per-device state, created on first use (under the guard). */
typedef struct fq_cuda_dev {
    int index;
    cudaStream_t stream; /* non-blocking stream all our work on this device runs on */
    int sm_count;
    int cc_major, cc_minor;
    size_t smem_optin;
    /* 4-bit linear layers (src/ops/linear_cuda.c): created on first use on this
     * device, released by fq_cuda_dev_release_all. */
    struct cublasLtContext *blaslt; /* see fq_cuda_dev_blaslt                        */
    fq_buffer lin_workspace;        /* cuBLASLt workspace                            */
    fq_buffer lin_scratch;          /* dequantized weight and f32 results (fallback) */
    fq_buffer lin_flags;            /* gemm4_ws stream-K flags: zeroed once, kept zero */
    unsigned lin_prepared;          /* bit i: kernel family i has its attributes set */
    fq_cuda_lin_algo lin_algo[8];   /* cuBLASLt heuristic results, round robin       */
    int lin_algo_next;
    /* Transformer ops (src/ops/nn_ops_cuda.c): set up by fq_nn_prepare (a plan
     * calls it), so that a forward creates nothing. Nothing here is owned. */
    unsigned nn_prepared;           /* bit i: kernel family i has its attributes set */
    fq_cuda_nn_algo nn_algo[32];    /* cuBLASLt choices for the dense GEMMs, round robin */
    int nn_algo_next;
    struct fq_nn_prof *nn_prof;     /* op timing (benchmarks); NULL when off         */
    /* cuDNN (src/ops/attn_cudnn.c, builds with FQ_HAVE_CUDNN): the handle, bound to
     * `stream`, and the fused-attention plans, created on first use (a plan's
     * fq_nn_attention_plan); freed by cudnn_release, which release_all calls. */
    void *cudnn;                    /* cudnnHandle_t                                 */
    struct fq_attn_cudnn_cache *attn_cudnn;
    void (*cudnn_release)(struct fq_cuda_dev *d);
} fq_cuda_dev;

/* Returns the state of cuda:device (creating it), with the guard NOT left entered. */
fq_status fq_cuda_dev_get(fq_ctx *ctx, int device, fq_cuda_dev **out);
void fq_cuda_dev_release_all(fq_ctx *ctx);
/* The cuBLASLt handle of d's device, created on first use (under its guard). */
fq_status fq_cuda_dev_blaslt(fq_ctx *ctx, fq_cuda_dev *d, struct cublasLtContext **out);

/* Turns a cudaError_t into a status with a message naming what failed and where. */
fq_status fq_cuda_status(fq_ctx *ctx, cudaError_t e, const char *what, int device);
#define FQ_CUDA_TRY(ctx, call, dev)                                         \
    do {                                                                    \
        cudaError_t fq_ce_ = (call);                                        \
        if (fq_ce_ != cudaSuccess) return fq_cuda_status((ctx), fq_ce_, #call, (dev)); \
    } while (0)

/* Device memory (used by fq_buf_alloc / fq_buf_free only). */
fq_status fq_cuda_alloc(fq_ctx *ctx, int device, size_t bytes, void **out);
void fq_cuda_free(int device, void *p);
/* Synchronous copies; the guard and stream are chosen from the buffers. */
fq_status fq_cuda_copy(fq_ctx *ctx, const fq_buffer *dst, size_t dst_off, const fq_buffer *src,
                       size_t src_off, size_t bytes);
fq_status fq_cuda_zero(fq_ctx *ctx, const fq_buffer *dst, size_t off, size_t bytes);
#endif

#endif

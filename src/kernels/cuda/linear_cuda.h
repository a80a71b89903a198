/* The CUDA 4-bit linear layer: kernel launchers (gemv4.cu, gemm4.cu, gemm4_sm90.cu)
 * and the few ops-side helpers that tests and benchmarks use to see which kernel
 * runs (src/ops/linear_cuda.c).
 *
 * y[m, n] = epilogue( sum_k x[m, k] * W[n, k] ),  W = dequantize(w) of shape [N, K].
 *
 * Every launcher runs on the CUDA device that is current when it is called (the
 * caller holds the guard of the weight's device), on the stream it is given, and
 * returns a cudaError_t as int (0 = success). Launchers never allocate and never
 * synchronize. Nothing here keeps state between calls: per-device state (kernel
 * attributes, cuBLASLt handle, workspaces) lives in struct fq_cuda_dev.
 *
 * Decode tables: the kernels read the 16-entry code table from the weight's own
 * quant_map member (and the 256-entry nested map from nested_quant_map), so the
 * table always lives where the weight lives; each block expands it into shared
 * memory at start. Nothing is cached across devices.
 *
 * What each kernel requires (otherwise the dispatcher picks another one):
 *  - gemv4_simple: nothing (any K, any blocksize incl. blocks that straddle rows,
 *    odd K, x/y f32/f16/bf16). Scalar f32 FMA; the reference GPU kernel.
 *  - gemv4_tc (small M, tensor cores): x f16/bf16, blocksize >= 64, K % blocksize
 *    == 0 (every absmax block inside one row), x 16-byte aligned.
 *  - gemv4_stream (M <= 8): x f16/bf16, blocksize >= 32, K % blocksize == 0, x and
 *    the packed weight 16-byte aligned.
 *  - gemv4_bulk (M <= 2, sm_90 build and device): as gemv4_stream, and K % 128 == 0.
 *  - gemm4_mma (sm_80+) and gemm4_wgmma (sm_90a): the same as gemv4_tc.
 */
#ifndef FQ_LINEAR_CUDA_H
#define FQ_LINEAR_CUDA_H

#include "fluxq.h"

#include <stddef.h>
#include <stdint.h>

#ifdef FQ_HAVE_CUDA
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Raw pointers of a quantized weight [n, k] on the current device. */
typedef struct {
    const uint8_t *packed;      /* (n*k+1)/2 bytes; flat element 2i in the high nibble  */
    const float *absmax;        /* f32 [nblocks] (not nested)                            */
    const uint8_t *qabsmax;     /* u8 [nblocks] (nested)                                 */
    const float *nested_absmax; /* f32 [ceil(nblocks/256)] (nested)                      */
    const float *nested_code;   /* f32 [256] (nested)                                    */
    const float *quant_map;     /* f32 [16]: the code table, read by every kernel        */
    float offset;               /* nested offset                                         */
    int nested;
    int ready;                  /* 1: fully written before this launch was enqueued (the
                                 * qtensor's `ready`): kernels may read the weight before
                                 * griddepcontrol.wait                                    */
    int64_t blocksize;          /* a power of two, 32..4096                               */
    int64_t n, k;
} fq_lin4_weight;

/* Epilogue applied to each f32 result before it is rounded to y's dtype:
 * v += bias[n]; then the activation. Later work adds more fused ops here. */
enum { FQ_EPI_NONE = 0, FQ_EPI_GELU_TANH = 1 };
typedef struct {
    const void *bias;  /* [n] or NULL */
    int bias_dtype;    /* fq_dtype: f32/f16/bf16/f64 */
    int act;           /* FQ_EPI_* */
} fq_lin4_epilogue;

/* Activations: x [m, k] and y [m, n], dense row-major. */
typedef struct {
    const void *x;
    int x_dtype; /* fq_dtype: f32/f16/bf16 */
    void *y;
    int y_dtype; /* fq_dtype: f32/f16/bf16 */
    int64_t m;
} fq_lin4_io;

/* ---- kernels ---------------------------------------------------------------- */

/* Reference kernel, any shape and format. */
int fq_cuda_gemv4_simple(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                         cudaStream_t stream);

/* Small-M streaming kernel on tensor cores (mma.sync m16n8k16), M <= 16 rows per
 * launch (the launcher loops over 16-row slices for larger M). ksplit: warps that
 * share one 16-row tile of W along K (1, 2, 4 or 8; 0 = choose from sm_count). */
int fq_cuda_gemv4_tc_supported(const fq_lin4_weight *w, const fq_lin4_io *io);
int fq_cuda_gemv4_tc(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                     int sm_count, int ksplit, cudaStream_t stream);

/* Streaming kernel for M <= 8 (sm_80+): 16-byte weight loads, W decoded by default
 * exactly as dequantize rounds it (code * absmax in f32 with ftz, the nested absmax
 * rebuilt with the same two roundings, rounded once to x's type), products and f32
 * sums on tensor cores; on sm_90 an L2 bulk prefetch of each warp's slice and a
 * programmatic dependent launch. cfg (0 = choose): bits 0..3 = K slices per 16-row
 * tile (1, 2, 4, 8; 0 = automatic slices and batch), bit 4 = 1 chunk per load batch
 * instead of 2, bits 5..6 = decode (0/1 exact, 2 bf16 HMUL: faster, W rounded three
 * times; 3 = loads-only bench probe, WRONG results), bit 7 = plain launch (set it
 * before sm_90). */
int fq_cuda_gemv4_stream_supported(const fq_lin4_weight *w, const fq_lin4_io *io);
/* Sets the kernels' dynamic shared-memory limit on the CURRENT device (once per device). */
int fq_cuda_gemv4_stream_prepare(void);
int fq_cuda_gemv4_stream(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                         int sm_count, int cfg, cudaStream_t stream);

/* M <= 2 streaming kernel for sm_90 (gemv4_bulk.cu): the weight goes through a
 * ring of shared-memory stages filled by bulk copies (cp.async.bulk + mbarriers)
 * plus L2 prefetches further ahead; programmatic dependent launch. Needs x f16/bf16,
 * K % 128 == 0, blocksize >= 32, K % blocksize == 0, x and packed 16-byte aligned.
 * cfg (0 = choose): bits 0..1 decode (0/2 fast: code rounded to x's type, absmax
 * applied in f32 to each 32-element partial sum; 1 exact: W rounded exactly like
 * dequantize; 3 loads-only bench probe, WRONG results); bits 2..3 L2 prefetch (0 =
 * the block's whole range at start, 1 none, 2 = 24 stages beyond the ring, 3 = 8);
 * bit 4 = grid sized for one block per SM; bit 7 = plain launch. _built() is 0
 * when the build has no sm_90 code. */
#define FQ_GEMV4_BULK_EXACT 1
int fq_cuda_gemv4_bulk_built(void);
int fq_cuda_gemv4_bulk_supported(const fq_lin4_weight *w, const fq_lin4_io *io);
int fq_cuda_gemv4_bulk_prepare(void);
int fq_cuda_gemv4_bulk(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                       int sm_count, int cfg, cudaStream_t stream);

/* M <= 2 GEMV with contiguous 256-byte warp loads (gemv4_flat.cu, sm_80+): a warp
 * streams two rows at a time, one persistent block per SM over an equal run of row
 * pairs, the diagonal of mma.sync as 8 + 8 per-block dot products. Fast decode
 * only (code rounded to x's type, absmax applied in f32 to each 64-element
 * partial). Needs x f16/bf16, blocksize >= 64, K % 512 == 0, K <= 16384,
 * K % blocksize == 0, x and packed 16-byte aligned. cfg (0 = choose): bits 0..1
 * mode (0/1 fast; 2 loads-only probe, 3 flat-stream probe: bench only, WRONG
 * results), bits 2..3 block shape (0 = automatic), bit 4 L2 prefetch of each
 * block's range before the wait, bit 7 plain launch (set it before sm_90). */
int fq_cuda_gemv4_flat_supported(const fq_lin4_weight *w, const fq_lin4_io *io);
int fq_cuda_gemv4_flat_prepare(void);
int fq_cuda_gemv4_flat(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                       int sm_count, int cfg, cudaStream_t stream);

/* M <= 2 GEMV whose every warp load is one contiguous 512-byte window of one W row
 * (gemv4_win.cu, sm_80+): each warp keeps one window of the rows it owns, with its
 * x values in registers as f32; bytes decoded through a table of f32 code pairs,
 * sums in f32, the absmax applied to each lane's 32-element sum (W never rounded:
 * not bit-identical to dequantize + GEMM). Needs blocksize >= 32, K % 32 == 0,
 * K <= 16384, x f32/f16/bf16, x and packed 16-byte aligned. cfg (0 = choose):
 * bits 0..1 block shape (0: automatic; 1: up to 16 warps, batches of 4 rows at M = 1
 * and 2 at M = 2; 2: half the batch; 3: up to 8 warps), bit 4 L2 prefetch of each block's
 * rows before the wait, bit 6 wait before the first W load even when w->ready (the
 * default loads a ready weight before griddepcontrol.wait), bit 7 plain launch (set
 * it before sm_90). */
int fq_cuda_gemv4_win_supported(const fq_lin4_weight *w, const fq_lin4_io *io);
int fq_cuda_gemv4_win_prepare(void);
int fq_cuda_gemv4_win(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                      int sm_count, int cfg, cudaStream_t stream);

/* Benchmark only (stream_probe.cu, sm_90 for modes 1-2): reads `bytes` (16-byte
 * aligned p; a multiple of 16 is read) and nothing else, the floor for any kernel
 * that must stream the same bytes per call. mode 0 plain launch; 1 programmatic
 * dependent launch waiting before the loads; 2 all loads before the wait (calls in
 * a row overlap); 3 as 2 with blocks too large to share an SM with the next call's.
 * *sink is written only in a case that does not happen. */
int fq_cuda_stream_probe(const void *p, size_t bytes, unsigned *sink, int mode, int sm_count, cudaStream_t stream);
/* Benchmark only (stream_probe.cu): L2 -> SM read bandwidth on an L2-resident range
 * of `bytes` (a multiple of 16 KB, 16-byte aligned) that each of `blocks` blocks reads
 * `reps` times; how 0 register loads, 1 bulk copies into shared memory from scattered
 * offsets, 2 the same in step (1 and 2 need cc_major >= 9). Returns a cudaError_t. */
int fq_cuda_l2_probe(const void *p, size_t bytes, int reps, int how, int blocks, unsigned *sink, int cc_major,
                     cudaStream_t stream);
/* Benchmark only (stream_probe.cu): `blocks` blocks exchange `bytes` each (a multiple of
 * 16, at most 200 KB; 100 KB for how 2), `reps` times. Through the shared memory of the
 * next CTA of their cluster of `cluster` (1..8, dividing blocks; cc_major >= 9): how 0 by
 * 16-byte stores, 2 by bulk copies. Through global memory (scratch: blocks x bytes,
 * 16-byte aligned): how 1 by 16-byte stores, 3 by bulk copies from shared memory
 * (cc_major >= 9), each then reading another block's bytes; 4 and 5 as 1 and 3 without the
 * read. Returns a cudaError_t. */
int fq_cuda_dsmem_probe(size_t bytes, int reps, int cluster, int how, int blocks, void *scratch, unsigned *sink,
                        int cc_major, cudaStream_t stream);

/* Large-M GEMM on tensor cores (mma.sync, sm_80+), decoding W tiles on chip.
 * cfg: 0 = choose; 1..FQ_GEMM4_MMA_CONFIGS a fixed tile configuration (one that
 * needs more shared memory than smem_optin is replaced by the automatic choice). */
#define FQ_GEMM4_MMA_CONFIGS 4
int fq_cuda_gemm4_mma_supported(const fq_lin4_weight *w, const fq_lin4_io *io);
/* Sets the kernels' attributes (dynamic shared memory) on the CURRENT device for
 * every configuration that fits in smem_optin bytes (the device's opt-in limit).
 * Call once per device before the first launch there. */
int fq_cuda_gemm4_mma_prepare(size_t smem_optin);
int fq_cuda_gemm4_mma(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                      int sm_count, size_t smem_optin, int cfg, cudaStream_t stream);
const char *fq_cuda_gemm4_mma_config_name(int cfg);

/* Large-M GEMM with Hopper warpgroup MMA (sm_90a only; built when the build
 * includes architecture 90). fq_cuda_gemm4_wgmma_built() is 0 otherwise.
 * cfg: low 4 bits = tile configuration (0 = choose, 1..FQ_GEMM4_WGMMA_CONFIGS),
 * bits 4..7 = number of K splits (0 = choose). When the plan splits K, the f32
 * partials go to ws (fq_cuda_gemm4_wgmma_workspace bytes; with less, K is not
 * split) and a second kernel reduces them. */
#define FQ_GEMM4_WGMMA_CONFIGS 5
int fq_cuda_gemm4_wgmma_built(void);
int fq_cuda_gemm4_wgmma_supported(const fq_lin4_weight *w, const fq_lin4_io *io);
int fq_cuda_gemm4_wgmma_prepare(void);
size_t fq_cuda_gemm4_wgmma_workspace(const fq_lin4_weight *w, const fq_lin4_io *io, int sm_count, int cfg);
int fq_cuda_gemm4_wgmma(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                        int sm_count, int cfg, float *ws, size_t ws_bytes, cudaStream_t stream);
const char *fq_cuda_gemm4_wgmma_config_name(int cfg);

/* Warp-specialized large-M GEMM (sm_90a only; gemm4_ws_sm90.cu): TMA + mbarrier
 * pipeline, W decoded into wgmma A registers - exactly like dequantize, or in the
 * fast configurations as bf16(bf16(code) * bf16(absmax)), the rounding of
 * bitsandbytes' 4-bit inference kernel (bf16 x only). Same
 * requirements as gemm4_wgmma. cfg: low 4 bits = tile configuration (0 = choose,
 * 1..4: 256/216/192/128 x rows per tile, 5: 216 with 7 stages, 6 and 7: retired (an
 * error), 8..10: 216/256/192 with the output stored by TMA, 11..14: fast decode,
 * 216/256/192 with the TMA store and 128), bits 4..7 = K splits (0 =
 * choose, 15 = stream-K: every CTA the same
 * share of the tile-major K tiles, split tiles summed in a fixed order), bit 8
 * (FQ_GEMM4_WS_FAST_OK, with tile 0) = the plan chooses among the fast
 * configurations when x is bf16; with a split
 * or stream-K the f32 partials go to ws (fq_cuda_gemm4_ws_workspace bytes; with
 * less, K is not split). Stream-K also needs flags: 2 x FQ_GEMM4_WS_MAX_SMS ints,
 * zero before the first launch, zero again after each (the kernel resets them); one
 * launch at a time may use them. fq_cuda_gemm4_ws_prepare (once per device, before
 * the first launch there) sets the shared-memory limits and looks up
 * cuTensorMapEncodeTiled. */
#define FQ_GEMM4_WS_CONFIGS 14
#define FQ_GEMM4_WS_FAST_OK 0x100
#define FQ_GEMM4_WS_MAX_SMS 1024
int fq_cuda_gemm4_ws_built(void);
int fq_cuda_gemm4_ws_supported(const fq_lin4_weight *w, const fq_lin4_io *io);
/* Bench only: gemm4_ws's timeline under FQ_WS_PROBE=64 in builds with FQ_WS_PROBES (n
 * global-timer stamps, [CTA][16], of the launches since the last clear; out NULL clears
 * them); cudaErrorNotSupported elsewhere. */
int fq_cuda_gemm4_ws_stamps(unsigned long long *out, int n);
int fq_cuda_gemm4_ws_prepare(void);
size_t fq_cuda_gemm4_ws_workspace(const fq_lin4_weight *w, const fq_lin4_io *io, int sm_count, int cfg);
int fq_cuda_gemm4_ws(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e, int sm_count,
                     int cfg, float *ws, size_t ws_bytes, int *flags, cudaStream_t stream);
/* 1 when the plan for cfg is stream-K (tests, benchmarks). */
int fq_cuda_gemm4_ws_streamk(const fq_lin4_weight *w, const fq_lin4_io *io, int sm_count, int cfg);
const char *fq_cuda_gemm4_ws_config_name(int cfg);

/* y[i] = epilogue(acc[i]) for an f32 [m, n] result (used after cuBLASLt when y's
 * dtype is not one cuBLASLt writes directly). acc may alias y when y is f32. */
int fq_cuda_lin4_finish(const float *acc, const fq_lin4_io *io, int64_t n, const fq_lin4_epilogue *e,
                        cudaStream_t stream);
/* y[i] = epilogue(sum over s < splits of part[s * m * n + i]), in order s = 0, 1, ... */
int fq_cuda_lin4_splitk_reduce(const float *part, int splits, const fq_lin4_io *io, int64_t n,
                               const fq_lin4_epilogue *e, cudaStream_t stream);
/* In place: y = epilogue(y). */
int fq_cuda_lin4_epilogue_inplace(const fq_lin4_io *io, int64_t n, const fq_lin4_epilogue *e,
                                  cudaStream_t stream);

#ifdef __cplusplus
}
#endif

/* ---- ops side (src/ops/linear_cuda.c; C only) --------------------------------- */
#ifndef __CUDACC__

/* The implementations fq_linear_4bit can run on a CUDA device. */
typedef enum {
    FQ_LIN4_NONE = 0,
    FQ_LIN4_GEMV_SIMPLE,  /* reference scalar kernel (FQ_LINEAR_GEMV when the fast one can't) */
    FQ_LIN4_GEMV_TC,      /* small-M tensor-core streaming kernel (FQ_LINEAR_GEMV)          */
    FQ_LIN4_GEMM_MMA,     /* mma.sync GEMM (FQ_LINEAR_GEMM before sm_90)                     */
    FQ_LIN4_GEMM_WGMMA,   /* wgmma GEMM (FQ_LINEAR_GEMM on sm_90)                            */
    FQ_LIN4_DEQUANT_BLAS, /* dequantize to a scratch + cuBLASLt (FQ_LINEAR_DEQUANT_BLAS)     */
    FQ_LIN4_GEMV_STREAM,  /* M <= 8 streaming kernel, W rounded like dequantize (FQ_LINEAR_GEMV) */
    FQ_LIN4_GEMV_BULK,    /* M <= 2 bulk-copy streaming kernel, sm_90 (FQ_LINEAR_GEMV)     */
    FQ_LIN4_GEMM_WS,      /* warp-specialized TMA/wgmma GEMM, W rounded like dequantize (sm_90) */
    FQ_LIN4_GEMV_FLAT,    /* M <= 2 contiguous-load GEMV, fast decode only (FQ_LINEAR_GEMV)  */
    FQ_LIN4_GEMV_WIN,     /* M <= 2 window GEMV, f32 decode, W not rounded (FQ_LINEAR_GEMV)   */
    FQ_LIN4_COUNT
} fq_lin4_impl;

const char *fq_lin4_impl_name(fq_lin4_impl k);

/* Tests and benchmarks: ctx->linear_kernel values from FQ_LIN4_EXACT up select one
 * implementation exactly (and a tile configuration, 0 = automatic); if it cannot
 * run the operands the call fails with FQ_ERR_UNSUPPORTED instead of falling back.
 * The public values (fq_linear_kernel) fall back to a kernel that can. */
#define FQ_LIN4_EXACT 1000
#define FQ_LIN4_SELECT(impl, cfg) (FQ_LIN4_EXACT + (int)(impl) * 256 + (int)(cfg))
/* ctx->linear_kernel value: the automatic choice among kernels whose weights are
 * bit-identical to what dequantize_4bit writes (code * absmax in f32, rounded once
 * to x's type): gemv4_bulk exact / gemv4_stream at small M, the GEMM choice above.
 * The plain automatic choice at M <= 16 runs faster kernels that round the code
 * value instead (errors within the same bf16/f16 tolerance, not bit-identical). */
#define FQ_LIN4_AUTO_EXACT (FQ_LIN4_EXACT - 1)

#include "core/core.h"
/* Which implementation fq_linear_4bit would run for these operands on w's device
 * under ctx's current kernel choice (FQ_LIN4_NONE with a message if none can). */
fq_lin4_impl fq_linear4_cuda_choice(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *w,
                                    const fq_tensor *y);
/* The same, and the configuration passed to the kernel (its cfg argument) in *cfg. */
fq_lin4_impl fq_linear4_cuda_choice_cfg(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *w,
                                        const fq_tensor *y, int *cfg);
/* 1 if implementation k can run these operands on w's device. */
int fq_linear4_cuda_can_run(fq_ctx *ctx, fq_lin4_impl k, const fq_tensor *x, const fq_qtensor *w,
                            const fq_tensor *y);
#endif /* !__CUDACC__ */
#endif /* FQ_HAVE_CUDA */

#endif

/* Attention on cuDNN's fused flash-attention engine (internal to src/ops).
 *
 * out = softmax(q·kᵀ/sqrt(dh))·v for bf16/f16 q, k, v, out [B, S, H*dh] read
 * and written in place (head h of token s at column h*dh). Built only when the
 * Makefile finds cudnn.h (FQ_HAVE_CUDNN); otherwise fq_attn_cudnn_available()
 * is 0 and the other functions report FQ_ERR_UNSUPPORTED.
 *
 * A plan per (dtype, B, query rows, key rows, H, dh, out's row stride) is
 * built once (cuDNN backend graph + heuristics) and kept in the device's
 * cache; fq_nn_attention_plan builds it ahead of a forward, so that the
 * forward creates nothing on the device.
 *
 * Engine choice (the device's tuning mode, from env FQ_ATTN_CUDNN_TUNE unless
 * fq_attn_cudnn_set_tune says otherwise):
 *   0 (default)  the first config of heuristics mode A (then B) that finalizes,
 *                untimed (50-120 ms per shape on an H100);
 *   1            every engine config of heuristics modes A, B and FALLBACK whose
 *                execution plan finalizes is timed on the device, on temporary
 *                buffers of the shape, and the fastest is kept (0.2-0.35 s per
 *                FLUX shape, up to ~2 s for some small odd ones);
 *   2            as 1, plus every engine of the graph and knob variants whose
 *                output matches the first config's (slow: for exploring, see
 *                fq_attn_cudnn_list).
 * Mode 0 is the default because on an H100 with cuDNN 9.14 mode 1 keeps the
 * same config for FLUX's shapes (S 512, 4096, 4608 with 24 heads of 128): the
 * only other engine cuDNN offers for this graph is 2x slower there and wins
 * only on tiny shapes (bench/results/attn_cudnn_tune_h100_2026-11-27.txt).
 * FQ_ATTN_CUDNN_LOG=1 prints each plan's choice to stderr (a debugging aid; the
 * same line always goes to the context's log at FQ_LOG_DEBUG). */
#ifndef FQ_ATTN_CUDNN_H
#define FQ_ATTN_CUDNN_H

#include "core/core.h"

#ifdef FQ_HAVE_CUDA
#include "core/cuda_device.h"

/* 1 if the library was built with cuDNN. */
int fq_attn_cudnn_available(void);
/* 1 if the cuDNN path takes head dim dh at compute dtype rnd with q, k, v, out
 * stored as xt (xt must equal rnd: bf16 or f16; dh a multiple of 8, <= 256). */
int fq_attn_cudnn_shape_ok(int64_t dh, fq_dtype rnd, fq_dtype xt);

/* Finds or builds the plan on d for out rows ldo elements apart (0: packed,
 * H*dh; a larger ldo writes into the first columns of a wider tensor).
 * strict = 0: a plan cuDNN cannot build is remembered and *ok = 0 (no
 * error); strict = 1: it is an error. *ws_bytes: the plan's workspace (0 when
 * *ok = 0). */
fq_status fq_attn_cudnn_plan(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh,
                             int64_t ldo, int strict, int *ok, size_t *ws_bytes);

/* Queues the attention on d's stream; the caller has entered d's guard. Uses
 * (or builds, for a bare op call) the plan as fq_attn_cudnn_plan; *ran = 0
 * without an error when strict = 0 and cuDNN has no plan for the shape or
 * the workspace does not fit ws_bytes at ws. */
fq_status fq_attn_cudnn_run(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh,
                            const void *q, const void *k, const void *v, void *out, int64_t ldo, void *ws,
                            size_t ws_bytes, int strict, int *ran);

/* One range of query rows, as one cuDNN call: rows [r0, r0 + Sq) of q and out
 * against all Skv rows of k and v, where q, k, v and out are [B, Skv, ...]
 * (q, k, v rows H*dh apart, out rows ldo apart) and q, out point at row r0 of
 * batch 0 (k, v at row 0); 1 <= Sq <= Skv. Each query row's result depends on
 * that row and k, v only, and cuDNN computes a row the same way in a range:
 * ranges covering the rows give the one call's bits (on an H100 with cuDNN
 * 9.14; tests/test_cuda_attention.c checks). The plan is cached per (dtype, B,
 * Sq, Skv, H, dh, ldo); Sq = Skv is fq_attn_cudnn_plan's. Otherwise as
 * fq_attn_cudnn_plan / _run. The op does not split: at FLUX's 4608 tokens
 * every split measured slower than one call (bench_flux, docs/flux-gpu.md). */
fq_status fq_attn_cudnn_plan_rows(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t Sq, int64_t Skv,
                                  int64_t H, int64_t dh, int64_t ldo, int strict, int *ok, size_t *ws_bytes);
fq_status fq_attn_cudnn_run_rows(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t Sq, int64_t Skv,
                                 int64_t H, int64_t dh, const void *q, const void *k, const void *v, void *out,
                                 int64_t ldo, void *ws, size_t ws_bytes, int strict, int *ran);

/* Sets d's tuning mode (0, 1, 2 as above; -1: back to FQ_ATTN_CUDNN_TUNE) and
 * drops d's cached plans (after its stream is idle), so that the next plan of
 * every shape is chosen again. For tests and benchmarks. */
fq_status fq_attn_cudnn_set_tune(fq_ctx *ctx, fq_cuda_dev *d, int mode);

/* What the cached plan of these sizes runs, as one line (engine, knobs,
 * workspace, timing); "" when no plan of these sizes is cached. */
void fq_attn_cudnn_describe(fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh, char *buf,
                            size_t n);

/* One engine config of a shape, as fq_attn_cudnn_list measured it. */
#define FQ_ATTN_CUDNN_MAXKNOB 48 /* more than cuDNN 9 has knob types */
typedef struct {
    char mode;           /* 'A', 'B', 'F' (fallback heuristics), 'E' (engine sweep), 'K' (knob variant) */
    char graph;          /* 's': the graph with the softmax statistics, 'n': without              */
    int64_t engine;      /* cuDNN's global engine index; -1 when unreadable                        */
    int nknobs;
    int64_t knob[FQ_ATTN_CUDNN_MAXKNOB][2]; /* (cudnnBackendKnobType_t, value), sorted by type      */
    size_t ws;           /* workspace bytes                                                        */
    double build_ms;     /* cudnnBackendFinalize of its execution plan                             */
    double ms;           /* median per call; < 0: it did not run                                   */
    double diff;         /* rel L2 of its output to the first config's; < 0: not compared          */
    int first, chosen;   /* the untuned choice (mode 0); what mode 1 keeps                         */
} fq_attn_cudnn_cfg;

/* Builds, times and compares every engine config of a shape (wide = 1: also
 * every engine of the graph and knob variants, within about 15 s), on
 * temporary buffers of its own filled with a fixed pattern; the plan cache is
 * not touched. Fills up to max entries of out, *n: how many. */
fq_status fq_attn_cudnn_list(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh,
                             int wide, fq_attn_cudnn_cfg *out, int max, int *n);
#endif

#endif

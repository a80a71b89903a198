/* Attention on cuDNN's fused flash-attention engine (internal to src/ops).
 *
 * out = softmax(q·kᵀ/sqrt(dh))·v for bf16/f16 q, k, v, out [B, S, H*dh] read
 * and written in place (head h of token s at column h*dh). Built only when the
 * Makefile finds cudnn.h (FQ_HAVE_CUDNN); otherwise fq_attn_cudnn_available()
 * is 0 and the other functions report FQ_ERR_UNSUPPORTED.
 *
 * A plan per (dtype, B, S, H, dh) is built once (cuDNN backend graph + heuristics)
 * and kept in the device's cache; fq_nn_attention_plan builds it ahead of a
 * forward, so that the forward creates nothing on the device. */
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

/* Finds or builds the plan on d. strict = 0: a plan cuDNN cannot build is
 * remembered and *ok = 0 (no error); strict = 1: it is an error. *ws_bytes: the
 * plan's workspace (0 when *ok = 0). */
fq_status fq_attn_cudnn_plan(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh,
                             int strict, int *ok, size_t *ws_bytes);

/* Queues the attention on d's stream; the caller has entered d's guard. Uses
 * (or builds, for a bare op call) the plan as fq_attn_cudnn_plan; *ran = 0
 * without an error when strict = 0 and cuDNN has no plan for the shape or
 * the workspace does not fit ws_bytes at ws. */
fq_status fq_attn_cudnn_run(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh,
                            const void *q, const void *k, const void *v, void *out, void *ws, size_t ws_bytes,
                            int strict, int *ran);
#endif

#endif

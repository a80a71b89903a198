/* The CUDA side of the transformer ops (internal to src/ops): nn_ops.c checks
 * every operand (placement, dtype, shape, scratch size) and then calls these,
 * which run on the operands' device under its guard, on its stream, and return
 * once the work is queued. Errors name the op and the device. */
#ifndef FQ_NN_OPS_CUDA_H
#define FQ_NN_OPS_CUDA_H

#include "ops/nn_ops.h"

/* Declared in every build (a CPU-only build never calls them; nn_ops.c names
 * them in unevaluated expressions), defined only with CUDA. */

/* ---- elementwise ---- */
fq_status fq_nncu_cast(fq_ctx *ctx, const fq_tensor *x, fq_tensor *y, fq_dtype rnd);
fq_status fq_nncu_scale(fq_ctx *ctx, const fq_tensor *x, float alpha, fq_tensor *y, fq_dtype rnd);
fq_status fq_nncu_add(fq_ctx *ctx, const fq_tensor *a, const fq_tensor *b, fq_tensor *y, fq_dtype rnd);
/* kind: 0 silu, 1 gelu_tanh */
fq_status fq_nncu_act(fq_ctx *ctx, int kind, const fq_tensor *x, fq_tensor *y, fq_dtype rnd);
fq_status fq_nncu_clamp(fq_ctx *ctx, fq_tensor *x, float lo, float hi);
/* whole = cat(a, b) (split = 0: concat into whole; 1: split whole into a, b);
 * outer rows of ia + ib bytes. */
fq_status fq_nncu_cat(fq_ctx *ctx, int split, const fq_tensor *whole, const fq_tensor *a, const fq_tensor *b,
                      int64_t outer, size_t ia, size_t ib);
/* out[..., c0 : c0 + F] = x (kind 0) or gelu_tanh(x) (kind 1); rows of x: F elements. */
fq_status fq_nncu_cols(fq_ctx *ctx, int kind, const fq_tensor *x, fq_tensor *out, int64_t c0, fq_dtype rnd);

/* ---- linear ---- */
/* Scratch floats of a CUDA linear y[m, n] = x[m, k] · Wᵀ + b: the weight dense
 * of dtype wt (qw == 0) or 4-bit (qw == 1); bias dtype bt (-1: no bias). */
int fq_nncu_prof_ops(const fq_nn_prof *p, int cap, const char **names, double *ms, int64_t *count);
int64_t fq_nncu_linear_scratch(int qw, fq_dtype wt, int bt, int64_t m, int64_t n, int64_t k, fq_dtype rnd,
                               fq_dtype xt, fq_dtype yt);
/* Exactly one of w, qw. */
fq_status fq_nncu_linear(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *w, const fq_qtensor *qw,
                         const fq_tensor *bias, fq_tensor *y, int64_t m, fq_tensor *scratch, fq_dtype rnd);
/* fq_nn_linear_q4_group's batched path (FQ_ERR_UNSUPPORTED, no message: not here). */
int64_t fq_nncu_linear_q4_group_scratch(int g, int64_t n, int64_t k, fq_dtype rnd);
fq_status fq_nncu_linear_q4_group(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *const *w,
                                  const fq_tensor *bias_cat, fq_tensor *const *y, int g, int64_t m, fq_tensor *scratch,
                                  fq_dtype rnd);

/* out[..., c0 : c0 + n] = gelu_tanh(x · Wᵀ + b) with GELU in cuBLASLt's epilogue
 * (exactly one of w, qw); fq_nncu_linear_gelu_ok says where it runs. */
int fq_nncu_linear_gelu_ok(fq_dtype rnd, fq_dtype act);
fq_status fq_nncu_linear_gelu_cols(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *w, const fq_qtensor *qw,
                                   const fq_tensor *bias, fq_tensor *out, int64_t c0, int64_t m, fq_tensor *scratch,
                                   fq_dtype rnd);

/* ---- norms, positions, attention ---- */
fq_status fq_nncu_adaln(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *mod, int shift_chunk, int scale_chunk,
                        int64_t nchunks, float eps, fq_tensor *y, fq_dtype rnd);
fq_status fq_nncu_gated_add(fq_ctx *ctx, fq_tensor *h, const fq_tensor *mod, int gate_chunk, int64_t nchunks,
                            const fq_tensor *a, fq_dtype rnd);
/* gate chunk of gmod ([B, gn*D]); shift/scale chunks of nmod ([B, nn*D]) */
fq_status fq_nncu_gated_add_adaln(fq_ctx *ctx, fq_tensor *h, const fq_tensor *gmod, int gate_chunk, int64_t gn,
                                  const fq_tensor *a, const fq_tensor *nmod, int shift_chunk, int scale_chunk,
                                  int64_t nn, float eps, fq_tensor *y, fq_dtype rnd);
fq_status fq_nncu_rmsnorm(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *weight, float eps, fq_tensor *y,
                          fq_dtype rnd);
fq_status fq_nncu_rope_table(fq_ctx *ctx, const fq_tensor *ids, const int64_t axes[3], double theta,
                             fq_tensor *cos_t, fq_tensor *sin_t);
fq_status fq_nncu_rmsnorm_rope(fq_ctx *ctx, fq_tensor *x, const fq_tensor *weight, float eps, const fq_tensor *cos_t,
                               const fq_tensor *sin_t, int64_t t0, int64_t heads, fq_dtype rnd);
fq_status fq_nncu_rmsnorm_rope_n(fq_ctx *ctx, const fq_nn_rope_part *parts, int n, float eps,
                                 const fq_tensor *cos_t, const fq_tensor *sin_t, int64_t heads, fq_dtype rnd,
                                 int impl);
fq_status fq_nncu_rope(fq_ctx *ctx, fq_tensor *x, const fq_tensor *cos_t, const fq_tensor *sin_t, int64_t heads,
                       fq_dtype rnd);
fq_status fq_nncu_timestep_proj(fq_ctx *ctx, const fq_tensor *t, fq_tensor *out);
/* 1 if implementation impl (FQ_NN_ATTN_*) can run head dim dh with rounding rnd. */
int fq_nncu_attention_supported(int64_t dh, fq_dtype rnd, int impl);
int64_t fq_nncu_attention_scratch(int64_t batch, int64_t s, int64_t heads, int64_t dh, fq_dtype rnd, int impl,
                                  fq_dtype xt);
/* ldo: out's row stride in elements (0: packed); only cuDNN takes another one
 * (else FQ_ERR_UNSUPPORTED, no message). */
fq_status fq_nncu_attention(fq_ctx *ctx, const fq_tensor *q, const fq_tensor *k, const fq_tensor *v, int64_t heads,
                            fq_tensor *out, int64_t ldo, fq_tensor *scratch, fq_dtype rnd, int impl);
/* fq_nn_attention_plan on cuda:device; *scratch holds our kernel's need on entry. */
fq_status fq_nncu_attention_plan(fq_ctx *ctx, int device, int64_t batch, int64_t s, int64_t heads, int64_t dh,
                                 fq_dtype rnd, fq_dtype xt, int impl, int64_t ldo, int64_t *scratch);

/* ---- devices ---- */
fq_status fq_nncu_prepare(fq_ctx *ctx, int device);
fq_status fq_nncu_sync(fq_ctx *ctx, int device);
fq_status fq_nncu_graph_begin(fq_ctx *ctx, int device);
fq_status fq_nncu_graph_end(fq_ctx *ctx, int device, fq_nn_graph **out);
fq_status fq_nncu_graph_launch(fq_ctx *ctx, fq_nn_graph *g);
void fq_nncu_graph_free(fq_nn_graph *g);
fq_status fq_nncu_memory(fq_ctx *ctx, int device, size_t *free_bytes, size_t *total_bytes);
fq_status fq_nncu_describe(fq_ctx *ctx, int device, char *buf, size_t n);
fq_status fq_nncu_random(fq_ctx *ctx, fq_tensor *t, uint64_t seed, float scale, float shift);
fq_status fq_nncu_prof_create(fq_ctx *ctx, int device, int events, fq_nn_prof **out);
fq_status fq_nncu_prof_start(fq_ctx *ctx, fq_nn_prof *p);
fq_status fq_nncu_prof_stop(fq_ctx *ctx, fq_nn_prof *p, double ms[FQ_NN_CLASSES], int64_t ops[FQ_NN_CLASSES]);
void fq_nncu_prof_free(fq_nn_prof *p);

#endif

/* Backend-neutral transformer ops (internal API of the models layer).
 *
 * Each op checks that every operand is on the device of its output (the
 * executing device), has the dtype the op needs and a shape that fits, and
 * then dispatches to a backend: src/kernels/cpu/nn_cpu.c, or on cuda:N the
 * kernels of src/kernels/cuda/nn_*.cu and cuBLASLt (src/ops/nn_ops_cuda.c),
 * queued on that device's stream under its guard; CUDA ops return once the
 * work is queued (reading results back, fq_tensor_to_host or fq_nn_sync,
 * waits for it). Errors name the op, the operand role and the tensor's name.
 *
 * Activations are f32 tensors, or on a CUDA device with bf16 compute
 * (fq_nn_act_dtype) bf16 ones: their values are rounded to bf16 anyway, so
 * the storage changes no result, only the bytes moved. Ops that say so take
 * either; operands that pair up (x and y of a norm, q/k/v/out) share one
 * dtype, a linear's x and y may differ. `rnd` is the dtype whose rounding the op
 * reproduces (FQ_F32: none; FQ_BF16/FQ_F16: emulate a PyTorch model of that
 * dtype, see nn_cpu.h). Ops never allocate: scratch space comes from the
 * caller, sized with the *_scratch functions below.
 *
 * Modulation tensors ("mod") are the outputs of AdaLN linears, [B, n*D]; an
 * op that uses a chunk takes its index (chunk c of row b starts at b*n*D + c*D). */
#ifndef FQ_NN_OPS_H
#define FQ_NN_OPS_H

#include "core/qtensor.h"

/* ---- views -------------------------------------------------------------------- */

/* A non-owning tensor over bytes [off, off + numel*size) of `base` (the
 * activation arena). Never pass a view to fq_tensor_free. `name` (a string that
 * outlives the view, e.g. a literal) is what error messages call it. The caller
 * guarantees that the range lies inside base (the plan that sized the arena). */
fq_tensor fq_nn_view(const fq_buffer *base, size_t off, fq_dtype dtype, int ndim, const int64_t *shape,
                  const char *name);
/* A view of rows [r0, r0 + nrows) of a contiguous tensor, as [nrows, rest...]. */
fq_tensor fq_nn_view_rows(const fq_tensor *t, int64_t r0, int64_t nrows);

/* The dtype the big activations may be stored in on dev at compute dtype rnd:
 * bf16 on CUDA for bf16 compute, else f32. Cast (y), silu, gelu_tanh, the
 * linears (x, y), adaln, gated_add (h, a), rmsnorm_heads, rope and attention
 * accept it; concat/split copy any dtype; the rest take f32. */
fq_dtype fq_nn_act_dtype(fq_device dev, fq_dtype rnd);

/* ---- elementwise -------------------------------------------------------------- */

/* y = rnd(x) (x of any float dtype; converts f16/bf16 inputs to f32 storage). */
fq_status fq_nn_cast(fq_ctx *ctx, const fq_tensor *x, fq_tensor *y, fq_dtype rnd);
/* y = rnd(x * alpha). */
fq_status fq_nn_scale(fq_ctx *ctx, const fq_tensor *x, float alpha, fq_tensor *y, fq_dtype rnd);
/* y = rnd(a + b), same shapes. */
fq_status fq_nn_add(fq_ctx *ctx, const fq_tensor *a, const fq_tensor *b, fq_tensor *y, fq_dtype rnd);
fq_status fq_nn_silu(fq_ctx *ctx, const fq_tensor *x, fq_tensor *y, fq_dtype rnd);
fq_status fq_nn_gelu_tanh(fq_ctx *ctx, const fq_tensor *x, fq_tensor *y, fq_dtype rnd);
/* x = min(max(x, lo), hi) in place (NaN stays NaN). */
fq_status fq_nn_clamp(fq_ctx *ctx, fq_tensor *x, float lo, float hi);

/* out = cat(a, b) along dimension dim; split is the inverse. All contiguous,
 * same dtype, shapes equal except at dim. */
fq_status fq_nn_concat(fq_ctx *ctx, const fq_tensor *a, const fq_tensor *b, int dim, fq_tensor *out);
fq_status fq_nn_split(fq_ctx *ctx, const fq_tensor *x, int dim, fq_tensor *a, fq_tensor *b);
/* out[..., c0 : c0 + F] = x, or = gelu_tanh(x) rounded to rnd: x [B, S, F], out
 * [B, S, W] with c0 + F <= W, same dtype. One side of a concatenation along
 * the last dim written in place (fq_nn_gelu_tanh / fq_nn_concat's bits). */
fq_status fq_nn_copy_cols(fq_ctx *ctx, const fq_tensor *x, fq_tensor *out, int64_t c0);
fq_status fq_nn_gelu_tanh_cols(fq_ctx *ctx, const fq_tensor *x, fq_tensor *out, int64_t c0, fq_dtype rnd);

/* ---- linear layers ------------------------------------------------------------ */

/* Scratch floats fq_nn_linear needs for a weight [n, k] and m rows of x with
 * compute dtype rnd (CPU: 0 when the weight and bias are f32; CUDA: the
 * 16-bit copy of x, widened operands and the cuBLASLt workspace), and
 * fq_nn_linear_q4 (it depends on the kernel the context's setting picks).
 * Both look at the weight's device. */
int64_t fq_nn_linear_scratch(fq_ctx *ctx, const fq_tensor *w, const fq_tensor *bias, int64_t m, fq_dtype rnd);
int64_t fq_nn_linear_q4_scratch(fq_ctx *ctx, const fq_qtensor *w, const fq_tensor *bias, int64_t m, fq_dtype rnd);
/* The same for an x of dtype xt and a y of dtype yt (the two above: f32 and
 * f32); bf16 activations of a bf16 model need no conversion space. */
int64_t fq_nn_linear_scratch_io(fq_ctx *ctx, const fq_tensor *w, const fq_tensor *bias, int64_t m, fq_dtype rnd,
                                fq_dtype xt, fq_dtype yt);
int64_t fq_nn_linear_q4_scratch_io(fq_ctx *ctx, const fq_qtensor *w, const fq_tensor *bias, int64_t m, fq_dtype rnd,
                                   fq_dtype xt, fq_dtype yt);

/* y[..., N] = rnd(x[..., K] · w[N,K]ᵀ + bias[N]) with f32 accumulation. w and
 * bias (may be NULL) in any float dtype; f16/bf16 values are widened exactly
 * into scratch (f32, at least fq_nn_linear_scratch floats; may be NULL when
 * that is 0). On CUDA a 16-bit weight of the compute dtype runs a 16-bit GEMM
 * (cuBLASLt, f32 accumulation, the bias in the f32 epilogue) on x rounded to
 * that dtype, which the forward's activations already are. */
fq_status fq_nn_linear(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *w, const fq_tensor *bias,
                       fq_tensor *y, fq_tensor *scratch, fq_dtype rnd);
/* The same with a 4-bit weight (every member of its state on y's device).
 * rnd = f32 runs the fused 4-bit kernels of fq_linear_4bit (fq_ctx_set_linear_kernel
 * applies); rnd = bf16/f16 dequantizes the weight rounded to that dtype and runs a
 * dense GEMM, as bitsandbytes does, so its outputs are reproduced exactly. On CUDA
 * at most 2 rows run the streaming GEMV instead, which enters the same rounded
 * weights without the dequantized copy (sums in another order;
 * FQ_LINEAR_DEQUANT_BLAS keeps the GEMM). */
fq_status fq_nn_linear_q4(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *w, const fq_tensor *bias,
                          fq_tensor *y, fq_tensor *scratch, fq_dtype rnd);
/* y[j] = fq_nn_linear_q4(x, w[j], bias[j]) for j < g (2..7; a bias[j] may be NULL):
 * the same results. On CUDA, where the weights share one shape, the y[j] are 16-bit
 * views at one stride from y[0] (q, k, v of one buffer), every bias[j] is given and
 * bias_cat holds them one after another ([g N], the compute dtype), the g GEMMs
 * run as one strided-batched cuBLASLt call on the g weights dequantized side by side
 * (3.5-4 % faster on FLUX's q, k, v on an H100, the same bits); otherwise, or with
 * bias_cat NULL, g calls. scratch: fq_nn_linear_q4_group_scratch floats. */
fq_status fq_nn_linear_q4_group(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *const *w,
                                const fq_tensor *const *bias, const fq_tensor *bias_cat, fq_tensor *const *y, int g,
                                fq_tensor *scratch, fq_dtype rnd);
int64_t fq_nn_linear_q4_group_scratch(fq_ctx *ctx, const fq_qtensor *w, const fq_tensor *bias, int g, int64_t m,
                                      fq_dtype rnd, fq_dtype xt, fq_dtype yt);
/* 1 where fq_nn_linear_q4_group can batch (a CUDA device, 16-bit compute). */
int fq_nn_linear_group_batched(fq_device dev, fq_dtype rnd);

/* out[..., c0 : c0 + N] = rnd(gelu_tanh(x · Wᵀ + b)) for a dense (w) or 4-bit
 * (qw) weight, exactly one given; out [B, S, W] of x's leading dims. GELU runs
 * in cuBLASLt's epilogue on the f32 result: one rounding fewer than
 * fq_nn_linear then fq_nn_gelu_tanh (which also round the linear's output
 * before GELU), so not their bits. Only where fq_nn_linear_gelu_fused says
 * so (CUDA, bf16/f16 compute with activations stored in it), for a 4-bit
 * weight or a dense weight and bias of the compute dtype; elsewhere
 * FQ_ERR_UNSUPPORTED. Scratch as for the linear with y of out's dtype. */
int fq_nn_linear_gelu_fused(fq_device dev, fq_dtype rnd);
fq_status fq_nn_linear_gelu_cols(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *w, const fq_qtensor *qw,
                                 const fq_tensor *bias, fq_tensor *out, int64_t c0, fq_tensor *scratch, fq_dtype rnd);

/* ---- normalization ------------------------------------------------------------ */

/* y = rnd(rnd(rnd(LN(x)) * rnd(1 + scale)) + shift), LN without affine over the
 * last dim. x, y: [B, S, D]; mod: [B, n*D]; shift/scale: chunk indices. */
fq_status fq_nn_adaln(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *mod, int shift_chunk,
                      int scale_chunk, float eps, fq_tensor *y, fq_dtype rnd);
/* h = rnd(h + rnd(gate * a)); h, a: [B, S, D]; gate: chunk of mod [B, n*D]. */
fq_status fq_nn_gated_add(fq_ctx *ctx, fq_tensor *h, const fq_tensor *mod, int gate_chunk,
                          const fq_tensor *a, fq_dtype rnd);
/* fq_nn_gated_add(h, mod, gate_chunk, a) then fq_nn_adaln(h, mod, shift_chunk,
 * scale_chunk, eps, y): the same bits, one pass over h on CUDA. y may be a. */
fq_status fq_nn_gated_add_adaln(fq_ctx *ctx, fq_tensor *h, const fq_tensor *mod, int gate_chunk, const fq_tensor *a,
                                int shift_chunk, int scale_chunk, float eps, fq_tensor *y, fq_dtype rnd);
/* The same with the gate from gmod and shift/scale from nmod (both [B, n*D],
 * possibly of different n): a block's last gated add fused with the next
 * block's AdaLN. */
fq_status fq_nn_gated_add_adaln2(fq_ctx *ctx, fq_tensor *h, const fq_tensor *gmod, int gate_chunk, const fq_tensor *a,
                                 const fq_tensor *nmod, int shift_chunk, int scale_chunk, float eps, fq_tensor *y,
                                 fq_dtype rnd);
/* RMSNorm of every head: x, y [..., H*dh], weight [dh] (any float dtype, widened on
 * the fly: it is tiny). */
fq_status fq_nn_rmsnorm_heads(fq_ctx *ctx, const fq_tensor *x, const fq_tensor *weight, float eps,
                              fq_tensor *y, fq_dtype rnd);

/* ---- positions, time, attention ------------------------------------------------ */

/* RoPE tables for ids [S, 3] (f32 positions): cos, sin [S, dh], dh = sum(axes). */
fq_status fq_nn_rope_table(fq_ctx *ctx, const fq_tensor *ids, const int64_t axes[3], double theta,
                           fq_tensor *cos_t, fq_tensor *sin_t);
/* Applies RoPE in place to x [B, S, H*dh] with tables [S, dh]. */
fq_status fq_nn_rope(fq_ctx *ctx, fq_tensor *x, const fq_tensor *cos_t, const fq_tensor *sin_t,
                     int64_t heads, fq_dtype rnd);
/* x = rope(rmsnorm_heads(x, weight)) in place, x [B, n, H*dh] holding the tokens
 * [t0, t0 + n) of the RoPE tables [S, dh]: fq_nn_rmsnorm_heads then fq_nn_rope
 * with the tables' rows t0.., the same results; one pass on CUDA (dh a
 * multiple of 32). weight NULL: RoPE alone. */
fq_status fq_nn_rmsnorm_rope(fq_ctx *ctx, fq_tensor *x, const fq_tensor *weight, float eps, const fq_tensor *cos_t,
                             const fq_tensor *sin_t, int64_t t0, int64_t heads, fq_dtype rnd);
/* One tensor of fq_nn_rmsnorm_rope_n: x (in place), its norm weight, its
 * first row t0 in the RoPE tables. */
typedef struct {
    fq_tensor *x;
    const fq_tensor *weight;
    int64_t t0;
} fq_nn_rope_part;
/* fq_nn_rmsnorm_rope on each of parts[0..n) (n <= 4 distinct tensors of one
 * device and dtype, the same tables and heads): the same bits; on CUDA one
 * launch for all (q and k of a block, both streams); the CPU runs the ops
 * one tensor after the other. */
fq_status fq_nn_rmsnorm_rope_n(fq_ctx *ctx, const fq_nn_rope_part *parts, int n, float eps, const fq_tensor *cos_t,
                               const fq_tensor *sin_t, int64_t heads, fq_dtype rnd);
/* Tests: the same with FQ_NN_ROPE_PREV: the CUDA kernels before the
 * one-launch one, a launch per tensor (FQ_NN_ROPE_AUTO: the default). */
enum { FQ_NN_ROPE_AUTO = 0, FQ_NN_ROPE_PREV = 1 };
fq_status fq_nn_rmsnorm_rope_n_impl(fq_ctx *ctx, const fq_nn_rope_part *parts, int n, float eps,
                                    const fq_tensor *cos_t, const fq_tensor *sin_t, int64_t heads, fq_dtype rnd,
                                    int impl);
/* Sinusoidal projection (flip_sin_to_cos, shift 0) of t [B] into out [B, 2*half]. */
fq_status fq_nn_timestep_proj(fq_ctx *ctx, const fq_tensor *t, fq_tensor *out);
/* Scratch floats fq_nn_attention needs on dev for q [batch, s, heads*dh]. */
int64_t fq_nn_attention_scratch(fq_device dev, int64_t batch, int64_t s, int64_t heads, int64_t dh, fq_dtype rnd);
/* The same for q, k, v of dtype xt (above: f32); bf16 activations with head
 * dim 128 and a multiple of 128 tokens are read in place and need none. */
int64_t fq_nn_attention_scratch_io(fq_device dev, int64_t batch, int64_t s, int64_t heads, int64_t dh, fq_dtype rnd,
                                   fq_dtype xt);
/* out = softmax(q·kᵀ/sqrt(dh))·v per batch and head; q, k, v, out: [B, S, H*dh].
 * CUDA: cuDNN's fused flash attention when the library has cuDNN, q, k, v, out
 * are stored in the compute dtype (bf16/f16) and the head dim is a multiple of
 * 8 up to 256; else our tensor-core kernel (bf16/f16 rounding, head dim <= 128),
 * else an f32 kernel (head dim <= 512). */
fq_status fq_nn_attention(fq_ctx *ctx, const fq_tensor *q, const fq_tensor *k, const fq_tensor *v,
                          int64_t heads, fq_tensor *out, fq_tensor *scratch, fq_dtype rnd);

/* Tests and benchmarks: attention with one CUDA implementation forced
 * (FQ_NN_ATTN_AUTO / _MMA / _SIMT / _MMA1, the values of fq_attn_impl in
 * kernels/cuda/nn_cuda.h; FQ_NN_ATTN_CUDNN: cuDNN's fused attention);
 * FQ_ERR_UNSUPPORTED if it cannot run the operands. On the CPU the argument
 * is ignored. */
enum { FQ_NN_ATTN_AUTO = 0, FQ_NN_ATTN_MMA = 1, FQ_NN_ATTN_SIMT = 2, FQ_NN_ATTN_MMA1 = 3, FQ_NN_ATTN_CUDNN = 4 };
/* Sets attention up on dev ahead of a forward and returns in *scratch the
 * scratch floats fq_nn_attention_impl(..., impl) then needs for q, k, v of
 * dtype xt: fq_nn_attention_scratch_io's, grown to hold cuDNN's workspace when
 * the cuDNN path runs. CUDA with cuDNN: the fused-attention plan of these sizes
 * is built now, so that the forward builds nothing. impl AUTO: sizes cuDNN has
 * no plan for are no error (our kernel runs them); FQ_NN_ATTN_CUDNN: they are. */
fq_status fq_nn_attention_plan(fq_ctx *ctx, fq_device dev, int64_t batch, int64_t s, int64_t heads, int64_t dh,
                               fq_dtype rnd, fq_dtype xt, int impl, int64_t *scratch);
int64_t fq_nn_attention_scratch_impl(fq_device dev, int64_t batch, int64_t s, int64_t heads, int64_t dh,
                                     fq_dtype rnd, int impl);
fq_status fq_nn_attention_impl(fq_ctx *ctx, const fq_tensor *q, const fq_tensor *k, const fq_tensor *v,
                               int64_t heads, fq_tensor *out, fq_tensor *scratch, fq_dtype rnd, int impl);

/* The attention written into columns [c0, c0 + H*dh) of out [B, S, W] (a
 * single block's cat: no copy of its output), where cuDNN runs it (CUDA,
 * automatic choice): elsewhere FQ_ERR_UNSUPPORTED without a message, and the
 * caller runs fq_nn_attention and copies. fq_nn_attention_plan_cols, like
 * fq_nn_attention_plan, builds its plan ahead and says FQ_ERR_UNSUPPORTED
 * (no message) where it would not run. */
fq_status fq_nn_attention_cols(fq_ctx *ctx, const fq_tensor *q, const fq_tensor *k, const fq_tensor *v,
                               int64_t heads, fq_tensor *out, int64_t c0, fq_tensor *scratch, fq_dtype rnd);
fq_status fq_nn_attention_plan_cols(fq_ctx *ctx, fq_device dev, int64_t batch, int64_t s, int64_t heads, int64_t dh,
                                    fq_dtype rnd, fq_dtype xt, int64_t width, int64_t *scratch);

/* ---- devices, random values, timing --------------------------------------------- */

/* Sets up what the ops need on dev before a forward runs there (CUDA: the
 * cuBLASLt handle, kernel attributes), so that the forward itself creates
 * nothing. A no-op on the CPU. Plans call it. */
fq_status fq_nn_prepare(fq_ctx *ctx, fq_device dev);
/* Waits until every op queued on dev has finished; reports a kernel's failure. */
fq_status fq_nn_sync(fq_ctx *ctx, fq_device dev);
/* A CUDA graph of the ops queued on dev between fq_nn_graph_begin and
 * fq_nn_graph_end (stream capture: no op may wait for the device or allocate
 * meanwhile, so run the ops once before, e.g. a warm-up forward), replayed by
 * fq_nn_graph_launch on the same buffers: one launch instead of one per kernel.
 * An op's error during the capture is returned by that op; end the capture
 * anyway (fq_nn_graph_end then fails too). FQ_ERR_UNSUPPORTED on the CPU.
 * *out owned by the caller (fq_nn_graph_free). */
typedef struct fq_nn_graph fq_nn_graph;
fq_status fq_nn_graph_begin(fq_ctx *ctx, fq_device dev);
fq_status fq_nn_graph_end(fq_ctx *ctx, fq_device dev, fq_nn_graph **out);
fq_status fq_nn_graph_launch(fq_ctx *ctx, fq_nn_graph *g);
void fq_nn_graph_free(fq_nn_graph *g);
/* "NVIDIA H100 80GB HBM3, 132 SMs, sm_90" for a CUDA device, "cpu" for the CPU. */
fq_status fq_nn_device_describe(fq_ctx *ctx, fq_device dev, char *buf, size_t n);
/* Free and total memory of dev as the driver sees it (CUDA); 0, 0 for the CPU. */
fq_status fq_nn_device_memory(fq_ctx *ctx, fq_device dev, size_t *free_bytes, size_t *total_bytes);

/* t[i] = dtype(fq_nn_hash_uniform(seed, i) * scale + shift) for a float tensor
 * t (f32/f16/bf16) on any device; the same values on every device. */
fq_status fq_nn_random(fq_ctx *ctx, fq_tensor *t, uint64_t seed, float scale, float shift);

/* Op timing on one CUDA device: with a profiler started, every op that runs on
 * that device records a CUDA event after its work, and fq_nn_prof_stop adds
 * the time between consecutive events to the op's class. Events are created
 * up front (fq_nn_prof_create); timing perturbs the run a little. */
typedef enum { FQ_NN_CLASS_LINEAR = 0, FQ_NN_CLASS_ATTENTION, FQ_NN_CLASS_OTHER, FQ_NN_CLASSES } fq_nn_class;
typedef struct fq_nn_prof fq_nn_prof;
/* *out: a profiler for up to `events` ops on dev (caller frees with fq_nn_prof_free). */
fq_status fq_nn_prof_create(fq_ctx *ctx, fq_device dev, int events, fq_nn_prof **out);
fq_status fq_nn_prof_start(fq_ctx *ctx, fq_nn_prof *p);
/* Waits for the device; ms[c] and ops[c] receive the time and op count per class.
 * FQ_ERR_INVALID_ARG if more ops ran than the profiler had events for. */
fq_status fq_nn_prof_stop(fq_ctx *ctx, fq_nn_prof *p, double ms[FQ_NN_CLASSES], int64_t ops[FQ_NN_CLASSES]);
/* After fq_nn_prof_stop: the time and count per op name (the op of each
 * event, e.g. "linear", "adaln"), at most cap names; returns how many. */
int fq_nn_prof_ops(const fq_nn_prof *p, int cap, const char **names, double *ms, int64_t *count);
void fq_nn_prof_free(fq_nn_prof *p);

#endif

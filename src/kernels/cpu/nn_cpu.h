/* CPU kernels of the transformer building blocks (norms, RoPE, attention,
 * activations, modulation, dense linear). The ops layer (src/ops/nn_ops.c)
 * checks placement, dtypes and shapes and then calls these with raw host
 * pointers. Kernels never allocate, never print and know no files.
 *
 * Activations are f32 in memory. `rnd` names the dtype whose rounding an op
 * reproduces at each point where PyTorch would store a tensor of that dtype:
 * FQ_F32 computes plain f32; FQ_BF16 / FQ_F16 round intermediate results the
 * way a bf16/f16 PyTorch model does (values computed in f32, then rounded to
 * nearest-even), so that a bf16 model's output can be compared with
 * diffusers' bf16 run. */
#ifndef FQ_NN_CPU_H
#define FQ_NN_CPU_H

#include "core/core.h"

#include <stdint.h>
#include <string.h>

/* ---- scalar conversions (round to nearest even; NaN stays NaN) ---------- */

static inline float fq_bf16_bits_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t fq_f32_to_bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float fq_f16_bits_to_f32(uint16_t h);
uint16_t fq_f32_to_f16_bits(float f);

/* The value of x after a round trip through dtype rnd (f32: x itself). */
static inline float fq_round_to(float x, fq_dtype rnd) {
    if (rnd == FQ_BF16) return fq_bf16_bits_to_f32(fq_f32_to_bf16_bits(x));
    if (rnd == FQ_F16) return fq_f16_bits_to_f32(fq_f32_to_f16_bits(x));
    return x;
}

/* ---- conversions over arrays --------------------------------------------- */

/* dst[i] = src[i] as f32, src of dtype f32/f16/bf16 (dst may alias src only for f32). */
void fq_cpu_to_f32(const void *src, fq_dtype dtype, int64_t n, float *dst);
/* Rounds x[0..n) in place through dtype rnd (nothing for f32). */
void fq_cpu_round(float *x, int64_t n, fq_dtype rnd);
/* y = rnd(x * alpha) elementwise (in place allowed). */
void fq_cpu_scale(const float *x, float alpha, float *y, int64_t n, fq_dtype rnd);
/* y = rnd(a + b) elementwise (in place allowed). */
void fq_cpu_add(const float *a, const float *b, float *y, int64_t n, fq_dtype rnd);
/* x = min(max(x, lo), hi) in place; NaN stays NaN (as torch.clamp). */
void fq_cpu_clamp(float *x, int64_t n, float lo, float hi);
/* y = rnd(silu(x)) and y = rnd(gelu_tanh(x)), computed in f32. */
void fq_cpu_silu(const float *x, float *y, int64_t n, fq_dtype rnd);
void fq_cpu_gelu_tanh(const float *x, float *y, int64_t n, fq_dtype rnd);

/* ---- linear ---------------------------------------------------------------- */

/* y[M,N] = rnd(x[M,K] · w[N,K]ᵀ + b[N]) with OpenBLAS sgemm (f32 accumulate).
 * b may be NULL. y must not alias x or w. */
void fq_cpu_linear(int64_t m, int64_t n, int64_t k, const float *x, const float *w, const float *b,
                   float *y, fq_dtype rnd);

/* ---- normalization and modulation ------------------------------------------ */

/* Affine-free LayerNorm over the last dim d, then AdaLN modulation, with the
 * roundings of the PyTorch expression `LN(x) * (1 + scale) + shift`:
 *   n = rnd(LN(x)); y = rnd(rnd(n * rnd(1 + scale)) + shift)
 * x, y: [batch, rows, d]; shift/scale: row b at ptr + b*mod_stride. Mean and
 * variance are accumulated in f64. In place allowed. */
void fq_cpu_adaln(const float *x, float *y, int64_t batch, int64_t rows, int64_t d, const float *shift,
                  const float *scale, int64_t mod_stride, float eps, fq_dtype rnd);

/* RMSNorm over groups of d (one head) with weight w[d]: y = rnd(x * rsqrt(mean(x²)+eps) * w).
 * x, y: [groups, d]; in place allowed. */
void fq_cpu_rmsnorm(const float *x, const float *w, float *y, int64_t groups, int64_t d, float eps,
                    fq_dtype rnd);

/* h[b,s,:] = rnd(h[b,s,:] + rnd(gate[b,:] * a[b,s,:])); gate row b at gate + b*mod_stride. */
void fq_cpu_gated_add(float *h, const float *gate, int64_t mod_stride, const float *a, int64_t batch,
                      int64_t rows, int64_t d, fq_dtype rnd);

/* ---- positional embedding --------------------------------------------------- */

/* diffusers' FluxPosEmbed: for each axis a (width axes[a], summing to dh), positions
 * ids[s*3+a], frequencies 1/theta^(2j/axes[a]) and angles in f64, cos/sin cast to
 * f32 and repeated for the two members of each pair. cos, sin: [seq, dh]. */
void fq_cpu_rope_table(const float *ids, int64_t seq, const int64_t axes[3], double theta, float *cos_t,
                       float *sin_t, int64_t dh);
/* Rotates pairs (x[2i], x[2i+1]) of every head in place:
 *   x'[2i] = x[2i]·cos - x[2i+1]·sin, x'[2i+1] = x[2i+1]·cos + x[2i]·sin (f32, then rnd).
 * x: [batch, seq, heads*dh]; cos, sin: [seq, dh]. */
void fq_cpu_rope(float *x, const float *cos_t, const float *sin_t, int64_t batch, int64_t seq,
                 int64_t heads, int64_t dh, fq_dtype rnd);

/* Sinusoidal timestep projection with flip_sin_to_cos and no frequency shift:
 * out[b] = [cos(t_b·f_j)..., sin(t_b·f_j)...], f_j = exp(-ln(10000)·j/half), all in f32
 * in the order PyTorch evaluates it. out: [batch, 2*half]. */
void fq_cpu_timestep_proj(const float *t, int64_t batch, int64_t half, float *out);

/* ---- attention --------------------------------------------------------------- */

/* Rows of scores the attention kernel processes at once (scratch planning). */
#define FQ_CPU_ATTN_QBLOCK 256
/* Scratch floats fq_cpu_attention needs for a sequence of length seq. */
int64_t fq_cpu_attention_scratch(int64_t seq);
/* out = softmax(q·kᵀ/sqrt(dh))·v per batch and head, no mask. q, k, v, out:
 * [batch, seq, heads*dh] (heads interleaved in the last dim, as the projections
 * produce them). With rnd = bf16/f16 the probabilities are rounded before the
 * product with v and the output after normalization (as fused attention kernels
 * do). scratch: fq_cpu_attention_scratch(seq) floats. */
void fq_cpu_attention(const float *q, const float *k, const float *v, float *out, int64_t batch,
                      int64_t seq, int64_t heads, int64_t dh, float *scratch, fq_dtype rnd);

#endif

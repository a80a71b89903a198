/* CUDA kernels of the transformer building blocks: the GPU side of
 * src/kernels/cpu/nn_cpu.h, with the same contracts and the same rounding
 * points, so that a forward on cuda:N reproduces the CPU forward.
 *
 * One file per op family:
 *   nn_elementwise.cu  cast, scale, add, silu, gelu-tanh, clamp, gated residual
 *                      add, rounding, dtype conversion, row fill, random fill
 *   nn_norm.cu         AdaLN (affine-free LayerNorm + modulation), per-head RMSNorm
 *   nn_rope.cu         RoPE tables and rotation, sinusoidal timestep projection
 *   nn_attention.cu    attention: a flash-attention kernel on tensor cores
 *                      (mma.sync m16n8k16 bf16/f16, online softmax, f32
 *                      accumulation; head dims up to 128, fast path at 128) and
 *                      an f32 SIMT kernel (f32 compute, and larger head dims)
 *
 * Conventions (as the other CUDA launchers, see kernels.h): every launcher runs
 * on the current device (the caller holds the guard of the data's device), on
 * the stream it is given; it never allocates, never synchronizes and returns a
 * cudaError_t as int (0 = success; the launch error otherwise). Sizes and
 * indices are 64-bit. Activations are f32 in memory, or bf16 where a launcher
 * takes an activation dtype `xt` (FQ_F32 or FQ_BF16; bf16 storage holds values
 * already rounded to bf16, so it changes no result, only the bytes moved); `rnd` (FQ_F32 / FQ_BF16 /
 * FQ_F16) names the dtype whose rounding the kernel reproduces, exactly where
 * the CPU kernel applies fq_round_to. Products and sums whose rounding the CPU
 * code fixes are written with explicit round-to-nearest intrinsics, so that no
 * fused multiply-add changes a result. */
#ifndef FQ_NN_CUDA_H
#define FQ_NN_CUDA_H

#include "fluxq.h"

#include <stdint.h>

/* ---- the random values of fq_nn_random (host and device alike) ------------------ */

#ifdef __CUDACC__
#define FQ_NN_HD __host__ __device__
#else
#define FQ_NN_HD
#endif

/* A value uniform in [-1, 1) with 24 bits, from (seed, i) only: splitmix64 of
 * seed + i * golden ratio, top 24 bits. Exact in f32; identical on CPU and GPU. */
static inline FQ_NN_HD float fq_nn_hash_uniform(uint64_t seed, uint64_t i) {
    uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float)(int32_t)(z >> 40) * (1.0f / 8388608.0f) - 1.0f;
}

#ifdef FQ_HAVE_CUDA
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- elementwise (nn_elementwise.cu); n elements, in place allowed ------------------ */

/* y = rnd(x), x of dtype xt (f32/f16/bf16/f64). */
int fq_cuda_nn_cast(const void *x, fq_dtype xt, void *y, fq_dtype yt, int64_t n, fq_dtype rnd, cudaStream_t st);
/* y = rnd(x * alpha) */
int fq_cuda_nn_scale(const float *x, float alpha, float *y, int64_t n, fq_dtype rnd, cudaStream_t st);
/* y = rnd(a + b) */
int fq_cuda_nn_add(const float *a, const float *b, float *y, int64_t n, fq_dtype rnd, cudaStream_t st);
/* y = rnd(silu(x)), y = rnd(gelu_tanh(x)) (PyTorch's formula and order, f32) */
int fq_cuda_nn_silu(const void *x, void *y, fq_dtype xt, int64_t n, fq_dtype rnd, cudaStream_t st);
int fq_cuda_nn_gelu_tanh(const void *x, void *y, fq_dtype xt, int64_t n, fq_dtype rnd, cudaStream_t st);
/* The same over [rows, cols] views with row strides ldx, ldy (elements): writes
 * one side of a concatenation along the last dim in place. */
int fq_cuda_nn_gelu_tanh_rows(const void *x, int64_t ldx, void *y, int64_t ldy, fq_dtype xt, int64_t rows,
                              int64_t cols, fq_dtype rnd, cudaStream_t st);
/* dst rows (dpitch bytes apart) = src rows (spitch apart), width bytes each, in
 * 16-byte copies; -1 (nothing queued) unless every pointer and size is a
 * multiple of 16 bytes. */
int fq_cuda_nn_copy_rows(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, int64_t rows,
                         cudaStream_t st);
/* x = min(max(x, lo), hi); NaN stays NaN */
int fq_cuda_nn_clamp(float *x, int64_t n, float lo, float hi, cudaStream_t st);
/* x = rnd(x) */
int fq_cuda_nn_round(float *x, int64_t n, fq_dtype rnd, cudaStream_t st);
/* h[b,r,:] = rnd(h[b,r,:] + rnd(gate[b*mod_stride + :] * a[b,r,:])), h/a [batch, rows, d] */
int fq_cuda_nn_gated_add(void *h, const float *gate, int64_t mod_stride, const void *a, fq_dtype xt, int64_t batch,
                         int64_t rows, int64_t d, fq_dtype rnd, cudaStream_t st);
/* y (yt) = x (xt) for f32/f16/bf16, rounding to nearest even when narrowing. */
int fq_cuda_nn_convert(const void *x, fq_dtype xt, void *y, fq_dtype yt, int64_t n, cudaStream_t st);
/* whole [rows, ia + ib bytes] = cat(a [rows, ia], b [rows, ib]) along the row, or
 * its inverse (split); -1 (nothing queued) unless every pointer and size is a
 * multiple of 16 bytes. */
int fq_cuda_nn_cat_rows(void *whole, void *a, void *b, size_t ia, size_t ib, int64_t rows, int split,
                        cudaStream_t st);
/* y[r, :] = row[:] (f32) for r < rows, or 0 when row is NULL. y: [rows, n]. */
int fq_cuda_nn_fill_rows(float *y, const float *row, int64_t rows, int64_t n, cudaStream_t st);
/* y[i] = dtype(fq_nn_hash_uniform(seed, i) * scale + shift) (f32 products and sums,
 * then one rounding to the dtype: f32/f16/bf16). */
int fq_cuda_nn_random(void *y, fq_dtype t, int64_t n, uint64_t seed, float scale, float shift,
                      cudaStream_t st);

/* ---- norms (nn_norm.cu) ---------------------------------------------------------------- */

/* fq_cpu_adaln on the GPU: x, y [batch, rows, d] (in place allowed); shift/scale
 * row b at ptr + b*mod_stride. Mean and variance in f64, as on the CPU. */
int fq_cuda_nn_adaln(const void *x, void *y, fq_dtype xt, int64_t batch, int64_t rows, int64_t d, const float *shift,
                     const float *scale, int64_t mod_stride, float eps, fq_dtype rnd, cudaStream_t st);
/* fq_cuda_nn_gated_add (h, gate, a) then fq_cuda_nn_adaln (x = h, y) in one
 * pass over h when the rows fit one warp (d a multiple of 8 up to 4096,
 * 16-byte aligned), else the two kernels; the same bits either way. y may be a. */
int fq_cuda_nn_gated_add_adaln(void *h, const void *a, const float *gate, void *y, fq_dtype xt, int64_t batch,
                               int64_t rows, int64_t d, const float *shift, const float *scale, int64_t mod_stride,
                               float eps, fq_dtype rnd, cudaStream_t st);
/* fq_cpu_rmsnorm: x, y [groups, d] (in place allowed); w [d] of dtype wt (f32/f16/bf16). */
int fq_cuda_nn_rmsnorm(const void *x, const void *w, fq_dtype wt, void *y, fq_dtype xt, int64_t groups, int64_t d,
                       float eps, fq_dtype rnd, cudaStream_t st);

/* fq_cuda_nn_rmsnorm then fq_cuda_nn_rope in one pass, in place (the same bits):
 * x [batch, n, heads*d] of dtype xt whose tokens use rows t0.. of cos, sin [*, d];
 * d a multiple of 32. */
int fq_cuda_nn_rmsnorm_rope(void *x, fq_dtype xt, const void *w, fq_dtype wt, const float *cos_t, const float *sin_t,
                            int64_t batch, int64_t n, int64_t heads, int64_t t0, int64_t d, float eps, fq_dtype rnd,
                            cudaStream_t st);
/* One tensor of fq_cuda_nn_rmsnorm_rope_n: x [batch, n, heads*d] (in place)
 * normed with w [d] of dtype wt, its tokens on rows t0.. of the tables. */
typedef struct {
    void *x;
    const void *w;
    fq_dtype wt;
    int64_t batch, n, t0;
} fq_cuda_rope_part;
#define FQ_CUDA_ROPE_PARTS 4
/* fq_cuda_nn_rmsnorm_rope on each of np <= FQ_CUDA_ROPE_PARTS distinct
 * tensors of dtype xt with the same tables, heads and d: the same bits, one
 * launch at d = 128 (q and k of a block, both streams). impl 1: the kernels
 * before the one-launch one, a launch per part (tests; FQ_RMSNORM_ROPE=v
 * picks them too). */
int fq_cuda_nn_rmsnorm_rope_n(const fq_cuda_rope_part *parts, int np, fq_dtype xt, const float *cos_t,
                              const float *sin_t, int64_t heads, int64_t d, float eps, fq_dtype rnd, int impl,
                              cudaStream_t st);

/* ---- positions and time (nn_rope.cu) --------------------------------------------------- */

/* fq_cpu_rope_table: ids [seq, 3] f32; cos, sin [seq, dh]; angles in f64. */
int fq_cuda_nn_rope_table(const float *ids, int64_t seq, const int64_t axes[3], double theta, float *cos_t,
                          float *sin_t, int64_t dh, cudaStream_t st);
/* fq_cpu_rope: x [batch, seq, heads*dh] in place; cos, sin [seq, dh]. */
int fq_cuda_nn_rope(void *x, fq_dtype xt, const float *cos_t, const float *sin_t, int64_t batch, int64_t seq,
                    int64_t heads, int64_t dh, fq_dtype rnd, cudaStream_t st);
/* fq_cpu_timestep_proj; neg_log = (float)(-ln 10000) computed by the caller. */
int fq_cuda_nn_timestep_proj(const float *t, int64_t batch, int64_t half, float neg_log, float *out,
                             cudaStream_t st);

/* ---- attention (nn_attention.cu) -------------------------------------------------------- */

/* Which kernel fq_cuda_nn_attention runs. */
typedef enum {
    FQ_ATTN_AUTO = 0,
    FQ_ATTN_MMA,  /* tensor cores: rnd bf16/f16 and head dim <= 128                */
    FQ_ATTN_SIMT, /* f32 CUDA cores: any rnd, head dim <= FQ_ATTN_SIMT_MAX_DH      */
    FQ_ATTN_MMA1  /* as MMA, with one query m-tile per warp at head dim 128 too    */
                  /* (the kernel before the two-m-tile one; for comparisons)      */
} fq_attn_impl;

#define FQ_ATTN_MMA_MAX_DH 128
#define FQ_ATTN_SIMT_MAX_DH 512

/* The implementation AUTO picks (FQ_ATTN_MMA for bf16/f16 with dh <= 128, else
 * FQ_ATTN_SIMT), and whether `impl` can run these operands at all. */
fq_attn_impl fq_cuda_nn_attention_pick(int64_t dh, fq_dtype rnd, fq_attn_impl impl);
int fq_cuda_nn_attention_supported(int64_t dh, fq_dtype rnd, fq_attn_impl impl);
/* Scratch bytes the kernel needs (the MMA kernel packs q, k, v as 16-bit
 * [batch*heads, seq rounded up to 128, head dim rounded up to 16..128]). */
size_t fq_cuda_nn_attention_scratch_bytes(int64_t batch, int64_t seq, int64_t heads, int64_t dh, fq_dtype rnd,
                                          fq_attn_impl impl, fq_dtype xt);
/* Raises the dynamic shared-memory limit of every attention kernel on the
 * CURRENT device. Call once per device before the first launch there. */
int fq_cuda_nn_attention_prepare(void);
/* out = softmax(q·kᵀ/sqrt(dh))·v per batch and head (no mask), with the CPU
 * kernel's rounding points: P rounded to rnd before P·V (row sums of the
 * unrounded values), the output rounded after normalization. q, k, v, out:
 * [batch, seq, heads*dh] f32. scratch: 256-byte aligned, at least
 * fq_cuda_nn_attention_scratch_bytes. */
int fq_cuda_nn_attention(const void *q, const void *k, const void *v, void *out, fq_dtype xt, int64_t batch,
                         int64_t seq, int64_t heads, int64_t dh, void *scratch, size_t scratch_bytes, fq_dtype rnd,
                         fq_attn_impl impl, cudaStream_t st);

#ifdef __cplusplus
}
#endif
#endif /* FQ_HAVE_CUDA */

#endif

/* Shared internals of the CPU 4-bit linear kernels (linear4_cpu*.c only).
 *
 * The "slot" layout. The SIMD decoders expand 16 packed bytes (32 weights)
 * into the 16 high nibbles (elements 0, 2, ..., 30) and the 16 low nibbles
 * (elements 1, 3, ..., 31) with one table permute each. Re-interleaving them
 * would cost two more shuffles per 32 weights, so instead every fast path
 * stores x with the same permutation of k inside each 32-wide chunk: a dot
 * product does not care about the order of its terms. K is padded to a
 * multiple of 32 with zeros in x (and in decoded weights). */
#ifndef FQ_LINEAR4_CPU_IMPL_H
#define FQ_LINEAR4_CPU_IMPL_H

#include "formats/formats.h"
#include "kernels/cpu/linear4_cpu.h"

#include <string.h>

enum {
    FQ_L4_CHUNK = 32,  /* weights per SIMD decode step (16 packed bytes)          */
    FQ_L4_KC = 256,    /* k-extent of one GEMM tile (and stride of a decoded tile) */
    FQ_L4_GEMV_R = 8,  /* rows of x one GEMV pass multiplies (bounded by registers) */
    FQ_L4_MT = 128,    /* x rows of one GEMM task (a multiple of every NR)         */
    FQ_L4_AM_RUN = 256,     /* blocks whose nested absmax the GEMV rebuilds at a time   */
    FQ_L4_PREFETCH = 2048   /* bytes ahead the GEMV prefetches packed weights (tuned here) */
};

static inline int64_t fq_l4_pad(int64_t k) { return (k + FQ_L4_CHUNK - 1) / FQ_L4_CHUNK * FQ_L4_CHUNK; }

/* Position of element k of a row in the slot layout. */
static inline int64_t fq_l4_slot(int64_t k) {
    int64_t j = k & (FQ_L4_CHUNK - 1);
    return (k - j) + ((j & 1) ? FQ_L4_CHUNK / 2 + (j >> 1) : (j >> 1));
}

static inline int fq_l4_log2(int64_t v) {
    int l = 0;
    while (((int64_t)1 << l) < v) l++;
    return l;
}

/* The 16-entry code as f32 (FP4: the file table; its +0.0 vs -0.0 at index 8
 * cannot change a sum of products). */
static inline void fq_l4_lut(fq_quant_type t, float lut[16]) {
    memcpy(lut, t == FQ_QUANT_FP4 ? FQ_FP4_BITS : FQ_NF4_BITS, 16 * sizeof(float));
}

/* absmax of block b in f32, reconstructed from the 8-bit state when nested:
 * code256[q] * nested_absmax[b / 256] + offset, each step rounded to f32 as
 * bitsandbytes' dequantize does. */
static inline float fq_l4_absmax(const fq_w4_view *w, int64_t b) {
    if (!w->nested) return w->absmax[b];
    return w->nested_code[w->qabsmax[b]] * w->nested_absmax[b >> 8] + w->offset;
}

/* ---- element conversions (scalar; bit-exact round-to-nearest-even) ---- */

static inline float fq_l4_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float fq_l4_f16_to_f32(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) {
        float v = (float)m * 0x1p-24f; /* zero or subnormal: exact in f32 */
        memcpy(&u, &v, 4);
        u |= s;
    } else if (e == 31) {
        u = s | 0x7f800000u | (m << 13);
    } else {
        u = s | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t fq_l4_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

static inline uint16_t fq_l4_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t s = (u >> 16) & 0x8000, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(s | 0x7e00);      /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(s | 0x7c00);     /* rounds past 65504: inf */
    if (a < 0x38800000u) {                                   /* f16 subnormal or zero */
        int sh = 126 - (int)(a >> 23);                       /* >= 14 */
        if (sh > 24) return (uint16_t)s;
        uint32_t m = (a & 0x7fffffu) | 0x800000u, r = m >> sh, rem = m & ((1u << sh) - 1), half = 1u << (sh - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(s | r);
    }
    uint32_t t = a - (112u << 23), h = t >> 13, rem = t & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(s | h);
}

static inline float fq_l4_load(const void *p, fq_dtype t, int64_t i) {
    switch (t) {
    case FQ_F16: return fq_l4_f16_to_f32(((const uint16_t *)p)[i]);
    case FQ_BF16: return fq_l4_bf16_to_f32(((const uint16_t *)p)[i]);
    case FQ_F64: return (float)((const double *)p)[i];
    default: return ((const float *)p)[i];
    }
}

static inline void fq_l4_store(void *p, fq_dtype t, int64_t i, float v) {
    switch (t) {
    case FQ_F16: ((uint16_t *)p)[i] = fq_l4_f32_to_f16(v); break;
    case FQ_BF16: ((uint16_t *)p)[i] = fq_l4_f32_to_bf16(v); break;
    default: ((float *)p)[i] = v; break;
    }
}

static inline float fq_l4_bias(const fq_cpu_linear4_args *a, int64_t n) {
    return a->bias ? fq_l4_load(a->bias, a->bias_dtype, n) : 0.0f;
}

/* ---- per-ISA pieces (linear4_cpu_avx2.c, linear4_cpu_avx512.c) ---- */

typedef struct {
    int mr, nr; /* GEMM micro-tile: mr weight rows x nr rows of x */
    /* out[i * r + j] += sum over slots [k0, k1) of weight row n0 + i times x
     * row j, for i < n1 - n0, j < r (1 <= r <= FQ_L4_GEMV_R); xd: r rows in
     * slot layout, stride ldx floats. Requires K % 32 == 0, k0 and k1
     * multiples of 32 and, when K % blocksize == 0, of the blocksize (or K). */
    void (*gemv)(const fq_w4_view *w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, const float *xd, int64_t ldx,
                 int r, float *out);
    /* dst[0 .. kc) = slots [k0, k0 + kc) of dequantized weight row n.
     * Requires K % 32 == 0, k0 % 32 == 0, kc % 32 == 0. */
    void (*decode)(const fq_w4_view *w, int64_t n, int64_t k0, int64_t kc, float *dst);
    /* c[i * ldc + j] += sum_k wp[i * FQ_L4_KC + k] * xp[k * nr + j], i < mr, j < nr. */
    void (*ukr)(int64_t kc, const float *wp, const float *xp, float *c, int64_t ldc);
} fq_l4_isa_ops;

const fq_l4_isa_ops *fq_l4_ops_avx2(void);
const fq_l4_isa_ops *fq_l4_ops_avx512(void);

/* fn(arg, i) for i in [0, n): over the context's threads, or inline on the
 * caller's thread when `parallel` is 0. fq_parallel_for starts its threads
 * on every call (about 40 us here), more than a small layer takes alone. */
static inline void fq_l4_run(fq_ctx *ctx, int64_t n, void (*fn)(void *, int64_t), void *arg, int parallel) {
    if (parallel) fq_parallel_for(ctx, n, fn, arg);
    else
        for (int64_t i = 0; i < n; i++) fn(arg, i);
}

/* Scalar decode of slots [k0, k0 + kc) of row n (any K; slots past K are 0). */
void fq_l4_decode_scalar(const fq_w4_view *w, int64_t n, int64_t k0, int64_t kc, float *dst);

/* Kernels over all ISAs (linear4_cpu_gemm.c, linear4_cpu_blas.c). */
size_t fq_l4_gemm_scratch(const fq_l4_isa_ops *ops, const fq_cpu_linear4_args *a);
void fq_l4_gemm(fq_ctx *ctx, const fq_l4_isa_ops *ops, const fq_cpu_linear4_args *a, void *scratch);
size_t fq_l4_blas_scratch(const fq_cpu_linear4_args *a);
void fq_l4_blas(fq_ctx *ctx, const fq_l4_isa_ops *ops, const fq_cpu_linear4_args *a, void *scratch);

/* Converts rows [m0, m1) of x into slot layout: dst[(m - m0) * kp + slot(k)],
 * zero padding up to kp = fq_l4_pad(K). */
void fq_l4_pack_x_rows(const fq_cpu_linear4_args *a, int64_t m0, int64_t m1, float *dst);

#endif

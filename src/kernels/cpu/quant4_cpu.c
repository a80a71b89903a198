/* CPU 4-bit (NF4/FP4) blockwise quantize and dequantize, byte-identical to
 * bitsandbytes' CUDA kernels (docs/bnb-exactness.md says why each step is so).
 *
 * The GPU build runs with --use_fast_math, so every float step below is done
 * the way the GPU does it, spelled out in bits rather than left to compiler
 * flags: subnormals are flushed to zero (ftz) on every input and product, the
 * reciprocal is the H100's rcp.approx (fq_rcp_approx), and results are
 * rounded to f16/bf16 by explicit round-to-nearest-even. */
#include "kernels/kernels.h"
#include "formats/formats.h"

#include <float.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && !defined(__STRICT_ANSI__)
#error "build in ISO C mode (-std=c11): GCC then keeps float expressions unfused (-ffp-contract=off)"
#endif
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Flush a subnormal to a zero of the same sign (what .ftz does to operands and results). */
static inline float ftz(float f) {
    uint32_t u = f2u(f);
    return (u & 0x7f800000u) ? f : u2f(u & 0x80000000u);
}

/* f16 bits -> f32, exact (f16 subnormals are normal in f32). */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, ex = (h >> 10) & 0x1f, m = h & 0x3ffu;
    if (ex == 0x1f) return u2f(sign | 0x7f800000u | (m << 13));
    if (ex == 0) {
        if (!m) return u2f(sign);
        int e = -1; /* normalize: shift until the hidden bit appears */
        do { m <<= 1; e++; } while (!(m & 0x400u));
        return u2f(sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3ffu) << 13));
    }
    return u2f(sign | ((ex + 112) << 23) | (m << 13));
}

/* f32 -> f16 bits, round to nearest even; NaN -> 0x7fff as the GPU writes it. */
static inline uint16_t f32_to_f16(float f) {
    uint32_t u = f2u(f), sign = (u >> 16) & 0x8000u, ex = (u >> 23) & 0xff, m = u & 0x7fffffu;
    if (ex == 0xff) return m ? 0x7fff : (uint16_t)(sign | 0x7c00u);
    int32_t e = (int32_t)ex - 112; /* f16 biased exponent */
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    if (e < -10) return (uint16_t)sign; /* below half the smallest subnormal */
    /* Normal: exponent and mantissa side by side, so a rounding carry bumps the
     * exponent (up to inf) by itself. Subnormal: the hidden bit shifted in. */
    uint32_t mant = e > 0 ? ((uint32_t)e << 23) | m : m | 0x800000u;
    uint32_t shift = e > 0 ? 13u : (uint32_t)(14 - e);
    uint32_t r = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) r++;
    return (uint16_t)(sign | r);
}

/* f32 -> bf16 bits, round to nearest even; NaN -> 0x7fff. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* dQuantizeNF4: the number of thresholds strictly below p (a NaN gives 0),
 * found with four comparisons as bitsandbytes' decision tree does. */
static inline unsigned nf4_code(float p, const float t[16]) {
    unsigned c = p > t[7] ? 8u : 0u;
    c += p > t[c + 3] ? 4u : 0u;
    c += p > t[c + 1] ? 2u : 0u;
    c += p > t[c] ? 1u : 0u;
    return c;
}

/* dQuantizeFP4: sign bit for p < 0, then the magnitude tree (strict >, NaN -> 0). */
static inline unsigned fp4_code(float p) {
    unsigned sign = p < 0.0f ? 8u : 0u;
    float a = u2f(f2u(p) & 0x7fffffffu);
    unsigned c;
    if (a > FQ_FP4_T_ROOT)
        c = a > FQ_FP4_T_HI ? (a > FQ_FP4_T_HI_HI ? 3u : 2u) : (a > FQ_FP4_T_HI_LO ? 5u : 4u);
    else
        c = a > FQ_FP4_T_LO ? (a > FQ_FP4_T_LO_HI ? 7u : 6u) : (a > FQ_FP4_T_LO_LO ? 1u : 0u);
    return c + sign;
}

typedef struct {
    const void *x;
    fq_dtype dtype;
    int64_t n, bs, blocks_per_task, nblocks;
    fq_quant_type qt;
    uint8_t *packed;
    float *absmax;
    float thr[16]; /* NF4 thresholds, thr[15] = +inf so the search never runs off */
} q4_job;

/* Block values as f32, flushed to zero (the kernel's ftz on every operand). */
static void load_block(const q4_job *j, int64_t start, int64_t len, float *v) {
    if (j->dtype == FQ_F32) {
        const float *x = (const float *)j->x + start;
        for (int64_t i = 0; i < len; i++) v[i] = ftz(x[i]);
    } else if (j->dtype == FQ_BF16) {
        const uint16_t *x = (const uint16_t *)j->x + start;
        for (int64_t i = 0; i < len; i++) v[i] = ftz(u2f((uint32_t)x[i] << 16));
    } else {
        const uint16_t *x = (const uint16_t *)j->x + start; /* f16 is never subnormal in f32 */
        for (int64_t i = 0; i < len; i++) v[i] = f16_to_f32(x[i]);
    }
}

static void quantize_block(const q4_job *j, int64_t b, float *v) {
    int64_t start = b * j->bs, len = j->n - start < j->bs ? j->n - start : j->bs;
    load_block(j, start, len, v);
    if (len & 1) v[len] = 0.0f; /* the kernel pads the last byte with 0.0 */
    /* absmax: fmaxf over |x| starting from -FLT_MAX, so NaNs are ignored.
     * A partial last block also sees the kernel's zero padding. */
    float amax = len == j->bs ? -FLT_MAX : 0.0f;
    for (int64_t i = 0; i < len; i++) {
        float a = u2f(f2u(v[i]) & 0x7fffffffu);
        amax = a > amax ? a : amax;
    }
    j->absmax[b] = amax;
    float r = fq_rcp_approx(amax);
    uint8_t *out = j->packed + start / 2;
    for (int64_t i = 0; i < len; i += 2) {
        float p0 = ftz(v[i] * r), p1 = ftz(v[i + 1] * r);
        unsigned c0, c1;
        if (j->qt == FQ_QUANT_NF4) { c0 = nf4_code(p0, j->thr); c1 = nf4_code(p1, j->thr); }
        else { c0 = fp4_code(p0); c1 = fp4_code(p1); }
        out[i / 2] = (uint8_t)(c0 << 4 | c1); /* first element in the high nibble */
    }
}

static void quantize_task(void *arg, int64_t task) {
    const q4_job *j = arg;
    int64_t b0 = task * j->blocks_per_task, b1 = b0 + j->blocks_per_task;
    if (b1 > j->nblocks) b1 = j->nblocks;
    float v[4096 + 1];
    for (int64_t b = b0; b < b1; b++) quantize_block(j, b, v);
}

/* Blocks per parallel task: about 64K elements, so tasks amortize the dispatch. */
static int64_t blocks_per_task(int64_t bs) { return bs >= 65536 ? 1 : 65536 / bs; }

void fq_cpu_quantize4(fq_ctx *ctx, const void *x, fq_dtype dtype, int64_t n, int64_t blocksize,
                      fq_quant_type qt, uint8_t *packed, float *absmax) {
    FQ_ASSERT(blocksize >= 2 && blocksize <= 4096 && blocksize % 2 == 0); /* the ops check it */
    q4_job j = {x, dtype, n, blocksize, blocks_per_task(blocksize), (n + blocksize - 1) / blocksize,
                qt, packed, absmax, {0}};
    memcpy(j.thr, FQ_NF4_THRESH_BITS, 15 * sizeof(float));
    j.thr[15] = u2f(0x7f800000u);
    fq_parallel_for(ctx, (j.nblocks + j.blocks_per_task - 1) / j.blocks_per_task, quantize_task, &j);
}

/* ---- dequantize ------------------------------------------------------------
 * Per block, the 16 possible outputs are computed once (in the output's bits);
 * each packed byte then selects two of them. The scalar path is the reference;
 * on x86-64 with AVX2 + F16C the same tables are built and looked up with SSE
 * byte shuffles (16 bytes -> 32 outputs per step). Both give identical bits. */

typedef struct {
    const uint8_t *packed;
    const float *absmax;
    int64_t n, bs, blocks_per_task, nblocks;
    float lut[16]; /* the kernel's 16 values (FP4: -0.0 at index 8) */
    void *out;
    fq_dtype dtype;
} dq4_job;

static void make_lut(fq_quant_type qt, float lut[16]) {
    memcpy(lut, qt == FQ_QUANT_FP4 ? FQ_FP4_BITS : FQ_NF4_BITS, 16 * sizeof(float));
    if (qt == FQ_QUANT_FP4) lut[8] = u2f(0x80000000u); /* kernel: 0.0f * sign(-1) = -0.0 */
}

/* The 16 possible outputs of one block: ftz(lut[q] * ftz(absmax)), rounded
 * once to the output dtype; NaN (0 * inf) as the GPU writes it. */
static void block_table(const dq4_job *j, int64_t b, uint32_t t[16]) {
    float a = ftz(j->absmax[b]);
    for (int q = 0; q < 16; q++) {
        float y = ftz(j->lut[q] * a);
        if (j->dtype == FQ_F32) t[q] = y != y ? 0x7fffffffu : f2u(y);
        else if (j->dtype == FQ_F16) t[q] = f32_to_f16(y);
        else t[q] = f32_to_bf16(y);
    }
}

/* Scalar lookups for elements [i0, i1) of block b (i0 even), table t. */
static void dequant_range(const dq4_job *j, int64_t b, const uint32_t t[16], int64_t i0, int64_t i1) {
    int64_t start = b * j->bs;
    const uint8_t *in = j->packed + start / 2;
    for (int64_t i = i0; i < i1; i += 2) {
        uint8_t v = in[i / 2];
        uint32_t h = t[v >> 4], l = t[v & 15];
        if (j->dtype == FQ_F32) {
            uint32_t *o = (uint32_t *)j->out + start;
            o[i] = h;
            if (i + 1 < i1) o[i + 1] = l;
        } else {
            uint16_t *o = (uint16_t *)j->out + start;
            o[i] = (uint16_t)h;
            if (i + 1 < i1) o[i + 1] = (uint16_t)l;
        }
    }
}

static void dequantize_task_scalar(void *arg, int64_t task) {
    const dq4_job *j = arg;
    int64_t b0 = task * j->blocks_per_task, b1 = b0 + j->blocks_per_task;
    if (b1 > j->nblocks) b1 = j->nblocks;
    uint32_t t[16];
    for (int64_t b = b0; b < b1; b++) {
        block_table(j, b, t);
        int64_t len = j->n - b * j->bs < j->bs ? j->n - b * j->bs : j->bs;
        dequant_range(j, b, t, 0, len);
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define FQ_DQ4_SIMD 1
#define SIMD_FN __attribute__((target("avx2,f16c")))

/* Splits 16 u16 outputs (h0: 0-7, h1: 8-15) into low-byte and high-byte tables. */
SIMD_FN static inline void split16(__m128i h0, __m128i h1, __m128i tb[4]) {
    const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    h0 = _mm_shuffle_epi8(h0, split);
    h1 = _mm_shuffle_epi8(h1, split);
    tb[0] = _mm_unpacklo_epi64(h0, h1);
    tb[1] = _mm_unpackhi_epi64(h0, h1);
    tb[2] = tb[3] = _mm_setzero_si128(); /* unused for 16-bit outputs */
}

/* Splits 16 u32 outputs (four vectors of 4) into four byte tables. */
SIMD_FN static inline void split32(const __m128i u[4], __m128i tb[4]) {
    const __m128i tr = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    __m128i t0 = _mm_shuffle_epi8(u[0], tr), t1 = _mm_shuffle_epi8(u[1], tr);
    __m128i t2 = _mm_shuffle_epi8(u[2], tr), t3 = _mm_shuffle_epi8(u[3], tr);
    __m128i a01 = _mm_unpacklo_epi32(t0, t1), a23 = _mm_unpacklo_epi32(t2, t3);
    __m128i b01 = _mm_unpackhi_epi32(t0, t1), b23 = _mm_unpackhi_epi32(t2, t3);
    tb[0] = _mm_unpacklo_epi64(a01, a23);
    tb[1] = _mm_unpackhi_epi64(a01, a23);
    tb[2] = _mm_unpacklo_epi64(b01, b23);
    tb[3] = _mm_unpackhi_epi64(b01, b23);
}

/* bf16 round-to-nearest-even of 8 non-NaN floats, in the low half of each lane. */
SIMD_FN static inline __m256i bf16_rne8(__m256i u) {
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
}

/* Byte tables for pshufb: tb[k] holds byte k of the 16 outputs (k < 2 for
 * 16-bit outputs, k < 4 for f32). Same values as block_table(). */
SIMD_FN static void block_tables_simd(const dq4_job *j, int64_t b, __m128i tb[4]) {
    float a = ftz(j->absmax[b]);
    uint32_t ae = f2u(a) >> 23; /* sign and exponent */
    if (ae >= 9 && ae <= 254) {
        /* Common case: 2^-118 <= absmax < inf, so every product is 0 or a normal
         * finite float (the smallest nonzero |lut| is 2^-7.6): no ftz, no NaN. */
        const __m256 A = _mm256_set1_ps(a);
        __m256i y0 = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(j->lut), A));
        __m256i y1 = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(j->lut + 8), A));
        if (j->dtype == FQ_BF16) {
            __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_rne8(y0), bf16_rne8(y1)), 0xd8);
            split16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1), tb);
        } else if (j->dtype == FQ_F16) {
            /* cvtps2ph rounds to nearest even, makes f16 subnormals and overflows
             * to inf: f32_to_f16() exactly. */
            split16(_mm256_cvtps_ph(_mm256_castsi256_ps(y0), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                    _mm256_cvtps_ph(_mm256_castsi256_ps(y1), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), tb);
        } else {
            __m128i u[4] = {_mm256_castsi256_si128(y0), _mm256_extracti128_si256(y0, 1),
                            _mm256_castsi256_si128(y1), _mm256_extracti128_si256(y1, 1)};
            split32(u, tb);
        }
        return;
    }
    /* Zero, subnormal, tiny, infinite or negative (all-NaN block) absmax: the
     * scalar table, which handles every case. */
    uint32_t t[16];
    block_table(j, b, t);
    if (j->dtype == FQ_F32) {
        __m128i u[4];
        for (int k = 0; k < 4; k++) u[k] = _mm_loadu_si128((const __m128i *)(t + 4 * k));
        split32(u, tb);
    } else {
        __m128i h[2];
        for (int k = 0; k < 2; k++)
            h[k] = _mm_packus_epi32(_mm_loadu_si128((const __m128i *)(t + 8 * k)),
                                    _mm_loadu_si128((const __m128i *)(t + 8 * k + 4)));
        split16(h[0], h[1], tb);
    }
}

/* 16 packed bytes -> 32 outputs. */
SIMD_FN static inline void lookup16(const uint8_t *in, void *out, const __m128i tb[4], int f32) {
    const __m128i m = _mm_set1_epi8(0x0f);
    __m128i v = _mm_loadu_si128((const __m128i *)in);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m), lo = _mm_and_si128(v, m);
    __m128i idx[2] = {_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)}; /* element order */
    __m128i *o = out;
    for (int h = 0; h < 2; h++) {
        __m128i b0 = _mm_shuffle_epi8(tb[0], idx[h]), b1 = _mm_shuffle_epi8(tb[1], idx[h]);
        if (!f32) {
            _mm_storeu_si128(o++, _mm_unpacklo_epi8(b0, b1));
            _mm_storeu_si128(o++, _mm_unpackhi_epi8(b0, b1));
            continue;
        }
        __m128i b2 = _mm_shuffle_epi8(tb[2], idx[h]), b3 = _mm_shuffle_epi8(tb[3], idx[h]);
        __m128i l01 = _mm_unpacklo_epi8(b0, b1), l23 = _mm_unpacklo_epi8(b2, b3);
        __m128i u01 = _mm_unpackhi_epi8(b0, b1), u23 = _mm_unpackhi_epi8(b2, b3);
        _mm_storeu_si128(o++, _mm_unpacklo_epi16(l01, l23));
        _mm_storeu_si128(o++, _mm_unpackhi_epi16(l01, l23));
        _mm_storeu_si128(o++, _mm_unpacklo_epi16(u01, u23));
        _mm_storeu_si128(o++, _mm_unpackhi_epi16(u01, u23));
    }
}

SIMD_FN static void dequantize_task_simd(void *arg, int64_t task) {
    const dq4_job *j = arg;
    int64_t b0 = task * j->blocks_per_task, b1 = b0 + j->blocks_per_task;
    if (b1 > j->nblocks) b1 = j->nblocks;
    int f32 = j->dtype == FQ_F32;
    size_t esz = f32 ? 4 : 2;
    __m128i tb[4];
    for (int64_t b = b0; b < b1; b++) {
        block_tables_simd(j, b, tb);
        int64_t start = b * j->bs, len = j->n - start < j->bs ? j->n - start : j->bs, i = 0;
        const uint8_t *in = j->packed + start / 2;
        char *out = (char *)j->out + (size_t)start * esz;
        for (; i + 32 <= len; i += 32) lookup16(in + i / 2, out + (size_t)i * esz, tb, f32);
        if (i < len) { /* the partial last block */
            uint32_t t[16];
            block_table(j, b, t);
            dequant_range(j, b, t, i, len);
        }
    }
}

/* AVX2 (which the builtin checks together with the OS's saving of ymm state) and F16C. */
static int simd_available(void) {
    unsigned a, b, c, d;
    return __builtin_cpu_supports("avx2") && __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}
#endif

static void dequantize4(fq_ctx *ctx, const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                        fq_quant_type qt, void *out, fq_dtype out_dtype, int allow_simd) {
    dq4_job j = {packed, absmax, n, blocksize, blocks_per_task(blocksize), (n + blocksize - 1) / blocksize,
                 {0}, out, out_dtype};
    make_lut(qt, j.lut);
    void (*task)(void *, int64_t) = dequantize_task_scalar;
#ifdef FQ_DQ4_SIMD
    if (allow_simd && simd_available()) task = dequantize_task_simd;
#else
    (void)allow_simd;
#endif
    fq_parallel_for(ctx, (j.nblocks + j.blocks_per_task - 1) / j.blocks_per_task, task, &j);
}

void fq_cpu_dequantize4(fq_ctx *ctx, const uint8_t *packed, const float *absmax, int64_t n,
                        int64_t blocksize, fq_quant_type qt, void *out, fq_dtype out_dtype) {
    dequantize4(ctx, packed, absmax, n, blocksize, qt, out, out_dtype, 1);
}

void fq_cpu_dequantize4_ref(fq_ctx *ctx, const uint8_t *packed, const float *absmax, int64_t n,
                            int64_t blocksize, fq_quant_type qt, void *out, fq_dtype out_dtype) {
    dequantize4(ctx, packed, absmax, n, blocksize, qt, out, out_dtype, 0);
}

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

static inline float load_elem(const void *x, fq_dtype dt, int64_t i) {
    if (dt == FQ_F32) return ((const float *)x)[i];
    uint16_t h = ((const uint16_t *)x)[i];
    return dt == FQ_F16 ? f16_to_f32(h) : u2f((uint32_t)h << 16);
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

static void quantize_block(const q4_job *j, int64_t b) {
    int64_t start = b * j->bs, len = j->n - start < j->bs ? j->n - start : j->bs;
    /* absmax: fmaxf over ftz(|x|) starting from -FLT_MAX, so NaNs are ignored.
     * A partial last block also sees the kernel's zero padding. */
    float amax = len == j->bs ? -FLT_MAX : 0.0f;
    for (int64_t i = 0; i < len; i++) {
        float a = u2f(f2u(ftz(load_elem(j->x, j->dtype, start + i))) & 0x7fffffffu);
        if (a > amax) amax = a;
    }
    j->absmax[b] = amax;
    float r = fq_rcp_approx(amax);
    uint8_t *out = j->packed + start / 2;
    for (int64_t i = 0; i < len; i += 2) {
        float v0 = load_elem(j->x, j->dtype, start + i);
        float v1 = i + 1 < len ? load_elem(j->x, j->dtype, start + i + 1) : 0.0f; /* padding */
        float p0 = ftz(ftz(v0) * r), p1 = ftz(ftz(v1) * r);
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
    for (int64_t b = b0; b < b1; b++) quantize_block(j, b);
}

/* Blocks per parallel task: about 64K elements, so tasks amortize the dispatch. */
static int64_t blocks_per_task(int64_t bs) { return bs >= 65536 ? 1 : 65536 / bs; }

void fq_cpu_quantize4(fq_ctx *ctx, const void *x, fq_dtype dtype, int64_t n, int64_t blocksize,
                      fq_quant_type qt, uint8_t *packed, float *absmax) {
    q4_job j = {x, dtype, n, blocksize, blocks_per_task(blocksize), (n + blocksize - 1) / blocksize,
                qt, packed, absmax, {0}};
    memcpy(j.thr, FQ_NF4_THRESH_BITS, 15 * sizeof(float));
    j.thr[15] = u2f(0x7f800000u);
    fq_parallel_for(ctx, (j.nblocks + j.blocks_per_task - 1) / j.blocks_per_task, quantize_task, &j);
}

/* ---- dequantize ------------------------------------------------------------ */

typedef struct {
    const uint8_t *packed;
    const float *absmax;
    int64_t n, bs, blocks_per_task, nblocks;
    const float *lut; /* the kernel's 16 values (FP4: -0.0 at index 8) */
    void *out;
    fq_dtype dtype;
} dq4_job;

/* The 16 possible outputs of one block, already in the output's bits. */
static void block_table(const dq4_job *j, int64_t b, uint32_t t[16]) {
    float a = ftz(j->absmax[b]);
    for (int q = 0; q < 16; q++) {
        float y = ftz(j->lut[q] * a);
        if (j->dtype == FQ_F32) t[q] = y != y ? 0x7fffffffu : f2u(y);
        else if (j->dtype == FQ_F16) t[q] = f32_to_f16(y);
        else t[q] = f32_to_bf16(y);
    }
}

static void dequantize_task(void *arg, int64_t task) {
    const dq4_job *j = arg;
    int64_t b0 = task * j->blocks_per_task, b1 = b0 + j->blocks_per_task;
    if (b1 > j->nblocks) b1 = j->nblocks;
    uint32_t t[16];
    for (int64_t b = b0; b < b1; b++) {
        block_table(j, b, t);
        int64_t start = b * j->bs, len = j->n - start < j->bs ? j->n - start : j->bs;
        const uint8_t *in = j->packed + start / 2;
        int64_t pairs = len / 2;
        if (j->dtype == FQ_F32) {
            uint32_t *o = (uint32_t *)j->out + start;
            for (int64_t i = 0; i < pairs; i++) {
                uint8_t v = in[i];
                o[2 * i] = t[v >> 4];
                o[2 * i + 1] = t[v & 15];
            }
            if (len & 1) o[len - 1] = t[in[pairs] >> 4];
        } else {
            /* Two 16-bit outputs per byte, stored as one little-endian 32-bit word. */
            uint16_t *o = (uint16_t *)j->out + start;
            uint32_t pair[256];
            if (pairs >= 512) { /* big blocks: a byte -> two outputs table pays off */
                for (int v = 0; v < 256; v++) pair[v] = t[v >> 4] | t[v & 15] << 16;
                for (int64_t i = 0; i < pairs; i++) memcpy(o + 2 * i, &pair[in[i]], 4);
            } else {
                for (int64_t i = 0; i < pairs; i++) {
                    uint8_t v = in[i];
                    uint32_t w = t[v >> 4] | t[v & 15] << 16;
                    memcpy(o + 2 * i, &w, 4);
                }
            }
            if (len & 1) o[len - 1] = (uint16_t)t[in[pairs] >> 4];
        }
    }
}

void fq_cpu_dequantize4(fq_ctx *ctx, const uint8_t *packed, const float *absmax, int64_t n,
                        int64_t blocksize, fq_quant_type qt, void *out, fq_dtype out_dtype) {
    float lut[16];
    memcpy(lut, qt == FQ_QUANT_FP4 ? FQ_FP4_BITS : FQ_NF4_BITS, sizeof lut);
    if (qt == FQ_QUANT_FP4) lut[8] = u2f(0x80000000u); /* kernel: 0.0f * sign(-1) = -0.0 */
    dq4_job j = {packed, absmax, n, blocksize, blocks_per_task(blocksize),
                 (n + blocksize - 1) / blocksize, lut, out, out_dtype};
    fq_parallel_for(ctx, (j.nblocks + j.blocks_per_task - 1) / j.blocks_per_task, dequantize_task, &j);
}

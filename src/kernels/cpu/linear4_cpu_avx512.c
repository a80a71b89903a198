/* AVX-512 inner loops of the 4-bit linear layer. Compiled for AVX-512 with a
 * target pragma (the rest of the library stays baseline x86-64) and only
 * entered after fq_cpu_isa_best() saw the CPU support it.
 *
 * Decoding: 16 packed bytes widen to 16 dwords; vpermps looks up only the low
 * 4 bits of each index, so the raw byte is already the low-nibble index and
 * a 4-bit shift gives the high-nibble one. The 16-entry table is scaled by
 * the block's absmax once per block, so a weight costs no multiply. */
#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include "kernels/cpu/linear4_cpu_impl.h"

#include <immintrin.h>

enum { MR = 14, NR = 32 }; /* GEMM micro-tile: 28 accumulators of 32 zmm registers */

static inline __m512 base_lut(const fq_w4_view *w) {
    float lut[16];
    fq_l4_lut(w->type, lut);
    return _mm512_loadu_ps(lut);
}

static inline __m512 scaled_lut(__m512 lut, const fq_w4_view *w, int64_t b) {
    return _mm512_mul_ps(lut, _mm512_set1_ps(fq_l4_absmax(w, b)));
}

/* One weight row against R rows of x; U = 2 unrolls the k loop so that one
 * or two rows of x still keep 4 or 8 independent FMA chains in flight. */
static inline __attribute__((always_inline)) void gemv_row(const fq_w4_view *w, int64_t n, const float *xd,
                                                           int64_t ldx, const int R, const int U, float *out) {
    const int64_t K = w->k, f0 = n * K;
    const int lg = fq_l4_log2(w->blocksize);
    const uint8_t *p = w->packed + f0 / 2;
    const __m512 lut = base_lut(w);
    __m512 acc[FQ_L4_GEMV_R][4];
    for (int r = 0; r < R; r++)
        for (int u = 0; u < 2 * U; u++) acc[r][u] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K;) {
        const int64_t b = (f0 + k) >> lg;
        int64_t end = ((b + 1) << lg) - f0;
        if (end > K) end = K;
        const __m512 ls = scaled_lut(lut, w, b);
        if (U == 2) {
            for (; k + 64 <= end; k += 64) {
                __m512i q0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + k / 2)));
                __m512i q1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + k / 2 + 16)));
                __m512 e0 = _mm512_permutexvar_ps(_mm512_srli_epi32(q0, 4), ls);
                __m512 o0 = _mm512_permutexvar_ps(q0, ls);
                __m512 e1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q1, 4), ls);
                __m512 o1 = _mm512_permutexvar_ps(q1, ls);
                for (int r = 0; r < R; r++) {
                    const float *x = xd + r * ldx + k;
                    acc[r][0] = _mm512_fmadd_ps(e0, _mm512_loadu_ps(x), acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(o0, _mm512_loadu_ps(x + 16), acc[r][1]);
                    acc[r][2] = _mm512_fmadd_ps(e1, _mm512_loadu_ps(x + 32), acc[r][2]);
                    acc[r][3] = _mm512_fmadd_ps(o1, _mm512_loadu_ps(x + 48), acc[r][3]);
                }
            }
        }
        for (; k < end; k += 32) {
            __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + k / 2)));
            __m512 e = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), ls);
            __m512 o = _mm512_permutexvar_ps(q, ls);
            for (int r = 0; r < R; r++) {
                const float *x = xd + r * ldx + k;
                acc[r][0] = _mm512_fmadd_ps(e, _mm512_loadu_ps(x), acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(o, _mm512_loadu_ps(x + 16), acc[r][1]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        __m512 s = _mm512_add_ps(acc[r][0], acc[r][1]);
        if (U == 2) s = _mm512_add_ps(s, _mm512_add_ps(acc[r][2], acc[r][3]));
        out[r] = _mm512_reduce_add_ps(s);
    }
}

#define GEMV_CASE(R, U)                                                                  \
    case R:                                                                              \
        for (int64_t n = n0; n < n1; n++) gemv_row(w, n, xd, ldx, R, U, out + (n - n0) * R); \
        break

static void gemv(const fq_w4_view *w, int64_t n0, int64_t n1, const float *xd, int64_t ldx, int r,
                 float *out) {
    switch (r) {
        GEMV_CASE(1, 2);
        GEMV_CASE(2, 2);
        GEMV_CASE(3, 1);
        GEMV_CASE(4, 1);
        GEMV_CASE(5, 1);
        GEMV_CASE(6, 1);
        GEMV_CASE(7, 1);
    default:
        for (int64_t n = n0; n < n1; n++) gemv_row(w, n, xd, ldx, FQ_L4_GEMV_R, 1, out + (n - n0) * FQ_L4_GEMV_R);
        break;
    }
}

static void decode(const fq_w4_view *w, int64_t n, int64_t k0, int64_t kc, float *dst) {
    const int64_t f0 = n * w->k;
    const int lg = fq_l4_log2(w->blocksize);
    const uint8_t *p = w->packed + f0 / 2;
    int64_t cur = -1;
    const __m512 lut = base_lut(w);
    __m512 ls = lut;
    for (int64_t k = k0; k < k0 + kc; k += 32) {
        const int64_t b = (f0 + k) >> lg;
        if (b != cur) { ls = scaled_lut(lut, w, b); cur = b; }
        __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + k / 2)));
        _mm512_storeu_ps(dst + (k - k0), _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), ls));
        _mm512_storeu_ps(dst + (k - k0) + 16, _mm512_permutexvar_ps(q, ls));
    }
}

/* c[MR][NR] += wp[MR][kc] (stride FQ_L4_KC) · xp[kc][NR]. The weights are
 * broadcast from MR rows at constant offsets, so one pointer walks them all. */
static void ukr(int64_t kc, const float *wp, const float *xp, float *c, int64_t ldc) {
    __m512 acc[MR][2];
#pragma GCC unroll 14
    for (int i = 0; i < MR; i++) {
        acc[i][0] = _mm512_loadu_ps(c + i * ldc);
        acc[i][1] = _mm512_loadu_ps(c + i * ldc + 16);
    }
    for (int64_t k = 0; k < kc; k++) {
        const __m512 b0 = _mm512_loadu_ps(xp + k * NR), b1 = _mm512_loadu_ps(xp + k * NR + 16);
#pragma GCC unroll 14
        for (int i = 0; i < MR; i++) {
            const __m512 a = _mm512_set1_ps(wp[i * FQ_L4_KC + k]);
            acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
        }
    }
#pragma GCC unroll 14
    for (int i = 0; i < MR; i++) {
        _mm512_storeu_ps(c + i * ldc, acc[i][0]);
        _mm512_storeu_ps(c + i * ldc + 16, acc[i][1]);
    }
}

const fq_l4_isa_ops *fq_l4_ops_avx512(void) {
    static const fq_l4_isa_ops ops = {MR, NR, gemv, decode, ukr};
    return &ops;
}

#pragma GCC pop_options
#endif

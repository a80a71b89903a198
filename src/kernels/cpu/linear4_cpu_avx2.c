/* AVX2 + FMA inner loops of the 4-bit linear layer (same structure as the
 * AVX-512 file; see there). Compiled with a target pragma and only entered
 * after fq_cpu_isa_best() saw AVX2 and FMA.
 *
 * vpermps on 8 lanes looks up 3 index bits, so the 16-entry table is split
 * into two halves and bit 3 of the index (moved to the sign bit) blends them. */
#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "kernels/cpu/linear4_cpu_impl.h"

#include <immintrin.h>

enum { MR = 6, NR = 16 }; /* GEMM micro-tile: 12 accumulators of 16 ymm registers */

typedef struct {
    __m256 lo, hi;
} lut2;

static inline lut2 base_lut(const fq_w4_view *w) {
    float lut[16];
    fq_l4_lut(w->type, lut);
    return (lut2){_mm256_loadu_ps(lut), _mm256_loadu_ps(lut + 8)};
}

static inline lut2 scaled_lut(lut2 l, const fq_w4_view *w, int64_t b) {
    const __m256 s = _mm256_set1_ps(fq_l4_absmax(w, b));
    return (lut2){_mm256_mul_ps(l.lo, s), _mm256_mul_ps(l.hi, s)};
}

static inline __m256 lookup(lut2 l, __m256i idx) {
    const __m256 a = _mm256_permutevar8x32_ps(l.lo, idx), b = _mm256_permutevar8x32_ps(l.hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* The 32 weights of 16 bytes in slot order: v[0] = slots 0-7 (high nibbles of
 * bytes 0-7), v[1] = slots 8-15, v[2] = slots 16-23 (low nibbles), v[3] = 24-31. */
static inline void decode32(lut2 l, const uint8_t *p, __m256 v[4]) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)p);
    const __m256i q0 = _mm256_cvtepu8_epi32(raw), q1 = _mm256_cvtepu8_epi32(_mm_srli_si128(raw, 8));
    v[0] = lookup(l, _mm256_srli_epi32(q0, 4));
    v[1] = lookup(l, _mm256_srli_epi32(q1, 4));
    v[2] = lookup(l, q0);
    v[3] = lookup(l, q1);
}

static inline __attribute__((always_inline)) float block_absmax(const int NESTED, const fq_w4_view *w, int64_t b) {
    return NESTED ? w->nested_code[w->qabsmax[b]] * w->nested_absmax[b >> 8] + w->offset : w->absmax[b];
}

static inline __attribute__((always_inline)) lut2 scale(lut2 l, float a) {
    const __m256 s = _mm256_set1_ps(a);
    return (lut2){_mm256_mul_ps(l.lo, s), _mm256_mul_ps(l.hi, s)};
}

static inline __attribute__((always_inline)) void step32(const uint8_t *p, const float *xd, int64_t ldx, lut2 ls,
                                                         const int R, const int A, __m256 acc[][4]) {
    __m256 v[4];
    decode32(ls, p, v);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++)
            acc[r][i % A] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(xd + r * ldx + 8 * i), acc[r][i % A]);
}

/* Weight row n, slots [k0, k1), against R rows of x with A chains per row
 * (fewer rows of x, more chains, so FMA latency stays hidden within 16
 * registers); ADDS to out[0 .. R). Loop shape as in the AVX-512 file. */
static inline __attribute__((always_inline)) void gemv_row(const fq_w4_view *w, int64_t n, int64_t k0, int64_t k1,
                                                           const float *xd, int64_t ldx, const int R, const int A,
                                                           const int NESTED, lut2 base, float *out) {
    const int64_t K = w->k, B = w->blocksize, f0 = n * K;
    const int lg = fq_l4_log2(B);
    const uint8_t *p = w->packed + f0 / 2;
    __m256 acc[FQ_L4_GEMV_R][4];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) acc[r][u] = _mm256_setzero_ps();
    if (K % B == 0) {
        const int64_t b0 = f0 >> lg, bs = k0 >> lg, be = (k1 + B - 1) >> lg;
        float am_nested[FQ_L4_AM_RUN];
        for (int64_t bc = bs; bc < be; bc += FQ_L4_AM_RUN) {
            const int64_t bce = bc + FQ_L4_AM_RUN < be ? bc + FQ_L4_AM_RUN : be;
            const float *am = w->absmax + b0 + bc;
            if (NESTED) {
                for (int64_t b = bc; b < bce; b++) am_nested[b - bc] = block_absmax(1, w, b0 + b);
                am = am_nested;
            }
            for (int64_t b = bc; b < bce; b++) {
                const lut2 ls = scale(base, am[b - bc]);
                const uint8_t *pb = p + ((b << lg) >> 1);
                const float *xb = xd + (b << lg);
                _mm_prefetch((const char *)pb + FQ_L4_PREFETCH, _MM_HINT_T0);
                for (int64_t j = 0; j < B; j += 32) step32(pb + (j >> 1), xb + j, ldx, ls, R, A, acc);
            }
        }
    } else {
        for (int64_t k = k0; k < k1; k += 32) {
            _mm_prefetch((const char *)p + (k >> 1) + FQ_L4_PREFETCH, _MM_HINT_T0);
            step32(p + (k >> 1), xd + k, ldx, scale(base, block_absmax(NESTED, w, (f0 + k) >> lg)), R, A, acc);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        __m256 s = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]));
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        out[r] += _mm_cvtss_f32(h);
    }
}

typedef void (*gemv_fn)(const fq_w4_view *, int64_t, int64_t, int64_t, int64_t, const float *, int64_t, float *);
#define GEMV_R(R, A, NESTED)                                                                              \
    static __attribute__((noinline)) void gemv_r##R##_##NESTED(const fq_w4_view *w, int64_t n0, int64_t n1,    \
                                                               int64_t k0, int64_t k1, const float *xd,       \
                                                               int64_t ldx, float *out) {                    \
        const lut2 base = base_lut(w);                                                                    \
        for (int64_t n = n0; n < n1; n++) gemv_row(w, n, k0, k1, xd, ldx, R, A, NESTED, base, out + (n - n0) * R); \
    }
#define GEMV_RR(R, A) GEMV_R(R, A, 0) GEMV_R(R, A, 1)
GEMV_RR(1, 4)
GEMV_RR(2, 4)
GEMV_RR(3, 2)
GEMV_RR(4, 2)
GEMV_RR(5, 1)
GEMV_RR(6, 1)
GEMV_RR(7, 1)
GEMV_RR(8, 1)

static void gemv(const fq_w4_view *w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, const float *xd, int64_t ldx,
                 int r, float *out) {
    static const gemv_fn fns[2][FQ_L4_GEMV_R] = {
        {gemv_r1_0, gemv_r2_0, gemv_r3_0, gemv_r4_0, gemv_r5_0, gemv_r6_0, gemv_r7_0, gemv_r8_0},
        {gemv_r1_1, gemv_r2_1, gemv_r3_1, gemv_r4_1, gemv_r5_1, gemv_r6_1, gemv_r7_1, gemv_r8_1}};
    fns[w->nested != 0][r - 1](w, n0, n1, k0, k1, xd, ldx, out);
}

static void decode(const fq_w4_view *w, int64_t n, int64_t k0, int64_t kc, float *dst) {
    const int64_t f0 = n * w->k;
    const int lg = fq_l4_log2(w->blocksize);
    const uint8_t *p = w->packed + f0 / 2;
    const lut2 base = base_lut(w);
    lut2 ls = base;
    int64_t cur = -1;
    for (int64_t k = k0; k < k0 + kc; k += 32) {
        const int64_t b = (f0 + k) >> lg;
        if (b != cur) { ls = scaled_lut(base, w, b); cur = b; }
        __m256 v[4];
        decode32(ls, p + k / 2, v);
        for (int i = 0; i < 4; i++) _mm256_storeu_ps(dst + (k - k0) + 8 * i, v[i]);
    }
}

/* c[MR][NR] += wp[MR][kc] (stride FQ_L4_KC) · xp[kc][NR]. */
static void ukr(int64_t kc, const float *wp, const float *xp, float *c, int64_t ldc) {
    __m256 acc[MR][2];
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
        acc[i][0] = _mm256_loadu_ps(c + i * ldc);
        acc[i][1] = _mm256_loadu_ps(c + i * ldc + 8);
    }
    for (int64_t k = 0; k < kc; k++) {
        const __m256 b0 = _mm256_loadu_ps(xp + k * NR), b1 = _mm256_loadu_ps(xp + k * NR + 8);
#pragma GCC unroll 6
        for (int i = 0; i < MR; i++) {
            const __m256 a = _mm256_broadcast_ss(wp + i * FQ_L4_KC + k);
            acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
        }
    }
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
        _mm256_storeu_ps(c + i * ldc, acc[i][0]);
        _mm256_storeu_ps(c + i * ldc + 8, acc[i][1]);
    }
}

const fq_l4_isa_ops *fq_l4_ops_avx2(void) {
    static const fq_l4_isa_ops ops = {MR, NR, gemv, decode, ukr};
    return &ops;
}

#pragma GCC pop_options
#endif

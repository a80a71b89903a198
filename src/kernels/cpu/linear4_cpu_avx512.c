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


/* 32 weights (16 bytes at p) times the matching 32 slots of R rows of x. */
static inline __attribute__((always_inline)) void step32(const uint8_t *p, const float *xd, int64_t ldx, __m512 ls,
                                                         const int R, __m512 acc[][4]) {
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    const __m512 e = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), ls), o = _mm512_permutexvar_ps(q, ls);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        acc[r][0] = _mm512_fmadd_ps(e, _mm512_loadu_ps(xd + r * ldx), acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(o, _mm512_loadu_ps(xd + r * ldx + 16), acc[r][1]);
    }
}

/* 64 weights into four chains per row: one or two rows of x alone would
 * otherwise wait on FMA latency. */
static inline __attribute__((always_inline)) void step64(const uint8_t *p, const float *xd, int64_t ldx, __m512 ls,
                                                         const int R, __m512 acc[][4]) {
    const __m512i q0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    const __m512i q1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16)));
    const __m512 e0 = _mm512_permutexvar_ps(_mm512_srli_epi32(q0, 4), ls), o0 = _mm512_permutexvar_ps(q0, ls);
    const __m512 e1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q1, 4), ls), o1 = _mm512_permutexvar_ps(q1, ls);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        const float *x = xd + r * ldx;
        acc[r][0] = _mm512_fmadd_ps(e0, _mm512_loadu_ps(x), acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(o0, _mm512_loadu_ps(x + 16), acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(e1, _mm512_loadu_ps(x + 32), acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(o1, _mm512_loadu_ps(x + 48), acc[r][3]);
    }
}

/* The block's absmax, with nested-ness known at compile time so that the
 * per-block work is one broadcast multiply (or the 8-bit reconstruction). */
static inline __attribute__((always_inline)) float block_absmax(const int NESTED, const fq_w4_view *w, int64_t b) {
    return NESTED ? w->nested_code[w->qabsmax[b]] * w->nested_absmax[b >> 8] + w->offset : w->absmax[b];
}

/* Weight row n, slots [k0, k1), against R rows of x; ADDS to out[0 .. R).
 * U = 2: 64-weight steps into 4 chains. The loops are shaped so that k is a
 * plain induction variable: computing each block's end from k made every
 * block wait on a chain of integer ops and ran 3x slower than the decode. */
static inline __attribute__((always_inline)) void gemv_row(const fq_w4_view *w, int64_t n, int64_t k0, int64_t k1,
                                                           const float *xd, int64_t ldx, const int R, const int U,
                                                           const int NESTED, __m512 lut, float *out) {
    const int64_t K = w->k, B = w->blocksize, f0 = n * K;
    const int lg = fq_l4_log2(B);
    const uint8_t *p = w->packed + f0 / 2;
    __m512 acc[FQ_L4_GEMV_R][4];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) acc[r][u] = _mm512_setzero_ps();
    if (K % B == 0) {
        /* Rows hold whole blocks (every FLUX shape; k0, k1 are multiples of B
         * or K): one scaled table per block. A nested state's absmax is
         * rebuilt for a run of blocks first, so that the block loop carries
         * no chain of dependent scalar loads. */
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
                const __m512 ls = _mm512_mul_ps(lut, _mm512_set1_ps(am[b - bc]));
                const uint8_t *pb = p + ((b << lg) >> 1);
                const float *xb = xd + (b << lg);
                /* The hardware prefetcher alone left the decode waiting on
                 * memory (measured: +10-15% GEMV bandwidth with this). */
                _mm_prefetch((const char *)pb + FQ_L4_PREFETCH, _MM_HINT_T0);
                if (U == 2 && B >= 64)
                    for (int64_t j = 0; j < B; j += 64) step64(pb + (j >> 1), xb + j, ldx, ls, R, acc);
                else
                    for (int64_t j = 0; j < B; j += 32) step32(pb + (j >> 1), xb + j, ldx, ls, R, acc);
            }
        }
    } else {
        /* Blocks straddle rows: look the block up per 32 weights. */
        for (int64_t k = k0; k < k1; k += 32) {
            _mm_prefetch((const char *)p + (k >> 1) + FQ_L4_PREFETCH, _MM_HINT_T0);
            step32(p + (k >> 1), xd + k, ldx, _mm512_mul_ps(lut, _mm512_set1_ps(block_absmax(NESTED, w, (f0 + k) >> lg))),
                   R, acc);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
        out[r] += _mm512_reduce_add_ps(
            _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));
}

/* G weight rows n .. n + G - 1 at once against R rows of x (rows holding
 * whole blocks only); ADDS to out[g * R + r]. Each x vector loaded then
 * feeds G rows: with one row, a long x (K = 12288: 48 KiB of f32) streamed
 * from L2 once per weight row and the GEMV ran at half speed from DRAM. */
static inline __attribute__((always_inline)) void gemv_rows(const fq_w4_view *w, int64_t n, const int G, int64_t k0,
                                                            int64_t k1, const float *xd, int64_t ldx, const int R,
                                                            const int NESTED, __m512 lut, float *out) {
    const int64_t K = w->k, B = w->blocksize;
    const int lg = fq_l4_log2(B);
    const int64_t bs = k0 >> lg, be = (k1 + B - 1) >> lg;
    const uint8_t *p[4];
    int64_t b0[4];
    float am_nested[NESTED ? 4 : 1][FQ_L4_AM_RUN];
#pragma GCC unroll 4
    for (int g = 0; g < G; g++) {
        b0[g] = (n + g) * K >> lg;
        p[g] = w->packed + (n + g) * K / 2;
    }
    __m512 acc[4][2][2];
#pragma GCC unroll 4
    for (int g = 0; g < G; g++)
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) acc[g][r][0] = acc[g][r][1] = _mm512_setzero_ps();
    for (int64_t bc = bs; bc < be; bc += FQ_L4_AM_RUN) {
        const int64_t bce = bc + FQ_L4_AM_RUN < be ? bc + FQ_L4_AM_RUN : be;
        const float *am[4];
#pragma GCC unroll 4
        for (int g = 0; g < G; g++) {
            am[g] = w->absmax + b0[g] + bc;
            if (NESTED) {
                for (int64_t b = bc; b < bce; b++) am_nested[g][b - bc] = block_absmax(1, w, b0[g] + b);
                am[g] = am_nested[g];
            }
        }
        for (int64_t b = bc; b < bce; b++) {
            __m512 ls[4];
            /* Prefetch FQ_L4_PREFETCH bytes ahead along the row, or past its
             * end into the same row of the next group (the next bytes this
             * loop reads of that stream), not into the neighbour row another
             * stream of this group is reading already. */
            int64_t ahead = ((b << lg) >> 1) + FQ_L4_PREFETCH;
            if (ahead >= K / 2) ahead += (G - 1) * (K / 2);
#pragma GCC unroll 4
            for (int g = 0; g < G; g++) {
                ls[g] = _mm512_mul_ps(lut, _mm512_set1_ps(am[g][b - bc]));
                _mm_prefetch((const char *)p[g] + ahead, _MM_HINT_T0);
            }
            for (int64_t k = b << lg; k < (b + 1) << lg; k += 32) {
                __m512 xe[2], xo[2];
#pragma GCC unroll 2
                for (int r = 0; r < R; r++) {
                    xe[r] = _mm512_loadu_ps(xd + r * ldx + k);
                    xo[r] = _mm512_loadu_ps(xd + r * ldx + k + 16);
                }
#pragma GCC unroll 4
                for (int g = 0; g < G; g++) {
                    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p[g] + (k >> 1))));
                    const __m512 e = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), ls[g]);
                    const __m512 o = _mm512_permutexvar_ps(q, ls[g]);
#pragma GCC unroll 2
                    for (int r = 0; r < R; r++) {
                        acc[g][r][0] = _mm512_fmadd_ps(e, xe[r], acc[g][r][0]);
                        acc[g][r][1] = _mm512_fmadd_ps(o, xo[r], acc[g][r][1]);
                    }
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int g = 0; g < G; g++)
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) out[g * R + r] += _mm512_reduce_add_ps(_mm512_add_ps(acc[g][r][0], acc[g][r][1]));
}

/* One function per (R, nested): inlined into a single switch they shared one
 * register allocation and spilled accumulators. One or two rows of x take
 * weight rows four at a time (gemv_rows); more rows of x already reuse each
 * decoded weight R times and keep their x slice in L1. */
typedef void (*gemv_fn)(const fq_w4_view *, int64_t, int64_t, int64_t, int64_t, const float *, int64_t, float *);
#define GEMV_R(R, U, NESTED)                                                                              \
    static __attribute__((noinline)) void gemv_r##R##_##NESTED(const fq_w4_view *w, int64_t n0, int64_t n1,    \
                                                               int64_t k0, int64_t k1, const float *xd,       \
                                                               int64_t ldx, float *out) {                    \
        const __m512 lut = base_lut(w);                                                                   \
        int64_t n = n0;                                                                                   \
        if (R <= 2 && w->k % w->blocksize == 0)                                                           \
            for (; n + 4 <= n1; n += 4) gemv_rows(w, n, 4, k0, k1, xd, ldx, R <= 2 ? R : 2, NESTED, lut, out + (n - n0) * R); \
        for (; n < n1; n++) gemv_row(w, n, k0, k1, xd, ldx, R, U, NESTED, lut, out + (n - n0) * R);           \
    }
#define GEMV_RR(R, U) GEMV_R(R, U, 0) GEMV_R(R, U, 1)
GEMV_RR(1, 2)
GEMV_RR(2, 2)
GEMV_RR(3, 1)
GEMV_RR(4, 1)
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

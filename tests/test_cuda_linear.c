/* The CUDA 4-bit linear layer (skips without a GPU).
 *
 * Weights are built from random members (random nibbles, absmax, nested state)
 * with fq_qtensor_from_members, so the test does not depend on the quantizer.
 * The reference is float64: y[m, n] = sum_k W[n, k] x[m, k] + bias[n], with W
 * dequantized on the host exactly as bitsandbytes defines it (code[nibble] *
 * absmax in f32, absmax = code256[q] * nested_absmax + offset with double quant)
 * and x, bias taken as the values their dtype holds.
 *
 * Every implementation (gemv4_simple, gemv4_tc, gemv4_stream, gemv4_bulk, gemv4_flat, gemv4_win, gemm4_mma, gemm4_wgmma, dequantize
 * + cuBLASLt) runs every case it can run, plus the public choices (AUTO, GEMV,
 * GEMM, DEQUANT_BLAS), over NF4/FP4, nested or not, x f32/f16/bf16, y f32/f16/bf16,
 * bias or not (bias in several dtypes), odd M, N not a multiple of the tile, K not
 * a multiple of the blocksize (blocks straddling rows) and odd K. Tile and K-split
 * configurations are swept on the larger shapes. y is poisoned with NaN before
 * every call, so an unwritten element fails.
 *
 * Tolerances (u = unit roundoff of the named type: bf16 2^-9, f16 2^-12, f32 0):
 *  - weight rounding u_w: gemv4_simple, gemv4_win (W never rounded) and f32 x: 0; gemv4_tc, gemv4_flat and gemv4_bulk's fast
 *    decode: u of the MMA type (the code value is rounded, absmax applied in f32);
 *    gemm4_*, gemv4_stream, gemv4_bulk's exact decode and
 *    dequantize + cuBLASLt with f16/bf16 x: u of x's type (W rounded once to it;
 *    gemv4_stream's HMUL decode, cfg 0x4_, rounds code, absmax and product: still
 *    well inside 5 u S2);
 *  - output rounding u_y: u of y's type (half an ulp: 2^-8 bf16, 2^-11 f16);
 *  - per element |y - ref| <= 5 u_w S2 + 2 u_y |ref| + 4e-6 S1 + 1e-30, with
 *    S1 = sum_k |W x|, S2 = sqrt(sum_k (W x)^2) (+ |bias|);
 *  - over the tensor ||y - ref|| / ||ref|| <= 2 u_w + 2 u_y + 1e-5.
 * A failure prints the case, the kernel, the worst element and the tolerance.
 *
 * With two GPUs: the weight is moved cuda:0 -> cuda:1 (fq_qtensor_move) and every
 * kernel must give bit-identical output there. Every kernel is also run twice and
 * must be bit-identical (no races, no order dependence). The exact small-M decodes
 * (and FQ_LIN4_AUTO_EXACT) are also checked against a reference whose W is rounded
 * to x's type like dequantize does, to f32 summation error (test_exact_rounding). */
#include "check.h"
#include "core/core.h"
#include "core/cuda_device.h"
#include "core/qtensor.h"
#include "kernels/cuda/linear_cuda.h"
#include "ops/linear_internal.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef FQ_HAVE_CUDA
int main(void) {
    SKIP("built without CUDA");
    return check_summary("test_cuda_linear");
}
#else

/* ---- host helpers --------------------------------------------------------------- */

static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static uint64_t g_rng = 0x2545f4914f6cdd1dull;
static uint32_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 16);
}
static float rnd_unit(void) { return (float)(rnd() >> 8) / 16777216.0f; } /* [0, 1) */
static float rnd_sym(void) { return 2.0f * rnd_unit() - 1.0f; }       /* [-1, 1) */

static uint16_t to_bf16(float f) {
    uint32_t u = f2u(f);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static float from_bf16(uint16_t h) { return u2f((uint32_t)h << 16); }

static uint16_t to_f16(float f) {
    uint32_t u = f2u(f), sign = (u >> 16) & 0x8000u, ex = (u >> 23) & 0xff, m = u & 0x7fffffu;
    int32_t e = (int32_t)ex - 112;
    if (ex == 0xff || e >= 31) return (uint16_t)(sign | 0x7c00u);
    if (e < -10) return (uint16_t)sign;
    uint32_t mant = e > 0 ? ((uint32_t)e << 23) | m : m | 0x800000u;
    uint32_t shift = e > 0 ? 13u : (uint32_t)(14 - e);
    uint32_t r = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) r++;
    return (uint16_t)(sign | r);
}
static float from_f16(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu;
    if (e == 0) return (s ? -1.0f : 1.0f) * ldexpf((float)m, -24);
    if (e == 31) return u2f(s | 0x7f800000u | (m << 13));
    return u2f(s | ((e + 112) << 23) | (m << 13));
}

/* Host values v[0..n) stored as dtype dt: *bytes receives the encoding (caller
 * frees) and v is replaced by the value the dtype holds. */
static void *encode(fq_dtype dt, float *v, int64_t n) {
    size_t es = fq_dtype_size(dt);
    unsigned char *b = malloc((size_t)n * es + 8);
    if (!b) return NULL;
    for (int64_t i = 0; i < n; i++) {
        if (dt == FQ_F32) memcpy(b + 4 * i, &v[i], 4);
        else if (dt == FQ_F64) { double d = v[i]; memcpy(b + 8 * i, &d, 8); }
        else {
            uint16_t h = dt == FQ_BF16 ? to_bf16(v[i]) : to_f16(v[i]);
            v[i] = dt == FQ_BF16 ? from_bf16(h) : from_f16(h);
            memcpy(b + 2 * i, &h, 2);
        }
    }
    return b;
}

static double decode1(fq_dtype dt, const unsigned char *b, int64_t i) {
    if (dt == FQ_F32) { float f; memcpy(&f, b + 4 * i, 4); return f; }
    uint16_t h;
    memcpy(&h, b + 2 * i, 2);
    return dt == FQ_BF16 ? from_bf16(h) : from_f16(h);
}

static double unit_roundoff(fq_dtype dt) {
    return dt == FQ_BF16 ? ldexp(1.0, -9) : dt == FQ_F16 ? ldexp(1.0, -12) : 0.0;
}

/* ---- a random quantized weight and its host dequantization ------------------------- */

typedef struct {
    fq_quant_type qt;
    int nested;
    int64_t n, k, bs;
    float *wdq;   /* [n*k] dequantized as bitsandbytes defines it */
    float *wfast; /* [n*k] bf16(bf16(code) * bf16(absmax)): gemm4_ws's fast decode */
    fq_qtensor *q;
} hweight;

static void hweight_free(hweight *h) {
    free(h->wdq);
    free(h->wfast);
    fq_qtensor_free(h->q);
    memset(h, 0, sizeof *h);
}

static int make_weight(fq_ctx *ctx, fq_device dev, fq_quant_type qt, int nested, int64_t n, int64_t k, int64_t bs,
                       hweight *h) {
    memset(h, 0, sizeof *h);
    h->qt = qt;
    h->nested = nested;
    h->n = n;
    h->k = k;
    h->bs = bs;
    const int64_t numel = n * k, nb = (numel + bs - 1) / bs, nnb = (nb + 255) / 256;
    uint8_t *packed = malloc((size_t)(numel + 1) / 2 + 1);
    float *absmax = malloc((size_t)nb * 4 + 4);
    uint8_t *qabs = malloc((size_t)nb + 1);
    float *nabs = malloc((size_t)nnb * 4 + 4);
    h->wdq = malloc((size_t)numel * 4 + 4);
    h->wfast = malloc((size_t)numel * 4 + 4);
    int ok = packed && absmax && qabs && nabs && h->wdq && h->wfast;
    if (ok) {
        for (int64_t i = 0; i < (numel + 1) / 2; i++) packed[i] = (uint8_t)rnd();
        const float offset = 0.2f + 0.3f * rnd_unit();
        for (int64_t b = 0; b < nb; b++) {
            absmax[b] = 0.02f + 2.0f * rnd_unit() * rnd_unit();
            qabs[b] = (uint8_t)rnd();
        }
        for (int64_t b = 0; b < nnb; b++) nabs[b] = 0.05f + 0.2f * rnd_unit();
        const float *qm = fq_quant_map(qt), *code = fq_dynamic_map_signed();
        for (int64_t f = 0; f < numel; f++) {
            const uint8_t byte = packed[f >> 1];
            const int nib = (f & 1) ? (byte & 15) : (byte >> 4);
            const int64_t b = f / bs;
            volatile float am = nested ? code[qabs[b]] * nabs[b >> 8] : absmax[b];
            if (nested) am = am + offset;
            volatile float w = qm[nib] * am;
            h->wdq[f] = w;
            h->wfast[f] = from_bf16(to_bf16(from_bf16(to_bf16(qm[nib])) * from_bf16(to_bf16(am))));
        }
        fq_qtensor_info info;
        memset(&info, 0, sizeof info);
        info.type = qt;
        info.blocksize = bs;
        info.double_quant = nested;
        info.orig_dtype = FQ_BF16;
        info.ndim = 2;
        info.shape[0] = n;
        info.shape[1] = k;
        info.offset = offset;
        const void *members[FQ_QMEMBER_COUNT] = {packed, nested ? (const void *)qabs : (const void *)absmax, qm,
                                                 nested ? nabs : NULL, nested ? code : NULL};
        fq_status s = fq_qtensor_from_members(ctx, dev, &info, members, &h->q);
        CHECK(s == FQ_OK, "from_members: %s", fq_ctx_error(ctx));
        ok = s == FQ_OK;
        if (ok) fq_qtensor_set_name(ctx, h->q, "test.linear");
    }
    free(packed);
    free(absmax);
    free(qabs);
    free(nabs);
    if (!ok) hweight_free(h);
    return ok;
}

/* ---- activations, reference ---------------------------------------------------------- */

typedef struct {
    int64_t m, k;
    fq_dtype dt;
    float *v;        /* values as the dtype holds them */
    fq_tensor *t[2]; /* on cuda:0 and cuda:1 (if present) */
} hact;

static int make_act(fq_ctx *ctx, int ndev, fq_dtype dt, int64_t m, int64_t k, int three_d, hact *a) {
    memset(a, 0, sizeof *a);
    a->m = m;
    a->k = k;
    a->dt = dt;
    a->v = malloc((size_t)(m * k) * 4 + 4);
    if (!a->v) return 0;
    for (int64_t i = 0; i < m * k; i++) a->v[i] = rnd_sym();
    void *b = encode(dt, a->v, m * k);
    int64_t shape3[3] = {2, m / 2, k}, shape2[2] = {m, k};
    int ok = b != NULL;
    for (int d = 0; ok && d < ndev && d < 2; d++) {
        fq_status s = three_d && m % 2 == 0 ? fq_tensor_from_host(ctx, FQ_CUDA(d), dt, 3, shape3, b, &a->t[d])
                                            : fq_tensor_from_host(ctx, FQ_CUDA(d), dt, 2, shape2, b, &a->t[d]);
        CHECK(s == FQ_OK, "x upload: %s", fq_ctx_error(ctx));
        ok = s == FQ_OK;
    }
    free(b);
    return ok;
}

static void hact_free(hact *a) {
    free(a->v);
    fq_tensor_free(a->t[0]);
    fq_tensor_free(a->t[1]);
    memset(a, 0, sizeof *a);
}

typedef struct {
    int64_t n;
    fq_dtype dt;
    float *v;
    fq_tensor *t[2];
} hbias;

static int make_bias(fq_ctx *ctx, int ndev, fq_dtype dt, int64_t n, hbias *b) {
    memset(b, 0, sizeof *b);
    b->n = n;
    b->dt = dt;
    b->v = malloc((size_t)n * 4 + 4);
    if (!b->v) return 0;
    for (int64_t i = 0; i < n; i++) b->v[i] = 0.5f * rnd_sym();
    void *e = encode(dt, b->v, n);
    int ok = e != NULL;
    for (int d = 0; ok && d < ndev && d < 2; d++) {
        fq_status s = fq_tensor_from_host(ctx, FQ_CUDA(d), dt, 1, &n, e, &b->t[d]);
        CHECK(s == FQ_OK, "bias upload: %s", fq_ctx_error(ctx));
        ok = s == FQ_OK;
    }
    free(e);
    return ok;
}

static void hbias_free(hbias *b) {
    free(b->v);
    fq_tensor_free(b->t[0]);
    fq_tensor_free(b->t[1]);
    memset(b, 0, sizeof *b);
}

typedef struct {
    double *ref, *s1, *s2; /* [m*n] without bias */
} href;

static int make_ref(const hweight *w, const hact *x, href *r) {
    const int64_t m = x->m, n = w->n, k = w->k;
    r->ref = malloc((size_t)(m * n) * 8 + 8);
    r->s1 = malloc((size_t)(m * n) * 8 + 8);
    r->s2 = malloc((size_t)(m * n) * 8 + 8);
    if (!r->ref || !r->s1 || !r->s2) return 0;
    for (int64_t i = 0; i < m; i++) {
        const float *xr = x->v + i * k;
        for (int64_t j = 0; j < n; j++) {
            const float *wr = w->wdq + j * k;
            double s = 0, a1 = 0, a2 = 0;
            for (int64_t kk = 0; kk < k; kk++) {
                const double p = (double)wr[kk] * (double)xr[kk];
                s += p;
                a1 += fabs(p);
                a2 += p * p;
            }
            r->ref[i * n + j] = s;
            r->s1[i * n + j] = a1;
            r->s2[i * n + j] = sqrt(a2);
        }
    }
    return 1;
}

static void href_free(href *r) {
    free(r->ref);
    free(r->s1);
    free(r->s2);
}

/* ---- one call ---------------------------------------------------------------------- */

/* Runs y = linear(x, w, bias) on device d with kernel selection sel (a public
 * fq_linear_kernel or FQ_LIN4_SELECT(...)); y is created here, poisoned, and read
 * back into *out (the raw bytes, caller frees). */
static fq_status run_linear(fq_ctx *ctx, int d, int sel, const hweight *w, const hact *x, const hbias *b,
                            fq_dtype ydt, unsigned char **out) {
    *out = NULL;
    const int64_t m = x->m, n = w->n;
    const fq_tensor *xt = x->t[d];
    int64_t yshape[3];
    int ynd = xt->ndim;
    for (int i = 0; i < ynd - 1; i++) yshape[i] = xt->shape[i];
    yshape[ynd - 1] = n;
    size_t ybytes = (size_t)(m * n) * fq_dtype_size(ydt);
    unsigned char *poison = malloc(ybytes + 8);
    if (!poison) return FQ_ERR_OUT_OF_MEMORY;
    memset(poison, 0xff, ybytes + 8); /* NaN in f32, f16 and bf16 */
    fq_tensor *y = NULL;
    fq_status s = fq_tensor_from_host(ctx, FQ_CUDA(d), ydt, ynd, yshape, poison, &y);
    free(poison);
    if (s != FQ_OK) return s;
    ctx->linear_kernel = sel;
    if (sel >= FQ_LIN4_EXACT || sel == FQ_LIN4_AUTO_EXACT) s = fq_linear4_cuda(ctx, xt, w->q, b ? b->t[d] : NULL, y, m);
    else s = fq_linear_4bit(ctx, xt, w->q, b ? b->t[d] : NULL, y);
    ctx->linear_kernel = FQ_LINEAR_AUTO;
    if (s == FQ_OK) {
        *out = malloc(ybytes + 8);
        if (!*out) s = FQ_ERR_OUT_OF_MEMORY;
        else s = fq_tensor_to_host(ctx, y, *out);
        if (s != FQ_OK) { free(*out); *out = NULL; }
    }
    fq_tensor_free(y);
    return s;
}

/* Checks y against the reference; returns 1 if within tolerance. */
static int compare(const char *what, const hweight *w, const hact *x, const hbias *b, const href *r, fq_dtype ydt,
                   const unsigned char *y, double uw) {
    const int64_t m = x->m, n = w->n;
    const double uy = unit_roundoff(ydt) * 2.0;
    double num = 0, den = 0, worst = -1;
    int64_t wi = 0, nonfinite = 0;
    double wv = 0, wr = 0, wt = 0;
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            const int64_t e = i * n + j;
            const double bias = b ? b->v[j] : 0.0;
            const double ref = r->ref[e] + bias;
            const double v = decode1(ydt, y, e);
            if (!isfinite(v)) {
                if (!nonfinite) { wi = e; wv = v; wr = ref; }
                nonfinite++;
                continue;
            }
            const double tol =
                8.0 * uw * r->s2[e] + 2.0 * uy * fabs(ref) + 4e-6 * (r->s1[e] + fabs(bias)) + 1e-30;
            const double err = fabs(v - ref);
            num += err * err;
            den += ref * ref;
            if (err / tol > worst) {
                worst = err / tol;
                wi = e;
                wv = v;
                wr = ref;
                wt = tol;
            }
        }
    const double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    const double rel_tol = 2.0 * uw + 2.0 * uy + 1e-5;
    int ok = nonfinite == 0 && worst <= 1.0 && rel <= rel_tol;
    CHECK(ok,
          "%s: M=%lld N=%lld K=%lld bs=%lld %s%s x=%s y=%s bias=%s: %lld non-finite; worst element (m=%lld, n=%lld) "
          "y=%.9g ref=%.9g err/tol=%.3g (tol %.3g); rel err %.3g (tol %.3g)",
          what, (long long)m, (long long)n, (long long)w->k, (long long)w->bs, fq_quant_type_name(w->qt),
          w->nested ? "+dq" : "", fq_dtype_name(x->dt), fq_dtype_name(ydt), b ? fq_dtype_name(b->dt) : "none",
          (long long)nonfinite, (long long)(wi / n), (long long)(wi % n), wv, wr, worst, wt, rel, rel_tol);
    return ok;
}

/* Weight rounding of an implementation for x's dtype, sel the selection that ran.
 * gemm4_ws's fast decode (configurations 11-14, and the plain automatic choice with bf16
 * x) rounds W three times - the code and the absmax to bf16, then their product - as
 * bitsandbytes' inference kernel does: three unit roundoffs. */
static double weight_roundoff(fq_lin4_impl impl, fq_dtype xdt, int sel) {
    const int cfg = sel >= FQ_LIN4_EXACT ? (sel - FQ_LIN4_EXACT) % 256 : -1;
    if (impl == FQ_LIN4_GEMM_WS && xdt == FQ_BF16 && ((cfg >= 0 && (cfg & 15) >= 11) || sel == FQ_LINEAR_AUTO))
        return 3.0 * unit_roundoff(xdt);
    switch (impl) {
    case FQ_LIN4_GEMV_SIMPLE:
    case FQ_LIN4_GEMV_WIN: return 0.0; /* W never rounded: code * absmax enters the f32 sums as is */
    default: return unit_roundoff(xdt);
    }
}

/* ---- the test matrix ------------------------------------------------------------------ */

typedef struct {
    int64_t m, n, k, bs;
    int sweep; /* also sweep tile / split configurations */
} shape_t;

static const shape_t g_shapes[] = {
    {1, 256, 512, 64, 0},     /* GEMV                                     */
    {3, 130, 1024, 64, 0},    /* N not a multiple of 16                   */
    {7, 64, 192, 64, 0},      /* three segments                           */
    {16, 96, 4096, 128, 1},   /* two x tiles in the GEMV, long K          */
    {9, 48, 640, 128, 0},     /* 640 = 5 blocks of 128                    */
    {5, 33, 100, 64, 0},      /* K not a multiple of the blocksize        */
    {2, 7, 33, 32, 0},        /* odd K: rows start mid-byte               */
    {1, 3, 1, 64, 0},         /* K = 1                                    */
    {4, 40, 96, 32, 0},       /* blocksize 32                             */
    {1, 1000, 3136, 64, 1},   /* K = 24.5 chunks of 128 (gemv4_stream)    */
    {2, 77, 1600, 32, 1},     /* N not a multiple of 8, blocksize 32      */
    {8, 264, 4096, 256, 1},   /* the largest gemv4_stream M               */
    {1, 1000, 3072, 64, 1},   /* gemv4_bulk: N not a multiple of 16, 3 stages per tile */
    {2, 77, 1664, 32, 1},     /* gemv4_bulk: a short last stage, blocksize 32 */
    {1, 40, 8192, 4096, 1},   /* blocksize 4096                           */
    {2, 300, 2048, 1024, 0},  /* blocksize 1024                           */
    {1, 48, 6144, 256, 0},    /* blocksize 256, long K                    */
    {1, 5000, 256, 64, 1},    /* gemv4_bulk: several tiles per block      */
    {2, 1001, 3072, 64, 1},   /* gemv4_flat: odd N, row pairs split between warps */
    {1, 77, 15360, 128, 1},   /* gemv4_flat: long K, a pair over 3 warps, idle blocks */
    {2, 4500, 384, 128, 1},   /* gemv4_bulk: several tiles per block, M = 2, blocksize 128 */
    {1, 50, 1056, 128, 1},    /* gemv4_win: blocks straddle rows, a 32-element last window */
    {2, 300, 16384, 64, 1},   /* gemv4_win: 16 windows per row, M = 2 */
    {33, 200, 256, 64, 1},    /* smallest GEMM M; N, M not tile multiples */
    {130, 384, 512, 128, 1},
    {257, 520, 1024, 64, 0},
    {300, 256, 2048, 256, 1},
    {64, 3072, 3072, 64, 1},  /* a Flux width                             */
    {1000, 136, 192, 64, 0},  /* many M tiles                             */
    {4608, 128, 256, 64, 1},  /* Flux token count                         */
    {300, 264, 2048, 512, 1}, /* gemm4_ws: blocksize 512, 3 N tiles, 2 M tiles */
    {77, 130, 3072, 1024, 1}, /* blocksize 1024, odd M, a partial N tile  */
    {520, 384, 1536, 64, 1},  /* gemm4_ws: M = 2 x 216 + 88, 3 N tiles    */
    {65, 77, 512, 64, 1},     /* odd N (gemm4_ws: the unpaired epilogue)  */
    {520, 4224, 256, 64, 1},  /* gemm4_ws: 99+ tiles, so with 3 K splits the persistent
                                 CTAs take several (tile, split) items each */
};

static const fq_lin4_impl g_impls[] = {FQ_LIN4_GEMV_SIMPLE, FQ_LIN4_GEMV_TC,      FQ_LIN4_GEMV_STREAM, FQ_LIN4_GEMV_BULK,
                                       FQ_LIN4_GEMV_FLAT,   FQ_LIN4_GEMV_WIN,
                                       FQ_LIN4_GEMM_MMA,    FQ_LIN4_GEMM_WGMMA,   FQ_LIN4_DEQUANT_BLAS,
                                       FQ_LIN4_GEMM_WS};

static int g_ndev;
static const char *g_only; /* --impl NAME: run only this implementation (and skip the public choices) */

/* Runs one selection on cuda:0 (twice: must be bit-identical) and, with two GPUs,
 * on cuda:1 after moving the weight there (must be bit-identical too). */
static void run_and_check(fq_ctx *ctx, int sel, const char *what, fq_lin4_impl impl, hweight *w, hact *x, hbias *b,
                          const href *r, fq_dtype ydt) {
    unsigned char *y0 = NULL, *y1 = NULL;
    fq_status s = run_linear(ctx, 0, sel, w, x, b, ydt, &y0);
    CHECK(s == FQ_OK, "%s: %s", what, fq_ctx_error(ctx));
    if (s != FQ_OK) return;
    const size_t yb = (size_t)(x->m * w->n) * fq_dtype_size(ydt);
    compare(what, w, x, b, r, ydt, y0, weight_roundoff(impl, x->dt, sel));
    s = run_linear(ctx, 0, sel, w, x, b, ydt, &y1);
    CHECK(s == FQ_OK && memcmp(y0, y1, yb) == 0, "%s: a second run differs (M=%lld N=%lld K=%lld)", what,
          (long long)x->m, (long long)w->n, (long long)w->k);
    free(y1);
    y1 = NULL;
    if (g_ndev >= 2) {
        s = fq_qtensor_move(ctx, w->q, FQ_CUDA(1));
        CHECK(s == FQ_OK, "move to cuda:1: %s", fq_ctx_error(ctx));
        if (s == FQ_OK) {
            s = run_linear(ctx, 1, sel, w, x, b, ydt, &y1);
            CHECK(s == FQ_OK, "%s on cuda:1: %s", what, fq_ctx_error(ctx));
            CHECK(s != FQ_OK || memcmp(y0, y1, yb) == 0, "%s: cuda:1 result differs from cuda:0 (M=%lld N=%lld K=%lld)",
                  what, (long long)x->m, (long long)w->n, (long long)w->k);
            s = fq_qtensor_move(ctx, w->q, FQ_CUDA(0));
            CHECK(s == FQ_OK, "move back to cuda:0: %s", fq_ctx_error(ctx));
        }
    }
    free(y0);
    free(y1);
}

static void test_shape(fq_ctx *ctx, const shape_t *sh, int *counter) {
    static const fq_dtype xdts[3] = {FQ_BF16, FQ_F16, FQ_F32};
    static const fq_dtype bdts[4] = {FQ_F32, FQ_BF16, FQ_F16, FQ_F64};
    for (int wv = 0; wv < 4; wv++) {
        const fq_quant_type qt = (wv & 1) ? FQ_QUANT_FP4 : FQ_QUANT_NF4;
        const int nested = (wv >> 1) & 1;
        hweight w;
        if (!make_weight(ctx, FQ_CUDA(0), qt, nested, sh->n, sh->k, sh->bs, &w)) return;
        for (int xi = 0; xi < 3; xi++) {
            /* Large shapes: not every x dtype with every weight variant. */
            if (sh->m * sh->n * sh->k > 50000000 && xi != (wv % 3) && xi != 0) continue;
            hact x;
            href r = {0};
            if (!make_act(ctx, g_ndev, xdts[xi], sh->m, sh->k, (*counter % 3) == 1, &x) || !make_ref(&w, &x, &r)) {
                CHECK(0, "out of host memory");
                hact_free(&x);
                href_free(&r);
                break;
            }
            /* y dtype and bias vary from case to case */
            const int c = (*counter)++;
            const fq_dtype xdt = xdts[xi];
            const fq_dtype ydt = c % 4 == 3 ? FQ_F32 : c % 4 == 1 ? (xdt == FQ_BF16 ? FQ_F16 : FQ_BF16) : xdt;
            hbias b;
            const int with_bias = c % 3 != 2;
            if (with_bias && !make_bias(ctx, g_ndev, bdts[c % 4], sh->n, &b)) {
                hact_free(&x);
                href_free(&r);
                break;
            }
            char what[160];
            for (size_t ii = 0; ii < sizeof g_impls / sizeof g_impls[0]; ii++) {
                const fq_lin4_impl impl = g_impls[ii];
                if (g_only && strcmp(g_only, fq_lin4_impl_name(impl)) != 0) continue;
                fq_tensor *yshape = NULL; /* only its shape and dtype matter */
                int64_t ys[2] = {sh->m, sh->n};
                if (fq_tensor_create(ctx, FQ_CUDA(0), ydt, 2, ys, &yshape) != FQ_OK) continue;
                const int can = fq_linear4_cuda_can_run(ctx, impl, x.t[0], w.q, yshape);
                fq_tensor_free(yshape);
                if (!can) continue;
                snprintf(what, sizeof what, "%s", fq_lin4_impl_name(impl));
                run_and_check(ctx, FQ_LIN4_SELECT(impl, 0), what, impl, &w, &x, with_bias ? &b : NULL, &r, ydt);
                if (!sh->sweep) continue;
                static const int gemv_codes[6] = {1, 2, 4, 8, 0x11, 0x18}; /* K split, deep bit */
                static const int stream_codes[6] = {0x21, 0x42, 0x24, 0x48, 0x51, 0x38}; /* decode, batch, K slices */
                static const int bulk_codes[6] = {1, 2, 0x05, 0x0a, 0x1d, 0x81}; /* decode, prefetch, grid, launch */
                static const int flat_codes[5] = {0x05, 0x09, 0x0d, 0x11, 0x81}; /* block shape, prefetch, launch */
                /* block shape, prefetch, launch, wait first, load order (batch, after the decode) */
                static const int win_codes[8] = {0x02, 0x03, 0x11, 0x81, 0x40, 0x43, 0x21, 0x0b};
                int ncfg = impl == FQ_LIN4_GEMV_TC       ? 6
                           : impl == FQ_LIN4_GEMV_STREAM ? 6
                           : impl == FQ_LIN4_GEMV_BULK   ? 6
                           : impl == FQ_LIN4_GEMV_FLAT   ? 5
                           : impl == FQ_LIN4_GEMV_WIN    ? 8
                           : impl == FQ_LIN4_GEMM_MMA   ? FQ_GEMM4_MMA_CONFIGS
                           : impl == FQ_LIN4_GEMM_WGMMA ? FQ_GEMM4_WGMMA_CONFIGS * 2
                           : impl == FQ_LIN4_GEMM_WS    ? FQ_GEMM4_WS_CONFIGS * 2 + 3
                                                        : 0;
                for (int cfg = 1; cfg <= ncfg; cfg++) {
                    int code = cfg;
                    if (impl == FQ_LIN4_GEMV_TC) code = gemv_codes[cfg - 1];
                    if (impl == FQ_LIN4_GEMV_STREAM) code = stream_codes[cfg - 1];
                    if (impl == FQ_LIN4_GEMV_BULK) code = bulk_codes[cfg - 1];
                    if (impl == FQ_LIN4_GEMV_FLAT) code = flat_codes[cfg - 1];
                    if (impl == FQ_LIN4_GEMV_WIN) code = win_codes[cfg - 1];
                    if (impl == FQ_LIN4_GEMM_WGMMA)                      /* tiles x (1 split, 3 splits) */
                        code = ((cfg - 1) % FQ_GEMM4_WGMMA_CONFIGS + 1) | (cfg > FQ_GEMM4_WGMMA_CONFIGS ? 3 << 4 : 1 << 4);
                    if (impl == FQ_LIN4_GEMM_WS) { /* x rows per tile x (1 split, 3 splits), then stream-K */
                        static const int sk_codes[3] = {0xf1, 0xf9, 0xf8}; /* 256; 256, 216 with the TMA store */
                        code = cfg > 2 * FQ_GEMM4_WS_CONFIGS
                                   ? sk_codes[cfg - 2 * FQ_GEMM4_WS_CONFIGS - 1]
                                   : ((cfg - 1) % FQ_GEMM4_WS_CONFIGS + 1) | (cfg > FQ_GEMM4_WS_CONFIGS ? 3 << 4 : 1 << 4);
                    }
                    if (impl == FQ_LIN4_GEMM_WS && ((code & 15) == 6 || (code & 15) == 7))
                        continue; /* retired numbers (the q4 loop, removed in session 10; test_selection) */
                    if (impl == FQ_LIN4_GEMM_WS && (code & 15) >= 11 && xdt != FQ_BF16)
                        continue; /* the fast decode is bf16 only (test_selection) */
                    snprintf(what, sizeof what, "%s cfg %d", fq_lin4_impl_name(impl), code);
                    run_and_check(ctx, FQ_LIN4_SELECT(impl, code), what, impl, &w, &x, with_bias ? &b : NULL, &r, ydt);
                }
            }
            /* the public choices; AUTO must be what fq_linear4_cuda_choice says */
            static const fq_linear_kernel pub[4] = {FQ_LINEAR_AUTO, FQ_LINEAR_GEMV, FQ_LINEAR_GEMM,
                                                    FQ_LINEAR_DEQUANT_BLAS};
            for (int p = 0; p < 4 && !g_only; p++) {
                if (sh->m * sh->n * sh->k > 50000000 && p == 1) continue; /* GEMV at large M: slow */
                fq_tensor *yt = NULL;
                int64_t ys[2] = {sh->m, sh->n};
                fq_lin4_impl impl = FQ_LIN4_NONE;
                if (fq_tensor_create(ctx, FQ_CUDA(0), ydt, 2, ys, &yt) == FQ_OK) {
                    ctx->linear_kernel = pub[p];
                    impl = fq_linear4_cuda_choice(ctx, x.t[0], w.q, yt);
                    ctx->linear_kernel = FQ_LINEAR_AUTO;
                    fq_tensor_free(yt);
                }
                CHECK(impl != FQ_LIN4_NONE, "no kernel for public choice %d: %s", p, fq_ctx_error(ctx));
                if (impl == FQ_LIN4_NONE) continue;
                if (p == 1) CHECK(impl == FQ_LIN4_GEMV_TC || impl == FQ_LIN4_GEMV_SIMPLE || impl == FQ_LIN4_GEMV_STREAM || impl == FQ_LIN4_GEMV_BULK || impl == FQ_LIN4_GEMV_FLAT || impl == FQ_LIN4_GEMV_WIN, "GEMV -> %s", fq_lin4_impl_name(impl));
                if (p == 3) CHECK(impl == FQ_LIN4_DEQUANT_BLAS, "DEQUANT_BLAS -> %s", fq_lin4_impl_name(impl));
                if (p == 0 && sh->m <= 16) CHECK(impl == FQ_LIN4_GEMV_TC || impl == FQ_LIN4_GEMV_SIMPLE || impl == FQ_LIN4_GEMV_STREAM || impl == FQ_LIN4_GEMV_BULK || impl == FQ_LIN4_GEMV_FLAT || impl == FQ_LIN4_GEMV_WIN, "AUTO M<=16 -> %s", fq_lin4_impl_name(impl));
                snprintf(what, sizeof what, "public %d (%s)", p, fq_lin4_impl_name(impl));
                run_and_check(ctx, pub[p], what, impl, &w, &x, with_bias ? &b : NULL, &r, ydt);
            }
            if (with_bias) hbias_free(&b);
            hact_free(&x);
            href_free(&r);
        }
        hweight_free(&w);
    }
}

/* What the automatic choices compute at 256 rows (gemm4_ws, bf16 x, f32 y): the plain one
 * the weights bitsandbytes' inference kernel forms, bf16(bf16(code) * bf16(absmax)), the
 * exact one dequantize's, bf16(code * absmax). The two differ by ~1e-3 relative, the f32
 * sums by ~1e-6: each result must sit on its own reference (rows 0..7 checked). */
static void test_auto_rounding(fq_ctx *ctx, const hweight *w) {
    const int64_t m = 256, n = w->n, k = w->k, rows = 8;
    hact x;
    fq_tensor *yt = NULL;
    int64_t ys[2] = {m, n};
    if (!make_act(ctx, 1, FQ_BF16, m, k, 0, &x)) return;
    int can = fq_tensor_create(ctx, FQ_CUDA(0), FQ_F32, 2, ys, &yt) == FQ_OK &&
              fq_linear4_cuda_can_run(ctx, FQ_LIN4_GEMM_WS, x.t[0], w->q, yt);
    fq_tensor_free(yt);
    double *ref[2] = {calloc((size_t)(rows * n), sizeof(double)), calloc((size_t)(rows * n), sizeof(double))};
    for (int64_t i = 0; can && ref[0] && ref[1] && i < rows; i++)
        for (int64_t j = 0; j < n; j++) {
            double sf = 0, se = 0;
            for (int64_t c = 0; c < k; c++) {
                const double xv = x.v[i * k + c];
                sf += xv * w->wfast[j * k + c];
                se += xv * from_bf16(to_bf16(w->wdq[j * k + c]));
            }
            ref[0][i * n + j] = sf;
            ref[1][i * n + j] = se;
        }
    static const int sels[2] = {FQ_LINEAR_AUTO, FQ_LIN4_AUTO_EXACT};
    for (int t = 0; can && ref[0] && ref[1] && t < 2; t++) {
        unsigned char *y = NULL;
        const fq_status s = run_linear(ctx, 0, sels[t], (hweight *)w, &x, NULL, FQ_F32, &y);
        CHECK(s == FQ_OK, "auto rounding run %d: %s", t, fq_ctx_error(ctx));
        if (s != FQ_OK) continue;
        double num[2] = {0, 0}, den = 0;
        for (int64_t e = 0; e < rows * n; e++) {
            const double v = decode1(FQ_F32, y, e);
            for (int r = 0; r < 2; r++) num[r] += (v - ref[r][e]) * (v - ref[r][e]);
            den += ref[t][e] * ref[t][e];
        }
        const double own = sqrt(num[t] / den), other = sqrt(num[1 - t] / den);
        CHECK(own < 1e-4 && other > 5e-4, "%s choice at M = 256: rel err %.3g against its rounding, %.3g against the "
              "other", t ? "exact" : "plain", own, other);
        printf("auto rounding, %s choice (%lldx%lld, M = 256): rel err %.2g against its own weights, %.2g against the "
               "other's\n", t ? "exact" : "plain", (long long)n, (long long)k, own, other);
        free(y);
    }
    free(ref[0]);
    free(ref[1]);
    hact_free(&x);
}

/* The automatic choice at large M on weights of more than 2^24 elements: gemm4_ws (where
 * it can run) from 192 up to 512 rows when K > N, up to 640 when N >= K, dequantize +
 * cuBLASLt above (bench/results/bench_linear_m768_h100_2026-11-27_session9.txt); with
 * bf16 x and the fast decode (the plain choice) up to 640 / 768 rows
 * (gemm4_ws_fast_range_h100_2026-11-28_session13.txt). */
static void test_auto_choice_large_m(fq_ctx *ctx) {
    static const int64_t nk[2][2] = {{4096, 4160}, {4160, 4096}}; /* 17039360 > 2^24 weights */
    static const int64_t ms[7] = {256, 512, 513, 640, 641, 768, 769};
    for (int v = 0; v < 2; v++) {
        const int64_t n = nk[v][0], k = nk[v][1], ws_max = k > n ? 640 : 768, ws_max_exact = k > n ? 512 : 640;
        hweight w;
        if (!make_weight(ctx, FQ_CUDA(0), FQ_QUANT_NF4, 1, n, k, 64, &w)) return;
        for (int i = 0; i < 7; i++) {
            fq_tensor *xt = NULL, *yt = NULL;
            int64_t xs[2] = {ms[i], k}, ys[2] = {ms[i], n};
            if (fq_tensor_create(ctx, FQ_CUDA(0), FQ_BF16, 2, xs, &xt) == FQ_OK &&
                fq_tensor_create(ctx, FQ_CUDA(0), FQ_BF16, 2, ys, &yt) == FQ_OK &&
                fq_linear4_cuda_can_run(ctx, FQ_LIN4_GEMM_WS, xt, w.q, yt)) {
                const fq_lin4_impl got = fq_linear4_cuda_choice(ctx, xt, w.q, yt);
                const fq_lin4_impl want = ms[i] <= ws_max ? FQ_LIN4_GEMM_WS : FQ_LIN4_DEQUANT_BLAS;
                CHECK(got == want, "auto choice at M = %lld, %lldx%lld: %s, expected %s", (long long)ms[i],
                      (long long)n, (long long)k, fq_lin4_impl_name(got), fq_lin4_impl_name(want));
                /* bf16 x: the plain choice lets gemm4_ws decode fast, the exact one does not */
                int cfg = -1;
                ctx->linear_kernel = FQ_LIN4_AUTO_EXACT;
                const fq_lin4_impl gx = fq_linear4_cuda_choice_cfg(ctx, xt, w.q, yt, &cfg);
                ctx->linear_kernel = FQ_LINEAR_AUTO;
                const fq_lin4_impl want_x = ms[i] <= ws_max_exact ? FQ_LIN4_GEMM_WS : FQ_LIN4_DEQUANT_BLAS;
                CHECK(gx == want_x && cfg == 0, "exact choice at M = %lld: %s cfg 0x%x", (long long)ms[i],
                      fq_lin4_impl_name(gx), cfg);
                (void)fq_linear4_cuda_choice_cfg(ctx, xt, w.q, yt, &cfg);
                CHECK(want != FQ_LIN4_GEMM_WS || cfg == FQ_GEMM4_WS_FAST_OK, "auto choice at M = %lld: cfg 0x%x",
                      (long long)ms[i], cfg);
            }
            fq_tensor_free(xt);
            fq_tensor_free(yt);
        }
        if (v == 0) test_auto_rounding(ctx, &w);
        hweight_free(&w);
    }
}

/* The exact selection refuses what it cannot run; the public one falls back. */
static void test_selection(fq_ctx *ctx) {
    hweight w;
    if (!make_weight(ctx, FQ_CUDA(0), FQ_QUANT_NF4, 0, 64, 256, 64, &w)) return;
    hact x;
    if (!make_act(ctx, 1, FQ_F32, 4, 256, 0, &x)) { hweight_free(&w); return; }
    unsigned char *y = NULL;
    fq_status s = run_linear(ctx, 0, FQ_LIN4_SELECT(FQ_LIN4_GEMV_TC, 0), &w, &x, NULL, FQ_F32, &y);
    CHECK(s == FQ_ERR_UNSUPPORTED, "gemv4_tc with f32 x -> %s", fq_status_str(s));
    CHECK(strstr(fq_ctx_error(ctx), "gemv4_tc") != NULL, "message names the kernel: %s", fq_ctx_error(ctx));
    free(y);
    y = NULL;
    /* gemm4_ws tile configurations that do not exist (past the table) or no longer
     * exist (6, 7: retired): an error naming the kernel, no read past the table, no
     * launch of a missing kernel */
    hact xb;
    if (make_act(ctx, 1, FQ_BF16, 64, 256, 0, &xb)) {
        static const int bad[3] = {FQ_GEMM4_WS_CONFIGS + 1, 6, 7 | 1 << 4};
        for (int i = 0; i < 3; i++) {
            s = run_linear(ctx, 0, FQ_LIN4_SELECT(FQ_LIN4_GEMM_WS, bad[i]), &w, &xb, NULL, FQ_BF16, &y);
            CHECK(s != FQ_OK, "gemm4_ws configuration 0x%x accepted", bad[i]);
            CHECK(s == FQ_ERR_UNSUPPORTED || strstr(fq_ctx_error(ctx), "gemm4_ws") != NULL,
                  "message names the kernel: %s", fq_ctx_error(ctx));
            free(y);
            y = NULL;
        }
        hact_free(&xb);
    }
    /* the fast-decode configurations multiply in bf16: f16 x is refused, naming the kernel */
    hact xh;
    if (make_act(ctx, 1, FQ_F16, 64, 256, 0, &xh)) {
        s = run_linear(ctx, 0, FQ_LIN4_SELECT(FQ_LIN4_GEMM_WS, 11), &w, &xh, NULL, FQ_F16, &y);
        CHECK(s != FQ_OK && strstr(fq_ctx_error(ctx), "gemm4_ws") != NULL, "gemm4_ws fast decode with f16 x: %s",
              s == FQ_OK ? "accepted" : fq_ctx_error(ctx));
        free(y);
        y = NULL;
        hact_free(&xh);
    }
    fq_tensor *yt = NULL;
    int64_t ys[2] = {4, 64};
    if (fq_tensor_create(ctx, FQ_CUDA(0), FQ_F32, 2, ys, &yt) == FQ_OK) {
        ctx->linear_kernel = FQ_LINEAR_GEMV;
        CHECK(fq_linear4_cuda_choice(ctx, x.t[0], w.q, yt) == FQ_LIN4_GEMV_SIMPLE, "GEMV with f32 x -> simple");
        ctx->linear_kernel = FQ_LINEAR_GEMM;
        CHECK(fq_linear4_cuda_choice(ctx, x.t[0], w.q, yt) == FQ_LIN4_DEQUANT_BLAS, "GEMM with f32 x -> dequant");
        ctx->linear_kernel = FQ_LINEAR_AUTO;
        fq_tensor_free(yt);
    }
    /* M = 0: nothing to do, no error */
    hact x0;
    if (make_act(ctx, 1, FQ_BF16, 0, 256, 0, &x0)) {
        s = run_linear(ctx, 0, FQ_LINEAR_AUTO, &w, &x0, NULL, FQ_BF16, &y);
        CHECK(s == FQ_OK, "M = 0: %s", fq_ctx_error(ctx));
        free(y);
        hact_free(&x0);
    }
    hact_free(&x);
    hweight_free(&w);
}

static int g_ws_streamk_ran; /* a forced stream-K gemm4_ws launch succeeded on cuda:0 */

/* gemm4_ws's stream-K flags must be zero after every launch (the next launch's owners
 * wait for them to be raised). Once a stream-K launch has run, the flags must exist:
 * a missing set is a failure, not a reason to skip. */
static void ws_flags_zero(fq_ctx *ctx, const char *after) {
    fq_cuda_dev *d = NULL;
    const int have = fq_cuda_dev_get(ctx, 0, &d) == FQ_OK && d->lin_flags.ptr;
    CHECK(have || !g_ws_streamk_ran, "no gemm4_ws flags on cuda:0 after %s, though stream-K ran", after);
    if (!have) return;
    const size_t n = 2 * FQ_GEMM4_WS_MAX_SMS;
    int *h = calloc(n, sizeof(int));
    CHECK(h != NULL, "out of host memory reading the gemm4_ws flags");
    if (!h) return;
    const cudaError_t e = cudaMemcpy(h, d->lin_flags.ptr, n * sizeof(int), cudaMemcpyDeviceToHost);
    CHECK(e == cudaSuccess, "reading the gemm4_ws flags: %s", cudaGetErrorString(e));
    size_t bad = n;
    for (size_t i = 0; e == cudaSuccess && i < n && bad == n; i++)
        if (h[i] != 0) bad = i;
    CHECK(bad == n, "gemm4_ws flag %zu is %d after %s (must be left 0)", bad, bad < n ? h[bad] : 0, after);
    free(h);
}

/* The exact GEMV decodes (gemv4_bulk cfg 1, gemv4_stream cfg 0x21) use the very
 * weights dequantize writes: against a reference whose W is rounded to x's type
 * (bf16/f16 of the f32 code * absmax) they agree to f32 summation error alone
 * (tolerance with u_w = 0, f32 y), which the fast decodes (code rounded before the
 * absmax is applied) do not meet. */
static void test_exact_rounding(fq_ctx *ctx) {
    static const struct { int64_t m, n, k, bs; fq_quant_type qt; int nested; fq_dtype xdt; } cases[] = {
        {1, 1000, 3072, 64, FQ_QUANT_NF4, 1, FQ_BF16},
        {2, 77, 1664, 32, FQ_QUANT_FP4, 0, FQ_F16},
        {1, 300, 2048, 256, FQ_QUANT_FP4, 1, FQ_BF16},
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        hweight w;
        if (!make_weight(ctx, FQ_CUDA(0), cases[ci].qt, cases[ci].nested, cases[ci].n, cases[ci].k, cases[ci].bs, &w))
            return;
        hact x;
        href r = {0};
        if (!make_act(ctx, 1, cases[ci].xdt, cases[ci].m, cases[ci].k, 0, &x)) {
            hweight_free(&w);
            return;
        }
        /* W as dequantize rounds it to x's type */
        float *wq = malloc((size_t)(w.n * w.k) * 4);
        int ok = wq != NULL;
        for (int64_t i = 0; ok && i < w.n * w.k; i++)
            wq[i] = x.dt == FQ_BF16 ? from_bf16(to_bf16(w.wdq[i])) : from_f16(to_f16(w.wdq[i]));
        float *keep = w.wdq;
        if (ok) {
            w.wdq = wq;
            ok = make_ref(&w, &x, &r);
            w.wdq = keep;
        }
        CHECK(ok, "out of host memory");
        /* impl NONE: the automatic exact choice (FQ_LIN4_AUTO_EXACT) */
        static const struct { fq_lin4_impl impl; int cfg; int exact; } sels[] = {
            {FQ_LIN4_GEMV_BULK, FQ_GEMV4_BULK_EXACT, 1}, {FQ_LIN4_GEMV_STREAM, 0x21, 1}, {FQ_LIN4_NONE, 0, 1},
            {FQ_LIN4_GEMV_BULK, 2, 0}};
        for (size_t si = 0; ok && si < sizeof sels / sizeof sels[0]; si++) {
            fq_tensor *yt = NULL;
            int64_t ys[2] = {x.m, w.n};
            int can = sels[si].impl == FQ_LIN4_NONE;
            if (!can && fq_tensor_create(ctx, FQ_CUDA(0), FQ_F32, 2, ys, &yt) == FQ_OK) {
                can = fq_linear4_cuda_can_run(ctx, sels[si].impl, x.t[0], w.q, yt);
                fq_tensor_free(yt);
            }
            if (!can) continue;
            unsigned char *y = NULL;
            const int sel = sels[si].impl == FQ_LIN4_NONE ? FQ_LIN4_AUTO_EXACT
                                                          : FQ_LIN4_SELECT(sels[si].impl, sels[si].cfg);
            fq_status s = run_linear(ctx, 0, sel, &w, &x, NULL, FQ_F32, &y);
            CHECK(s == FQ_OK, "exact rounding run: %s", fq_ctx_error(ctx));
            if (s == FQ_OK) {
                char what[96];
                snprintf(what, sizeof what, "%s cfg %d vs W rounded like dequantize",
                         sels[si].impl == FQ_LIN4_NONE ? "auto exact" : fq_lin4_impl_name(sels[si].impl), sels[si].cfg);
                if (sels[si].exact) {
                    compare(what, &w, &x, NULL, &r, FQ_F32, y, 0.0);
                } else {
                    /* the fast decode must differ from it by more than summation error
                     * somewhere (else this test could not tell the two apart) */
                    double worst = 0;
                    for (int64_t e = 0; e < x.m * w.n; e++) {
                        float v;
                        memcpy(&v, y + 4 * e, 4);
                        const double d = fabs((double)v - r.ref[e]) / (4e-6 * r.s1[e] + 1e-30);
                        if (d > worst) worst = d;
                    }
                    CHECK(worst > 1.0, "%s: the fast decode matches the exact weights (worst %.3g)", what, worst);
                }
            }
            free(y);
        }
        free(wq);
        href_free(&r);
        hact_free(&x);
        hweight_free(&w);
    }
}

/* gemm4_ws decodes W exactly like dequantize: with x = identity (x[m, k] = 1 if
 * m == k) every output is one product, so y[m, n] must equal W[n, m] rounded once
 * to x's type, bit for bit, for every format, blocksize and split. */
static void test_ws_exact(fq_ctx *ctx) {
    static const int64_t bss[3] = {64, 256, 1024};
    for (int v = 0; v < 12; v++) {
        const fq_quant_type qt = (v & 1) ? FQ_QUANT_FP4 : FQ_QUANT_NF4;
        const int nested = (v >> 1) & 1;
        const int64_t bs = bss[v / 4], n = 200, k = 1024;
        const fq_dtype xdt = v % 3 == 1 ? FQ_F16 : FQ_BF16;
        hweight w;
        if (!make_weight(ctx, FQ_CUDA(0), qt, nested, n, k, bs, &w)) return;
        float *xv = calloc((size_t)(k * k), sizeof(float));
        hact x;
        memset(&x, 0, sizeof x);
        x.m = k;
        x.k = k;
        x.dt = xdt;
        x.v = xv;
        for (int64_t i = 0; xv && i < k; i++) xv[i * k + i] = 1.0f;
        void *b = xv ? encode(xdt, xv, k * k) : NULL;
        int64_t shape[2] = {k, k};
        fq_status s = b ? fq_tensor_from_host(ctx, FQ_CUDA(0), xdt, 2, shape, b, &x.t[0]) : FQ_ERR_OUT_OF_MEMORY;
        free(b);
        CHECK(s == FQ_OK, "identity x: %s", fq_ctx_error(ctx));
        /* f32 y with 1 and 4 K splits; then y of x's dtype through the TMA-store
         * configurations (216 rows, one split; 256 rows, stream-K) and with K splits
         * (256 rows: 6, 6 and 4 of the 16 K tiles; 192 rows: 8 and 8; the TMA store is
         * off with a split) */
        static const int sels[6] = {1 << 4, 4 << 4, 8 | 1 << 4, 9 | 0xf0, 9 | 3 << 4, 3 | 2 << 4};
        /* bf16 x: the fast-decode configurations (216 rows with the TMA store, 256 rows
         * stream-K, 128 rows with 3 K splits and f32 y) against bf16(bf16(code) x
         * bf16(absmax)), bit for bit */
        static const int fast_sels[3] = {11 | 1 << 4, 12 | 0xf0, 14 | 3 << 4};
        const int nsel = xdt == FQ_BF16 ? 9 : 6;
        for (int si = 0; s == FQ_OK && si < nsel; si++) {
            const int fast = si >= 6, sel = fast ? fast_sels[si - 6] : sels[si];
            const fq_dtype ydt = si < 2 || si == 8 ? FQ_F32 : xdt;
            unsigned char *y = NULL;
            fq_tensor *yt = NULL;
            int64_t ys[2] = {k, n};
            int can = fq_tensor_create(ctx, FQ_CUDA(0), ydt, 2, ys, &yt) == FQ_OK &&
                      fq_linear4_cuda_can_run(ctx, FQ_LIN4_GEMM_WS, x.t[0], w.q, yt);
            fq_tensor_free(yt);
            if (!can) break;
            fq_status r = run_linear(ctx, 0, FQ_LIN4_SELECT(FQ_LIN4_GEMM_WS, sel), &w, &x, NULL, ydt, &y);
            CHECK(r == FQ_OK, "gemm4_ws identity: %s", fq_ctx_error(ctx));
            if (r == FQ_OK && (sel & 0xf0) == 0xf0) g_ws_streamk_ran = 1;
            if (r == FQ_OK) {
                int64_t bad = -1;
                for (int64_t i = 0; i < k * n && bad < 0; i++) {
                    const int64_t mm = i / n, nn = i % n;
                    float want = fast ? w.wfast[nn * k + mm] : w.wdq[nn * k + mm];
                    if (!fast) want = xdt == FQ_BF16 ? from_bf16(to_bf16(want)) : from_f16(to_f16(want));
                    const float got = (float)decode1(ydt, y, i);
                    if (got != want && !(got == 0 && want == 0)) bad = i;
                }
                CHECK(bad < 0, "gemm4_ws W rounding differs from %s at (m=%lld, n=%lld) %s%s bs=%lld x=%s "
                      "cfg 0x%x y=%s", fast ? "the fast decode's" : "dequantize", (long long)(bad / n),
                      (long long)(bad % n), fq_quant_type_name(qt), nested ? "+dq" : "", (long long)bs,
                      fq_dtype_name(xdt), sel, fq_dtype_name(ydt));
            }
            free(y);
        }
        ws_flags_zero(ctx, "test_ws_exact");
        hact_free(&x);
        hweight_free(&w);
    }
}

/* The dequantize kernel (the fallback's first half) agrees with the host formula. */
static void test_dequant_agrees(fq_ctx *ctx) {
    for (int nested = 0; nested < 2; nested++) {
        hweight w;
        if (!make_weight(ctx, FQ_CUDA(0), nested ? FQ_QUANT_FP4 : FQ_QUANT_NF4, nested, 37, 100, 64, &w)) return;
        fq_tensor *d = NULL;
        fq_status s = fq_dequantize_4bit(ctx, w.q, FQ_F32, &d);
        CHECK(s == FQ_OK, "dequantize: %s", fq_ctx_error(ctx));
        if (s == FQ_OK) {
            float *h = malloc((size_t)(w.n * w.k) * 4);
            if (h && fq_tensor_to_host(ctx, d, h) == FQ_OK) {
                int64_t bad = -1;
                for (int64_t i = 0; i < w.n * w.k && bad < 0; i++)
                    if (h[i] != w.wdq[i] && !(h[i] == 0 && w.wdq[i] == 0)) bad = i;
                CHECK(bad < 0, "dequantize kernel disagrees with the host formula at %lld: %.9g vs %.9g (nested %d)",
                      (long long)bad, bad >= 0 ? h[bad] : 0.0, bad >= 0 ? w.wdq[bad] : 0.0, nested);
            }
            free(h);
            fq_tensor_free(d);
        }
        hweight_free(&w);
    }
}

int main(int argc, char **argv) {
    g_ndev = fq_cuda_device_count();
    if (g_ndev == 0) {
        SKIP("no CUDA device");
        return check_summary("test_cuda_linear");
    }
    fq_ctx *ctx;
    if (fq_ctx_create(&ctx) != FQ_OK) return 1;
    int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--impl") == 0) g_only = argv[i + 1];
    int gemv_only = argc > 1 && strcmp(argv[1], "--gemv") == 0; /* the M <= 16 shapes only */
    if (g_ndev < 2) SKIP("one GPU: the cuda:0 -> cuda:1 identity checks need two");
    test_selection(ctx);
    test_auto_choice_large_m(ctx);
    test_dequant_agrees(ctx);
    test_ws_exact(ctx);
    test_exact_rounding(ctx);
    int counter = 0;
    for (size_t i = 0; i < sizeof g_shapes / sizeof g_shapes[0]; i++) {
        if (quick && g_shapes[i].m * g_shapes[i].n * g_shapes[i].k > 50000000) continue;
        if (gemv_only && g_shapes[i].m > 16) continue;
        const int f0 = g_fail;
        test_shape(ctx, &g_shapes[i], &counter);
        fprintf(stderr, "shape M=%lld N=%lld K=%lld bs=%lld: %s\n", (long long)g_shapes[i].m, (long long)g_shapes[i].n,
                (long long)g_shapes[i].k, (long long)g_shapes[i].bs, g_fail == f0 ? "ok" : "FAILED");
    }
    ws_flags_zero(ctx, "the shapes");
    fq_ctx_free(ctx);
    return check_summary("test_cuda_linear");
}
#endif

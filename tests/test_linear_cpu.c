/* fq_linear_4bit on the CPU: every kernel and ISA against a float64 reference
 * computed on the dequantized weight, plus placement, shape and dtype errors.
 *
 * Weights are built from random members with fq_qtensor_from_members (random
 * nibbles, positive absmax; nested: random 8-bit absmax, nested absmax and
 * offset), so this test does not depend on the quantizer. The reference
 * dequantizes with w = LUT[nibble] * absmax (nested: absmax = code256[q] *
 * nested_absmax[b / 256] + offset), all in double.
 *
 * Tolerance, per output dtype (docs/linear.md):
 *   |y - ref| <= u_out * |ref| + 2^-18 * (sum_k |w_k x_k| + |bias|)
 * u_out = 2^-8 (bf16), 2^-11 (f16), 2^-24 (f32) is the unit roundoff of the
 * output dtype (one rounding); the second term covers f32 accumulation and
 * the f32 rounding of LUT * absmax and of the nested absmax (observed: a few
 * percent of it). x and bias values are exact in every dtype. */
#include "check.h"
#include "core/core.h"
#include "core/qtensor.h"
#include "kernels/cpu/linear4_cpu.h"

#include <math.h>
#include <string.h>

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) {
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double unif(double lo, double hi) { return lo + (hi - lo) * (double)(rnd() >> 11) * 0x1p-53; }

/* ---- test-local dtype helpers (independent of the library's) ---- */
static double bf16_val(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static double f16_val(uint16_t h) {
    int e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25);
    return (h & 0x8000) ? -v : v;
}
/* Values j / 128 with |j| < 128 are exact in bf16, f16 and f32. */
static void put_exact(void *p, fq_dtype t, int64_t i, double v) {
    float f = (float)v;
    uint32_t u;
    memcpy(&u, &f, 4);
    if (t == FQ_F32) ((float *)p)[i] = f;
    else if (t == FQ_F64) ((double *)p)[i] = v;
    else if (t == FQ_BF16) ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
    else { /* f16 of a value that is exact in f16: rebuild exponent and mantissa */
        uint16_t sg = (uint16_t)((u >> 16) & 0x8000);
        int e = (int)((u >> 23) & 255) - 127 + 15;
        ((uint16_t *)p)[i] = (u & 0x7fffffff) == 0 ? sg : (uint16_t)(sg | (e << 10) | ((u >> 13) & 1023));
    }
}
static double get_val(const void *p, fq_dtype t, int64_t i) {
    switch (t) {
    case FQ_F32: return ((const float *)p)[i];
    case FQ_F64: return ((const double *)p)[i];
    case FQ_BF16: return bf16_val(((const uint16_t *)p)[i]);
    default: return f16_val(((const uint16_t *)p)[i]);
    }
}
static double u_out(fq_dtype t) { return t == FQ_BF16 ? 0x1p-8 : t == FQ_F16 ? 0x1p-11 : 0x1p-24; }

/* ---- weights ---- */
typedef struct {
    fq_qtensor *q;
    double *w; /* dequantized [n][k] */
} wt;

static wt make_weight(fq_ctx *ctx, int64_t N, int64_t K, fq_quant_type type, int64_t bs, int nested) {
    wt r = {NULL, NULL};
    fq_qtensor_info info = {0};
    info.type = type;
    info.blocksize = bs;
    info.double_quant = nested;
    info.orig_dtype = FQ_BF16;
    info.ndim = 2;
    info.shape[0] = N;
    info.shape[1] = K;
    info.offset = nested ? 0.3f : 0.0f;
    const int64_t n = N * K, nb = (n + bs - 1) / bs, nnb = (nb + 255) / 256;
    uint8_t *packed = malloc((size_t)(n + 1) / 2 + 1), *qabs = malloc((size_t)nb + 1);
    float *absmax = malloc((size_t)(nb + 1) * 4), *nabs = malloc((size_t)(nnb + 1) * 4);
    for (int64_t i = 0; i < (n + 1) / 2; i++) packed[i] = (uint8_t)rnd();
    for (int64_t b = 0; b < nb; b++) { absmax[b] = (float)unif(0.05, 1.0); qabs[b] = (uint8_t)rnd(); }
    for (int64_t b = 0; b < nnb; b++) nabs[b] = (float)unif(0.01, 0.2);
    const void *members[FQ_QMEMBER_COUNT] = {packed, nested ? (void *)qabs : (void *)absmax, fq_quant_map(type),
                                             nested ? nabs : NULL, nested ? fq_dynamic_map_signed() : NULL};
    CHECK_OK(ctx, fq_qtensor_from_members(ctx, FQ_CPU, &info, members, &r.q));
    r.w = malloc((size_t)(n ? n : 1) * sizeof(double));
    const float *lut = fq_quant_map(type), *code = fq_dynamic_map_signed();
    for (int64_t f = 0; f < n; f++) {
        int nib = (f & 1) ? packed[f / 2] & 15 : packed[f / 2] >> 4;
        int64_t b = f / bs;
        double a = nested ? (double)code[qabs[b]] * nabs[b / 256] + (double)info.offset : absmax[b];
        r.w[f] = (double)lut[nib] * a;
    }
    free(packed); free(qabs); free(absmax); free(nabs);
    return r;
}

static void free_weight(wt *w) { fq_qtensor_free(w->q); free(w->w); }

/* ---- one problem: x [lead..., K], y [lead..., N] ---- */
typedef struct {
    int64_t m, n, k;
    fq_quant_type type;
    int64_t bs;
    int nested;
    fq_dtype xt, yt;
    int bias;       /* 0: none, else bias dtype + 1 */
    int xdims;      /* 2: x [m, k]; 3: x [2, m/2, k] (m even) */
} lcase;

typedef struct {
    fq_tensor *x, *b, *y;
    double *ref, *mag;
    wt w;
} prob;

static fq_tensor *make_tensor(fq_ctx *ctx, fq_dtype t, int nd, const int64_t *shape, double (*gen)(void)) {
    int64_t n = fq_shape_numel(nd, shape);
    void *h = malloc((size_t)(n ? n : 1) * fq_dtype_size(t));
    for (int64_t i = 0; i < n; i++) put_exact(h, t, i, gen ? gen() : 0.0);
    fq_tensor *r = NULL;
    CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CPU, t, nd, shape, h, &r));
    free(h);
    return r;
}
static double gen_x(void) { return (double)((int)(rnd() % 255) - 127) / 128.0; }

static prob make_prob(fq_ctx *ctx, const lcase *c) {
    prob p = {0};
    p.w = make_weight(ctx, c->n, c->k, c->type, c->bs, c->nested);
    int64_t xs[3], ys[3];
    int nd = c->xdims;
    if (nd == 3) { xs[0] = ys[0] = 2; xs[1] = ys[1] = c->m / 2; }
    else xs[0] = ys[0] = c->m;
    xs[nd - 1] = c->k;
    ys[nd - 1] = c->n;
    p.x = make_tensor(ctx, c->xt, nd, xs, gen_x);
    p.y = make_tensor(ctx, c->yt, nd, ys, NULL);
    if (c->bias) {
        int64_t bsz = c->n;
        p.b = make_tensor(ctx, (fq_dtype)(c->bias - 1), 1, &bsz, gen_x);
    }
    p.ref = malloc((size_t)(c->m * c->n + 1) * sizeof(double));
    p.mag = malloc((size_t)(c->m * c->n + 1) * sizeof(double));
    const void *xh = fq_tensor_host_data(p.x), *bh = p.b ? fq_tensor_host_data(p.b) : NULL;
    for (int64_t i = 0; i < c->m; i++)
        for (int64_t j = 0; j < c->n; j++) {
            double s = 0, a = 0;
            for (int64_t k = 0; k < c->k; k++) {
                double t = p.w.w[j * c->k + k] * get_val(xh, c->xt, i * c->k + k);
                s += t;
                a += fabs(t);
            }
            if (bh) { double bv = get_val(bh, (fq_dtype)(c->bias - 1), j); s += bv; a += fabs(bv); }
            p.ref[i * c->n + j] = s;
            p.mag[i * c->n + j] = a;
        }
    return p;
}

static void free_prob(prob *p) {
    fq_tensor_free(p->x); fq_tensor_free(p->b); fq_tensor_free(p->y);
    free(p->ref); free(p->mag);
    free_weight(&p->w);
}

/* Largest |y - ref| / tol seen per output dtype (printed at the end). */
static double g_worst[FQ_DTYPE_COUNT];

/* Returns the number of elements out of tolerance (prints the first). */
static int64_t compare(const lcase *c, const prob *p, const char *what) {
    const void *yh = fq_tensor_host_data(p->y);
    int64_t bad = 0;
    for (int64_t i = 0; i < c->m * c->n; i++) {
        double v = get_val(yh, c->yt, i), r = p->ref[i];
        double tol = u_out(c->yt) * fabs(r) + 0x1p-18 * p->mag[i] + 1e-30;
        if (fabs(v - r) / tol > g_worst[c->yt]) g_worst[c->yt] = fabs(v - r) / tol;
        if (!(fabs(v - r) <= tol)) {
            if (!bad)
                fprintf(stderr, "  %s: [%lld] got %.9g want %.9g (tol %.3g) m=%lld n=%lld k=%lld %s bs=%lld nested=%d "
                        "x=%s y=%s\n", what, (long long)i, v, r, tol, (long long)c->m, (long long)c->n, (long long)c->k,
                        fq_quant_type_name(c->type), (long long)c->bs, c->nested, fq_dtype_name(c->xt),
                        fq_dtype_name(c->yt));
            bad++;
        }
    }
    return bad;
}

static void clear_y(prob *p) { memset(fq_tensor_host_data(p->y), 0xff, fq_tensor_nbytes(p->y)); /* NaN */ }

static const char *kname(fq_linear_kernel k) {
    static const char *n[] = {"auto", "gemv", "gemm", "dequant_blas"};
    return n[k];
}

static void run_case(fq_ctx *ctx, const lcase *c) {
    prob p = make_prob(ctx, c);
    if (!p.w.q || !p.x || !p.y) { free_prob(&p); return; }
    /* Public entry point with every forced kernel. */
    for (int k = FQ_LINEAR_AUTO; k <= FQ_LINEAR_DEQUANT_BLAS; k++) {
        clear_y(&p);
        fq_ctx_set_linear_kernel(ctx, (fq_linear_kernel)k);
        CHECK_OK(ctx, fq_linear_4bit(ctx, p.x, p.w.q, p.b, p.y));
        CHECK(compare(c, &p, kname((fq_linear_kernel)k)) == 0, "kernel %s within tolerance", kname((fq_linear_kernel)k));
    }
    fq_ctx_set_linear_kernel(ctx, FQ_LINEAR_AUTO);
    /* Every ISA this CPU has, through the kernel entry point, and results
     * bit-identical for 1, 2 and 3 threads. */
    fq_cpu_linear4_args a = {fq_tensor_host_data(p.x), c->xt, p.b ? fq_tensor_host_data(p.b) : NULL,
                             p.b ? (fq_dtype)(c->bias - 1) : FQ_F32, fq_tensor_host_data(p.y), c->yt, c->m,
                             fq_w4_view_of(p.w.q), 1 /* threads even for these small shapes */};
    size_t ybytes = fq_tensor_nbytes(p.y);
    void *first = malloc(ybytes ? ybytes : 1);
    for (int isa = FQ_CPU_ISA_SCALAR; isa <= (int)fq_cpu_isa_best(); isa++) {
        for (int k = FQ_LINEAR_GEMV; k <= FQ_LINEAR_DEQUANT_BLAS; k++) {
            size_t sb = fq_cpu_linear4_scratch_bytes((fq_linear_kernel)k, (fq_cpu_isa)isa, &a);
            void *scratch = NULL;
            if (sb && posix_memalign(&scratch, 64, sb) != 0) { CHECK(0, "scratch"); continue; }
            int saved = ctx->nthreads;
            for (int nt = 1; nt <= 3; nt++) {
                ctx->nthreads = nt;
                clear_y(&p);
                fq_cpu_linear4(ctx, (fq_linear_kernel)k, (fq_cpu_isa)isa, &a, scratch);
                char what[64];
                snprintf(what, sizeof what, "%s/%s/%d threads", fq_cpu_isa_name((fq_cpu_isa)isa),
                         kname((fq_linear_kernel)k), nt);
                CHECK(compare(c, &p, what) == 0, "%s within tolerance", what);
                if (nt == 1) memcpy(first, fq_tensor_host_data(p.y), ybytes);
                else CHECK(memcmp(first, fq_tensor_host_data(p.y), ybytes) == 0, "%s: same bits as 1 thread", what);
            }
            ctx->nthreads = saved;
            free(scratch);
        }
    }
    free(first);
    free_prob(&p);
}

/* ---- errors ---- */

static int has(fq_ctx *ctx, const char *s) { return strstr(fq_ctx_error(ctx), s) != NULL; }

static void test_errors(fq_ctx *ctx) {
    const int64_t N = 24, K = 64;
    const char *name = "transformer_blocks.3.attn.to_q";
    int64_t xs[2] = {3, K}, ys[2] = {3, N}, bsz = N;

    /* Every member of the state, misplaced alone, is caught and named
     * (including quant_map: the diffusers#10798 case). y is left untouched. */
    for (int nested = 0; nested <= 1; nested++)
        for (int m = 0; m < FQ_QMEMBER_COUNT; m++) {
            wt w = make_weight(ctx, N, K, FQ_QUANT_NF4, 64, nested);
            if (!w.q) continue;
            if (!fq_qtensor_member_bytes(w.q, (fq_qmember)m)) { free_weight(&w); continue; }
            CHECK_OK(ctx, fq_qtensor_set_name(ctx, w.q, name));
            fq_tensor *x = make_tensor(ctx, FQ_BF16, 2, xs, gen_x), *y = make_tensor(ctx, FQ_F32, 2, ys, NULL);
            memset(fq_tensor_host_data(y), 0x5a, fq_tensor_nbytes(y));
            CHECK_OK(ctx, fq_test_misplace_member(ctx, w.q, (fq_qmember)m, FQ_CUDA(1)));
            fq_status s = fq_linear_4bit(ctx, x, w.q, NULL, y);
            CHECK(s == FQ_ERR_DEVICE_MISMATCH, "misplaced %s -> %s", fq_qmember_name((fq_qmember)m), fq_status_str(s));
            CHECK(has(ctx, name) && has(ctx, fq_qmember_name((fq_qmember)m)) && has(ctx, "cuda:1") && has(ctx, "cpu"),
                  "message names tensor, member and devices: %s", fq_ctx_error(ctx));
            const unsigned char *yb = fq_tensor_host_data(y);
            int intact = 1;
            for (size_t i = 0; i < fq_tensor_nbytes(y); i++) intact &= yb[i] == 0x5a;
            CHECK(intact, "y untouched after a placement error");
            fq_tensor_free(x); fq_tensor_free(y);
            free_weight(&w);
        }

    wt w = make_weight(ctx, N, K, FQ_QUANT_FP4, 64, 1);
    CHECK_OK(ctx, fq_qtensor_set_name(ctx, w.q, name));
    fq_tensor *x = make_tensor(ctx, FQ_BF16, 2, xs, gen_x), *y = make_tensor(ctx, FQ_BF16, 2, ys, NULL);
    fq_tensor *b = make_tensor(ctx, FQ_F32, 1, &bsz, gen_x);
    CHECK_OK(ctx, fq_linear_4bit(ctx, x, w.q, b, y));

    /* x, bias or y on another device: a real copy on cuda:0 when there is a
     * GPU, else the tensor's recorded device is changed for the call (the
     * check reads only that, and nothing runs). */
    fq_tensor *ops[3] = {x, b, y};
    const char *roles[3] = {"x", "bias", "y"};
    const int gpu = fq_cuda_device_count() > 0;
    const fq_device other = gpu ? FQ_CUDA(0) : FQ_CUDA(1);
    char oname[16];
    fq_device_name(other, oname, sizeof oname);
    for (int i = 0; i < 3; i++) {
        CHECK_OK(ctx, fq_tensor_set_name(ctx, ops[i], roles[i][0] == 'x' ? "blocks.3.in" : roles[i]));
        fq_tensor *args[3] = {x, b, y}, *moved = NULL;
        fq_device saved = ops[i]->buf.dev;
        if (gpu) {
            CHECK_OK(ctx, fq_tensor_copy_to(ctx, ops[i], other, &moved));
            if (!moved) continue;
            args[i] = moved;
        } else {
            ops[i]->buf.dev = other;
        }
        fq_status s = fq_linear_4bit(ctx, args[0], w.q, args[1], args[2]);
        ops[i]->buf.dev = saved;
        fq_tensor_free(moved);
        CHECK(s == FQ_ERR_DEVICE_MISMATCH, "%s elsewhere -> %s", roles[i], fq_status_str(s));
        CHECK(has(ctx, roles[i]) && has(ctx, oname) && has(ctx, "cpu"), "message: %s", fq_ctx_error(ctx));
    }

    /* Wrong shapes. */
    struct { int xd; int64_t xs0, xs1; int yd; int64_t ys0, ys1; int64_t bn; } bad[] = {
        {2, 3, K + 1, 2, 3, N, N},   /* x's last dim is not K      */
        {2, 3, K, 2, 3, N + 1, N},   /* y's last dim is not N      */
        {2, 3, K, 2, 4, N, N},       /* leading dims differ        */
        {2, 3, K, 1, N, 0, N},       /* y rank differs             */
        {2, 3, K, 2, 3, N, N + 1},   /* bias length                */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int64_t a1[2] = {bad[i].xs0, bad[i].xs1}, a2[2] = {bad[i].ys0, bad[i].ys1};
        fq_tensor *xx = make_tensor(ctx, FQ_F32, bad[i].xd, a1, gen_x), *yy = make_tensor(ctx, FQ_F32, bad[i].yd, a2, NULL);
        fq_tensor *bb = make_tensor(ctx, FQ_F32, 1, &bad[i].bn, gen_x);
        fq_status s = fq_linear_4bit(ctx, xx, w.q, bb, yy);
        CHECK(s == FQ_ERR_SHAPE, "bad shape case %zu -> %s (%s)", i, fq_status_str(s), fq_ctx_error(ctx));
        fq_tensor_free(xx); fq_tensor_free(yy); fq_tensor_free(bb);
    }
    {   /* a 2-D bias, and a weight that is not 2-D */
        int64_t b2[2] = {1, N};
        fq_tensor *bb = make_tensor(ctx, FQ_F32, 2, b2, gen_x);
        CHECK(fq_linear_4bit(ctx, x, w.q, bb, y) == FQ_ERR_SHAPE, "2-D bias");
        fq_tensor_free(bb);
        fq_qtensor_info info;
        fq_qtensor_get_info(w.q, &info);
        info.ndim = 3;
        info.shape[0] = 2; info.shape[1] = N / 2; info.shape[2] = K;
        size_t nb = fq_qtensor_member_bytes(w.q, FQ_QMEMBER_ABSMAX), np = fq_qtensor_member_bytes(w.q, FQ_QMEMBER_PACKED),
               nn = fq_qtensor_member_bytes(w.q, FQ_QMEMBER_NESTED_ABSMAX);
        void *mp = calloc(1, np), *ma = calloc(1, nb), *mn = calloc(1, nn);
        for (size_t i = 0; i < nn / 4; i++) ((float *)mn)[i] = 1.0f;
        const void *mem[FQ_QMEMBER_COUNT] = {mp, ma, fq_quant_map(FQ_QUANT_FP4), mn, fq_dynamic_map_signed()};
        fq_qtensor *w3 = NULL;
        CHECK_OK(ctx, fq_qtensor_from_members(ctx, FQ_CPU, &info, mem, &w3));
        if (w3) {
            fq_status s = fq_linear_4bit(ctx, x, w3, NULL, y);
            CHECK(s == FQ_ERR_SHAPE && has(ctx, "2-D"), "3-D weight -> %s: %s", fq_status_str(s), fq_ctx_error(ctx));
        }
        fq_qtensor_free(w3);
        free(mp); free(ma); free(mn);
    }

    /* Wrong dtypes. */
    {
        fq_tensor *xi = make_tensor(ctx, FQ_F32, 2, xs, gen_x);
        xi->dtype = FQ_I32; /* same bytes, integer dtype */
        CHECK(fq_linear_4bit(ctx, xi, w.q, NULL, y) == FQ_ERR_SHAPE, "x i32");
        fq_tensor_free(xi);
        fq_tensor *yd = make_tensor(ctx, FQ_F64, 2, ys, NULL);
        CHECK(fq_linear_4bit(ctx, x, w.q, NULL, yd) == FQ_ERR_SHAPE, "y f64");
        fq_tensor_free(yd);
        fq_tensor *b64 = make_tensor(ctx, FQ_F64, 1, &bsz, gen_x); /* f64 bias is allowed */
        CHECK_OK(ctx, fq_linear_4bit(ctx, x, w.q, b64, y));
        fq_tensor_free(b64);
    }

    /* Bad arguments. */
    CHECK(fq_linear_4bit(ctx, NULL, w.q, NULL, y) == FQ_ERR_INVALID_ARG, "NULL x");
    CHECK(fq_linear_4bit(ctx, x, NULL, NULL, y) == FQ_ERR_INVALID_ARG, "NULL w");
    CHECK(fq_linear_4bit(ctx, x, w.q, NULL, NULL) == FQ_ERR_INVALID_ARG, "NULL y");
    fq_ctx_set_linear_kernel(ctx, (fq_linear_kernel)99);
    CHECK(fq_linear_4bit(ctx, x, w.q, b, y) == FQ_ERR_INVALID_ARG, "unknown kernel");
    fq_ctx_set_linear_kernel(ctx, FQ_LINEAR_AUTO);
    {
        int64_t sq[2] = {3, K};
        wt ws = make_weight(ctx, K, K, FQ_QUANT_NF4, 64, 0);
        fq_tensor *xy = make_tensor(ctx, FQ_F32, 2, sq, gen_x);
        CHECK(fq_linear_4bit(ctx, xy, ws.q, NULL, xy) == FQ_ERR_INVALID_ARG, "y aliasing x");
        fq_tensor_free(xy);
        free_weight(&ws);
    }

    /* Scratch allocation failure: a clean error naming the weight. */
    fq_ctx_set_linear_kernel(ctx, FQ_LINEAR_GEMM);
    fq_test_fail_alloc_in(ctx, 1);
    fq_status s = fq_linear_4bit(ctx, x, w.q, b, y);
    CHECK(s == FQ_ERR_OUT_OF_MEMORY && has(ctx, name), "injected OOM -> %s: %s", fq_status_str(s), fq_ctx_error(ctx));
    fq_test_fail_alloc_in(ctx, 0);
    fq_ctx_set_linear_kernel(ctx, FQ_LINEAR_AUTO);

    fq_tensor_free(x); fq_tensor_free(y); fq_tensor_free(b);
    free_weight(&w);
}

int main(void) {
    fq_ctx *ctx;
    if (fq_ctx_create(&ctx) != FQ_OK) return 1;
    fprintf(stderr, "isa: %s\n", fq_cpu_isa_name(fq_cpu_isa_best()));
    const fq_quant_type NF4 = FQ_QUANT_NF4, FP4 = FQ_QUANT_FP4;
    const lcase cases[] = {
        /* m    n     k   type  bs  nest x        y        bias       xdims */
        {1, 37, 256, NF4, 64, 0, FQ_BF16, FQ_BF16, FQ_F32 + 1, 2},     /* GEMV, aligned                 */
        {1, 19, 1000, FP4, 64, 1, FQ_F32, FQ_F32, FQ_BF16 + 1, 2},     /* K % 32 != 0, blocks straddle  */
        {3, 33, 77, NF4, 32, 1, FQ_F16, FQ_F16, 0, 2},                 /* odd K: rows start mid-byte    */
        {5, 64, 96, NF4, 64, 0, FQ_F32, FQ_BF16, FQ_F16 + 1, 2},       /* aligned rows, straddling blocks */
        {17, 45, 320, FP4, 128, 1, FQ_BF16, FQ_F32, FQ_F16 + 1, 2},    /* odd M, straddling blocks      */
        {33, 29, 544, NF4, 256, 0, FQ_BF16, FQ_BF16, FQ_F32 + 1, 2},   /* K not a multiple of the tile  */
        {130, 115, 288, NF4, 4096, 1, FQ_F16, FQ_F32, FQ_BF16 + 1, 2}, /* M, N past one task; big block */
        {9, 7, 33, FP4, 32, 0, FQ_F32, FQ_F16, FQ_F64 + 1, 2},         /* tiny, f64 bias                */
        {12, 50, 1, NF4, 64, 0, FQ_BF16, FQ_F32, 0, 3},                /* K = 1, x 3-D                  */
        {6, 40, 0, NF4, 64, 0, FQ_F32, FQ_F32, FQ_F32 + 1, 3},         /* K = 0: y = bias               */
        {40, 70, 2048, FP4, 2048, 0, FQ_BF16, FQ_BF16, FQ_F32 + 1, 2}, /* longer rows                   */
        {8, 33, 3072, NF4, 64, 1, FQ_BF16, FQ_BF16, FQ_BF16 + 1, 2},   /* FLUX-like row, 8 x rows       */
        {7, 20, 1312, NF4, 256, 1, FQ_F32, FQ_F32, 0, 2},              /* GEMV k-slices, straddling     */
        {1, 9, 12288, FP4, 32, 1, FQ_BF16, FQ_F32, 0, 2},              /* long row: > 256 blocks a row  */
        {2, 41, 640, FP4, 64, 1, FQ_BF16, FQ_F16, FQ_F32 + 1, 2},      /* 2 x rows, 4-row groups + tail */
        {1, 13, 1024, NF4, 256, 0, FQ_F16, FQ_BF16, 0, 2},             /* 1 x row, bigger blocks        */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(ctx, &cases[i]);
    test_errors(ctx);
    fprintf(stderr, "worst error / tolerance: bf16 %.3f, f16 %.3f, f32 %.3f\n", g_worst[FQ_BF16], g_worst[FQ_F16],
            g_worst[FQ_F32]);
    fq_ctx_free(ctx);
    return check_summary("test_linear_cpu");
}

/* 4-bit quantization on the CPU beyond the golden cases: round trips, edge
 * sizes, the reciprocal and mean building blocks, thread-count independence,
 * moves and copies (never re-quantized), injected allocation failures (the
 * source stays intact; LSan in `make SAN=1 test` proves nothing leaks), the
 * diffusers#10798 scenario (a code table left on another device) and bad input. */
#include "check.h"
#include "core/qtensor.h"
#include "kernels/kernels.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Deterministic pseudo-normal values (sum of uniforms), scaled. */
static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static float rnd(void) {
    float s = 0;
    for (int i = 0; i < 4; i++) {
        g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
        s += (float)((g_rng >> 40) & 0xffffff) / 16777216.0f - 0.5f;
    }
    return s;
}

static fq_tensor *make_f32(fq_ctx *ctx, int ndim, const int64_t *shape, float scale) {
    int64_t n = fq_shape_numel(ndim, shape);
    float *h = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) h[i] = rnd() * scale;
    fq_tensor *t = NULL;
    CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CPU, FQ_F32, ndim, shape, h, &t));
    free(h);
    return t;
}

/* Every member of a and b (and their info) is byte-identical. */
static int same_qtensor(fq_ctx *ctx, const fq_qtensor *a, const fq_qtensor *b) {
    fq_qtensor_info ia, ib;
    fq_qtensor_get_info(a, &ia);
    fq_qtensor_get_info(b, &ib);
    if (ia.numel != ib.numel || ia.nblocks != ib.nblocks || ia.double_quant != ib.double_quant ||
        f2u(ia.offset) != f2u(ib.offset) || ia.type != ib.type || ia.blocksize != ib.blocksize)
        return 0;
    for (int m = 0; m < FQ_QMEMBER_COUNT; m++) {
        size_t n = fq_qtensor_member_bytes(a, (fq_qmember)m);
        if (n != fq_qtensor_member_bytes(b, (fq_qmember)m)) return 0;
        if (!n) continue;
        unsigned char *x = malloc(n), *y = malloc(n);
        int ok = fq_qtensor_member_to_host(ctx, a, (fq_qmember)m, x) == FQ_OK &&
                 fq_qtensor_member_to_host(ctx, b, (fq_qmember)m, y) == FQ_OK && memcmp(x, y, n) == 0;
        free(x);
        free(y);
        if (!ok) return 0;
    }
    return 1;
}

static void test_rcp(void) {
    CHECK(f2u(fq_rcp_approx(0.0f)) == 0x7f800000u, "rcp(+0) = +inf");
    CHECK(f2u(fq_rcp_approx(-0.0f)) == 0xff800000u, "rcp(-0) = -inf");
    CHECK(f2u(fq_rcp_approx(u2f(0x00000123u))) == 0x7f800000u, "rcp(subnormal) = inf (ftz)");
    CHECK(f2u(fq_rcp_approx(INFINITY)) == 0u, "rcp(inf) = +0");
    CHECK(f2u(fq_rcp_approx(-INFINITY)) == 0x80000000u, "rcp(-inf) = -0");
    CHECK(f2u(fq_rcp_approx(NAN)) == 0x7fffffffu, "rcp(NaN) = canonical NaN");
    CHECK(fq_rcp_approx(1.0f) == 1.0f && fq_rcp_approx(-4.0f) == -0.25f, "powers of two are exact");
    CHECK(fq_rcp_approx(u2f(0x7f000000u)) == 0.0f, "rcp(2^127) flushes to 0");
    CHECK(fq_rcp_approx(FLT_MAX) == 0.0f, "rcp(FLT_MAX) flushes to 0");
    CHECK(fq_rcp_approx(FLT_MIN) == 1.0f / FLT_MIN, "rcp(FLT_MIN) = 2^126");
    /* Within one ulp of IEEE division, and scale-invariant in the exponent. */
    int bad = 0, scale_bad = 0;
    for (int i = 0; i < 100000; i++) {
        float x = fabsf(rnd()) * 8.0f + 1e-3f, r = fq_rcp_approx(x), e = 1.0f / x;
        int64_t d = (int64_t)f2u(r) - (int64_t)f2u(e);
        bad += d < -1 || d > 1;
        scale_bad += fq_rcp_approx(x * 1024.0f) != r / 1024.0f;
    }
    CHECK(bad == 0, "%d reciprocals more than 1 ulp from IEEE", bad);
    CHECK(scale_bad == 0, "%d reciprocals not scale-invariant", scale_bad);
}

static void test_torch_mean(void) {
    static float x[1 << 20];
    int64_t sizes[] = {1, 2, 3, 7, 31, 32, 33, 127, 128, 129, 130, 131, 1000, 4099, 65536, 1 << 20};
    for (int64_t i = 0; i < (1 << 20); i++) x[i] = fabsf(rnd()) + 0.01f;
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        int64_t n = sizes[k];
        double ref = 0;
        for (int64_t i = 0; i < n; i++) ref += x[i];
        ref /= (double)n;
        float m = fq_cpu_torch_mean(x, n);
        CHECK(fabs(m - ref) <= 1e-5 * ref, "mean n=%lld: %.9g vs %.9g", (long long)n, m, ref);
    }
    CHECK(fq_cpu_torch_mean(x, 1) == x[0], "mean of one value is the value");
    for (int64_t i = 0; i < 5000; i++) x[i] = 0.75f;
    CHECK(fq_cpu_torch_mean(x, 5000) == 0.75f, "mean of a constant (exact sums)");
    CHECK(isnan(fq_cpu_torch_mean(x, 0)), "mean of nothing is NaN, as in torch");
}

/* Dequantized values are within half the widest code gap of the block's absmax. */
static void test_round_trip(fq_ctx *ctx) {
    int64_t shape[2] = {37, 129}; /* odd numel: a padded last nibble, a partial last block */
    fq_tensor *x = make_f32(ctx, 2, shape, 0.02f);
    const float *xh = fq_tensor_host_data(x);
    int64_t sizes[] = {32, 64, 128, 256, 512, 1024, 2048, 4096};
    for (int qt = 0; qt < 2; qt++)
        for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++)
            for (int dq = 0; dq < 2; dq++) {
                fq_quant_params p = {qt ? FQ_QUANT_FP4 : FQ_QUANT_NF4, sizes[k], dq};
                fq_qtensor *q = NULL;
                fq_tensor *y = NULL;
                CHECK_OK(ctx, fq_quantize_4bit(ctx, x, &p, &q));
                if (!q) continue;
                CHECK_OK(ctx, fq_dequantize_4bit(ctx, q, FQ_F32, &y));
                fq_qtensor_info info;
                fq_qtensor_get_info(q, &info);
                CHECK(info.numel == 37 * 129 && info.nblocks == (info.numel + sizes[k] - 1) / sizes[k],
                      "info sizes");
                CHECK(fq_qtensor_member_bytes(q, FQ_QMEMBER_PACKED) == (size_t)(37 * 129 + 1) / 2, "packed bytes");
                if (!y) { fq_qtensor_free(q); continue; }
                const float *yh = fq_tensor_host_data(y);
                int bad = 0;
                for (int64_t b = 0; b < info.nblocks; b++) {
                    float amax = 0;
                    int64_t e = (b + 1) * sizes[k] < info.numel ? (b + 1) * sizes[k] : info.numel;
                    for (int64_t i = b * sizes[k]; i < e; i++) amax = fmaxf(amax, fabsf(xh[i]));
                    /* half the widest gap (NF4: -1 to -0.696, FP4: 2/3 to 1) plus the 8-bit absmax error */
                    float tol = amax * (qt ? 0.1667f : 0.1520f) * 1.001f + (dq ? amax * 0.02f : 0.0f);
                    for (int64_t i = b * sizes[k]; i < e; i++) bad += !(fabsf(yh[i] - xh[i]) <= tol);
                }
                CHECK(bad == 0, "round trip %s bs%lld dq%d: %d values off", qt ? "fp4" : "nf4",
                      (long long)sizes[k], dq, bad);
                /* f16/bf16 outputs are the f32 output rounded once (RNE). */
                fq_tensor *yb = NULL;
                CHECK_OK(ctx, fq_dequantize_4bit(ctx, q, FQ_BF16, &yb));
                if (yb) {
                    const uint16_t *bh = fq_tensor_host_data(yb);
                    int diff = 0;
                    for (int64_t i = 0; i < info.numel; i++) {
                        uint32_t u = f2u(yh[i]);
                        diff += bh[i] != (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
                    }
                    CHECK(diff == 0, "bf16 output = RNE(f32 output): %d differ", diff);
                }
                fq_tensor_free(yb);
                fq_tensor_free(y);
                fq_qtensor_free(q);
            }
    fq_tensor_free(x);
}

/* The optimized dequantize equals the scalar reference, special absmax values included. */
static void test_dequant_simd_vs_ref(fq_ctx *ctx) {
    const int64_t n = 4096 * 3 + 77; /* partial last block, odd count */
    uint8_t *packed = malloc((size_t)(n + 1) / 2);
    for (int64_t i = 0; i < (n + 1) / 2; i++) packed[i] = (uint8_t)(rnd() * 4096.0f);
    float specials[] = {0.0f, -0.0f, 1e-40f, 1e-38f, 3e-36f, 1e-30f, 0.5f, 3e38f, FLT_MAX, INFINITY, -FLT_MAX,
                        65504.0f, 70000.0f, 1e-5f, 6e-5f, 2.0f};
    size_t ns = sizeof specials / sizeof specials[0];
    float *absmax = malloc((size_t)(n / 32 + 2) * 4);
    void *a = malloc((size_t)n * 4), *b = malloc((size_t)n * 4);
    int64_t sizes[] = {32, 64, 128, 4096};
    fq_dtype dts[] = {FQ_F32, FQ_F16, FQ_BF16};
    for (size_t k = 0; k < 4; k++)
        for (int qt = 0; qt < 2; qt++)
            for (size_t d = 0; d < 3; d++) {
                int64_t nb = (n + sizes[k] - 1) / sizes[k];
                for (int64_t i = 0; i < nb; i++)
                    absmax[i] = i % 3 == 0 ? specials[(size_t)(i / 3) % ns] : fabsf(rnd()) * 3.0f;
                memset(a, 0xa5, (size_t)n * 4);
                memset(b, 0x5a, (size_t)n * 4);
                fq_cpu_dequantize4(ctx, packed, absmax, n, sizes[k], (fq_quant_type)qt, a, dts[d]);
                fq_cpu_dequantize4_ref(ctx, packed, absmax, n, sizes[k], (fq_quant_type)qt, b, dts[d]);
                CHECK(memcmp(a, b, (size_t)n * fq_dtype_size(dts[d])) == 0, "dequantize bs%lld %s %s: fast != ref",
                      (long long)sizes[k], qt ? "fp4" : "nf4", fq_dtype_name(dts[d]));
            }
    free(packed);
    free(absmax);
    free(a);
    free(b);
}

/* Tiny and degenerate inputs. */
static void test_edges(fq_ctx *ctx) {
    /* One element: one byte, the padded low nibble is the code of 0.0. */
    float one = -0.3f;
    int64_t n1 = 1;
    fq_tensor *x = NULL;
    fq_qtensor *q = NULL;
    uint8_t b;
    float am;
    CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CPU, FQ_F32, 1, &n1, &one, &x));
    fq_quant_params p = {FQ_QUANT_NF4, 64, 0};
    CHECK_OK(ctx, fq_quantize_4bit(ctx, x, &p, &q));
    if (q) {
        CHECK_OK(ctx, fq_qtensor_member_to_host(ctx, q, FQ_QMEMBER_PACKED, &b));
        CHECK_OK(ctx, fq_qtensor_member_to_host(ctx, q, FQ_QMEMBER_ABSMAX, &am));
        CHECK(b == 0x07 && am == 0.3f, "single -0.3: byte 0x%02x absmax %g", b, am);
        fq_tensor *y = NULL;
        CHECK_OK(ctx, fq_dequantize_4bit(ctx, q, -1, &y));
        if (y) CHECK(*(float *)fq_tensor_host_data(y) == -0.3f, "-1 * absmax round trips");
        fq_tensor_free(y);
    }
    fq_qtensor_free(q);
    fq_tensor_free(x);

    /* All zeros: absmax 0, code 0 (r = inf, 0 * inf = NaN), dequantized to -0.0 (NF4). */
    float z[3] = {0.0f, -0.0f, 0.0f};
    int64_t n3 = 3;
    CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CPU, FQ_F32, 1, &n3, z, &x));
    q = NULL;
    CHECK_OK(ctx, fq_quantize_4bit(ctx, x, &p, &q));
    if (q) {
        uint8_t pk[2];
        CHECK_OK(ctx, fq_qtensor_member_to_host(ctx, q, FQ_QMEMBER_PACKED, pk));
        CHECK(pk[0] == 0 && pk[1] == 0, "zero block codes %02x %02x", pk[0], pk[1]);
        fq_tensor *y = NULL;
        CHECK_OK(ctx, fq_dequantize_4bit(ctx, q, FQ_F32, &y));
        if (y) {
            const float *yh = fq_tensor_host_data(y);
            CHECK(f2u(yh[0]) == 0x80000000u && f2u(yh[2]) == 0x80000000u, "zeros come back as -0.0");
        }
        fq_tensor_free(y);
    }
    fq_qtensor_free(q);
    fq_tensor_free(x);

    /* bf16 subnormals count as zero (flush to zero), f16 subnormals do not. */
    uint16_t bsub[2] = {0x0001, 0x8040}; /* bf16 subnormals */
    int64_t n2 = 2;
    CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CPU, FQ_BF16, 1, &n2, bsub, &x));
    q = NULL;
    CHECK_OK(ctx, fq_quantize_4bit(ctx, x, &p, &q));
    if (q) {
        CHECK_OK(ctx, fq_qtensor_member_to_host(ctx, q, FQ_QMEMBER_ABSMAX, &am));
        CHECK(am == 0.0f, "bf16 subnormal block: absmax %g", am);
    }
    fq_qtensor_free(q);
    fq_tensor_free(x);
    uint16_t hsub[2] = {0x0001, 0x8200}; /* f16 subnormals: normal in f32 */
    CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CPU, FQ_F16, 1, &n2, hsub, &x));
    q = NULL;
    CHECK_OK(ctx, fq_quantize_4bit(ctx, x, &p, &q));
    if (q) {
        CHECK_OK(ctx, fq_qtensor_member_to_host(ctx, q, FQ_QMEMBER_ABSMAX, &am));
        CHECK(am == 0x200 * 0x1p-24f, "f16 subnormal block: absmax %g", am);
    }
    fq_qtensor_free(q);
    fq_tensor_free(x);

    /* Empty tensors and non-float inputs are refused. */
    int64_t n0 = 0;
    CHECK_OK(ctx, fq_tensor_create(ctx, FQ_CPU, FQ_F32, 1, &n0, &x));
    q = NULL;
    CHECK(fq_quantize_4bit(ctx, x, &p, &q) == FQ_ERR_SHAPE && q == NULL, "empty input refused");
    fq_tensor_free(x);
    fq_dtype bad[] = {FQ_U8, FQ_I32, FQ_F64, FQ_I64};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_OK(ctx, fq_tensor_create(ctx, FQ_CPU, bad[i], 1, &n3, &x));
        fq_tensor_set_name(ctx, x, "blocks.0.w");
        CHECK(fq_quantize_4bit(ctx, x, &p, &q) == FQ_ERR_SHAPE && q == NULL, "%s input refused",
              fq_dtype_name(bad[i]));
        CHECK(strstr(fq_ctx_error(ctx), "blocks.0.w") != NULL, "message names the tensor: %s", fq_ctx_error(ctx));
        fq_tensor_free(x);
    }
}

/* The same bytes whatever the thread count. */
static void test_threads(fq_ctx *ctx) {
    int64_t shape[2] = {300, 1111};
    fq_tensor *x = make_f32(ctx, 2, shape, 1.0f);
    fq_qtensor *ref = NULL;
    fq_quant_params p = {FQ_QUANT_NF4, 64, 1};
    int saved = ctx->nthreads;
    ctx->nthreads = 1;
    CHECK_OK(ctx, fq_quantize_4bit(ctx, x, &p, &ref));
    fq_tensor *y1 = NULL;
    CHECK_OK(ctx, fq_dequantize_4bit(ctx, ref, FQ_BF16, &y1));
    int counts[] = {2, 3, 7, 16};
    for (size_t i = 0; i < sizeof counts / sizeof counts[0] && ref && y1; i++) {
        ctx->nthreads = counts[i];
        fq_qtensor *q = NULL;
        fq_tensor *y = NULL;
        CHECK_OK(ctx, fq_quantize_4bit(ctx, x, &p, &q));
        CHECK_OK(ctx, fq_dequantize_4bit(ctx, ref, FQ_BF16, &y));
        CHECK(q && same_qtensor(ctx, q, ref), "quantize with %d threads differs", counts[i]);
        CHECK(y && memcmp(fq_tensor_host_data(y), fq_tensor_host_data(y1), fq_tensor_nbytes(y)) == 0,
              "dequantize with %d threads differs", counts[i]);
        fq_qtensor_free(q);
        fq_tensor_free(y);
    }
    ctx->nthreads = saved;
    fq_tensor_free(y1);
    fq_qtensor_free(ref);
    fq_tensor_free(x);
}

/* Moves and copies carry bytes, never re-quantize; failures leave the source intact. */
static void test_moves_and_failures(fq_ctx *ctx) {
    int64_t shape[2] = {64, 200};
    fq_tensor *x = make_f32(ctx, 2, shape, 0.05f);
    fq_quant_params p = {FQ_QUANT_NF4, 64, 1};
    fq_qtensor *q = NULL, *orig = NULL;
    CHECK_OK(ctx, fq_quantize_4bit(ctx, x, &p, &q));
    CHECK_OK(ctx, fq_quantize_4bit(ctx, x, &p, &orig));
    if (!q || !orig) { fq_qtensor_free(q); fq_qtensor_free(orig); fq_tensor_free(x); return; }
    CHECK_OK(ctx, fq_qtensor_set_name(ctx, q, "transformer_blocks.3.attn.to_q"));
    /* A quantized weight is handed out only once written and synchronized with:
     * GPU kernels read a ready weight before their programmatic-launch wait. */
    CHECK(q->ready == 1, "quantize_4bit returns a ready weight");

    /* cpu -> cpu moves (twice) and copies of copies are byte-identical. */
    CHECK_OK(ctx, fq_qtensor_move(ctx, q, FQ_CPU));
    CHECK_OK(ctx, fq_qtensor_move(ctx, q, FQ_CPU));
    CHECK(same_qtensor(ctx, q, orig), "moved twice: identical");
    fq_qtensor *c1 = NULL, *c2 = NULL;
    CHECK_OK(ctx, fq_qtensor_copy_to(ctx, q, FQ_CPU, &c1));
    if (c1) CHECK_OK(ctx, fq_qtensor_copy_to(ctx, c1, FQ_CPU, &c2));
    CHECK(c2 && same_qtensor(ctx, c2, orig), "copy of a copy: identical");
    CHECK(c2 && strcmp(fq_qtensor_name(c2), "transformer_blocks.3.attn.to_q") == 0, "copies keep the name");
    CHECK(q->ready == 1 && c1 && c1->ready == 1 && c2 && c2->ready == 1, "moves and copies are ready");
    fq_qtensor_free(c1);
    fq_qtensor_free(c2);

    /* Round trips through every GPU there is (run on the GPU machine). */
    int ndev = fq_cuda_device_count();
    if (ndev == 0) SKIP("no CUDA device: cpu -> cuda -> cpu moves not run");
    for (int d = 0; d < ndev && d < 2; d++) {
        CHECK_OK(ctx, fq_qtensor_move(ctx, q, FQ_CUDA(d)));
        CHECK_OK(ctx, fq_qtensor_move(ctx, q, FQ_CUDA(d))); /* a second move is a no-op */
    }
    if (ndev) CHECK_OK(ctx, fq_qtensor_move(ctx, q, FQ_CPU));
    CHECK(same_qtensor(ctx, q, orig), "after device round trips: identical");
    CHECK(q->ready == 1, "ready after device round trips");

    /* Injected allocation failure at every allocation of each operation. */
    int quant_fail = 0, copy_fail = 0, deq_fail = 0;
    for (int64_t k = 1; k < 16; k++) {
        fq_qtensor *r = NULL;
        fq_test_fail_alloc_in(ctx, k);
        fq_status s = fq_quantize_4bit(ctx, x, &p, &r);
        fq_test_fail_alloc_in(ctx, 0);
        CHECK(s == FQ_OK || (s == FQ_ERR_OUT_OF_MEMORY && r == NULL), "quantize, failure %lld: %s",
              (long long)k, fq_status_str(s));
        quant_fail += s != FQ_OK;
        fq_qtensor_free(r);

        fq_qtensor *c = NULL;
        fq_test_fail_alloc_in(ctx, k);
        s = fq_qtensor_copy_to(ctx, q, FQ_CPU, &c);
        fq_test_fail_alloc_in(ctx, 0);
        CHECK(s == FQ_OK || (s == FQ_ERR_OUT_OF_MEMORY && c == NULL), "copy, failure %lld", (long long)k);
        copy_fail += s != FQ_OK;
        fq_qtensor_free(c);

        fq_tensor *y = NULL;
        fq_test_fail_alloc_in(ctx, k);
        s = fq_dequantize_4bit(ctx, q, -1, &y);
        fq_test_fail_alloc_in(ctx, 0);
        CHECK(s == FQ_OK || (s == FQ_ERR_OUT_OF_MEMORY && y == NULL), "dequantize, failure %lld", (long long)k);
        deq_fail += s != FQ_OK;
        fq_tensor_free(y);

        if (ndev) {
            fq_test_fail_alloc_in(ctx, k);
            s = fq_qtensor_move(ctx, q, FQ_CUDA(0));
            fq_test_fail_alloc_in(ctx, 0);
            CHECK(s == FQ_OK || s == FQ_ERR_OUT_OF_MEMORY, "move, failure %lld", (long long)k);
            fq_qtensor_info info;
            fq_qtensor_get_info(q, &info);
            CHECK(fq_device_equal(info.device, s == FQ_OK ? FQ_CUDA(0) : FQ_CPU), "move is all-or-nothing");
            CHECK_OK(ctx, fq_qtensor_move(ctx, q, FQ_CPU));
        }
    }
    CHECK(quant_fail >= 2 && copy_fail >= 1 && deq_fail >= 2, "failures injected: %d %d %d", quant_fail,
          copy_fail, deq_fail);
    CHECK(same_qtensor(ctx, q, orig), "failed operations left the source intact");

    /* diffusers#10798: the 16-entry code table left behind on cuda:1. */
    CHECK_OK(ctx, fq_test_misplace_member(ctx, q, FQ_QMEMBER_QUANT_MAP, FQ_CUDA(1)));
    fq_tensor *y = NULL;
    fq_status s = fq_dequantize_4bit(ctx, q, -1, &y);
    const char *msg = fq_ctx_error(ctx);
    CHECK(s == FQ_ERR_DEVICE_MISMATCH && y == NULL, "misplaced quant_map -> %s", fq_status_str(s));
    CHECK(strstr(msg, "transformer_blocks.3.attn.to_q") && strstr(msg, "quant_map") && strstr(msg, "cuda:1") &&
              strstr(msg, "cpu"),
          "message names tensor, member and both devices: %s", msg);
    int64_t sh[2] = {64, 200};
    fq_tensor *out = NULL;
    CHECK_OK(ctx, fq_tensor_create(ctx, FQ_CPU, FQ_F32, 2, sh, &out));
    if (out) {
        s = fq_dequantize_4bit_into(ctx, q, out);
        CHECK(s == FQ_ERR_DEVICE_MISMATCH && strstr(fq_ctx_error(ctx), "quant_map"), "dequantize_into too");
    }
    fq_tensor_free(out);
    fq_qtensor *c = NULL;
    s = fq_qtensor_copy_to(ctx, q, FQ_CPU, &c);
    CHECK(s == FQ_ERR_DEVICE_MISMATCH && c == NULL, "a copy of a broken state is refused");
    s = fq_qtensor_move(ctx, q, FQ_CUDA(0));
    CHECK(s != FQ_OK, "a move of a broken state is refused");

    fq_qtensor_free(q);
    fq_qtensor_free(orig);
    fq_tensor_free(x);
}

static void test_bad_args(fq_ctx *ctx) {
    int64_t shape[1] = {256};
    fq_tensor *x = make_f32(ctx, 1, shape, 1.0f);
    int64_t bad_bs[] = {0, -64, 16, 48, 100, 8192, 1 << 20};
    for (size_t i = 0; i < sizeof bad_bs / sizeof bad_bs[0]; i++) {
        fq_quant_params p = {FQ_QUANT_NF4, bad_bs[i], 0};
        fq_qtensor *q = NULL;
        CHECK(fq_quantize_4bit(ctx, x, &p, &q) == FQ_ERR_INVALID_ARG && q == NULL, "blocksize %lld refused",
              (long long)bad_bs[i]);
        CHECK(strstr(fq_ctx_error(ctx), "blocksize") != NULL, "message: %s", fq_ctx_error(ctx));
    }
    fq_quant_params pt = {(fq_quant_type)7, 64, 0};
    fq_qtensor *q = NULL;
    CHECK(fq_quantize_4bit(ctx, x, &pt, &q) == FQ_ERR_INVALID_ARG && q == NULL, "unknown quant type refused");
    CHECK(fq_quantize_4bit(ctx, NULL, NULL, &q) == FQ_ERR_INVALID_ARG, "NULL x refused");

    /* dequantize_into: wrong shape or dtype; unknown output dtype. */
    fq_quant_params p = {FQ_QUANT_FP4, 64, 0};
    CHECK_OK(ctx, fq_quantize_4bit(ctx, x, &p, &q));
    if (q) {
        fq_tensor *o = NULL;
        int64_t wrong[2] = {16, 16};
        CHECK_OK(ctx, fq_tensor_create(ctx, FQ_CPU, FQ_F32, 2, wrong, &o));
        CHECK(fq_dequantize_4bit_into(ctx, q, o) == FQ_ERR_SHAPE, "wrong shape refused");
        fq_tensor_free(o);
        CHECK_OK(ctx, fq_tensor_create(ctx, FQ_CPU, FQ_U8, 1, shape, &o));
        CHECK(fq_dequantize_4bit_into(ctx, q, o) == FQ_ERR_SHAPE, "u8 output refused");
        fq_tensor_free(o);
        fq_tensor *y = NULL;
        CHECK(fq_dequantize_4bit(ctx, q, FQ_I32, &y) == FQ_ERR_INVALID_ARG && y == NULL, "i32 output refused");
    }
    fq_qtensor_free(q);

    /* 8-bit ops: sizes, dtypes and blocksizes are checked. */
    int64_t nb = 1, n255 = 255;
    fq_tensor *q8 = NULL, *am = NULL, *am_bad = NULL, *y8 = NULL;
    CHECK_OK(ctx, fq_tensor_create(ctx, FQ_CPU, FQ_U8, 1, shape, &q8));
    CHECK_OK(ctx, fq_tensor_create(ctx, FQ_CPU, FQ_F32, 1, &nb, &am));
    CHECK_OK(ctx, fq_tensor_create(ctx, FQ_CPU, FQ_F32, 1, &n255, &am_bad));
    CHECK_OK(ctx, fq_tensor_create(ctx, FQ_CPU, FQ_F32, 1, shape, &y8));
    if (q8 && am && am_bad && y8) {
        CHECK_OK(ctx, fq_quantize_8bit_dynamic(ctx, x, 256, q8, am));
        CHECK(fq_quantize_8bit_dynamic(ctx, x, 256, q8, am_bad) == FQ_ERR_SHAPE, "absmax size checked");
        CHECK(fq_quantize_8bit_dynamic(ctx, x, 32, q8, am) == FQ_ERR_INVALID_ARG, "8-bit blocksize 32 refused");
        CHECK(fq_quantize_8bit_dynamic(ctx, x, 256, am, am) == FQ_ERR_SHAPE, "q must be u8");
        CHECK_OK(ctx, fq_dequantize_8bit_dynamic(ctx, q8, am, 256, y8));
        const float *xh = fq_tensor_host_data(x), *yh = fq_tensor_host_data(y8);
        float amax = *(float *)fq_tensor_host_data(am);
        int off = 0;
        for (int i = 0; i < 256; i++) off += !(fabsf(xh[i] - yh[i]) <= amax * 0.035f);
        CHECK(off == 0, "8-bit round trip: %d values off", off);
        CHECK(fq_dequantize_8bit_dynamic(ctx, q8, am, 256, q8) == FQ_ERR_SHAPE, "out must be f32");
    }
    fq_tensor_free(q8);
    fq_tensor_free(am);
    fq_tensor_free(am_bad);
    fq_tensor_free(y8);
    fq_tensor_free(x);
}

/* States read from files: NaN/Inf in absmax, offset or nested absmax are refused. */
static void test_from_members(fq_ctx *ctx) {
    fq_qtensor_info info;
    memset(&info, 0, sizeof info);
    info.type = FQ_QUANT_NF4;
    info.blocksize = 64;
    info.orig_dtype = FQ_BF16;
    info.ndim = 2;
    info.shape[0] = 2;
    info.shape[1] = 64;
    uint8_t packed[64] = {0};
    float absmax[2] = {1.0f, 2.0f};
    const void *m[FQ_QMEMBER_COUNT] = {packed, absmax, fq_quant_map(FQ_QUANT_NF4), NULL, NULL};
    fq_qtensor *q = NULL;
    CHECK_OK(ctx, fq_qtensor_from_members(ctx, FQ_CPU, &info, m, &q));
    CHECK(q && q->ready == 1, "from_members returns a ready weight");
    fq_qtensor_free(q);
    float bad[3] = {NAN, INFINITY, -INFINITY};
    for (int i = 0; i < 3; i++) {
        absmax[1] = bad[i];
        q = NULL;
        CHECK(fq_qtensor_from_members(ctx, FQ_CPU, &info, m, &q) == FQ_ERR_NONFINITE && q == NULL,
              "absmax %g refused", bad[i]);
    }
    absmax[1] = 2.0f;
    info.blocksize = 96;
    CHECK(fq_qtensor_from_members(ctx, FQ_CPU, &info, m, &q) == FQ_ERR_INVALID_ARG, "blocksize 96 refused");
    /* Double quant: the offset and the nested absmax must be finite too. */
    info.blocksize = 64;
    info.double_quant = 1;
    uint8_t qabs[2] = {200, 255};
    float nested[1] = {0.5f};
    const void *md[FQ_QMEMBER_COUNT] = {packed, qabs, fq_quant_map(FQ_QUANT_NF4), nested, fq_dynamic_map_signed()};
    info.offset = 0.25f;
    CHECK_OK(ctx, fq_qtensor_from_members(ctx, FQ_CPU, &info, md, &q));
    if (q) {
        fq_tensor *y = NULL;
        CHECK_OK(ctx, fq_dequantize_4bit(ctx, q, -1, &y));
        CHECK(y && fq_tensor_dtype(y) == FQ_BF16, "dequantize returns the original dtype");
        fq_tensor_free(y);
    }
    fq_qtensor_free(q);
    info.offset = NAN;
    CHECK(fq_qtensor_from_members(ctx, FQ_CPU, &info, md, &q) == FQ_ERR_NONFINITE, "NaN offset refused");
    info.offset = 0.25f;
    nested[0] = INFINITY;
    CHECK(fq_qtensor_from_members(ctx, FQ_CPU, &info, md, &q) == FQ_ERR_NONFINITE, "Inf nested absmax refused");
}

/* The CUDA quantizer's decision table is built on the host: check it here, where CI runs
 * (Debian 12's gcc 12.2 once compiled its construction away and FP4 codes on the GPU
 * came out wrong). Bucket k covers [(2k - 81)/32, (2k - 79)/32]. */
static void test_cuda_bucket_table(void) {
#ifdef FQ_HAVE_CUDA
    static const float fp4[7] = {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f};
    for (int qt = 0; qt < 2; qt++) {
        float thr[64];
        uint8_t base[64];
        memset(thr, 0, sizeof thr);
        memset(base, 0xff, sizeof base);
        fq_cuda_quant4_bucket_table((fq_quant_type)qt, thr, base);
        const int nt = qt == FQ_QUANT_NF4 ? 15 : 7;
        int found = 0, bad = 0;
        for (int k = 0; k < 64; k++) {
            const float lo = (float)(2 * k - 81) / 32.0f, hi = (float)(2 * k - 79) / 32.0f;
            if (base[k] > nt || (k > 0 && base[k] < base[k - 1])) bad++;
            if (isinf(thr[k])) continue;
            if (!(thr[k] >= lo && thr[k] <= hi)) bad++;
            found++;
        }
        CHECK(bad == 0 && found == nt && base[63] == nt, "%s bucket table: %d bad entries, %d thresholds (want %d)",
              qt ? "FP4" : "NF4", bad, found, nt);
        if (qt == FQ_QUANT_FP4) {
            int same = 1;
            for (int i = 0, k = 0; i < 7 && same; i++) {
                while (k < 64 && isinf(thr[k])) k++;
                same = k < 64 && thr[k] == fp4[i] && base[k] == i;
                k++;
            }
            CHECK(same, "FP4 bucket table holds bitsandbytes' 7 thresholds in order");
        }
    }
#endif
}

int main(void) {
    fq_ctx *ctx;
    CHECK(fq_ctx_create(&ctx) == FQ_OK, "ctx");
    test_rcp();
    test_cuda_bucket_table();
    test_torch_mean();
    test_round_trip(ctx);
    test_dequant_simd_vs_ref(ctx);
    test_edges(ctx);
    test_threads(ctx);
    test_moves_and_failures(ctx);
    test_bad_args(ctx);
    test_from_members(ctx);
    fq_ctx_free(ctx);
    return check_summary("test_quant_cpu");
}

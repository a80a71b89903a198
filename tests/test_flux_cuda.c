/* The Flux transformer and its ops on every CUDA device, against the CPU and
 * against diffusers' golden runs (tests/fixtures/flux):
 *
 *  1. random models (flux_random) on the CPU: same seed, same weights; the
 *     forward runs, 4-bit included (always runs, GPU or not);
 *  2. per GPU, each op against the CPU kernel on the same inputs, with the
 *     differences reported (bit-exact where the arithmetic is the same);
 *  3. per GPU, attention against the CPU kernel and a float64 reference at
 *     several sizes and head dims, both CUDA kernels;
 *  4. per GPU, the golden models with the CPU test's references and
 *     tolerances, intermediates included, and each output against the CPU's;
 *  5. bit-identical outputs on every GPU, after moving a model between
 *     devices, and on repeated runs; no allocation inside a forward;
 *  6. a random model with head dim 128 (the FLUX.1 attention shape) on the
 *     CPU and on each GPU.
 *
 * Without a GPU the GPU parts are skipped with a message. */
#include "check.h"
#include "support/golden.h"
#include "core/core.h"
#include "core/qtensor.h"
#include "io/safetensors.h"
#include "kernels/cpu/nn_cpu.h"
#include "models/flux.h"
#include "models/flux_place.h"
#include "models/flux_random.h"
#include "ops/nn_ops.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define FIX "tests/fixtures/flux"

/* ---- small helpers ------------------------------------------------------------------ */

static double rel_l2_ff(const float *a, const float *ref, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)a[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static double rel_l2_fd(const float *a, const double *ref, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)a[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Elements whose bits differ (NaN == NaN). */
static int64_t ndiff(const float *a, const float *b, int64_t n) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) c += memcmp(&a[i], &b[i], 4) != 0 && !(isnan(a[i]) && isnan(b[i]));
    return c;
}

static int all_finite(const float *a, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(a[i])) return 0;
    return 1;
}

/* A copy of t's values on the host as f32 (caller frees; a bf16 activation of
 * the GPU forward is widened exactly); NULL on failure (reported). */
static float *host_f32(fq_ctx *ctx, const fq_tensor *t) {
    const int64_t n = fq_tensor_numel(t);
    float *h = malloc((size_t)n * 4 + 4);
    void *raw = t->dtype == FQ_F32 ? (void *)h : malloc(fq_tensor_nbytes(t) + 4);
    fq_status s = h && raw ? fq_tensor_to_host(ctx, t, raw) : FQ_ERR_OUT_OF_MEMORY;
    CHECK(s == FQ_OK, "copy to host: %s", fq_ctx_error(ctx));
    if (s == FQ_OK && raw != h) fq_cpu_to_f32(raw, t->dtype, n, h);
    if (raw != h) free(raw);
    if (s != FQ_OK) {
        free(h);
        return NULL;
    }
    return h;
}

/* A CPU tensor of dtype dt filled with uniform values u*scale+shift, rounded to rnd. */
static fq_tensor *cpu_rand(fq_ctx *ctx, fq_dtype dt, int nd, const int64_t *sh, uint64_t seed, float scale,
                           float shift, fq_dtype rnd) {
    fq_tensor *t = NULL;
    CHECK_OK(ctx, fq_tensor_create(ctx, FQ_CPU, dt, nd, sh, &t));
    if (!t) return NULL;
    CHECK_OK(ctx, fq_nn_random(ctx, t, seed, scale, shift));
    if (dt == FQ_F32 && rnd != FQ_F32) fq_cpu_round(fq_tensor_host_data(t), fq_tensor_numel(t), rnd);
    return t;
}

static fq_tensor *to_dev(fq_ctx *ctx, const fq_tensor *t, fq_device d) {
    fq_tensor *r = NULL;
    if (!t) return NULL;
    CHECK_OK(ctx, fq_tensor_copy_to(ctx, t, d, &r));
    return r;
}

static fq_tensor *empty(fq_ctx *ctx, fq_device d, int nd, const int64_t *sh) {
    fq_tensor *t = NULL;
    CHECK_OK(ctx, fq_tensor_create(ctx, d, FQ_F32, nd, sh, &t));
    return t;
}

/* Compares a GPU result with the CPU's: exact (max_ndiff elements may differ
 * in their bits) or within rel L2 tol. Prints one line either way. */
static void compare(fq_ctx *ctx, const char *what, const fq_tensor *gpu, const fq_tensor *cpu, double tol,
                    int64_t max_ndiff) {
    float *g = host_f32(ctx, gpu);
    const float *c = fq_tensor_host_data((fq_tensor *)cpu);
    if (!g || !c) {
        free(g);
        return;
    }
    int64_t n = fq_tensor_numel(cpu), nd = ndiff(g, c, n);
    double num = 0, den = 0; /* rel L2 over the elements that are not NaN on both sides */
    for (int64_t i = 0; i < n; i++) {
        if (isnan(g[i]) && isnan(c[i])) continue;
        num += ((double)g[i] - c[i]) * ((double)g[i] - c[i]);
        den += (double)c[i] * c[i];
    }
    double e = den > 0 ? sqrt(num / den) : sqrt(num);
    printf("  %-44s rel L2 %.3g, %lld of %lld elements differ\n", what, e, (long long)nd, (long long)n);
    CHECK(e <= tol && nd <= max_ndiff, "%s: rel L2 %.3g (tol %.3g), %lld elements differ (at most %lld)", what, e,
          tol, (long long)nd, (long long)max_ndiff);
    free(g);
}

/* ---- 1. random models on the CPU ---------------------------------------------------------- */

/* A tiny FLUX-shaped config: head dim 128 with FLUX's RoPE axes, 2 heads. */
static fq_flux_config tiny_config(int guidance) {
    fq_flux_config c;
    memset(&c, 0, sizeof c);
    c.patch_size = 1;
    c.in_channels = 16;
    c.out_channels = 16;
    c.num_layers = 1;
    c.num_single_layers = 2;
    c.attention_head_dim = 128;
    c.num_attention_heads = 2;
    c.joint_attention_dim = 64;
    c.pooled_projection_dim = 32;
    c.guidance_embeds = guidance;
    c.axes_dims_rope[0] = 16;
    c.axes_dims_rope[1] = 56;
    c.axes_dims_rope[2] = 56;
    c.inner_dim = 256;
    c.mlp_dim = 1024;
    c.out_dim = 16;
    return c;
}

typedef struct {
    fq_tensor *t[7]; /* hidden, encoder, pooled, timestep, guidance, img_ids, txt_ids */
    int64_t B, St, Si;
} rand_inputs;

static void make_inputs(fq_ctx *ctx, const fq_flux_config *c, int64_t B, int64_t St, int64_t side, rand_inputs *in,
                        fq_dtype rnd) {
    memset(in, 0, sizeof *in);
    const int64_t Si = side * side;
    in->B = B, in->St = St, in->Si = Si;
    int64_t sh[3] = {B, Si, c->in_channels}, se[3] = {B, St, c->joint_attention_dim},
            sp[2] = {B, c->pooled_projection_dim}, sb[1] = {B}, si[2] = {Si, 3}, stt[2] = {St, 3};
    in->t[0] = cpu_rand(ctx, FQ_F32, 3, sh, 101, 1.0f, 0.0f, rnd);
    in->t[1] = cpu_rand(ctx, FQ_F32, 3, se, 102, 1.0f, 0.0f, rnd);
    in->t[2] = cpu_rand(ctx, FQ_F32, 2, sp, 103, 1.0f, 0.0f, rnd);
    in->t[3] = cpu_rand(ctx, FQ_F32, 1, sb, 104, 0.2f, 0.6f, FQ_F32);
    if (c->guidance_embeds) in->t[4] = cpu_rand(ctx, FQ_F32, 1, sb, 105, 0.5f, 3.5f, FQ_F32);
    in->t[5] = empty(ctx, FQ_CPU, 2, si);
    in->t[6] = empty(ctx, FQ_CPU, 2, stt);
    if (in->t[5]) {
        float *p = fq_tensor_host_data(in->t[5]);
        for (int64_t r = 0; r < side; r++)
            for (int64_t q = 0; q < side; q++) {
                float *e = p + (r * side + q) * 3;
                e[0] = 0.0f, e[1] = (float)r, e[2] = (float)q;
            }
    }
    if (in->t[6]) memset(fq_tensor_host_data(in->t[6]), 0, fq_tensor_nbytes(in->t[6]));
}

static void free_inputs(rand_inputs *in) {
    for (int i = 0; i < 7; i++) fq_tensor_free(in->t[i]);
}

/* Plans made by the tests run the exact GELU path (no GELU in the GEMM
 * epilogue: the CPU forward's rounding points) while this is set. */
static int g_exact_gelu = 0;

/* Runs m on inputs (copied to m's device); returns the output on the host or NULL. */
static float *forward_on(fq_ctx *ctx, const fq_flux_model *m, const rand_inputs *in, int64_t *numel) {
    fq_tensor *d[7] = {0};
    for (int i = 0; i < 7; i++) d[i] = in->t[i] ? to_dev(ctx, in->t[i], m->device) : NULL;
    fq_flux_plan *p = NULL;
    float *res = NULL;
    CHECK_OK(ctx, fq_flux_plan_create(ctx, m, in->B, in->St, in->Si, &p));
    if (p && g_exact_gelu) fq_flux_plan_set_fused_gelu(p, 0);
    int64_t osh[3] = {in->B, in->Si, m->cfg.out_dim};
    fq_tensor *out = empty(ctx, m->device, 3, osh);
    if (p && out) {
        fq_flux_inputs fi = {d[0], d[1], d[2], d[3], d[4], d[5], d[6]};
        fq_status s = fq_flux_forward(ctx, m, p, &fi, out);
        CHECK(s == FQ_OK, "forward: %s", fq_ctx_error(ctx));
        if (s == FQ_OK) res = host_f32(ctx, out);
        if (res) *numel = fq_tensor_numel(out);
    }
    fq_tensor_free(out);
    fq_flux_plan_free(p);
    for (int i = 0; i < 7; i++) fq_tensor_free(d[i]);
    return res;
}

static fq_flux_model *random_model(fq_ctx *ctx, const fq_flux_config *c, fq_device dev, fq_dtype wt, int quant,
                                   int dq, uint64_t seed) {
    fq_flux_random_params rp = fq_flux_random_default_params();
    rp.device = dev;
    rp.weight_dtype = wt;
    rp.quantize = quant;
    rp.qp.double_quant = dq;
    rp.seed = seed;
    fq_flux_model *m = NULL;
    fq_status s = fq_flux_random(ctx, c, &rp, &m);
    char dn[16];
    CHECK(s == FQ_OK, "flux_random on %s: %s", fq_device_name(dev, dn, sizeof dn), fq_ctx_error(ctx));
    return m;
}

static void test_random_cpu(fq_ctx *ctx) {
    printf("random models on the CPU:\n");
    fq_flux_config named;
    CHECK_OK(ctx, fq_flux_config_named(ctx, "dev", &named));
    CHECK(named.num_layers == 19 && named.num_single_layers == 38 && named.inner_dim == 3072 && named.guidance_embeds &&
              named.mlp_dim == 12288 && named.joint_attention_dim == 4096,
          "config \"dev\" has FLUX.1-dev's sizes");
    CHECK_OK(ctx, fq_flux_config_named(ctx, "schnell", &named));
    CHECK(!named.guidance_embeds && named.num_layers == 19, "config \"schnell\"");
    CHECK_OK(ctx, fq_flux_config_named(ctx, FIX "/flux/model_fp32", &named));
    CHECK(named.inner_dim == 32 && named.num_layers == 2, "config from a model folder");
    CHECK(fq_flux_config_named(ctx, "no-such-config", &named) == FQ_ERR_IO, "unknown config name: %s", fq_ctx_error(ctx));

    fq_flux_config c = tiny_config(1);
    fq_flux_model *a = random_model(ctx, &c, FQ_CPU, FQ_BF16, 0, 0, 7), *b = random_model(ctx, &c, FQ_CPU, FQ_BF16, 0, 0, 7);
    if (a && b) {
        CHECK(a->compute_dtype == FQ_BF16 && a->weight_bytes > 0, "bf16 model computes in bf16");
        CHECK(!strcmp(fq_tensor_name(a->blocks[0].to_q.w), "transformer_blocks.0.attn.to_q.weight"), "names: %s",
              fq_tensor_name(a->blocks[0].to_q.w));
        CHECK(fq_tensor_nbytes(a->single[1].proj_out.w) == fq_tensor_nbytes(b->single[1].proj_out.w) &&
                  !memcmp(fq_tensor_host_data(a->single[1].proj_out.w), fq_tensor_host_data(b->single[1].proj_out.w),
                          fq_tensor_nbytes(a->single[1].proj_out.w)),
              "same seed, same weights");
        CHECK(memcmp(fq_tensor_host_data(a->single[1].proj_out.w), fq_tensor_host_data(a->single[0].proj_out.w),
                     fq_tensor_nbytes(a->single[1].proj_out.w)) != 0,
              "different tensors, different values");
        rand_inputs in;
        make_inputs(ctx, &c, 1, 8, 4, &in, FQ_BF16);
        int64_t n = 0;
        float *y = forward_on(ctx, a, &in, &n);
        CHECK(y && all_finite(y, n), "random bf16 model: finite output");
        if (y) {
            double ss = 0;
            for (int64_t i = 0; i < n; i++) ss += (double)y[i] * y[i];
            printf("  bf16 random model (head dim 128): output rms %.3g\n", sqrt(ss / (double)n));
        }
        free(y);
        free_inputs(&in);
    }
    fq_flux_free(a);
    fq_flux_free(b);
    fq_flux_model *q = random_model(ctx, &c, FQ_CPU, FQ_BF16, 1, 1, 7);
    if (q) {
        CHECK(q->quantized && q->blocks[0].ff1.qw && !q->blocks[0].ff1.w && q->compute_dtype == FQ_BF16,
              "quantized random model");
        CHECK(!strcmp(fq_qtensor_name(q->proj_out.qw), "proj_out.weight"), "4-bit names: %s",
              fq_qtensor_name(q->proj_out.qw));
        fq_qtensor_info qi;
        fq_qtensor_get_info(q->blocks[0].ff1.qw, &qi);
        CHECK(qi.double_quant && qi.type == FQ_QUANT_NF4 && qi.blocksize == 64, "nf4 + double quant, blocksize 64");
        rand_inputs in;
        make_inputs(ctx, &c, 1, 8, 4, &in, FQ_BF16);
        int64_t n = 0;
        float *y = forward_on(ctx, q, &in, &n);
        CHECK(y && all_finite(y, n), "random nf4 model: finite output");
        free(y);
        free_inputs(&in);
    }
    fq_flux_free(q);
}

/* ---- 2. ops against the CPU ------------------------------------------------------------------ */

static void test_ops(fq_ctx *ctx, fq_device dev) {
    char dn[16];
    printf("ops on %s vs the CPU:\n", fq_device_name(dev, dn, sizeof dn));
    const fq_dtype rnds[3] = {FQ_F32, FQ_BF16, FQ_F16};
    for (int ri = 0; ri < 3; ri++) {
        const fq_dtype rnd = rnds[ri];
        char w[96];
        int64_t sh[3] = {2, 37, 96}, n = 2 * 37 * 96;
        fq_tensor *x = cpu_rand(ctx, FQ_F32, 3, sh, 1 + ri, 3.0f, 0.0f, rnd), *a = cpu_rand(ctx, FQ_F32, 3, sh, 11 + ri, 2.0f, 0.5f, rnd);
        fq_tensor *y = empty(ctx, FQ_CPU, 3, sh), *dx = to_dev(ctx, x, dev), *da = to_dev(ctx, a, dev), *dy = empty(ctx, dev, 3, sh);
        (void)n;
        if (x && a && y && dx && da && dy) {

        CHECK_OK(ctx, fq_nn_scale(ctx, x, 1000.0f, y, rnd));
        CHECK_OK(ctx, fq_nn_scale(ctx, dx, 1000.0f, dy, rnd));
        snprintf(w, sizeof w, "scale (%s)", fq_dtype_name(rnd));
        compare(ctx, w, dy, y, 0, 0);
        CHECK_OK(ctx, fq_nn_add(ctx, x, a, y, rnd));
        CHECK_OK(ctx, fq_nn_add(ctx, dx, da, dy, rnd));
        snprintf(w, sizeof w, "add (%s)", fq_dtype_name(rnd));
        compare(ctx, w, dy, y, 0, 0);
        /* Transcendental functions are not bit-exact across devices, by decision:
         * PyTorch itself runs CUDA's expf/tanhf on the GPU and other code on the
         * CPU, so neither side defines "the" bits; the model-level golden checks
         * bound the effect. CUDA's expf and tanhf are within 2 ulp, glibc's within
         * 1, and the formulas add a few correctly rounded steps, so every f32
         * element is within ~4 ulp (4 * 2^-23 = 4.8e-7 relative): rel L2 <= 5e-7,
         * and any element may differ in its last bits (H100: 1.7e-8, ~14% of
         * elements). Rounded to bf16/f16, an ulp difference rarely survives: at
         * most 5% of the elements and the rounding dtype's half ulp in rel L2. */
        CHECK_OK(ctx, fq_nn_silu(ctx, x, y, rnd));
        CHECK_OK(ctx, fq_nn_silu(ctx, dx, dy, rnd));
        snprintf(w, sizeof w, "silu (%s)", fq_dtype_name(rnd));
        compare(ctx, w, dy, y, rnd == FQ_F32 ? 5e-7 : 2e-3, rnd == FQ_F32 ? fq_tensor_numel(y) : fq_tensor_numel(y) / 20);
        CHECK_OK(ctx, fq_nn_gelu_tanh(ctx, x, y, rnd));
        CHECK_OK(ctx, fq_nn_gelu_tanh(ctx, dx, dy, rnd));
        snprintf(w, sizeof w, "gelu_tanh (%s)", fq_dtype_name(rnd));
        compare(ctx, w, dy, y, rnd == FQ_F32 ? 5e-7 : 2e-3, rnd == FQ_F32 ? fq_tensor_numel(y) : fq_tensor_numel(y) / 20);

        /* GELU into columns c0.. of a wider tensor (16-byte aligned rows: the
         * vector kernel; c0 = 3: the element kernel), and a copy beside it */
        for (int al = 0; al < 2; al++) {
            const int64_t c0 = al ? 3 : 32, wsh[3] = {2, 37, 96 + c0};
            fq_tensor *cy = empty(ctx, FQ_CPU, 3, wsh), *dcy = empty(ctx, dev, 3, wsh);
            fq_tensor *lft = NULL, *dlft = NULL;
            const int64_t lsh[3] = {2, 37, c0};
            lft = cpu_rand(ctx, FQ_F32, 3, lsh, 71 + ri, 1.0f, 0.0f, rnd);
            dlft = to_dev(ctx, lft, dev);
            if (cy && dcy && lft && dlft) {
                CHECK_OK(ctx, fq_nn_gelu_tanh_cols(ctx, x, cy, c0, rnd));
                CHECK_OK(ctx, fq_nn_gelu_tanh_cols(ctx, dx, dcy, c0, rnd));
                CHECK_OK(ctx, fq_nn_copy_cols(ctx, lft, cy, 0));
                CHECK_OK(ctx, fq_nn_copy_cols(ctx, dlft, dcy, 0));
                snprintf(w, sizeof w, "gelu_tanh_cols + copy_cols, c0 %lld (%s)", (long long)c0, fq_dtype_name(rnd));
                /* the GELU bound (see above) over 96 of 96 + c0 columns */
                compare(ctx, w, dcy, cy, rnd == FQ_F32 ? 5e-7 : 2e-3,
                        rnd == FQ_F32 ? fq_tensor_numel(cy) : fq_tensor_numel(cy) / 20);
            }
            fq_tensor_free(cy), fq_tensor_free(dcy), fq_tensor_free(lft), fq_tensor_free(dlft);
        }

        /* AdaLN with a [B, 6D] modulation, chunks 3 (shift) and 4 (scale) */
        int64_t msh[2] = {2, 6 * 96};
        fq_tensor *mod = cpu_rand(ctx, FQ_F32, 2, msh, 21 + ri, 1.0f, 0.0f, rnd), *dmod = to_dev(ctx, mod, dev);
        if (mod && dmod) {
            CHECK_OK(ctx, fq_nn_adaln(ctx, x, mod, 3, 4, 1e-6f, y, rnd));
            CHECK_OK(ctx, fq_nn_adaln(ctx, dx, dmod, 3, 4, 1e-6f, dy, rnd));
            snprintf(w, sizeof w, "adaln (%s)", fq_dtype_name(rnd));
            compare(ctx, w, dy, y, rnd == FQ_F32 ? 1e-7 : 1e-3, fq_tensor_numel(y) / 1000 + 2);
            /* gated residual add in place on copies */
            fq_tensor *h = cpu_rand(ctx, FQ_F32, 3, sh, 31 + ri, 1.0f, 0.0f, rnd), *dh = to_dev(ctx, h, dev);
            if (h && dh) {
                CHECK_OK(ctx, fq_nn_gated_add(ctx, h, mod, 2, a, rnd));
                CHECK_OK(ctx, fq_nn_gated_add(ctx, dh, dmod, 2, da, rnd));
                snprintf(w, sizeof w, "gated_add (%s)", fq_dtype_name(rnd));
                compare(ctx, w, dh, h, 0, 0);
                /* the fused gated add + AdaLN (y over a, as the forward calls it):
                 * h as exact as gated_add, y within adaln's bounds */
                fq_tensor *a2 = cpu_rand(ctx, FQ_F32, 3, sh, 11 + ri, 2.0f, 0.5f, rnd), *da2 = to_dev(ctx, a2, dev);
                if (a2 && da2) {
                    CHECK_OK(ctx, fq_nn_gated_add_adaln(ctx, h, mod, 2, a2, 3, 4, 1e-6f, a2, rnd));
                    CHECK_OK(ctx, fq_nn_gated_add_adaln(ctx, dh, dmod, 2, da2, 3, 4, 1e-6f, da2, rnd));
                    snprintf(w, sizeof w, "gated_add_adaln h (%s)", fq_dtype_name(rnd));
                    compare(ctx, w, dh, h, 0, 0);
                    snprintf(w, sizeof w, "gated_add_adaln y (%s)", fq_dtype_name(rnd));
                    compare(ctx, w, da2, a2, rnd == FQ_F32 ? 1e-7 : 1e-3, fq_tensor_numel(a2) / 1000 + 2);
                }
                fq_tensor_free(a2);
                fq_tensor_free(da2);
            }
            fq_tensor_free(h);
            fq_tensor_free(dh);
        }
        fq_tensor_free(mod);
        fq_tensor_free(dmod);

        /* per-head RMSNorm (head dim 48, bf16 weight), RoPE with FLUX-like ids */
        int64_t wsh[1] = {48};
        fq_tensor *wn = cpu_rand(ctx, FQ_BF16, 1, wsh, 41, 0.1f, 1.0f, FQ_F32), *dwn = to_dev(ctx, wn, dev);
        if (wn && dwn) {
            CHECK_OK(ctx, fq_nn_rmsnorm_heads(ctx, x, wn, 1e-6f, y, rnd));
            CHECK_OK(ctx, fq_nn_rmsnorm_heads(ctx, dx, dwn, 1e-6f, dy, rnd));
            snprintf(w, sizeof w, "rmsnorm (%s)", fq_dtype_name(rnd));
            compare(ctx, w, dy, y, rnd == FQ_F32 ? 1e-7 : 1e-3, fq_tensor_numel(y) / 1000 + 2);
        }
        fq_tensor_free(wn);
        fq_tensor_free(dwn);
        int64_t ish[2] = {37, 3}, csh[2] = {37, 48}, ax[3] = {8, 20, 20};
        fq_tensor *ids = empty(ctx, FQ_CPU, 2, ish);
        if (ids) {
            float *p = fq_tensor_host_data(ids);
            for (int64_t i = 0; i < 37; i++) p[3 * i] = 0.0f, p[3 * i + 1] = (float)(i / 6), p[3 * i + 2] = (float)(i % 6 * 7);
        }
        fq_tensor *dids = to_dev(ctx, ids, dev), *cs = empty(ctx, FQ_CPU, 2, csh), *sn = empty(ctx, FQ_CPU, 2, csh),
                  *dcs = empty(ctx, dev, 2, csh), *dsn = empty(ctx, dev, 2, csh);
        if (ids && dids && cs && sn && dcs && dsn) {
            CHECK_OK(ctx, fq_nn_rope_table(ctx, ids, ax, 10000.0, cs, sn));
            CHECK_OK(ctx, fq_nn_rope_table(ctx, dids, ax, 10000.0, dcs, dsn));
            if (ri == 0) {
                compare(ctx, "rope_table cos", dcs, cs, 1e-7, 2);
                compare(ctx, "rope_table sin", dsn, sn, 1e-7, 2);
            }
            /* the same tables on both sides, then the rotation (x has 2 heads of 48) */
            fq_tensor *dcs2 = to_dev(ctx, cs, dev), *dsn2 = to_dev(ctx, sn, dev);
            fq_tensor *xr = cpu_rand(ctx, FQ_F32, 3, sh, 51 + ri, 1.0f, 0.0f, rnd), *dxr = to_dev(ctx, xr, dev);
            if (dcs2 && dsn2 && xr && dxr) {
                CHECK_OK(ctx, fq_nn_rope(ctx, xr, cs, sn, 2, rnd));
                CHECK_OK(ctx, fq_nn_rope(ctx, dxr, dcs2, dsn2, 2, rnd));
                snprintf(w, sizeof w, "rope (%s)", fq_dtype_name(rnd));
                compare(ctx, w, dxr, xr, 0, 0);
            }
            fq_tensor_free(dcs2);
            fq_tensor_free(dsn2);
            fq_tensor_free(xr);
            fq_tensor_free(dxr);
        }
        fq_tensor_free(ids);
        fq_tensor_free(dids);
        fq_tensor_free(cs);
        fq_tensor_free(sn);
        fq_tensor_free(dcs);
        fq_tensor_free(dsn);

        /* concat / split along the token dim, and cast from bf16 */
        int64_t s1[3] = {2, 5, 96}, s2[3] = {2, 32, 96};
        fq_tensor *p1 = empty(ctx, FQ_CPU, 3, s1), *p2 = empty(ctx, FQ_CPU, 3, s2), *d1 = empty(ctx, dev, 3, s1),
                  *d2 = empty(ctx, dev, 3, s2);
        if (p1 && p2 && d1 && d2) {
            CHECK_OK(ctx, fq_nn_split(ctx, x, 1, p1, p2));
            CHECK_OK(ctx, fq_nn_split(ctx, dx, 1, d1, d2));
            compare(ctx, "split (first part)", d1, p1, 0, 0);
            compare(ctx, "split (second part)", d2, p2, 0, 0);
            CHECK_OK(ctx, fq_nn_concat(ctx, p2, p1, 1, y));
            CHECK_OK(ctx, fq_nn_concat(ctx, d2, d1, 1, dy));
            compare(ctx, "concat", dy, y, 0, 0);
            /* along the last dim, as a single block's cat(attn, mlp): 16-byte rows
             * (one kernel) and 12-byte rows (cudaMemcpy2D) */
            for (int al = 0; al < 2; al++) {
                int64_t w1 = al ? 3 : 32, e1[3] = {2, 37, w1}, e2[3] = {2, 37, 96 - w1};
                fq_tensor *q1 = empty(ctx, FQ_CPU, 3, e1), *q2 = empty(ctx, FQ_CPU, 3, e2), *g1 = empty(ctx, dev, 3, e1),
                          *g2 = empty(ctx, dev, 3, e2);
                if (q1 && q2 && g1 && g2) {
                    CHECK_OK(ctx, fq_nn_split(ctx, x, 2, q1, q2));
                    CHECK_OK(ctx, fq_nn_split(ctx, dx, 2, g1, g2));
                    compare(ctx, al ? "split (last dim, 12-byte rows)" : "split (last dim)", g2, q2, 0, 0);
                    CHECK_OK(ctx, fq_nn_concat(ctx, q1, q2, 2, y));
                    CHECK_OK(ctx, fq_nn_concat(ctx, g1, g2, 2, dy));
                    compare(ctx, al ? "concat (last dim, 12-byte rows)" : "concat (last dim)", dy, y, 0, 0);
                }
                fq_tensor_free(q1), fq_tensor_free(q2), fq_tensor_free(g1), fq_tensor_free(g2);
            }
        }
        fq_tensor_free(p1);
        fq_tensor_free(p2);
        fq_tensor_free(d1);
        fq_tensor_free(d2);
        fq_tensor *xb = cpu_rand(ctx, FQ_BF16, 3, sh, 61, 4.0f, 0.0f, FQ_F32), *dxb = to_dev(ctx, xb, dev);
        if (xb && dxb) {
            CHECK_OK(ctx, fq_nn_cast(ctx, xb, y, rnd));
            CHECK_OK(ctx, fq_nn_cast(ctx, dxb, dy, rnd));
            snprintf(w, sizeof w, "cast bf16 -> f32 (%s)", fq_dtype_name(rnd));
            compare(ctx, w, dy, y, 0, 0);
        }
        fq_tensor_free(xb);
        fq_tensor_free(dxb);
        /* clamp keeps NaN */
        float *hx = fq_tensor_host_data(x);
        hx[3] = NAN;
        hx[4] = 1e30f;
        fq_tensor *dxn = to_dev(ctx, x, dev);
        if (dxn) {
            CHECK_OK(ctx, fq_nn_clamp(ctx, x, -2.0f, 2.0f));
            CHECK_OK(ctx, fq_nn_clamp(ctx, dxn, -2.0f, 2.0f));
            if (ri == 0) compare(ctx, "clamp (NaN stays NaN)", dxn, x, INFINITY, 0);
        }
        fq_tensor_free(dxn);
        }
        fq_tensor_free(x);
        fq_tensor_free(a);
        fq_tensor_free(y);
        fq_tensor_free(dx);
        fq_tensor_free(da);
        fq_tensor_free(dy);
    }

    /* timestep projection at the arguments diffusers produces (bf16 3.5*1000 = 3504) */
    {
        float tv[3] = {1000.0f, 3504.0f, 898.0f};
        int64_t tsh[1] = {3}, osh[2] = {3, 256};
        fq_tensor *t = NULL, *o = empty(ctx, FQ_CPU, 2, osh), *dout = empty(ctx, dev, 2, osh);
        CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CPU, FQ_F32, 1, tsh, tv, &t));
        fq_tensor *dt = to_dev(ctx, t, dev);
        if (t && o && dout && dt) {
            CHECK_OK(ctx, fq_nn_timestep_proj(ctx, t, o));
            CHECK_OK(ctx, fq_nn_timestep_proj(ctx, dt, dout));
            /* an ulp of expf (or of the f32 product t*freq) moves an argument of
             * 3504 rad by up to 2.4e-4 rad, and cos/sin by as much; with
             * cos^2 + sin^2 = 1 per pair, rel L2 <= 2.4e-4 * sqrt(2) = 3.4e-4 if
             * every argument moved. CUDA's and glibc's expf/cosf/sinf do differ
             * there (H100: 1.99e-5, 280 of 768); diffusers' golden bf16 run used
             * CUDA's, and the golden models bound the effect downstream. */
            compare(ctx, "timestep_proj (args up to 3504 rad)", dout, o, 3.5e-4, 3 * 256);
        }
        fq_tensor_free(t);
        fq_tensor_free(o);
        fq_tensor_free(dout);
        fq_tensor_free(dt);
    }

    /* linears: dense f32 / bf16 weights and 4-bit weights, each compute dtype */
    {
        const int64_t M = 75, N = 96, K = 160;
        int64_t xs[2] = {M, K}, ys[2] = {M, N}, ws[2] = {N, K}, bs[1] = {N};
        for (int ri = 0; ri < 3; ri++) {
            const fq_dtype rnd = rnds[ri];
            char w[96];
            fq_tensor *x = cpu_rand(ctx, FQ_F32, 2, xs, 71, 1.0f, 0.0f, rnd), *dx = to_dev(ctx, x, dev);
            fq_tensor *y = empty(ctx, FQ_CPU, 2, ys), *dy = empty(ctx, dev, 2, ys);
            for (int wt = 0; wt < 2; wt++) {
                fq_tensor *wgt = cpu_rand(ctx, wt ? FQ_BF16 : FQ_F32, 2, ws, 81, 0.1f, 0.0f, FQ_F32);
                fq_tensor *bias = cpu_rand(ctx, wt ? FQ_BF16 : FQ_F32, 1, bs, 82, 0.5f, 0.0f, FQ_F32);
                fq_tensor *dw = to_dev(ctx, wgt, dev), *db = to_dev(ctx, bias, dev);
                int64_t sc = fq_nn_linear_scratch(ctx, wgt, bias, M, rnd), dsc = fq_nn_linear_scratch(ctx, dw, db, M, rnd);
                int64_t scs[1] = {sc > 0 ? sc : 1}, dscs[1] = {dsc};
                fq_tensor *s = empty(ctx, FQ_CPU, 1, scs), *ds = empty(ctx, dev, 1, dscs);
                if (x && dx && y && dy && wgt && bias && dw && db && s && ds) {
                    CHECK_OK(ctx, fq_nn_linear(ctx, x, wgt, bias, y, s, rnd));
                    CHECK_OK(ctx, fq_nn_linear(ctx, dx, dw, db, dy, ds, rnd));
                    snprintf(w, sizeof w, "linear %s weight (%s)", wt ? "bf16" : "f32", fq_dtype_name(rnd));
                    compare(ctx, w, dy, y, rnd == FQ_F32 ? 1e-6 : 4e-3, fq_tensor_numel(y));
                }
                /* a scratch one float too small is refused, not overrun */
                if (ds && dsc > 1) {
                    int64_t small[1] = {dsc - 1};
                    fq_tensor *ds2 = empty(ctx, dev, 1, small);
                    fq_status st = ds2 ? fq_nn_linear(ctx, dx, dw, db, dy, ds2, rnd) : FQ_OK;
                    CHECK(st == FQ_ERR_SHAPE, "small scratch: %s", fq_ctx_error(ctx));
                    fq_tensor_free(ds2);
                }
                fq_tensor_free(wgt);
                fq_tensor_free(bias);
                fq_tensor_free(dw);
                fq_tensor_free(db);
                fq_tensor_free(s);
                fq_tensor_free(ds);
            }
            /* 4-bit: quantized on the CPU (bit-exact with bitsandbytes), copied whole */
            const int kinds[3][2] = {{FQ_QUANT_NF4, 0}, {FQ_QUANT_NF4, 1}, {FQ_QUANT_FP4, 0}};
            for (int qi = 0; qi < 3; qi++) {
                fq_tensor *wgt = cpu_rand(ctx, FQ_BF16, 2, ws, 91 + qi, 0.1f, 0.0f, FQ_F32);
                fq_tensor *bias = cpu_rand(ctx, FQ_BF16, 1, bs, 95, 0.5f, 0.0f, FQ_F32), *db = to_dev(ctx, bias, dev);
                fq_quant_params qp = fq_quant_default_params();
                qp.type = (fq_quant_type)kinds[qi][0];
                qp.double_quant = kinds[qi][1];
                fq_qtensor *q = NULL, *dq = NULL;
                if (wgt) CHECK_OK(ctx, fq_quantize_4bit(ctx, wgt, &qp, &q));
                if (q) CHECK_OK(ctx, fq_qtensor_copy_to(ctx, q, dev, &dq));
                if (x && dx && y && dy && q && dq && db) {
                    int64_t sc = fq_nn_linear_q4_scratch(ctx, q, bias, M, rnd), dsc = fq_nn_linear_q4_scratch(ctx, dq, db, M, rnd);
                    int64_t scs[1] = {sc > 0 ? sc : 1}, dscs[1] = {dsc};
                    fq_tensor *s = empty(ctx, FQ_CPU, 1, scs), *ds = empty(ctx, dev, 1, dscs);
                    if (s && ds) {
                        CHECK_OK(ctx, fq_nn_linear_q4(ctx, x, q, bias, y, s, rnd));
                        CHECK_OK(ctx, fq_nn_linear_q4(ctx, dx, dq, db, dy, ds, rnd));
                        snprintf(w, sizeof w, "linear %s%s (%s)", qi == 2 ? "fp4" : "nf4", qi == 1 ? "+dq" : "",
                                 fq_dtype_name(rnd));
                        compare(ctx, w, dy, y, rnd == FQ_F32 ? 1e-6 : 4e-3, fq_tensor_numel(y));
                    }
                    fq_tensor_free(s);
                    fq_tensor_free(ds);
                }
                fq_qtensor_free(q);
                fq_qtensor_free(dq);
                fq_tensor_free(wgt);
                fq_tensor_free(bias);
                fq_tensor_free(db);
            }
            fq_tensor_free(x);
            fq_tensor_free(dx);
            fq_tensor_free(y);
            fq_tensor_free(dy);
        }
    }

    /* operands on two devices: the op names them and refuses */
    {
        int64_t sh[2] = {4, 8};
        fq_tensor *a = cpu_rand(ctx, FQ_F32, 2, sh, 5, 1.0f, 0.0f, FQ_F32), *dy = empty(ctx, dev, 2, sh);
        if (a && dy) {
            fq_tensor_set_name(ctx, a, "stray_input");
            fq_status s = fq_nn_silu(ctx, a, dy, FQ_F32);
            CHECK(s == FQ_ERR_DEVICE_MISMATCH && strstr(fq_ctx_error(ctx), "stray_input") && strstr(fq_ctx_error(ctx), "cpu"),
                  "mixed devices: %s", fq_ctx_error(ctx));
            printf("  mixed devices -> %s: %s\n", fq_status_str(s), fq_ctx_error(ctx));
        }
        fq_tensor_free(a);
        fq_tensor_free(dy);
    }
}

/* 4-bit linears of 1 and 2 rows (the modulation linears) run the streaming GEMV
 * on the GPU instead of dequantize + cuBLASLt. Random x: against the CPU (the
 * same tolerance as the GEMM path above). One-hot rows of x: every output is
 * one product W[n][j] * 1 plus the bias, so the GEMV and the reference path
 * (FQ_LINEAR_DEQUANT_BLAS) must agree in every bit; they would not if the GEMV
 * entered W other than exactly as dequantize_4bit writes it. */
static void test_linear_q4_gemv(fq_ctx *ctx, fq_device dev) {
    char dn[16];
    printf("4-bit linears of 1 and 2 rows (GEMV) on %s:\n", fq_device_name(dev, dn, sizeof dn));
    const int64_t N = 96, K = 256;
    const fq_dtype rnds[2] = {FQ_BF16, FQ_F16};
    const int kinds[3][2] = {{FQ_QUANT_NF4, 0}, {FQ_QUANT_NF4, 1}, {FQ_QUANT_FP4, 0}};
    for (int64_t M = 1; M <= 2; M++)
        for (int ri = 0; ri < 2; ri++)
            for (int qi = 0; qi < 3; qi++) {
                const fq_dtype rnd = rnds[ri];
                int64_t xs[2] = {M, K}, ys[2] = {M, N}, ws[2] = {N, K}, bs[1] = {N};
                fq_tensor *wgt = cpu_rand(ctx, FQ_BF16, 2, ws, 191 + qi, 0.1f, 0.0f, FQ_F32);
                fq_tensor *bias = cpu_rand(ctx, rnd, 1, bs, 195, 0.5f, 0.0f, FQ_F32), *db = to_dev(ctx, bias, dev);
                fq_tensor *x = cpu_rand(ctx, FQ_F32, 2, xs, 171 + M, 1.0f, 0.0f, rnd), *y = empty(ctx, FQ_CPU, 2, ys);
                fq_tensor *onehot = empty(ctx, FQ_CPU, 2, xs);
                fq_quant_params qp = fq_quant_default_params();
                qp.type = (fq_quant_type)kinds[qi][0];
                qp.double_quant = kinds[qi][1];
                fq_qtensor *q = NULL, *dq = NULL;
                if (wgt) CHECK_OK(ctx, fq_quantize_4bit(ctx, wgt, &qp, &q));
                if (q) CHECK_OK(ctx, fq_qtensor_copy_to(ctx, q, dev, &dq));
                if (onehot) {
                    float *h = fq_tensor_host_data(onehot);
                    memset(h, 0, sizeof(float) * (size_t)(M * K));
                    for (int64_t r = 0; r < M; r++) h[r * K + (37 + 101 * r) % K] = 1.0f;
                }
                const int64_t sc = q ? fq_nn_linear_q4_scratch(ctx, q, bias, M, rnd) : 0;
                const int64_t dsc = dq ? fq_nn_linear_q4_scratch_io(ctx, dq, db, M, rnd, FQ_F32, FQ_F32) : 0;
                int64_t scs[1] = {sc > 0 ? sc : 1}, dscs[1] = {dsc > 0 ? dsc : 1};
                fq_tensor *s = empty(ctx, FQ_CPU, 1, scs), *ds = empty(ctx, dev, 1, dscs);
                fq_tensor *dy = empty(ctx, dev, 2, ys), *dy2 = empty(ctx, dev, 2, ys);
                fq_tensor *dx = to_dev(ctx, x, dev), *dh = to_dev(ctx, onehot, dev);
                char w[96];
                if (q && dq && db && s && ds && dy && dy2 && dx && dh && y) {
                    CHECK_OK(ctx, fq_nn_linear_q4(ctx, x, q, bias, y, s, rnd));
                    CHECK_OK(ctx, fq_nn_linear_q4(ctx, dx, dq, db, dy, ds, rnd));
                    snprintf(w, sizeof w, "M=%lld %s%s (%s) vs the CPU", (long long)M, qi == 2 ? "fp4" : "nf4",
                             qi == 1 ? "+dq" : "", fq_dtype_name(rnd));
                    compare(ctx, w, dy, y, 4e-3, M * N);
                    /* one-hot rows: the GEMV against dequantize + cuBLASLt, bit for bit */
                    CHECK_OK(ctx, fq_nn_linear_q4(ctx, dh, dq, db, dy, ds, rnd));
                    fq_ctx_set_linear_kernel(ctx, FQ_LINEAR_DEQUANT_BLAS);
                    CHECK_OK(ctx, fq_nn_linear_q4(ctx, dh, dq, db, dy2, ds, rnd));
                    fq_ctx_set_linear_kernel(ctx, FQ_LINEAR_AUTO);
                    fq_tensor *ref = to_dev(ctx, dy2, FQ_CPU);
                    snprintf(w, sizeof w, "M=%lld %s%s (%s) one-hot vs dequantize", (long long)M,
                             qi == 2 ? "fp4" : "nf4", qi == 1 ? "+dq" : "", fq_dtype_name(rnd));
                    if (ref) compare(ctx, w, dy, ref, 0, 0);
                    fq_tensor_free(ref);
                }
                fq_qtensor_free(q);
                fq_qtensor_free(dq);
                fq_tensor_free(wgt);
                fq_tensor_free(bias);
                fq_tensor_free(db);
                fq_tensor_free(x);
                fq_tensor_free(y);
                fq_tensor_free(onehot);
                fq_tensor_free(s);
                fq_tensor_free(ds);
                fq_tensor_free(dy);
                fq_tensor_free(dy2);
                fq_tensor_free(dx);
                fq_tensor_free(dh);
            }
}

/* Rows [r0, r0 + rows) of a 2-D tensor [*, n] as a [rows, n] view. */
static fq_tensor rows_view(const fq_tensor *t, int64_t r0, int64_t rows) {
    fq_tensor v = *t;
    const size_t es = fq_dtype_size(t->dtype);
    v.shape[0] = rows;
    v.numel = rows * t->shape[1];
    v.buf.ptr = (char *)t->buf.ptr + (size_t)(r0 * t->shape[1]) * es;
    v.buf.bytes = (size_t)v.numel * es;
    return v;
}

/* The same bytes in two device tensors. */
static int same_bytes(fq_ctx *ctx, const fq_tensor *a, const fq_tensor *b) {
    fq_tensor *ha = to_dev(ctx, a, FQ_CPU), *hb = to_dev(ctx, b, FQ_CPU);
    int r = ha && hb && fq_tensor_nbytes(ha) == fq_tensor_nbytes(hb) &&
            memcmp(fq_tensor_host_data(ha), fq_tensor_host_data(hb), fq_tensor_nbytes(ha)) == 0;
    fq_tensor_free(ha);
    fq_tensor_free(hb);
    return r;
}

/* The group call, and how many linear ops it ran (the profiler's count): 1 when it
 * batched, g when it fell back to g calls. -1 on error. */
static int64_t group_ops(fq_ctx *ctx, fq_device dev, const fq_tensor *x, const fq_qtensor *const *w,
                         const fq_tensor *const *b, const fq_tensor *bcat, fq_tensor *const *y, fq_tensor *scratch,
                         fq_dtype rnd) {
    fq_nn_prof *pr = NULL;
    double ms[FQ_NN_CLASSES];
    int64_t ops[FQ_NN_CLASSES];
    int64_t r = -1;
    CHECK_OK(ctx, fq_nn_prof_create(ctx, dev, 16, &pr));
    if (pr && fq_nn_prof_start(ctx, pr) == FQ_OK) {
        CHECK_OK(ctx, fq_nn_linear_q4_group(ctx, x, w, b, bcat, y, 3, scratch, rnd));
        if (fq_nn_prof_stop(ctx, pr, ms, ops) == FQ_OK) r = ops[FQ_NN_CLASS_LINEAR];
    }
    fq_nn_prof_free(pr);
    return r;
}

/* fq_nn_linear_q4_group (q, k, v as one batched GEMM) against three fq_nn_linear_q4
 * calls: the same bits, batched or not (bias_cat NULL, outputs not at one stride). */
static void test_linear_q4_group(fq_ctx *ctx, fq_device dev) {
    char dn[16];
    printf("4-bit q, k, v as one batched GEMM on %s:\n", fq_device_name(dev, dn, sizeof dn));
    static const struct {
        int64_t m, n, k;
        fq_dtype rnd;
        int qtype, dq;
    } cases[] = {
        {4608, 3072, 3072, FQ_BF16, FQ_QUANT_NF4, 1}, /* a FLUX single block at 1024x1024 */
        {512, 3072, 3072, FQ_BF16, FQ_QUANT_NF4, 1},  /* the text stream's rows */
        {5, 96, 256, FQ_BF16, FQ_QUANT_FP4, 0},
        {33, 64, 128, FQ_F16, FQ_QUANT_NF4, 0}, /* f16 compute: f32 activations, three calls */
        {2, 96, 256, FQ_BF16, FQ_QUANT_NF4, 1}, /* 2 rows: the GEMV, three calls */
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const int64_t M = cases[ci].m, N = cases[ci].n, K = cases[ci].k;
        const fq_dtype rnd = cases[ci].rnd, act = rnd == FQ_BF16 ? FQ_BF16 : FQ_F32; /* as fq_nn_act_dtype */
        int64_t xs[2] = {M, K}, ws[2] = {N, K}, bs[1] = {N}, bcs[1] = {3 * N}, ys[2] = {4 * M, N};
        fq_qtensor *q[3] = {NULL, NULL, NULL};
        fq_tensor *b[3] = {NULL, NULL, NULL}, *bh[3] = {NULL, NULL, NULL};
        fq_tensor *x = NULL, *bcat = NULL, *bcath = NULL, *yg = NULL, *yr = NULL, *scratch = NULL;
        int ok = 1;
        for (int j = 0; j < 3 && ok; j++) {
            fq_tensor *w = cpu_rand(ctx, FQ_BF16, 2, ws, 301 + 7 * ci + j, 0.05f, 0.0f, FQ_F32);
            fq_quant_params qp = fq_quant_default_params();
            qp.type = (fq_quant_type)cases[ci].qtype;
            qp.double_quant = cases[ci].dq;
            fq_qtensor *hq = NULL;
            if (w) CHECK_OK(ctx, fq_quantize_4bit(ctx, w, &qp, &hq));
            if (hq) CHECK_OK(ctx, fq_qtensor_copy_to(ctx, hq, dev, &q[j]));
            bh[j] = cpu_rand(ctx, rnd, 1, bs, 331 + j, 0.5f, 0.0f, FQ_F32);
            b[j] = to_dev(ctx, bh[j], dev);
            fq_qtensor_free(hq);
            fq_tensor_free(w);
            ok = q[j] && b[j];
        }
        fq_tensor *xh = cpu_rand(ctx, act, 2, xs, 351 + ci, 1.0f, 0.0f, rnd);
        x = to_dev(ctx, xh, dev);
        fq_tensor_free(xh);
        CHECK_OK(ctx, fq_tensor_create(ctx, FQ_CPU, rnd, 1, bcs, &bcath));
        if (bcath && ok)
            for (int j = 0; j < 3; j++)
                memcpy((char *)fq_tensor_host_data(bcath) + (size_t)(j * N) * fq_dtype_size(rnd),
                       fq_tensor_host_data(bh[j]), (size_t)N * fq_dtype_size(rnd));
        bcat = to_dev(ctx, bcath, dev);
        CHECK_OK(ctx, fq_tensor_create(ctx, dev, act, 2, ys, &yg));
        CHECK_OK(ctx, fq_tensor_create(ctx, dev, act, 2, ys, &yr));
        const int64_t sc = q[0] ? fq_nn_linear_q4_group_scratch(ctx, q[0], b[0], 3, M, rnd, act, act) : 0;
        int64_t scs[1] = {sc > 0 ? sc : 1};
        scratch = empty(ctx, dev, 1, scs);
        if (ok && x && bcat && yg && yr && scratch) {
            char what[128];
            /* the reference: three calls into rows [0, M), [M, 2M), [2M, 3M) */
            fq_tensor r[3], g[3], h[3];
            for (int j = 0; j < 3; j++) {
                r[j] = rows_view(yr, j * M, M);
                g[j] = rows_view(yg, j * M, M);
                CHECK_OK(ctx, fq_nn_linear_q4(ctx, x, q[j], b[j], &r[j], scratch, rnd));
            }
            fq_tensor *const gy[3] = {&g[0], &g[1], &g[2]};
            const fq_qtensor *qw[3] = {q[0], q[1], q[2]};
            const fq_tensor *bb[3] = {b[0], b[1], b[2]};
            /* one batched GEMM for 16-bit activations and token rows, else three calls */
            const int64_t nops = group_ops(ctx, dev, x, qw, bb, bcat, gy, scratch, rnd);
            const int64_t want = act == rnd && M > 2 ? 1 : 3;
            snprintf(what, sizeof what, "M=%lld N=%lld K=%lld %s: batched == three calls", (long long)M,
                     (long long)N, (long long)K, fq_dtype_name(rnd));
            CHECK(nops == want, "%s: %lld linear ops, expected %lld", what, (long long)nops, (long long)want);
            fq_tensor g3 = rows_view(yg, 0, 3 * M), r3 = rows_view(yr, 0, 3 * M);
            CHECK(same_bytes(ctx, &g3, &r3), "%s", what);
            /* not at one stride (v a block of rows further): three calls, the same bits */
            fq_tensor *y2 = NULL, *y3 = NULL;
            CHECK_OK(ctx, fq_tensor_create(ctx, dev, act, 2, ys, &y2));
            CHECK_OK(ctx, fq_tensor_create(ctx, dev, act, 2, ys, &y3));
            if (y2 && y3) {
                h[0] = rows_view(y2, 0, M), h[1] = rows_view(y2, M, M), h[2] = rows_view(y2, 3 * M, M);
                fq_tensor *const hy[3] = {&h[0], &h[1], &h[2]};
                CHECK(group_ops(ctx, dev, x, qw, bb, bcat, hy, scratch, rnd) == 3, "%s, not at one stride: three calls",
                      what);
                fq_tensor h01 = rows_view(y2, 0, 2 * M), r01 = rows_view(yr, 0, 2 * M);
                CHECK(same_bytes(ctx, &h01, &r01) && same_bytes(ctx, &h[2], &r[2]), "%s, outputs not at one stride",
                      what);
                /* no bias_cat: three calls */
                fq_tensor t[3] = {rows_view(y3, 0, M), rows_view(y3, M, M), rows_view(y3, 2 * M, M)};
                fq_tensor *const ty[3] = {&t[0], &t[1], &t[2]};
                CHECK(group_ops(ctx, dev, x, qw, bb, NULL, ty, scratch, rnd) == 3, "%s, no bias_cat: three calls", what);
                fq_tensor t3 = rows_view(y3, 0, 3 * M), r3 = rows_view(yr, 0, 3 * M);
                CHECK(same_bytes(ctx, &t3, &r3), "%s, no bias_cat", what);
                /* no biases but a bias_cat: three calls without a bias (bias_cat is not used) */
                const fq_tensor *nob[3] = {NULL, NULL, NULL};
                for (int j = 0; j < 3; j++) CHECK_OK(ctx, fq_nn_linear_q4(ctx, x, q[j], NULL, &r[j], scratch, rnd));
                CHECK_OK(ctx, fq_nn_linear_q4_group(ctx, x, qw, nob, bcat, ty, 3, scratch, rnd));
                CHECK(same_bytes(ctx, &t3, &r3), "%s, no biases (bias_cat ignored)", what);
            }
            fq_tensor_free(y2);
            fq_tensor_free(y3);
            /* a wrong bias shape is an error, as for one call */
            const fq_tensor *bad[3] = {b[0], bcat, b[2]};
            fq_status st = fq_nn_linear_q4_group(ctx, x, qw, bad, bcat, gy, 3, scratch, rnd);
            CHECK(st == FQ_ERR_SHAPE && strstr(fq_ctx_error(ctx), "bias"), "bias of the wrong shape: %s",
                  fq_ctx_error(ctx));
        }
        for (int j = 0; j < 3; j++) {
            fq_qtensor_free(q[j]);
            fq_tensor_free(b[j]);
            fq_tensor_free(bh[j]);
        }
        fq_tensor_free(x);
        fq_tensor_free(bcat);
        fq_tensor_free(bcath);
        fq_tensor_free(yg);
        fq_tensor_free(yr);
        fq_tensor_free(scratch);
    }
}

/* ---- 3. attention ------------------------------------------------------------------------------ */

static void attn_ref64(const float *q, const float *k, const float *v, double *out, int64_t B, int64_t S, int64_t H,
                       int64_t dh) {
    const int64_t ld = H * dh;
    double *sc = malloc(sizeof(double) * (size_t)S);
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < S; i++) {
                const float *qi = q + (b * S + i) * ld + h * dh;
                double mx = -INFINITY, sum = 0;
                for (int64_t j = 0; j < S; j++) {
                    const float *kj = k + (b * S + j) * ld + h * dh;
                    double d = 0;
                    for (int64_t e = 0; e < dh; e++) d += (double)qi[e] * kj[e];
                    sc[j] = d / sqrt((double)dh);
                    mx = sc[j] > mx ? sc[j] : mx;
                }
                for (int64_t j = 0; j < S; j++) sum += (sc[j] = exp(sc[j] - mx));
                double *o = out + (b * S + i) * ld + h * dh;
                for (int64_t e = 0; e < dh; e++) {
                    double acc = 0;
                    for (int64_t j = 0; j < S; j++) acc += sc[j] * v[(b * S + j) * ld + h * dh + e];
                    o[e] = acc / sum;
                }
            }
    free(sc);
}

typedef struct {
    int64_t B, S, H, dh;
    fq_dtype rnd;
    int impl;
    float qscale;
} attn_case;

static void test_attention(fq_ctx *ctx, fq_device dev) {
    char dn[16];
    printf("attention on %s vs the CPU kernel and float64:\n", fq_device_name(dev, dn, sizeof dn));
    const attn_case cases[] = {
        {1, 1, 1, 16, FQ_BF16, FQ_NN_ATTN_AUTO, 3.0f},  {1, 7, 2, 8, FQ_BF16, FQ_NN_ATTN_AUTO, 3.0f},
        {2, 55, 2, 16, FQ_BF16, FQ_NN_ATTN_AUTO, 3.0f}, {1, 192, 2, 32, FQ_F16, FQ_NN_ATTN_AUTO, 3.0f},
        {1, 130, 3, 64, FQ_F16, FQ_NN_ATTN_AUTO, 3.0f}, {1, 257, 2, 128, FQ_BF16, FQ_NN_ATTN_AUTO, 3.0f},
        {1, 257, 2, 128, FQ_BF16, FQ_NN_ATTN_AUTO, 8.0f}, {2, 600, 2, 128, FQ_BF16, FQ_NN_ATTN_AUTO, 3.0f},
        {1, 300, 2, 100, FQ_BF16, FQ_NN_ATTN_MMA, 3.0f}, {1, 200, 2, 128, FQ_BF16, FQ_NN_ATTN_SIMT, 3.0f},
        {2, 55, 2, 16, FQ_F32, FQ_NN_ATTN_AUTO, 3.0f},  {1, 300, 2, 128, FQ_F32, FQ_NN_ATTN_AUTO, 3.0f},
        {1, 40, 1, 320, FQ_BF16, FQ_NN_ATTN_AUTO, 3.0f}, {2, 600, 2, 128, FQ_BF16, FQ_NN_ATTN_MMA1, 3.0f},
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const attn_case *c = &cases[ci];
        int64_t sh[3] = {c->B, c->S, c->H * c->dh}, n = c->B * c->S * c->H * c->dh;
        fq_tensor *q = cpu_rand(ctx, FQ_F32, 3, sh, 1000 + ci, c->qscale, 0.0f, c->rnd);
        fq_tensor *k = cpu_rand(ctx, FQ_F32, 3, sh, 2000 + ci, 1.0f, 0.0f, c->rnd);
        fq_tensor *v = cpu_rand(ctx, FQ_F32, 3, sh, 3000 + ci, 1.0f, 0.0f, c->rnd);
        fq_tensor *o = empty(ctx, FQ_CPU, 3, sh), *dq = to_dev(ctx, q, dev), *dk = to_dev(ctx, k, dev),
                  *dv = to_dev(ctx, v, dev), *dout = empty(ctx, dev, 3, sh);
        int64_t cs[1] = {fq_nn_attention_scratch(FQ_CPU, c->B, c->S, c->H, c->dh, c->rnd)};
        int64_t gs[1] = {fq_nn_attention_scratch_impl(dev, c->B, c->S, c->H, c->dh, c->rnd, c->impl)};
        if (gs[0] < 1) gs[0] = 1;
        fq_tensor *scr = empty(ctx, FQ_CPU, 1, cs), *dscr = empty(ctx, dev, 1, gs);
        double *ref = malloc(sizeof(double) * (size_t)n);
        if (q && k && v && o && dq && dk && dv && dout && scr && dscr && ref) {
            CHECK_OK(ctx, fq_nn_attention(ctx, q, k, v, c->H, o, scr, c->rnd));
            fq_status s = fq_nn_attention_impl(ctx, dq, dk, dv, c->H, dout, dscr, c->rnd, c->impl);
            CHECK(s == FQ_OK, "attention case %zu: %s", ci, fq_ctx_error(ctx));
            float *g = s == FQ_OK ? host_f32(ctx, dout) : NULL;
            if (g) {
                attn_ref64(fq_tensor_host_data(q), fq_tensor_host_data(k), fq_tensor_host_data(v), ref, c->B, c->S,
                           c->H, c->dh);
                const float *cpu = fq_tensor_host_data(o);
                double e_gc = rel_l2_ff(g, cpu, n), e_g64 = rel_l2_fd(g, ref, n), e_c64 = rel_l2_fd(cpu, ref, n);
                const double tol = c->rnd == FQ_F32 ? 2e-6 : 1e-2;
                const char *kname = c->impl == FQ_NN_ATTN_SIMT || c->rnd == FQ_F32 || c->dh > 128 ? "f32" : "mma";
                printf("  B%lld S%-4lld H%lld dh%-3lld %-4s %s q*%-2g: vs CPU %.3g | vs f64: GPU %.3g, CPU %.3g\n",
                       (long long)c->B, (long long)c->S, (long long)c->H, (long long)c->dh, fq_dtype_name(c->rnd), kname,
                       c->qscale, e_gc, e_g64, e_c64);
                CHECK(e_gc <= tol, "attention case %zu: rel L2 %.3g to the CPU kernel (tol %.3g)", ci, e_gc, tol);
                CHECK(e_g64 <= 2.0 * e_c64 + (c->rnd == FQ_F32 ? 1e-6 : 1e-3),
                      "attention case %zu: GPU is %.3g from float64, the CPU %.3g", ci, e_g64, e_c64);
                CHECK(all_finite(g, n), "attention case %zu: finite", ci);
            }
            free(g);
        }
        free(ref);
        fq_tensor *all[] = {q, k, v, o, dq, dk, dv, dout, scr, dscr};
        for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) fq_tensor_free(all[i]);
    }
    /* what the CUDA kernels cannot do is refused with a message */
    int64_t sh[3] = {1, 4, 640};
    fq_tensor *q = empty(ctx, dev, 3, sh), *o = empty(ctx, dev, 3, sh);
    if (q && o) {
        fq_status s = fq_nn_attention(ctx, q, q, q, 1, o, NULL, FQ_F32);
        CHECK(s == FQ_ERR_UNSUPPORTED && strstr(fq_ctx_error(ctx), "640"), "head dim 640: %s", fq_ctx_error(ctx));
        s = fq_nn_attention_impl(ctx, q, q, q, 5, o, NULL, FQ_F32, FQ_NN_ATTN_MMA);
        CHECK(s == FQ_ERR_UNSUPPORTED, "mma with f32: %s", fq_ctx_error(ctx));
    }
    fq_tensor_free(q);
    fq_tensor_free(o);
}

/* ---- 4. golden models --------------------------------------------------------------------------- */

typedef struct {
    fq_ctx *ctx;
    const fq_st_file *rec;
    int64_t st, si;
    double tol, worst;
    char worst_name[160];
    int compared;
} tapper;

static void compare_rows(tapper *tp, const char *name, const float *x, int64_t batch, int64_t rows, int64_t row0,
                         int64_t nrows, int64_t width, int64_t stride, int64_t col0) {
    int64_t n;
    double *ref = gold_values(tp->rec, name, &n);
    if (!ref) return;
    if (n != batch * nrows * width) {
        CHECK(0, "%s: recorded %lld values, computed %lld", name, (long long)n, (long long)(batch * nrows * width));
        free(ref);
        return;
    }
    float *mine = malloc(sizeof(float) * (size_t)n);
    for (int64_t b = 0; b < batch; b++)
        for (int64_t r = 0; r < nrows; r++)
            memcpy(mine + (b * nrows + r) * width, x + (b * rows + row0 + r) * stride + col0, sizeof(float) * (size_t)width);
    double e = rel_l2_fd(mine, ref, n);
    CHECK(e <= tp->tol, "intermediate %s: rel L2 %.3g > %.3g", name, e, tp->tol);
    if (e > tp->worst) {
        tp->worst = e;
        snprintf(tp->worst_name, sizeof tp->worst_name, "%s", name);
    }
    tp->compared++;
    free(mine);
    free(ref);
}

/* The forward's observer: copies the device tensor to the host, then compares
 * it with the recorded activation of the same name (as test_flux_cpu.c). */
static void on_tap(void *user, const char *name, const fq_tensor *t) {
    tapper *tp = user;
    float *x = host_f32(tp->ctx, t);
    if (!x) return;
    const int64_t *sh = t->shape;
    char n2[200];
    const char *dot = strrchr(name, '.');
    if (dot && !strcmp(dot, ".emb")) {
        static const char *dbl[6] = {NULL, NULL, "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp"};
        int64_t k = strstr(name, "single_") == name ? 3 : 6, d = sh[1] / k;
        for (int c = 0; c < k; c++) {
            const char *label = k == 6 ? dbl[c] : c == 2 ? "gate" : NULL;
            if (!label) continue;
            snprintf(n2, sizeof n2, "%.*s.%s", (int)(dot - name), name, label);
            compare_rows(tp, n2, x, sh[0], 1, 0, 1, d, sh[1], c * d);
        }
    } else if (!strncmp(name, "single_transformer_blocks.", 26) && !strchr(name + 26, '.')) {
        snprintf(n2, sizeof n2, "%s.encoder_hidden_states", name);
        compare_rows(tp, n2, x, sh[0], sh[1], 0, tp->st, sh[2], sh[2], 0);
        snprintf(n2, sizeof n2, "%s.hidden_states", name);
        compare_rows(tp, n2, x, sh[0], sh[1], tp->st, tp->si, sh[2], sh[2], 0);
    } else {
        int64_t rows = t->ndim == 3 ? sh[1] : 1, width = sh[t->ndim - 1], batch = t->ndim >= 2 ? sh[0] : 1;
        if (t->ndim == 2 && (!strcmp(name, "pos_embed.cos") || !strcmp(name, "pos_embed.sin"))) batch = 1, rows = sh[0];
        compare_rows(tp, name, x, batch, rows, 0, rows, width, width, 0);
    }
    free(x);
}

typedef struct {
    const char *dir, *model, *config; /* config: BFL only */
    int bf16_inputs;
    const char *activations;
    double act_tol;
} golden_spec;

/* Loads spec's model onto dev (unless *keep holds one), runs it on the golden
 * inputs; returns the output on the host (caller frees). */
static float *run_golden(fq_ctx *ctx, const golden_spec *gs, fq_device dev, tapper *tp, int64_t *numel,
                         fq_flux_model **keep) {
    char path[512], cfg[512], inp[512];
    snprintf(path, sizeof path, FIX "/%s/%s", gs->dir, gs->model);
    snprintf(inp, sizeof inp, FIX "/%s/inputs.safetensors", gs->dir);
    fq_flux_load_params lp = fq_flux_load_default_params();
    lp.device = dev;
    if (gs->config) {
        snprintf(cfg, sizeof cfg, FIX "/%s/%s", gs->dir, gs->config);
        lp.config_path = cfg;
    }
    fq_flux_model *m = keep ? *keep : NULL;
    if (!m) {
        fq_status s = fq_flux_load(ctx, path, &lp, &m);
        CHECK(s == FQ_OK, "load %s: %s", path, fq_ctx_error(ctx));
        if (s != FQ_OK) return NULL;
    }
    fq_st_file *in = NULL;
    CHECK_OK(ctx, fq_st_open(ctx, inp, &in));
    float *res = NULL;
    if (in) {
        const char *keys[7] = {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance",
                               "img_ids", "txt_ids"};
        fq_tensor *h[7], *d[7];
        for (int i = 0; i < 7; i++) {
            char nm[64];
            snprintf(nm, sizeof nm, "%s%s", gs->bf16_inputs ? "bf16." : "", keys[i]);
            h[i] = gold_input(ctx, in, nm);
            d[i] = h[i] ? to_dev(ctx, h[i], m->device) : NULL;
        }
        CHECK(h[0] && h[1], "golden inputs of %s", gs->dir);
        int64_t B = h[0] ? h[0]->shape[0] : 1, Si = h[0] ? h[0]->shape[1] : 1, St = h[1] ? h[1]->shape[1] : 0;
        fq_flux_plan *p = NULL;
        CHECK_OK(ctx, fq_flux_plan_create(ctx, m, B, St, Si, &p));
        if (p && g_exact_gelu) fq_flux_plan_set_fused_gelu(p, 0);
        fq_st_file *act = NULL;
        if (p && tp && gs->activations) {
            snprintf(path, sizeof path, FIX "/%s/%s", gs->dir, gs->activations);
            CHECK_OK(ctx, fq_st_open(ctx, path, &act));
            tp->ctx = ctx, tp->rec = act, tp->st = St, tp->si = Si, tp->tol = gs->act_tol;
            if (act) fq_flux_plan_set_tap(p, on_tap, tp);
        }
        int64_t osh[3] = {B, Si, m->cfg.out_dim};
        fq_tensor *out = empty(ctx, m->device, 3, osh);
        if (p && out) {
            fq_flux_inputs fi = {d[0], d[1], d[2], d[3], d[4], d[5], d[6]};
            fq_status s = fq_flux_forward(ctx, m, p, &fi, out);
            CHECK(s == FQ_OK, "forward %s/%s: %s", gs->dir, gs->model, fq_ctx_error(ctx));
            if (s == FQ_OK) res = host_f32(ctx, out);
            if (res) *numel = fq_tensor_numel(out);
        }
        fq_tensor_free(out);
        fq_st_close(act);
        fq_flux_plan_free(p);
        for (int i = 0; i < 7; i++) {
            fq_tensor_free(h[i]);
            fq_tensor_free(d[i]);
        }
        fq_st_close(in);
    }
    if (keep) *keep = m;
    else fq_flux_free(m);
    return res;
}

static double vs_output(fq_ctx *ctx, const char *dir, const float *y, int64_t n, const char *name) {
    char p[512];
    snprintf(p, sizeof p, FIX "/%s/outputs.safetensors", dir);
    fq_st_file *f = NULL;
    if (fq_st_open(ctx, p, &f) != FQ_OK) return -1;
    int64_t m = 0;
    double *ref = gold_values(f, name, &m), e = -1;
    if (ref && m == n) e = rel_l2_fd(y, ref, n);
    free(ref);
    fq_st_close(f);
    return e;
}

static double diffusers_fp32_err(fq_ctx *ctx, const char *dir) {
    char p[512];
    snprintf(p, sizeof p, FIX "/%s/outputs.safetensors", dir);
    fq_st_file *f = NULL;
    if (fq_st_open(ctx, p, &f) != FQ_OK) return -1;
    int64_t n1, n2;
    double *a = gold_values(f, "out.fp32_cuda", &n1), *b = gold_values(f, "out.f64_cpu", &n2), e = -1;
    if (a && b && n1 == n2) {
        double num = 0, den = 0;
        for (int64_t i = 0; i < n1; i++) num += (a[i] - b[i]) * (a[i] - b[i]), den += b[i] * b[i];
        e = sqrt(num / den);
    }
    free(a);
    free(b);
    fq_st_close(f);
    return e;
}

/* One golden case on dev, against its reference and against the CPU. */
static void golden_case(fq_ctx *ctx, fq_device dev, const golden_spec *gs, const char *ref_name, double tol,
                        double cpu_tol, float **out_keep) {
    char dn[16];
    fq_device_name(dev, dn, sizeof dn);
    tapper tp;
    memset(&tp, 0, sizeof tp);
    int64_t n = 0, nc = 0;
    float *y = run_golden(ctx, gs, dev, gs->activations ? &tp : NULL, &n, NULL);
    float *yc = run_golden(ctx, gs, FQ_CPU, NULL, &nc, NULL);
    if (y) {
        double e = vs_output(ctx, gs->dir, y, n, ref_name), ec = yc && nc == n ? rel_l2_ff(y, yc, n) : -1;
        double bar = tol;
        if (!strcmp(ref_name, "out.f64_cpu")) bar = diffusers_fp32_err(ctx, gs->dir) * 1.05 + 1e-7;
        printf("  %s %s/%s: rel L2 vs %s %.3g (bar %.3g); vs the CPU forward %.3g", dn, gs->dir, gs->model, ref_name, e,
               bar, ec);
        if (gs->activations) printf("; %d intermediates, worst %.3g (%s)", tp.compared, tp.worst, tp.worst_name);
        printf("\n");
        CHECK(e >= 0 && e <= bar, "%s %s/%s: rel L2 %.3g vs %s > %.3g", dn, gs->dir, gs->model, e, ref_name, bar);
        CHECK(ec >= 0 && ec <= cpu_tol, "%s %s/%s: rel L2 %.3g to the CPU forward > %.3g", dn, gs->dir, gs->model, ec,
              cpu_tol);
        CHECK(!gs->activations || tp.compared >= 20, "compared %d intermediates", tp.compared);
    }
    free(yc);
    if (out_keep) *out_keep = y;
    else free(y);
}

static void test_golden(fq_ctx *ctx, fq_device dev) {
    char dn[16];
    printf("golden models on %s:\n", fq_device_name(dev, dn, sizeof dn));
    golden_spec f32 = {"flux", "model_fp32", NULL, 0, "activations_f64_cpu.safetensors", 1e-4};
    golden_spec f32s = {"flux_schnell", "model_fp32", NULL, 0, "activations_fp32_cuda.safetensors", 1e-4};
    golden_spec bfl = {"flux", "model_bfl_fp32.safetensors", "model_fp32/config.json", 0, NULL, 0};
    golden_spec bf16 = {"flux", "model_bf16", NULL, 1, "activations_bf16_cuda.safetensors", 0.05};
    golden_spec nf4 = {"flux", "model_nf4", NULL, 1, NULL, 0};
    golden_spec nf4dq = {"flux", "model_nf4_dq", NULL, 1, NULL, 0};
    golden_spec fp4 = {"flux", "model_fp4", NULL, 1, NULL, 0};
    /* The golden bars (vs diffusers / float64) are the CPU test's and unchanged.
     * The distance to the CPU forward is a diagnostic with the same rounding
     * points and other summation orders: at f32 each forward is ~1.7e-5 from
     * float64 (as diffusers' own fp32 CUDA run), and the two errors are largely
     * independent (H100: 1.82e-5 apart), so 2e-5; at bf16 the measured distance
     * is <= 1.0e-2 (H100: bf16 5.0e-3 with GELU in the GEMM epilogue, 1.5e-3
     * without; the 4-bit models ~9e-3, since their one-row conditioning linears
     * run the GEMV, which sums in another order than the CPU, and a last-bit
     * change of the conditioning moves the whole output), and 2e-2 leaves room
     * for GEMM algorithm choices on other cards. */
    golden_case(ctx, dev, &f32, "out.f64_cpu", 0, 2e-5, NULL);
    golden_case(ctx, dev, &f32s, "out.f64_cpu", 0, 2e-5, NULL);
    golden_case(ctx, dev, &bfl, "out.f64_cpu", 0, 2e-5, NULL);
    golden_case(ctx, dev, &bf16, "out.bf16_cuda", 0.05, 2e-2, NULL);
    golden_case(ctx, dev, &nf4, "out.model_nf4", 0.05, 2e-2, NULL);
    golden_case(ctx, dev, &nf4dq, "out.model_nf4_dq", 0.05, 2e-2, NULL);
    golden_case(ctx, dev, &fp4, "out.model_fp4", 0.05, 2e-2, NULL);
    /* The plans above put GELU in the MLP linears' GEMM epilogue (bf16
     * models on the GPU: one rounding fewer than diffusers and the CPU); the
     * same bars with the exact two-op path, where bf16 gives diffusers' bits. */
    printf("golden models on %s, exact GELU path:\n", dn);
    g_exact_gelu = 1;
    golden_case(ctx, dev, &bf16, "out.bf16_cuda", 0.05, 2e-2, NULL);
    golden_case(ctx, dev, &nf4, "out.model_nf4", 0.05, 2e-2, NULL);
    g_exact_gelu = 0;
}

/* ---- 5. same results everywhere; no allocation inside a forward ---------------------------------- */

static int same(const float *a, const float *b, int64_t na, int64_t nb) {
    return a && b && na == nb && memcmp(a, b, sizeof(float) * (size_t)na) == 0;
}

static void test_devices(fq_ctx *ctx, int ndev) {
    printf("same outputs on every device and after moves:\n");
    const golden_spec specs[2] = {{"flux", "model_fp32", NULL, 0, NULL, 0}, {"flux", "model_nf4_dq", NULL, 1, NULL, 0}};
    for (int si = 0; si < 2; si++) {
        const golden_spec *gs = &specs[si];
        int64_t n0 = 0, n = 0;
        float *y0 = run_golden(ctx, gs, FQ_CUDA(0), NULL, &n0, NULL);
        float *again = run_golden(ctx, gs, FQ_CUDA(0), NULL, &n, NULL);
        CHECK(same(y0, again, n0, n), "%s: two runs on cuda:0 differ", gs->model);
        free(again);
        for (int d = 1; d < ndev; d++) {
            float *yd = run_golden(ctx, gs, FQ_CUDA(d), NULL, &n, NULL);
            CHECK(same(y0, yd, n0, n), "%s: cuda:%d differs from cuda:0 (rel L2 %.3g)", gs->model, d,
                  yd && n == n0 ? rel_l2_ff(yd, y0, n) : -1.0);
            printf("  %s: cuda:%d identical to cuda:0: %s\n", gs->model, d, same(y0, yd, n0, n) ? "yes" : "NO");
            free(yd);
        }
        /* a model loaded on the CPU and moved, then moved across GPUs and back */
        fq_flux_model *m = NULL;
        fq_flux_load_params lp = fq_flux_load_default_params();
        char path[512];
        snprintf(path, sizeof path, FIX "/%s/%s", gs->dir, gs->model);
        CHECK_OK(ctx, fq_flux_load(ctx, path, &lp, &m));
        int64_t nc = 0;
        float *yc = m ? run_golden(ctx, gs, FQ_CPU, NULL, &nc, &m) : NULL;
        for (int d = 0; m && d < ndev; d++) {
            CHECK_OK(ctx, fq_flux_move(ctx, m, FQ_CUDA(d)));
            float *ym = run_golden(ctx, gs, FQ_CUDA(d), NULL, &n, &m);
            CHECK(m->device.type == FQ_DEVICE_CUDA && m->device.index == d, "model on cuda:%d after the move", d);
            CHECK(same(y0, ym, n0, n), "%s: moved to cuda:%d, output differs from a direct load on cuda:0", gs->model, d);
            printf("  %s: moved to cuda:%d, identical to cuda:0: %s\n", gs->model, d, same(y0, ym, n0, n) ? "yes" : "NO");
            free(ym);
        }
        if (m) {
            CHECK_OK(ctx, fq_flux_move(ctx, m, FQ_CPU));
            float *yb = run_golden(ctx, gs, FQ_CPU, NULL, &n, &m);
            CHECK(same(yc, yb, nc, n), "%s: back on the CPU, output differs from before the moves", gs->model);
            free(yb);
        }
        fq_flux_free(m);
        free(yc);
        free(y0);
    }

    /* a forward allocates nothing: the allocator's counters do not move */
    printf("allocations during a forward:\n");
    for (int d = 0; d < ndev; d++) {
        fq_flux_model *m = NULL;
        fq_flux_load_params lp = fq_flux_load_default_params();
        lp.device = FQ_CUDA(d);
        CHECK_OK(ctx, fq_flux_load(ctx, FIX "/flux/model_nf4", &lp, &m));
        if (!m) continue;
        fq_flux_config c = m->cfg;
        rand_inputs in;
        make_inputs(ctx, &c, 1, 7, 5, &in, FQ_BF16);
        fq_tensor *dv[7] = {0};
        for (int i = 0; i < 7; i++) dv[i] = in.t[i] ? to_dev(ctx, in.t[i], m->device) : NULL;
        fq_flux_plan *p = NULL;
        fq_mem_stats a, b, c0, c1;
        fq_mem_get(m->device, &a);
        CHECK_OK(ctx, fq_flux_plan_create(ctx, m, 1, 7, 25, &p));
        fq_mem_get(m->device, &b);
        CHECK(p && b.current - a.current == (int64_t)fq_flux_plan_bytes(p) && b.count == a.count + 1,
              "the plan is one allocation of its size (%lld bytes, %lld buffers)", (long long)(b.current - a.current),
              (long long)(b.count - a.count));
        int64_t osh[3] = {1, 25, c.out_dim};
        fq_tensor *out = empty(ctx, m->device, 3, osh);
        if (p && out) {
            fq_flux_inputs fi = {dv[0], dv[1], dv[2], dv[3], dv[4], dv[5], dv[6]};
            size_t f0 = 0, f1 = 0, f2 = 0, tot = 0;
            fq_nn_device_memory(ctx, m->device, &f0, &tot);
            fq_mem_get(m->device, &c0);
            CHECK_OK(ctx, fq_flux_forward(ctx, m, p, &fi, out));
            CHECK_OK(ctx, fq_nn_sync(ctx, m->device));
            fq_nn_device_memory(ctx, m->device, &f1, &tot);
            CHECK_OK(ctx, fq_flux_forward(ctx, m, p, &fi, out));
            CHECK_OK(ctx, fq_nn_sync(ctx, m->device));
            fq_nn_device_memory(ctx, m->device, &f2, &tot);
            fq_mem_get(m->device, &c1);
            CHECK(c1.current == c0.current && c1.count == c0.count, "cuda:%d: the forward allocated %lld bytes", d,
                  (long long)(c1.current - c0.current));
            printf("  cuda:%d: plan %zu bytes; forward: allocator +%lld bytes; driver free memory %+lld (first), %+lld "
                   "(second) bytes\n",
                   d, fq_flux_plan_bytes(p), (long long)(c1.current - c0.current), (long long)f1 - (long long)f0,
                   (long long)f2 - (long long)f1);
        }
        /* inputs on another device are named */
        if (p && out) {
            fq_flux_inputs fi = {in.t[0], dv[1], dv[2], dv[3], dv[4], dv[5], dv[6]};
            fq_status s = fq_flux_forward(ctx, m, p, &fi, out);
            CHECK(s == FQ_ERR_DEVICE_MISMATCH && strstr(fq_ctx_error(ctx), "cpu"), "CPU input to a CUDA model: %s",
                  fq_ctx_error(ctx));
        }
        fq_tensor_free(out);
        fq_flux_plan_free(p);
        for (int i = 0; i < 7; i++) fq_tensor_free(dv[i]);
        free_inputs(&in);
        fq_flux_free(m);
    }
}

/* ---- 6. a random model with FLUX.1's head shape ------------------------------------------------- */

static void test_random_devices(fq_ctx *ctx, fq_device dev) {
    char dn[16];
    printf("random head-dim-128 models, %s vs the CPU:\n", fq_device_name(dev, dn, sizeof dn));
    fq_flux_config c = tiny_config(1);
    struct { fq_dtype wt; int quant, dq; double tol; const char *what; } kinds[] = {
        /* f32: two forwards each ~1.5e-5 from the exact result (H100: 1.66e-5
         * apart); bf16: H100 3.3e-3 and 2.9e-3 */
        {FQ_F32, 0, 0, 2e-5, "f32"}, {FQ_BF16, 0, 0, 2e-2, "bf16"}, {FQ_BF16, 1, 1, 2e-2, "nf4+dq"}};
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        fq_flux_model *mc = random_model(ctx, &c, FQ_CPU, kinds[k].wt, kinds[k].quant, kinds[k].dq, 42);
        fq_flux_model *mg = random_model(ctx, &c, dev, kinds[k].wt, kinds[k].quant, kinds[k].dq, 42);
        if (mc && mg) {
            /* same weights on both: one dense tensor and one 4-bit weight compared */
            if (kinds[k].quant) {
                size_t nb = fq_qtensor_member_bytes(mc->single[1].proj_out.qw, FQ_QMEMBER_PACKED);
                unsigned char *a = malloc(nb), *b = malloc(nb);
                CHECK_OK(ctx, fq_qtensor_member_to_host(ctx, mg->single[1].proj_out.qw, FQ_QMEMBER_PACKED, b));
                CHECK_OK(ctx, fq_qtensor_member_to_host(ctx, mc->single[1].proj_out.qw, FQ_QMEMBER_PACKED, a));
                CHECK(!memcmp(a, b, nb), "%s: quantized on the GPU, the packed weight differs from the CPU's", kinds[k].what);
                free(a);
                free(b);
            } else {
                float *g = NULL;
                fq_tensor *t = mg->blocks[0].ff1.w;
                size_t nb = fq_tensor_nbytes(t);
                g = malloc(nb);
                CHECK_OK(ctx, fq_tensor_to_host(ctx, t, g));
                CHECK(!memcmp(g, fq_tensor_host_data(mc->blocks[0].ff1.w), nb), "%s: random weights differ", kinds[k].what);
                free(g);
            }
            rand_inputs in;
            make_inputs(ctx, &c, 2, 12, 6, &in, mc->compute_dtype);
            int64_t nc = 0, ng = 0;
            float *yc = forward_on(ctx, mc, &in, &nc), *yg = forward_on(ctx, mg, &in, &ng);
            if (yc && yg && nc == ng) {
                double e = rel_l2_ff(yg, yc, nc);
                printf("  %-6s: rel L2 to the CPU %.3g (tol %.3g)\n", kinds[k].what, e, kinds[k].tol);
                CHECK(e <= kinds[k].tol && all_finite(yg, ng), "%s random model: rel L2 %.3g", kinds[k].what, e);
            }
            free(yc);
            free(yg);
            free_inputs(&in);
        }
        fq_flux_free(mc);
        fq_flux_free(mg);
    }
}

/* ---- bf16 activation storage: the same bits as f32 storage ------------------------------- */

/* A device tensor of dtype dt with random values rounded to bf16. */
static fq_tensor *dev_rand16(fq_ctx *ctx, fq_device d, fq_dtype dt, int nd, const int64_t *sh, uint64_t seed,
                             float scale) {
    fq_tensor *t = NULL, *f = NULL;
    CHECK_OK(ctx, fq_tensor_create(ctx, d, FQ_F32, nd, sh, &f));
    if (!f) return NULL;
    CHECK_OK(ctx, fq_nn_random(ctx, f, seed, scale, 0.0f));
    if (dt == FQ_F32) {
        CHECK_OK(ctx, fq_nn_cast(ctx, f, f, FQ_BF16));
        return f;
    }
    CHECK_OK(ctx, fq_tensor_create(ctx, d, dt, nd, sh, &t));
    if (t) CHECK_OK(ctx, fq_nn_cast(ctx, f, t, FQ_BF16));
    fq_tensor_free(f);
    return t;
}

static fq_tensor *dev_to(fq_ctx *ctx, const fq_tensor *x, fq_dtype dt) {
    fq_tensor *t = NULL;
    if (!x) return NULL;
    CHECK_OK(ctx, fq_tensor_create(ctx, x->buf.dev, dt, x->ndim, x->shape, &t));
    if (t) CHECK_OK(ctx, fq_nn_cast(ctx, x, t, FQ_BF16));
    return t;
}

/* The f32-stored result and the bf16-stored one hold the same values. */
static void same16(fq_ctx *ctx, const char *what, const fq_tensor *f, const fq_tensor *b) {
    if (!f || !b) return;
    float *x = host_f32(ctx, f), *y = host_f32(ctx, b);
    if (x && y) {
        int64_t nd = ndiff(x, y, fq_tensor_numel(f));
        printf("  bf16 storage, %-28s %lld of %lld elements differ from f32 storage\n", what, (long long)nd,
               (long long)fq_tensor_numel(f));
        CHECK(nd == 0, "bf16 storage changes %s in %lld elements", what, (long long)nd);
    }
    free(x);
    free(y);
}

/* A GPU result against the CPU's, element by element: the same bits (NaN with
 * NaN, whatever the payload), at most max_nd elements apart (AdaLN: its f64
 * statistics are summed in another order). Also counts the non-finite ones. */
static void same_bits(fq_ctx *ctx, const char *what, const fq_tensor *gpu, const fq_tensor *cpu, int64_t max_nd) {
    float *g = host_f32(ctx, gpu);
    const float *c = fq_tensor_host_data((fq_tensor *)cpu);
    if (!g || !c) {
        free(g);
        return;
    }
    const int64_t n = fq_tensor_numel(cpu), nd = ndiff(g, c, n);
    int64_t nonfinite = 0;
    for (int64_t i = 0; i < n; i++) nonfinite += !isfinite(c[i]);
    printf("  %-44s %lld of %lld elements differ from the CPU (%lld non-finite there)\n", what, (long long)nd,
           (long long)n, (long long)nonfinite);
    CHECK(nd <= max_nd && nonfinite > 0, "%s: %lld elements differ (at most %lld), %lld non-finite", what,
          (long long)nd, (long long)max_nd, (long long)nonfinite);
    free(g);
}

/* fq_nn_rmsnorm_rope_n (one launch for q and k of both streams) against the
 * kernels before it (FQ_NN_ROPE_PREV, a launch per tensor), bit for bit, at
 * FLUX.1's sizes (4096 image + 512 text tokens, 24 heads of 128) and at odd
 * ones, with NaN, infinities, zeros, a zero head, huge and tiny values and
 * weights that overflow mixed in; and a one-tensor fq_nn_rmsnorm_rope
 * against the same. */
static float rope_val(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((int32_t)(*s >> 33) - (1 << 30)) / (float)(1 << 30);
}

static void rope_case(fq_ctx *ctx, fq_device d, const char *name, int np, const int64_t *ntok, const int64_t *t0,
                      int64_t batch, int64_t heads, int64_t rows, fq_dtype xt, fq_dtype rnd, int special) {
    const int64_t D = heads * 128, tsh[2] = {rows, 128}, wsh[1] = {128};
    uint64_t seed = 12345u + (uint64_t)np * 7u + (uint64_t)heads + (uint64_t)xt * 131u + (uint64_t)rnd * 17u;
    fq_tensor *xa[4] = {NULL}, *xb[4] = {NULL}, *w[4] = {NULL}, *cs = NULL, *sn = NULL;
    float *tc = malloc((size_t)rows * 128 * 4), *tsn = malloc((size_t)rows * 128 * 4), wv[128];
    int ok = tc && tsn;
    for (int64_t i = 0; ok && i < rows * 128; i++) {
        const double a = 3.0 * rope_val(&seed);
        tc[i] = (float)cos(a), tsn[i] = (float)sin(a);
    }
    if (ok) {
        CHECK_OK(ctx, fq_tensor_from_host(ctx, d, FQ_F32, 2, tsh, tc, &cs));
        CHECK_OK(ctx, fq_tensor_from_host(ctx, d, FQ_F32, 2, tsh, tsn, &sn));
    }
    for (int p = 0; ok && p < np; p++) {
        const int64_t sh[3] = {batch, ntok[p], D}, n = batch * ntok[p] * D;
        float *h = malloc((size_t)n * 4 + 4);
        if (!h) {
            ok = 0;
            break;
        }
        for (int64_t i = 0; i < n; i++) h[i] = 2.0f * rope_val(&seed);
        if (special && n >= 4 * D) {
            h[3] = NAN, h[D + 130] = INFINITY, h[D + 260] = -INFINITY, h[2 * D + 5] = 0.0f;
            for (int64_t i = 0; i < 128; i++) h[2 * D + 256 + i] = 0.0f;             /* a zero head */
            for (int64_t i = 0; i < 16; i++) h[3 * D + 8 * i] = 1e30f, h[3 * D + 300 + i] = 1e-30f;
            for (int64_t i = 0; i < 128; i++) h[3 * D + 512 + i] = 3e-39f * (float)(i + 1); /* subnormal head */
        }
        fq_tensor *f = NULL;
        CHECK_OK(ctx, fq_tensor_from_host(ctx, d, FQ_F32, 3, sh, h, &f));
        free(h);
        if (!f) {
            ok = 0;
            break;
        }
        if (xt == FQ_F32 && rnd == FQ_F32) {
            xa[p] = f;
            CHECK_OK(ctx, fq_tensor_copy_to(ctx, f, d, &xb[p]));
        } else {
            xa[p] = dev_to(ctx, f, xt), xb[p] = dev_to(ctx, f, xt);
            fq_tensor_free(f);
        }
        for (int i = 0; i < 128; i++) wv[i] = 1.0f + 0.5f * rope_val(&seed);
        if (special && p == 1) wv[5] = 3e38f, wv[6] = -2e38f, wv[9] = 1e-38f; /* overflows, underflows */
        fq_tensor *wf = NULL;
        CHECK_OK(ctx, fq_tensor_from_host(ctx, d, FQ_F32, 1, wsh, wv, &wf));
        w[p] = p & 1 ? wf : dev_to(ctx, wf, FQ_BF16); /* (bf16 and f32 weights) */
        if (!(p & 1)) fq_tensor_free(wf);
        ok = xa[p] && xb[p] && w[p];
    }
    if (ok && cs && sn) {
        fq_nn_rope_part pa[4], pb[4];
        for (int p = 0; p < np; p++) {
            pa[p].x = xa[p], pa[p].weight = w[p], pa[p].t0 = t0[p];
            pb[p] = pa[p], pb[p].x = xb[p];
        }
        CHECK_OK(ctx, fq_nn_rmsnorm_rope_n_impl(ctx, pa, np, 1e-6f, cs, sn, heads, rnd, FQ_NN_ROPE_AUTO));
        CHECK_OK(ctx, fq_nn_rmsnorm_rope_n_impl(ctx, pb, np, 1e-6f, cs, sn, heads, rnd, FQ_NN_ROPE_PREV));
        int64_t nd = 0, nt = 0;
        for (int p = 0; p < np; p++) {
            float *a = host_f32(ctx, xa[p]), *b = host_f32(ctx, xb[p]);
            if (a && b) nd += ndiff(a, b, fq_tensor_numel(xa[p])), nt += fq_tensor_numel(xa[p]);
            free(a), free(b);
        }
        printf("  rmsnorm_rope_n %-34s %lld of %lld elements differ from the previous kernels\n", name,
               (long long)nd, (long long)nt);
        CHECK(nd == 0 && nt > 0, "rmsnorm_rope_n %s: %lld of %lld elements differ", name, (long long)nd,
              (long long)nt);
        /* the one-tensor op on part 0 again (both now normed once: a second pass) */
        CHECK_OK(ctx, fq_nn_rmsnorm_rope(ctx, xa[0], w[0], 1e-6f, cs, sn, t0[0], heads, rnd));
        CHECK_OK(ctx, fq_nn_rmsnorm_rope_n_impl(ctx, pb, 1, 1e-6f, cs, sn, heads, rnd, FQ_NN_ROPE_PREV));
        float *a = host_f32(ctx, xa[0]), *b = host_f32(ctx, xb[0]);
        if (a && b) {
            nd = ndiff(a, b, fq_tensor_numel(xa[0]));
            CHECK(nd == 0, "rmsnorm_rope %s, one tensor: %lld elements differ", name, (long long)nd);
        }
        free(a), free(b);
    }
    for (int p = 0; p < 4; p++) fq_tensor_free(xa[p]), fq_tensor_free(xb[p]), fq_tensor_free(w[p]);
    fq_tensor_free(cs), fq_tensor_free(sn);
    free(tc), free(tsn);
}

static void test_rmsnorm_rope_n(fq_ctx *ctx, fq_device d) {
    printf("rmsnorm_rope_n on cuda:%d\n", d.index);
    const int64_t dbl_n[4] = {4096, 512, 4096, 512}, dbl_t0[4] = {512, 0, 512, 0};
    const int64_t sgl_n[2] = {4608, 4608}, sgl_t0[2] = {0, 0};
    rope_case(ctx, d, "(double block, bf16)", 4, dbl_n, dbl_t0, 1, 24, 4608, FQ_BF16, FQ_BF16, 1);
    rope_case(ctx, d, "(single block, bf16)", 2, sgl_n, sgl_t0, 1, 24, 4608, FQ_BF16, FQ_BF16, 0);
    rope_case(ctx, d, "(double block, f32 storage)", 4, dbl_n, dbl_t0, 1, 24, 4608, FQ_F32, FQ_BF16, 1);
    rope_case(ctx, d, "(double block, f32 rounding)", 4, dbl_n, dbl_t0, 1, 24, 4608, FQ_F32, FQ_F32, 1);
    rope_case(ctx, d, "(double block, f16 rounding)", 4, dbl_n, dbl_t0, 1, 24, 4608, FQ_F32, FQ_F16, 1);
    const int64_t odd_n[3] = {37, 300, 5}, odd_t0[3] = {3, 40, 0};
    rope_case(ctx, d, "(batch 2, 5 heads)", 3, odd_n, odd_t0, 2, 5, 350, FQ_BF16, FQ_BF16, 1);
    rope_case(ctx, d, "(batch 2, 1 head, f32)", 3, odd_n, odd_t0, 2, 1, 350, FQ_F32, FQ_BF16, 0);
    rope_case(ctx, d, "(batch 3, 23 heads)", 2, odd_n + 1, odd_t0 + 1, 3, 23, 350, FQ_BF16, FQ_BF16, 1);
    rope_case(ctx, d, "(30 heads: previous kernels)", 2, odd_n, odd_t0, 1, 30, 350, FQ_BF16, FQ_BF16, 1);
}

static void test_bf16_storage(fq_ctx *ctx, fq_device d) {
    char dn[16];
    printf("bf16 activation storage on %s:\n", fq_device_name(d, dn, sizeof dn));
    CHECK(fq_nn_act_dtype(d, FQ_BF16) == FQ_BF16 && fq_nn_act_dtype(d, FQ_F32) == FQ_F32 &&
              fq_nn_act_dtype(FQ_CPU, FQ_BF16) == FQ_F32,
          "fq_nn_act_dtype");
    const fq_dtype R = FQ_BF16;
    const int64_t B = 2, S = 70, H = 2, dh = 128, D = H * dh, N = 96;
    int64_t xs[3] = {B, S, D}, ms[2] = {B, 6 * D}, ts[2] = {S, dh}, ws[2] = {N, D}, bs[1] = {N}, ys[3] = {B, S, N},
            hs[1] = {dh};
    fq_tensor *xf = dev_rand16(ctx, d, FQ_F32, 3, xs, 11, 3.0f), *xb = dev_to(ctx, xf, FQ_BF16);
    fq_tensor *yf = dev_rand16(ctx, d, FQ_F32, 3, xs, 12, 1.0f), *yb = dev_to(ctx, yf, FQ_BF16);
    fq_tensor *mod = dev_rand16(ctx, d, FQ_F32, 2, ms, 13, 1.0f);
    fq_tensor *cs = dev_rand16(ctx, d, FQ_F32, 2, ts, 14, 1.0f), *sn = dev_rand16(ctx, d, FQ_F32, 2, ts, 15, 1.0f);
    fq_tensor *w = dev_rand16(ctx, d, FQ_BF16, 2, ws, 16, 0.1f), *bias = dev_rand16(ctx, d, FQ_BF16, 1, bs, 17, 1.0f);
    fq_tensor *nw = dev_rand16(ctx, d, FQ_BF16, 1, hs, 18, 1.0f);
    fq_tensor *of = dev_rand16(ctx, d, FQ_F32, 3, ys, 19, 1.0f), *ob = dev_to(ctx, of, FQ_BF16), *o32 = NULL;
    fq_tensor *af = dev_rand16(ctx, d, FQ_F32, 3, xs, 20, 1.0f), *ab = dev_to(ctx, af, FQ_BF16);
    fq_tensor *sf = NULL, *sb = NULL;
    if (!xb || !yb || !mod || !cs || !sn || !w || !bias || !nw || !ob || !ab) goto done;
    CHECK_OK(ctx, fq_tensor_create(ctx, d, FQ_F32, 3, ys, &o32));
    int64_t lsz = fq_nn_linear_scratch(ctx, w, bias, B * S, R), asz = fq_nn_attention_scratch(d, B, S, H, dh, R);
    int64_t l1[1] = {(lsz > asz ? lsz : asz) + 2 * B * S * D}; /* room for an f32 weight's widened x too */
    CHECK_OK(ctx, fq_tensor_create(ctx, d, FQ_F32, 1, l1, &sf));
    CHECK_OK(ctx, fq_tensor_create(ctx, d, FQ_F32, 1, l1, &sb));
    if (!sf || !sb || !o32) goto done;

    CHECK_OK(ctx, fq_nn_adaln(ctx, xf, mod, 3, 4, 1e-6f, yf, R));
    CHECK_OK(ctx, fq_nn_adaln(ctx, xb, mod, 3, 4, 1e-6f, yb, R));
    same16(ctx, "adaln", yf, yb);
    CHECK_OK(ctx, fq_nn_gated_add(ctx, xf, mod, 2, yf, R));
    CHECK_OK(ctx, fq_nn_gated_add(ctx, xb, mod, 2, yb, R));
    same16(ctx, "gated_add", xf, xb);
    CHECK_OK(ctx, fq_nn_gelu_tanh(ctx, yf, yf, R));
    CHECK_OK(ctx, fq_nn_gelu_tanh(ctx, yb, yb, R));
    same16(ctx, "gelu_tanh", yf, yb);
    CHECK_OK(ctx, fq_nn_rmsnorm_heads(ctx, xf, nw, 1e-6f, xf, R));
    CHECK_OK(ctx, fq_nn_rmsnorm_heads(ctx, xb, nw, 1e-6f, xb, R));
    same16(ctx, "rmsnorm_heads", xf, xb);
    CHECK_OK(ctx, fq_nn_rope(ctx, xf, cs, sn, H, R));
    CHECK_OK(ctx, fq_nn_rope(ctx, xb, cs, sn, H, R));
    same16(ctx, "rope", xf, xb);
    CHECK_OK(ctx, fq_nn_attention(ctx, xf, yf, af, H, af, sf, R));
    /* our kernel both times: AUTO takes cuDNN for bf16 storage (tests/test_cuda_attention.c) */
    CHECK_OK(ctx, fq_nn_attention_impl(ctx, xb, yb, ab, H, ab, sb, R, FQ_NN_ATTN_MMA));
    same16(ctx, "attention", af, ab);
    /* a linear: f32 in/out, bf16 in/out, bf16 in and f32 out */
    CHECK_OK(ctx, fq_nn_linear(ctx, af, w, bias, of, sf, R));
    CHECK_OK(ctx, fq_nn_linear(ctx, ab, w, bias, ob, sb, R));
    same16(ctx, "linear (bf16 x, bf16 y)", of, ob);
    CHECK_OK(ctx, fq_nn_linear(ctx, ab, w, bias, o32, sb, R));
    same16(ctx, "linear (bf16 x, f32 y)", of, o32);
    /* f32 weight at bf16 compute: the f32 GEMM, its result narrowed row chunk by row chunk */
    fq_tensor *w32 = NULL;
    CHECK_OK(ctx, fq_tensor_create(ctx, d, FQ_F32, 2, ws, &w32));
    if (w32) {
        CHECK_OK(ctx, fq_nn_cast(ctx, w, w32, FQ_F32));
        int64_t need = fq_nn_linear_scratch_io(ctx, w32, bias, B * S, R, FQ_BF16, FQ_BF16);
        CHECK(need <= l1[0], "scratch for an f32 weight (%lld floats)", (long long)need);
        if (need <= l1[0]) {
            CHECK_OK(ctx, fq_nn_linear(ctx, af, w32, bias, of, sf, R));
            CHECK_OK(ctx, fq_nn_linear(ctx, ab, w32, bias, ob, sb, R));
            same16(ctx, "linear, f32 weight", of, ob);
        }
        fq_tensor_free(w32);
    }
    /* rmsnorm + RoPE in one pass = the two ops, on tokens 30.. of 100-row tables */
    {
        int64_t t2[2] = {100, dh};
        fq_tensor *c2 = dev_rand16(ctx, d, FQ_F32, 2, t2, 24, 1.0f), *s2 = dev_rand16(ctx, d, FQ_F32, 2, t2, 25, 1.0f);
        fq_tensor cv = c2 ? fq_nn_view_rows(c2, 30, S) : *xf, sv = s2 ? fq_nn_view_rows(s2, 30, S) : *xf;
        for (int sb16 = 0; c2 && s2 && sb16 < 2; sb16++) {
            fq_tensor *a1 = sb16 ? ab : af, *a2 = dev_to(ctx, a1, a1->dtype); /* a copy (bf16-valued) */
            if (!a2) continue;
            CHECK_OK(ctx, fq_nn_rmsnorm_heads(ctx, a1, nw, 1e-6f, a1, R));
            CHECK_OK(ctx, fq_nn_rope(ctx, a1, &cv, &sv, H, R));
            CHECK_OK(ctx, fq_nn_rmsnorm_rope(ctx, a2, nw, 1e-6f, c2, s2, 30, H, R));
            same16(ctx, sb16 ? "rmsnorm_rope (bf16)" : "rmsnorm_rope (f32)", a1, a2);
            fq_tensor_free(a2);
        }
        fq_tensor_free(c2), fq_tensor_free(s2);
    }
    /* 256 tokens: bf16 q, k, v read in place (no packing, no scratch) */
    {
        int64_t s2[3] = {1, 256, D};
        fq_tensor *q2 = dev_rand16(ctx, d, FQ_F32, 3, s2, 21, 3.0f), *k2 = dev_rand16(ctx, d, FQ_F32, 3, s2, 22, 3.0f);
        fq_tensor *v2 = dev_rand16(ctx, d, FQ_F32, 3, s2, 23, 1.0f), *o2 = NULL, *o2b = NULL;
        fq_tensor *q2b = dev_to(ctx, q2, FQ_BF16), *k2b = dev_to(ctx, k2, FQ_BF16), *v2b = dev_to(ctx, v2, FQ_BF16);
        CHECK(fq_nn_attention_scratch_io(d, 1, 256, H, dh, R, FQ_BF16) == 0, "bf16 attention at 256 tokens needs no scratch");
        CHECK_OK(ctx, fq_tensor_create(ctx, d, FQ_F32, 3, s2, &o2));
        CHECK_OK(ctx, fq_tensor_create(ctx, d, FQ_BF16, 3, s2, &o2b));
        if (q2b && k2b && v2b && o2 && o2b) {
            CHECK_OK(ctx, fq_nn_attention(ctx, q2, k2, v2, H, o2, sf, R));
            CHECK_OK(ctx, fq_nn_attention_impl(ctx, q2b, k2b, v2b, H, o2b, NULL, R, FQ_NN_ATTN_MMA));
            same16(ctx, "attention, read in place", o2, o2b);
            /* the one-m-tile kernel gives the same bits as the two-m-tile one */
            CHECK_OK(ctx, fq_nn_attention_impl(ctx, q2b, k2b, v2b, H, o2b, NULL, R, FQ_NN_ATTN_MMA1));
            same16(ctx, "attention, one m-tile per warp", o2, o2b);
        }
        fq_tensor_free(q2), fq_tensor_free(k2), fq_tensor_free(v2), fq_tensor_free(o2), fq_tensor_free(o2b);
        fq_tensor_free(q2b), fq_tensor_free(k2b), fq_tensor_free(v2b);
    }
    /* GELU in the GEMM epilogue (bf16 x, weight, bias, out): against the CPU
     * computing gelu of the unrounded f32 linear result, rounded once. The
     * GEMMs sum in other orders (f32), and cuBLASLt does not document how its
     * GELU evaluates tanh: with a hardware approximation (relative error up to
     * 2^-11) the f32 value before the rounding may move by ~2^-11 of its size,
     * and far more in the negative tail where 1 + tanh cancels (values of a
     * few 1e-3 there), so any element may be off by an ulp or more and only
     * the norm is bounded: rel L2 <= 4e-3, one bf16 ulp (2^-8) of every
     * element. A missing GELU, bias or column offset is off by O(1). The
     * distance to the two-op rounding is printed. Columns 32.. of a 128-column
     * output; 0..31 must stay untouched. */
    {
        int64_t osh[3] = {B, S, 32 + N};
        fq_tensor *go = NULL;
        CHECK_OK(ctx, fq_tensor_create(ctx, d, FQ_BF16, 3, osh, &go));
        CHECK(fq_nn_linear_gelu_fused(d, R) && !fq_nn_linear_gelu_fused(FQ_CPU, R) && !fq_nn_linear_gelu_fused(d, FQ_F32),
              "fq_nn_linear_gelu_fused");
        float *xh = host_f32(ctx, ab), *wh = host_f32(ctx, w), *bh = host_f32(ctx, bias);
        float *ref = malloc((size_t)(B * S * N) * 4), *ex = malloc((size_t)(B * S * N) * 4);
        if (go && xh && wh && bh && ref && ex) {
            CHECK_OK(ctx, fq_nn_random(ctx, go, 77, 1.0f, 0.0f)); /* a known fill */
            float *before = host_f32(ctx, go);
            CHECK_OK(ctx, fq_nn_linear_gelu_cols(ctx, ab, w, NULL, bias, go, 32, sb, R));
            float *got = host_f32(ctx, go);
            fq_cpu_linear(B * S, N, D, xh, wh, bh, ref, FQ_F32);
            memcpy(ex, ref, (size_t)(B * S * N) * 4);
            fq_cpu_round(ex, B * S * N, R);
            fq_cpu_gelu_tanh(ex, ex, B * S * N, R); /* the two-op rounding points */
            fq_cpu_gelu_tanh(ref, ref, B * S * N, R);
            if (got && before) {
                double num = 0, den = 0, n2 = 0;
                int64_t nd = 0, kept = 0;
                for (int64_t r = 0; r < B * S; r++) {
                    for (int64_t c = 0; c < 32; c++) kept += memcmp(&got[r * (32 + N) + c], &before[r * (32 + N) + c], 4) == 0;
                    for (int64_t c = 0; c < N; c++) {
                        const double g = got[r * (32 + N) + 32 + c], e = ref[r * N + c];
                        nd += g != e;
                        num += (g - e) * (g - e), den += e * e;
                        n2 += (g - ex[r * N + c]) * (g - ex[r * N + c]);
                    }
                }
                printf("  linear + GELU epilogue vs the CPU (gelu of the f32 result): rel L2 %.3g, %lld of %lld differ;"
                       " vs the two-op rounding: rel L2 %.3g\n",
                       sqrt(num / den), (long long)nd, (long long)(B * S * N), sqrt(n2 / den));
                CHECK(sqrt(num / den) <= 4e-3, "linear+gelu epilogue: rel L2 %.3g (%lld elements differ)",
                      sqrt(num / den), (long long)nd);
                CHECK(kept == B * S * 32, "linear+gelu wrote outside its columns");
            }
            free(before), free(got);
            /* elsewhere it is refused */
            CHECK(fq_nn_linear_gelu_cols(ctx, af, w, NULL, bias, of, 0, sf, R) != FQ_OK, "f32 activations refused");
        }
        free(xh), free(wh), free(bh), free(ref), free(ex);
        fq_tensor_free(go);
    }
    /* FLUX's width (d 3072: 12 chunks of 8 per lane in the AdaLN kernels):
     * fused gated add + AdaLN = the two ops, bf16 storage = f32 storage, and
     * AdaLN against the CPU kernel */
    {
        const int64_t DW = 3072, T = 40;
        int64_t s3[3] = {1, T, DW}, m3[2] = {1, 6 * DW};
        fq_tensor *hf = dev_rand16(ctx, d, FQ_F32, 3, s3, 31, 3.0f), *hb = dev_to(ctx, hf, FQ_BF16);
        fq_tensor *h2 = dev_to(ctx, hf, FQ_BF16), *gf = dev_rand16(ctx, d, FQ_F32, 3, s3, 32, 1.0f);
        fq_tensor *gb = dev_to(ctx, gf, FQ_BF16), *g2 = dev_to(ctx, gf, FQ_BF16), *y2 = dev_to(ctx, gf, FQ_BF16);
        fq_tensor *m = dev_rand16(ctx, d, FQ_F32, 2, m3, 33, 1.0f);
        if (hf && hb && h2 && gf && gb && g2 && y2 && m) {
            CHECK_OK(ctx, fq_nn_gated_add(ctx, h2, m, 2, g2, R)); /* separate, bf16 */
            CHECK_OK(ctx, fq_nn_adaln(ctx, h2, m, 3, 4, 1e-6f, y2, R));
            CHECK_OK(ctx, fq_nn_gated_add_adaln(ctx, hf, m, 2, gf, 3, 4, 1e-6f, gf, R)); /* fused, f32 */
            CHECK_OK(ctx, fq_nn_gated_add_adaln(ctx, hb, m, 2, gb, 3, 4, 1e-6f, gb, R)); /* fused, bf16 */
            same16(ctx, "gated_add_adaln h, d 3072", hf, hb);
            same16(ctx, "gated_add_adaln y, d 3072", gf, gb);
            same16(ctx, "fused h = separate h, d 3072", hf, h2);
            same16(ctx, "fused y = separate y, d 3072", gf, y2);
            /* AdaLN of the new h against the CPU kernel (the ops test's bounds) */
            float *hh = host_f32(ctx, hb), *mh = host_f32(ctx, m), *yh = host_f32(ctx, y2);
            float *yc = malloc((size_t)(T * DW) * 4);
            if (hh && mh && yh && yc) {
                fq_cpu_adaln(hh, yc, 1, T, DW, mh + 3 * DW, mh + 4 * DW, 6 * DW, 1e-6f, R);
                const int64_t nd = ndiff(yh, yc, T * DW);
                printf("  adaln d 3072 vs the CPU kernel: %lld of %lld elements differ\n", (long long)nd,
                       (long long)(T * DW));
                CHECK(nd <= T * DW / 1000 + 2, "adaln at d 3072: %lld elements differ from the CPU", (long long)nd);
            }
            free(hh), free(mh), free(yh), free(yc);
        }
        fq_tensor_free(hf), fq_tensor_free(hb), fq_tensor_free(h2), fq_tensor_free(gf), fq_tensor_free(gb);
        fq_tensor_free(g2), fq_tensor_free(y2), fq_tensor_free(m);
    }
    /* Non-finite inputs: the bf16-storage kernels round with cvt.rn.bf16x2 and send
     * a chunk holding a NaN or an infinity back to the software rounding; every
     * finite neighbour in such a chunk, each infinity and each NaN position must
     * still match the CPU ops (NaN payloads aside). gated_add spreads NaN/inf to
     * single elements, AdaLN to whole rows. */
    {
        const int64_t DW = 3072, T = 6;
        int64_t s3[3] = {1, T, DW}, m3[2] = {1, 6 * DW};
        float *hh = malloc(sizeof(float) * (size_t)(T * DW)), *gh = malloc(sizeof(float) * (size_t)(T * DW));
        float *mh = malloc(sizeof(float) * (size_t)(6 * DW));
        fq_tensor *hc = NULL, *gc = NULL, *mc = NULL, *yc = NULL, *hd = NULL, *gd = NULL, *md = NULL;
        if (hh && gh && mh) {
            for (int64_t i = 0; i < T * DW; i++) {
                hh[i] = (float)((i * 37) % 201 - 100) * 0.03125f;
                gh[i] = (float)((i * 53) % 97 - 48) * 0.0625f;
            }
            for (int64_t i = 0; i < 6 * DW; i++) mh[i] = (float)((i * 29) % 61 - 30) * 0.015625f + 0.0078125f;
            gh[5] = NAN, gh[100] = INFINITY, gh[2 * DW + 17] = -INFINITY, gh[2 * DW + 18] = ldexpf(1.0f, 126); /* inputs exact in bf16 */
            hh[4 * DW + 9] = NAN;
            CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CPU, FQ_F32, 3, s3, hh, &hc));
            CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CPU, FQ_F32, 3, s3, gh, &gc));
            CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CPU, FQ_F32, 2, m3, mh, &mc));
            CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CPU, FQ_F32, 3, s3, gh, &yc));
            fq_tensor *h32 = NULL, *g32 = NULL;
            CHECK_OK(ctx, fq_tensor_from_host(ctx, d, FQ_F32, 3, s3, hh, &h32));
            CHECK_OK(ctx, fq_tensor_from_host(ctx, d, FQ_F32, 3, s3, gh, &g32));
            CHECK_OK(ctx, fq_tensor_from_host(ctx, d, FQ_F32, 2, m3, mh, &md));
            hd = dev_to(ctx, h32, FQ_BF16);
            gd = dev_to(ctx, g32, FQ_BF16);
            fq_tensor_free(h32), fq_tensor_free(g32);
        }
        fq_tensor *yd = gd ? dev_to(ctx, gd, FQ_BF16) : NULL;
        if (hc && gc && mc && yc && hd && gd && md && yd) {
            /* gated add: h += gate * g */
            CHECK_OK(ctx, fq_nn_gated_add(ctx, hc, mc, 2, gc, R));
            CHECK_OK(ctx, fq_nn_gated_add(ctx, hd, md, 2, gd, R));
            same_bits(ctx, "gated_add with NaN/inf (bf16 storage)", hd, hc, 0);
            /* AdaLN of that h: the rows holding NaN/inf become NaN */
            CHECK_OK(ctx, fq_nn_adaln(ctx, hc, mc, 3, 4, 1e-6f, yc, R));
            CHECK_OK(ctx, fq_nn_adaln(ctx, hd, md, 3, 4, 1e-6f, yd, R));
            same_bits(ctx, "adaln with NaN/inf rows (bf16 storage)", yd, yc, T * DW / 1000 + 2);
            /* fused: h += gate * g once more, then AdaLN into g */
            CHECK_OK(ctx, fq_nn_gated_add(ctx, hc, mc, 2, gc, R));
            CHECK_OK(ctx, fq_nn_adaln(ctx, hc, mc, 3, 4, 1e-6f, gc, R));
            CHECK_OK(ctx, fq_nn_gated_add_adaln(ctx, hd, md, 2, gd, 3, 4, 1e-6f, gd, R));
            same_bits(ctx, "gated_add_adaln h with NaN/inf", hd, hc, 0);
            same_bits(ctx, "gated_add_adaln y with NaN/inf", gd, gc, T * DW / 1000 + 2);
        }
        free(hh), free(gh), free(mh);
        fq_tensor_free(hc), fq_tensor_free(gc), fq_tensor_free(mc), fq_tensor_free(yc);
        fq_tensor_free(hd), fq_tensor_free(gd), fq_tensor_free(md), fq_tensor_free(yd);
    }
    /* bf16 tensors are refused on the CPU and at f32 compute */
    CHECK(fq_nn_gelu_tanh(ctx, yb, yb, FQ_F32) != FQ_OK, "bf16 activations at f32 compute are refused");
done:
    fq_tensor_free(xf), fq_tensor_free(xb), fq_tensor_free(yf), fq_tensor_free(yb), fq_tensor_free(mod);
    fq_tensor_free(cs), fq_tensor_free(sn), fq_tensor_free(w), fq_tensor_free(bias), fq_tensor_free(nw);
    fq_tensor_free(of), fq_tensor_free(ob), fq_tensor_free(o32), fq_tensor_free(af), fq_tensor_free(ab);
    fq_tensor_free(sf), fq_tensor_free(sb);
}

/* ---- attention written into a wider tensor's columns (a single block's cat) ----------------------- */

static void test_attention_cols(fq_ctx *ctx, fq_device dev) {
    char dn[16];
    printf("attention into columns of a wider tensor on %s:\n", fq_device_name(dev, dn, sizeof dn));
    const int64_t B = 2, S = 48, H = 2, DH = 128, D = H * DH, W = D + 64, C0 = 0;
    int64_t sh[3] = {B, S, D}, wsh[3] = {B, S, W};
    fq_tensor *q = dev_rand16(ctx, dev, FQ_BF16, 3, sh, 901, 1.0f), *k = dev_rand16(ctx, dev, FQ_BF16, 3, sh, 902, 1.0f);
    fq_tensor *v = dev_rand16(ctx, dev, FQ_BF16, 3, sh, 903, 1.0f), *o = dev_rand16(ctx, dev, FQ_BF16, 3, sh, 904, 1.0f);
    fq_tensor *cat = dev_rand16(ctx, dev, FQ_BF16, 3, wsh, 905, 1.0f), *ref = dev_rand16(ctx, dev, FQ_BF16, 3, wsh, 905, 1.0f);
    int64_t sc = 0;
    fq_status ps = fq_nn_attention_plan_cols(ctx, dev, B, S, H, DH, FQ_BF16, FQ_BF16, W, &sc);
    int64_t sc2 = 0;
    CHECK_OK(ctx, fq_nn_attention_plan(ctx, dev, B, S, H, DH, FQ_BF16, FQ_BF16, FQ_NN_ATTN_AUTO, &sc2));
    if (sc2 > sc) sc = sc2;
    int64_t ss[1] = {sc > 0 ? sc : 1};
    fq_tensor *scr = empty(ctx, dev, 1, ss);
    if (ps == FQ_ERR_UNSUPPORTED) {
        SKIP("no cuDNN plan for a strided attention output here");
    } else if (q && k && v && o && cat && ref && scr) {
        CHECK_OK(ctx, ps);
        CHECK_OK(ctx, fq_nn_attention_cols(ctx, q, k, v, H, cat, C0, scr, FQ_BF16));
        CHECK_OK(ctx, fq_nn_attention(ctx, q, k, v, H, o, scr, FQ_BF16));
        CHECK_OK(ctx, fq_nn_copy_cols(ctx, o, ref, C0));
        float *a = host_f32(ctx, cat), *b = host_f32(ctx, ref);
        if (a && b) {
            const int64_t n = B * S * W, nd = ndiff(a, b, n);
            int64_t tail = 0; /* columns D.. untouched */
            for (int64_t r = 0; r < B * S; r++)
                for (int64_t c = D; c < W; c++) tail += a[r * W + c] != b[r * W + c];
            const double e = rel_l2_ff(a, b, n);
            printf("  into cat vs into o + copy: %lld of %lld elements differ, rel L2 %.3g; other columns changed: %lld\n",
                   (long long)nd, (long long)n, e, (long long)tail);
            CHECK(e <= 4e-3 && tail == 0, "attention into cat: rel L2 %.3g, %lld other columns changed", e,
                  (long long)tail);
        }
        free(a);
        free(b);
        /* a row stride that is not 16-byte aligned is refused (bf16: 8 elements) */
        int64_t bsh[3] = {B, S, D + 3};
        fq_tensor *badb = NULL;
        CHECK_OK(ctx, fq_tensor_create(ctx, dev, FQ_BF16, 3, bsh, &badb));
        if (badb) {
            fq_status bs = fq_nn_attention_cols(ctx, q, k, v, H, badb, 0, scr, FQ_BF16);
            CHECK(bs != FQ_OK, "attention into a %lld-wide tensor accepted", (long long)(D + 3));
        }
        fq_tensor_free(badb);
    }
    fq_tensor *t[] = {q, k, v, o, cat, ref, scr};
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) fq_tensor_free(t[i]);
}

/* ---- a forward captured into a CUDA graph --------------------------------------------------- */

/* Eager forward, then the same forward captured once and replayed twice (new
 * input values in between, as a denoising loop writes them): the replays give
 * the eager forward's bits for the same inputs. */
static void test_graph(fq_ctx *ctx, fq_device dev) {
    char dn[16];
    printf("forward as a CUDA graph on %s:\n", fq_device_name(dev, dn, sizeof dn));
    fq_flux_config c = tiny_config(1);
    fq_flux_model *m = random_model(ctx, &c, dev, FQ_BF16, 1, 1, 42);
    rand_inputs in, in2;
    make_inputs(ctx, &c, 1, 12, 6, &in, FQ_BF16);
    make_inputs(ctx, &c, 1, 12, 6, &in2, FQ_BF16);
    fq_tensor *d[7] = {0}, *out = NULL;
    fq_flux_plan *p = NULL;
    fq_nn_graph *g = NULL;
    if (m) {
        for (int i = 0; i < 7; i++) d[i] = in.t[i] ? to_dev(ctx, in.t[i], dev) : NULL;
        int64_t osh[3] = {1, in.Si, c.out_dim};
        out = empty(ctx, dev, 3, osh);
        CHECK_OK(ctx, fq_flux_plan_create(ctx, m, 1, in.St, in.Si, &p));
    }
    if (p && out && d[0]) {
        fq_flux_inputs fi = {d[0], d[1], d[2], d[3], d[4], d[5], d[6]};
        CHECK_OK(ctx, fq_flux_forward(ctx, m, p, &fi, out));
        float *eager = host_f32(ctx, out);
        /* other hidden states and timestep for the second replay (eager first) */
        float *hs = fq_tensor_host_data(in2.t[0]), *ts = fq_tensor_host_data(in2.t[3]);
        for (int64_t i = 0; i < fq_tensor_numel(in2.t[0]); i++) hs[i] = -0.5f * hs[i];
        ts[0] = 0.25f;
        fq_tensor *h2 = to_dev(ctx, in2.t[0], dev), *t2 = to_dev(ctx, in2.t[3], dev);
        fq_flux_inputs fi2 = {h2, d[1], d[2], t2, d[4], d[5], d[6]};
        CHECK_OK(ctx, fq_flux_forward(ctx, m, p, &fi2, out));
        float *eager2 = host_f32(ctx, out);

        CHECK_OK(ctx, fq_nn_graph_begin(ctx, dev));
        fq_status fs = fq_flux_forward(ctx, m, p, &fi, out);
        CHECK(fs == FQ_OK, "forward under capture: %s", fq_ctx_error(ctx));
        CHECK_OK(ctx, fq_nn_graph_end(ctx, dev, &g));
        if (g && eager && eager2 && h2 && t2) {
            CHECK_OK(ctx, fq_nn_graph_launch(ctx, g));
            float *r1 = host_f32(ctx, out);
            /* the graph reads fi's buffers: copy the second inputs into them */
            CHECK_OK(ctx, fq_nn_cast(ctx, h2, d[0], FQ_F32));
            CHECK_OK(ctx, fq_nn_cast(ctx, t2, d[3], FQ_F32));
            CHECK_OK(ctx, fq_nn_graph_launch(ctx, g));
            float *r2 = host_f32(ctx, out);
            const int64_t n = fq_tensor_numel(out);
            if (r1 && r2) {
                const int64_t n1 = ndiff(r1, eager, n), n2 = ndiff(r2, eager2, n), n12 = ndiff(eager, eager2, n);
                printf("  replay 1 vs eager: %lld of %lld differ; replay 2 (new inputs) vs eager: %lld differ "
                       "(the two inputs' outputs differ in %lld)\n", (long long)n1, (long long)n, (long long)n2,
                       (long long)n12);
                CHECK(n1 == 0 && n2 == 0 && n12 > n / 2, "graph replays: %lld and %lld elements differ from eager",
                      (long long)n1, (long long)n2);
            }
            free(r1);
            free(r2);
        }
        /* a graph is tied to its device and buffers: launching after free is the caller's bug; a NULL graph is refused */
        CHECK(fq_nn_graph_launch(ctx, NULL) == FQ_ERR_INVALID_ARG, "NULL graph accepted");
        free(eager);
        free(eager2);
        fq_tensor_free(h2);
        fq_tensor_free(t2);
    }
    fq_nn_graph_free(g);
    fq_flux_plan_free(p);
    fq_tensor_free(out);
    for (int i = 0; i < 7; i++) fq_tensor_free(d[i]);
    free_inputs(&in);
    free_inputs(&in2);
    fq_flux_free(m);
}

int main(void) {
    fq_ctx *ctx;
    if (fq_ctx_create(&ctx) != FQ_OK) return 1;
    struct stat st;
    int fixtures = stat(FIX "/flux/model_fp32/config.json", &st) == 0;
    if (fixtures) test_random_cpu(ctx);
    else SKIP("fixtures missing (%s)", FIX);
    const int ndev = fq_has_cuda() ? fq_cuda_device_count() : 0;
    if (ndev == 0) {
        SKIP("no CUDA device (%s): the GPU tests did not run", fq_has_cuda() ? "none visible" : "CPU-only build");
    } else {
        printf("%d CUDA device(s)\n", ndev);
        for (int d = 0; d < ndev; d++) {
            test_ops(ctx, FQ_CUDA(d));
            test_linear_q4_gemv(ctx, FQ_CUDA(d));
            test_linear_q4_group(ctx, FQ_CUDA(d));
            test_attention(ctx, FQ_CUDA(d));
            test_bf16_storage(ctx, FQ_CUDA(d));
            test_rmsnorm_rope_n(ctx, FQ_CUDA(d));
            if (fixtures) test_golden(ctx, FQ_CUDA(d));
            test_random_devices(ctx, FQ_CUDA(d));
            test_graph(ctx, FQ_CUDA(d));
            test_attention_cols(ctx, FQ_CUDA(d));
        }
        if (fixtures) test_devices(ctx, ndev);
    }
    fq_ctx_free(ctx);
    return check_summary("test_flux_cuda");
}

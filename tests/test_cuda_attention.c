/* cuDNN's fused attention (FQ_NN_ATTN_CUDNN, what AUTO runs for bf16 storage)
 * on every CUDA device, against a float64 reference and against our kernel.
 *
 * q, k, v and out are bf16 rows [B, S, H*dh] of one device buffer, as in a
 * Flux plan's arena, read and written in place; out starts as NaN. The bar is
 * derived from the rounding points the fused kernel shares with ours: per
 * element i, |err_i| <= u (|o_i| + sum_j p_ij |v_j|) to first order, u = 2^-8
 * (bf16): the output rounded once, and the probabilities rounded to bf16
 * before P·V (everything else is f32, ~2^-24 relative). The test holds the
 * normwise error under the norm of that bound, and cuDNN within twice it of our
 * kernel; AUTO gives cuDNN's bits; a second run gives the same bits. The
 * engine config the plan-time tuner keeps (FQ_ATTN_CUDNN_TUNE mode 1) and the
 * first one cuDNN offers (mode 0) are both held to the bar, and to twice it of
 * each other (another engine may sum in another order).
 *
 * Query ranges: the attention as several cuDNN calls over ranges of query
 * rows, each against all keys and values (fq_attn_cudnn_run_rows), gives the
 * one call's bits, at FLUX's shape (4608 tokens, 24 heads of 128) and at
 * batch 2 (q and out ranges keep the batch stride of the full rows); every
 * row is written (out starts as NaN); a range longer than the keys is
 * refused. Bit equality is what an H100 with cuDNN 9.14 gives (each range's
 * plan runs the same engine and knobs, and a query row's result depends on
 * that row and k, v only); a library that tiled a short range differently
 * could sum in another order and fail it.
 *
 * `test_cuda_attention --list` (or --list-wide: also every engine of the graph
 * and knob variants) instead prints, for FLUX's shapes (B 1, 24 heads, head dim
 * 128, bf16, S 512, 4096, 4608), every engine config whose plan finalizes with
 * its time, TFLOP/s (4*B*H*S*S*dh FLOPs) and its output's distance to the first
 * config's, then what the tuned plan keeps.
 *
 * Skips without a GPU or in a build without cuDNN. */
#include "check.h"
#include "core/core.h"
#include "kernels/cpu/nn_cpu.h"
#include "ops/nn_ops.h"
#ifdef FQ_HAVE_CUDA
#include "core/cuda_device.h"
#include "ops/attn_cudnn.h"
#endif

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* out[i] = softmax(q·kᵀ/sqrt(dh))·v in float64; bnd[i] = sum_j p_ij |v_j|. */
static void ref64(const float *q, const float *k, const float *v, double *out, double *bnd, int64_t B, int64_t S,
                  int64_t H, int64_t dh) {
    const int64_t ld = H * dh;
    double *p = malloc(sizeof(double) * (size_t)S);
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < S; i++) {
                const float *qi = q + (b * S + i) * ld + h * dh;
                double mx = -INFINITY, sum = 0;
                for (int64_t j = 0; j < S; j++) {
                    const float *kj = k + (b * S + j) * ld + h * dh;
                    double d = 0;
                    for (int64_t e = 0; e < dh; e++) d += (double)qi[e] * kj[e];
                    p[j] = d / sqrt((double)dh);
                    mx = p[j] > mx ? p[j] : mx;
                }
                for (int64_t j = 0; j < S; j++) sum += (p[j] = exp(p[j] - mx));
                for (int64_t j = 0; j < S; j++) p[j] /= sum;
                for (int64_t e = 0; e < dh; e++) {
                    double acc = 0, abs_acc = 0;
                    for (int64_t j = 0; j < S; j++) {
                        const double vj = v[(b * S + j) * ld + h * dh + e];
                        acc += p[j] * vj;
                        abs_acc += p[j] * fabs(vj);
                    }
                    out[(b * S + i) * ld + h * dh + e] = acc;
                    bnd[(b * S + i) * ld + h * dh + e] = abs_acc;
                }
            }
    free(p);
}

static double rel_l2(const float *a, const double *ref, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        const double d = (double)a[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static double rel_l2_ff(const float *a, const float *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        const double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static int all_finite(const float *a, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(a[i])) return 0;
    return 1;
}

/* Deterministic uniform values in [-scale, scale), rounded to bf16. */
static void fill(float *x, int64_t n, uint64_t seed, float scale) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 12345;
    for (int64_t i = 0; i < n; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        x[i] = (float)((double)(s >> 11) / 9007199254740992.0 * 2.0 - 1.0) * scale;
    }
    fq_cpu_round(x, n, FQ_BF16);
}

static uint16_t bf16_bits(float f) { /* f is bf16-valued: its upper half */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

/* A view's values on the host as f32 (NULL on failure, reported). */
static float *fetch(fq_ctx *ctx, const fq_tensor *t) {
    const int64_t n = t->numel;
    uint16_t *raw = malloc((size_t)n * 2);
    float *f = malloc((size_t)n * 4);
    fq_status s = raw && f ? fq_tensor_to_host(ctx, t, raw) : FQ_ERR_OUT_OF_MEMORY;
    CHECK(s == FQ_OK, "copy to host: %s", fq_ctx_error(ctx));
    if (s == FQ_OK) fq_cpu_to_f32(raw, FQ_BF16, n, f);
    free(raw);
    if (s != FQ_OK) {
        free(f);
        return NULL;
    }
    return f;
}

typedef struct {
    int64_t B, S, H, dh;
    int edge; /* cuDNN may have no plan for it: then reported, not failed */
} acase;

#ifdef FQ_HAVE_CUDA
/* The tuned plan (mode 1) against the untuned one (mode 0) on the same rows. */
static void tuned_vs_first(fq_ctx *ctx, fq_device dev, const acase *c, const fq_tensor *q, const fq_tensor *k,
                           const fq_tensor *v, fq_tensor *o, const double *ref, double bar, int64_t n) {
    fq_cuda_dev *d = NULL;
    CHECK_OK(ctx, fq_cuda_dev_get(ctx, dev.index, &d));
    if (!d) return;
    float *out[2] = {NULL, NULL};
    char desc[2][400] = {"", ""};
    for (int mode = 0; mode < 2; mode++) {
        CHECK_OK(ctx, fq_attn_cudnn_set_tune(ctx, d, mode));
        int64_t ns = 0;
        fq_tensor *scr = NULL;
        CHECK_OK(ctx, fq_nn_attention_plan(ctx, dev, c->B, c->S, c->H, c->dh, FQ_BF16, FQ_BF16, FQ_NN_ATTN_CUDNN,
                                           &ns));
        int64_t ss[1] = {1 + ns};
        CHECK_OK(ctx, fq_tensor_create(ctx, dev, FQ_F32, 1, ss, &scr));
        if (scr) {
            CHECK_OK(ctx, fq_nn_attention_impl(ctx, q, k, v, c->H, o, scr, FQ_BF16, FQ_NN_ATTN_CUDNN));
            out[mode] = fetch(ctx, o);
        }
        fq_tensor_free(scr);
        fq_attn_cudnn_describe(d, FQ_BF16, c->B, c->S, c->H, c->dh, desc[mode], sizeof desc[mode]);
    }
    CHECK_OK(ctx, fq_attn_cudnn_set_tune(ctx, d, -1));
    if (out[0] && out[1]) {
        const double e0 = rel_l2(out[0], ref, n), e1 = rel_l2(out[1], ref, n), e01 = rel_l2_ff(out[1], out[0], n);
        printf("      untuned: %s\n      tuned:   %s\n      vs f64: tuned %.3g, untuned %.3g; tuned vs untuned %.3g%s\n",
               desc[0], desc[1], e1, e0, e01, memcmp(out[0], out[1], (size_t)n * 4) ? "" : " (the same bits)");
        CHECK(all_finite(out[1], n), "tuned cuDNN output finite");
        CHECK(e0 <= bar, "untuned cuDNN attention rel L2 %.3g to float64 > bar %.3g", e0, bar);
        CHECK(e1 <= bar, "tuned cuDNN attention rel L2 %.3g to float64 > bar %.3g", e1, bar);
        CHECK(e01 <= 2 * bar, "tuned vs untuned cuDNN: rel L2 %.3g > %.3g", e01, 2 * bar);
    }
    free(out[0]);
    free(out[1]);
}
#endif

static void run_case(fq_ctx *ctx, fq_device dev, const acase *c, uint64_t seed) {
    const int64_t n = c->B * c->S * c->H * c->dh;
    const size_t seg = ((size_t)n * 2 + 255) & ~(size_t)255; /* 256-byte aligned views, as a plan's */
    const int64_t sh[3] = {c->B, c->S, c->H * c->dh};
    float *hq = malloc((size_t)n * 4), *hk = malloc((size_t)n * 4), *hv = malloc((size_t)n * 4);
    double *ref = malloc((size_t)n * 8), *bnd = malloc((size_t)n * 8);
    uint16_t *arena_h = malloc(5 * seg);
    fq_tensor *arena = NULL, *scr = NULL;
    float *oc = NULL, *oc2 = NULL, *om = NULL, *oa = NULL;
    if (!hq || !hk || !hv || !ref || !bnd || !arena_h) goto done;
    fill(hq, n, seed, 3.0f);
    fill(hk, n, seed + 1, 1.0f);
    fill(hv, n, seed + 2, 1.0f);
    memset(arena_h, 0xff, 5 * seg); /* bf16 0xffff: NaN in every output slot */
    for (int64_t i = 0; i < n; i++) {
        arena_h[i] = bf16_bits(hq[i]);
        arena_h[seg / 2 + i] = bf16_bits(hk[i]);
        arena_h[seg + i] = bf16_bits(hv[i]);
    }
    int64_t an[1] = {(int64_t)(5 * seg / 2)};
    CHECK_OK(ctx, fq_tensor_from_host(ctx, dev, FQ_BF16, 1, an, arena_h, &arena));
    if (!arena) goto done;
    fq_tensor q = fq_nn_view(&arena->buf, 0, FQ_BF16, 3, sh, "q"), k = fq_nn_view(&arena->buf, seg, FQ_BF16, 3, sh, "k");
    fq_tensor v = fq_nn_view(&arena->buf, 2 * seg, FQ_BF16, 3, sh, "v");
    fq_tensor o1 = fq_nn_view(&arena->buf, 3 * seg, FQ_BF16, 3, sh, "o_cudnn");
    fq_tensor o2 = fq_nn_view(&arena->buf, 4 * seg, FQ_BF16, 3, sh, "o_ours");

    /* the plan ahead, as a Flux plan does; its workspace is scratch */
    int64_t ns = 0, na = 0, nm = fq_nn_attention_scratch_impl(dev, c->B, c->S, c->H, c->dh, FQ_BF16, FQ_NN_ATTN_MMA);
    fq_status ps = fq_nn_attention_plan(ctx, dev, c->B, c->S, c->H, c->dh, FQ_BF16, FQ_BF16, FQ_NN_ATTN_CUDNN, &ns);
    if (ps == FQ_ERR_UNSUPPORTED && c->edge) {
        printf("  B%lld S%-4lld H%lld dh%-3lld: cuDNN has no plan (%s)\n", (long long)c->B, (long long)c->S,
               (long long)c->H, (long long)c->dh, fq_ctx_error(ctx));
        goto done;
    }
    CHECK(ps == FQ_OK, "cuDNN plan B%lld S%lld H%lld dh%lld: %s", (long long)c->B, (long long)c->S, (long long)c->H,
          (long long)c->dh, fq_ctx_error(ctx));
    CHECK_OK(ctx, fq_nn_attention_plan(ctx, dev, c->B, c->S, c->H, c->dh, FQ_BF16, FQ_BF16, FQ_NN_ATTN_AUTO, &na));
    CHECK(na >= ns, "AUTO's scratch (%lld floats) holds cuDNN's workspace (%lld)", (long long)na, (long long)ns);
    if (c->dh > 128) nm = 0; /* our tensor-core kernel does not run it */
    int64_t ss[1] = {1 + (ns > nm ? ns : nm)};
    CHECK_OK(ctx, fq_tensor_create(ctx, dev, FQ_F32, 1, ss, &scr));
    CHECK_OK(ctx, fq_nn_attention_impl(ctx, &q, &k, &v, c->H, &o1, scr, FQ_BF16, FQ_NN_ATTN_CUDNN));
    oc = fetch(ctx, &o1);
    /* our kernel on the same rows (head dim <= 128) */
    const int ours = c->dh <= 128;
    if (ours) {
        CHECK_OK(ctx, fq_nn_attention_impl(ctx, &q, &k, &v, c->H, &o2, scr, FQ_BF16, FQ_NN_ATTN_MMA));
        om = fetch(ctx, &o2);
    }
    /* AUTO: cuDNN's bits; and cuDNN again: the same bits */
    CHECK_OK(ctx, fq_nn_attention(ctx, &q, &k, &v, c->H, &o2, scr, FQ_BF16));
    oa = fetch(ctx, &o2);
    CHECK_OK(ctx, fq_nn_attention_impl(ctx, &q, &k, &v, c->H, &o1, scr, FQ_BF16, FQ_NN_ATTN_CUDNN));
    oc2 = fetch(ctx, &o1);
    if (!oc || !oa || !oc2 || (ours && !om)) goto done;

    ref64(hq, hk, hv, ref, bnd, c->B, c->S, c->H, c->dh);
    const double u = 1.0 / 256; /* bf16 unit roundoff */
    double bn = 0, rn = 0;
    for (int64_t i = 0; i < n; i++) {
        const double b = u * (fabs(ref[i]) + bnd[i]);
        bn += b * b;
        rn += ref[i] * ref[i];
    }
    const double bar = 1.05 * sqrt(bn / rn);
    const double e_c = rel_l2(oc, ref, n), e_m = ours ? rel_l2(om, ref, n) : -1, e_cm = ours ? rel_l2_ff(oc, om, n) : -1;
    printf("  B%lld S%-4lld H%lld dh%-3lld: vs f64: cuDNN %.3g, ours %.3g (bar %.3g); cuDNN vs ours %.3g\n",
           (long long)c->B, (long long)c->S, (long long)c->H, (long long)c->dh, e_c, e_m, bar, e_cm);
    CHECK(all_finite(oc, n), "cuDNN output finite (the NaN poison overwritten)");
    CHECK(e_c <= bar, "cuDNN attention rel L2 %.3g to float64 > bar %.3g", e_c, bar);
    if (ours) {
        CHECK(e_m <= bar, "our attention rel L2 %.3g to float64 > bar %.3g", e_m, bar);
        CHECK(e_cm <= 2 * bar, "cuDNN vs our kernel: rel L2 %.3g > %.3g", e_cm, 2 * bar);
    }
    CHECK(!memcmp(oa, oc, (size_t)n * 4), "AUTO with bf16 storage runs cuDNN (the same bits)");
    CHECK(!memcmp(oc2, oc, (size_t)n * 4), "cuDNN attention: two runs give the same bits");
#ifdef FQ_HAVE_CUDA
    tuned_vs_first(ctx, dev, c, &q, &k, &v, &o1, ref, bar, n);
#endif
done:
    free(hq), free(hk), free(hv), free(ref), free(bnd), free(arena_h);
    free(oc), free(oc2), free(om), free(oa);
    fq_tensor_free(arena);
    fq_tensor_free(scr);
}

#ifdef FQ_HAVE_CUDA
/* Query ranges against one call (see the top of the file). splits: lists of
 * range sizes, each ended by 0, summing to S; the list of lists ends with an
 * empty one. */
static void ranges_case(fq_ctx *ctx, fq_device dev, int64_t B, int64_t S, int64_t H, int64_t dh, const int64_t *splits,
                        uint64_t seed) {
    const int64_t ld = H * dh, n = B * S * ld;
    const int64_t sh[3] = {B, S, ld};
    fq_cuda_dev *d = NULL;
    fq_tensor *t[4] = {NULL, NULL, NULL, NULL}, *scr = NULL;
    uint16_t *poison = malloc((size_t)n * 2), *ref = malloc((size_t)n * 2), *got = malloc((size_t)n * 2);
    float *fr = malloc((size_t)n * 4), *fg = malloc((size_t)n * 4);
    fq_cuda_guard g;
    int guarded = 0;
    CHECK_OK(ctx, fq_cuda_dev_get(ctx, dev.index, &d));
    if (!d || !poison || !ref || !got || !fr || !fg) goto done;
    memset(poison, 0xff, (size_t)n * 2); /* bf16 NaN: a row no range writes shows */
    for (int i = 0; i < 4; i++) {
        if (i < 3) {
            CHECK_OK(ctx, fq_tensor_create(ctx, dev, FQ_BF16, 3, sh, &t[i]));
            if (t[i]) CHECK_OK(ctx, fq_nn_random(ctx, t[i], seed + (uint64_t)i, i ? 1.0f : 3.0f, 0.0f));
        } else {
            CHECK_OK(ctx, fq_tensor_from_host(ctx, dev, FQ_BF16, 3, sh, poison, &t[i]));
        }
        if (!t[i]) goto done;
    }
    /* every range's plan ahead; the scratch holds the largest workspace */
    size_t ws = 0;
    int ok = 0;
    CHECK_OK(ctx, fq_attn_cudnn_plan_rows(ctx, d, FQ_BF16, B, S, S, H, dh, 0, 1, &ok, &ws));
    for (const int64_t *sp = splits; *sp; sp++)
        for (; *sp; sp++) {
            size_t w = 0;
            CHECK_OK(ctx, fq_attn_cudnn_plan_rows(ctx, d, FQ_BF16, B, *sp, S, H, dh, 0, 1, &ok, &w));
            ws = w > ws ? w : ws;
        }
    int64_t ss[1] = {(int64_t)(ws / 4) + 64};
    CHECK_OK(ctx, fq_tensor_create(ctx, dev, FQ_F32, 1, ss, &scr));
    if (!scr) goto done;
    void *wp = (void *)(((uintptr_t)scr->buf.ptr + 255) & ~(uintptr_t)255);
    const size_t wb = (size_t)ss[0] * 4 - ((uintptr_t)wp - (uintptr_t)scr->buf.ptr);
    CHECK_OK(ctx, fq_cuda_guard_enter(ctx, dev.index, &g));
    guarded = 1;
    int ran = 0;
    fq_status s = fq_attn_cudnn_run_rows(ctx, d, FQ_BF16, B, S, S, H, dh, t[0]->buf.ptr, t[1]->buf.ptr,
                                         t[2]->buf.ptr, t[3]->buf.ptr, 0, wp, wb, 1, &ran);
    CHECK(s == FQ_OK && ran, "one call B%lld S%lld: %s", (long long)B, (long long)S, fq_ctx_error(ctx));
    CHECK_OK(ctx, fq_nn_sync(ctx, dev));
    CHECK_OK(ctx, fq_tensor_to_host(ctx, t[3], ref));
    fq_cpu_to_f32(ref, FQ_BF16, n, fr);
    CHECK(all_finite(fr, n), "one call B%lld S%lld: output finite", (long long)B, (long long)S);
    /* a range longer than the keys */
    s = fq_attn_cudnn_run_rows(ctx, d, FQ_BF16, B, S + 1, S, H, dh, t[0]->buf.ptr, t[1]->buf.ptr, t[2]->buf.ptr,
                               t[3]->buf.ptr, 0, wp, wb, 1, &ran);
    CHECK(s == FQ_ERR_INVALID_ARG && !ran, "a range of S + 1 query rows: %s", fq_ctx_error(ctx));
    for (const int64_t *sp = splits; *sp;) {
        const int64_t *list = sp;
        char name[96] = "";
        int w = 0;
        CHECK_OK(ctx, fq_buf_write(ctx, &t[3]->buf, 0, poison, (size_t)n * 2));
        for (int64_t r0 = 0; *sp; r0 += *sp++) {
            if (w < (int)sizeof name)
                w += snprintf(name + w, sizeof name - (size_t)w, "%s%lld", sp == list ? "" : " + ", (long long)*sp);
            const size_t off = (size_t)(r0 * ld) * 2;
            s = fq_attn_cudnn_run_rows(ctx, d, FQ_BF16, B, *sp, S, H, dh, (char *)t[0]->buf.ptr + off, t[1]->buf.ptr,
                                       t[2]->buf.ptr, (char *)t[3]->buf.ptr + off, 0, wp, wb, 1, &ran);
            CHECK(s == FQ_OK && ran, "range of %lld rows at %lld: %s", (long long)*sp, (long long)r0,
                  fq_ctx_error(ctx));
        }
        sp++;
        CHECK_OK(ctx, fq_nn_sync(ctx, dev));
        CHECK_OK(ctx, fq_tensor_to_host(ctx, t[3], got));
        fq_cpu_to_f32(got, FQ_BF16, n, fg);
        int64_t diff = 0;
        for (int64_t i = 0; i < n; i++) diff += got[i] != ref[i];
        printf("  ranges B%lld S%lld H%lld dh%lld, %s: %lld of %lld values differ from one call, rel L2 %.3g\n",
               (long long)B, (long long)S, (long long)H, (long long)dh, name, (long long)diff, (long long)n,
               rel_l2_ff(fg, fr, n));
        CHECK(all_finite(fg, n), "ranges %s: every row written", name);
        CHECK(diff == 0, "ranges %s: the one call's bits (%lld values differ)", name, (long long)diff);
    }
done:
    if (guarded) fq_cuda_guard_exit(&g);
    for (int i = 0; i < 4; i++) fq_tensor_free(t[i]);
    fq_tensor_free(scr);
    free(poison), free(ref), free(got), free(fr), free(fg);
}
#endif

static void test_device(fq_ctx *ctx, fq_device dev) {
    char dn[16];
    printf("cuDNN attention on %s, bf16 rows read in place:\n", fq_device_name(dev, dn, sizeof dn));
    /* refused where cuDNN cannot run: f32 storage and head dims it lacks */
    int64_t sh[3] = {1, 8, 128};
    fq_tensor *x = NULL, *y = NULL;
    CHECK_OK(ctx, fq_tensor_create(ctx, dev, FQ_F32, 3, sh, &x));
    CHECK_OK(ctx, fq_tensor_create(ctx, dev, FQ_F32, 3, sh, &y));
    if (x && y) {
        fq_status s = fq_nn_attention_impl(ctx, x, x, x, 1, y, NULL, FQ_BF16, FQ_NN_ATTN_CUDNN);
        CHECK(s == FQ_ERR_UNSUPPORTED && strstr(fq_ctx_error(ctx), "cuDNN"), "f32 storage: %s", fq_ctx_error(ctx));
        s = fq_nn_attention_impl(ctx, x, x, x, 1, y, NULL, FQ_F32, FQ_NN_ATTN_CUDNN);
        CHECK(s == FQ_ERR_UNSUPPORTED, "f32 compute: %s", fq_ctx_error(ctx));
    }
    fq_tensor_free(x);
    fq_tensor_free(y);
    /* out over v: refused by cuDNN (other CTAs still read v), AUTO runs our kernel */
    int64_t sb[3] = {1, 70, 256};
    fq_tensor *a = NULL, *b = NULL;
    CHECK_OK(ctx, fq_tensor_create(ctx, dev, FQ_BF16, 3, sb, &a));
    CHECK_OK(ctx, fq_tensor_create(ctx, dev, FQ_BF16, 3, sb, &b));
    if (a && b) {
        CHECK_OK(ctx, fq_nn_random(ctx, a, 5, 1.0f, 0.0f));
        CHECK_OK(ctx, fq_nn_random(ctx, b, 6, 1.0f, 0.0f));
        int64_t nsc[1] = {fq_nn_attention_scratch_io(dev, 1, 70, 2, 128, FQ_BF16, FQ_BF16) + 1};
        fq_tensor *sc = NULL;
        CHECK_OK(ctx, fq_tensor_create(ctx, dev, FQ_F32, 1, nsc, &sc));
        fq_status s = fq_nn_attention_impl(ctx, a, a, b, 2, b, sc, FQ_BF16, FQ_NN_ATTN_CUDNN);
        CHECK(s == FQ_ERR_INVALID_ARG && strstr(fq_ctx_error(ctx), "overlaps"), "out = v with cuDNN: %s",
              fq_ctx_error(ctx));
        CHECK_OK(ctx, fq_nn_attention(ctx, a, a, b, 2, b, sc, FQ_BF16));
        CHECK_OK(ctx, fq_nn_sync(ctx, dev));
        fq_tensor_free(sc);
    }
    fq_tensor_free(a);
    fq_tensor_free(b);
    int64_t ns = 0;
    fq_status s = fq_nn_attention_plan(ctx, dev, 1, 8, 1, 20, FQ_BF16, FQ_BF16, FQ_NN_ATTN_CUDNN, &ns);
    CHECK(s == FQ_ERR_UNSUPPORTED, "head dim 20 with cuDNN: %s", fq_ctx_error(ctx));
    CHECK_OK(ctx, fq_nn_attention_plan(ctx, dev, 1, 8, 1, 20, FQ_BF16, FQ_BF16, FQ_NN_ATTN_AUTO, &ns));

    /* S not a multiple of 64 or 128, batch 2, one token, FLUX's head dim and others */
    const acase cases[] = {{2, 333, 3, 128, 0}, {1, 1000, 2, 128, 0}, {2, 77, 4, 64, 0},
                           {2, 600, 1, 128, 0},  {1, 1, 2, 128, 1},    {1, 130, 2, 256, 1}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(ctx, dev, &cases[i], 7100 + 10 * i);
#ifdef FQ_HAVE_CUDA
    /* query ranges: FLUX's joint attention (512 text + 4096 image tokens), and batch 2 with odd ranges */
    static const int64_t flux_splits[] = {512, 4096, 0, 4096, 512, 0, 2304, 2304, 0, 1536, 1536, 1536, 0,
                                          1152, 1152, 1152, 1152, 0, 3072, 1536, 0, 0};
    static const int64_t b2_splits[] = {128, 472, 0, 300, 300, 0, 7, 77, 516, 0, 591, 9, 0, 0};
    ranges_case(ctx, dev, 1, 4608, 24, 128, flux_splits, 7300);
    ranges_case(ctx, dev, 2, 600, 3, 128, b2_splits, 7310);
#endif
}

#ifdef FQ_HAVE_CUDA
/* --list: every engine config of FLUX's attention shapes on cuda:0, timed. */
static void list_configs(fq_ctx *ctx, int wide) {
    fq_cuda_dev *d = NULL;
    char name[160] = "";
    CHECK_OK(ctx, fq_cuda_dev_get(ctx, 0, &d));
    if (fq_nn_device_describe(ctx, FQ_CUDA(0), name, sizeof name) != FQ_OK) snprintf(name, sizeof name, "cuda:0");
    if (!d) return;
    static fq_attn_cudnn_cfg cfg[128];
    struct timespec t0 = {0, 0}, t1 = {0, 0};
    const int64_t sizes[3] = {512, 4096, 4608}, B = 1, H = 24, dh = 128;
    for (int si = 0; si < 3; si++) {
        const int64_t S = sizes[si];
        const double fl = 4.0 * B * H * (double)S * S * dh;
        int n = 0;
        fq_status s = fq_attn_cudnn_list(ctx, d, FQ_BF16, B, S, H, dh, wide, cfg, 128, &n);
        CHECK_OK(ctx, s);
        printf("\ncuDNN attention engine configs, B%lld S%lld H%lld dh%lld bf16, %s: %d finalize%s\n", (long long)B,
               (long long)S, (long long)H, (long long)dh, name, n, wide ? " (heuristics, engine sweep, knob variants)" : "");
        printf("   #  from graph engine  build_ms      ms  TFLOP/s  vs_first  workspace  knobs (type:value)\n");
        for (int i = 0; i < n; i++) {
            const fq_attn_cudnn_cfg *c = &cfg[i];
            char kn[400] = "";
            int w = 0;
            for (int j = 0; j < c->nknobs && w < (int)sizeof kn - 24; j++)
                w += snprintf(kn + w, sizeof kn - (size_t)w, "%s%lld:%lld", j ? " " : "", (long long)c->knob[j][0],
                              (long long)c->knob[j][1]);
            const int bad = c->ms > 0 && !(c->diff >= 0 && c->diff <= 1.0 / 128);
            printf("  %2d  %c    %c     %6lld  %8.1f  %7.4f  %7.1f  %8.2g  %9zu  {%s}%s%s%s\n", i, c->mode, c->graph,
                   (long long)c->engine, c->build_ms, c->ms, c->ms > 0 ? fl / (c->ms * 1e9) : 0.0, c->diff, c->ws, kn,
                   c->first ? " first" : "", c->chosen ? " <- tuned" : "", bad ? " (output differs: unusable)" : "");
            /* what heuristics offer must compute the same; the sweep's knob variants
             * need not (some finalize and write NaN), hence mode 2 compares first */
            if (c->mode == 'A' || c->mode == 'B' || c->mode == 'F')
                CHECK(!bad, "S%lld config %d: output rel L2 %.3g to the first config's", (long long)S, i, c->diff);
        }
        /* the plan path as a Flux plan takes it (mode from FQ_ATTN_CUDNN_TUNE) */
        int64_t ns = 0;
        CHECK_OK(ctx, fq_attn_cudnn_set_tune(ctx, d, -1));
        CHECK_OK(ctx, fq_nn_attention_plan(ctx, FQ_CUDA(0), B, S, H, dh, FQ_BF16, FQ_BF16, FQ_NN_ATTN_CUDNN, &ns));
        char desc[400];
        fq_attn_cudnn_describe(d, FQ_BF16, B, S, H, dh, desc, sizeof desc);
        printf("  plan: %s\n", desc);
        /* that plan through the op, on random rows as bench_flux times it (q
         * scaled by 3, wall clock over 20 calls after 2), three times in a row */
        int64_t sh[3] = {B, S, H * dh}, ss[1] = {1 + ns};
        fq_tensor *t[4] = {NULL, NULL, NULL, NULL}, *scr = NULL;
        int ok = 1;
        for (int i = 0; i < 4; i++) {
            CHECK_OK(ctx, fq_tensor_create(ctx, FQ_CUDA(0), FQ_BF16, 3, sh, &t[i]));
            ok &= t[i] != NULL;
            if (t[i] && i < 3) CHECK_OK(ctx, fq_nn_random(ctx, t[i], 11 + (uint64_t)i, i ? 1.0f : 3.0f, 0.0f));
        }
        CHECK_OK(ctx, fq_tensor_create(ctx, FQ_CUDA(0), FQ_F32, 1, ss, &scr));
        ok &= scr != NULL;
        printf("  op (fq_nn_attention_impl, random rows), wall clock per call over 20 calls:");
        for (int rep = 0; rep < 3 && ok; rep++) {
            for (int i = 0; i < 22 && ok; i++) {
                if (i == 2) {
                    ok &= fq_nn_sync(ctx, FQ_CUDA(0)) == FQ_OK;
                    clock_gettime(CLOCK_MONOTONIC, &t0);
                }
                ok &= fq_nn_attention_impl(ctx, t[0], t[1], t[2], H, t[3], scr, FQ_BF16, FQ_NN_ATTN_CUDNN) == FQ_OK;
            }
            ok &= fq_nn_sync(ctx, FQ_CUDA(0)) == FQ_OK;
            clock_gettime(CLOCK_MONOTONIC, &t1);
            const double ms = ((double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-6) / 20;
            printf(" %.4f ms (%.1f TFLOP/s)%s", ms, fl / (ms * 1e9), rep < 2 ? "," : "\n");
        }
        CHECK(ok, "timing the op: %s", fq_ctx_error(ctx));
        for (int i = 0; i < 4; i++) fq_tensor_free(t[i]);
        fq_tensor_free(scr);
    }
}
#endif

int main(int argc, char **argv) {
    fq_ctx *ctx;
    if (fq_ctx_create(&ctx) != FQ_OK) return 1;
    const int ndev = fq_has_cuda() ? fq_cuda_device_count() : 0;
    const int list = argc > 1 && !strcmp(argv[1], "--list") ? 1 : argc > 1 && !strcmp(argv[1], "--list-wide") ? 2 : 0;
    if (argc > 1 && !list) {
        fprintf(stderr, "usage: test_cuda_attention [--list | --list-wide]\n");
        fq_ctx_free(ctx);
        return 2;
    }
    if (list && ndev > 0) {
#ifdef FQ_HAVE_CUDA
        list_configs(ctx, list == 2);
#endif
    } else if (ndev == 0) {
        SKIP("no CUDA device (%s): cuDNN attention not tested", fq_has_cuda() ? "none visible" : "CPU-only build");
    } else {
        int64_t ns = 0;
        fq_status s = fq_nn_attention_plan(ctx, FQ_CUDA(0), 1, 128, 1, 128, FQ_BF16, FQ_BF16, FQ_NN_ATTN_CUDNN, &ns);
        if (s == FQ_ERR_UNSUPPORTED && strstr(fq_ctx_error(ctx), "no cuDNN")) {
            SKIP("this build has no cuDNN: %s", fq_ctx_error(ctx));
        } else {
            CHECK_OK(ctx, s);
            for (int d = 0; d < ndev; d++) test_device(ctx, FQ_CUDA(d));
        }
    }
    fq_ctx_free(ctx);
    return check_summary("test_cuda_attention");
}

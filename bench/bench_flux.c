/* Benchmark of one denoising step: the FLUX.1 transformer forward at batch 1
 * with 512 text tokens and (H/16)*(W/16) image tokens (4096 at 1024x1024), on
 * a model with random weights built directly on the device (full size, no
 * checkpoint needed; optionally NF4/FP4 quantized there) or a model loaded
 * from a diffusers folder / BFL file.
 *
 * Printed, with the card named:
 *  - step time: median and min over --iters forwards (wall clock from the
 *    first launch to the end of the device's work, after --warmup runs), and
 *    the model FLOPs per second it implies (linears + attention, counted from
 *    the config);
 *  - memory: the weights, the plan (activations + scratch), the peak of the
 *    library's allocator on the device and the driver's view (cudaMemGetInfo);
 *  - with --profile: the share of the step in linears / attention / the rest
 *    (a CUDA event after each op, one extra forward);
 *  - baselines measured in the same run: the attention op alone (24 heads,
 *    d 128 for FLUX.1) at 4608, 4096 and 512 tokens (and the step's count), with
 *    cuDNN's fused kernel (what the forward runs when the build has cuDNN) and
 *    with our tensor-core kernel; cuDNN's at 4608 tokens as one call and as
 *    several calls over ranges of query rows (each against all keys), in
 *    interleaved rounds; and a dense bf16 linear op (cuBLASLt with the op's
 *    conversions) of the size of a q projection.
 *
 * Usage: bench_flux [--config dev|schnell|PATH] [--random-weights | --model PATH]
 *                   [--quantize nf4|fp4] [--double-quant] [--blocksize N] [--dtype bf16|f16|f32]
 *                   [--width W] [--height H] [--txt-tokens N] [--device DEV]
 *                   [--iters N] [--warmup N] [--profile] [--seed N]
 *        (also: fluxq bench flux ...) */
#include "core/core.h"
#include "models/flux.h"
#include "models/flux_random.h"
#include "ops/nn_ops.h"
#ifdef FQ_HAVE_CUDA
#include "core/cuda_device.h"
#include "ops/attn_cudnn.h" /* the query-range baseline calls cuDNN's ranges directly */
#endif

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    const char *config, *model;
    int quantize; /* 0 none, else 1 + fq_quant_type */
    int double_quant;
    int64_t blocksize;
    int dtype;    /* -1: the model's */
    int64_t width, height, txt;
    const char *device;
    int iters, warmup, profile, exact_gelu, no_gemv, graph;
    uint64_t seed;
} bench_opts;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double gb(double bytes) { return bytes / 1e9; }

static void usage(void) {
    fprintf(stderr,
            "usage: bench_flux [--config dev|schnell|PATH] [--random-weights | --model PATH]\n"
            "                  [--quantize nf4|fp4] [--double-quant] [--blocksize N] [--dtype bf16|f16|f32]\n"
            "                  [--width W] [--height H] [--txt-tokens N] [--device DEV]\n"
            "                  [--iters N] [--warmup N] [--profile] [--seed N] [--exact-gelu]\n"
            "                  [--no-gemv] [--graph]\n");
}

static int parse(int argc, char **argv, bench_opts *o) {
    memset(o, 0, sizeof *o);
    o->config = "dev";
    o->blocksize = 64;
    o->dtype = -1;
    o->width = o->height = 1024;
    o->txt = 512;
    o->iters = 10;
    o->warmup = 2;
    for (int i = 1; i < argc; i++) { /* argv[0]: the program or subcommand name */
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--config") && v) o->config = argv[++i];
        else if (!strcmp(a, "--model") && v) o->model = argv[++i];
        else if (!strcmp(a, "--random-weights")) o->model = NULL;
        else if (!strcmp(a, "--quantize") && v) {
            i++;
            if (!strcmp(v, "nf4")) o->quantize = 1 + FQ_QUANT_NF4;
            else if (!strcmp(v, "fp4")) o->quantize = 1 + FQ_QUANT_FP4;
            else if (!strcmp(v, "none")) o->quantize = 0;
            else { fprintf(stderr, "bench_flux: --quantize takes nf4, fp4 or none\n"); return 0; }
        } else if (!strcmp(a, "--double-quant")) o->double_quant = 1;
        else if (!strcmp(a, "--blocksize") && v) o->blocksize = atoll(argv[++i]);
        else if (!strcmp(a, "--dtype") && v) {
            i++;
            o->dtype = !strcmp(v, "bf16") ? FQ_BF16 : !strcmp(v, "f16") ? FQ_F16 : !strcmp(v, "f32") ? FQ_F32 : -2;
            if (o->dtype == -2) { fprintf(stderr, "bench_flux: --dtype takes bf16, f16 or f32\n"); return 0; }
        } else if (!strcmp(a, "--width") && v) o->width = atoll(argv[++i]);
        else if (!strcmp(a, "--height") && v) o->height = atoll(argv[++i]);
        else if (!strcmp(a, "--txt-tokens") && v) o->txt = atoll(argv[++i]);
        else if (!strcmp(a, "--device") && v) o->device = argv[++i];
        else if (!strcmp(a, "--iters") && v) o->iters = atoi(argv[++i]);
        else if (!strcmp(a, "--warmup") && v) o->warmup = atoi(argv[++i]);
        else if (!strcmp(a, "--seed") && v) o->seed = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(a, "--profile")) o->profile = 1;
        else if (!strcmp(a, "--exact-gelu")) o->exact_gelu = 1; /* no GELU in the GEMM epilogue */
        /* 4-bit linears of <= 2 rows (modulation) through dequantize + cuBLASLt, not the GEMV */
        else if (!strcmp(a, "--no-gemv")) o->no_gemv = 1;
        /* also time the forward replayed as one CUDA graph */
        else if (!strcmp(a, "--graph")) o->graph = 1;
        else if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(); return 0; }
        else { fprintf(stderr, "bench_flux: unknown or incomplete option '%s'\n", a); usage(); return 0; }
    }
    if (o->width < 16 || o->height < 16 || o->width % 16 || o->height % 16 || o->txt < 0 || o->iters < 1 ||
        o->warmup < 0) {
        fprintf(stderr, "bench_flux: width and height must be multiples of 16, iters >= 1\n");
        return 0;
    }
    return 1;
}

/* The forward captured once into a CUDA graph, then replayed: median/min ms
 * of iters replays (each waited for), or the reason it cannot be captured. */
static void graph_step(fq_ctx *ctx, fq_device dev, const fq_flux_model *m, fq_flux_plan *plan,
                       const fq_flux_inputs *fi, fq_tensor *outp, int iters) {
    fq_nn_graph *g = NULL;
    fq_status s = fq_nn_graph_begin(ctx, dev);
    if (s == FQ_OK) {
        fq_status f = fq_flux_forward(ctx, m, plan, fi, outp);
        char why[512] = "";
        if (f != FQ_OK) snprintf(why, sizeof why, "%s", fq_ctx_error(ctx));
        s = fq_nn_graph_end(ctx, dev, &g);
        if (f != FQ_OK) {
            printf("step as a CUDA graph: the forward cannot be captured: %s\n", why);
            fq_nn_graph_free(g);
            return;
        }
    }
    double *t = calloc((size_t)iters, sizeof *t);
    for (int i = -1; s == FQ_OK && t && i < iters; i++) { /* one warm-up replay */
        double a = now_ms();
        s = fq_nn_graph_launch(ctx, g);
        if (s == FQ_OK) s = fq_nn_sync(ctx, dev);
        if (i >= 0) t[i] = now_ms() - a;
    }
    if (s != FQ_OK) {
        printf("step as a CUDA graph: %s\n", fq_ctx_error(ctx));
    } else if (t) {
        qsort(t, (size_t)iters, sizeof *t, cmp_double);
        const double med = iters % 2 ? t[iters / 2] : 0.5 * (t[iters / 2 - 1] + t[iters / 2]);
        printf("step as one CUDA graph (captured once, replayed): median %.2f ms, min %.2f ms over %d replays\n", med,
               t[0], iters);
    }
    free(t);
    fq_nn_graph_free(g);
}

/* Model FLOPs of one forward: every linear (2*M*N*K) and every attention
 * (4*S^2*head_dim*heads: q·kᵀ and p·v). */
static void model_flops(const fq_flux_config *c, int64_t B, int64_t St, int64_t Si, double *lin, double *att) {
    const double D = (double)c->inner_dim, F = (double)c->mlp_dim, S = (double)(St + Si), b = (double)B;
    double l = 0;
    l += b * Si * D * c->in_channels + b * St * D * c->joint_attention_dim;         /* embedders of x and text */
    l += b * (D * 256 + D * D) * (c->guidance_embeds ? 2 : 1) + b * (D * c->pooled_projection_dim + D * D);
    l += c->num_layers * (b * 12 * D * D +                                             /* norm1, norm1_context */
                          b * (Si + St) * (4 * D * D + 2 * D * F));                    /* qkv, out, ff        */
    l += c->num_single_layers * (b * 3 * D * D + b * S * (3 * D * D + D * F + D * (D + F)));
    l += b * 2 * D * D + b * Si * D * c->out_dim;                                      /* norm_out, proj_out  */
    *lin = 2 * l;
    *att = (double)(c->num_layers + c->num_single_layers) * 4.0 * b * S * S * c->attention_head_dim *
           c->num_attention_heads;
}

/* A device tensor of the given shape with random values rounded to rnd (NULL on failure). */
static fq_tensor *rand_tensor(fq_ctx *ctx, fq_device dev, int nd, const int64_t *sh, uint64_t seed, float scale,
                              float shift, fq_dtype rnd) {
    fq_tensor *t = NULL;
    if (fq_tensor_create(ctx, dev, FQ_F32, nd, sh, &t) != FQ_OK) return NULL;
    if (fq_nn_random(ctx, t, seed, scale, shift) != FQ_OK || fq_nn_cast(ctx, t, t, rnd) != FQ_OK) {
        fq_tensor_free(t);
        return NULL;
    }
    return t;
}

#define BTRY(what, expr)                                                                      \
    do {                                                                                      \
        fq_status bs_ = (expr);                                                               \
        if (bs_ != FQ_OK) {                                                                   \
            fprintf(stderr, "bench_flux: %s: %s: %s\n", what, fq_status_str(bs_), fq_ctx_error(ctx)); \
            goto out;                                                                         \
        }                                                                                     \
    } while (0)

/* Times `iters` calls of the attention op (after 2 warmups); returns ms per call. */
/* q, k, v, out in the forward's activation dtype; impl: FQ_NN_ATTN_AUTO or a forced kernel. */
static fq_tensor *as_act(fq_ctx *ctx, fq_tensor *t, fq_dtype act, fq_dtype rnd) {
    fq_tensor *r = NULL;
    if (!t || act == FQ_F32) return t;
    if (fq_tensor_create(ctx, t->buf.dev, act, t->ndim, t->shape, &r) == FQ_OK && fq_nn_cast(ctx, t, r, rnd) != FQ_OK) {
        fq_tensor_free(r);
        r = NULL;
    }
    fq_tensor_free(t);
    return r;
}

static double time_attention(fq_ctx *ctx, fq_device dev, int64_t S, int64_t H, int64_t dh, fq_dtype rnd, int impl,
                             int iters) {
    double ms = -1;
    int64_t sh[3] = {1, S, H * dh};
    const fq_dtype act = fq_nn_act_dtype(dev, rnd);
    fq_tensor *q = as_act(ctx, rand_tensor(ctx, dev, 3, sh, 11, 3.0f, 0.0f, rnd), act, rnd);
    fq_tensor *k = as_act(ctx, rand_tensor(ctx, dev, 3, sh, 12, 1.0f, 0.0f, rnd), act, rnd);
    fq_tensor *v = as_act(ctx, rand_tensor(ctx, dev, 3, sh, 13, 1.0f, 0.0f, rnd), act, rnd), *o = NULL, *scr = NULL;
    int64_t ss[1] = {fq_nn_attention_scratch(dev, 1, S, H, dh, rnd)}, sp = 0;
    if (!q || !k || !v) goto out;
    BTRY("attention plan", fq_nn_attention_plan(ctx, dev, 1, S, H, dh, rnd, act, impl, &sp)); /* cuDNN: built here */
    if (sp > ss[0]) ss[0] = sp;
    if (ss[0] < 1) ss[0] = 1;
    BTRY("attention buffers", fq_tensor_create(ctx, dev, act, 3, sh, &o));
    BTRY("attention scratch", fq_tensor_create(ctx, dev, FQ_F32, 1, ss, &scr));
    for (int i = 0; i < 2; i++) BTRY("attention", fq_nn_attention_impl(ctx, q, k, v, H, o, scr, rnd, impl));
    BTRY("sync", fq_nn_sync(ctx, dev));
    double t0 = now_ms();
    for (int i = 0; i < iters; i++) BTRY("attention", fq_nn_attention_impl(ctx, q, k, v, H, o, scr, rnd, impl));
    BTRY("sync", fq_nn_sync(ctx, dev));
    ms = (now_ms() - t0) / iters;
out:
    fq_tensor_free(q);
    fq_tensor_free(k);
    fq_tensor_free(v);
    fq_tensor_free(o);
    fq_tensor_free(scr);
    return ms;
}

#ifdef FQ_HAVE_CUDA
/* Queues cuDNN's attention over the query ranges rows[0..] (ended by 0) of
 * q, out [1, S, 24*128], each range against all S rows of k, v; under d's guard. */
static fq_status run_ranges(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype rnd, int64_t S, const int64_t *rows,
                            fq_tensor *const *qkvo, void *ws, size_t ws_bytes) {
    int64_t r0 = 0;
    for (; *rows; r0 += *rows++) {
        const size_t off = (size_t)(r0 * 24 * 128) * 2;
        int ran = 0;
        FQ_TRY(fq_attn_cudnn_run_rows(ctx, d, rnd, 1, *rows, S, 24, 128, (char *)qkvo[0]->buf.ptr + off,
                                      qkvo[1]->buf.ptr, qkvo[2]->buf.ptr, (char *)qkvo[3]->buf.ptr + off, 0, ws,
                                      ws_bytes, 1, &ran));
    }
    return FQ_OK;
}

/* cuDNN's attention at 4608 tokens (24 heads, d 128) as one call and as
 * several calls over ranges of query rows, each range against all keys and
 * values (fq_attn_cudnn_run_rows), on the same rows; for reference 4096 tokens
 * as one call. Timed alike: wall clock over `iters` repetitions of a variant
 * (after a sync), the variants interleaved round robin for `rounds` rounds
 * after ~20 ms of warm-up, the median kept; each split's bits are compared
 * with the one call's. */
enum { NRANGES = 8 }; /* variants: 7 splits of 4608 and 4096 whole */
static void attention_ranges(fq_ctx *ctx, fq_device dev, fq_dtype rnd, int rounds, int iters) {
    static const int64_t var[NRANGES][5] = {{4608},       {512, 4096},        {4096, 512},
                                            {2304, 2304}, {1536, 1536, 1536}, {1152, 1152, 1152, 1152},
                                            {3072, 1536}, {4096}};
    const int64_t S = 4608, S2 = 4096, ld = 24 * 128, nv = NRANGES;
    const fq_dtype act = fq_nn_act_dtype(dev, rnd);
    fq_cuda_dev *d = NULL;
    fq_tensor *t[8] = {0}, *scr = NULL; /* q, k, v, out of 4608 rows; the same of 4096 */
    uint16_t *ref = NULL, *got = NULL;
    double *tm = NULL;
    fq_cuda_guard g;
    int guarded = 0, same[NRANGES] = {0};
    if (act != rnd || (rnd != FQ_BF16 && rnd != FQ_F16)) return; /* cuDNN reads bf16/f16 rows in place */
    BTRY("cuda device", fq_cuda_dev_get(ctx, dev.index, &d));
    size_t ws = 0; /* every range's plan now; the largest workspace */
    for (int vi = 0; vi < nv; vi++)
        for (int j = 0; var[vi][j]; j++) {
            int ok = 0;
            size_t w = 0;
            const int64_t skv = vi == nv - 1 ? S2 : S;
            BTRY("attention range plan", fq_attn_cudnn_plan_rows(ctx, d, rnd, 1, var[vi][j], skv, 24, 128, 0, 1, &ok, &w));
            ws = w > ws ? w : ws;
        }
    for (int i = 0; i < 8; i++) {
        int64_t sh[3] = {1, i < 4 ? S : S2, ld};
        if (i % 4 == 3)
            BTRY("attention buffers", fq_tensor_create(ctx, dev, act, 3, sh, &t[i]));
        else
            t[i] = as_act(ctx, rand_tensor(ctx, dev, 3, sh, 11 + (uint64_t)i % 4, i % 4 ? 1.0f : 3.0f, 0.0f, rnd),
                          act, rnd);
        if (!t[i]) goto out;
    }
    int64_t ss[1] = {(int64_t)(ws / 4) + 64};
    BTRY("attention scratch", fq_tensor_create(ctx, dev, FQ_F32, 1, ss, &scr));
    void *wp = (void *)(((uintptr_t)scr->buf.ptr + 255) & ~(uintptr_t)255);
    const size_t wb = (size_t)ss[0] * 4 - ((uintptr_t)wp - (uintptr_t)scr->buf.ptr);
    const size_t nb = (size_t)(S * ld) * 2;
    ref = malloc(nb), got = malloc(nb);
    tm = calloc((size_t)(rounds * nv), sizeof *tm);
    if (!ref || !got || !tm) goto out;
    BTRY("guard", fq_cuda_guard_enter(ctx, dev.index, &g));
    guarded = 1;
    for (int vi = 0; vi < nv - 1; vi++) { /* the bits: every split against the one call */
        BTRY("attention ranges", run_ranges(ctx, d, rnd, S, var[vi], t, wp, wb));
        BTRY("sync", fq_nn_sync(ctx, dev));
        BTRY("attention output", fq_tensor_to_host(ctx, t[3], vi ? got : ref));
        same[vi] = !vi || !memcmp(ref, got, nb);
    }
    for (double w0 = now_ms(); now_ms() - w0 < 20;) {
        BTRY("attention ranges", run_ranges(ctx, d, rnd, S, var[0], t, wp, wb));
        BTRY("sync", fq_nn_sync(ctx, dev));
    }
    for (int r = 0; r < rounds; r++)
        for (int vi = 0; vi < nv; vi++) {
            const int sq = vi == nv - 1;
            BTRY("sync", fq_nn_sync(ctx, dev));
            const double a = now_ms();
            for (int i = 0; i < iters; i++)
                BTRY("attention ranges", run_ranges(ctx, d, rnd, sq ? S2 : S, var[vi], sq ? t + 4 : t, wp, wb));
            BTRY("sync", fq_nn_sync(ctx, dev));
            tm[vi * rounds + r] = (now_ms() - a) / iters;
        }
    printf("attention at %lld tokens as ranges of query rows (cuDNN, one call per range, each against all %lld keys; "
           "median of %d interleaved rounds of %d):\n",
           (long long)S, (long long)S, rounds, iters);
    double one = -1;
    for (int vi = 0; vi < nv; vi++) {
        double *x = tm + vi * rounds;
        qsort(x, (size_t)rounds, sizeof *x, cmp_double);
        const double ms = rounds % 2 ? x[rounds / 2] : 0.5 * (x[rounds / 2 - 1] + x[rounds / 2]);
        const int64_t sv = vi == nv - 1 ? S2 : S;
        char name[64] = "";
        int w = 0;
        for (int j = 0; var[vi][j] && w < (int)sizeof name; j++)
            w += snprintf(name + w, sizeof name - (size_t)w, "%s%lld", j ? " + " : "", (long long)var[vi][j]);
        if (vi == 0) one = ms;
        printf("  %-26s %.4f ms = %.1f TFLOP/s (min %.4f, max %.4f)", name, ms, 4.0 * sv * sv * ld / (ms * 1e9), x[0],
               x[rounds - 1]);
        if (vi == 0) printf("  one call\n");
        else if (vi < nv - 1) printf("  %.3fx the one call, %s\n", ms / one, same[vi] ? "the same bits" : "OTHER BITS");
        else printf("  %lld tokens, one call, for reference\n", (long long)S2);
    }
out:
    if (guarded) fq_cuda_guard_exit(&g);
    for (int i = 0; i < 8; i++) fq_tensor_free(t[i]);
    fq_tensor_free(scr);
    free(ref);
    free(got);
    free(tm);
}
#endif

/* Times a dense linear y[M, N] = x[M, K]·Wᵀ + b with bf16 weights through fq_nn_linear. */
static double time_dense_linear(fq_ctx *ctx, fq_device dev, int64_t M, int64_t N, int64_t K, fq_dtype rnd, int iters) {
    double ms = -1;
    int64_t xs[2] = {M, K}, ws[2] = {N, K}, ys[2] = {M, N}, bs[1] = {N};
    fq_tensor *x = rand_tensor(ctx, dev, 2, xs, 21, 1.0f, 0.0f, rnd), *w = NULL, *b = NULL, *y = NULL, *s = NULL;
    if (!x) goto out;
    BTRY("linear buffers", fq_tensor_create(ctx, dev, FQ_BF16, 2, ws, &w));
    BTRY("linear buffers", fq_tensor_create(ctx, dev, FQ_BF16, 1, bs, &b));
    BTRY("linear buffers", fq_tensor_create(ctx, dev, FQ_F32, 2, ys, &y));
    BTRY("linear weights", fq_nn_random(ctx, w, 22, 0.02f, 0.0f));
    BTRY("linear weights", fq_nn_random(ctx, b, 23, 0.02f, 0.0f));
    int64_t ss[1] = {fq_nn_linear_scratch(ctx, w, b, M, rnd)};
    if (ss[0] < 1) ss[0] = 1;
    BTRY("linear scratch", fq_tensor_create(ctx, dev, FQ_F32, 1, ss, &s));
    for (int i = 0; i < 2; i++) BTRY("linear", fq_nn_linear(ctx, x, w, b, y, s, rnd));
    BTRY("sync", fq_nn_sync(ctx, dev));
    double t0 = now_ms();
    for (int i = 0; i < iters; i++) BTRY("linear", fq_nn_linear(ctx, x, w, b, y, s, rnd));
    BTRY("sync", fq_nn_sync(ctx, dev));
    ms = (now_ms() - t0) / iters;
out:
    fq_tensor_free(x);
    fq_tensor_free(w);
    fq_tensor_free(b);
    fq_tensor_free(y);
    fq_tensor_free(s);
    return ms;
}

int fq_bench_flux(int argc, char **argv) {
    bench_opts o;
    if (!parse(argc, argv, &o)) return 2;
    fq_ctx *ctx = NULL;
    if (fq_ctx_create(&ctx) != FQ_OK) return 1;
    int rc = 1;
    fq_flux_model *m = NULL;
    fq_flux_plan *plan = NULL;
    fq_tensor *in[7] = {0}, *outp = NULL;
    fq_nn_prof *prof = NULL;
    double *times = NULL;
    fq_device dev = fq_cuda_device_count() > 0 ? FQ_CUDA(0) : FQ_CPU;
    if (o.device) BTRY("--device", fq_device_parse(ctx, o.device, &dev));
    BTRY("--device", fq_device_check(ctx, dev));
    char dn[16], card[160];
    fq_device_name(dev, dn, sizeof dn);
    BTRY("device", fq_nn_device_describe(ctx, dev, card, sizeof card));
    size_t free0 = 0, total = 0, free1 = 0;
    BTRY("cudaMemGetInfo", fq_nn_device_memory(ctx, dev, &free0, &total));
    fq_mem_reset_peak(dev);
    fq_mem_stats m0;
    fq_mem_get(dev, &m0);

    /* the model */
    double t0 = now_ms();
    char what[256];
    if (o.model) {
        fq_flux_load_params lp = fq_flux_load_default_params();
        lp.device = dev;
        lp.compute_dtype = o.dtype;
        if (o.quantize) {
            fprintf(stderr, "bench_flux: --quantize applies to --random-weights (quantize a checkpoint with fluxq quantize)\n");
            goto out;
        }
        BTRY("load", fq_flux_load(ctx, o.model, &lp, &m));
        snprintf(what, sizeof what, "%s", o.model);
    } else {
        fq_flux_config cfg;
        BTRY("--config", fq_flux_config_named(ctx, o.config, &cfg));
        fq_flux_random_params rp = fq_flux_random_default_params();
        rp.device = dev;
        rp.weight_dtype = FQ_BF16;
        rp.quantize = o.quantize != 0;
        rp.qp.type = o.quantize ? (fq_quant_type)(o.quantize - 1) : FQ_QUANT_NF4;
        rp.qp.double_quant = o.double_quant;
        rp.qp.blocksize = o.blocksize;
        rp.seed = o.seed;
        rp.compute_dtype = o.dtype;
        BTRY("random model", fq_flux_random(ctx, &cfg, &rp, &m));
        snprintf(what, sizeof what, "config %s, random weights", o.config);
    }
    const double build_ms = now_ms() - t0;
    const fq_flux_config *c = &m->cfg;
    const int64_t B = 1, St = o.txt, Si = (o.width / 16) * (o.height / 16), S = St + Si;
    char wdesc[96];
    if (m->quantized && !o.model)
        snprintf(wdesc, sizeof wdesc, "%s%s, blocksize %lld", o.quantize - 1 == FQ_QUANT_FP4 ? "fp4" : "nf4",
                 o.double_quant ? " + double quant" : "", (long long)o.blocksize);
    else snprintf(wdesc, sizeof wdesc, "%s%s", m->quantized ? "4-bit" : fq_dtype_name(m->weight_dtype),
                  m->quantized ? " (bitsandbytes)" : " dense");
    printf("fluxq bench flux: %s (%lld + %lld blocks, %lld heads x %lld), %s, compute %s\n", what,
           (long long)c->num_layers, (long long)c->num_single_layers, (long long)c->num_attention_heads,
           (long long)c->attention_head_dim, wdesc, fq_dtype_name(m->compute_dtype));
    printf("device: %s (%s)\n", dn, card);
    printf("tokens: batch %lld, %lld text + %lld image (%lldx%lld) = %lld\n", (long long)B, (long long)St,
           (long long)Si, (long long)o.width, (long long)o.height, (long long)S);
    printf("weights: %.3f GB (built in %.1f s)\n", gb((double)m->weight_bytes), build_ms / 1e3);

    /* the plan and the inputs */
    if (o.no_gemv) fq_ctx_set_linear_kernel(ctx, FQ_LINEAR_DEQUANT_BLAS);
    BTRY("plan", fq_flux_plan_create(ctx, m, B, St, Si, &plan));
    if (o.exact_gelu) fq_flux_plan_set_fused_gelu(plan, 0);
    printf("plan (activations + scratch): %.3f GB; GELU %s; 4-bit linears of <= 2 rows: %s\n",
           gb((double)fq_flux_plan_bytes(plan)),
           o.exact_gelu ? "as its own pass (exact)" : "in the GEMM epilogue where supported",
           o.no_gemv ? "dequantize + cuBLASLt" : "streaming GEMV");
    {
        const fq_dtype cd = m->compute_dtype;
        int64_t sh[3] = {B, Si, c->in_channels}, se[3] = {B, St, c->joint_attention_dim},
                sp[2] = {B, c->pooled_projection_dim}, sb[1] = {B}, si[2] = {Si, 3}, stt[2] = {St, 3};
        in[0] = rand_tensor(ctx, dev, 3, sh, 1, 1.0f, 0.0f, cd);
        in[1] = rand_tensor(ctx, dev, 3, se, 2, 1.0f, 0.0f, cd);
        in[2] = rand_tensor(ctx, dev, 2, sp, 3, 1.0f, 0.0f, cd);
        in[3] = rand_tensor(ctx, dev, 1, sb, 4, 0.0f, 0.5f, FQ_F32);
        if (c->guidance_embeds) in[4] = rand_tensor(ctx, dev, 1, sb, 5, 0.0f, 3.5f, FQ_F32);
        float *ids = calloc((size_t)(Si > St ? Si : St) * 3 + 3, sizeof(float));
        if (!ids) goto out;
        const int64_t w16 = o.width / 16;
        for (int64_t i = 0; i < Si; i++) ids[3 * i + 1] = (float)(i / w16), ids[3 * i + 2] = (float)(i % w16);
        fq_status s = fq_tensor_from_host(ctx, dev, FQ_F32, 2, si, ids, &in[5]);
        memset(ids, 0, sizeof(float) * (size_t)St * 3);
        if (s == FQ_OK) s = fq_tensor_from_host(ctx, dev, FQ_F32, 2, stt, ids, &in[6]);
        free(ids);
        BTRY("inputs", s);
        for (int i = 0; i < 7; i++)
            if (!in[i] && !(i == 4 && !c->guidance_embeds)) BTRY("inputs", FQ_ERR_OUT_OF_MEMORY);
        int64_t os[3] = {B, Si, c->out_dim};
        BTRY("output", fq_tensor_create(ctx, dev, FQ_F32, 3, os, &outp));
    }
    fq_flux_inputs fi = {in[0], in[1], in[2], in[3], in[4], in[5], in[6]};

    /* the step */
    for (int i = 0; i < o.warmup; i++) {
        BTRY("forward", fq_flux_forward(ctx, m, plan, &fi, outp));
        BTRY("sync", fq_nn_sync(ctx, dev));
    }
    times = calloc((size_t)o.iters, sizeof *times);
    if (!times) goto out;
    for (int i = 0; i < o.iters; i++) {
        double a = now_ms();
        BTRY("forward", fq_flux_forward(ctx, m, plan, &fi, outp));
        BTRY("sync", fq_nn_sync(ctx, dev));
        times[i] = now_ms() - a;
    }
    BTRY("cudaMemGetInfo", fq_nn_device_memory(ctx, dev, &free1, &total));
    qsort(times, (size_t)o.iters, sizeof *times, cmp_double);
    const double med = o.iters % 2 ? times[o.iters / 2] : 0.5 * (times[o.iters / 2 - 1] + times[o.iters / 2]);
    if (o.graph && dev.type == FQ_DEVICE_CUDA) graph_step(ctx, dev, m, plan, &fi, outp, o.iters);
    double lin_f, att_f;
    model_flops(c, B, St, Si, &lin_f, &att_f);
    printf("step (transformer forward): median %.2f ms, min %.2f ms over %d iters (%d warmup)\n", med, times[0],
           o.iters, o.warmup);
    printf("model FLOPs: %.2f TFLOP per step (linears %.2f, attention %.2f): %.1f TFLOP/s at the median\n",
           (lin_f + att_f) / 1e12, lin_f / 1e12, att_f / 1e12, (lin_f + att_f) / (med * 1e9));
    fq_mem_stats m1;
    fq_mem_get(dev, &m1);
    printf("device memory: peak %.3f GB through the allocator (%lld buffers now)", gb((double)(m1.peak - m0.current)),
           (long long)(m1.count - m0.count));
    if (total) printf("; driver: %.3f GB in use since start, %.3f GB of %.3f GB used", gb((double)free0 - (double)free1),
                      gb((double)(total - free1)), gb((double)total));
    printf("\n");

    if (o.profile && dev.type != FQ_DEVICE_CUDA) printf("profile: op timing needs a CUDA device; skipped\n");
    if (o.profile && dev.type == FQ_DEVICE_CUDA) {
        double ms[FQ_NN_CLASSES];
        int64_t ops[FQ_NN_CLASSES];
        BTRY("profiler", fq_nn_prof_create(ctx, dev, 16384, &prof));
        BTRY("profiler", fq_nn_prof_start(ctx, prof));
        BTRY("forward", fq_flux_forward(ctx, m, plan, &fi, outp));
        BTRY("profiler", fq_nn_prof_stop(ctx, prof, ms, ops));
        const double tot = ms[0] + ms[1] + ms[2];
        printf("profile (one forward, CUDA events after each op, %.2f ms in all):\n", tot);
        const char *names[FQ_NN_CLASSES] = {"linears", "attention", "rest"};
        for (int k = 0; k < FQ_NN_CLASSES; k++)
            printf("  %-10s %9.2f ms  %5.1f%%  %6lld ops\n", names[k], ms[k], tot > 0 ? 100.0 * ms[k] / tot : 0.0,
                   (long long)ops[k]);
        if (ms[0] > 0) printf("  linears: %.1f TFLOP/s; ", lin_f / (ms[0] * 1e9));
        if (ms[1] > 0) printf("attention: %.1f TFLOP/s\n", att_f / (ms[1] * 1e9));
        const char *on[64];
        double oms[64];
        int64_t oc[64];
        int no = fq_nn_prof_ops(prof, 64, on, oms, oc);
        printf("  by op:");
        for (int k = 0; k < no; k++) printf("%s %s %.2f ms (%lld)", k ? "," : "", on[k], oms[k], (long long)oc[k]);
        printf("\n");
    }

    /* baselines in the same run */
    if (dev.type == FQ_DEVICE_CUDA) {
        const fq_dtype cd = m->compute_dtype == FQ_F32 ? FQ_BF16 : m->compute_dtype;
        const int64_t H = c->num_attention_heads, dh = c->attention_head_dim, D = c->inner_dim;
        const int64_t S0 = 4608;
        fq_flux_plan_free(plan); /* make room */
        plan = NULL;
        /* cuDNN's fused kernel and ours on the same inputs, one after the other */
        const int64_t sizes[3] = {S0, 4096, 512};
        for (int si = 0; si < 3; si++) {
            const int64_t Sa = sizes[si];
            const double fl = 4.0 * Sa * Sa * 128 * 24;
            double ac = time_attention(ctx, dev, Sa, 24, 128, cd, FQ_NN_ATTN_CUDNN, 20);
            double am = time_attention(ctx, dev, Sa, 24, 128, cd, FQ_NN_ATTN_MMA, 20);
            printf("attention op, %lld tokens, 24 heads, d 128, %s (%s storage): cuDNN fused %.3f ms = %.1f TFLOP/s;"
                   " ours (mma) %.3f ms = %.1f TFLOP/s\n",
                   (long long)Sa, fq_dtype_name(cd), fq_dtype_name(fq_nn_act_dtype(dev, cd)), ac,
                   ac > 0 ? fl / (ac * 1e9) : 0.0, am, am > 0 ? fl / (am * 1e9) : 0.0);
        }
#ifdef FQ_HAVE_CUDA
        if (fq_attn_cudnn_available()) attention_ranges(ctx, dev, cd, 9, 20);
#endif
        double a0b = time_attention(ctx, dev, S0, 24, 128, cd, FQ_NN_ATTN_MMA1, 10);
        if (a0b > 0)
            printf("  the same with one query m-tile per warp (the earlier kernel): %.3f ms, %.1f TFLOP/s\n", a0b,
                   4.0 * S0 * S0 * 128 * 24 / (a0b * 1e9));
        if (S != S0 || H != 24 || dh != 128) {
            double a1 = time_attention(ctx, dev, S, H, dh, cd, FQ_NN_ATTN_AUTO, 10);
            if (a1 > 0)
                printf("attention kernel, %lld tokens, %lld heads, d %lld, %s: %.3f ms, %.1f TFLOP/s\n", (long long)S,
                       (long long)H, (long long)dh, fq_dtype_name(cd), a1, 4.0 * S * S * dh * H / (a1 * 1e9));
        }
        double l0 = time_dense_linear(ctx, dev, S, D, D, cd, 10);
        if (l0 > 0)
            printf("dense bf16-weight linear %lldx%lldx%lld (cuBLASLt + conversions, %s): %.3f ms, %.1f TFLOP/s\n",
                   (long long)S, (long long)D, (long long)D, fq_dtype_name(cd), l0, 2.0 * S * D * D / (l0 * 1e9));
    }
    rc = 0;
out:
    free(times);
    fq_nn_prof_free(prof);
    fq_tensor_free(outp);
    for (int i = 0; i < 7; i++) fq_tensor_free(in[i]);
    fq_flux_plan_free(plan);
    fq_flux_free(m);
    fq_ctx_free(ctx);
    return rc;
}

#ifdef FQ_BENCH_MAIN
int main(int argc, char **argv) { return fq_bench_flux(argc, argv); }
#endif

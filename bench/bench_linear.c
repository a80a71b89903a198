/* Benchmark of the 4-bit linear layer y = x . W^T (x bf16 [M, K], W NF4 [N, K],
 * blocksize 64, double quant by default, as in the FLUX.1 checkpoints) at the
 * FLUX.1 shapes, with the baselines measured in the same run on the same card:
 *
 *   ours      fq_linear_4bit with the automatic kernel choice (the kernel is named)
 *   cublas    cuBLASLt bf16 on a bf16 copy of W of the same shape
 *   dq+blas   fq_linear_4bit forced to FQ_LINEAR_DEQUANT_BLAS (dequantize + cuBLASLt)
 *   copy      a device-to-device cudaMemcpyAsync of 512 MiB (GB/s = read + written)
 *
 * Columns: times in microseconds; "x blas" = cublas time / ours (> 1: we are
 * faster); TFLOP/s = 2MNK / time; "W GB/s" = bytes of the weight as stored (packed
 * nibbles + absmax state for ours, bf16 for cuBLAS) / time; "W/copy" = ours' W GB/s
 * over the copy's GB/s; "target" = the goal for this M (issue 3): M=1 W/copy >= 0.85
 * and x blas >= 3; M=2,16,256,512 x blas > 1; M=4608 x blas >= 0.97.
 *
 * Timing: each measurement captures --iters calls into a CUDA graph on the
 * device's stream and reports the median over --reps replays of (replay time /
 * iters); ours, dq+blas and cublas of one case are replayed in turn, round by
 * round, so that the three see the same clock and power state (the ratio is not
 * skewed by the card warming up between them). The weights (ours and the bf16
 * copy) are rotated over enough copies to exceed 256 MiB, so that small-M runs
 * read DRAM rather than L2; --no-rotate
 * turns this off. --sweep also times every implementation and tile/split
 * configuration that can run each case (for tuning the dispatcher).
 *
 * --device cpu runs fq_linear_4bit on the CPU instead (host clock, median of
 * --iters calls, default M 1,16,256) with a memcpy bandwidth line.
 *
 * Usage: bench_linear [--device cuda:N|cpu] [--iters N] [--reps N] [--json FILE]
 *                     [--m 1,2,16,...] [--shapes NxK,...] [--fp4] [--no-dq]
 *                     [--no-rotate] [--sweep] [--quick] [--impl NAME] [--ceiling] [--l2]
 *                     [--dsmem] [--power S]
 * (--impl: sweep only that implementation's configurations, e.g. gemm4_ws;
 *  --variants impl:cfg,...: sweep only these selections, e.g. gemv4_bulk:0x1;
 *  --ceiling: at M = 1, also a kernel that only reads the weight's bytes, three
 *  ways, and a copy of them, in the same rounds as ours: the floor for M = 1;
 *  --l2: first, how fast L2 hands a 1.5 MB L2-resident range to the SMs, several ways;
 *  --dsmem: first, how fast CTAs exchange 96 KB through a cluster's shared memory and
 *  through global memory;
 *  --power S: after each case's timing, every body of the comparison (and each swept
 *  variant) replayed without pause for S seconds: energy per call from NVML's energy
 *  counter, mean power, mean SM clock and the share of samples with the clock held
 *  down by the power limit - on a power-capped card, less energy per call is speed)
 * (also: fluxq bench linear ...) */
#include "core/core.h"
#include "core/qtensor.h"
#ifdef FQ_HAVE_CUDA
#include "core/cuda_device.h"
#include "core/gpu_power.h"
#include "kernels/cuda/linear_cuda.h"
#include "ops/linear_internal.h"

#include <cublasLt.h>
#endif

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    int64_t n, k;
} bl_shape;

static const bl_shape k_shapes[] = {{3072, 3072},  {12288, 3072}, {3072, 12288}, {3072, 15360},
                                    {18432, 3072}, {21504, 3072}, {3072, 4096}};
static const int64_t k_ms[] = {1, 2, 16, 256, 512, 4608};

typedef struct {
    int64_t n, k, m;
    char impl[48];
    double us, us_blas, us_dq, tflops, wgbps, ratio, w_copy;
    double dq_bound; /* the most dequantize + cuBLASLt can reach, x cuBLASLt (CUDA rows; NAN elsewhere) */
    int target_ok;   /* -1: no target */
} bl_row;

typedef struct {
    bl_row *r;
    int n, cap;
    char card[264], device[16];
    double copy_gbps;
} bl_rows;

static void add_row(bl_rows *rs, const bl_row *r) {
    if (rs->n == rs->cap) {
        int cap = rs->cap ? rs->cap * 2 : 64;
        bl_row *nr = realloc(rs->r, (size_t)cap * sizeof *nr);
        if (!nr) return;
        rs->r = nr;
        rs->cap = cap;
    }
    rs->r[rs->n++] = *r;
}

static uint64_t g_bl_rng = 0x8badf00ddeadbeefull;
static uint32_t bl_rnd(void) {
    g_bl_rng ^= g_bl_rng << 13;
    g_bl_rng ^= g_bl_rng >> 7;
    g_bl_rng ^= g_bl_rng << 17;
    return (uint32_t)(g_bl_rng >> 16);
}
static float bl_unit(void) { return (float)(bl_rnd() >> 8) / 16777216.0f; }

static uint16_t bl_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}
static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n ? v[n / 2] : 0.0;
}

/* A random 4-bit weight [n, k] on dev (random nibbles and scales: the kernels'
 * speed does not depend on the values). */
static fq_status bl_weight(fq_ctx *ctx, fq_device dev, int64_t n, int64_t k, int fp4, int dq, fq_qtensor **out) {
    fq_qtensor_info info;
    memset(&info, 0, sizeof info);
    info.type = fp4 ? FQ_QUANT_FP4 : FQ_QUANT_NF4;
    info.blocksize = 64;
    info.double_quant = dq;
    info.orig_dtype = FQ_BF16;
    info.ndim = 2;
    info.shape[0] = n;
    info.shape[1] = k;
    info.offset = 0.01f;
    const int64_t numel = n * k, nb = (numel + 63) / 64, nnb = (nb + 255) / 256;
    uint8_t *packed = malloc((size_t)(numel + 1) / 2);
    uint8_t *q = malloc((size_t)nb * 4);
    float *nabs = malloc((size_t)nnb * 4 + 4);
    fq_status s = FQ_ERR_OUT_OF_MEMORY;
    if (packed && q && nabs) {
        for (int64_t i = 0; i < (numel + 1) / 2; i++) packed[i] = (uint8_t)bl_rnd();
        if (dq) {
            for (int64_t i = 0; i < nb; i++) q[i] = (uint8_t)bl_rnd();
        } else {
            float *a = (float *)q;
            for (int64_t i = 0; i < nb; i++) a[i] = 0.01f + 0.02f * bl_unit();
        }
        for (int64_t i = 0; i < nnb; i++) nabs[i] = 0.01f + 0.01f * bl_unit();
        const void *members[FQ_QMEMBER_COUNT] = {packed, q, fq_quant_map(info.type), dq ? nabs : NULL,
                                                 dq ? fq_dynamic_map_signed() : NULL};
        s = fq_qtensor_from_members(ctx, dev, &info, members, out);
    }
    free(packed);
    free(q);
    free(nabs);
    return s;
}

static size_t bl_weight_bytes(const fq_qtensor *q) {
    size_t b = 0;
    for (int i = 0; i < FQ_QMEMBER_COUNT; i++) b += fq_qtensor_member_bytes(q, (fq_qmember)i);
    return b;
}

static fq_status bl_tensor_random(fq_ctx *ctx, fq_device dev, fq_dtype dt, int64_t r, int64_t c, fq_tensor **out) {
    const int64_t n = r * c;
    const size_t es = fq_dtype_size(dt);
    unsigned char *h = malloc((size_t)n * es + 8);
    if (!h) return FQ_ERR_OUT_OF_MEMORY;
    for (int64_t i = 0; i < n; i++) {
        float v = 2.0f * bl_unit() - 1.0f;
        if (dt == FQ_BF16) {
            uint16_t b = bl_bf16(v);
            memcpy(h + 2 * i, &b, 2);
        } else {
            memcpy(h + 4 * i, &v, 4);
        }
    }
    int64_t shape[2] = {r, c};
    fq_status s = fq_tensor_from_host(ctx, dev, dt, 2, shape, h, out);
    free(h);
    return s;
}

static const char *target_text(int ok) { return ok < 0 ? "" : ok ? "met" : "MISSED"; }

/* A JSON number, or null for NaN/Inf (n/a). */
static const char *jnum(char *buf, size_t n, double v, int prec) {
    if (!isfinite(v)) snprintf(buf, n, "null");
    else snprintf(buf, n, "%.*f", prec, v);
    return buf;
}

static void write_json(const char *path, const bl_rows *rs) {
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "bench_linear: cannot write %s\n", path);
        return;
    }
    fprintf(f, "{\n  \"card\": \"%s\",\n  \"device\": \"%s\",\n  \"copy_gbps\": %.1f,\n  \"rows\": [\n", rs->card,
            rs->device, rs->copy_gbps);
    for (int i = 0; i < rs->n; i++) {
        const bl_row *r = &rs->r[i];
        char b[8][32];
        fprintf(f,
                "    {\"n\": %lld, \"k\": %lld, \"m\": %lld, \"impl\": \"%s\", \"us\": %s, \"us_cublas_bf16\": %s, "
                "\"us_dequant_cublas\": %s, \"x_cublas\": %s, \"tflops\": %s, \"weight_gbps\": %s, "
                "\"weight_over_copy\": %s, \"dequant_bound_x_cublas\": %s, \"target\": \"%s\"}%s\n",
                (long long)r->n, (long long)r->k, (long long)r->m, r->impl, jnum(b[0], 32, r->us, 3),
                jnum(b[1], 32, r->us_blas, 3), jnum(b[2], 32, r->us_dq, 3), jnum(b[3], 32, r->ratio, 4),
                jnum(b[4], 32, r->tflops, 3), jnum(b[5], 32, r->wgbps, 2), jnum(b[6], 32, r->w_copy, 4),
                jnum(b[7], 32, r->dq_bound, 4), target_text(r->target_ok), i + 1 < rs->n ? "," : "");
    }
    fprintf(f, "  ]\n}\n");
    fclose(f);
}

/* ---- CPU ------------------------------------------------------------------------- */

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

static int bench_cpu(fq_ctx *ctx, const bl_shape *shapes, int nshapes, const int64_t *ms, int nms, int iters, int fp4,
                     int dq, bl_rows *rs) {
    snprintf(rs->card, sizeof rs->card, "cpu (%d threads)", ctx->nthreads);
    snprintf(rs->device, sizeof rs->device, "cpu");
    {
        const size_t bytes = (size_t)256 << 20;
        char *a = malloc(bytes), *b = malloc(bytes);
        if (a && b) {
            memset(a, 1, bytes);
            memset(b, 2, bytes);
            double t[5];
            for (int i = 0; i < 5; i++) {
                double t0 = now_us();
                memcpy(b, a, bytes);
                t[i] = now_us() - t0;
            }
            rs->copy_gbps = 2.0 * (double)bytes / (median(t, 5) * 1e3);
        }
        free(a);
        free(b);
    }
    printf("card: %s   memcpy: %.1f GB/s (read + written)\n", rs->card, rs->copy_gbps);
    printf("%-12s %6s %12s %12s %9s %9s\n", "W (NxK)", "M", "ours us", "dq+blas us", "TFLOP/s", "W GB/s");
    for (int si = 0; si < nshapes; si++) {
        fq_qtensor *w = NULL;
        if (bl_weight(ctx, FQ_CPU, shapes[si].n, shapes[si].k, fp4, dq, &w) != FQ_OK) {
            fprintf(stderr, "bench_linear: weight: %s\n", fq_ctx_error(ctx));
            return 1;
        }
        const size_t wb = bl_weight_bytes(w);
        for (int mi = 0; mi < nms; mi++) {
            const int64_t m = ms[mi], n = shapes[si].n, k = shapes[si].k;
            fq_tensor *x = NULL, *y = NULL;
            int64_t ys[2] = {m, n};
            if (bl_tensor_random(ctx, FQ_CPU, FQ_BF16, m, k, &x) != FQ_OK ||
                fq_tensor_create(ctx, FQ_CPU, FQ_BF16, 2, ys, &y) != FQ_OK) {
                fprintf(stderr, "bench_linear: %s\n", fq_ctx_error(ctx));
                fq_tensor_free(x);
                fq_qtensor_free(w);
                return 1;
            }
            double tt[2] = {0, 0};
            for (int kind = 0; kind < 2; kind++) {
                fq_ctx_set_linear_kernel(ctx, kind ? FQ_LINEAR_DEQUANT_BLAS : FQ_LINEAR_AUTO);
                double *t = malloc(sizeof(double) * (size_t)(iters + 1));
                int n_ok = 0;
                for (int i = 0; t && i <= iters; i++) {
                    double t0 = now_us();
                    fq_status s = fq_linear_4bit(ctx, x, w, NULL, y);
                    double dt = now_us() - t0;
                    if (s != FQ_OK) {
                        fprintf(stderr, "bench_linear: %s\n", fq_ctx_error(ctx));
                        break;
                    }
                    if (i) t[n_ok++] = dt; /* first call: warm-up */
                }
                tt[kind] = n_ok ? median(t, n_ok) : NAN;
                free(t);
            }
            fq_ctx_set_linear_kernel(ctx, FQ_LINEAR_AUTO);
            bl_row r;
            memset(&r, 0, sizeof r);
            r.n = n;
            r.k = k;
            r.m = m;
            snprintf(r.impl, sizeof r.impl, "cpu auto");
            r.us = tt[0];
            r.us_dq = tt[1];
            r.us_blas = NAN;
            r.ratio = NAN;
            r.dq_bound = NAN;
            r.tflops = 2.0 * (double)m * (double)n * (double)k / (r.us * 1e6);
            r.wgbps = (double)wb / (r.us * 1e3);
            r.w_copy = rs->copy_gbps > 0 ? r.wgbps / rs->copy_gbps : 0;
            r.target_ok = -1;
            add_row(rs, &r);
            char sh[32];
            snprintf(sh, sizeof sh, "%lldx%lld", (long long)n, (long long)k);
            printf("%-12s %6lld %12.1f %12.1f %9.3f %9.1f\n", sh, (long long)m, r.us, r.us_dq, r.tflops, r.wgbps);
            fflush(stdout);
            fq_tensor_free(x);
            fq_tensor_free(y);
        }
        fq_qtensor_free(w);
    }
    return 0;
}

#ifdef FQ_HAVE_CUDA
/* ---- GPU ------------------------------------------------------------------------- */

typedef struct bl_gpu bl_gpu;
typedef fq_status (*bl_body)(bl_gpu *g, void *arg, int i);

struct bl_gpu {
    fq_ctx *ctx;
    int dev;
    fq_cuda_dev *d;
    cudaEvent_t ev0, ev1;
};

/* One body captured as a graph of `iters` calls; exec NULL: capture failed and the
 * calls run as a plain loop. */
typedef struct {
    bl_body body;
    void *arg;
    cudaGraphExec_t exec;
    int ok;
} bl_timed;

/* A call outside any capture (module load, scratch growth, heuristics): every body
 * of a comparison runs this before any is captured, since a graph keeps the scratch
 * pointers of its capture and a later growth would free them. */
static void bl_warm(bl_gpu *g, bl_timed *t) {
    t->exec = NULL;
    t->ok = t->body(g, t->arg, 0) == FQ_OK && cudaStreamSynchronize(g->d->stream) == cudaSuccess;
    if (!t->ok) fprintf(stderr, "bench_linear: %s\n", fq_ctx_error(g->ctx));
}

static void bl_capture(bl_gpu *g, int iters, bl_timed *t) {
    cudaStream_t st = g->d->stream;
    if (!t->ok) return;
    cudaGraph_t graph = NULL;
    int captured = cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
    for (int i = 0; captured && i < iters; i++)
        if (t->body(g, t->arg, i) != FQ_OK) captured = 0;
    if (cudaStreamEndCapture(st, &graph) != cudaSuccess) captured = 0;
    if (captured && cudaGraphInstantiate(&t->exec, graph, 0) != cudaSuccess) t->exec = NULL;
    if (graph) cudaGraphDestroy(graph);
    (void)cudaGetLastError();
}

/* Microseconds per call of one replay of t (NAN on error). */
static double bl_replay(bl_gpu *g, int iters, const bl_timed *t) {
    cudaStream_t st = g->d->stream;
    cudaError_t e = cudaEventRecord(g->ev0, st);
    if (t->exec) {
        if (e == cudaSuccess) e = cudaGraphLaunch(t->exec, st);
    } else {
        for (int i = 0; e == cudaSuccess && i < iters; i++)
            if (t->body(g, t->arg, i) != FQ_OK) e = cudaErrorUnknown;
    }
    if (e == cudaSuccess) e = cudaEventRecord(g->ev1, st);
    if (e == cudaSuccess) e = cudaEventSynchronize(g->ev1);
    float ms = 0;
    if (e == cudaSuccess) e = cudaEventElapsedTime(&ms, g->ev0, g->ev1);
    if (e != cudaSuccess) {
        fprintf(stderr, "bench_linear: timing failed: %s\n", cudaGetErrorString(e));
        return NAN;
    }
    return (double)ms * 1e3 / iters;
}

/* Median microseconds per call of each of the n bodies: each captured as a graph of
 * `iters` calls, then `reps` rounds in which every graph is replayed once, in turn,
 * so that all see the same clock and power state (after one round of warm-up). */
static void bl_time_n(bl_gpu *g, int iters, int reps, bl_timed *t, int n, double *us) {
    fq_cuda_guard gd;
    for (int v = 0; v < n; v++) us[v] = NAN;
    if (fq_cuda_guard_enter(g->ctx, g->dev, &gd) != FQ_OK) return;
    for (int v = 0; v < n; v++) bl_warm(g, &t[v]);
    for (int v = 0; v < n; v++) bl_capture(g, iters, &t[v]);
    double *tm = malloc(sizeof(double) * (size_t)(n * (reps + 1)));
    int *cnt = calloc((size_t)n, sizeof(int));
    for (int r = 0; tm && cnt && r <= reps; r++)
        for (int v = 0; v < n; v++) {
            if (!t[v].ok) continue;
            const double x = bl_replay(g, iters, &t[v]);
            if (r && !isnan(x)) tm[v * (reps + 1) + cnt[v]++] = x; /* round 0: warm-up */
        }
    for (int v = 0; tm && cnt && v < n; v++) {
        if (cnt[v]) us[v] = median(tm + v * (reps + 1), cnt[v]);
        if (t[v].exec) cudaGraphExecDestroy(t[v].exec);
    }
    free(tm);
    free(cnt);
    fq_cuda_guard_exit(&gd);
}

/* Median microseconds per body call (bl_time_n of one body). NAN on error. */
static double bl_time(bl_gpu *g, int iters, int reps, bl_body body, void *arg) {
    bl_timed t = {body, arg, NULL, 0};
    double us;
    bl_time_n(g, iters, reps, &t, 1, &us);
    return us;
}

/* --power: seconds each body is replayed for (0: off), and the card's NVML handle. */
static double g_power_s;
static fq_gpu_power *g_power;

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Replays t's graph back to back (two replays in flight) for g_power_s seconds after a
 * warm-up of a third of that, and prints one line: time and energy per call (NVML's
 * energy counter read before and after), mean power, and from samples taken at most
 * every 20 ms between replays the mean SM clock and the share of samples in which the
 * power limit held the clock down. */
static void bl_power_line(bl_gpu *g, int iters, bl_timed *t, const char *name, double macs) {
    fq_cuda_guard gd;
    if (fq_cuda_guard_enter(g->ctx, g->dev, &gd) != FQ_OK) return;
    cudaStream_t st = g->d->stream;
    cudaEvent_t ev[3] = {NULL, NULL, NULL};
    int ok = 1;
    for (int i = 0; i < 3; i++) ok = ok && cudaEventCreateWithFlags(&ev[i], cudaEventDisableTiming) == cudaSuccess;
    bl_warm(g, t);
    bl_capture(g, iters, t);
    if (!ok || !t->ok || !t->exec) {
        printf("    power %-34s failed (%s)\n", name, !ok ? "cudaEventCreate" : "no graph");
        ok = 0;
    }
    fq_gpu_power_sample s0, s1, s;
    double mhz = 0, t0 = 0, t1 = 0;
    long samples = 0, capped = 0, replays = 0;
    for (int phase = 0; ok && phase < 2; phase++) { /* 0: warm-up, 1: measured */
        const double dur = phase ? g_power_s : g_power_s / 3.0;
        if (phase) {
            if (fq_gpu_power_read(g->ctx, g_power, &s0) != FQ_OK) {
                printf("    power %-34s failed (%s)\n", name, fq_ctx_error(g->ctx));
                ok = 0;
                break;
            }
            t0 = mono_s();
        }
        const double start = mono_s();
        double last = start;
        long n = 0;
        cudaError_t e = cudaSuccess;
        for (;;) {
            if (e == cudaSuccess) e = cudaGraphLaunch(t->exec, st);
            if (e == cudaSuccess) e = cudaEventRecord(ev[n % 3], st);
            n++;
            if (e == cudaSuccess && n >= 2) e = cudaEventSynchronize(ev[(n - 2) % 3]);
            if (e != cudaSuccess) break;
            const double now = mono_s();
            if (phase && now - last >= 0.02 && fq_gpu_power_read(g->ctx, g_power, &s) == FQ_OK) {
                last = now;
                samples++;
                mhz += s.sm_mhz;
                if (s.reasons & FQ_GPU_SLOW_SW_POWER_CAP) capped++;
            }
            if (now - start >= dur) break;
        }
        if (e == cudaSuccess) e = cudaEventSynchronize(ev[(n - 1) % 3]);
        if (e != cudaSuccess) {
            printf("    power %-34s failed (%s)\n", name, cudaGetErrorString(e));
            ok = 0;
            break;
        }
        if (phase) {
            t1 = mono_s();
            replays = n;
            if (fq_gpu_power_read(g->ctx, g_power, &s1) != FQ_OK) {
                printf("    power %-34s failed (%s)\n", name, fq_ctx_error(g->ctx));
                ok = 0;
            }
        }
    }
    if (ok) {
        const double calls = (double)replays * iters, secs = t1 - t0;
        const double mj = (double)(s1.energy_mj - s0.energy_mj);
        printf("    power %-34s %9.2f us/call %7.1f W %9.4f mJ/call %7.3f pJ/MAC  SM %5.0f MHz  power-capped %3.0f%%\n",
               name, secs * 1e6 / calls, mj / secs * 1e-3, mj / calls, mj * 1e9 / (calls * macs),
               samples ? mhz / samples : 0.0, samples ? 100.0 * capped / samples : 0.0);
        fflush(stdout);
    }
    if (t->exec) cudaGraphExecDestroy(t->exec);
    t->exec = NULL;
    for (int i = 0; i < 3; i++)
        if (ev[i]) cudaEventDestroy(ev[i]);
    fq_cuda_guard_exit(&gd);
}

typedef struct {
    fq_qtensor **w;
    int nw;
    fq_tensor *x, *y;
    int sel; /* fq_linear_kernel, or FQ_LIN4_SELECT(...) through fq_linear4_cuda */
} ours_arg;

static fq_status body_ours(bl_gpu *g, void *arg, int i) {
    ours_arg *a = arg;
    g->ctx->linear_kernel = a->sel;
    fq_status s = a->sel >= FQ_LIN4_EXACT
                      ? fq_linear4_cuda(g->ctx, a->x, a->w[i % a->nw], NULL, a->y, a->x->shape[0])
                      : fq_linear_4bit(g->ctx, a->x, a->w[i % a->nw], NULL, a->y);
    g->ctx->linear_kernel = FQ_LINEAR_AUTO;
    return s;
}

typedef struct {
    cublasLtHandle_t h;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;
    fq_buffer *wb; /* bf16 [n, k] copies */
    int nw;
    fq_tensor *x, *y;
    void *ws;
    size_t ws_bytes;
} blas_arg;

static fq_status body_blas(bl_gpu *g, void *arg, int i) {
    blas_arg *a = arg;
    const float alpha = 1.0f, beta = 0.0f;
    cublasStatus_t st = cublasLtMatmul(a->h, a->op, &alpha, a->wb[i % a->nw].ptr, a->la, a->x->buf.ptr, a->lb, &beta,
                                       a->y->buf.ptr, a->lc, a->y->buf.ptr, a->lc, &a->algo, a->ws, a->ws_bytes,
                                       g->d->stream);
    if (st != CUBLAS_STATUS_SUCCESS)
        return fq_err(g->ctx, FQ_ERR_CUDA, "cublasLtMatmul: %s", cublasLtGetStatusString(st));
    return FQ_OK;
}

static fq_status blas_setup(bl_gpu *g, blas_arg *a, int64_t m, int64_t n, int64_t k) {
    struct cublasLtContext *h;
    FQ_TRY(fq_cuda_dev_blaslt(g->ctx, g->d, &h));
    a->h = h;
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulHeuristicResult_t res;
    int nres = 0;
    const uint64_t wsz = a->ws_bytes;
    cublasStatus_t st = cublasLtMatmulDescCreate(&a->op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    if (!st) st = cublasLtMatmulDescSetAttribute(a->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
    if (!st) st = cublasLtMatmulDescSetAttribute(a->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
    if (!st) st = cublasLtMatrixLayoutCreate(&a->la, CUDA_R_16BF, (uint64_t)k, (uint64_t)n, k);
    if (!st) st = cublasLtMatrixLayoutCreate(&a->lb, CUDA_R_16BF, (uint64_t)k, (uint64_t)m, k);
    if (!st) st = cublasLtMatrixLayoutCreate(&a->lc, CUDA_R_16BF, (uint64_t)n, (uint64_t)m, n);
    if (!st) st = cublasLtMatmulPreferenceCreate(&pref);
    if (!st)
        st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsz, sizeof wsz);
    if (!st) st = cublasLtMatmulAlgoGetHeuristic(a->h, a->op, a->la, a->lb, a->lc, a->lc, pref, 1, &res, &nres);
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (st || nres < 1)
        return fq_err(g->ctx, FQ_ERR_CUDA, "cuBLASLt setup: %s", st ? cublasLtGetStatusString(st) : "no algorithm");
    a->algo = res.algo;
    return FQ_OK;
}

static void blas_teardown(blas_arg *a) {
    if (a->lc) cublasLtMatrixLayoutDestroy(a->lc);
    if (a->lb) cublasLtMatrixLayoutDestroy(a->lb);
    if (a->la) cublasLtMatrixLayoutDestroy(a->la);
    if (a->op) cublasLtMatmulDescDestroy(a->op);
}

/* Two buffers on g's device (a, b zero-initialized): 1, or 0 with neither kept and, when
 * `what` is not NULL, the error printed under that name. */
static int alloc_two(bl_gpu *g, const char *what, size_t bytes_a, fq_buffer *a, size_t bytes_b, fq_buffer *b) {
    if (fq_buf_alloc(g->ctx, FQ_CUDA(g->dev), bytes_a, a) == FQ_OK &&
        fq_buf_alloc(g->ctx, FQ_CUDA(g->dev), bytes_b, b) == FQ_OK)
        return 1;
    if (what) fprintf(stderr, "bench_linear: %s: %s\n", what, fq_ctx_error(g->ctx));
    fq_buf_free(a);
    return 0;
}

static double copy_bandwidth(bl_gpu *g) {
    const size_t bytes = (size_t)512 << 20;
    fq_buffer a = {0}, b = {0};
    double gbps = 0;
    if (!alloc_two(g, NULL, bytes, &a, bytes, &b)) return 0;
    fq_cuda_guard gd;
    if (fq_cuda_guard_enter(g->ctx, g->dev, &gd) == FQ_OK) {
        double t[10];
        int n = 0;
        (void)cudaMemsetAsync(a.ptr, 1, bytes, g->d->stream);
        for (int i = 0; i < 11; i++) {
            float ms = 0;
            cudaError_t e = cudaEventRecord(g->ev0, g->d->stream);
            if (e == cudaSuccess) e = cudaMemcpyAsync(b.ptr, a.ptr, bytes, cudaMemcpyDeviceToDevice, g->d->stream);
            if (e == cudaSuccess) e = cudaEventRecord(g->ev1, g->d->stream);
            if (e == cudaSuccess) e = cudaEventSynchronize(g->ev1);
            if (e == cudaSuccess) e = cudaEventElapsedTime(&ms, g->ev0, g->ev1);
            if (e != cudaSuccess) break;
            if (i) t[n++] = ms * 1e3;
        }
        if (n) gbps = 2.0 * (double)bytes / (median(t, n) * 1e3);
        fq_cuda_guard_exit(&gd);
    }
    fq_buf_free(&a);
    fq_buf_free(&b);
    return gbps;
}

static int target_for(int64_t m, double ratio, double w_copy) {
    if (m == 1) return w_copy >= 0.85 && ratio >= 3.0;
    if (m == 2 || m == 16 || m == 256 || m == 512) return ratio > 1.0;
    if (m == 4608) return ratio >= 0.97;
    return -1;
}

static const char *g_sweep_only; /* --impl NAME: sweep only this implementation */

/* --variants impl:cfg,...: sweep only these selections (e.g. gemv4_bulk:0x1,gemv4_tc:0). */
static struct { int impl, cfg; } g_variants[32];
static int g_nvariants;

static int parse_variants(const char *s) {
    g_nvariants = 0;
    while (*s && g_nvariants < 32) {
        const char *colon = strchr(s, ':');
        if (!colon) return -1;
        int impl = -1;
        for (int i = FQ_LIN4_GEMV_SIMPLE; i < FQ_LIN4_COUNT; i++) {
            const char *nm = fq_lin4_impl_name((fq_lin4_impl)i);
            if (strlen(nm) == (size_t)(colon - s) && !strncmp(nm, s, (size_t)(colon - s))) impl = i;
        }
        char *end;
        const long cfg = strtol(colon + 1, &end, 0);
        if (impl < 0 || end == colon + 1 || cfg < 0 || cfg > 255 || (*end && *end != ',')) return -1;
        g_variants[g_nvariants].impl = impl;
        g_variants[g_nvariants].cfg = (int)cfg;
        g_nvariants++;
        s = *end ? end + 1 : end;
    }
    return g_nvariants;
}

/* Every implementation x configuration that can run the case, for tuning; each
 * timed in turn with cuBLASLt (ba, when set up) and compared with that time. */
/* FQ_WS_STAMPS set (with FQ_WS_PROBE=64, in a WS_PROBES build): one more call of the
 * selection, then gemm4_ws's per-CTA timeline (docs/linear-cuda.md): for each stamp,
 * how many CTAs reached it and the min / median / max time since the first CTA began. */
static int cmp_u64(const void *a, const void *b) {
    const unsigned long long x = *(const unsigned long long *)a, y = *(const unsigned long long *)b;
    return x < y ? -1 : x > y;
}
static void ws_timeline(bl_gpu *g, ours_arg *oa) {
    enum { SL = 16 };
    const int ctas = g->d->sm_count, n = ctas * SL;
    unsigned long long *st = calloc((size_t)n, sizeof *st), *col = calloc((size_t)ctas, sizeof *col);
    fq_cuda_guard gd;
    int e = !st || !col || fq_cuda_guard_enter(g->ctx, g->dev, &gd) != FQ_OK;
    if (!e) {
        e = fq_cuda_gemm4_ws_stamps(NULL, n) != 0 || body_ours(g, oa, 0) != FQ_OK ||
            cudaStreamSynchronize(g->d->stream) != cudaSuccess || fq_cuda_gemm4_ws_stamps(st, n) != 0;
        fq_cuda_guard_exit(&gd);
    }
    unsigned long long t0 = 0;
    for (int b = 0; !e && b < ctas; b++)
        if (st[b * SL] && (!t0 || st[b * SL] < t0)) t0 = st[b * SL];
    static const char *what[4] = {"start", "last MMA", "publish/collect", "store"};
    for (int sl = 0; !e && t0 && sl < SL; sl++) {
        int c = 0;
        for (int b = 0; b < ctas; b++)
            if (st[b * SL + sl] >= t0) col[c++] = st[b * SL + sl] - t0;
        if (!c) continue;
        qsort(col, (size_t)c, sizeof *col, cmp_u64);
        char label[40];
        if (sl == 0) snprintf(label, sizeof label, "consumers begin");
        else snprintf(label, sizeof label, "segment %d %s", (sl - 1) / 4, what[(sl - 1) % 4]);
        printf("      timeline %-26s %3d CTAs  min %7.2f  median %7.2f  max %7.2f us\n", label, c, col[0] * 1e-3,
               col[c / 2] * 1e-3, col[c - 1] * 1e-3);
    }
    if (e || !t0) printf("      timeline: not available (a WS_PROBES build with FQ_WS_PROBE=64)\n");
    free(st);
    free(col);
}

static void sweep_case(bl_gpu *g, ours_arg *oa, blas_arg *ba, int iters, int reps, double us_blas, int64_t m,
                       int64_t n, int64_t k) {
    static const int gemv_cfg[] = {1, 2, 4, 8, 0x11, 0x12, 0x14, 0x18};
    static const int wg_splits[] = {1, 2, 3, 4, 6, 8, 12};
    for (int impl = FQ_LIN4_GEMV_SIMPLE; impl < FQ_LIN4_COUNT; impl++) {
        int cfgs[64], nc = 0;
        cfgs[nc++] = 0;
        if (impl == FQ_LIN4_GEMV_TC)
            for (int i = 0; i < 8; i++) cfgs[nc++] = gemv_cfg[i];
        if (impl == FQ_LIN4_GEMV_STREAM) /* decode (exact, hmul, loads only) x batch x K slices */
            for (int d = 1; d <= 3; d++)
                for (int u = 0; u < 2; u++)
                    for (int ks = 0; ks <= 8; ks = ks ? ks * 2 : 1) cfgs[nc++] = d << 5 | u << 4 | ks;
        if (impl == FQ_LIN4_GEMM_MMA)
            for (int i = 1; i <= FQ_GEMM4_MMA_CONFIGS; i++) cfgs[nc++] = i;
        if (impl == FQ_LIN4_GEMM_WS) /* x rows per tile x K splits (large M: no split) */
            for (int t = 1; t <= FQ_GEMM4_WS_CONFIGS; t++) {
                if (t == 6 || t == 7) continue; /* retired numbers */
                for (int s = 1; s <= (m >= 2048 ? 1 : 4); s *= 2) cfgs[nc++] = t | s << 4;
                cfgs[nc++] = t | 0xf0; /* stream-K */
            }
        if (impl == FQ_LIN4_GEMM_WGMMA)
            for (int t = 1; t <= FQ_GEMM4_WGMMA_CONFIGS; t++)
                for (int s = 0; s < 7; s++) cfgs[nc++] = t | wg_splits[s] << 4;
        if (g_sweep_only && strcmp(g_sweep_only, fq_lin4_impl_name((fq_lin4_impl)impl)) != 0) continue;
        if (g_nvariants) { /* only the listed selections */
            nc = 0;
            for (int v = 0; v < g_nvariants; v++)
                if (g_variants[v].impl == impl) cfgs[nc++] = g_variants[v].cfg;
            if (!nc) continue;
        }
        if (!fq_linear4_cuda_can_run(g->ctx, (fq_lin4_impl)impl, oa->x, oa->w[0], oa->y)) continue;
        if (m <= 16 && impl != FQ_LIN4_GEMV_TC && impl != FQ_LIN4_GEMV_STREAM && impl != FQ_LIN4_GEMV_BULK &&
            !g_nvariants)
            continue; /* small M: GEMVs only */
        if (impl == FQ_LIN4_GEMV_SIMPLE && m * n * k > ((int64_t)1 << 33)) continue; /* too slow to matter */
        for (int c = 0; c < nc; c++) {
            oa->sel = FQ_LIN4_SELECT(impl, cfgs[c]);
            bl_timed tv[2] = {{body_ours, oa, NULL, 0}, {body_blas, ba, NULL, 0}};
            double tus[2] = {NAN, us_blas};
            bl_time_n(g, iters, reps, tv, ba ? 2 : 1, tus);
            const double us = tus[0];
            if (ba) us_blas = tus[1];
            char name[64];
            if (impl == FQ_LIN4_GEMM_MMA) snprintf(name, sizeof name, "%s", fq_cuda_gemm4_mma_config_name(cfgs[c]));
            else if (impl == FQ_LIN4_GEMM_WS && (cfgs[c] >> 4) == 15)
                snprintf(name, sizeof name, "%s stream-K", fq_cuda_gemm4_ws_config_name(cfgs[c]));
            else if (impl == FQ_LIN4_GEMM_WS)
                snprintf(name, sizeof name, "%s split %d", fq_cuda_gemm4_ws_config_name(cfgs[c]), cfgs[c] >> 4);
            else if (impl == FQ_LIN4_GEMM_WGMMA)
                snprintf(name, sizeof name, "%s split %d", fq_cuda_gemm4_wgmma_config_name(cfgs[c]), cfgs[c] >> 4);
            else snprintf(name, sizeof name, "%s cfg 0x%x", fq_lin4_impl_name((fq_lin4_impl)impl), cfgs[c]);
            printf("    sweep %-34s %10.2f us  x blas %6.3f  %8.1f TFLOP/s  (cublas %.2f us%s)\n", name, us,
                   us_blas / us, 2.0 * (double)m * (double)n * (double)k / (us * 1e6), us_blas,
                   ba ? ", same rounds" : "");
            if (impl == FQ_LIN4_GEMM_WS && getenv("FQ_WS_STAMPS")) ws_timeline(g, oa);
            if (g_power_s > 0) {
                bl_timed tp = {body_ours, oa, NULL, 0};
                bl_power_line(g, iters, &tp, name, (double)m * (double)n * (double)k);
            }
        }
    }
    oa->sel = FQ_LINEAR_AUTO;
}

/* --ceiling: what a kernel that only reads the weight's bytes reaches per call. */
typedef struct {
    fq_qtensor **w;
    int nw;
    size_t bytes;
    int mode; /* 0..3: stream_probe modes; 4: cudaMemcpyAsync into dst */
    void *dst;
    unsigned *sink;
} probe_arg;

static fq_status body_probe(bl_gpu *g, void *arg, int i) {
    probe_arg *a = arg;
    const void *src = a->w[i % a->nw]->buf.ptr;
    int e = a->mode < 4 ? fq_cuda_stream_probe(src, a->bytes, a->sink, a->mode, g->d->sm_count, g->d->stream)
                        : (int)cudaMemcpyAsync(a->dst, src, a->bytes, cudaMemcpyDeviceToDevice, g->d->stream);
    if (e != 0) return fq_err(g->ctx, FQ_ERR_CUDA, "stream probe: %s", cudaGetErrorString((cudaError_t)e));
    return FQ_OK;
}

/* One line per shape: the probe modes and a copy of the weight's bytes, timed in
 * turn with our M = 1 call (same rounds), against 0.85 of the copy figure. */
static void ceiling_case(bl_gpu *g, ours_arg *oa, size_t wbytes, int iters, int reps, double copy_gbps) {
    fq_buffer dst = {0}, sink = {0};
    if (!alloc_two(g, "ceiling", wbytes, &dst, 64, &sink)) return;
    enum { NP = 5 };
    probe_arg pa[NP];
    bl_timed tv[NP + 1];
    for (int v = 0; v < NP; v++) {
        pa[v] = (probe_arg){oa->w, oa->nw, wbytes & ~(size_t)15, v, dst.ptr, sink.ptr};
        tv[v] = (bl_timed){body_probe, &pa[v], NULL, 0};
    }
    tv[NP] = (bl_timed){body_ours, oa, NULL, 0};
    double us[NP + 1];
    bl_time_n(g, iters, reps, tv, NP + 1, us);
    static const char *names[NP] = {"read-only plain", "read-only PDL", "read-only PDL, loads before wait",
                                    "same, blocks not co-resident", "cudaMemcpy of W"};
    const double need = (double)wbytes / (0.85 * copy_gbps * 1e3);
    printf("    ceiling: W %.2f MB; 0.85 of copy = %.2f us; ours %.2f us (%.3f of copy)\n", (double)wbytes / 1e6, need,
           us[NP], (double)wbytes / (us[NP] * 1e3) / copy_gbps);
    for (int v = 0; v < NP; v++) {
        const int cp = v == NP - 1;
        const double gbps = (double)wbytes * (cp ? 2.0 : 1.0) / (us[v] * 1e3);
        printf("    ceiling %-34s %8.2f us  %7.1f GB/s%s  %.3f of copy  %s\n", names[v], us[v], gbps,
               cp ? " (r+w)" : "", gbps / copy_gbps, cp ? "" : us[v] <= need ? "reaches 0.85" : "below 0.85");
    }
    fq_buf_free(&dst);
    fq_buf_free(&sink);
}

/* One launch of a probe (l2_case, dsmem_case) with its arguments; a cudaError_t. */
typedef int (*bl_probe_fn)(bl_gpu *g, const void *arg);

/* *us: the median of 5 launches of fn after one warm-up, each timed between two events;
 * returns a cudaError_t (0: *us is set). */
static int probe_median_us(bl_gpu *g, bl_probe_fn fn, const void *arg, double *us) {
    double t[5];
    int n = 0, e = 0;
    for (int r = 0; r < 6 && !e; r++) {
        float ms = 0;
        e = (int)cudaEventRecord(g->ev0, g->d->stream);
        if (!e) e = fn(g, arg);
        if (!e) e = (int)cudaEventRecord(g->ev1, g->d->stream);
        if (!e) e = (int)cudaEventSynchronize(g->ev1);
        if (!e) e = (int)cudaEventElapsedTime(&ms, g->ev0, g->ev1);
        if (!e && r) t[n++] = ms * 1e3;
    }
    if (!e) *us = median(t, n);
    return e;
}

typedef struct {
    void *buf, *scratch;
    unsigned *sink;
    size_t bytes;
    int reps, how, blocks, cluster;
} bl_probe_args;

static int l2_launch(bl_gpu *g, const void *arg) {
    const bl_probe_args *a = arg;
    return fq_cuda_l2_probe(a->buf, a->bytes, a->reps, a->how, a->blocks, a->sink, g->d->cc_major, g->d->stream);
}

static int dsmem_launch(bl_gpu *g, const void *arg) {
    const bl_probe_args *a = arg;
    return fq_cuda_dsmem_probe(a->bytes, a->reps, a->cluster, a->how, a->blocks, a->scratch, a->sink, g->d->cc_major,
                               g->d->stream);
}

/* --l2: how fast L2 hands an L2-resident range to the SMs (stream_probe.cu): the range
 * is x at M = 256, K = 3072 (1.5 MB), which every CTA of the 4-bit GEMMs reads whole once
 * per W tile; each variant's GB/s counts blocks x bytes x reps over the median of 5 runs. */
static void l2_case(bl_gpu *g) {
    const size_t bytes = (size_t)256 * 3072 * 2;
    const int reps = 16;
    fq_buffer buf = {0}, sink = {0};
    if (!alloc_two(g, "l2", bytes, &buf, 64, &sink)) return;
    const int sms = g->d->sm_count;
    const struct {
        int how, blocks;
        const char *name;
    } v[] = {{0, 2 * sms, "16-byte loads, 2 blocks per SM"},
             {1, sms, "bulk copies, every SM"},
             {1, sms * 96 / 132, "bulk copies, 96/132 of the SMs"},
             {1, sms / 2, "bulk copies, half the SMs"},
             {2, sms, "bulk copies, every SM, in step"}};
    fq_cuda_guard gd;
    if (fq_cuda_guard_enter(g->ctx, g->dev, &gd) == FQ_OK) {
        (void)cudaMemsetAsync(buf.ptr, 1, bytes, g->d->stream);
        for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
            if (v[i].how > 0 && g->d->cc_major < 9) continue;
            const bl_probe_args pa = {buf.ptr, NULL, sink.ptr, bytes, reps, v[i].how, v[i].blocks, 1};
            double us = 0;
            const int e = probe_median_us(g, l2_launch, &pa, &us);
            if (e) {
                fprintf(stderr, "bench_linear: l2 probe: %s\n", cudaGetErrorString((cudaError_t)e));
                break;
            }
            const double total = (double)bytes * reps * v[i].blocks;
            printf("l2 probe %-34s %4d blocks: %8.1f us  %7.1f GB/s out of L2  (%.1f GB/s per block)\n", v[i].name,
                   v[i].blocks, us, total / (us * 1e3), total / (us * 1e3) / v[i].blocks);
        }
        fq_cuda_guard_exit(&gd);
    }
    fq_buf_free(&buf);
    fq_buf_free(&sink);
}

/* --dsmem: how fast CTAs exchange a split-K partial (stream_probe.cu): 96 KB per block,
 * the (splits - 1) / splits = 3/4 of a 128 x 256 f32 tile that a 4-way split reduced
 * inside a cluster would send, through the shared memory of the next CTA of a cluster of
 * 1 (its own), 2 or 4 (16-byte stores from 256 threads, or bulk copies from the block's own
 * shared memory), and through global memory (written by 16-byte stores or by bulk copies
 * from shared memory, as a TMA-stored partial would be, then another block's read; and the
 * writes alone). The time per exchange includes the barriers and 1/20 of a launch. */
static void dsmem_case(bl_gpu *g) {
    const size_t bytes = (size_t)96 << 10;
    const int reps = 20, sms = g->d->sm_count;
    if (g->d->cc_major < 9) return;
    fq_buffer scratch = {0}, sink = {0};
    if (!alloc_two(g, "dsmem", bytes * (size_t)sms, &scratch, 64, &sink)) return;
    const struct {
        int how, cluster;
        const char *name;
    } v[] = {{0, 1, "own shared memory (cluster of 1)"},
             {0, 2, "next CTA's, cluster of 2"},
             {0, 4, "next CTA's, cluster of 4"},
             {2, 2, "bulk copies to the next CTA, cluster of 2"},
             {2, 4, "bulk copies to the next CTA, cluster of 4"},
             {1, 1, "global memory, another block's slot"},
             {3, 1, "global memory, written by bulk copies"},
             {4, 1, "global memory, the writes alone"},
             {5, 1, "global memory, bulk-copy writes alone"}};
    fq_cuda_guard gd;
    if (fq_cuda_guard_enter(g->ctx, g->dev, &gd) == FQ_OK) {
        for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
            const int blocks = sms / v[i].cluster * v[i].cluster;
            const bl_probe_args pa = {NULL, scratch.ptr, sink.ptr, bytes, reps, v[i].how, blocks, v[i].cluster};
            double us = 0;
            const int e = probe_median_us(g, dsmem_launch, &pa, &us);
            if (e) {
                fprintf(stderr, "bench_linear: dsmem probe (%s): %s\n", v[i].name, cudaGetErrorString((cudaError_t)e));
                (void)cudaGetLastError();
                continue;
            }
            us /= reps;
            printf("dsmem probe %-42s %4d blocks: %6.2f us per 96 KB %-10s (%.1f GB/s written per block)\n",
                   v[i].name, blocks, us, v[i].how >= 4 ? "out" : "out and in", (double)bytes / (us * 1e3));
        }
        fq_cuda_guard_exit(&gd);
    }
    fq_buf_free(&scratch);
    fq_buf_free(&sink);
}

static int bench_gpu(fq_ctx *ctx, int dev, const bl_shape *shapes, int nshapes, const int64_t *ms, int nms, int iters,
                     int reps, int fp4, int dq, int rotate, int sweep, int ceiling, int probes, bl_rows *rs) {
    bl_gpu g = {ctx, dev, NULL, NULL, NULL};
    if (fq_cuda_dev_get(ctx, dev, &g.d) != FQ_OK) {
        fprintf(stderr, "bench_linear: %s\n", fq_ctx_error(ctx));
        return 1;
    }
    fq_cuda_guard gd;
    if (fq_cuda_guard_enter(ctx, dev, &gd) != FQ_OK) return 1;
    struct cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, dev) == cudaSuccess) snprintf(rs->card, sizeof rs->card, "%s", prop.name);
    int ok = cudaEventCreate(&g.ev0) == cudaSuccess && cudaEventCreate(&g.ev1) == cudaSuccess;
    fq_cuda_guard_exit(&gd);
    if (!ok) {
        fprintf(stderr, "bench_linear: cudaEventCreate failed\n");
        return 1;
    }
    snprintf(rs->device, sizeof rs->device, "cuda:%d", dev);
    rs->copy_gbps = copy_bandwidth(&g);
    printf("card: %s (%s, sm_%d%d, %d SMs)   D2D copy: %.1f GB/s (read + written)\n", rs->card, rs->device,
           g.d->cc_major, g.d->cc_minor, g.d->sm_count, rs->copy_gbps);
    if (g_power_s > 0) {
        char bus[32];
        if (fq_cuda_guard_enter(ctx, dev, &gd) != FQ_OK) return 1;
        const cudaError_t e = cudaDeviceGetPCIBusId(bus, (int)sizeof bus, dev);
        fq_cuda_guard_exit(&gd);
        if (e != cudaSuccess) {
            fprintf(stderr, "bench_linear: --power: cudaDeviceGetPCIBusId: %s\n", cudaGetErrorString(e));
            return 1;
        }
        if (fq_gpu_power_open(ctx, bus, &g_power) != FQ_OK) {
            fprintf(stderr, "bench_linear: --power: %s\n", fq_ctx_error(ctx));
            return 1;
        }
        printf("power: each body replayed %.1f s after %.1f s of warm-up; enforced power limit %.0f W\n", g_power_s,
               g_power_s / 3.0, fq_gpu_power_limit_mw(g_power) * 1e-3);
    }
    if (probes & 1) l2_case(&g);
    if (probes & 2) dsmem_case(&g);
    printf("weights: %s, blocksize 64%s; x, y bf16; %d calls per graph, median of %d replays%s\n", fp4 ? "FP4" : "NF4",
           dq ? ", double quant" : "", iters, reps, rotate ? ", weights rotated over >= 256 MiB" : "");
    printf("%-12s %5s %-17s %10s %10s %10s %7s %8s %8s %7s %s\n", "W (NxK)", "M", "kernel", "ours us", "cublas us",
           "dq+blas us", "x blas", "TFLOP/s", "W GB/s", "W/copy", "target");
    int rc = 0;
    const size_t ws_bytes = (size_t)32 << 20;
    fq_buffer ws = {0};
    if (fq_buf_alloc(ctx, FQ_CUDA(dev), ws_bytes, &ws) != FQ_OK) return 1;
    for (int si = 0; si < nshapes && !rc; si++) {
        const int64_t n = shapes[si].n, k = shapes[si].k;
        fq_qtensor *w0 = NULL;
        if (bl_weight(ctx, FQ_CUDA(dev), n, k, fp4, dq, &w0) != FQ_OK) {
            fprintf(stderr, "bench_linear: weight %lldx%lld: %s\n", (long long)n, (long long)k, fq_ctx_error(ctx));
            rc = 1;
            break;
        }
        const size_t wbytes = bl_weight_bytes(w0), bbytes = (size_t)(n * k) * 2;
        const int nq = rotate ? (int)((((size_t)256 << 20) + wbytes - 1) / wbytes) : 1;
        const int nb = rotate ? (int)((((size_t)256 << 20) + bbytes - 1) / bbytes) : 1;
        fq_qtensor **wq = calloc((size_t)nq, sizeof *wq);
        fq_buffer *wb = calloc((size_t)nb, sizeof *wb);
        int made = wq && wb;
        if (made) wq[0] = w0;
        else fq_qtensor_free(w0);
        for (int i = 1; made && i < nq; i++) made = fq_qtensor_copy_to(ctx, wq[0], FQ_CUDA(dev), &wq[i]) == FQ_OK;
        if (made) {
            /* the bf16 weight: random values, then copies */
            fq_tensor *t = NULL;
            made = bl_tensor_random(ctx, FQ_CUDA(dev), FQ_BF16, n, k, &t) == FQ_OK;
            for (int i = 0; made && i < nb; i++) {
                made = fq_buf_alloc(ctx, FQ_CUDA(dev), bbytes, &wb[i]) == FQ_OK &&
                       fq_buf_copy(ctx, &wb[i], 0, &t->buf, 0, bbytes) == FQ_OK;
            }
            fq_tensor_free(t);
        }
        if (!made) {
            fprintf(stderr, "bench_linear: weights for %lldx%lld: %s\n", (long long)n, (long long)k, fq_ctx_error(ctx));
            rc = 1;
        }
        for (int mi = 0; mi < nms && !rc; mi++) {
            const int64_t m = ms[mi];
            fq_tensor *x = NULL, *y = NULL;
            int64_t ys[2] = {m, n};
            if (bl_tensor_random(ctx, FQ_CUDA(dev), FQ_BF16, m, k, &x) != FQ_OK ||
                fq_tensor_create(ctx, FQ_CUDA(dev), FQ_BF16, 2, ys, &y) != FQ_OK) {
                fprintf(stderr, "bench_linear: %s\n", fq_ctx_error(ctx));
                fq_tensor_free(x);
                rc = 1;
                break;
            }
            ours_arg oa = {wq, nq, x, y, FQ_LINEAR_AUTO}, odq = {wq, nq, x, y, FQ_LINEAR_DEQUANT_BLAS};
            const fq_lin4_impl impl = fq_linear4_cuda_choice(ctx, x, wq[0], y);
            blas_arg ba;
            memset(&ba, 0, sizeof ba);
            ba.wb = wb;
            ba.nw = nb;
            ba.x = x;
            ba.y = y;
            ba.ws = ws.ptr;
            ba.ws_bytes = ws_bytes;
            /* ours, dequantize + cuBLASLt and cuBLASLt replayed in turn */
            bl_timed tv[3] = {{body_ours, &oa, NULL, 0}, {body_ours, &odq, NULL, 0}, {body_blas, &ba, NULL, 0}};
            const int nv = blas_setup(&g, &ba, m, n, k) == FQ_OK ? 3 : 2;
            if (nv < 3) fprintf(stderr, "bench_linear: %s\n", fq_ctx_error(ctx));
            double tus[3] = {NAN, NAN, NAN};
            bl_time_n(&g, iters, reps, tv, nv, tus);
            const double us = tus[0], us_dq = tus[1], us_blas = tus[2];
            bl_row r;
            memset(&r, 0, sizeof r);
            r.n = n;
            r.k = k;
            r.m = m;
            snprintf(r.impl, sizeof r.impl, "%s", fq_lin4_impl_name(impl));
            r.us = us;
            r.us_blas = us_blas;
            r.us_dq = us_dq;
            r.ratio = us_blas / us;
            r.tflops = 2.0 * (double)m * (double)n * (double)k / (us * 1e6);
            r.wgbps = (double)wbytes / (us * 1e3);
            r.w_copy = rs->copy_gbps > 0 ? r.wgbps / rs->copy_gbps : 0;
            r.target_ok = target_for(m, r.ratio, r.w_copy);
            /* dequantize + cuBLASLt is at best cuBLASLt plus the dequantize pass at the copy
             * bandwidth: the packed weight read, its bf16 copy written (docs/linear-cuda.md) */
            const double us_dq_pass = (double)(wbytes + bbytes) / (rs->copy_gbps * 1e3);
            r.dq_bound = rs->copy_gbps > 0 ? us_blas / (us_blas + us_dq_pass) : NAN;
            add_row(rs, &r);
            char sh[32];
            snprintf(sh, sizeof sh, "%lldx%lld", (long long)n, (long long)k);
            printf("%-12s %5lld %-17s %10.2f %10.2f %10.2f %7.3f %8.1f %8.1f %7.3f %s   (cublas: %.1f TFLOP/s, W %.1f "
                   "GB/s; dq+blas bound %.3fx)\n",
                   sh, (long long)m, r.impl, us, us_blas, us_dq, r.ratio, r.tflops, r.wgbps, r.w_copy,
                   target_text(r.target_ok), 2.0 * (double)m * (double)n * (double)k / (us_blas * 1e6),
                   (double)bbytes / (us_blas * 1e3), r.dq_bound);
            fflush(stdout);
            if (g_power_s > 0) {
                char nm[64];
                snprintf(nm, sizeof nm, "ours (%s)", r.impl);
                const char *names[3] = {nm, "dequantize + cuBLASLt", "cuBLASLt bf16"};
                for (int v = 0; v < nv; v++)
                    bl_power_line(&g, iters, &tv[v], names[v], (double)m * (double)n * (double)k);
            }
            if (sweep) sweep_case(&g, &oa, nv == 3 ? &ba : NULL, iters, reps, us_blas, m, n, k);
            if (ceiling && m == 1) ceiling_case(&g, &oa, wbytes, iters, reps, rs->copy_gbps);
            blas_teardown(&ba);
            fq_tensor_free(x);
            fq_tensor_free(y);
        }
        for (int i = 0; wq && i < nq; i++) fq_qtensor_free(wq[i]);
        for (int i = 0; wb && i < nb; i++) fq_buf_free(&wb[i]);
        free(wq);
        free(wb);
    }
    fq_buf_free(&ws);
    if (fq_cuda_guard_enter(ctx, dev, &gd) == FQ_OK) {
        (void)cudaEventDestroy(g.ev0);
        (void)cudaEventDestroy(g.ev1);
        fq_cuda_guard_exit(&gd);
    }
    /* summary of the targets */
    int met = 0, missed = 0;
    for (int i = 0; i < rs->n; i++) {
        if (rs->r[i].target_ok == 1) met++;
        if (rs->r[i].target_ok == 0) missed++;
    }
    printf("targets: %d met, %d missed\n", met, missed);
    return rc;
}
#endif

static int parse_list(const char *s, int64_t *out, int max) {
    int n = 0;
    while (*s && n < max) {
        char *end;
        long long v = strtoll(s, &end, 10);
        if (end == s || v < 0) return -1;
        out[n++] = v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

static int parse_shapes(const char *s, bl_shape *out, int max) {
    int n = 0;
    while (*s && n < max) {
        char *end;
        long long a = strtoll(s, &end, 10);
        if (end == s || *end != 'x') return -1;
        s = end + 1;
        long long b = strtoll(s, &end, 10);
        if (end == s || a <= 0 || b <= 0) return -1;
        out[n].n = a;
        out[n].k = b;
        n++;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

int fq_bench_linear(int argc, char **argv) {
    const char *device = "cuda:0", *json = NULL;
    /* probes: bit 0 --l2, bit 1 --dsmem */
    int iters = 0, reps = 7, fp4 = 0, dq = 1, rotate = 1, sweep = 0, quick = 0, ceiling = 0, probes = 0;
    bl_shape shapes[32];
    int nshapes = 0;
    int64_t ms[32];
    int nms = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--device") && i + 1 < argc) device = argv[++i];
        else if (!strcmp(a, "--iters") && i + 1 < argc) iters = atoi(argv[++i]);
        else if (!strcmp(a, "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(a, "--json") && i + 1 < argc) json = argv[++i];
        else if (!strcmp(a, "--m") && i + 1 < argc) {
            nms = parse_list(argv[++i], ms, 32);
            if (nms <= 0) { fprintf(stderr, "bench_linear: bad --m list\n"); return 2; }
        } else if (!strcmp(a, "--shapes") && i + 1 < argc) {
            nshapes = parse_shapes(argv[++i], shapes, 32);
            if (nshapes <= 0) { fprintf(stderr, "bench_linear: bad --shapes (NxK,NxK,...)\n"); return 2; }
        } else if (!strcmp(a, "--fp4")) fp4 = 1;
        else if (!strcmp(a, "--no-dq")) dq = 0;
        else if (!strcmp(a, "--no-rotate")) rotate = 0;
        else if (!strcmp(a, "--sweep")) sweep = 1;
        else if (!strcmp(a, "--ceiling")) ceiling = 1;
        else if (!strcmp(a, "--l2")) probes |= 1;
        else if (!strcmp(a, "--dsmem")) probes |= 2;
#ifdef FQ_HAVE_CUDA
        else if (!strcmp(a, "--impl") && i + 1 < argc) {
            g_sweep_only = argv[++i];
            sweep = 1;
        } else if (!strcmp(a, "--power") && i + 1 < argc) {
            g_power_s = atof(argv[++i]);
            if (!(g_power_s > 0 && g_power_s <= 600)) {
                fprintf(stderr, "bench_linear: --power takes seconds in (0, 600]\n");
                return 2;
            }
        } else if (!strcmp(a, "--variants") && i + 1 < argc) {
            if (parse_variants(argv[++i]) <= 0) {
                fprintf(stderr, "bench_linear: bad --variants (impl:cfg,...)\n");
                return 2;
            }
            sweep = 1;
        }
#endif
        else if (!strcmp(a, "--quick")) quick = 1;
        else {
            printf("usage: bench_linear [--device cuda:N|cpu] [--iters N] [--reps N] [--json FILE] [--m 1,16,...]\n"
                   "                    [--shapes NxK,...] [--fp4] [--no-dq] [--no-rotate] [--sweep] [--quick]\n"
                   "                    [--impl NAME] [--variants impl:cfg,...] [--ceiling] [--l2] [--dsmem]\n"
                   "                    [--power SECONDS]\n");
            return strcmp(a, "--help") && strcmp(a, "-h") ? 2 : 0;
        }
    }
    fq_ctx *ctx;
    if (fq_ctx_create(&ctx) != FQ_OK) return 1;
    fq_device dev;
    if (fq_device_parse(ctx, device, &dev) != FQ_OK || fq_device_check(ctx, dev) != FQ_OK) {
        fprintf(stderr, "bench_linear: %s\n", fq_ctx_error(ctx));
        fq_ctx_free(ctx);
        return 1;
    }
    if (!nshapes) {
        nshapes = quick ? 2 : (int)(sizeof k_shapes / sizeof k_shapes[0]);
        memcpy(shapes, k_shapes, sizeof(bl_shape) * (size_t)nshapes);
    }
    if (!nms) {
        if (dev.type == FQ_DEVICE_CPU) {
            static const int64_t cpu_ms[] = {1, 16, 256};
            nms = 3;
            memcpy(ms, cpu_ms, sizeof cpu_ms);
        } else {
            nms = (int)(sizeof k_ms / sizeof k_ms[0]);
            memcpy(ms, k_ms, sizeof k_ms);
        }
    }
    if (iters <= 0) iters = dev.type == FQ_DEVICE_CPU ? 3 : quick ? 10 : 50;
    if (reps <= 0) reps = 1;
    bl_rows rs;
    memset(&rs, 0, sizeof rs);
    int rc;
#ifdef FQ_HAVE_CUDA
    if (dev.type == FQ_DEVICE_CPU && g_power_s > 0) {
        fprintf(stderr, "bench_linear: --power reads a GPU's energy counter; it needs --device cuda:N\n");
        fq_ctx_free(ctx);
        return 2;
    }
#endif
    if (dev.type == FQ_DEVICE_CPU) rc = bench_cpu(ctx, shapes, nshapes, ms, nms, iters, fp4, dq, &rs);
    else {
#ifdef FQ_HAVE_CUDA
        rc = bench_gpu(ctx, dev.index, shapes, nshapes, ms, nms, iters, reps, fp4, dq, rotate, sweep, ceiling, probes,
                       &rs);
        fq_gpu_power_close(g_power);
        g_power = NULL;
#else
        (void)rotate, (void)sweep, (void)reps, (void)ceiling, (void)probes;
        fprintf(stderr, "bench_linear: built without CUDA\n");
        rc = 1;
#endif
    }
    if (json && rs.n) write_json(json, &rs);
    free(rs.r);
    fq_ctx_free(ctx);
    return rc;
}

#ifdef FQ_BENCH_MAIN
int main(int argc, char **argv) { return fq_bench_linear(argc, argv); }
#endif

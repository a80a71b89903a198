/* Benchmark of 4-bit quantize / dequantize (NF4, blocksize 64, bf16 weights,
 * with and without double quant) at the FLUX.1 linear shapes, on the CPU and
 * on every GPU, with the baseline measured in the same run: a device-to-device
 * copy (cudaMemcpyAsync) of the same bytes on a GPU, a memcpy on the CPU.
 *
 * "bytes" of an op = what it reads plus what it writes (bf16 weight, packed
 * nibbles, absmax or its double-quant state); GB/s = bytes / time; a copy of B
 * bytes moves 2B. "x copy" = the op's GB/s over the copy's GB/s: 1.0 means the
 * op streams its data as fast as a plain copy would.
 *
 * GPU times: CUDA events around one launch sequence on the device's stream
 * (under its guard), median of --iters runs, the L2 cache flushed before each
 * (a 256 MiB memset outside the timed region) so that every run reads DRAM.
 * The kernels are timed through the launchers the ops layer calls, so buffer
 * allocation is not part of the time.
 *
 * Usage: bench_quant [--device all|cpu|cuda|cuda:N] [--iters N] [--cpu-iters N]
 *                    [--json FILE] [--quick]        (also: fluxq bench quant ...) */
#include "core/core.h"
#include "formats/formats.h"
#include "kernels/kernels.h"
#ifdef FQ_HAVE_CUDA
#include "core/cuda_device.h"
#endif

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    int64_t rows, cols;
} shape_t;

/* The FLUX.1 linear weights (out x in). */
static const shape_t k_shapes[] = {{3072, 3072},  {12288, 3072}, {3072, 12288},
                                   {3072, 15360}, {18432, 3072}, {21504, 3072}};
enum { NSHAPES = sizeof k_shapes / sizeof k_shapes[0] };

typedef struct {
    char device[16];
    char card[128];
    int64_t rows, cols;
    const char *op;
    double us, gbps, ratio;
} result_t;

typedef struct {
    result_t *r;
    int n, cap;
} results_t;

static void add_result(results_t *rs, const result_t *r) {
    if (rs->n == rs->cap) {
        int cap = rs->cap ? rs->cap * 2 : 64;
        result_t *nr = realloc(rs->r, (size_t)cap * sizeof *nr);
        if (!nr) return;
        rs->r = nr;
        rs->cap = cap;
    }
    rs->r[rs->n++] = *r;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}
static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Weight-like bf16 values: N(0, 0.02)-ish, with varied magnitudes per row. */
static void fill_bf16(uint16_t *x, int64_t n) {
    uint64_t s = 0x853c49e6748fea9bull;
    for (int64_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        uint32_t h = (uint32_t)(s >> 24);
        x[i] = (uint16_t)((h & 0x8000u) | (0x3a00u + (h & 0x3ffu))); /* ~2^-11 .. 2^-3 */
    }
}

typedef struct {
    int64_t n, nb, nnb;
    size_t b_x, b_packed, b_absmax, b_q8, b_nested;
} sizes_t;

static sizes_t sizes_of(shape_t s) {
    sizes_t z;
    z.n = s.rows * s.cols;
    z.nb = (z.n + 63) / 64;
    z.nnb = (z.nb + 255) / 256;
    z.b_x = (size_t)z.n * 2;
    z.b_packed = (size_t)(z.n + 1) / 2;
    z.b_absmax = (size_t)z.nb * 4;
    z.b_q8 = (size_t)z.nb;
    z.b_nested = (size_t)z.nnb * 4;
    return z;
}

static void row(results_t *rs, const char *dev, const char *card, shape_t s, const char *op, double us, double bytes,
                double copy_gbps) {
    result_t r;
    memset(&r, 0, sizeof r);
    snprintf(r.device, sizeof r.device, "%s", dev);
    snprintf(r.card, sizeof r.card, "%s", card);
    r.rows = s.rows;
    r.cols = s.cols;
    r.op = op;
    r.us = us;
    r.gbps = bytes / (us * 1e-6) / 1e9;
    r.ratio = copy_gbps > 0 ? r.gbps / copy_gbps : 1.0;
    printf("%-8s %6lldx%-6lld %-30s %10.1f %9.0f %8.2f\n", dev, (long long)s.rows, (long long)s.cols, op, us, r.gbps,
           r.ratio);
    add_result(rs, &r);
}

static void header(const char *dev, const char *card) {
    printf("\n%s: %s\n", dev, card);
    printf("%-8s %13s %-30s %10s %9s %8s\n", "device", "shape", "op", "median us", "GB/s", "x copy");
}

/* ---- CPU ------------------------------------------------------------------------- */

/* The CPU baseline is a memcpy spread over the same threads as our kernels,
 * in 1 MiB chunks: the machine's copy bandwidth, not one core's. */
typedef struct {
    uint8_t *dst;
    const uint8_t *src;
    size_t bytes;
} pcopy_job;
enum { PCOPY_CHUNK = 1 << 20 };
static void pcopy_task(void *arg, int64_t i) {
    const pcopy_job *j = arg;
    size_t off = (size_t)i * PCOPY_CHUNK, len = j->bytes - off < PCOPY_CHUNK ? j->bytes - off : PCOPY_CHUNK;
    memcpy(j->dst + off, j->src + off, len);
}
static void parallel_memcpy(fq_ctx *ctx, void *dst, const void *src, size_t bytes) {
    pcopy_job j = {dst, src, bytes};
    fq_parallel_for(ctx, (int64_t)((bytes + PCOPY_CHUNK - 1) / PCOPY_CHUNK), pcopy_task, &j);
}

static void bench_cpu(fq_ctx *ctx, int iters, int quick, results_t *rs) {
    char card[128];
    snprintf(card, sizeof card, "CPU, %d threads", ctx->nthreads);
    header("cpu", card);
    for (int si = 0; si < (quick ? 1 : NSHAPES); si++) {
        shape_t s = k_shapes[si];
        sizes_t z = sizes_of(s);
        size_t cb = z.b_x + z.b_packed + z.b_absmax;
        uint16_t *x = malloc(z.b_x), *y = malloc(z.b_x);
        uint8_t *pk = malloc(z.b_packed), *q8 = malloc(z.b_q8), *src = malloc(cb), *dst = malloc(cb);
        float *am = malloc(z.b_absmax), *am2 = malloc(z.b_absmax), *nested = malloc(z.b_nested);
        if (!x || !y || !pk || !q8 || !src || !dst || !am || !am2 || !nested) {
            fprintf(stderr, "bench_quant: out of host memory at %lldx%lld\n", (long long)s.rows, (long long)s.cols);
        } else {
            fill_bf16(x, z.n);
            memset(src, 1, cb);
            memset(dst, 0, cb);
            double t[5][64];
            int it = iters > 64 ? 64 : iters;
            for (int i = 0; i < it; i++) {
                double t0 = now_s();
                parallel_memcpy(ctx, dst, src, cb);
                double t1 = now_s();
                fq_cpu_quantize4(ctx, x, FQ_BF16, z.n, 64, FQ_QUANT_NF4, pk, am);
                double t2 = now_s();
                float off = fq_cpu_torch_mean(am, z.nb);
                fq_cpu_quantize8(am, off, z.nb, 256, fq_dynamic_map_signed(), q8, nested);
                double t3 = now_s();
                fq_cpu_dequantize4(ctx, pk, am, z.n, 64, FQ_QUANT_NF4, y, FQ_BF16);
                double t4 = now_s();
                fq_cpu_dequantize8(q8, nested, fq_dynamic_map_signed(), off, z.nb, 256, am2);
                fq_cpu_dequantize4(ctx, pk, am2, z.n, 64, FQ_QUANT_NF4, y, FQ_BF16);
                double t5 = now_s();
                t[0][i] = (t1 - t0) * 1e6;
                t[1][i] = (t2 - t1) * 1e6;
                t[2][i] = (t3 - t1) * 1e6; /* double quant = quantize + mean + 8-bit step */
                t[3][i] = (t4 - t3) * 1e6;
                t[4][i] = (t5 - t4) * 1e6;
            }
            double copy_us = median(t[0], it), copy_gbps = 2.0 * (double)cb / (copy_us * 1e-6) / 1e9;
            row(rs, "cpu", card, s, "memcpy, all threads (baseline)", copy_us, 2.0 * (double)cb, copy_gbps);
            double bq = (double)(z.b_x + z.b_packed + z.b_absmax);
            double bqd = (double)(z.b_x + z.b_packed + z.b_q8 + z.b_nested);
            row(rs, "cpu", card, s, "quantize nf4", median(t[1], it), bq, copy_gbps);
            row(rs, "cpu", card, s, "quantize nf4 dq", median(t[2], it), bqd, copy_gbps);
            row(rs, "cpu", card, s, "dequantize nf4", median(t[3], it), bq, copy_gbps);
            row(rs, "cpu", card, s, "dequantize nf4 dq", median(t[4], it), bqd, copy_gbps);
        }
        free(x);
        free(y);
        free(pk);
        free(q8);
        free(src);
        free(dst);
        free(am);
        free(am2);
        free(nested);
    }
}

/* ---- GPU ------------------------------------------------------------------------- */
#ifdef FQ_HAVE_CUDA

typedef struct {
    fq_buffer x, packed, absmax, q8, nested, code, off, out, src, dst, flush;
} gpu_bufs;

static void free_bufs(gpu_bufs *b) {
    fq_buffer *all[] = {&b->x,  &b->packed, &b->absmax, &b->q8,  &b->nested, &b->code,
                        &b->off, &b->out,   &b->src,    &b->dst, &b->flush};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) fq_buf_free(all[i]);
}

enum { OP_COPY, OP_Q, OP_QDQ, OP_DQ, OP_DQDQ, NOPS };

/* Launches one op on the stream; returns a cudaError_t as int. */
static int launch(int op, const gpu_bufs *b, const sizes_t *z, size_t copy_bytes, float offset, cudaStream_t st) {
    switch (op) {
    case OP_COPY: return (int)cudaMemcpyAsync(b->dst.ptr, b->src.ptr, copy_bytes, cudaMemcpyDeviceToDevice, st);
    case OP_Q:
        return fq_cuda_quantize4(b->x.ptr, FQ_BF16, z->n, 64, FQ_QUANT_NF4, b->packed.ptr, b->absmax.ptr, st);
    case OP_QDQ: {
        int e = fq_cuda_quantize4(b->x.ptr, FQ_BF16, z->n, 64, FQ_QUANT_NF4, b->packed.ptr, b->absmax.ptr, st);
        if (!e) e = fq_cuda_torch_mean(b->absmax.ptr, z->nb, b->off.ptr, st);
        if (!e)
            e = fq_cuda_quantize8(b->absmax.ptr, b->off.ptr, z->nb, 256, b->code.ptr, b->q8.ptr, b->nested.ptr, st);
        return e;
    }
    case OP_DQ:
        return fq_cuda_dequantize4(b->packed.ptr, b->absmax.ptr, z->n, 64, FQ_QUANT_NF4, b->out.ptr, FQ_BF16, st);
    default:
        return fq_cuda_dequantize4_nested(b->packed.ptr, b->q8.ptr, b->nested.ptr, b->code.ptr, offset, z->n, 64,
                                          FQ_QUANT_NF4, b->out.ptr, FQ_BF16, st);
    }
}

static int bench_gpu(fq_ctx *ctx, int dev, int iters, int quick, results_t *rs) {
    fq_cuda_dev *d;
    if (fq_cuda_dev_get(ctx, dev, &d) != FQ_OK) {
        fprintf(stderr, "bench_quant: %s\n", fq_ctx_error(ctx));
        return 1;
    }
    char dn[16], card[128];
    fq_device_name(FQ_CUDA(dev), dn, sizeof dn);
    fq_cuda_guard g;
    if (fq_cuda_guard_enter(ctx, dev, &g) != FQ_OK) {
        fprintf(stderr, "bench_quant: %s\n", fq_ctx_error(ctx));
        return 1;
    }
    struct cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, dev) == cudaSuccess)
        snprintf(card, sizeof card, "%.80s, %d SMs, sm_%d%d", prop.name, prop.multiProcessorCount, prop.major,
                 prop.minor);
    else
        snprintf(card, sizeof card, "unknown GPU");
    cudaEvent_t ev0 = NULL, ev1 = NULL;
    int rc = 0;
    if (cudaEventCreate(&ev0) != cudaSuccess || cudaEventCreate(&ev1) != cudaSuccess) rc = 1;
    fq_cuda_guard_exit(&g);
    if (rc) {
        fprintf(stderr, "bench_quant: cudaEventCreate failed on %s\n", dn);
        return 1;
    }
    header(dn, card);
    const size_t flush_bytes = (size_t)256 << 20;
    for (int si = 0; si < (quick ? 1 : NSHAPES) && !rc; si++) {
        shape_t s = k_shapes[si];
        sizes_t z = sizes_of(s);
        size_t cb = z.b_x + z.b_packed + z.b_absmax;
        gpu_bufs b;
        memset(&b, 0, sizeof b);
        fq_device D = FQ_CUDA(dev);
        uint16_t *hx = malloc(z.b_x);
        int ok = hx && fq_buf_alloc(ctx, D, z.b_x, &b.x) == FQ_OK && fq_buf_alloc(ctx, D, z.b_packed, &b.packed) == FQ_OK &&
                 fq_buf_alloc(ctx, D, z.b_absmax, &b.absmax) == FQ_OK && fq_buf_alloc(ctx, D, z.b_q8, &b.q8) == FQ_OK &&
                 fq_buf_alloc(ctx, D, z.b_nested, &b.nested) == FQ_OK && fq_buf_alloc(ctx, D, 1024, &b.code) == FQ_OK &&
                 fq_buf_alloc(ctx, D, 16, &b.off) == FQ_OK && fq_buf_alloc(ctx, D, z.b_x, &b.out) == FQ_OK &&
                 fq_buf_alloc(ctx, D, cb, &b.src) == FQ_OK && fq_buf_alloc(ctx, D, cb, &b.dst) == FQ_OK &&
                 fq_buf_alloc(ctx, D, flush_bytes, &b.flush) == FQ_OK;
        if (ok) {
            fill_bf16(hx, z.n);
            ok = fq_buf_write(ctx, &b.x, 0, hx, z.b_x) == FQ_OK &&
                 fq_buf_write(ctx, &b.code, 0, fq_dynamic_map_signed(), 1024) == FQ_OK &&
                 fq_buf_zero(ctx, &b.src, 0, cb) == FQ_OK;
        }
        if (!ok) {
            fprintf(stderr, "bench_quant: %s at %lldx%lld: %s\n", dn, (long long)s.rows, (long long)s.cols,
                    fq_ctx_error(ctx));
            free(hx);
            free_bufs(&b);
            rc = 1;
            break;
        }
        double t[NOPS][256];
        int it = iters > 256 ? 256 : iters;
        float offset = 0.0f;
        cudaError_t e = cudaSuccess;
        if (fq_cuda_guard_enter(ctx, dev, &g) != FQ_OK) { rc = 1; free(hx); free_bufs(&b); break; }
        /* Build the double-quant state once (the dequantize dq op reads it). */
        e = (cudaError_t)launch(OP_QDQ, &b, &z, cb, 0.0f, d->stream);
        if (e == cudaSuccess) e = cudaMemcpyAsync(&offset, b.off.ptr, 4, cudaMemcpyDeviceToHost, d->stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(d->stream);
        for (int op = 0; op < NOPS && e == cudaSuccess; op++)
            for (int i = -3; i < it && e == cudaSuccess; i++) { /* 3 warm-up runs */
                float ms = 0.0f;
                e = cudaMemsetAsync(b.flush.ptr, i & 0xff, flush_bytes, d->stream);
                if (e == cudaSuccess) e = cudaEventRecord(ev0, d->stream);
                if (e == cudaSuccess) e = (cudaError_t)launch(op, &b, &z, cb, offset, d->stream);
                if (e == cudaSuccess) e = cudaEventRecord(ev1, d->stream);
                if (e == cudaSuccess) e = cudaEventSynchronize(ev1);
                if (e == cudaSuccess) e = cudaEventElapsedTime(&ms, ev0, ev1);
                if (i >= 0) t[op][i] = (double)ms * 1e3;
            }
        fq_cuda_guard_exit(&g);
        if (e != cudaSuccess) {
            fprintf(stderr, "bench_quant: %s: %s\n", dn, cudaGetErrorString(e));
            (void)cudaGetLastError();
            rc = 1;
        } else {
            double copy_us = median(t[OP_COPY], it), copy_gbps = 2.0 * (double)cb / (copy_us * 1e-6) / 1e9;
            double bq = (double)(z.b_x + z.b_packed + z.b_absmax);
            double bqd = (double)(z.b_x + z.b_packed + z.b_q8 + z.b_nested);
            row(rs, dn, card, s, "D2D copy (baseline)", copy_us, 2.0 * (double)cb, copy_gbps);
            row(rs, dn, card, s, "quantize nf4", median(t[OP_Q], it), bq, copy_gbps);
            row(rs, dn, card, s, "quantize nf4 dq", median(t[OP_QDQ], it), bqd, copy_gbps);
            row(rs, dn, card, s, "dequantize nf4", median(t[OP_DQ], it), bq, copy_gbps);
            row(rs, dn, card, s, "dequantize nf4 dq", median(t[OP_DQDQ], it), bqd, copy_gbps);
        }
        free(hx);
        free_bufs(&b);
    }
    if (fq_cuda_guard_enter(ctx, dev, &g) == FQ_OK) {
        (void)cudaEventDestroy(ev0);
        (void)cudaEventDestroy(ev1);
        fq_cuda_guard_exit(&g);
    }
    return rc;
}
#endif

static void write_json(const char *path, const results_t *rs) {
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "bench_quant: cannot write %s\n", path);
        return;
    }
    fprintf(f, "{\"benchmark\": \"quant\", \"blocksize\": 64, \"quant_type\": \"nf4\", \"dtype\": \"bf16\",\n \"results\": [\n");
    for (int i = 0; i < rs->n; i++) {
        const result_t *r = &rs->r[i];
        char card[128];
        size_t k = 0;
        for (const char *c = r->card; *c && k + 1 < sizeof card; c++)
            if (*c != '"' && *c != '\\') card[k++] = *c;
        card[k] = 0;
        fprintf(f,
                "  {\"device\": \"%s\", \"card\": \"%s\", \"shape\": [%lld, %lld], \"op\": \"%s\", \"median_us\": %.2f, "
                "\"gbps\": %.1f, \"x_copy\": %.3f}%s\n",
                r->device, card, (long long)r->rows, (long long)r->cols, r->op, r->us, r->gbps, r->ratio,
                i + 1 < rs->n ? "," : "");
    }
    fprintf(f, " ]\n}\n");
    fclose(f);
}

int fq_bench_quant(int argc, char **argv) {
    const char *device = "all", *json = NULL;
    int iters = 20, cpu_iters = 3, quick = 0;
    for (int i = 1; i < argc; i++) { /* argv[0]: the program or subcommand name */
        const char *a = argv[i];
        if (!strcmp(a, "--device") && i + 1 < argc) device = argv[++i];
        else if (!strcmp(a, "--iters") && i + 1 < argc) iters = atoi(argv[++i]);
        else if (!strcmp(a, "--cpu-iters") && i + 1 < argc) cpu_iters = atoi(argv[++i]);
        else if (!strcmp(a, "--json") && i + 1 < argc) json = argv[++i];
        else if (!strcmp(a, "--quick")) quick = 1;
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: bench_quant [--device all|cpu|cuda|cuda:N] [--iters N] [--cpu-iters N] [--json FILE] "
                   "[--quick]\n");
            return 0;
        } else {
            fprintf(stderr, "bench_quant: unknown argument '%s'\n", a);
            return 2;
        }
    }
    if (iters < 1) iters = 1;
    if (cpu_iters < 1) cpu_iters = 1;
    fq_ctx *ctx;
    if (fq_ctx_create(&ctx) != FQ_OK) return 1;
    results_t rs = {0};
    int rc = 0, all = !strcmp(device, "all");
    printf("4-bit quantize/dequantize: NF4, blocksize 64, bf16; median of %d runs (cpu: %d)\n", iters, cpu_iters);
    if (all || !strcmp(device, "cpu")) bench_cpu(ctx, cpu_iters, quick, &rs);
    if (all || !strncmp(device, "cuda", 4)) {
#ifdef FQ_HAVE_CUDA
        int only = -1, ndev = fq_cuda_device_count();
        if (!all) {
            fq_device d;
            if (fq_device_parse(ctx, device, &d) != FQ_OK) {
                fprintf(stderr, "bench_quant: %s\n", fq_ctx_error(ctx));
                fq_ctx_free(ctx);
                return 2;
            }
            only = strcmp(device, "cuda") == 0 ? -1 : d.index;
        }
        if (ndev == 0) printf("\n(no CUDA device)\n");
        for (int dv = 0; dv < ndev; dv++)
            if (only < 0 || only == dv) rc |= bench_gpu(ctx, dv, iters, quick, &rs);
        if (only >= ndev) {
            fprintf(stderr, "bench_quant: %s does not exist\n", device);
            rc = 2;
        }
#else
        printf("\n(built without CUDA)\n");
#endif
    }
    if (json) write_json(json, &rs);
    free(rs.r);
    fq_ctx_free(ctx);
    return rc;
}

#ifdef FQ_BENCH_MAIN
int main(int argc, char **argv) { return fq_bench_quant(argc, argv); }
#endif

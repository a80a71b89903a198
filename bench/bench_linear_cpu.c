/* CPU benchmark of fq_linear_4bit, with its baselines measured in the same run:
 *   1. memory bandwidth with all threads: a streaming read and a memcpy;
 *   2. GEMV (M = 1) at the FLUX shapes, weights rotated through copies that
 *      together exceed the last-level cache, as GB/s of weight bytes read and
 *      as a fraction of the streaming-read bandwidth measured just before
 *      (and of the best read seen in the run);
 *   3. M = 256: GFLOP/s of the blocked GEMM and of dequantize + OpenBLAS,
 *      next to OpenBLAS sgemm on an f32 weight (the ceiling either could reach);
 *   4. the GEMV / GEMM crossover in M that fq_cpu_linear4_pick encodes.
 * Usage: bench_linear_cpu [--threads N] [--seconds S] [--quick] [--only mem,gemv,gemm,cross]
 *                         [--shape NxK]
 * (fluxq links it in as fq_bench_linear_cpu for `fluxq bench`). Results: docs/linear.md. */
#include "core/core.h"
#include "kernels/cpu/linear4_cpu.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static uint64_t g_rng = 88172645463325252ull;
static uint64_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}

static void cpu_model(char *buf, size_t n) {
    snprintf(buf, n, "unknown CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512], name[256] = "", fam[32] = "", mod[32] = "";
    while (fgets(line, sizeof line, f)) {
        char *v = strchr(line, ':');
        if (!v) continue;
        v += 2;
        v[strcspn(v, "\n")] = 0;
        if (!name[0] && !strncmp(line, "model name", 10)) snprintf(name, sizeof name, "%s", v);
        if (!fam[0] && !strncmp(line, "cpu family", 10)) snprintf(fam, sizeof fam, "%s", v);
        if (!mod[0] && !strncmp(line, "model\t", 6)) snprintf(mod, sizeof mod, "%s", v);
    }
    fclose(f);
    snprintf(buf, n, "%s (family %s, model %s)", name, fam, mod);
}

/* ---- memory baselines ---- */
typedef struct {
    const uint64_t *src;
    uint64_t *dst;
    int64_t words, chunk;
    uint64_t sink[256];
} mem_job;

static void read_task(void *arg, int64_t t) {
    mem_job *j = arg;
    int64_t a = t * j->chunk, b = a + j->chunk < j->words ? a + j->chunk : j->words;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t i = a; i + 4 <= b; i += 4) {
        s0 += j->src[i];
        s1 ^= j->src[i + 1];
        s2 += j->src[i + 2];
        s3 ^= j->src[i + 3];
    }
    j->sink[t & 255] += s0 + s1 + s2 + s3;
}

static void copy_task(void *arg, int64_t t) {
    mem_job *j = arg;
    int64_t a = t * j->chunk, b = a + j->chunk < j->words ? a + j->chunk : j->words;
    memcpy(j->dst + a, j->src + a, (size_t)(b - a) * 8);
}

/* Best of `reps` runs of fn over a buffer of `bytes`; returns GB/s of bytes moved. */
static double mem_bw(fq_ctx *ctx, void (*fn)(void *, int64_t), size_t bytes, int traffic, int reps) {
    mem_job *j = calloc(1, sizeof *j);
    uint64_t *a = malloc(bytes), *b = malloc(bytes);
    if (!j || !a || !b) { free(j); free(a); free(b); return 0; }
    memset(a, 1, bytes);
    memset(b, 2, bytes);
    j->src = a;
    j->dst = b;
    j->words = (int64_t)(bytes / 8);
    j->chunk = (j->words + 63) / 64;
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t = now_s();
        fq_parallel_for(ctx, 64, fn, j);
        t = now_s() - t;
        if (t < best) best = t;
    }
    free(a); free(b); free(j);
    return (double)bytes * traffic / best / 1e9;
}

/* ---- weights ---- */
static fq_qtensor *random_weight(fq_ctx *ctx, int64_t n, int64_t k, int nested) {
    fq_qtensor_info info = {0};
    info.type = FQ_QUANT_NF4;
    info.blocksize = 64;
    info.double_quant = nested;
    info.orig_dtype = FQ_BF16;
    info.ndim = 2;
    info.shape[0] = n;
    info.shape[1] = k;
    info.offset = 0.02f;
    int64_t numel = n * k, nb = numel / 64, nnb = (nb + 255) / 256;
    uint8_t *p = malloc((size_t)numel / 2), *q = malloc((size_t)nb);
    float *a = malloc((size_t)nb * 4), *na = malloc((size_t)nnb * 4);
    if (!p || !q || !a || !na) { free(p); free(q); free(a); free(na); return NULL; }
    for (int64_t i = 0; i < numel / 16; i++) ((uint64_t *)p)[i] = rnd();
    for (int64_t i = 0; i < nb; i++) { a[i] = 0.01f + (float)(rnd() % 1000) * 1e-5f; q[i] = (uint8_t)rnd(); }
    for (int64_t i = 0; i < nnb; i++) na[i] = 0.01f;
    const void *m[FQ_QMEMBER_COUNT] = {p, nested ? (void *)q : (void *)a, fq_quant_map(FQ_QUANT_NF4),
                                       nested ? na : NULL, nested ? fq_dynamic_map_signed() : NULL};
    fq_qtensor *w = NULL;
    fq_qtensor_from_members(ctx, FQ_CPU, &info, m, &w);
    free(p); free(q); free(a); free(na);
    return w;
}

static size_t weight_bytes(const fq_qtensor *w) {
    size_t s = 0;
    for (int m = 0; m < FQ_QMEMBER_COUNT; m++) s += fq_qtensor_member_bytes(w, (fq_qmember)m);
    return s;
}

static fq_tensor *bf16_tensor(fq_ctx *ctx, int64_t r, int64_t c) {
    int64_t shape[2] = {r, c};
    fq_tensor *t = NULL;
    if (fq_tensor_create(ctx, FQ_CPU, FQ_BF16, 2, shape, &t) != FQ_OK) return NULL;
    uint16_t *d = fq_tensor_host_data(t);
    for (int64_t i = 0; i < r * c; i++) d[i] = (uint16_t)(0x3c00 + (rnd() & 0x7f)) ^ (uint16_t)((rnd() & 1) << 15);
    return t;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median seconds per call of fq_linear_4bit with kernel k, rotating over
 * ws[0..nw). The median, not the mean: on a shared machine other processes
 * take the cores now and then, and one such call should not move the figure. */
static double time_linear(fq_ctx *ctx, fq_linear_kernel k, fq_qtensor **ws, int nw, fq_tensor *x, fq_tensor *y,
                          double seconds) {
    enum { MAX_CALLS = 4096 };
    static double times[MAX_CALLS];
    fq_ctx_set_linear_kernel(ctx, k);
    if (fq_linear_4bit(ctx, x, ws[0], NULL, y) != FQ_OK) return -1; /* warm-up */
    int calls = 0;
    double start = now_s();
    do {
        double t = now_s();
        if (fq_linear_4bit(ctx, x, ws[calls % nw], NULL, y) != FQ_OK) return -1;
        times[calls++] = now_s() - t;
    } while (calls < MAX_CALLS && (now_s() - start < seconds || calls < 5));
    qsort(times, (size_t)calls, sizeof times[0], cmp_double);
    return times[calls / 2];
}

int fq_bench_linear_cpu(int argc, char **argv) {
    double seconds = 0.4;
    int threads = 0, quick = 0;
    const char *only = "mem,gemv,gemm,cross";
    long long one_n = 0, one_k = 0; /* --shape NxK: GEMV of that shape only */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc) seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--quick")) quick = 1;
        else if (!strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
        else if (!strcmp(argv[i], "--shape") && i + 1 < argc && sscanf(argv[++i], "%lldx%lld", &one_n, &one_k) == 2) {}
        else {
            fprintf(stderr, "usage: bench_linear_cpu [--threads N] [--seconds S] [--quick] [--only mem,gemv,gemm,cross] "
                            "[--shape NxK]\n");
            return 2;
        }
    }
    fq_ctx *ctx;
    if (fq_ctx_create(&ctx) != FQ_OK) return 1;
    if (threads > 0) ctx->nthreads = threads;
    char model[512];
    cpu_model(model, sizeof model);
    double load = -1;
    FILE *lf = fopen("/proc/loadavg", "r");
    if (lf) {
        if (fscanf(lf, "%lf", &load) != 1) load = -1;
        fclose(lf);
    }
    printf("cpu: %s, %d threads, isa %s, load average %.2f at start\n", model, ctx->nthreads,
           fq_cpu_isa_name(fq_cpu_isa_best()), load);

    const size_t big = (size_t)(quick ? 256 : 1024) << 20;
    /* The bandwidth baselines always run: the GEMV ratios need them. */
    double rd = mem_bw(ctx, read_task, big, 1, 5), cp = mem_bw(ctx, copy_task, big / 2, 2, 5);
    printf("memory: stream read %.1f GB/s, memcpy %.1f GB/s (read + write bytes)\n\n", rd, cp);
    (void)cp;
    if (!strstr(only, "gemv")) goto gemm;

    /* FLUX.1 linear shapes [N, K]; the M = 1 ones in a pipeline at batch 1 are
     * the AdaLN modulations (18432x3072, 9216x3072) and the embedders. */
    static const int64_t shapes[][2] = {{3072, 3072}, {12288, 3072}, {3072, 12288}, {18432, 3072},
                                        {9216, 3072}, {3072, 15360}};
    const int nshapes = one_n > 0 ? 1 : quick ? 2 : 6;
    printf("GEMV, M = 1, NF4 blocksize 64, x/y bf16, weights rotated over > 256 MiB, median call\n");
    printf("%-13s %-6s %10s %10s %10s %9s %9s\n", "N x K", "nested", "us/call", "GB/s", "read GB/s", "/read",
           "/best");
    for (int s = 0; s < nshapes; s++)
        for (int nested = 0; nested <= 1; nested++) {
            const int64_t N = one_n > 0 ? one_n : shapes[s][0], K = one_n > 0 ? one_k : shapes[s][1];
            fq_qtensor *w0 = random_weight(ctx, N, K, nested);
            if (!w0) { printf("out of memory\n"); break; }
            const size_t wb = weight_bytes(w0);
            int nw = (int)((256u << 20) / wb) + 2;
            if (quick) nw = nw > 4 ? nw / 2 : nw;
            fq_qtensor **ws = calloc((size_t)nw, sizeof *ws);
            ws[0] = w0;
            for (int i = 1; i < nw; i++) fq_qtensor_copy_to(ctx, w0, FQ_CPU, &ws[i]);
            fq_tensor *x = bf16_tensor(ctx, 1, K), *y = bf16_tensor(ctx, 1, N);
            /* The machine's bandwidth moves (other tenants): measure it again
             * right before each row and compare with that and with the best. */
            double rd_now = mem_bw(ctx, read_task, (size_t)256 << 20, 1, 3);
            if (rd_now > rd) rd = rd_now;
            double t = time_linear(ctx, FQ_LINEAR_GEMV, ws, nw, x, y, seconds);
            double gbs = (double)(wb + (size_t)(K + N) * 2) / t / 1e9;
            char nk[32];
            snprintf(nk, sizeof nk, "%lldx%lld", (long long)N, (long long)K);
            printf("%-13s %-6s %10.1f %10.1f %10.1f %8.0f%% %8.0f%%\n", nk, nested ? "yes" : "no", t * 1e6, gbs, rd_now,
                   100 * gbs / rd_now, 100 * gbs / rd);
            for (int i = 0; i < nw; i++) fq_qtensor_free(ws[i]);
            free(ws);
            fq_tensor_free(x);
            fq_tensor_free(y);
        }

gemm:
    if (!strstr(only, "gemm")) goto cross;
    printf("\nM = 256, NF4 blocksize 64, x/y bf16: GFLOP/s (2*M*N*K / time)\n");
    printf("%-13s %10s %14s %16s\n", "N x K", "GEMM", "DEQUANT_BLAS", "sgemm f32 W");
    for (int s = 0; s < (quick ? 1 : 3); s++) {
        const int64_t M = 256, N = shapes[s][0], K = shapes[s][1];
        fq_qtensor *w = random_weight(ctx, N, K, 0);
        fq_tensor *x = bf16_tensor(ctx, M, K), *y = bf16_tensor(ctx, M, N);
        const double flop = 2.0 * (double)M * (double)N * (double)K;
        double tg = time_linear(ctx, FQ_LINEAR_GEMM, &w, 1, x, y, seconds);
        double tb = time_linear(ctx, FQ_LINEAR_DEQUANT_BLAS, &w, 1, x, y, seconds);
        /* The ceiling: OpenBLAS on an f32 weight and f32 x, nothing to decode. */
        float *a = malloc((size_t)(M * K) * 4), *b = malloc((size_t)(N * K) * 4), *c = malloc((size_t)(M * N) * 4);
        for (int64_t i = 0; i < M * K; i++) a[i] = (float)(rnd() % 200) * 0.01f - 1.0f;
        for (int64_t i = 0; i < N * K; i++) b[i] = (float)(rnd() % 200) * 0.01f - 1.0f;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)N, (int)K, 1, a, (int)K, b, (int)K, 0, c, (int)N);
        double ts[15];
        for (int r = 0; r < 15; r++) {
            double t0 = now_s();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)N, (int)K, 1, a, (int)K, b, (int)K, 0, c,
                        (int)N);
            ts[r] = now_s() - t0;
        }
        qsort(ts, 15, sizeof ts[0], cmp_double);
        char nk[32];
        snprintf(nk, sizeof nk, "%lldx%lld", (long long)N, (long long)K);
        printf("%-13s %10.1f %14.1f %16.1f\n", nk, flop / tg / 1e9, flop / tb / 1e9, flop / ts[7] / 1e9);
        free(a); free(b); free(c);
        fq_qtensor_free(w);
        fq_tensor_free(x);
        fq_tensor_free(y);
    }

cross:
    if (!strstr(only, "cross")) goto done;
    printf("\ncrossover, 3072x3072 (L3-resident): us per call by M\n%-6s %10s %10s %8s\n", "M", "GEMV", "GEMM", "AUTO");
    {
        fq_qtensor *w = random_weight(ctx, 3072, 3072, 0);
        static const int64_t ms[] = {1, 2, 4, 8, 12, 16, 24, 32, 48, 64};
        for (size_t i = 0; i < (quick ? 4 : sizeof ms / sizeof ms[0]); i++) {
            fq_tensor *x = bf16_tensor(ctx, ms[i], 3072), *y = bf16_tensor(ctx, ms[i], 3072);
            double tv = time_linear(ctx, FQ_LINEAR_GEMV, &w, 1, x, y, seconds / 4);
            double tg = time_linear(ctx, FQ_LINEAR_GEMM, &w, 1, x, y, seconds / 4);
            fq_linear_kernel pick = fq_cpu_linear4_pick(ms[i], 3072, 3072, fq_cpu_isa_best());
            printf("%-6lld %10.1f %10.1f %8s\n", (long long)ms[i], tv * 1e6, tg * 1e6,
                   pick == FQ_LINEAR_GEMV ? "gemv" : "gemm");
            fq_tensor_free(x);
            fq_tensor_free(y);
        }
        fq_qtensor_free(w);
    }
done:
    fq_ctx_set_linear_kernel(ctx, FQ_LINEAR_AUTO);
    fq_ctx_free(ctx);
    return 0;
}

#ifdef FQ_BENCH_MAIN
int main(int argc, char **argv) { return fq_bench_linear_cpu(argc, argv); }
#endif

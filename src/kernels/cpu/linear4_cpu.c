/* CPU 4-bit linear: ISA choice, kernel choice, the scalar reference and the
 * GEMV driver. The SIMD inner loops live in linear4_cpu_avx2.c / _avx512.c,
 * the blocked GEMM in linear4_cpu_gemm.c, the OpenBLAS path in _blas.c. */
#include "kernels/cpu/linear4_cpu_impl.h"

fq_cpu_isa fq_cpu_isa_best(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return FQ_CPU_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return FQ_CPU_ISA_AVX2; /* every AVX2 CPU has F16C */
#endif
    return FQ_CPU_ISA_SCALAR;
}

const char *fq_cpu_isa_name(fq_cpu_isa isa) {
    switch (isa) {
    case FQ_CPU_ISA_AVX512: return "avx512";
    case FQ_CPU_ISA_AVX2: return "avx2";
    default: return "scalar";
    }
}

static const fq_l4_isa_ops *isa_ops(fq_cpu_isa isa) {
#if defined(__x86_64__) || defined(__i386__)
    if (isa == FQ_CPU_ISA_AVX512) return fq_l4_ops_avx512();
    if (isa == FQ_CPU_ISA_AVX2) return fq_l4_ops_avx2();
#else
    (void)isa;
#endif
    return NULL;
}

fq_linear_kernel fq_cpu_linear4_pick(int64_t m, int64_t n, int64_t k, fq_cpu_isa isa) {
    (void)n;
    /* Without SIMD every kernel is the scalar reference; and GEMV handles
     * any K while the fast GEMM tiles want K % 32 == 0 (FLUX: always). The
     * crossover was measured with bench_linear_cpu (docs/linear.md): the
     * GEMV streams the weight once per 8 rows of x but keeps a task's rows in
     * L1/L2, so it wins up to a few dozen rows. */
    if (isa == FQ_CPU_ISA_SCALAR || m <= 16 || k % FQ_L4_CHUNK != 0) return FQ_LINEAR_GEMV;
    return FQ_LINEAR_GEMM;
}

/* ---- scalar reference (any shape, any CPU) ---- */

typedef struct {
    const fq_cpu_linear4_args *a;
    int64_t rows_per_task;
    const fq_l4_isa_ops *ops;
    float *xd; /* GEMV: x in slot layout [m][kp] (scratch) */
} gemv_job;

/* One output row of W at a time, each element summed in k order. Blocks may
 * straddle rows and rows may start on a low nibble (odd K): the flat index
 * f = n * K + k decides both nibble and block. */
static void scalar_task(void *arg, int64_t t) {
    const gemv_job *j = arg;
    const fq_cpu_linear4_args *a = j->a;
    const fq_w4_view *w = &a->w;
    const int64_t K = w->k, N = w->n, B = w->blocksize;
    int64_t n0 = t * j->rows_per_task, n1 = n0 + j->rows_per_task < N ? n0 + j->rows_per_task : N;
    float lut[16];
    fq_l4_lut(w->type, lut);
    for (int64_t n = n0; n < n1; n++) {
        const float bias = fq_l4_bias(a, n);
        for (int64_t m = 0; m < a->m; m++) {
            float acc = 0.0f;
            const int64_t f0 = n * K;
            for (int64_t k = 0; k < K;) {
                const int64_t b = (f0 + k) / B;
                const int64_t end = (b + 1) * B - f0 < K ? (b + 1) * B - f0 : K;
                const float s = fq_l4_absmax(w, b);
                for (; k < end; k++) {
                    const int64_t f = f0 + k;
                    const uint8_t byte = w->packed[f >> 1];
                    const float wv = lut[(f & 1) ? (byte & 15) : (byte >> 4)] * s;
                    acc += wv * fq_l4_load(a->x, a->x_dtype, m * K + k);
                }
            }
            fq_l4_store(a->y, a->y_dtype, m * N + n, acc + bias);
        }
    }
}

void fq_l4_decode_scalar(const fq_w4_view *w, int64_t n, int64_t k0, int64_t kc, float *dst) {
    const int64_t K = w->k, B = w->blocksize, f0 = n * K;
    float lut[16];
    fq_l4_lut(w->type, lut);
    memset(dst, 0, (size_t)kc * sizeof(float));
    int64_t k1 = k0 + kc < K ? k0 + kc : K;
    for (int64_t k = k0; k < k1;) {
        const int64_t b = (f0 + k) / B;
        const int64_t end = (b + 1) * B - f0 < k1 ? (b + 1) * B - f0 : k1;
        const float s = fq_l4_absmax(w, b);
        for (; k < end; k++) {
            const int64_t f = f0 + k;
            const uint8_t byte = w->packed[f >> 1];
            dst[fq_l4_slot(k) - k0] = lut[(f & 1) ? (byte & 15) : (byte >> 4)] * s;
        }
    }
}

void fq_l4_pack_x_rows(const fq_cpu_linear4_args *a, int64_t m0, int64_t m1, float *dst) {
    const int64_t K = a->w.k, kp = fq_l4_pad(K);
    for (int64_t m = m0; m < m1; m++) {
        float *d = dst + (m - m0) * kp;
        for (int64_t k = K; k < kp; k++) d[fq_l4_slot(k)] = 0.0f;
        switch (a->x_dtype) {
        case FQ_F32: {
            const float *s = (const float *)a->x + m * K;
            for (int64_t k = 0; k < K; k++) d[fq_l4_slot(k)] = s[k];
            break;
        }
        case FQ_BF16: {
            const uint16_t *s = (const uint16_t *)a->x + m * K;
            for (int64_t k = 0; k < K; k++) d[fq_l4_slot(k)] = fq_l4_bf16_to_f32(s[k]);
            break;
        }
        default: {
            const uint16_t *s = (const uint16_t *)a->x + m * K;
            for (int64_t k = 0; k < K; k++) d[fq_l4_slot(k)] = fq_l4_f16_to_f32(s[k]);
            break;
        }
        }
    }
}

/* ---- GEMV driver ---- */

/* Rows of W per task: small enough that a task's packed rows stay in L1/L2
 * while every group of 8 rows of x passes over them (so M up to a few dozen
 * still reads W from memory once), large enough to amortize the call. */
static int64_t gemv_rows_per_task(const fq_cpu_linear4_args *a, int nthreads) {
    const int64_t N = a->w.n, K = a->w.k;
    int64_t bytes_per_row = K / 2 + 1, rows = (48 * 1024) / bytes_per_row;
    if (rows < 1) rows = 1;
    if (rows > 256) rows = 256; /* bound of the per-task output buffer */
    /* At least 4 tasks per thread for balance when N allows. */
    int64_t cap = N / (4 * (int64_t)(nthreads > 0 ? nthreads : 1));
    if (cap >= 1 && rows > cap) rows = cap;
    /* A multiple of 4: the SIMD kernels take weight rows in groups of 4 from
     * the task's first row, and the grouping (hence the order of each sum)
     * must not depend on the number of threads. */
    return (rows + 3) / 4 * 4;
}

/* Slots of x per pass over a task's rows. With 3 or more rows of x, r rows
 * times the slice should stay in L1 (8 rows of K = 3072 do not, and every
 * FMA would wait on L2: slicing measured 1.5-2x faster at 4 rows). One or
 * two rows are not sliced: slices cut the weight stream into pieces whose
 * prefetches were lost (measured 30% slower at K = 12288), and the kernel
 * reuses each x load for 4 weight rows anyway.
 * A slice is a multiple of the blocksize when rows hold whole blocks, since
 * the SIMD row loop then walks whole blocks. */
static int64_t gemv_slice(const fq_w4_view *w, int r, int64_t kp) {
    if (r <= 2) return kp > 0 ? kp : 1;
    int64_t s = (20 * 1024) / (4 * (int64_t)r);
    const int64_t unit = w->k % w->blocksize == 0 ? w->blocksize : FQ_L4_CHUNK;
    s = s / unit * unit;
    return s < unit ? unit : s;
}

static void gemv_task(void *arg, int64_t t) {
    const gemv_job *j = arg;
    const fq_cpu_linear4_args *a = j->a;
    const int64_t N = a->w.n, kp = fq_l4_pad(a->w.k);
    int64_t n0 = t * j->rows_per_task, n1 = n0 + j->rows_per_task < N ? n0 + j->rows_per_task : N;
    float out[256 * FQ_L4_GEMV_R];
    float bias[256];
    for (int64_t n = n0; n < n1; n++) bias[n - n0] = fq_l4_bias(a, n);
    for (int64_t m0 = 0; m0 < a->m; m0 += FQ_L4_GEMV_R) {
        int r = a->m - m0 < FQ_L4_GEMV_R ? (int)(a->m - m0) : FQ_L4_GEMV_R;
        const int64_t slice = gemv_slice(&a->w, r, kp);
        memset(out, 0, sizeof(float) * (size_t)((n1 - n0) * r));
        /* The task's packed rows are small enough to stay in L2 between slices. */
        for (int64_t k0 = 0; k0 < kp; k0 += slice)
            j->ops->gemv(&a->w, n0, n1, k0, k0 + slice < kp ? k0 + slice : kp, j->xd + m0 * kp, kp, r, out);
        for (int64_t n = n0; n < n1; n++)
            for (int q = 0; q < r; q++)
                fq_l4_store(a->y, a->y_dtype, (m0 + q) * N + n, out[(n - n0) * r + q] + bias[n - n0]);
    }
}

static void pack_task(void *arg, int64_t t) {
    const gemv_job *j = arg;
    int64_t m1 = t + 1 < j->a->m ? t + 1 : j->a->m;
    fq_l4_pack_x_rows(j->a, t, m1, j->xd + t * fq_l4_pad(j->a->w.k));
}

static int simd_gemv_ok(const fq_l4_isa_ops *ops, const fq_cpu_linear4_args *a) {
    return ops && a->w.k % FQ_L4_CHUNK == 0;
}

size_t fq_cpu_linear4_scratch_bytes(fq_linear_kernel kern, fq_cpu_isa isa, const fq_cpu_linear4_args *a) {
    const fq_l4_isa_ops *ops = isa_ops(isa);
    switch (kern) {
    case FQ_LINEAR_GEMV:
        return simd_gemv_ok(ops, a) ? (size_t)a->m * (size_t)fq_l4_pad(a->w.k) * sizeof(float) : 0;
    case FQ_LINEAR_GEMM: return ops ? fq_l4_gemm_scratch(ops, a) : 0;
    case FQ_LINEAR_DEQUANT_BLAS: return fq_l4_blas_scratch(a);
    default: return 0;
    }
}

void fq_cpu_linear4(fq_ctx *ctx, fq_linear_kernel kern, fq_cpu_isa isa, const fq_cpu_linear4_args *a,
                    void *scratch) {
    const fq_l4_isa_ops *ops = isa_ops(isa);
    if (a->m <= 0 || a->w.n <= 0) return;
    if (a->w.k == 0) { /* an empty sum: y = bias (BLAS would refuse a leading dimension of 0) */
        for (int64_t m = 0; m < a->m; m++)
            for (int64_t n = 0; n < a->w.n; n++) fq_l4_store(a->y, a->y_dtype, m * a->w.n + n, fq_l4_bias(a, n));
        return;
    }
    if (kern == FQ_LINEAR_DEQUANT_BLAS) { fq_l4_blas(ctx, ops, a, scratch); return; }
    if (kern == FQ_LINEAR_GEMM && ops) { fq_l4_gemm(ctx, ops, a, scratch); return; }
    gemv_job j = {a, gemv_rows_per_task(a, ctx ? ctx->nthreads : 1), ops, scratch};
    int64_t ntasks = (a->w.n + j.rows_per_task - 1) / j.rows_per_task;
    if (!simd_gemv_ok(ops, a)) {
        /* GEMM without SIMD, or a K the SIMD decoder cannot stride: scalar. */
        fq_l4_run(ctx, ntasks, scalar_task, &j, a->always_threads || a->m * a->w.n * a->w.k > (1 << 18));
        return;
    }
    /* Below ~1 MB of weights (a few tens of us) threads cost more than they save. */
    const int64_t bytes = a->w.n * a->w.k / 2 * (1 + (a->m - 1) / FQ_L4_GEMV_R);
    fq_l4_run(ctx, a->m, pack_task, &j, a->always_threads || a->m * a->w.k > (1 << 18));
    fq_l4_run(ctx, ntasks, gemv_task, &j, a->always_threads || bytes > (1 << 20));
}

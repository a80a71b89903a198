/* The DEQUANT_BLAS reference kernel: dequantize panels of W to f32 and let
 * OpenBLAS multiply. It exists to measure the blocked GEMM against a tuned
 * sgemm on the same machine and to cross-check it; AUTO does not pick it.
 *
 * x and the panels use the slot layout (see linear4_cpu_impl.h): the same
 * permutation of k on both sides leaves every dot product unchanged. OpenBLAS
 * runs its own thread pool; the decode and write-out use the context's. */
#include "kernels/cpu/linear4_cpu_impl.h"

#include <cblas.h>

enum { PANEL_BYTES = 8 << 20 }; /* a dequantized panel of W: 8 MiB of f32 */

typedef struct {
    const fq_cpu_linear4_args *a;
    void (*decode)(const fq_w4_view *, int64_t, int64_t, int64_t, float *);
    float *xs, *wpan, *ys; /* [m][kp], [np][kp], [m][np] */
    int64_t kp, n0, np;
} blas_job;

static int64_t panel_rows(const fq_cpu_linear4_args *a) {
    int64_t kp = fq_l4_pad(a->w.k), rows = PANEL_BYTES / (kp * (int64_t)sizeof(float) + 1);
    if (rows < 16) rows = 16;
    return rows < a->w.n ? rows : a->w.n;
}

size_t fq_l4_blas_scratch(const fq_cpu_linear4_args *a) {
    const size_t kp = (size_t)fq_l4_pad(a->w.k), np = (size_t)panel_rows(a), m = (size_t)a->m;
    return (m * kp + np * kp + m * np) * sizeof(float);
}

static void pack_task(void *arg, int64_t m) {
    const blas_job *j = arg;
    fq_l4_pack_x_rows(j->a, m, m + 1, j->xs + m * j->kp);
}

static void decode_task(void *arg, int64_t i) {
    const blas_job *j = arg;
    j->decode(&j->a->w, j->n0 + i, 0, j->kp, j->wpan + i * j->kp);
}

static void store_task(void *arg, int64_t m) {
    const blas_job *j = arg;
    const fq_cpu_linear4_args *a = j->a;
    for (int64_t i = 0; i < j->np; i++)
        fq_l4_store(a->y, a->y_dtype, m * a->w.n + j->n0 + i, j->ys[m * j->np + i] + fq_l4_bias(a, j->n0 + i));
}

void fq_l4_blas(fq_ctx *ctx, const fq_l4_isa_ops *ops, const fq_cpu_linear4_args *a, void *scratch) {
    const int64_t kp = fq_l4_pad(a->w.k), rows = panel_rows(a);
    blas_job j = {a, ops && a->w.k % FQ_L4_CHUNK == 0 ? ops->decode : fq_l4_decode_scalar, scratch, NULL, NULL,
                  kp, 0, 0};
    j.wpan = j.xs + a->m * kp;
    j.ys = j.wpan + rows * kp;
    fq_parallel_for(ctx, a->m, pack_task, &j);
    for (j.n0 = 0; j.n0 < a->w.n; j.n0 += rows) {
        j.np = a->w.n - j.n0 < rows ? a->w.n - j.n0 : rows;
        fq_parallel_for(ctx, j.np, decode_task, &j);
        /* 64-bit sizes reach OpenBLAS as blasint (int unless built INTERFACE64);
         * the ops layer refuses shapes beyond that for this kernel. */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)a->m, (blasint)j.np, (blasint)kp, 1.0f, j.xs,
                    (blasint)kp, j.wpan, (blasint)kp, 0.0f, j.ys, (blasint)j.np);
        fq_parallel_for(ctx, a->m, store_task, &j);
    }
}

/* Blocked 4-bit GEMM for larger M: y[m][n] = sum_k x[m][k] * W[n][k] + bias[n].
 *
 * x is converted once into slivers of NR rows, k-major ([sliver][slot][NR]),
 * so the micro-kernel loads NR rows' values of one k as whole vectors. Each
 * task owns a tile of up to FQ_L4_MT rows of x by NB rows of W and walks K in
 * steps of FQ_L4_KC: MR rows of W are dequantized into an L1-resident panel
 * (which costs little: every decoded weight then meets FQ_L4_MT rows of x) and
 * multiplied against the task's slivers, whose KC-slice stays in L2 for all
 * the task's panels. The f32 accumulator tile lives on the task's stack, so
 * the kernel needs no scratch beyond the packed x. */
#include "kernels/cpu/linear4_cpu_impl.h"

enum { MAX_MR = 16, MAX_NB = 112 };

typedef struct {
    const fq_cpu_linear4_args *a;
    const fq_l4_isa_ops *ops;
    void (*decode)(const fq_w4_view *, int64_t, int64_t, int64_t, float *);
    float *xp;          /* [nsl][kp][nr] */
    int64_t kp, nsl, nb, ntn;
} gemm_job;

static int64_t nb_of(const fq_l4_isa_ops *ops) { return MAX_NB / ops->mr * ops->mr; }

size_t fq_l4_gemm_scratch(const fq_l4_isa_ops *ops, const fq_cpu_linear4_args *a) {
    const int64_t nsl = (a->m + ops->nr - 1) / ops->nr;
    return (size_t)nsl * (size_t)fq_l4_pad(a->w.k) * (size_t)ops->nr * sizeof(float);
}

/* Packs sliver s: xp[s][slot(k)][j] = x[s * nr + j][k], zero past M and K. */
static void pack_task(void *arg, int64_t s) {
    const gemm_job *g = arg;
    const fq_cpu_linear4_args *a = g->a;
    const int64_t K = a->w.k, nr = g->ops->nr, m0 = s * nr;
    float *d = g->xp + s * g->kp * nr;
    memset(d, 0, (size_t)(g->kp * nr) * sizeof(float));
    for (int64_t j = 0; j < nr && m0 + j < a->m; j++) {
        const int64_t row = (m0 + j) * K;
        switch (a->x_dtype) {
        case FQ_F32:
            for (int64_t k = 0; k < K; k++) d[fq_l4_slot(k) * nr + j] = ((const float *)a->x)[row + k];
            break;
        case FQ_BF16:
            for (int64_t k = 0; k < K; k++)
                d[fq_l4_slot(k) * nr + j] = fq_l4_bf16_to_f32(((const uint16_t *)a->x)[row + k]);
            break;
        default:
            for (int64_t k = 0; k < K; k++)
                d[fq_l4_slot(k) * nr + j] = fq_l4_f16_to_f32(((const uint16_t *)a->x)[row + k]);
            break;
        }
    }
}

static void gemm_task(void *arg, int64_t t) {
    const gemm_job *g = arg;
    const fq_cpu_linear4_args *a = g->a;
    const int64_t N = a->w.n, M = a->m, mr = g->ops->mr, nr = g->ops->nr;
    const int64_t tm = t / g->ntn, tn = t % g->ntn;
    const int64_t m0 = tm * FQ_L4_MT, m1 = m0 + FQ_L4_MT < M ? m0 + FQ_L4_MT : M;
    const int64_t n0 = tn * g->nb, n1 = n0 + g->nb < N ? n0 + g->nb : N;
    const int64_t s0 = m0 / nr, s1 = (m1 + nr - 1) / nr;
    /* Rows of the tile: [n - n0][m - m0], stride FQ_L4_MT. */
    float ctile[MAX_NB * FQ_L4_MT];
    float wp[MAX_MR * FQ_L4_KC];
    memset(ctile, 0, sizeof ctile);
    memset(wp, 0, sizeof wp); /* rows past N stay zero */
    for (int64_t k0 = 0; k0 < g->kp; k0 += FQ_L4_KC) {
        const int64_t kc = g->kp - k0 < FQ_L4_KC ? g->kp - k0 : FQ_L4_KC;
        for (int64_t p0 = n0; p0 < n1; p0 += mr) {
            for (int64_t i = 0; i < mr && p0 + i < n1; i++) g->decode(&a->w, p0 + i, k0, kc, wp + i * FQ_L4_KC);
            for (int64_t s = s0; s < s1; s++)
                g->ops->ukr(kc, wp, g->xp + (s * g->kp + k0) * nr, ctile + (p0 - n0) * FQ_L4_MT + (s - s0) * nr,
                            FQ_L4_MT);
        }
    }
    for (int64_t n = n0; n < n1; n++) {
        const float bias = fq_l4_bias(a, n);
        const float *c = ctile + (n - n0) * FQ_L4_MT;
        for (int64_t m = m0; m < m1; m++) fq_l4_store(a->y, a->y_dtype, m * N + n, c[m - m0] + bias);
    }
}

void fq_l4_gemm(fq_ctx *ctx, const fq_l4_isa_ops *ops, const fq_cpu_linear4_args *a, void *scratch) {
    FQ_ASSERT(ops->mr <= MAX_MR && FQ_L4_MT % ops->nr == 0);
    gemm_job g = {a, ops, a->w.k % FQ_L4_CHUNK == 0 ? ops->decode : fq_l4_decode_scalar, scratch,
                  fq_l4_pad(a->w.k), (a->m + ops->nr - 1) / ops->nr, nb_of(ops), 0};
    g.ntn = (a->w.n + g.nb - 1) / g.nb;
    const int64_t ntm = (a->m + FQ_L4_MT - 1) / FQ_L4_MT;
    fq_l4_run(ctx, g.nsl, pack_task, &g, a->always_threads || a->m * a->w.k > (1 << 18));
    /* 2 * 32 * N * K flops per sliver; under ~16 MFLOP (tens of us) stay on one thread. */
    fq_l4_run(ctx, ntm * g.ntn, gemm_task, &g, a->always_threads || g.nsl * a->w.n * a->w.k > (1 << 23));
}

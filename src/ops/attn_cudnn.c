/* Attention on cuDNN's fused flash-attention engine (see attn_cudnn.h).
 *
 * The op is expressed as a cuDNN backend operation graph, the form cuDNN's
 * runtime-fusion engines match against their fused attention kernels:
 *
 *   s  = q · kᵀ                 matmul, f32 accumulation   [B, H, S, S] virtual f32
 *   s *= scale                  pointwise MUL by a by-value f32 scalar (1/sqrt(dh))
 *   m  = max_j s                reduction MAX               [B, H, S, 1] virtual
 *   e  = exp(s - m)             pointwise SUB, EXP
 *   z  = sum_j e                reduction ADD               [B, H, S, 1] virtual
 *   m + log z                   pointwise LOG, ADD: the softmax statistics, virtual
 *                               (unused here; part of the softmax pattern)
 *   p  = e / z                  pointwise DIV, virtual, in the i/o dtype (P is fed
 *                               to the second matmul rounded to bf16/f16)
 *   out = p · v                 matmul
 *
 * q, k, v and out are read in place from our [B, S, H*dh] rows: as [B, H, S, dh]
 * tensors with strides (S*H*dh, dh, H*dh, 1); k enters the first matmul as kᵀ
 * [B, H, dh, S] with strides (S*H*dh, dh, 1, H*dh). Virtual tensors are never
 * stored: the engine keeps them in registers and shared memory.
 *
 * Engine choice: heuristics mode A, then mode B; the first engine config whose
 * execution plan finalizes is kept with all the descriptors it references, in
 * a small per-device cache. The variant pack (the data pointers) is rebuilt only
 * when the pointers change: a forward's buffers do not, so a forward creates
 * nothing after its plan was built. */
#ifdef FQ_HAVE_CUDA
#include "ops/attn_cudnn.h"

#ifdef FQ_HAVE_CUDNN
#include <cudnn.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NPLANS 16  /* plans per device, replaced round robin           */
#define MAXDESC 48 /* descriptors one plan keeps alive (38 used)      */
#define MAXCFG 16  /* engine configs tried per heuristics mode          */

enum { UID_Q = 1, UID_K, UID_V, UID_O, UID_SCALE, UID_VIRTUAL = 100 };

typedef struct {
    int used, ok;
    fq_dtype dt;
    int64_t B, S, H, dh;
    cudnnBackendDescriptor_t plan;
    cudnnBackendDescriptor_t keep[MAXDESC]; /* graph, ops, tensors, engine config */
    int nkeep;
    size_t ws;
    float scale;                   /* by-value operand: the pack points at it */
    cudnnBackendDescriptor_t pack; /* variant pack for ptr[]                  */
    const void *ptr[5];            /* q, k, v, out, workspace                 */
    char why[600];                 /* why cuDNN has no plan (ok == 0)         */
} plan_t;

struct fq_attn_cudnn_cache {
    plan_t p[NPLANS];
    int next;
};

int fq_attn_cudnn_available(void) { return 1; }

int fq_attn_cudnn_shape_ok(int64_t dh, fq_dtype rnd, fq_dtype xt) {
    return (rnd == FQ_BF16 || rnd == FQ_F16) && xt == rnd && dh >= 8 && dh <= 256 && dh % 8 == 0;
}

/* ---- building a graph: the first failing call is remembered ---------------------------- */

typedef struct {
    cudnnStatus_t st;
    const char *what;
    plan_t *p;
} bld;

static cudnnBackendDescriptor_t mk(bld *b, cudnnBackendDescriptorType_t type) {
    cudnnBackendDescriptor_t x = NULL;
    if (b->st != CUDNN_STATUS_SUCCESS) return NULL;
    if (b->p->nkeep >= MAXDESC) {
        b->st = CUDNN_STATUS_INTERNAL_ERROR;
        b->what = "descriptor table (internal: MAXDESC)";
        return NULL;
    }
    b->st = cudnnBackendCreateDescriptor(type, &x);
    if (b->st != CUDNN_STATUS_SUCCESS) {
        b->what = "cudnnBackendCreateDescriptor";
        return NULL;
    }
    b->p->keep[b->p->nkeep++] = x;
    return x;
}

static void set_attr(bld *b, cudnnBackendDescriptor_t x, cudnnBackendAttributeName_t a,
                     cudnnBackendAttributeType_t t, int64_t n, const void *v, const char *what) {
    if (b->st != CUDNN_STATUS_SUCCESS) return;
    b->st = cudnnBackendSetAttribute(x, a, t, n, v);
    if (b->st != CUDNN_STATUS_SUCCESS) b->what = what;
}
#define SET(b, x, a, t, n, v) set_attr((b), (x), (a), (t), (n), (v), "cudnnBackendSetAttribute(" #a ")")

static void fin(bld *b, cudnnBackendDescriptor_t x, const char *what) {
    if (b->st != CUDNN_STATUS_SUCCESS) return;
    b->st = cudnnBackendFinalize(x);
    if (b->st != CUDNN_STATUS_SUCCESS) b->what = what;
}

static cudnnBackendDescriptor_t tensor(bld *b, int64_t uid, cudnnDataType_t dt, const int64_t dim[4],
                                       const int64_t str[4], bool is_virtual, bool by_value) {
    cudnnBackendDescriptor_t t = mk(b, CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    const int64_t align = 16;
    SET(b, t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &dt);
    SET(b, t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dim);
    SET(b, t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, str);
    SET(b, t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid);
    SET(b, t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &align);
    if (is_virtual) SET(b, t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual);
    if (by_value) SET(b, t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value);
    fin(b, t, "cudnnBackendFinalize(tensor)");
    return t;
}

static cudnnBackendDescriptor_t matmul(bld *b, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t w,
                                       cudnnBackendDescriptor_t y) {
    const cudnnDataType_t f32 = CUDNN_DATA_FLOAT;
    cudnnBackendDescriptor_t md = mk(b, CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    SET(b, md, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &f32);
    fin(b, md, "cudnnBackendFinalize(matmul)");
    cudnnBackendDescriptor_t op = mk(b, CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    SET(b, op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x);
    SET(b, op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &w);
    SET(b, op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y);
    SET(b, op, CUDNN_ATTR_OPERATION_MATMUL_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &md);
    fin(b, op, "cudnnBackendFinalize(matmul operation)");
    return op;
}

/* y = mode(x) or mode(x, z) (z broadcast along the dims where it is 1). */
static cudnnBackendDescriptor_t pointwise(bld *b, cudnnPointwiseMode_t mode, cudnnBackendDescriptor_t x,
                                          cudnnBackendDescriptor_t z, cudnnBackendDescriptor_t y) {
    const cudnnDataType_t f32 = CUDNN_DATA_FLOAT;
    cudnnBackendDescriptor_t pd = mk(b, CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    SET(b, pd, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    SET(b, pd, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &f32);
    fin(b, pd, "cudnnBackendFinalize(pointwise)");
    cudnnBackendDescriptor_t op = mk(b, CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    SET(b, op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &pd);
    SET(b, op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x);
    if (z) SET(b, op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &z);
    SET(b, op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y);
    fin(b, op, "cudnnBackendFinalize(pointwise operation)");
    return op;
}

/* y [.., 1] = reduce(x) over the last dim. */
static cudnnBackendDescriptor_t reduction(bld *b, cudnnReduceTensorOp_t mode, cudnnBackendDescriptor_t x,
                                          cudnnBackendDescriptor_t y) {
    const cudnnDataType_t f32 = CUDNN_DATA_FLOAT;
    cudnnBackendDescriptor_t rd = mk(b, CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    SET(b, rd, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode);
    SET(b, rd, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &f32);
    fin(b, rd, "cudnnBackendFinalize(reduction)");
    cudnnBackendDescriptor_t op = mk(b, CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    SET(b, op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x);
    SET(b, op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y);
    SET(b, op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &rd);
    fin(b, op, "cudnnBackendFinalize(reduction operation)");
    return op;
}

/* The operation graph of one attention shape (see the top of the file). */
static cudnnBackendDescriptor_t attention_graph(bld *b, cudnnHandle_t h, int with_stats) {
    const plan_t *p = b->p;
    const int64_t B = p->B, S = p->S, H = p->H, dh = p->dh, ld = H * dh;
    const cudnnDataType_t io = p->dt == FQ_BF16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_HALF, f32 = CUDNN_DATA_FLOAT;
    const int64_t qd[4] = {B, H, S, dh}, qs[4] = {S * ld, dh, ld, 1};
    const int64_t kd[4] = {B, H, dh, S}, ks[4] = {S * ld, dh, 1, ld};
    const int64_t sd[4] = {B, H, S, S}, ss[4] = {H * S * S, S * S, S, 1};
    const int64_t rd[4] = {B, H, S, 1}, rs[4] = {H * S, S, 1, 1};
    const int64_t one[4] = {1, 1, 1, 1};
    cudnnBackendDescriptor_t q = tensor(b, UID_Q, io, qd, qs, false, false);
    cudnnBackendDescriptor_t kt = tensor(b, UID_K, io, kd, ks, false, false);
    cudnnBackendDescriptor_t v = tensor(b, UID_V, io, qd, qs, false, false);
    cudnnBackendDescriptor_t o = tensor(b, UID_O, io, qd, qs, false, false);
    cudnnBackendDescriptor_t scale = tensor(b, UID_SCALE, f32, one, one, false, true);
    int64_t u = UID_VIRTUAL;
    cudnnBackendDescriptor_t s = tensor(b, u++, f32, sd, ss, true, false);
    cudnnBackendDescriptor_t s_scaled = tensor(b, u++, f32, sd, ss, true, false);
    cudnnBackendDescriptor_t mx = tensor(b, u++, f32, rd, rs, true, false);
    cudnnBackendDescriptor_t s_sub = tensor(b, u++, f32, sd, ss, true, false);
    cudnnBackendDescriptor_t e = tensor(b, u++, f32, sd, ss, true, false);
    cudnnBackendDescriptor_t z = tensor(b, u++, f32, rd, rs, true, false);
    cudnnBackendDescriptor_t logz = with_stats ? tensor(b, u++, f32, rd, rs, true, false) : NULL;
    cudnnBackendDescriptor_t stats = with_stats ? tensor(b, u++, f32, rd, rs, true, false) : NULL;
    cudnnBackendDescriptor_t pr = tensor(b, u++, io, sd, ss, true, false);
    cudnnBackendDescriptor_t ops[10];
    ops[0] = matmul(b, q, kt, s);
    ops[1] = pointwise(b, CUDNN_POINTWISE_MUL, s, scale, s_scaled);
    ops[2] = reduction(b, CUDNN_REDUCE_TENSOR_MAX, s_scaled, mx);
    ops[3] = pointwise(b, CUDNN_POINTWISE_SUB, s_scaled, mx, s_sub);
    ops[4] = pointwise(b, CUDNN_POINTWISE_EXP, s_sub, NULL, e);
    ops[5] = reduction(b, CUDNN_REDUCE_TENSOR_ADD, e, z);
    ops[6] = pointwise(b, CUDNN_POINTWISE_DIV, e, z, pr);
    ops[7] = matmul(b, pr, v, o);
    if (with_stats) {
        ops[8] = pointwise(b, CUDNN_POINTWISE_LOG, z, NULL, logz);
        ops[9] = pointwise(b, CUDNN_POINTWISE_ADD, mx, logz, stats);
    }
    cudnnBackendDescriptor_t g = mk(b, CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    SET(b, g, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &h);
    SET(b, g, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, with_stats ? 10 : 8, ops);
    fin(b, g, "cudnnBackendFinalize(operation graph)");
    return g;
}

/* Heuristics mode A, then B: the first engine config whose plan finalizes. */
static void choose_engine(bld *b, cudnnHandle_t h, cudnnBackendDescriptor_t g) {
    plan_t *p = b->p;
    const cudnnBackendHeurMode_t modes[2] = {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_B};
    for (int mi = 0; mi < 2 && b->st == CUDNN_STATUS_SUCCESS && !p->plan; mi++) {
        cudnnBackendDescriptor_t heur = NULL, cfg[MAXCFG] = {0};
        int64_t n = 0, got = 0;
        b->st = cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, &heur);
        if (b->st != CUDNN_STATUS_SUCCESS) {
            b->what = "cudnnBackendCreateDescriptor(engine heuristics)";
            return;
        }
        b->st = cudnnBackendSetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                         1, &g);
        if (b->st == CUDNN_STATUS_SUCCESS)
            b->st = cudnnBackendSetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &modes[mi]);
        if (b->st == CUDNN_STATUS_SUCCESS) b->st = cudnnBackendFinalize(heur);
        if (b->st == CUDNN_STATUS_SUCCESS)
            b->st = cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &n,
                                             NULL);
        if (b->st != CUDNN_STATUS_SUCCESS) {
            /* this mode has nothing for the graph: say why, try the next one */
            char last[200] = "";
            cudnnGetLastErrorString(last, sizeof last);
            snprintf(p->why, sizeof p->why, "engine heuristics mode %c: %s%s%s", mi ? 'B' : 'A',
                     cudnnGetErrorString(b->st), last[0] ? ": " : "", last);
            (void)cudnnBackendDestroyDescriptor(heur);
            b->st = CUDNN_STATUS_SUCCESS;
            continue;
        }
        if (n > MAXCFG) n = MAXCFG;
        for (int64_t i = 0; i < n && b->st == CUDNN_STATUS_SUCCESS; i++) {
            b->st = cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, &cfg[i]);
            if (b->st != CUDNN_STATUS_SUCCESS) b->what = "cudnnBackendCreateDescriptor(engine config)";
        }
        if (b->st == CUDNN_STATUS_SUCCESS && n > 0) {
            b->st = cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, n,
                                             &got, cfg);
            if (b->st != CUDNN_STATUS_SUCCESS) b->what = "cudnnBackendGetAttribute(engine heuristics results)";
        }
        /* the first config whose execution plan finalizes; the others' failures are
         * expected (engines that do not take this graph) and only reported when
         * none does */
        int keep = -1;
        for (int64_t i = 0; i < got && b->st == CUDNN_STATUS_SUCCESS && keep < 0; i++) {
            cudnnBackendDescriptor_t plan = NULL;
            cudnnStatus_t st = cudnnBackendCreateDescriptor(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &plan);
            if (st == CUDNN_STATUS_SUCCESS)
                st = cudnnBackendSetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &h);
            if (st == CUDNN_STATUS_SUCCESS)
                st = cudnnBackendSetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG,
                                              CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &cfg[i]);
            if (st == CUDNN_STATUS_SUCCESS) st = cudnnBackendFinalize(plan);
            if (st == CUDNN_STATUS_SUCCESS) {
                p->plan = plan;
                keep = (int)i;
            } else {
                char last[200] = "";
                cudnnGetLastErrorString(last, sizeof last);
                if (plan) (void)cudnnBackendDestroyDescriptor(plan);
                snprintf(p->why, sizeof p->why, "no engine config of heuristics mode %c finalizes (last: %s%s%s)",
                         mi ? 'B' : 'A', cudnnGetErrorString(st), last[0] ? ": " : "", last);
            }
        }
        if (got == 0 && b->st == CUDNN_STATUS_SUCCESS)
            snprintf(p->why, sizeof p->why, "heuristics mode %c offer no engine", mi ? 'B' : 'A');
        for (int64_t i = 0; i < n; i++) {
            if (i == keep && p->nkeep < MAXDESC) p->keep[p->nkeep++] = cfg[i];
            else if (cfg[i]) (void)cudnnBackendDestroyDescriptor(cfg[i]);
        }
        (void)cudnnBackendDestroyDescriptor(heur);
    }
    if (b->st == CUDNN_STATUS_SUCCESS && p->plan) {
        int64_t ws = 0, cnt = 0;
        b->st = cudnnBackendGetAttribute(p->plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &cnt,
                                         &ws);
        if (b->st != CUDNN_STATUS_SUCCESS) b->what = "cudnnBackendGetAttribute(workspace size)";
        p->ws = ws > 0 ? (size_t)ws : 0;
    }
}

/* ---- the per-device cache ----------------------------------------------------------------- */

static void plan_clear(plan_t *p) {
    if (p->pack) (void)cudnnBackendDestroyDescriptor(p->pack);
    if (p->plan) (void)cudnnBackendDestroyDescriptor(p->plan);
    for (int i = p->nkeep - 1; i >= 0; i--) (void)cudnnBackendDestroyDescriptor(p->keep[i]);
    memset(p, 0, sizeof *p);
}

/* Called by fq_cuda_dev_release_all under d's guard, after its stream is idle. */
static void release(fq_cuda_dev *d) {
    if (d->attn_cudnn) {
        for (int i = 0; i < NPLANS; i++) plan_clear(&d->attn_cudnn->p[i]);
        free(d->attn_cudnn);
        d->attn_cudnn = NULL;
    }
    if (d->cudnn) (void)cudnnDestroy((cudnnHandle_t)d->cudnn);
    d->cudnn = NULL;
}

static const char *dname(fq_dtype dt) { return dt == FQ_BF16 ? "bf16" : "f16"; }

static fq_status cudnn_err(fq_ctx *ctx, const fq_cuda_dev *d, const plan_t *p, const char *what, cudnnStatus_t st) {
    char last[512] = "";
    cudnnGetLastErrorString(last, sizeof last);
    char shape[96] = "";
    if (p)
        snprintf(shape, sizeof shape, " %s B%lld S%lld H%lld dh%lld", dname(p->dt), (long long)p->B, (long long)p->S,
                 (long long)p->H, (long long)p->dh);
    return fq_err(ctx, st == CUDNN_STATUS_ALLOC_FAILED ? FQ_ERR_OUT_OF_MEMORY : FQ_ERR_CUDA,
                  "attention (cuDNN%s) on cuda:%d: %s failed: %s%s%s", shape, d->index, what, cudnnGetErrorString(st),
                  last[0] ? ": " : "", last);
}

/* The handle of d, bound to d's stream, and its plan cache (created once). */
static fq_status ready(fq_ctx *ctx, fq_cuda_dev *d) {
    if (!d->cudnn) {
        fq_cuda_guard g;
        FQ_TRY(fq_cuda_guard_enter(ctx, d->index, &g));
        cudnnHandle_t h = NULL;
        cudnnStatus_t st = cudnnCreate(&h);
        const char *what = "cudnnCreate";
        if (st == CUDNN_STATUS_SUCCESS) {
            st = cudnnSetStream(h, d->stream);
            what = "cudnnSetStream";
            if (st != CUDNN_STATUS_SUCCESS) (void)cudnnDestroy(h);
        }
        fq_cuda_guard_exit(&g);
        if (st != CUDNN_STATUS_SUCCESS) return cudnn_err(ctx, d, NULL, what, st);
        d->cudnn = h;
        d->cudnn_release = release;
    }
    if (!d->attn_cudnn) {
        d->attn_cudnn = calloc(1, sizeof *d->attn_cudnn);
        if (!d->attn_cudnn) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "attention (cuDNN): out of host memory");
    }
    return FQ_OK;
}

/* The cached plan of these sizes, built if missing; *out = NULL when cuDNN has
 * none (strict = 0; strict = 1 reports it). */
static fq_status find_plan(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh,
                           int strict, plan_t **out) {
    *out = NULL;
    if (!fq_attn_cudnn_shape_ok(dh, dt, dt) || B < 1 || S < 1 || H < 1)
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "attention (cuDNN): %s head dim %lld is not supported",
                      fq_dtype_name(dt), (long long)dh);
    FQ_TRY(ready(ctx, d));
    struct fq_attn_cudnn_cache *c = d->attn_cudnn;
    plan_t *p = NULL;
    for (int i = 0; i < NPLANS && !p; i++)
        if (c->p[i].used && c->p[i].dt == dt && c->p[i].B == B && c->p[i].S == S && c->p[i].H == H &&
            c->p[i].dh == dh)
            p = &c->p[i];
    if (!p) {
        p = &c->p[c->next];
        c->next = (c->next + 1) % NPLANS;
        if (p->used) {
            /* the slot's plan may still have work queued */
            fq_cuda_guard g;
            FQ_TRY(fq_cuda_guard_enter(ctx, d->index, &g));
            cudaError_t e = cudaStreamSynchronize(d->stream);
            fq_cuda_guard_exit(&g);
            if (e != cudaSuccess) return fq_cuda_status(ctx, e, "attention (cuDNN): cudaStreamSynchronize", d->index);
            plan_clear(p);
        }
        p->used = 1;
        p->dt = dt, p->B = B, p->S = S, p->H = H, p->dh = dh;
        p->scale = (float)(1.0 / sqrt((double)dh));
        /* the softmax as cudnn-frontend lowers it (statistics m + log z computed,
         * virtual), else without the statistics */
        char first[sizeof p->why] = "";
        for (int with_stats = 1; with_stats >= 0 && !p->ok; with_stats--) {
            if (with_stats == 0) memcpy(first, p->why, sizeof first);
            for (int i = p->nkeep - 1; i >= 0; i--) (void)cudnnBackendDestroyDescriptor(p->keep[i]);
            p->nkeep = 0;
            bld b = {CUDNN_STATUS_SUCCESS, NULL, p};
            fq_cuda_guard g;
            FQ_TRY(fq_cuda_guard_enter(ctx, d->index, &g));
            cudnnBackendDescriptor_t graph = attention_graph(&b, (cudnnHandle_t)d->cudnn, with_stats);
            if (b.st == CUDNN_STATUS_SUCCESS) choose_engine(&b, (cudnnHandle_t)d->cudnn, graph);
            fq_cuda_guard_exit(&g);
            /* any failure leaves a slot that says why: AUTO then runs our kernel, a
             * forced cuDNN call reports it */
            p->ok = b.st == CUDNN_STATUS_SUCCESS && p->plan != NULL;
            if (!p->ok && b.st != CUDNN_STATUS_SUCCESS) {
                char last[256] = "";
                cudnnGetLastErrorString(last, sizeof last);
                snprintf(p->why, sizeof p->why, "%s failed: %s%s%s", b.what ? b.what : "?",
                         cudnnGetErrorString(b.st), last[0] ? ": " : "", last);
            }
        }
        if (!p->ok) {
            char second[sizeof p->why];
            memcpy(second, p->why, sizeof second);
            snprintf(p->why, sizeof p->why, "with the softmax statistics: %s; without: %s",
                     first[0] ? first : "no execution plan", second[0] ? second : "no execution plan");
        }
    }
    if (!p->ok) {
        if (!strict) return FQ_OK;
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "attention (cuDNN %s B%lld S%lld H%lld dh%lld) on cuda:%d: %s",
                      dname(dt), (long long)B, (long long)S, (long long)H, (long long)dh, d->index, p->why);
    }
    *out = p;
    return FQ_OK;
}

fq_status fq_attn_cudnn_plan(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh,
                             int strict, int *ok, size_t *ws_bytes) {
    plan_t *p = NULL;
    *ok = 0;
    *ws_bytes = 0;
    FQ_TRY(find_plan(ctx, d, dt, B, S, H, dh, strict, &p));
    if (p) {
        *ok = 1;
        *ws_bytes = p->ws;
    }
    return FQ_OK;
}

fq_status fq_attn_cudnn_run(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh,
                            const void *q, const void *k, const void *v, void *out, void *ws, size_t ws_bytes,
                            int strict, int *ran) {
    plan_t *p = NULL;
    *ran = 0;
    FQ_TRY(find_plan(ctx, d, dt, B, S, H, dh, strict, &p));
    if (!p) return FQ_OK;
    const uintptr_t mis = ((uintptr_t)q | (uintptr_t)k | (uintptr_t)v | (uintptr_t)out) & 15u;
    /* out over q, k or v would be overwritten while other CTAs still read it */
    const uintptr_t nb = (uintptr_t)(B * S * H * dh * 2), o0 = (uintptr_t)out;
    const uintptr_t in[3] = {(uintptr_t)q, (uintptr_t)k, (uintptr_t)v};
    int alias = 0;
    for (int i = 0; i < 3; i++) alias |= o0 < in[i] + nb && in[i] < o0 + nb;
    if (mis || alias || (p->ws && (!ws || ws_bytes < p->ws))) {
        if (!strict) return FQ_OK;
        if (mis) return fq_err(ctx, FQ_ERR_SHAPE, "attention (cuDNN): q, k, v and out must be 16-byte aligned");
        if (alias) return fq_err(ctx, FQ_ERR_INVALID_ARG, "attention (cuDNN): out overlaps q, k or v");
        return fq_err(ctx, FQ_ERR_SHAPE,
                      "attention (cuDNN): scratch of %zu bytes is smaller than the plan's workspace of %zu bytes "
                      "(size it with fq_nn_attention_plan)",
                      ws ? ws_bytes : (size_t)0, p->ws);
    }
    const void *ptr[5] = {q, k, v, out, ws};
    if (!p->pack || memcmp(ptr, p->ptr, sizeof ptr) != 0) {
        /* new buffers: a new variant pack (a forward's buffers stay the same) */
        if (p->pack) (void)cudnnBackendDestroyDescriptor(p->pack);
        p->pack = NULL;
        memset(p->ptr, 0, sizeof p->ptr);
        const int64_t uids[5] = {UID_Q, UID_K, UID_V, UID_O, UID_SCALE};
        void *data[5] = {(void *)q, (void *)k, (void *)v, out, &p->scale};
        cudnnBackendDescriptor_t pack = NULL;
        cudnnStatus_t st = cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &pack);
        const char *what = "cudnnBackendCreateDescriptor(variant pack)";
        if (st == CUDNN_STATUS_SUCCESS) {
            what = "cudnnBackendSetAttribute(variant pack)";
            st = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, 5, uids);
        }
        if (st == CUDNN_STATUS_SUCCESS)
            st = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, 5, data);
        if (st == CUDNN_STATUS_SUCCESS)
            st = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &ws);
        if (st == CUDNN_STATUS_SUCCESS) {
            what = "cudnnBackendFinalize(variant pack)";
            st = cudnnBackendFinalize(pack);
        }
        if (st != CUDNN_STATUS_SUCCESS) {
            if (pack) (void)cudnnBackendDestroyDescriptor(pack);
            return cudnn_err(ctx, d, p, what, st);
        }
        p->pack = pack;
        memcpy(p->ptr, ptr, sizeof ptr);
    }
    cudnnStatus_t st = cudnnBackendExecute((cudnnHandle_t)d->cudnn, p->plan, p->pack);
    if (st != CUDNN_STATUS_SUCCESS) return cudnn_err(ctx, d, p, "cudnnBackendExecute", st);
    *ran = 1;
    return FQ_OK;
}

#else /* CUDA without cuDNN: the own kernel only */

int fq_attn_cudnn_available(void) { return 0; }

int fq_attn_cudnn_shape_ok(int64_t dh, fq_dtype rnd, fq_dtype xt) {
    (void)dh, (void)rnd, (void)xt;
    return 0;
}

static fq_status none(fq_ctx *ctx) {
    return fq_err(ctx, FQ_ERR_UNSUPPORTED, "attention: this build has no cuDNN (cudnn.h was not found)");
}

fq_status fq_attn_cudnn_plan(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh,
                             int strict, int *ok, size_t *ws_bytes) {
    (void)d, (void)dt, (void)B, (void)S, (void)H, (void)dh;
    *ok = 0;
    *ws_bytes = 0;
    return strict ? none(ctx) : FQ_OK;
}

fq_status fq_attn_cudnn_run(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh,
                            const void *q, const void *k, const void *v, void *out, void *ws, size_t ws_bytes,
                            int strict, int *ran) {
    (void)d, (void)dt, (void)B, (void)S, (void)H, (void)dh, (void)q, (void)k, (void)v, (void)out, (void)ws;
    (void)ws_bytes;
    *ran = 0;
    return strict ? none(ctx) : FQ_OK;
}
#endif
#else
typedef int fq_attn_cudnn_unused; /* ISO C forbids an empty translation unit */
#endif

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
 * stored: the engine keeps them in registers and shared memory. A graph may
 * take Sq < S query rows (a range of q and out, still with the batch stride of
 * S rows) against all S key rows: the scores are then [B, H, Sq, S]
 * (fq_attn_cudnn_run_rows). The op itself is one call over all rows: at FLUX's
 * 4608 tokens every split into ranges measured slower (docs/flux-gpu.md).
 *
 * Engine choice: mode 0 (the default) keeps the first engine config of
 * heuristics mode A, then B, whose execution plan finalizes. Mode 1
 * (FQ_ATTN_CUDNN_TUNE=1) times every config that heuristics modes A, B and
 * FALLBACK offer for either graph (with and without the statistics) and whose
 * plan finalizes, on the device's stream, on temporary buffers of the shape
 * (raw cudaMalloc, freed before returning: the plan's memory is what our
 * allocator holds), round robin, a median per config; the fastest is kept
 * unless it is within 1% of the first config (mode 0's), so that timing noise
 * does not flip a tie. Mode 2 adds every engine of the graph and knob variants
 * (exploring). The kept plan stays with all the descriptors it references in a
 * small per-device cache; the plan's workspace is the kept config's. A plan
 * keeps the variant packs (the data pointers) of its last NPACK pointer sets:
 * a forward's buffers do not change, so a forward creates nothing after its
 * plan was built (and ranges of equal size, which share a plan, do not rebuild
 * packs in turn). */
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
#include <time.h>

#define NPLANS 16   /* plans per device, replaced round robin                       */
#define MAXDESC 128 /* descriptors one plan keeps alive (2 graphs of ~38, its config) */
#define MAXCFG 24   /* engine configs taken per heuristics mode                     */
#define MAXCAND 96  /* engine configs gathered per shape                            */
#define MAXKNOB FQ_ATTN_CUDNN_MAXKNOB 
#define REPS 7      /* timed rounds per config (the median is kept)                 */
#define NPACK 4     /* variant packs a plan keeps (pointer sets), replaced round robin */

enum { UID_Q = 1, UID_K, UID_V, UID_O, UID_SCALE, UID_VIRTUAL = 100 };

typedef struct {
    cudnnBackendDescriptor_t d; /* variant pack for ptr[] (NULL: unused) */
    const void *ptr[5];         /* q, k, v, out, workspace              */
} pack_t;

typedef struct {
    int used, ok;
    fq_dtype dt;
    int64_t B, Sq, Skv, H, dh;     /* Sq query rows (a range when < Skv) against Skv key rows */
    int64_t ldo;                   /* out's row stride in elements (H*dh: packed) */
    cudnnBackendDescriptor_t plan;
    cudnnBackendDescriptor_t keep[MAXDESC]; /* graph, ops, tensors, engine config */
    int nkeep;
    size_t ws;
    float scale;                   /* by-value operand: the packs point at it */
    pack_t pack[NPACK];
    int next_pack;
    char why[600];                 /* why cuDNN has no plan (ok == 0)         */
    char chosen[400];              /* what it runs and how it was chosen      */
} plan_t;

struct fq_attn_cudnn_cache {
    plan_t p[NPLANS];
    int next;
    int tune; /* engine choice for new plans: 0 first, 1 timed, 2 timed + wide */
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
    const int64_t B = p->B, Sq = p->Sq, S = p->Skv, H = p->H, dh = p->dh, ld = H * dh, lo = p->ldo;
    const cudnnDataType_t io = p->dt == FQ_BF16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_HALF, f32 = CUDNN_DATA_FLOAT;
    /* q and out: Sq rows of tensors of S rows per batch (batch stride S rows) */
    const int64_t qd[4] = {B, H, Sq, dh}, qs[4] = {S * ld, dh, ld, 1}, os[4] = {S * lo, dh, lo, 1};
    const int64_t vd[4] = {B, H, S, dh};
    const int64_t kd[4] = {B, H, dh, S}, ks[4] = {S * ld, dh, 1, ld};
    const int64_t sd[4] = {B, H, Sq, S}, ss[4] = {H * Sq * S, Sq * S, S, 1};
    const int64_t rd[4] = {B, H, Sq, 1}, rs[4] = {H * Sq, Sq, 1, 1};
    const int64_t one[4] = {1, 1, 1, 1};
    cudnnBackendDescriptor_t q = tensor(b, UID_Q, io, qd, qs, false, false);
    cudnnBackendDescriptor_t kt = tensor(b, UID_K, io, kd, ks, false, false);
    cudnnBackendDescriptor_t v = tensor(b, UID_V, io, vd, qs, false, false);
    cudnnBackendDescriptor_t o = tensor(b, UID_O, io, qd, os, false, false);
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

/* ---- engine configs: gathering, timing, choosing ------------------------------------------ */

typedef struct {
    fq_attn_cudnn_cfg id; /* what it is and how it measured */
    cudnnBackendDescriptor_t plan, cfg;
    cudnnBackendDescriptor_t own[MAXKNOB + 1]; /* a config built here: its engine and knob choices */
    int nown;
} cand_t;

typedef struct {
    cand_t c[MAXCAND];
    int n;
    double t0, budget_ms; /* gathering stops once the budget is spent (one config found) */
} cands_t;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static int over_budget(const cands_t *cs) { return cs->n > 0 && now_ms() - cs->t0 > cs->budget_ms; }

static void cand_free(cand_t *c) {
    if (c->plan) (void)cudnnBackendDestroyDescriptor(c->plan);
    if (c->cfg) (void)cudnnBackendDestroyDescriptor(c->cfg);
    for (int i = c->nown - 1; i >= 0; i--)
        if (c->own[i]) (void)cudnnBackendDestroyDescriptor(c->own[i]);
    memset(c, 0, sizeof *c);
}

static void cands_free(cands_t *cs) {
    for (int i = 0; i < cs->n; i++) cand_free(&cs->c[i]);
    cs->n = 0;
}

/* The engine's global index and the knob choices of cfg, sorted by knob type
 * (best effort: engine -1 when cuDNN does not say). */
static void read_id(cudnnBackendDescriptor_t cfg, fq_attn_cudnn_cfg *id) {
    int64_t cnt = 0;
    id->engine = -1;
    id->nknobs = 0;
    cudnnBackendDescriptor_t eng = NULL;
    if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINE_DESCRIPTOR, &eng) == CUDNN_STATUS_SUCCESS) {
        if (cudnnBackendGetAttribute(cfg, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &cnt, &eng) ==
                CUDNN_STATUS_SUCCESS &&
            cnt == 1) {
            int64_t ix = -1;
            if (cudnnBackendGetAttribute(eng, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &cnt, &ix) ==
                CUDNN_STATUS_SUCCESS)
                id->engine = ix;
        }
        (void)cudnnBackendDestroyDescriptor(eng);
    }
    cudnnBackendDescriptor_t kc[MAXKNOB] = {0};
    int made = 0;
    while (made < MAXKNOB &&
           cudnnBackendCreateDescriptor(CUDNN_BACKEND_KNOB_CHOICE_DESCRIPTOR, &kc[made]) == CUDNN_STATUS_SUCCESS)
        made++;
    if (made == MAXKNOB && cudnnBackendGetAttribute(cfg, CUDNN_ATTR_ENGINECFG_KNOB_CHOICES,
                                                    CUDNN_TYPE_BACKEND_DESCRIPTOR, MAXKNOB, &cnt,
                                                    kc) == CUDNN_STATUS_SUCCESS) {
        for (int64_t i = 0; i < cnt && i < MAXKNOB; i++) {
            cudnnBackendKnobType_t t;
            int64_t v = 0, c1 = 0, c2 = 0;
            if (cudnnBackendGetAttribute(kc[i], CUDNN_ATTR_KNOB_CHOICE_KNOB_TYPE, CUDNN_TYPE_KNOB_TYPE, 1, &c1, &t) !=
                    CUDNN_STATUS_SUCCESS ||
                cudnnBackendGetAttribute(kc[i], CUDNN_ATTR_KNOB_CHOICE_KNOB_VALUE, CUDNN_TYPE_INT64, 1, &c2, &v) !=
                    CUDNN_STATUS_SUCCESS)
                continue;
            id->knob[id->nknobs][0] = (int64_t)t;
            id->knob[id->nknobs][1] = v;
            id->nknobs++;
        }
    }
    for (int i = 0; i < made; i++) (void)cudnnBackendDestroyDescriptor(kc[i]);
    for (int i = 1; i < id->nknobs; i++) /* insertion sort by type */
        for (int j = i; j > 0 && id->knob[j - 1][0] > id->knob[j][0]; j--) {
            int64_t t0 = id->knob[j][0], t1 = id->knob[j][1];
            id->knob[j][0] = id->knob[j - 1][0], id->knob[j][1] = id->knob[j - 1][1];
            id->knob[j - 1][0] = t0, id->knob[j - 1][1] = t1;
        }
}

static int same_id(const fq_attn_cudnn_cfg *a, const fq_attn_cudnn_cfg *b) {
    if (a->graph != b->graph || a->engine < 0 || a->engine != b->engine || a->nknobs != b->nknobs) return 0;
    for (int i = 0; i < a->nknobs; i++)
        if (a->knob[i][0] != b->knob[i][0] || a->knob[i][1] != b->knob[i][1]) return 0;
    return 1;
}

/* Finalizes cfg's execution plan and appends it to cs, unless cs holds the
 * same engine and knobs already or it does not finalize. Takes cfg and
 * own[0, nown) (freed when not kept). why: the failure, if there is one. */
static int add_cand(cands_t *cs, cudnnHandle_t h, cudnnBackendDescriptor_t cfg, const cudnnBackendDescriptor_t *own,
                    int nown, char mode, char graph, char *why, size_t nwhy) {
    cand_t c;
    memset(&c, 0, sizeof c);
    c.cfg = cfg;
    if (nown) memcpy(c.own, own, (size_t)nown * sizeof *own);
    c.nown = nown;
    c.id.mode = mode, c.id.graph = graph, c.id.ms = -1, c.id.diff = -1;
    if (cs->n >= MAXCAND) {
        cand_free(&c);
        return 0;
    }
    /* modes A and B offer many of the same configs: skip those before compiling */
    read_id(cfg, &c.id);
    for (int i = 0; i < cs->n; i++)
        if (same_id(&cs->c[i].id, &c.id)) {
            cand_free(&c);
            return 0;
        }
    const double t0 = now_ms();
    cudnnStatus_t st = cudnnBackendCreateDescriptor(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &c.plan);
    if (st == CUDNN_STATUS_SUCCESS)
        st = cudnnBackendSetAttribute(c.plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &h);
    if (st == CUDNN_STATUS_SUCCESS)
        st = cudnnBackendSetAttribute(c.plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1,
                                      &cfg);
    if (st == CUDNN_STATUS_SUCCESS) st = cudnnBackendFinalize(c.plan);
    c.id.build_ms = now_ms() - t0;
    int64_t ws = 0, cnt = 0;
    if (st == CUDNN_STATUS_SUCCESS)
        st = cudnnBackendGetAttribute(c.plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &cnt, &ws);
    if (st != CUDNN_STATUS_SUCCESS) {
        char last[200] = "";
        cudnnGetLastErrorString(last, sizeof last);
        if (why) snprintf(why, nwhy, "%s%s%s", cudnnGetErrorString(st), last[0] ? ": " : "", last);
        cand_free(&c);
        return 0;
    }
    c.id.ws = ws > 0 ? (size_t)ws : 0;
    cs->c[cs->n++] = c;
    return 1;
}

/* The engine configs of heuristics modes A, B (and FALLBACK when all) whose
 * plans finalize, in that order; without all, only the first one (mode 0). */
static void from_heuristics(cands_t *cs, cudnnHandle_t h, cudnnBackendDescriptor_t g, char graph, int all, char *why,
                            size_t nwhy) {
    const cudnnBackendHeurMode_t modes[3] = {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_B, CUDNN_HEUR_MODE_FALLBACK};
    const char names[3] = {'A', 'B', 'F'};
    const int n0 = cs->n;
    for (int mi = 0; mi < (all ? 3 : 2); mi++) {
        if ((!all && cs->n > n0) || (all && over_budget(cs))) break;
        cudnnBackendDescriptor_t heur = NULL, cfg[MAXCFG] = {0};
        int64_t n = 0, got = 0;
        cudnnStatus_t st = cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, &heur);
        if (st == CUDNN_STATUS_SUCCESS)
            st = cudnnBackendSetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1,
                                          &g);
        if (st == CUDNN_STATUS_SUCCESS)
            st = cudnnBackendSetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &modes[mi]);
        if (st == CUDNN_STATUS_SUCCESS) st = cudnnBackendFinalize(heur);
        if (st == CUDNN_STATUS_SUCCESS)
            st = cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &n,
                                          NULL);
        if (st != CUDNN_STATUS_SUCCESS) {
            /* this mode has nothing for the graph: say why, try the next one */
            char last[200] = "";
            cudnnGetLastErrorString(last, sizeof last);
            snprintf(why, nwhy, "engine heuristics mode %c: %s%s%s", names[mi], cudnnGetErrorString(st),
                     last[0] ? ": " : "", last);
            if (heur) (void)cudnnBackendDestroyDescriptor(heur);
            continue;
        }
        if (n > MAXCFG) n = MAXCFG;
        for (int64_t i = 0; i < n; i++)
            if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, &cfg[i]) != CUDNN_STATUS_SUCCESS) {
                cfg[i] = NULL;
                n = i;
            }
        if (n > 0) {
            st = cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, n, &got,
                                          cfg);
            if (st != CUDNN_STATUS_SUCCESS) {
                snprintf(why, nwhy, "cudnnBackendGetAttribute(engine heuristics results) failed: %s",
                         cudnnGetErrorString(st));
                got = 0;
            }
        }
        if (got > n) got = n;
        /* configs that do not finalize are expected (engines that do not take
         * this graph) and only reported when none does */
        int taken = 0, tried = 0;
        char last[300] = "";
        for (int64_t i = 0; i < got; i++) {
            if ((!all && taken) || (all && over_budget(cs))) break;
            cudnnBackendDescriptor_t c = cfg[i];
            cfg[i] = NULL; /* add_cand owns it now */
            tried++;
            const int before = cs->n;
            add_cand(cs, h, c, NULL, 0, names[mi], graph, last, sizeof last);
            taken |= cs->n > before;
        }
        if (got == 0 && st == CUDNN_STATUS_SUCCESS)
            snprintf(why, nwhy, "heuristics mode %c offer no engine", names[mi]);
        else if (tried && !taken && last[0])
            snprintf(why, nwhy, "no engine config of heuristics mode %c finalizes (last: %s)", names[mi], last);
        for (int64_t i = 0; i < n; i++)
            if (cfg[i]) (void)cudnnBackendDestroyDescriptor(cfg[i]);
        (void)cudnnBackendDestroyDescriptor(heur);
    }
}

/* A config of engine `engine` of g with the knob choices kn[0, nk) (none: the
 * engine's defaults), appended to cs as add_cand does. */
static int add_built(cands_t *cs, cudnnHandle_t h, cudnnBackendDescriptor_t g, int64_t engine, int nk,
                     const int64_t (*kn)[2], char mode, char graph) {
    cudnnBackendDescriptor_t own[MAXKNOB + 1] = {0}, kc[MAXKNOB] = {0}, cfg = NULL;
    int nown = 0;
    if (nk > MAXKNOB) return 0;
    cudnnStatus_t st = cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINE_DESCRIPTOR, &own[0]);
    if (st == CUDNN_STATUS_SUCCESS) nown = 1;
    if (st == CUDNN_STATUS_SUCCESS)
        st = cudnnBackendSetAttribute(own[0], CUDNN_ATTR_ENGINE_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &g);
    if (st == CUDNN_STATUS_SUCCESS)
        st = cudnnBackendSetAttribute(own[0], CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &engine);
    if (st == CUDNN_STATUS_SUCCESS) st = cudnnBackendFinalize(own[0]);
    for (int i = 0; i < nk && st == CUDNN_STATUS_SUCCESS; i++) {
        const cudnnBackendKnobType_t t = (cudnnBackendKnobType_t)kn[i][0];
        st = cudnnBackendCreateDescriptor(CUDNN_BACKEND_KNOB_CHOICE_DESCRIPTOR, &kc[i]);
        if (st != CUDNN_STATUS_SUCCESS) break;
        own[nown++] = kc[i];
        st = cudnnBackendSetAttribute(kc[i], CUDNN_ATTR_KNOB_CHOICE_KNOB_TYPE, CUDNN_TYPE_KNOB_TYPE, 1, &t);
        if (st == CUDNN_STATUS_SUCCESS)
            st = cudnnBackendSetAttribute(kc[i], CUDNN_ATTR_KNOB_CHOICE_KNOB_VALUE, CUDNN_TYPE_INT64, 1, &kn[i][1]);
        if (st == CUDNN_STATUS_SUCCESS) st = cudnnBackendFinalize(kc[i]);
    }
    if (st == CUDNN_STATUS_SUCCESS) st = cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, &cfg);
    if (st == CUDNN_STATUS_SUCCESS)
        st = cudnnBackendSetAttribute(cfg, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &own[0]);
    if (st == CUDNN_STATUS_SUCCESS && nk > 0)
        st = cudnnBackendSetAttribute(cfg, CUDNN_ATTR_ENGINECFG_KNOB_CHOICES, CUDNN_TYPE_BACKEND_DESCRIPTOR, nk, kc);
    if (st == CUDNN_STATUS_SUCCESS) st = cudnnBackendFinalize(cfg);
    if (st != CUDNN_STATUS_SUCCESS) {
        if (cfg) (void)cudnnBackendDestroyDescriptor(cfg);
        for (int i = nown - 1; i >= 0; i--) (void)cudnnBackendDestroyDescriptor(own[i]);
        return 0;
    }
    return add_cand(cs, h, cfg, own, nown, mode, graph, NULL, 0);
}

typedef struct {
    int64_t type, lo, hi, stride;
} knob_info;

/* The knobs engine `engine` of g offers (their count; 0 when it says nothing). */
static int knob_infos(cudnnBackendDescriptor_t g, int64_t engine, knob_info *out, int max) {
    cudnnBackendDescriptor_t eng = NULL, ki[MAXKNOB] = {0};
    int64_t got = 0, cnt = 0;
    int made = 0, n = 0;
    if (max > MAXKNOB) max = MAXKNOB;
    cudnnStatus_t st = cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINE_DESCRIPTOR, &eng);
    if (st == CUDNN_STATUS_SUCCESS)
        st = cudnnBackendSetAttribute(eng, CUDNN_ATTR_ENGINE_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &g);
    if (st == CUDNN_STATUS_SUCCESS)
        st = cudnnBackendSetAttribute(eng, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &engine);
    if (st == CUDNN_STATUS_SUCCESS) st = cudnnBackendFinalize(eng);
    while (st == CUDNN_STATUS_SUCCESS && made < max &&
           cudnnBackendCreateDescriptor(CUDNN_BACKEND_KNOB_INFO_DESCRIPTOR, &ki[made]) == CUDNN_STATUS_SUCCESS)
        made++;
    if (st == CUDNN_STATUS_SUCCESS && made == max &&
        cudnnBackendGetAttribute(eng, CUDNN_ATTR_ENGINE_KNOB_INFO, CUDNN_TYPE_BACKEND_DESCRIPTOR, max, &got, ki) ==
            CUDNN_STATUS_SUCCESS) {
        for (int64_t i = 0; i < got && i < max; i++) {
            cudnnBackendKnobType_t t;
            knob_info k = {0, 0, 0, 1};
            if (cudnnBackendGetAttribute(ki[i], CUDNN_ATTR_KNOB_INFO_TYPE, CUDNN_TYPE_KNOB_TYPE, 1, &cnt, &t) !=
                    CUDNN_STATUS_SUCCESS ||
                cudnnBackendGetAttribute(ki[i], CUDNN_ATTR_KNOB_INFO_MINIMUM_VALUE, CUDNN_TYPE_INT64, 1, &cnt, &k.lo) !=
                    CUDNN_STATUS_SUCCESS ||
                cudnnBackendGetAttribute(ki[i], CUDNN_ATTR_KNOB_INFO_MAXIMUM_VALUE, CUDNN_TYPE_INT64, 1, &cnt, &k.hi) !=
                    CUDNN_STATUS_SUCCESS ||
                cudnnBackendGetAttribute(ki[i], CUDNN_ATTR_KNOB_INFO_STRIDE, CUDNN_TYPE_INT64, 1, &cnt, &k.stride) !=
                    CUDNN_STATUS_SUCCESS)
                continue;
            k.type = (int64_t)t;
            out[n++] = k;
        }
    }
    for (int i = 0; i < made; i++) (void)cudnnBackendDestroyDescriptor(ki[i]);
    if (eng) (void)cudnnBackendDestroyDescriptor(eng);
    return n;
}

/* Exploring (mode 2, fq_attn_cudnn_list): every engine of g with its default
 * knobs, then one knob at a time over its range (at most 16 values) around the
 * first config of each engine found. */
static void from_sweep(cands_t *cs, cudnnHandle_t h, cudnnBackendDescriptor_t g, char graph) {
    int64_t count = 0, cnt = 0;
    if (cudnnBackendGetAttribute(g, CUDNN_ATTR_OPERATIONGRAPH_ENGINE_GLOBAL_COUNT, CUDNN_TYPE_INT64, 1, &cnt,
                                 &count) != CUDNN_STATUS_SUCCESS)
        count = 0;
    if (count > 1024) count = 1024;
    for (int64_t e = 0; e < count && !over_budget(cs); e++) {
        int have = 0;
        for (int i = 0; i < cs->n && !have; i++) have = cs->c[i].id.graph == graph && cs->c[i].id.engine == e;
        if (!have) add_built(cs, h, g, e, 0, NULL, 'E', graph);
    }
    const int nbase = cs->n;
    for (int i = 0; i < nbase && !over_budget(cs); i++) {
        const fq_attn_cudnn_cfg base = cs->c[i].id;
        int seen = 0;
        for (int j = 0; j < i && !seen; j++) seen = cs->c[j].id.graph == graph && cs->c[j].id.engine == base.engine;
        if (base.graph != graph || base.engine < 0 || seen) continue;
        knob_info ki[MAXKNOB];
        const int nki = knob_infos(g, base.engine, ki, MAXKNOB);
        for (int k = 0; k < nki && !over_budget(cs); k++) {
            const int64_t stride = ki[k].stride > 0 ? ki[k].stride : 1;
            const int64_t nv = ki[k].hi >= ki[k].lo ? (ki[k].hi - ki[k].lo) / stride + 1 : 0;
            const int64_t step = nv > 16 ? (nv + 15) / 16 : 1;
            for (int64_t vi = 0; vi < nv && !over_budget(cs); vi += step) {
                const int64_t val = ki[k].lo + vi * stride;
                int64_t kn[MAXKNOB][2];
                int nk = base.nknobs, at = -1;
                memcpy(kn, base.knob, sizeof kn);
                for (int j = 0; j < nk; j++)
                    if (kn[j][0] == ki[k].type) at = j;
                if (at >= 0 && kn[at][1] == val) continue;
                if (at < 0) {
                    if (nk >= MAXKNOB) continue;
                    at = nk++;
                    kn[at][0] = ki[k].type;
                }
                kn[at][1] = val;
                add_built(cs, h, g, base.engine, nk, (const int64_t(*)[2])kn, 'K', graph);
            }
        }
    }
}

/* Every config of both graphs (with the statistics first) that the level asks
 * for: 0 the first that finalizes, 1 all the heuristics offer, 2 also the
 * sweep. The graphs' descriptors stay in p->keep. why[0], why[1]: why a graph
 * gave none. */
static void gather(cands_t *cs, plan_t *p, cudnnHandle_t h, int level, char why[2][300]) {
    for (int with_stats = 1; with_stats >= 0; with_stats--) {
        char *w = why[with_stats ? 0 : 1];
        if ((level == 0 && cs->n > 0) || over_budget(cs)) break;
        bld b = {CUDNN_STATUS_SUCCESS, NULL, p};
        cudnnBackendDescriptor_t g = attention_graph(&b, h, with_stats);
        if (b.st != CUDNN_STATUS_SUCCESS) {
            char last[200] = "";
            cudnnGetLastErrorString(last, sizeof last);
            snprintf(w, 300, "%s failed: %s%s%s", b.what ? b.what : "?", cudnnGetErrorString(b.st), last[0] ? ": " : "",
                     last);
            continue;
        }
        const char gr = with_stats ? 's' : 'n';
        from_heuristics(cs, h, g, gr, level >= 1, w, 300);
        if (level >= 2) from_sweep(cs, h, g, gr);
    }
}

/* A variant pack for q, k, v, out, the scale and the workspace. */
static cudnnStatus_t make_pack(const void *q, const void *k, const void *v, void *out, float *scale, void *ws,
                               cudnnBackendDescriptor_t *pack_out, const char **what) {
    const int64_t uids[5] = {UID_Q, UID_K, UID_V, UID_O, UID_SCALE};
    void *data[5] = {(void *)q, (void *)k, (void *)v, out, scale};
    cudnnBackendDescriptor_t pack = NULL;
    *pack_out = NULL;
    cudnnStatus_t st = cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &pack);
    *what = "cudnnBackendCreateDescriptor(variant pack)";
    if (st == CUDNN_STATUS_SUCCESS) {
        *what = "cudnnBackendSetAttribute(variant pack)";
        st = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, 5, uids);
    }
    if (st == CUDNN_STATUS_SUCCESS)
        st = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, 5, data);
    if (st == CUDNN_STATUS_SUCCESS)
        st = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &ws);
    if (st == CUDNN_STATUS_SUCCESS) {
        *what = "cudnnBackendFinalize(variant pack)";
        st = cudnnBackendFinalize(pack);
    }
    if (st != CUDNN_STATUS_SUCCESS) {
        if (pack) (void)cudnnBackendDestroyDescriptor(pack);
        return st;
    }
    *pack_out = pack;
    return st;
}

/* Temporary operands for timing: raw cudaMalloc (the plan's memory is what our
 * allocator holds, and these are gone before the plan is), q, k, v of Skv rows
 * (a range plan reads the first Sq of them) filled with a fixed pattern of
 * values in [-1, 1), out (Skv rows ldo apart) zeroed. */
typedef struct {
    char *base;
    void *q, *k, *v, *o, *ws;
    size_t io, ob; /* bytes of q (k, v), of out */
} tbuf_t;

static void tbuf_free(tbuf_t *t) {
    if (t->base) (void)cudaFree(t->base);
    memset(t, 0, sizeof *t);
}

static cudaError_t tbuf_make(tbuf_t *t, const plan_t *p, size_t ws, cudaStream_t st) {
    const size_t io = (size_t)(p->B * p->Skv * p->H * p->dh) * 2, seg = (io + 255) & ~(size_t)255;
    const size_t ob = (size_t)(p->B * p->Skv * p->ldo) * 2, oseg = (ob + 255) & ~(size_t)255; /* with its stride */
    const size_t pat = 65536; /* pattern elements, then copied over itself */
    memset(t, 0, sizeof *t);
    cudaError_t e = cudaMalloc((void **)&t->base, 3 * seg + oseg + ws);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* not sticky: clear it for the caller's later checks */
        t->base = NULL;
        return e;
    }
    t->io = io, t->ob = ob;
    t->q = t->base, t->k = t->base + seg, t->v = t->base + 2 * seg, t->o = t->base + 3 * seg;
    t->ws = ws ? t->base + 3 * seg + oseg : NULL;
    uint16_t *hp = malloc(pat * 2);
    if (!hp) {
        tbuf_free(t);
        return cudaErrorMemoryAllocation;
    }
    uint64_t s = 0x2545F4914F6CDD1Dull;
    for (size_t i = 0; i < pat; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        const float f = (float)((double)(s >> 11) / 9007199254740992.0 * 2.0 - 1.0);
        uint32_t u;
        memcpy(&u, &f, 4);
        hp[i] = (uint16_t)(u >> 16); /* f16 operands read these bits as other finite values: fine for timing */
    }
    const size_t tot = 3 * seg;
    size_t have = tot < pat * 2 ? tot : pat * 2;
    e = cudaMemcpyAsync(t->base, hp, have, cudaMemcpyHostToDevice, st);
    while (e == cudaSuccess && have < tot) {
        const size_t n = have < tot - have ? have : tot - have;
        e = cudaMemcpyAsync(t->base + have, t->base, n, cudaMemcpyDeviceToDevice, st);
        have += n;
    }
    if (e == cudaSuccess) e = cudaMemsetAsync(t->o, 0, ob, st);
    if (e == cudaSuccess) e = cudaStreamSynchronize(st); /* hp is pageable */
    free(hp);
    if (e != cudaSuccess) tbuf_free(t);
    return e;
}

static double median(double *x, int n) {
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && x[j - 1] > x[j]; j--) {
            const double t = x[j];
            x[j] = x[j - 1], x[j - 1] = t;
        }
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

/* Times every config of cs on t: a calibration call each, ~20 ms of the first
 * to bring the clocks up, then REPS rounds over all configs (round robin, so
 * that drift spreads evenly), each a batch of ~1 ms of calls between two
 * events; id.ms: the median per call (-1: it did not run). 0 or a message. */
static int time_cands(cands_t *cs, cudnnHandle_t h, cudaStream_t st, const tbuf_t *t, float *scale, char *err,
                      size_t nerr) {
    cudnnBackendDescriptor_t pack = NULL;
    const char *what = "";
    cudnnStatus_t cs_st = make_pack(t->q, t->k, t->v, t->o, scale, t->ws, &pack, &what);
    if (cs_st != CUDNN_STATUS_SUCCESS) {
        snprintf(err, nerr, "%s failed: %s", what, cudnnGetErrorString(cs_st));
        return 1;
    }
    cudaEvent_t ev[2] = {NULL, NULL};
    int batch[MAXCAND] = {0}, rc = 0;
    double tm[MAXCAND][REPS];
    cudaError_t e = cudaEventCreate(&ev[0]);
    if (e == cudaSuccess) e = cudaEventCreate(&ev[1]);
    int warm = -1;
    double warm_ms = 0;
    for (int i = 0; i < cs->n && e == cudaSuccess; i++) {
        cudnnStatus_t s = CUDNN_STATUS_SUCCESS;
        for (int w = 0; w < 2 && s == CUDNN_STATUS_SUCCESS; w++) s = cudnnBackendExecute(h, cs->c[i].plan, pack);
        if (s != CUDNN_STATUS_SUCCESS) continue; /* batch 0: not timed */
        e = cudaEventRecord(ev[0], st);
        if (e == cudaSuccess) s = cudnnBackendExecute(h, cs->c[i].plan, pack);
        if (e == cudaSuccess) e = cudaEventRecord(ev[1], st);
        if (e == cudaSuccess) e = cudaEventSynchronize(ev[1]);
        float ms = 0;
        if (e == cudaSuccess) e = cudaEventElapsedTime(&ms, ev[0], ev[1]);
        if (e != cudaSuccess || s != CUDNN_STATUS_SUCCESS) continue;
        const double m = ms > 1e-3f ? ms : 1e-3;
        batch[i] = m >= 1.0 ? 1 : (int)(1.0 / m) + 1;
        if (batch[i] > 64) batch[i] = 64;
        if (warm < 0) warm = i, warm_ms = m;
    }
    if (e == cudaSuccess && warm >= 0) {
        const int nw = (int)(20.0 / warm_ms) + 1;
        for (int i = 0; i < (nw < 400 ? nw : 400); i++) (void)cudnnBackendExecute(h, cs->c[warm].plan, pack);
    }
    for (int r = 0; r < REPS && e == cudaSuccess; r++)
        for (int i = 0; i < cs->n && e == cudaSuccess; i++) {
            if (!batch[i]) continue;
            cudnnStatus_t s = CUDNN_STATUS_SUCCESS;
            e = cudaEventRecord(ev[0], st);
            for (int j = 0; j < batch[i] && e == cudaSuccess && s == CUDNN_STATUS_SUCCESS; j++)
                s = cudnnBackendExecute(h, cs->c[i].plan, pack);
            if (e == cudaSuccess) e = cudaEventRecord(ev[1], st);
            if (e == cudaSuccess) e = cudaEventSynchronize(ev[1]);
            float ms = 0;
            if (e == cudaSuccess) e = cudaEventElapsedTime(&ms, ev[0], ev[1]);
            if (s != CUDNN_STATUS_SUCCESS) batch[i] = 0;
            tm[i][r] = (double)ms / (batch[i] ? batch[i] : 1);
        }
    if (e != cudaSuccess) {
        snprintf(err, nerr, "timing: %s", cudaGetErrorString(e));
        rc = 1;
    }
    for (int i = 0; i < cs->n; i++) cs->c[i].id.ms = !rc && batch[i] ? median(tm[i], REPS) : -1;
    for (int i = 0; i < 2; i++)
        if (ev[i]) (void)cudaEventDestroy(ev[i]);
    (void)cudnnBackendDestroyDescriptor(pack);
    return rc;
}

/* Listing: each config's output against the first's (rel L2 over the
 * elements the plan writes: Sq rows per batch, H*dh columns of rows ldo apart). */
static int compare_cands(cands_t *cs, cudnnHandle_t h, cudaStream_t st, const tbuf_t *t, float *scale,
                         const plan_t *p, char *err, size_t nerr) {
    const int64_t cols = p->H * p->dh, n = p->B * p->Sq * cols;
    uint16_t *raw = malloc(t->ob);
    double *ref = malloc((size_t)n * sizeof *ref);
    cudnnBackendDescriptor_t pack = NULL;
    const char *what = "";
    int rc = 0, have_ref = 0;
    if (!raw || !ref) {
        snprintf(err, nerr, "out of host memory");
        rc = 1;
    } else if (make_pack(t->q, t->k, t->v, t->o, scale, t->ws, &pack, &what) != CUDNN_STATUS_SUCCESS) {
        snprintf(err, nerr, "%s failed", what);
        rc = 1;
    }
    for (int i = 0; i < cs->n && !rc; i++) {
        if (cs->c[i].id.ms < 0) continue;
        cudaError_t e = cudaMemsetAsync(t->o, 0xff, t->ob, st); /* NaN: a config that writes nothing shows */
        cudnnStatus_t s = e == cudaSuccess ? cudnnBackendExecute(h, cs->c[i].plan, pack) : CUDNN_STATUS_SUCCESS;
        if (e == cudaSuccess) e = cudaMemcpyAsync(raw, t->o, t->ob, cudaMemcpyDeviceToHost, st);
        if (e == cudaSuccess) e = cudaStreamSynchronize(st);
        if (e != cudaSuccess) {
            snprintf(err, nerr, "compare: %s", cudaGetErrorString(e));
            rc = 1;
            break;
        }
        if (s != CUDNN_STATUS_SUCCESS) continue;
        double num = 0, den = 0;
        for (int64_t j = 0; j < n; j++) {
            const int64_t row = j / cols, b = row / p->Sq;
            const uint16_t x = raw[(b * p->Skv + row % p->Sq) * p->ldo + j % cols];
            float f;
            if (p->dt == FQ_BF16) {
                const uint32_t u = (uint32_t)x << 16;
                memcpy(&f, &u, 4);
            } else { /* f16 -> f32 */
                const uint32_t hb = x, sg = (hb & 0x8000u) << 16, ex = (hb >> 10) & 31, mn = hb & 0x3ff;
                f = ex == 31 ? (mn ? NAN : INFINITY) : ex ? ldexpf((float)(mn | 0x400), (int)ex - 25)
                                                          : ldexpf((float)mn, -24);
                if (sg) f = -f;
            }
            if (!have_ref) {
                ref[j] = f;
            } else {
                const double dd = (double)f - ref[j];
                num += dd * dd, den += ref[j] * ref[j];
            }
        }
        cs->c[i].id.diff = have_ref ? (den > 0 ? sqrt(num / den) : sqrt(num)) : 0;
        if (!isfinite(cs->c[i].id.diff)) cs->c[i].id.diff = INFINITY;
        have_ref = 1;
    }
    if (pack) (void)cudnnBackendDestroyDescriptor(pack);
    free(raw);
    free(ref);
    return rc;
}

/* The config to keep: the fastest, unless within 1% of the first (the untuned
 * choice, kept on a near tie so that noise does not flip the choice). */
static int pick(const cands_t *cs) {
    int best = -1;
    for (int i = 0; i < cs->n; i++)
        if (cs->c[i].id.ms > 0 && (best < 0 || cs->c[i].id.ms < cs->c[best].id.ms)) best = i;
    if (best < 0) return 0;
    if (cs->c[0].id.ms > 0 && cs->c[best].id.ms > 0.99 * cs->c[0].id.ms) return 0;
    return best;
}

static int id_str(const fq_attn_cudnn_cfg *id, char *buf, size_t n) {
    int w = snprintf(buf, n, "engine %lld (graph %s, heuristics %c), knobs {", (long long)id->engine,
                     id->graph == 's' ? "with stats" : "without stats", id->mode);
    for (int i = 0; i < id->nknobs && w >= 0 && (size_t)w < n; i++)
        w += snprintf(buf + w, n - (size_t)w, "%s%lld:%lld", i ? " " : "", (long long)id->knob[i][0],
                      (long long)id->knob[i][1]);
    if (w >= 0 && (size_t)w < n) w += snprintf(buf + w, n - (size_t)w, "}, workspace %zu B", id->ws);
    return w;
}

/* Builds p's plan (p's shape is set): gathers the configs of the level, times
 * them when there is a choice (level >= 1) and keeps one. p->ok = 0 with
 * p->why when cuDNN has no plan. Runs under d's guard. */
static void build_plan(fq_cuda_dev *d, plan_t *p, int level) {
    cudnnHandle_t h = (cudnnHandle_t)d->cudnn;
    const double t0 = now_ms();
    cands_t *cs = calloc(1, sizeof *cs);
    if (!cs) {
        snprintf(p->why, sizeof p->why, "out of host memory");
        return;
    }
    cs->t0 = t0;
    cs->budget_ms = level >= 2 ? 30000 : 2000;
    char why[2][300] = {"", ""};
    gather(cs, p, h, level, why);
    if (cs->n == 0) {
        snprintf(p->why, sizeof p->why, "with the softmax statistics: %s; without: %s",
                 why[0][0] ? why[0] : "no execution plan", why[1][0] ? why[1] : "no execution plan");
        free(cs);
        return;
    }
    int keep = 0, timed = 0;
    char note[200] = "";
    if (level >= 1 && cs->n > 1) {
        size_t ws = 0;
        for (int i = 0; i < cs->n; i++) ws = cs->c[i].id.ws > ws ? cs->c[i].id.ws : ws;
        tbuf_t t;
        cudaError_t e = tbuf_make(&t, p, ws, d->stream);
        if (e != cudaSuccess) {
            snprintf(note, sizeof note, "; not timed (temporary buffers: %s), the first config kept",
                     cudaGetErrorString(e));
        } else {
            int rc = time_cands(cs, h, d->stream, &t, &p->scale, note, sizeof note);
            /* the sweep's knob variants can finalize and still compute something
             * else (seen: NaN): only those matching the first config's output count */
            if (!rc && level >= 2) rc = compare_cands(cs, h, d->stream, &t, &p->scale, p, note, sizeof note);
            if (!rc && level >= 2)
                for (int i = 1; i < cs->n; i++)
                    if (!(cs->c[i].id.diff >= 0 && cs->c[i].id.diff <= 1.0 / 128)) cs->c[i].id.ms = -1;
            if (rc) {
                char m[200];
                snprintf(m, sizeof m, "; not timed (%s), the first config kept", note);
                memcpy(note, m, sizeof note);
            } else {
                keep = pick(cs);
                timed = 1;
            }
            tbuf_free(&t);
        }
    }
    cand_t *c = &cs->c[keep];
    FQ_ASSERT(p->nkeep + 1 + c->nown <= MAXDESC);
    p->plan = c->plan;
    p->keep[p->nkeep++] = c->cfg;
    for (int i = 0; i < c->nown; i++) p->keep[p->nkeep++] = c->own[i];
    p->ws = c->id.ws;
    p->ok = 1;
    char ids[240];
    id_str(&c->id, ids, sizeof ids);
    const double fl = 4.0 * (double)(p->B * p->H) * (double)p->Sq * (double)p->Skv * (double)p->dh;
    double best = -1;
    for (int i = 0; i < cs->n; i++)
        if (cs->c[i].id.ms > 0 && (best < 0 || cs->c[i].id.ms < best)) best = cs->c[i].id.ms;
    if (timed && c->id.ms > 0)
        snprintf(p->chosen, sizeof p->chosen,
                 "%s; %.4f ms = %.1f TFLOP/s, kept of %d timed configs (fastest %.4f ms, first %.4f ms); chosen in "
                 "%.0f ms",
                 ids, c->id.ms, fl / (c->id.ms * 1e9), cs->n, best, cs->c[0].id.ms, now_ms() - t0);
    else if (timed)
        snprintf(p->chosen, sizeof p->chosen, "%s; none of %d configs ran when timed, the first kept; %.0f ms", ids,
                 cs->n, now_ms() - t0);
    else
        snprintf(p->chosen, sizeof p->chosen, "%s; first config, not timed (mode %d, %d configs)%s; built in %.0f ms",
                 ids, level, cs->n, note, now_ms() - t0);
    memset(c, 0, sizeof *c); /* now p's */
    cands_free(cs);
    free(cs);
}

/* ---- the per-device cache ----------------------------------------------------------------- */

static void plan_clear(plan_t *p) {
    for (int i = 0; i < NPACK; i++)
        if (p->pack[i].d) (void)cudnnBackendDestroyDescriptor(p->pack[i].d);
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

/* FQ_ATTN_CUDNN_TUNE: 0 (unset) the first config, 1 the fastest timed, 2 also the sweep. */
static int env_tune(void) {
    const char *e = getenv("FQ_ATTN_CUDNN_TUNE");
    if (!e || !*e) return 0;
    const int v = atoi(e);
    return v < 0 ? 0 : v > 2 ? 2 : v;
}

static const char *dname(fq_dtype dt) { return dt == FQ_BF16 ? "bf16" : "f16"; }

/* "bf16 B1 S4608 H24 dh128"; a range plan says "Sq512 Skv4608". */
static const char *shape_str(char *buf, size_t n, fq_dtype dt, int64_t B, int64_t Sq, int64_t Skv, int64_t H,
                             int64_t dh) {
    if (Sq == Skv)
        snprintf(buf, n, "%s B%lld S%lld H%lld dh%lld", dname(dt), (long long)B, (long long)Skv, (long long)H,
                 (long long)dh);
    else
        snprintf(buf, n, "%s B%lld Sq%lld Skv%lld H%lld dh%lld", dname(dt), (long long)B, (long long)Sq,
                 (long long)Skv, (long long)H, (long long)dh);
    return buf;
}

static fq_status cudnn_err(fq_ctx *ctx, const fq_cuda_dev *d, const plan_t *p, const char *what, cudnnStatus_t st) {
    char last[512] = "";
    cudnnGetLastErrorString(last, sizeof last);
    char shape[96] = "";
    if (p) {
        shape[0] = ' ';
        shape_str(shape + 1, sizeof shape - 1, p->dt, p->B, p->Sq, p->Skv, p->H, p->dh);
    }
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
        d->attn_cudnn->tune = env_tune();
    }
    return FQ_OK;
}

/* The cached plan of these sizes, built if missing; *out = NULL when cuDNN has
 * none (strict = 0; strict = 1 reports it). */
static fq_status find_plan(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t Sq, int64_t Skv, int64_t H,
                           int64_t dh, int64_t ldo, int strict, plan_t **out) {
    *out = NULL;
    if (Sq > Skv)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "attention (cuDNN): a range of %lld query rows of %lld-row tensors",
                      (long long)Sq, (long long)Skv);
    if (!fq_attn_cudnn_shape_ok(dh, dt, dt) || B < 1 || Sq < 1 || H < 1)
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "attention (cuDNN): %s head dim %lld is not supported",
                      fq_dtype_name(dt), (long long)dh);
    FQ_TRY(ready(ctx, d));
    struct fq_attn_cudnn_cache *c = d->attn_cudnn;
    plan_t *p = NULL;
    for (int i = 0; i < NPLANS && !p; i++)
        if (c->p[i].used && c->p[i].dt == dt && c->p[i].B == B && c->p[i].Sq == Sq && c->p[i].Skv == Skv &&
            c->p[i].H == H && c->p[i].dh == dh && c->p[i].ldo == ldo)
            p = &c->p[i];
    char shape[96];
    shape_str(shape, sizeof shape, dt, B, Sq, Skv, H, dh);
    if (!p) {
        p = &c->p[c->next];
        fq_cuda_guard g;
        FQ_TRY(fq_cuda_guard_enter(ctx, d->index, &g));
        if (p->used) {
            /* the slot's plan may still have work queued */
            cudaError_t e = cudaStreamSynchronize(d->stream);
            if (e != cudaSuccess) {
                fq_cuda_guard_exit(&g);
                return fq_cuda_status(ctx, e, "attention (cuDNN): cudaStreamSynchronize", d->index);
            }
            plan_clear(p);
        }
        c->next = (c->next + 1) % NPLANS;
        p->used = 1;
        p->dt = dt, p->B = B, p->Sq = Sq, p->Skv = Skv, p->H = H, p->dh = dh, p->ldo = ldo;
        p->scale = (float)(1.0 / sqrt((double)dh));
        /* the softmax as cudnn-frontend lowers it (statistics m + log z computed,
         * virtual), else without the statistics; any failure leaves a slot that
         * says why: AUTO then runs our kernel, a forced cuDNN call reports it */
        build_plan(d, p, c->tune);
        fq_cuda_guard_exit(&g);
        if (p->ok) {
            fq_log(ctx, FQ_LOG_DEBUG, "attention (cuDNN %s) on cuda:%d: %s", shape, d->index, p->chosen);
            const char *ev = getenv("FQ_ATTN_CUDNN_LOG");
            if (ev && *ev && strcmp(ev, "0") != 0) /* opt-in debugging aid (the log above is the library's way) */
                fprintf(stderr, "fluxq: attention (cuDNN %s) on cuda:%d: %s\n", shape, d->index, p->chosen);
        }
    }
    if (!p->ok) {
        if (!strict) return FQ_OK;
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "attention (cuDNN %s) on cuda:%d: %s", shape, d->index, p->why);
    }
    *out = p;
    return FQ_OK;
}

fq_status fq_attn_cudnn_plan_rows(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t Sq, int64_t Skv,
                                  int64_t H, int64_t dh, int64_t ldo, int strict, int *ok, size_t *ws_bytes) {
    plan_t *p = NULL;
    *ok = 0;
    *ws_bytes = 0;
    FQ_TRY(find_plan(ctx, d, dt, B, Sq, Skv, H, dh, ldo > 0 ? ldo : H * dh, strict, &p));
    if (p) {
        *ok = 1;
        *ws_bytes = p->ws;
    }
    return FQ_OK;
}

fq_status fq_attn_cudnn_plan(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh,
                             int64_t ldo, int strict, int *ok, size_t *ws_bytes) {
    return fq_attn_cudnn_plan_rows(ctx, d, dt, B, S, S, H, dh, ldo, strict, ok, ws_bytes);
}

/* Whether q, k, v, out (a range of Sq of Skv rows per batch, see
 * fq_attn_cudnn_run_rows) can go to cuDNN: 16-byte aligned, out over none
 * of the others. *fine = 0: no (an error when strict). */
static fq_status check_io(fq_ctx *ctx, int64_t B, int64_t Sq, int64_t Skv, int64_t ld, const void *q, const void *k,
                          const void *v, const void *out, int64_t ldo, int strict, int *fine) {
    *fine = 0;
    const uintptr_t mis = ((uintptr_t)q | (uintptr_t)k | (uintptr_t)v | (uintptr_t)out | (uintptr_t)(ldo * 2)) & 15u;
    /* out over q, k or v would be overwritten while other CTAs still read it */
    const uintptr_t qb = (uintptr_t)((((B - 1) * Skv + Sq - 1) * ld + ld) * 2); /* q's extent */
    const uintptr_t kb = (uintptr_t)(B * Skv * ld * 2);                          /* k's, v's  */
    const uintptr_t ob = (uintptr_t)((((B - 1) * Skv + Sq - 1) * ldo + ld) * 2); /* out's     */
    const uintptr_t in[3] = {(uintptr_t)q, (uintptr_t)k, (uintptr_t)v}, nb[3] = {qb, kb, kb}, o0 = (uintptr_t)out;
    int alias = 0;
    for (int i = 0; i < 3; i++) alias |= o0 < in[i] + nb[i] && in[i] < o0 + ob;
    if (!mis && !alias) {
        *fine = 1;
        return FQ_OK;
    }
    if (!strict) return FQ_OK;
    if (mis)
        return fq_err(ctx, FQ_ERR_SHAPE, "attention (cuDNN): q, k, v, out and out's row stride must be 16-byte aligned");
    return fq_err(ctx, FQ_ERR_INVALID_ARG, "attention (cuDNN): out overlaps q, k or v");
}

fq_status fq_attn_cudnn_run_rows(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t Sq, int64_t Skv,
                                 int64_t H, int64_t dh, const void *q, const void *k, const void *v, void *out,
                                 int64_t ldo, void *ws, size_t ws_bytes, int strict, int *ran) {
    plan_t *p = NULL;
    *ran = 0;
    if (ldo <= 0) ldo = H * dh;
    FQ_TRY(find_plan(ctx, d, dt, B, Sq, Skv, H, dh, ldo, strict, &p));
    if (!p) return FQ_OK;
    int fine = 0;
    FQ_TRY(check_io(ctx, B, Sq, Skv, H * dh, q, k, v, out, ldo, strict, &fine));
    if (!fine) return FQ_OK;
    if (p->ws && (!ws || ws_bytes < p->ws)) {
        if (!strict) return FQ_OK;
        return fq_err(ctx, FQ_ERR_SHAPE,
                      "attention (cuDNN): scratch of %zu bytes is smaller than the plan's workspace of %zu bytes "
                      "(size it with fq_nn_attention_plan)",
                      ws ? ws_bytes : (size_t)0, p->ws);
    }
    const void *ptr[5] = {q, k, v, out, ws};
    pack_t *pk = NULL;
    for (int i = 0; i < NPACK && !pk; i++)
        if (p->pack[i].d && !memcmp(ptr, p->pack[i].ptr, sizeof ptr)) pk = &p->pack[i];
    if (!pk) {
        /* new buffers: a new variant pack (a forward's buffers stay the same) */
        pk = &p->pack[p->next_pack];
        p->next_pack = (p->next_pack + 1) % NPACK;
        if (pk->d) (void)cudnnBackendDestroyDescriptor(pk->d);
        memset(pk, 0, sizeof *pk);
        const char *what = "";
        cudnnStatus_t st = make_pack(q, k, v, out, &p->scale, ws, &pk->d, &what);
        if (st != CUDNN_STATUS_SUCCESS) return cudnn_err(ctx, d, p, what, st);
        memcpy(pk->ptr, ptr, sizeof ptr);
    }
    cudnnStatus_t st = cudnnBackendExecute((cudnnHandle_t)d->cudnn, p->plan, pk->d);
    if (st != CUDNN_STATUS_SUCCESS) return cudnn_err(ctx, d, p, "cudnnBackendExecute", st);
    *ran = 1;
    return FQ_OK;
}

fq_status fq_attn_cudnn_run(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh,
                            const void *q, const void *k, const void *v, void *out, int64_t ldo, void *ws,
                            size_t ws_bytes, int strict, int *ran) {
    return fq_attn_cudnn_run_rows(ctx, d, dt, B, S, S, H, dh, q, k, v, out, ldo, ws, ws_bytes, strict, ran);
}

fq_status fq_attn_cudnn_set_tune(fq_ctx *ctx, fq_cuda_dev *d, int mode) {
    FQ_TRY(ready(ctx, d));
    fq_cuda_guard g;
    FQ_TRY(fq_cuda_guard_enter(ctx, d->index, &g));
    cudaError_t e = cudaStreamSynchronize(d->stream); /* the plans may have work queued */
    fq_cuda_guard_exit(&g);
    if (e != cudaSuccess) return fq_cuda_status(ctx, e, "attention (cuDNN): cudaStreamSynchronize", d->index);
    struct fq_attn_cudnn_cache *c = d->attn_cudnn;
    for (int i = 0; i < NPLANS; i++) plan_clear(&c->p[i]);
    c->next = 0;
    c->tune = mode < 0 ? env_tune() : mode > 2 ? 2 : mode;
    return FQ_OK;
}

void fq_attn_cudnn_describe(fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh, char *buf,
                            size_t n) {
    if (n) buf[0] = 0;
    if (!d->attn_cudnn || !n) return;
    for (int i = 0; i < NPLANS; i++) {
        const plan_t *p = &d->attn_cudnn->p[i];
        if (p->used && p->dt == dt && p->B == B && p->Sq == S && p->Skv == S && p->H == H && p->dh == dh) {
            snprintf(buf, n, "%s", p->ok ? p->chosen : p->why);
            return;
        }
    }
}

fq_status fq_attn_cudnn_list(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh,
                             int wide, fq_attn_cudnn_cfg *out, int max, int *n) {
    *n = 0;
    if (!fq_attn_cudnn_shape_ok(dh, dt, dt) || B < 1 || S < 1 || H < 1)
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "attention (cuDNN): %s head dim %lld is not supported",
                      fq_dtype_name(dt), (long long)dh);
    FQ_TRY(ready(ctx, d));
    plan_t *p = calloc(1, sizeof *p);
    cands_t *cs = calloc(1, sizeof *cs);
    if (!p || !cs) {
        free(p);
        free(cs);
        return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "attention (cuDNN): out of host memory");
    }
    p->dt = dt, p->B = B, p->Sq = S, p->Skv = S, p->H = H, p->dh = dh, p->ldo = H * dh;
    p->scale = (float)(1.0 / sqrt((double)dh));
    fq_cuda_guard g;
    fq_status s = fq_cuda_guard_enter(ctx, d->index, &g);
    if (s != FQ_OK) {
        free(p);
        free(cs);
        return s;
    }
    cudnnHandle_t h = (cudnnHandle_t)d->cudnn;
    cs->t0 = now_ms();
    cs->budget_ms = wide ? 15000 : 10000;
    char why[2][300] = {"", ""};
    gather(cs, p, h, wide ? 2 : 1, why);
    char err[300] = "";
    int rc = 0;
    if (cs->n > 0) {
        size_t ws = 0;
        for (int i = 0; i < cs->n; i++) ws = cs->c[i].id.ws > ws ? cs->c[i].id.ws : ws;
        tbuf_t t;
        cudaError_t e = tbuf_make(&t, p, ws, d->stream);
        if (e != cudaSuccess) {
            snprintf(err, sizeof err, "temporary buffers: %s", cudaGetErrorString(e));
            rc = 1;
        } else {
            rc = time_cands(cs, h, d->stream, &t, &p->scale, err, sizeof err);
            if (!rc) rc = compare_cands(cs, h, d->stream, &t, &p->scale, p, err, sizeof err);
            tbuf_free(&t);
        }
        cs->c[0].id.first = 1;
        cs->c[pick(cs)].id.chosen = 1;
    }
    for (int i = 0; i < cs->n && i < max; i++) out[i] = cs->c[i].id;
    *n = cs->n < max ? cs->n : max;
    cands_free(cs);
    plan_clear(p);
    fq_cuda_guard_exit(&g);
    free(cs);
    free(p);
    if (rc)
        return fq_err(ctx, FQ_ERR_CUDA, "attention (cuDNN %s B%lld S%lld H%lld dh%lld) on cuda:%d: listing: %s",
                      dname(dt), (long long)B, (long long)S, (long long)H, (long long)dh, d->index, err);
    if (*n == 0)
        return fq_err(ctx, FQ_ERR_UNSUPPORTED,
                      "attention (cuDNN %s B%lld S%lld H%lld dh%lld) on cuda:%d: no engine config: with the softmax "
                      "statistics: %s; without: %s",
                      dname(dt), (long long)B, (long long)S, (long long)H, (long long)dh, d->index,
                      why[0][0] ? why[0] : "no execution plan", why[1][0] ? why[1] : "no execution plan");
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
                             int64_t ldo, int strict, int *ok, size_t *ws_bytes) {
    return fq_attn_cudnn_plan_rows(ctx, d, dt, B, S, S, H, dh, ldo, strict, ok, ws_bytes);
}

fq_status fq_attn_cudnn_plan_rows(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t Sq, int64_t Skv,
                                  int64_t H, int64_t dh, int64_t ldo, int strict, int *ok, size_t *ws_bytes) {
    (void)d, (void)dt, (void)B, (void)Sq, (void)Skv, (void)H, (void)dh, (void)ldo;
    *ok = 0;
    *ws_bytes = 0;
    return strict ? none(ctx) : FQ_OK;
}

fq_status fq_attn_cudnn_run(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh,
                            const void *q, const void *k, const void *v, void *out, int64_t ldo, void *ws,
                            size_t ws_bytes, int strict, int *ran) {
    return fq_attn_cudnn_run_rows(ctx, d, dt, B, S, S, H, dh, q, k, v, out, ldo, ws, ws_bytes, strict, ran);
}

fq_status fq_attn_cudnn_run_rows(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t Sq, int64_t Skv,
                                 int64_t H, int64_t dh, const void *q, const void *k, const void *v, void *out,
                                 int64_t ldo, void *ws, size_t ws_bytes, int strict, int *ran) {
    (void)d, (void)dt, (void)B, (void)Sq, (void)Skv, (void)H, (void)dh, (void)q, (void)k, (void)v, (void)out;
    (void)ldo, (void)ws, (void)ws_bytes;
    *ran = 0;
    return strict ? none(ctx) : FQ_OK;
}

fq_status fq_attn_cudnn_set_tune(fq_ctx *ctx, fq_cuda_dev *d, int mode) {
    (void)ctx, (void)d, (void)mode;
    return FQ_OK;
}

void fq_attn_cudnn_describe(fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh, char *buf,
                            size_t n) {
    (void)d, (void)dt, (void)B, (void)S, (void)H, (void)dh;
    if (n) buf[0] = 0;
}

fq_status fq_attn_cudnn_list(fq_ctx *ctx, fq_cuda_dev *d, fq_dtype dt, int64_t B, int64_t S, int64_t H, int64_t dh,
                             int wide, fq_attn_cudnn_cfg *out, int max, int *n) {
    (void)d, (void)dt, (void)B, (void)S, (void)H, (void)dh, (void)wide, (void)out, (void)max;
    *n = 0;
    return none(ctx);
}
#endif
#else
typedef int fq_attn_cudnn_unused; /* ISO C forbids an empty translation unit */
#endif

/* The FluxTransformer2DModel forward: memory plan and one straight-line pass
 * over backend-neutral ops (src/ops/nn_ops.h). Nothing here knows which device
 * runs it; every op checks its operands and dispatches.
 *
 * Numerics follow diffusers' PyTorch code op by op; `cd` (the model's compute
 * dtype) tells each op which rounding to reproduce. See docs/flux-traps.md. */
#include "models/flux.h"

#include "ops/nn_ops.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the plan: one arena, buffers at fixed offsets ------------------------------------ */

enum {
    B_T, B_G,            /* [B]        timestep*1000, guidance*1000                      */
    B_IDS,               /* [S, 3]     txt ids then img ids                              */
    B_COS, B_SIN,        /* [S, Dh]    RoPE tables                                       */
    B_TPROJ,             /* [B, 256]   sinusoidal projection                             */
    B_E1, B_E2, B_E3,    /* [B, D]     embedder temporaries                              */
    B_TEMB, B_TACT,      /* [B, D]     temb and silu(temb)                               */
    B_MODS,              /* every AdaLN modulation, computed up front: per double block  */
                         /* [B, 6D] image then [B, 6D] text, per single block [B, 3D],   */
                         /* then norm_out's [B, 2D] (see mod_view)                       */
    B_XIN,               /* [B, Si, Cin] input latents in the arena                      */
    B_CIN,               /* [B, St, J] input text states                                 */
    B_PIN,               /* [B, P]     pooled projection                                 */
    B_H, B_NH, B_TI,     /* [B, Si, D] image stream, its normed copy, a temporary        */
    B_C, B_NC, B_TC,     /* [B, St, D] text stream, its normed copy, a temporary         */
    B_Q, B_K, B_V, B_O,  /* [B, S, D]  joint q, k, v, attention output (inside B_WORK)   */
    B_X, B_NX,           /* [B, S, D]  single-stream residual and its normed copy        */
    B_WORK,              /* [B, S, F]  MLP hidden; holds q, k, v, o when no MLP is live   */
    B_CAT,               /* [B, S, D+F] cat(attn, mlp) of a single block; holds nh, ti,   */
                         /*            nc, tc, which only the double blocks use          */
    B_ATT,               /* attention scratch                                            */
    B_LIN,               /* linear scratch (dense weights widened / 4-bit dequantized)   */
    B_QKVB,              /* [G, 3D] the q, k, v biases of each block's stream side by side */
    NBUF
};

static const char *const g_buf_names[NBUF] = {
    "timestep", "guidance", "ids", "rope_cos", "rope_sin", "time_proj", "emb1", "emb2", "emb3", "temb",
    "silu_temb", "modulations", "hidden_states_in", "encoder_hidden_states_in", "pooled_in", "h",
    "norm_h", "tmp_h", "c", "norm_c", "tmp_c", "q", "k", "v", "attn_out", "x", "norm_x", "mlp", "cat",
    "attn_scratch", "linear_scratch", "qkv_bias"};

struct fq_flux_plan {
    const fq_flux_model *m;   /* not owned; must outlive the plan */
    int64_t B, St, Si, S;
    fq_buffer arena;          /* owned */
    size_t off[NBUF];
    int64_t cap[NBUF];        /* elements per buffer */
    fq_dtype dt[NBUF];        /* f32, or fq_nn_act_dtype for the token-sized activations */
    int ndim[NBUF];
    int64_t shape[NBUF][3];
    int parent[NBUF];         /* the region a buffer lives in (-1: its own bytes) */
    int fused_gelu;           /* GELU in the MLP linears' epilogue (see flux.h) */
    int attn_cat;             /* single blocks: attention written into cat (cuDNN) */
    int qkv_group;            /* 4-bit q, k, v as one batched GEMM (biases in B_QKVB) */
    fq_flux_tap_fn tap;
    void *tap_user;
};

static void set_shape(fq_flux_plan *p, int id, int nd, int64_t a, int64_t b, int64_t c) {
    p->ndim[id] = nd;
    p->shape[id][0] = a;
    p->shape[id][1] = b;
    p->shape[id][2] = c;
    p->cap[id] = nd == 1 ? a : nd == 2 ? a * b : a * b * c;
}

/* Scratch of one linear for any row count the forward uses (rows[0..3]):
 * [B] rows map f32 to f32 (the modulation and embedder linears), token rows
 * map activations (act) to activations, and the last linear writes the f32
 * output. */
static int64_t lin_scratch(fq_ctx *ctx, const fq_flux_linear *l, const int64_t rows[4], fq_dtype cd, fq_dtype act,
                           int last) {
    if (!l->w && !l->qw) return 0;
    int64_t n = 0;
    for (int i = 0; i < 4; i++) {
        for (int j = 0; j < 2; j++) {
            const fq_dtype xt = i == 0 ? FQ_F32 : act, yt = i == 0 || (j == 1 && last) ? FQ_F32 : act;
            int64_t s = l->qw ? fq_nn_linear_q4_scratch_io(ctx, l->qw, l->b, rows[i], cd, xt, yt)
                              : fq_nn_linear_scratch_io(ctx, l->w, l->b, rows[i], cd, xt, yt);
            n = s > n ? s : n;
        }
    }
    return n;
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* The same-input q, k, v projections: group 2i / 2i + 1 the image / text stream
 * of double block i, group 2L + i single block i. */
static int64_t qkv_groups(const fq_flux_model *m) { return 2 * m->cfg.num_layers + m->cfg.num_single_layers; }
static void qkv_linears(const fq_flux_model *m, int64_t g, const fq_flux_linear *l[3]) {
    const int64_t L = m->cfg.num_layers;
    if (g < 2 * L) {
        const fq_flux_double *b = &m->blocks[g / 2];
        l[0] = g % 2 ? &b->add_q : &b->to_q;
        l[1] = g % 2 ? &b->add_k : &b->to_k;
        l[2] = g % 2 ? &b->add_v : &b->to_v;
    } else {
        const fq_flux_single *sb = &m->single[g - 2 * L];
        l[0] = &sb->to_q, l[1] = &sb->to_k, l[2] = &sb->to_v;
    }
}

/* The largest scratch any linear of the model needs for these row counts. */
static int64_t model_lin_scratch(fq_ctx *ctx, const fq_flux_model *m, const int64_t rows[4]) {
    const fq_flux_linear *top[] = {&m->time_l1, &m->time_l2, &m->guid_l1, &m->guid_l2, &m->text_l1, &m->text_l2,
                                   &m->context_embedder, &m->x_embedder, &m->norm_out, &m->proj_out};
    int64_t n = 0;
    const fq_dtype cd = m->compute_dtype, act = fq_nn_act_dtype(m->device, cd);
    for (size_t i = 0; i < sizeof top / sizeof top[0]; i++)
        n = max64(n, lin_scratch(ctx, top[i], rows, cd, act, top[i] == &m->proj_out));
    for (int64_t i = 0; i < m->cfg.num_layers; i++) {
        const fq_flux_double *b = &m->blocks[i];
        const fq_flux_linear *l[] = {&b->norm1, &b->norm1_context, &b->to_q, &b->to_k, &b->to_v, &b->add_q, &b->add_k,
                                     &b->add_v, &b->to_out, &b->to_add_out, &b->ff1, &b->ff2, &b->ff_ctx1, &b->ff_ctx2};
        for (size_t j = 0; j < sizeof l / sizeof l[0]; j++) n = max64(n, lin_scratch(ctx, l[j], rows, cd, act, 0));
    }
    for (int64_t i = 0; i < m->cfg.num_single_layers; i++) {
        const fq_flux_single *s = &m->single[i];
        const fq_flux_linear *l[] = {&s->norm, &s->to_q, &s->to_k, &s->to_v, &s->proj_mlp, &s->proj_out};
        for (size_t j = 0; j < sizeof l / sizeof l[0]; j++) n = max64(n, lin_scratch(ctx, l[j], rows, cd, act, 0));
    }
    return n;
}

fq_status fq_flux_plan_create(fq_ctx *ctx, const fq_flux_model *m, int64_t batch, int64_t txt_tokens,
                              int64_t img_tokens, fq_flux_plan **out) {
    if (!m || !out) return fq_err(ctx, FQ_ERR_INVALID_ARG, "flux_plan: NULL model or output");
    const int64_t lim = (int64_t)1 << 24;
    if (batch < 1 || batch > lim || txt_tokens < 0 || img_tokens < 1 || txt_tokens > lim || img_tokens > lim)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "flux_plan: bad sizes: batch %lld, %lld text and %lld image tokens",
                      (long long)batch, (long long)txt_tokens, (long long)img_tokens);
    /* whatever the ops need on the device is created now, not during a forward */
    FQ_TRY(fq_nn_prepare(ctx, m->device));
    int64_t att_scratch = 0; /* attention's plan (cuDNN) is built here too */
    FQ_TRY(fq_nn_attention_plan(ctx, m->device, batch, txt_tokens + img_tokens, m->cfg.num_attention_heads,
                                m->cfg.attention_head_dim, m->compute_dtype,
                                fq_nn_act_dtype(m->device, m->compute_dtype), FQ_NN_ATTN_AUTO, &att_scratch));
    /* the single blocks' attention straight into cat's first columns where cuDNN runs it */
    fq_status cs = fq_nn_attention_plan_cols(ctx, m->device, batch, txt_tokens + img_tokens,
                                             m->cfg.num_attention_heads, m->cfg.attention_head_dim, m->compute_dtype,
                                             fq_nn_act_dtype(m->device, m->compute_dtype),
                                             m->cfg.inner_dim + m->cfg.mlp_dim, &att_scratch);
    if (cs != FQ_OK && cs != FQ_ERR_UNSUPPORTED) return cs;
    fq_flux_plan *p = calloc(1, sizeof *p);
    if (!p) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "flux_plan: out of host memory");
    p->attn_cat = cs == FQ_OK;
    const fq_flux_config *c = &m->cfg;
    const int64_t B = batch, St = txt_tokens, Si = img_tokens, S = St + Si, D = c->inner_dim, F = c->mlp_dim;
    p->m = m;
    p->B = B, p->St = St, p->Si = Si, p->S = S;
    /* token-sized activations in the device's activation dtype (bf16 on a GPU
     * for a bf16 model: the values are bf16-rounded anyway); the rest f32 */
    const fq_dtype act = fq_nn_act_dtype(m->device, m->compute_dtype);
    for (int id = 0; id < NBUF; id++) p->dt[id] = FQ_F32;
    p->dt[B_XIN] = p->dt[B_CIN] = act;
    for (int id = B_H; id <= B_CAT; id++) p->dt[id] = act;
    set_shape(p, B_T, 1, B, 0, 0);
    set_shape(p, B_G, 1, B, 0, 0);
    set_shape(p, B_IDS, 2, S, 3, 0);
    set_shape(p, B_COS, 2, S, c->attention_head_dim, 0);
    set_shape(p, B_SIN, 2, S, c->attention_head_dim, 0);
    set_shape(p, B_TPROJ, 2, B, 256, 0);
    for (int id = B_E1; id <= B_TACT; id++) set_shape(p, id, 2, B, D, 0);
    set_shape(p, B_MODS, 1, B * D * (12 * c->num_layers + 3 * c->num_single_layers + 2), 0, 0);
    set_shape(p, B_XIN, 3, B, Si, c->in_channels);
    set_shape(p, B_CIN, 3, B, St, c->joint_attention_dim);
    set_shape(p, B_PIN, 2, B, c->pooled_projection_dim, 0);
    for (int id = B_H; id <= B_TI; id++) set_shape(p, id, 3, B, Si, D);
    for (int id = B_C; id <= B_TC; id++) set_shape(p, id, 3, B, St, D);
    for (int id = B_Q; id <= B_NX; id++) set_shape(p, id, 3, B, S, D);
    set_shape(p, B_WORK, 3, B, S, F);
    set_shape(p, B_CAT, 3, B, S, D + F);
    set_shape(p, B_ATT, 1, att_scratch, 0, 0);
    const int64_t rows[4] = {B, B * St, B * Si, B * S};
    int64_t lin_need = model_lin_scratch(ctx, m, rows);
    /* q, k, v of a stream as one batched GEMM: 4-bit weights of one shape and
     * biases of the compute dtype everywhere (the plan keeps the biases side by side) */
    const char *qg = getenv("FQ_QKV_GROUP"); /* "0": three calls (a baseline for benchmarks) */
    p->qkv_group = fq_nn_linear_group_batched(m->device, m->compute_dtype) && !(qg && !strcmp(qg, "0"));
    for (int64_t g = 0; g < qkv_groups(m) && p->qkv_group; g++) {
        const fq_flux_linear *l[3];
        qkv_linears(m, g, l);
        for (int j = 0; j < 3; j++)
            if (!l[j]->qw || !l[j]->b || l[j]->b->dtype != m->compute_dtype || l[j]->b->numel != D ||
                l[j]->qw->info.shape[0] != D || l[j]->qw->info.shape[1] != D)
                p->qkv_group = 0;
    }
    if (p->qkv_group) {
        const fq_flux_linear *l[3];
        qkv_linears(m, 0, l);
        for (int i = 1; i < 4; i++)
            lin_need = max64(lin_need, fq_nn_linear_q4_group_scratch(ctx, l[0]->qw, l[0]->b, 3, rows[i],
                                                                     m->compute_dtype, act, act));
        p->dt[B_QKVB] = m->compute_dtype;
    }
    set_shape(p, B_LIN, 1, lin_need, 0, 0);
    set_shape(p, B_QKVB, 1, p->qkv_group ? qkv_groups(m) * 3 * D : 1, 0, 0);
    /* Buffers whose lifetimes never meet share bytes: q, k, v, o live in the
     * MLP hidden's region (a double block's MLP runs after its attention
     * output is projected; a single block's GELU has read the MLP hidden before
     * q is written), and the double blocks' nh, ti, nc, tc in the single
     * blocks' cat (the final norm_out writes nh after the last single block). */
    for (int id = 0; id < NBUF; id++) p->parent[id] = -1;
    for (int id = B_Q; id <= B_O; id++) p->parent[id] = B_WORK;
    p->parent[B_NH] = p->parent[B_TI] = p->parent[B_NC] = p->parent[B_TC] = B_CAT;
    size_t off = 0, sub[NBUF] = {0};
    for (int id = 0; id < NBUF; id++) { /* 256-byte aligned views */
        const size_t bytes = ((size_t)p->cap[id] * fq_dtype_size(p->dt[id]) + 255) & ~(size_t)255;
        if (p->parent[id] >= 0) {
            p->off[id] = sub[p->parent[id]]; /* relative for now */
            sub[p->parent[id]] += bytes;
        }
    }
    for (int id = 0; id < NBUF; id++) {
        if (p->parent[id] >= 0) continue;
        size_t bytes = ((size_t)p->cap[id] * fq_dtype_size(p->dt[id]) + 255) & ~(size_t)255;
        if (sub[id] > bytes) bytes = sub[id];
        p->off[id] = off;
        off += bytes;
    }
    for (int id = 0; id < NBUF; id++)
        if (p->parent[id] >= 0) p->off[id] += p->off[p->parent[id]];
    fq_status s = fq_buf_alloc(ctx, m->device, off, &p->arena);
    if (s != FQ_OK) {
        free(p);
        return fq_err_prefix(ctx, s, "flux_plan (%zu bytes of activations)", off);
    }
    for (int64_t g = 0; p->qkv_group && g < qkv_groups(m); g++) {
        const fq_flux_linear *l[3];
        qkv_linears(m, g, l);
        const size_t bb = (size_t)D * fq_dtype_size(m->compute_dtype);
        for (int j = 0; j < 3 && s == FQ_OK; j++)
            s = fq_buf_copy(ctx, &p->arena, p->off[B_QKVB] + (size_t)(3 * g + j) * bb, &l[j]->b->buf, 0, bb);
        if (s != FQ_OK) {
            fq_flux_plan_free(p);
            return fq_err_prefix(ctx, s, "flux_plan (q, k, v biases)");
        }
    }
    fq_flux_plan_set_fused_gelu(p, 1);
    *out = p;
    return FQ_OK;
}

void fq_flux_plan_free(fq_flux_plan *p) {
    if (!p) return;
    fq_buf_free(&p->arena);
    free(p);
}

size_t fq_flux_plan_bytes(const fq_flux_plan *p) { return p ? p->arena.bytes : 0; }

void fq_flux_plan_set_fused_gelu(fq_flux_plan *p, int on) {
    p->fused_gelu = on && fq_nn_linear_gelu_fused(p->m->device, p->m->compute_dtype);
}

void fq_flux_plan_set_tap(fq_flux_plan *p, fq_flux_tap_fn fn, void *user) {
    p->tap = fn;
    p->tap_user = user;
}

/* A buffer with its planned shape. */
static fq_tensor V(const fq_flux_plan *p, int id) {
    return fq_nn_view(&p->arena, p->off[id], p->dt[id], p->ndim[id], p->shape[id], g_buf_names[id]);
}

static fq_tensor V3(const fq_flux_plan *p, int id, int64_t a, int64_t b, int64_t c) {
    int64_t sh[3] = {a, b, c};
    FQ_ASSERT(a * b * c <= p->cap[id]);
    return fq_nn_view(&p->arena, p->off[id], p->dt[id], 3, sh, g_buf_names[id]);
}

static void tap(const fq_flux_plan *p, const fq_tensor *t, const char *fmt, ...) {
    if (!p->tap) return;
    char name[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    p->tap(p->tap_user, name, t);
}

/* ---- the forward ------------------------------------------------------------------------- */

/* Modulation chunk order of AdaLayerNormZero (double blocks); single blocks use
 * the first three; AdaLayerNormContinuous (norm_out) is (scale, shift). */
enum { MSA_SHIFT = 0, MSA_SCALE, MSA_GATE, MLP_SHIFT, MLP_SCALE, MLP_GATE };
enum { OUT_SCALE = 0, OUT_SHIFT = 1 };

static const float LN_EPS = 1e-6f, RMS_EPS = 1e-6f;

/* y = l(x): dense or 4-bit. */
static fq_status lin(fq_ctx *ctx, const fq_flux_plan *p, const fq_flux_linear *l, const fq_tensor *x, fq_tensor *y) {
    fq_tensor scratch = V(p, B_LIN);
    fq_dtype cd = p->m->compute_dtype;
    return l->qw ? fq_nn_linear_q4(ctx, x, l->qw, l->b, y, &scratch, cd)
                 : fq_nn_linear(ctx, x, l->w, l->b, y, &scratch, cd);
}

/* y[j] = l[j](x), j < 3, for group g's q, k, v (see qkv_linears): one batched GEMM
 * when the plan keeps their biases side by side, else three linears; the same bits. */
static fq_status lin3(fq_ctx *ctx, const fq_flux_plan *p, int64_t g, const fq_tensor *x, fq_tensor *const y[3]) {
    const fq_flux_linear *l[3];
    qkv_linears(p->m, g, l);
    if (!p->qkv_group) {
        for (int j = 0; j < 3; j++) FQ_TRY(lin(ctx, p, l[j], x, y[j]));
        return FQ_OK;
    }
    const int64_t n3 = 3 * p->m->cfg.inner_dim;
    const size_t es = fq_dtype_size(p->dt[B_QKVB]);
    fq_tensor bc = V(p, B_QKVB), scratch = V(p, B_LIN);
    bc.shape[0] = bc.numel = n3;
    bc.buf.ptr = (char *)bc.buf.ptr + (size_t)(g * n3) * es;
    bc.buf.bytes = (size_t)n3 * es;
    const fq_qtensor *w[3] = {l[0]->qw, l[1]->qw, l[2]->qw};
    const fq_tensor *b[3] = {l[0]->b, l[1]->b, l[2]->b};
    return fq_nn_linear_q4_group(ctx, x, w, b, &bc, y, 3, &scratch, p->m->compute_dtype);
}

/* out[..., c0 : c0 + N] = gelu_tanh(l(x)): in the GEMM's epilogue when the plan
 * fuses it and the weights allow (4-bit, or dense of the compute dtype), else
 * l(x) into tmp [.., N] (tapped as `name`) and GELU from there (tmp may be out
 * when c0 is 0 and out has N columns). */
static fq_status lin_gelu(fq_ctx *ctx, const fq_flux_plan *p, const fq_flux_linear *l, const fq_tensor *x,
                          fq_tensor *tmp, fq_tensor *out, int64_t c0, const char *name) {
    fq_dtype cd = p->m->compute_dtype;
    if (p->fused_gelu && (!l->w || l->w->dtype == cd) && (!l->b || l->b->dtype == cd)) {
        fq_tensor scratch = V(p, B_LIN);
        return fq_nn_linear_gelu_cols(ctx, x, l->w, l->qw, l->b, out, c0, &scratch, cd);
    }
    FQ_TRY(lin(ctx, p, l, x, tmp));
    if (name) tap(p, tmp, "%s", name);
    return fq_nn_gelu_tanh_cols(ctx, tmp, out, c0, cd);
}

/* A block's AdaLN modulation [B, n*D] in B_MODS: kind 0 double block i (which:
 * 0 image, 1 text; n = 6), 1 single block i (n = 3), 2 norm_out (n = 2). */
static fq_tensor mod_view(const fq_flux_plan *p, int kind, int64_t i, int which) {
    const int64_t D = p->m->cfg.inner_dim, L = p->m->cfg.num_layers, Ls = p->m->cfg.num_single_layers;
    const int64_t e0 = kind == 0 ? (12 * i + 6 * which) * D : kind == 1 ? (12 * L + 3 * i) * D : (12 * L + 3 * Ls) * D;
    const int64_t sh[2] = {p->B, (kind == 0 ? 6 : kind == 1 ? 3 : 2) * D};
    static const char *const names[3] = {"mod", "mod_single", "mod_out"};
    return fq_nn_view(&p->arena, p->off[B_MODS] + (size_t)(e0 * p->B) * sizeof(float), FQ_F32, 2, sh,
                      kind == 0 && which ? "mod_context" : names[kind]);
}

/* Every block's modulation linear(silu(temb)) up front: they depend on temb
 * only, and back to back the few-row GEMVs stream their weights without the
 * big kernels in between. */
static fq_status modulations(fq_ctx *ctx, const fq_flux_plan *p, const fq_tensor *tact) {
    const fq_flux_model *m = p->m;
    for (int64_t i = 0; i < m->cfg.num_layers; i++) {
        fq_tensor mi = mod_view(p, 0, i, 0), mc = mod_view(p, 0, i, 1);
        FQ_TRY(lin(ctx, p, &m->blocks[i].norm1, tact, &mi));
        FQ_TRY(lin(ctx, p, &m->blocks[i].norm1_context, tact, &mc));
    }
    for (int64_t i = 0; i < m->cfg.num_single_layers; i++) {
        fq_tensor ms = mod_view(p, 1, i, 0);
        FQ_TRY(lin(ctx, p, &m->single[i].norm, tact, &ms));
    }
    fq_tensor mo = mod_view(p, 2, 0, 0);
    return lin(ctx, p, &m->norm_out, tact, &mo);
}

/* An embedder MLP: out = l2(silu(l1(x))), using tmp. */
static fq_status mlp2(fq_ctx *ctx, const fq_flux_plan *p, const fq_flux_linear *l1, const fq_flux_linear *l2,
                      const fq_tensor *x, fq_tensor *tmp, fq_tensor *out) {
    fq_dtype cd = p->m->compute_dtype;
    FQ_TRY(lin(ctx, p, l1, x, tmp));
    FQ_TRY(fq_nn_silu(ctx, tmp, tmp, cd));
    return lin(ctx, p, l2, tmp, out);
}

/* Tokens [t0, t0 + n) of a batch-1 tensor [1, S, D], as [1, n, D] (a view). */
static fq_tensor tokens(const fq_tensor *t, int64_t t0, int64_t n) {
    fq_tensor v = *t;
    const size_t es = fq_dtype_size(t->dtype);
    v.shape[1] = n;
    v.numel = n * t->shape[2];
    v.buf.ptr = (char *)t->buf.ptr + (size_t)(t0 * t->shape[2]) * es;
    v.buf.bytes = (size_t)v.numel * es;
    return v;
}

/* q|k|v of the joint attention: text rows first, then image rows, per batch;
 * q and k (rope) RMS-normed and rotated by their positions (text tokens
 * first in the RoPE tables). At batch 1 the projections write their rows of
 * `out` directly, and the norm of q and k is left to qk_norm_rope (one call
 * for both). */
static fq_status joint_proj(fq_ctx *ctx, const fq_flux_plan *p, const fq_flux_linear *img, const fq_flux_linear *txt,
                            const fq_tensor *wn_img, const fq_tensor *wn_txt, int rope, fq_tensor *out) {
    const fq_dtype cd = p->m->compute_dtype;
    const int64_t heads = p->m->cfg.num_attention_heads;
    fq_tensor ti = V(p, B_TI), tc = V(p, B_TC), nh = V(p, B_NH), nc = V(p, B_NC), cs = V(p, B_COS), sn = V(p, B_SIN);
    if (p->B == 1) {
        ti = tokens(out, p->St, p->Si);
        tc = tokens(out, 0, p->St);
    }
    FQ_TRY(lin(ctx, p, img, &nh, &ti));
    FQ_TRY(lin(ctx, p, txt, &nc, &tc));
    if (rope) {
        if (p->B == 1) return FQ_OK;
        const fq_nn_rope_part parts[2] = {{&ti, wn_img, p->St}, {&tc, wn_txt, 0}};
        FQ_TRY(fq_nn_rmsnorm_rope_n(ctx, parts, 2, RMS_EPS, &cs, &sn, heads, cd));
    } else {
        if (wn_img) FQ_TRY(fq_nn_rmsnorm_heads(ctx, &ti, wn_img, RMS_EPS, &ti, cd));
        if (wn_txt) FQ_TRY(fq_nn_rmsnorm_heads(ctx, &tc, wn_txt, RMS_EPS, &tc, cd));
    }
    return p->B == 1 ? FQ_OK : fq_nn_concat(ctx, &tc, &ti, 1, out);
}

/* Batch 1: RMSNorm + RoPE of the joint q and k of a double block, image and
 * text rows with their own weights, in one call. */
static fq_status qk_norm_rope(fq_ctx *ctx, const fq_flux_plan *p, const fq_flux_double *bl, fq_tensor *q,
                              fq_tensor *k) {
    fq_tensor qi = tokens(q, p->St, p->Si), qc = tokens(q, 0, p->St), ki = tokens(k, p->St, p->Si),
              kc = tokens(k, 0, p->St), cs = V(p, B_COS), sn = V(p, B_SIN);
    const fq_nn_rope_part parts[4] = {
        {&qi, bl->norm_q, p->St}, {&qc, bl->norm_added_q, 0}, {&ki, bl->norm_k, p->St}, {&kc, bl->norm_added_k, 0}};
    return fq_nn_rmsnorm_rope_n(ctx, parts, 4, RMS_EPS, &cs, &sn, p->m->cfg.num_attention_heads,
                                p->m->compute_dtype);
}

/* next: the double block after bl (NULL for the last): bl's last gated adds
 * also norm its inputs (the text stream's not at f16, whose clamp comes between). */
static fq_status double_block(fq_ctx *ctx, const fq_flux_plan *p, const fq_flux_double *bl, int64_t i,
                              const fq_flux_double *next) {
    const fq_flux_model *m = p->m;
    const fq_dtype cd = m->compute_dtype;
    const int64_t heads = m->cfg.num_attention_heads, B = p->B, F = m->cfg.mlp_dim;
    fq_tensor h = V(p, B_H), nh = V(p, B_NH), ti = V(p, B_TI), c = V(p, B_C), nc = V(p, B_NC), tc = V(p, B_TC);
    fq_tensor q = V(p, B_Q), k = V(p, B_K), v = V(p, B_V), o = V(p, B_O), att = V(p, B_ATT);
    fq_tensor mi = mod_view(p, 0, i, 0), mc = mod_view(p, 0, i, 1);
    fq_tensor mi_next = mod_view(p, 0, next ? i + 1 : i, 0), mc_next = mod_view(p, 0, next ? i + 1 : i, 1);
    fq_tensor mlp_i = V3(p, B_WORK, B, p->Si, F), mlp_c = V3(p, B_WORK, B, p->St, F); /* q, k, v, o are dead */

    /* AdaLN-Zero of both streams (unless the block before did it) */
    if (i == 0) FQ_TRY(fq_nn_adaln(ctx, &h, &mi, MSA_SHIFT, MSA_SCALE, LN_EPS, &nh, cd));
    if (i == 0 || cd == FQ_F16) FQ_TRY(fq_nn_adaln(ctx, &c, &mc, MSA_SHIFT, MSA_SCALE, LN_EPS, &nc, cd));
    tap(p, &mi, "transformer_blocks.%lld.norm1.emb", (long long)i);
    tap(p, &nh, "transformer_blocks.%lld.norm1.x", (long long)i);
    tap(p, &mc, "transformer_blocks.%lld.norm1_context.emb", (long long)i);
    tap(p, &nc, "transformer_blocks.%lld.norm1_context.x", (long long)i);

    /* joint attention over [text; image] with RMS-normed q, k and RoPE */
    if (B == 1 && p->qkv_group) { /* each stream's q, k, v in one GEMM, into its rows */
        fq_tensor qi = tokens(&q, p->St, p->Si), ki = tokens(&k, p->St, p->Si), vi = tokens(&v, p->St, p->Si);
        fq_tensor qc = tokens(&q, 0, p->St), kc = tokens(&k, 0, p->St), vc = tokens(&v, 0, p->St);
        fq_tensor *const yi[3] = {&qi, &ki, &vi}, *const yc[3] = {&qc, &kc, &vc};
        FQ_TRY(lin3(ctx, p, 2 * i, &nh, yi));
        FQ_TRY(lin3(ctx, p, 2 * i + 1, &nc, yc));
        FQ_TRY(qk_norm_rope(ctx, p, bl, &q, &k));
    } else {
        FQ_TRY(joint_proj(ctx, p, &bl->to_q, &bl->add_q, bl->norm_q, bl->norm_added_q, 1, &q));
        FQ_TRY(joint_proj(ctx, p, &bl->to_k, &bl->add_k, bl->norm_k, bl->norm_added_k, 1, &k));
        if (B == 1) FQ_TRY(qk_norm_rope(ctx, p, bl, &q, &k));
        FQ_TRY(joint_proj(ctx, p, &bl->to_v, &bl->add_v, NULL, NULL, 0, &v));
    }
    FQ_TRY(fq_nn_attention(ctx, &q, &k, &v, heads, &o, &att, cd));
    fq_tensor oi = ti, oc = tc; /* the image and text rows of o */
    if (B == 1) {
        oi = tokens(&o, p->St, p->Si);
        oc = tokens(&o, 0, p->St);
    } else {
        FQ_TRY(fq_nn_split(ctx, &o, 1, &oc, &oi));
    }
    FQ_TRY(lin(ctx, p, &bl->to_out, &oi, &nh));
    FQ_TRY(lin(ctx, p, &bl->to_add_out, &oc, &nc));
    tap(p, &nh, "transformer_blocks.%lld.attn.hidden_states", (long long)i);
    tap(p, &nc, "transformer_blocks.%lld.attn.encoder_hidden_states", (long long)i);

    /* image stream: gated attention residual, then the gated MLP */
    FQ_TRY(fq_nn_gated_add_adaln(ctx, &h, &mi, MSA_GATE, &nh, MLP_SHIFT, MLP_SCALE, LN_EPS, &nh, cd));
    FQ_TRY(lin_gelu(ctx, p, &bl->ff1, &nh, &mlp_i, &mlp_i, 0, NULL));
    FQ_TRY(lin(ctx, p, &bl->ff2, &mlp_i, &ti));
    tap(p, &ti, "transformer_blocks.%lld.ff", (long long)i);
    if (next) { /* nh is free: the next block's normed input goes there */
        FQ_TRY(fq_nn_gated_add_adaln2(ctx, &h, &mi, MLP_GATE, &ti, &mi_next, MSA_SHIFT, MSA_SCALE, LN_EPS, &nh, cd));
    } else {
        FQ_TRY(fq_nn_gated_add(ctx, &h, &mi, MLP_GATE, &ti, cd));
    }

    /* text stream: the same with its own weights */
    FQ_TRY(fq_nn_gated_add_adaln(ctx, &c, &mc, MSA_GATE, &nc, MLP_SHIFT, MLP_SCALE, LN_EPS, &nc, cd));
    FQ_TRY(lin_gelu(ctx, p, &bl->ff_ctx1, &nc, &mlp_c, &mlp_c, 0, NULL));
    FQ_TRY(lin(ctx, p, &bl->ff_ctx2, &mlp_c, &tc));
    tap(p, &tc, "transformer_blocks.%lld.ff_context", (long long)i);
    if (next && cd != FQ_F16) {
        FQ_TRY(fq_nn_gated_add_adaln2(ctx, &c, &mc, MLP_GATE, &tc, &mc_next, MSA_SHIFT, MSA_SCALE, LN_EPS, &nc, cd));
    } else {
        FQ_TRY(fq_nn_gated_add(ctx, &c, &mc, MLP_GATE, &tc, cd));
        /* diffusers clips the text stream (before the next block's AdaLN) */
        if (cd == FQ_F16) FQ_TRY(fq_nn_clamp(ctx, &c, -65504.0f, 65504.0f));
    }
    tap(p, &h, "transformer_blocks.%lld.hidden_states", (long long)i);
    tap(p, &c, "transformer_blocks.%lld.encoder_hidden_states", (long long)i);
    return FQ_OK;
}

/* next: as for double_block (no fusion at f16). */
static fq_status single_block(fq_ctx *ctx, const fq_flux_plan *p, const fq_flux_single *sb, int64_t i,
                              const fq_flux_single *next) {
    const fq_flux_model *m = p->m;
    const fq_dtype cd = m->compute_dtype;
    const int64_t heads = m->cfg.num_attention_heads, D = m->cfg.inner_dim;
    fq_tensor x = V(p, B_X), nx = V(p, B_NX), q = V(p, B_Q), k = V(p, B_K), v = V(p, B_V), o = V(p, B_O);
    fq_tensor att = V(p, B_ATT), mlp = V(p, B_WORK), cat = V(p, B_CAT);
    fq_tensor mod = mod_view(p, 1, i, 0), mod_next = mod_view(p, 1, next ? i + 1 : i, 0);
    fq_tensor cos_t = V(p, B_COS), sin_t = V(p, B_SIN);

    if (i == 0 || cd == FQ_F16) FQ_TRY(fq_nn_adaln(ctx, &x, &mod, MSA_SHIFT, MSA_SCALE, LN_EPS, &nx, cd));
    tap(p, &mod, "single_transformer_blocks.%lld.norm.emb", (long long)i);
    tap(p, &nx, "single_transformer_blocks.%lld.norm.x", (long long)i);
    /* gelu(proj_mlp(nx)) goes straight into cat's last F columns (its linear
     * output, when not fused, into the MLP hidden, which q, k, v and o
     * overwrite afterwards: the same bytes, see the plan) */
    char name[96];
    snprintf(name, sizeof name, "single_transformer_blocks.%lld.proj_mlp", (long long)i);
    FQ_TRY(lin_gelu(ctx, p, &sb->proj_mlp, &nx, &mlp, &cat, D, name));

    fq_tensor *const qkv[3] = {&q, &k, &v};
    FQ_TRY(lin3(ctx, p, 2 * m->cfg.num_layers + i, &nx, qkv));
    const fq_nn_rope_part qk[2] = {{&q, sb->norm_q, 0}, {&k, sb->norm_k, 0}};
    FQ_TRY(fq_nn_rmsnorm_rope_n(ctx, qk, 2, RMS_EPS, &cos_t, &sin_t, heads, cd));
    /* the attention into cat's first D columns: directly where cuDNN runs it
     * (not while a tap wants o), else into o and copied */
    fq_status as = p->attn_cat && !p->tap ? fq_nn_attention_cols(ctx, &q, &k, &v, heads, &cat, 0, &att, cd)
                                          : FQ_ERR_UNSUPPORTED;
    if (as == FQ_ERR_UNSUPPORTED) {
        FQ_TRY(fq_nn_attention(ctx, &q, &k, &v, heads, &o, &att, cd));
        tap(p, &o, "single_transformer_blocks.%lld.attn", (long long)i);
        FQ_TRY(fq_nn_copy_cols(ctx, &o, &cat, 0));
    } else {
        FQ_TRY(as);
    }

    /* proj_out(cat(attn, mlp)) gated into the residual; q is free again */
    FQ_TRY(lin(ctx, p, &sb->proj_out, &cat, &q));
    tap(p, &q, "single_transformer_blocks.%lld.proj_out", (long long)i);
    if (next && cd != FQ_F16) { /* nx is free: the next block's normed input goes there */
        FQ_TRY(fq_nn_gated_add_adaln2(ctx, &x, &mod, MSA_GATE, &q, &mod_next, MSA_SHIFT, MSA_SCALE, LN_EPS, &nx, cd));
    } else {
        FQ_TRY(fq_nn_gated_add(ctx, &x, &mod, MSA_GATE, &q, cd));
        if (cd == FQ_F16) FQ_TRY(fq_nn_clamp(ctx, &x, -65504.0f, 65504.0f));
    }
    tap(p, &x, "single_transformer_blocks.%lld", (long long)i);
    return FQ_OK;
}

/* Checks one input against its expected shape; names it. */
static fq_status want(fq_ctx *ctx, const char *role, const fq_tensor *t, int nd, int64_t a, int64_t b, int64_t c) {
    int64_t sh[3] = {a, b, c};
    char got[96], exp[96];
    if (!t) return fq_err(ctx, FQ_ERR_INVALID_ARG, "flux_forward: input '%s' is NULL", role);
    if (t->ndim == nd && memcmp(t->shape, sh, sizeof(int64_t) * (size_t)nd) == 0) return FQ_OK;
    return fq_err(ctx, FQ_ERR_SHAPE, "flux_forward: input '%s' has shape %s; the plan expects %s", role,
                  fq_shape_str(t->ndim, t->shape, got, sizeof got), fq_shape_str(nd, sh, exp, sizeof exp));
}

static fq_status check_inputs(fq_ctx *ctx, const fq_flux_model *m, const fq_flux_plan *p, const fq_flux_inputs *in,
                              const fq_tensor *out) {
    const fq_flux_config *c = &m->cfg;
    if (p->m != m) return fq_err(ctx, FQ_ERR_INVALID_ARG, "flux_forward: the plan was made for another model");
    FQ_TRY(want(ctx, "hidden_states", in->hidden_states, 3, p->B, p->Si, c->in_channels));
    FQ_TRY(want(ctx, "encoder_hidden_states", in->encoder_hidden_states, 3, p->B, p->St, c->joint_attention_dim));
    FQ_TRY(want(ctx, "pooled_projections", in->pooled_projections, 2, p->B, c->pooled_projection_dim, 0));
    FQ_TRY(want(ctx, "timestep", in->timestep, 1, p->B, 0, 0));
    FQ_TRY(want(ctx, "img_ids", in->img_ids, 2, p->Si, 3, 0));
    FQ_TRY(want(ctx, "txt_ids", in->txt_ids, 2, p->St, 3, 0));
    FQ_TRY(want(ctx, "out", out, 3, p->B, p->Si, c->out_dim));
    if (c->guidance_embeds && !in->guidance)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "flux_forward: this model has guidance_embeds and needs 'guidance'");
    if (!c->guidance_embeds && in->guidance)
        return fq_err(ctx, FQ_ERR_INVALID_ARG,
                      "flux_forward: 'guidance' given but this model has no guidance embedder (guidance_embeds false)");
    if (in->guidance) FQ_TRY(want(ctx, "guidance", in->guidance, 1, p->B, 0, 0));
    return FQ_OK;
}

fq_status fq_flux_forward(fq_ctx *ctx, const fq_flux_model *m, fq_flux_plan *p, const fq_flux_inputs *in,
                          fq_tensor *out) {
    if (!m || !p || !in) return fq_err(ctx, FQ_ERR_INVALID_ARG, "flux_forward: NULL model, plan or inputs");
    FQ_TRY(check_inputs(ctx, m, p, in, out));
    const fq_flux_config *c = &m->cfg;
    const fq_dtype cd = m->compute_dtype;
    fq_tensor xin = V(p, B_XIN), cin = V(p, B_CIN), pin = V(p, B_PIN), ids = V(p, B_IDS);
    fq_tensor cos_t = V(p, B_COS), sin_t = V(p, B_SIN), tt = V(p, B_T), gg = V(p, B_G), tproj = V(p, B_TPROJ);
    fq_tensor e1 = V(p, B_E1), e2 = V(p, B_E2), e3 = V(p, B_E3), temb = V(p, B_TEMB), tact = V(p, B_TACT);
    fq_tensor h = V(p, B_H), c_ = V(p, B_C), x = V(p, B_X), nh = V(p, B_NH);

    /* Inputs enter in the compute dtype (a bf16 pipeline hands bf16 tensors). */
    FQ_TRY(fq_nn_cast(ctx, in->hidden_states, &xin, cd));
    FQ_TRY(fq_nn_cast(ctx, in->encoder_hidden_states, &cin, cd));
    FQ_TRY(fq_nn_cast(ctx, in->pooled_projections, &pin, cd));

    /* RoPE over cat(txt_ids, img_ids): positions as f32, angles in f64. */
    fq_tensor ids_t = fq_nn_view_rows(&ids, 0, p->St), ids_i = fq_nn_view_rows(&ids, p->St, p->Si);
    FQ_TRY(fq_nn_cast(ctx, in->txt_ids, &ids_t, FQ_F32));
    FQ_TRY(fq_nn_cast(ctx, in->img_ids, &ids_i, FQ_F32));
    FQ_TRY(fq_nn_rope_table(ctx, &ids, c->axes_dims_rope, 10000.0, &cos_t, &sin_t));
    tap(p, &cos_t, "pos_embed.cos");
    tap(p, &sin_t, "pos_embed.sin");

    FQ_TRY(lin(ctx, p, &m->x_embedder, &xin, &h));
    tap(p, &h, "x_embedder");

    /* temb = timestep_emb + guidance_emb + pooled_emb. The timestep (and the
     * guidance) is cast to the compute dtype BEFORE the *1000 (bf16: 3.5 -> 3504). */
    FQ_TRY(fq_nn_cast(ctx, in->timestep, &tt, cd));
    FQ_TRY(fq_nn_scale(ctx, &tt, 1000.0f, &tt, cd));
    FQ_TRY(fq_nn_timestep_proj(ctx, &tt, &tproj));
    tap(p, &tproj, "time_text_embed.time_proj");
    FQ_TRY(fq_nn_cast(ctx, &tproj, &tproj, cd));
    FQ_TRY(mlp2(ctx, p, &m->time_l1, &m->time_l2, &tproj, &e1, &e2));
    tap(p, &e2, "time_text_embed.timestep_embedder");
    if (c->guidance_embeds) {
        FQ_TRY(fq_nn_cast(ctx, in->guidance, &gg, cd));
        FQ_TRY(fq_nn_scale(ctx, &gg, 1000.0f, &gg, cd));
        FQ_TRY(fq_nn_timestep_proj(ctx, &gg, &tproj));
        tap(p, &tproj, "time_text_embed.time_proj@call1");
        FQ_TRY(fq_nn_cast(ctx, &tproj, &tproj, cd));
        FQ_TRY(mlp2(ctx, p, &m->guid_l1, &m->guid_l2, &tproj, &e1, &e3));
        tap(p, &e3, "time_text_embed.guidance_embedder");
        FQ_TRY(fq_nn_add(ctx, &e2, &e3, &e2, cd));
    }
    FQ_TRY(mlp2(ctx, p, &m->text_l1, &m->text_l2, &pin, &e1, &e3));
    tap(p, &e3, "time_text_embed.text_embedder");
    FQ_TRY(fq_nn_add(ctx, &e2, &e3, &temb, cd));
    tap(p, &temb, "time_text_embed");
    /* every AdaLN computes linear(silu(temb)); silu once here */
    FQ_TRY(fq_nn_silu(ctx, &temb, &tact, cd));
    FQ_TRY(modulations(ctx, p, &tact));

    FQ_TRY(lin(ctx, p, &m->context_embedder, &cin, &c_));
    tap(p, &c_, "context_embedder");

    for (int64_t i = 0; i < c->num_layers; i++) {
        fq_status s = double_block(ctx, p, &m->blocks[i], i, i + 1 < c->num_layers ? &m->blocks[i + 1] : NULL);
        if (s != FQ_OK) return fq_err_prefix(ctx, s, "transformer_blocks.%lld", (long long)i);
    }
    FQ_TRY(fq_nn_concat(ctx, &c_, &h, 1, &x)); /* text first */
    for (int64_t i = 0; i < c->num_single_layers; i++) {
        fq_status s = single_block(ctx, p, &m->single[i], i, i + 1 < c->num_single_layers ? &m->single[i + 1] : NULL);
        if (s != FQ_OK) return fq_err_prefix(ctx, s, "single_transformer_blocks.%lld", (long long)i);
    }
    FQ_TRY(fq_nn_split(ctx, &x, 1, &c_, &h));

    /* norm_out (AdaLayerNormContinuous: SCALE first, then shift) and proj_out */
    fq_tensor mod = mod_view(p, 2, 0, 0);
    FQ_TRY(fq_nn_adaln(ctx, &h, &mod, OUT_SHIFT, OUT_SCALE, LN_EPS, &nh, cd));
    tap(p, &nh, "norm_out");
    FQ_TRY(lin(ctx, p, &m->proj_out, &nh, out));
    tap(p, out, "proj_out");
    return FQ_OK;
}

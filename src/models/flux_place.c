/* Placement of a Flux model: a visitor over every weight with its diffusers
 * name, on which the audit, the placement check, moves and quantization rest. */
#include "models/flux_place.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    void (*lin)(void *u, const char *module, fq_flux_linear *l);
    void (*ten)(void *u, const char *name, fq_tensor **t);
    void *u;
} visitor;

static void lin(const visitor *v, const char *module, fq_flux_linear *l) {
    if (l->w || l->qw || l->b) v->lin(v->u, module, l);
}
static void ten(const visitor *v, const char *name, fq_tensor **t) {
    if (*t) v->ten(v->u, name, t);
}

/* Walks every parameter of m under its diffusers name. */
static void walk(fq_flux_model *m, const visitor *v) {
    char n[160];
    lin(v, "time_text_embed.timestep_embedder.linear_1", &m->time_l1);
    lin(v, "time_text_embed.timestep_embedder.linear_2", &m->time_l2);
    lin(v, "time_text_embed.guidance_embedder.linear_1", &m->guid_l1);
    lin(v, "time_text_embed.guidance_embedder.linear_2", &m->guid_l2);
    lin(v, "time_text_embed.text_embedder.linear_1", &m->text_l1);
    lin(v, "time_text_embed.text_embedder.linear_2", &m->text_l2);
    lin(v, "context_embedder", &m->context_embedder);
    lin(v, "x_embedder", &m->x_embedder);
    for (int64_t i = 0; m->blocks && i < m->cfg.num_layers; i++) {
        fq_flux_double *b = &m->blocks[i];
        struct { const char *s; fq_flux_linear *l; } L[] = {
            {"norm1.linear", &b->norm1}, {"norm1_context.linear", &b->norm1_context},
            {"attn.to_q", &b->to_q},     {"attn.to_k", &b->to_k},
            {"attn.to_v", &b->to_v},     {"attn.add_q_proj", &b->add_q},
            {"attn.add_k_proj", &b->add_k}, {"attn.add_v_proj", &b->add_v},
            {"attn.to_out.0", &b->to_out}, {"attn.to_add_out", &b->to_add_out},
            {"ff.net.0.proj", &b->ff1},  {"ff.net.2", &b->ff2},
            {"ff_context.net.0.proj", &b->ff_ctx1}, {"ff_context.net.2", &b->ff_ctx2}};
        for (size_t k = 0; k < sizeof L / sizeof *L; k++) {
            snprintf(n, sizeof n, "transformer_blocks.%lld.%s", (long long)i, L[k].s);
            lin(v, n, L[k].l);
        }
        struct { const char *s; fq_tensor **t; } T[] = {
            {"attn.norm_q.weight", &b->norm_q}, {"attn.norm_k.weight", &b->norm_k},
            {"attn.norm_added_q.weight", &b->norm_added_q}, {"attn.norm_added_k.weight", &b->norm_added_k}};
        for (size_t k = 0; k < sizeof T / sizeof *T; k++) {
            snprintf(n, sizeof n, "transformer_blocks.%lld.%s", (long long)i, T[k].s);
            ten(v, n, T[k].t);
        }
    }
    for (int64_t i = 0; m->single && i < m->cfg.num_single_layers; i++) {
        fq_flux_single *s = &m->single[i];
        struct { const char *s; fq_flux_linear *l; } L[] = {
            {"norm.linear", &s->norm}, {"attn.to_q", &s->to_q}, {"attn.to_k", &s->to_k},
            {"attn.to_v", &s->to_v},   {"proj_mlp", &s->proj_mlp}, {"proj_out", &s->proj_out}};
        for (size_t k = 0; k < sizeof L / sizeof *L; k++) {
            snprintf(n, sizeof n, "single_transformer_blocks.%lld.%s", (long long)i, L[k].s);
            lin(v, n, L[k].l);
        }
        snprintf(n, sizeof n, "single_transformer_blocks.%lld.attn.norm_q.weight", (long long)i);
        ten(v, n, &s->norm_q);
        snprintf(n, sizeof n, "single_transformer_blocks.%lld.attn.norm_k.weight", (long long)i);
        ten(v, n, &s->norm_k);
    }
    lin(v, "norm_out.linear", &m->norm_out);
    lin(v, "proj_out", &m->proj_out);
}

/* ---- audit and check ---------------------------------------------------------- */

typedef struct {
    fq_flux_audit_fn fn;
    void *user;
    int64_t n;
} audit_state;

static void audit_tensor(audit_state *a, const char *name, const fq_tensor *t) {
    fq_flux_buffer b = {name, NULL, t->buf.dev, t->buf.bytes, t->dtype};
    a->n++;
    if (a->fn) a->fn(a->user, &b);
}

static void audit_lin(void *u, const char *module, fq_flux_linear *l) {
    audit_state *a = u;
    char n[200];
    snprintf(n, sizeof n, "%s.weight", module);
    if (l->w) audit_tensor(a, n, l->w);
    for (int k = 0; l->qw && k < FQ_QMEMBER_COUNT; k++) {
        if (!l->qw->m[k].bytes) continue;
        fq_flux_buffer b = {n, fq_qmember_name((fq_qmember)k), l->qw->m[k].dev, l->qw->m[k].bytes, FQ_U8};
        a->n++;
        if (a->fn) a->fn(a->user, &b);
    }
    snprintf(n, sizeof n, "%s.bias", module);
    if (l->b) audit_tensor(a, n, l->b);
}
static void audit_ten(void *u, const char *name, fq_tensor **t) { audit_tensor(u, name, *t); }

int64_t fq_flux_audit(const fq_flux_model *m, fq_flux_audit_fn fn, void *user) {
    audit_state a = {fn, user, 0};
    visitor v = {audit_lin, audit_ten, &a};
    walk((fq_flux_model *)m, &v); /* the audit visitor only reads */
    return a.n;
}

typedef struct {
    fq_device dev;
    const fq_flux_buffer *bad;
    fq_flux_buffer first_bad;
    char name[200];
} check_state;

static void check_one(void *u, const fq_flux_buffer *b) {
    check_state *c = u;
    if (c->bad || fq_device_equal(b->device, c->dev)) return;
    c->first_bad = *b;
    snprintf(c->name, sizeof c->name, "%s", b->name);
    c->first_bad.name = c->name;
    c->bad = &c->first_bad;
}

fq_status fq_flux_check_on(fq_ctx *ctx, const fq_flux_model *m, fq_device dev) {
    check_state c = {.dev = dev};
    fq_flux_audit(m, check_one, &c);
    if (!c.bad) return FQ_OK;
    char a[16], b[16];
    return fq_err(ctx, FQ_ERR_DEVICE_MISMATCH, "model placement: '%s'%s%s is on %s, expected %s", c.bad->name,
                  c.bad->member ? " member " : "", c.bad->member ? c.bad->member : "",
                  fq_device_name(c.bad->device, a, sizeof a), fq_device_name(dev, b, sizeof b));
}

/* ---- all-or-nothing transforms ------------------------------------------------ */

/* A transform makes a replacement for every weight first (staged), and only
 * when all succeeded swaps them in; otherwise the staged copies are freed. */
typedef struct {
    void **slot;   /* where the object lives in the model (fq_tensor** or fq_qtensor**) */
    void *fresh;   /* its replacement                                                    */
    int is_q;      /* fresh is a fq_qtensor                                              */
    void **clear;  /* a slot to set to NULL on commit (dense weight replaced by 4-bit)   */
} staged;

typedef struct {
    fq_ctx *ctx;
    fq_status s;
    staged *st;
    int64_t n, cap;
    /* move */
    fq_device dev;
    /* quantize */
    const fq_quant_params *qp;
    char *const *skip;
    int nskip;
} xform;

static void push(xform *x, void **slot, void *fresh, int is_q, void **clear) {
    if (x->n == x->cap) {
        int64_t cap = x->cap ? 2 * x->cap : 256;
        staged *p = realloc(x->st, (size_t)cap * sizeof *p);
        if (!p) {
            if (is_q) fq_qtensor_free(fresh);
            else fq_tensor_free(fresh);
            x->s = fq_err(x->ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
            return;
        }
        x->st = p;
        x->cap = cap;
    }
    x->st[x->n++] = (staged){slot, fresh, is_q, clear};
}

static void stage_tensor_copy(xform *x, fq_tensor **t) {
    fq_tensor *c = NULL;
    if (x->s == FQ_OK && *t) x->s = fq_tensor_copy_to(x->ctx, *t, x->dev, &c);
    if (x->s == FQ_OK && c) push(x, (void **)t, c, 0, NULL);
}

static void move_lin(void *u, const char *module, fq_flux_linear *l) {
    xform *x = u;
    stage_tensor_copy(x, &l->w);
    stage_tensor_copy(x, &l->b);
    if (x->s == FQ_OK && l->qw) {
        fq_qtensor *c = NULL;
        x->s = fq_qtensor_copy_to(x->ctx, l->qw, x->dev, &c);
        if (x->s == FQ_OK) push(x, (void **)&l->qw, c, 1, NULL);
        else fq_err_prefix(x->ctx, x->s, "moving '%s'", module);
    }
}
static void move_ten(void *u, const char *name, fq_tensor **t) {
    (void)name;
    stage_tensor_copy(u, t);
}

static void finish(xform *x) {
    for (int64_t i = 0; i < x->n; i++) {
        staged *s = &x->st[i];
        if (x->s == FQ_OK) {
            void *old = *s->slot;
            *s->slot = s->fresh;
            if (s->clear) {
                fq_tensor_free(*s->clear);
                *s->clear = NULL;
            } else if (s->is_q) {
                fq_qtensor_free(old);
            } else {
                fq_tensor_free(old);
            }
        } else if (s->is_q) {
            fq_qtensor_free(s->fresh);
        } else {
            fq_tensor_free(s->fresh);
        }
    }
    free(x->st);
}

static size_t model_bytes(const fq_flux_model *m);

fq_status fq_flux_move(fq_ctx *ctx, fq_flux_model *m, fq_device dev) {
    FQ_TRY(fq_device_check(ctx, dev));
    FQ_TRY(fq_flux_check_on(ctx, m, m->device)); /* a half-placed model is a bug: refuse */
    if (fq_device_equal(m->device, dev)) return FQ_OK;
    xform x = {.ctx = ctx, .s = FQ_OK, .dev = dev};
    visitor v = {move_lin, move_ten, &x};
    walk(m, &v);
    finish(&x);
    if (x.s != FQ_OK) return x.s;
    m->device = dev;
    m->weight_bytes = model_bytes(m);
    return FQ_OK;
}

static bool skipped(const xform *x, const char *module) {
    for (int i = 0; i < x->nskip; i++)
        if (x->skip[i] && x->skip[i][0] && strstr(module, x->skip[i])) return true;
    return false;
}

static void quant_lin(void *u, const char *module, fq_flux_linear *l) {
    xform *x = u;
    if (x->s != FQ_OK || !l->w || l->qw || skipped(x, module)) return;
    fq_qtensor *q = NULL;
    char n[200];
    snprintf(n, sizeof n, "%s.weight", module);
    x->s = fq_quantize_4bit(x->ctx, l->w, x->qp, &q);
    if (x->s == FQ_OK) x->s = fq_qtensor_set_name(x->ctx, q, n);
    if (x->s != FQ_OK) {
        fq_qtensor_free(q);
        fq_err_prefix(x->ctx, x->s, "quantizing '%s'", n);
        return;
    }
    push(x, (void **)&l->qw, q, 1, (void **)&l->w);
}
static void no_ten(void *u, const char *name, fq_tensor **t) { (void)u, (void)name, (void)t; }

fq_status fq_flux_quantize(fq_ctx *ctx, fq_flux_model *m, const fq_quant_params *p, char *const *skip,
                           int nskip) {
    xform x = {.ctx = ctx, .s = FQ_OK, .qp = p, .skip = skip, .nskip = nskip};
    visitor v = {quant_lin, no_ten, &x};
    walk(m, &v);
    bool any = x.n > 0;
    finish(&x);
    if (x.s != FQ_OK) return x.s;
    if (any) m->quantized = 1;
    m->weight_bytes = model_bytes(m);
    return FQ_OK;
}

static void add_bytes(void *u, const fq_flux_buffer *b) { *(size_t *)u += b->bytes; }
static size_t model_bytes(const fq_flux_model *m) {
    size_t total = 0;
    fq_flux_audit(m, add_bytes, &total);
    return total;
}

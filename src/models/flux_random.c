/* Random-weight Flux models built on their device (see flux_random.h). */
#include "models/flux_random.h"

#include "io/model_config.h"
#include "ops/nn_ops.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

fq_flux_random_params fq_flux_random_default_params(void) {
    fq_flux_random_params p;
    memset(&p, 0, sizeof p);
    p.device = FQ_CPU;
    p.weight_dtype = FQ_BF16;
    p.qp = fq_quant_default_params();
    p.compute_dtype = -1;
    return p;
}

fq_status fq_flux_config_named(fq_ctx *ctx, const char *name, fq_flux_config *out) {
    if (!name || !out) return fq_err(ctx, FQ_ERR_INVALID_ARG, "flux_config: NULL name or output");
    cJSON *j = NULL;
    if (!strcmp(name, "dev") || !strcmp(name, "schnell")) {
        /* every other field: diffusers' defaults, which are FLUX.1's sizes */
        j = cJSON_CreateObject();
        if (!j || !cJSON_AddBoolToObject(j, "guidance_embeds", !strcmp(name, "dev"))) {
            cJSON_Delete(j);
            return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "flux_config: out of host memory");
        }
    } else {
        char path[4096];
        struct stat st;
        int n = stat(name, &st) == 0 && S_ISDIR(st.st_mode) ? snprintf(path, sizeof path, "%s/config.json", name)
                                                             : snprintf(path, sizeof path, "%s", name);
        if (n < 0 || (size_t)n >= sizeof path) return fq_err(ctx, FQ_ERR_INVALID_ARG, "flux_config: path too long");
        if (stat(path, &st) != 0)
            return fq_err(ctx, FQ_ERR_IO, "flux_config: '%s' is neither \"dev\", \"schnell\" nor a config.json", name);
        FQ_TRY(fq_config_read(ctx, path, &j));
    }
    fq_status s = fq_flux_config_from_json(ctx, j, out);
    cJSON_Delete(j);
    return s == FQ_OK ? FQ_OK : fq_err_prefix(ctx, s, "flux_config '%s'", name);
}

/* ---- the model's tensors, in diffusers' order and names ---------------------------- */

typedef struct {
    char name[160];       /* module name, e.g. transformer_blocks.3.attn.to_q */
    fq_flux_linear *l;
    int64_t out, in;
} lin_ref;

typedef struct {
    char name[160];
    fq_tensor **t;
} vec_ref;

typedef struct {
    lin_ref *lin;
    vec_ref *vec;
    int64_t nlin, nvec;
} tensor_list;

static void add_lin(tensor_list *tl, fq_flux_linear *l, int64_t out, int64_t in, const char *fmt, int64_t i,
                    const char *tail) {
    lin_ref *r = &tl->lin[tl->nlin++];
    if (fmt) snprintf(r->name, sizeof r->name, fmt, (long long)i, tail);
    else snprintf(r->name, sizeof r->name, "%s", tail);
    r->l = l;
    r->out = out;
    r->in = in;
}

static void add_vec(tensor_list *tl, fq_tensor **t, int64_t i, const char *fmt, const char *tail) {
    vec_ref *r = &tl->vec[tl->nvec++];
    snprintf(r->name, sizeof r->name, fmt, (long long)i, tail);
    r->t = t;
}

static fq_status list_tensors(fq_ctx *ctx, fq_flux_model *m, tensor_list *tl) {
    const fq_flux_config *c = &m->cfg;
    const int64_t D = c->inner_dim, Fm = c->mlp_dim, nl = c->num_layers, ns = c->num_single_layers;
    tl->lin = calloc((size_t)(10 + 14 * nl + 6 * ns), sizeof *tl->lin);
    tl->vec = calloc((size_t)(4 * nl + 2 * ns + 1), sizeof *tl->vec);
    if (!tl->lin || !tl->vec) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "flux_random: out of host memory");
    add_lin(tl, &m->time_l1, D, 256, NULL, 0, "time_text_embed.timestep_embedder.linear_1");
    add_lin(tl, &m->time_l2, D, D, NULL, 0, "time_text_embed.timestep_embedder.linear_2");
    if (c->guidance_embeds) {
        add_lin(tl, &m->guid_l1, D, 256, NULL, 0, "time_text_embed.guidance_embedder.linear_1");
        add_lin(tl, &m->guid_l2, D, D, NULL, 0, "time_text_embed.guidance_embedder.linear_2");
    }
    add_lin(tl, &m->text_l1, D, c->pooled_projection_dim, NULL, 0, "time_text_embed.text_embedder.linear_1");
    add_lin(tl, &m->text_l2, D, D, NULL, 0, "time_text_embed.text_embedder.linear_2");
    add_lin(tl, &m->context_embedder, D, c->joint_attention_dim, NULL, 0, "context_embedder");
    add_lin(tl, &m->x_embedder, D, c->in_channels, NULL, 0, "x_embedder");
    for (int64_t i = 0; i < nl; i++) {
        fq_flux_double *b = &m->blocks[i];
        const char *f = "transformer_blocks.%lld.%s";
        add_lin(tl, &b->norm1, 6 * D, D, f, i, "norm1.linear");
        add_lin(tl, &b->norm1_context, 6 * D, D, f, i, "norm1_context.linear");
        add_lin(tl, &b->to_q, D, D, f, i, "attn.to_q");
        add_lin(tl, &b->to_k, D, D, f, i, "attn.to_k");
        add_lin(tl, &b->to_v, D, D, f, i, "attn.to_v");
        add_lin(tl, &b->add_q, D, D, f, i, "attn.add_q_proj");
        add_lin(tl, &b->add_k, D, D, f, i, "attn.add_k_proj");
        add_lin(tl, &b->add_v, D, D, f, i, "attn.add_v_proj");
        add_lin(tl, &b->to_out, D, D, f, i, "attn.to_out.0");
        add_lin(tl, &b->to_add_out, D, D, f, i, "attn.to_add_out");
        add_lin(tl, &b->ff1, Fm, D, f, i, "ff.net.0.proj");
        add_lin(tl, &b->ff2, D, Fm, f, i, "ff.net.2");
        add_lin(tl, &b->ff_ctx1, Fm, D, f, i, "ff_context.net.0.proj");
        add_lin(tl, &b->ff_ctx2, D, Fm, f, i, "ff_context.net.2");
        add_vec(tl, &b->norm_q, i, f, "attn.norm_q.weight");
        add_vec(tl, &b->norm_k, i, f, "attn.norm_k.weight");
        add_vec(tl, &b->norm_added_q, i, f, "attn.norm_added_q.weight");
        add_vec(tl, &b->norm_added_k, i, f, "attn.norm_added_k.weight");
    }
    for (int64_t i = 0; i < ns; i++) {
        fq_flux_single *sb = &m->single[i];
        const char *f = "single_transformer_blocks.%lld.%s";
        add_lin(tl, &sb->norm, 3 * D, D, f, i, "norm.linear");
        add_lin(tl, &sb->to_q, D, D, f, i, "attn.to_q");
        add_lin(tl, &sb->to_k, D, D, f, i, "attn.to_k");
        add_lin(tl, &sb->to_v, D, D, f, i, "attn.to_v");
        add_lin(tl, &sb->proj_mlp, Fm, D, f, i, "proj_mlp");
        add_lin(tl, &sb->proj_out, D, D + Fm, f, i, "proj_out");
        add_vec(tl, &sb->norm_q, i, f, "attn.norm_q.weight");
        add_vec(tl, &sb->norm_k, i, f, "attn.norm_k.weight");
    }
    add_lin(tl, &m->norm_out, 2 * D, D, NULL, 0, "norm_out.linear");
    add_lin(tl, &m->proj_out, c->out_dim, D, NULL, 0, "proj_out");
    return FQ_OK;
}

/* ---- filling ---------------------------------------------------------------------------- */

typedef struct {
    fq_ctx *ctx;
    const fq_flux_random_params *p;
    fq_flux_model *m;
    uint64_t index;      /* tensors made so far: each gets its own seed */
    fq_tensor *tmp;      /* 16-bit scratch for weights about to be quantized */
} builder;

static uint64_t next_seed(builder *b) {
    return b->p->seed * 0x100000001b3ull + (b->index++ + 1) * 0xd1b54a32d192ed03ull;
}

/* A new dense tensor named `name` on the device, filled with u * scale + shift. */
static fq_status dense(builder *b, const char *name, int ndim, const int64_t *shape, float scale, float shift,
                       fq_tensor **out) {
    fq_tensor *t;
    FQ_TRY(fq_tensor_create(b->ctx, b->p->device, b->p->weight_dtype, ndim, shape, &t));
    fq_status s = fq_tensor_set_name(b->ctx, t, name);
    if (s == FQ_OK) s = fq_nn_random(b->ctx, t, next_seed(b), scale, shift);
    if (s != FQ_OK) {
        fq_tensor_free(t);
        return s;
    }
    b->m->weight_bytes += t->buf.bytes;
    *out = t;
    return FQ_OK;
}

static fq_status make_linear(builder *b, const lin_ref *r) {
    char wn[192], bn[192];
    snprintf(wn, sizeof wn, "%s.weight", r->name);
    snprintf(bn, sizeof bn, "%s.bias", r->name);
    const int64_t shape[2] = {r->out, r->in};
    const float ws = (float)sqrt(3.0 / (double)r->in);
    if (!b->p->quantize) {
        FQ_TRY(dense(b, wn, 2, shape, ws, 0.0f, &r->l->w));
    } else {
        /* generated into the scratch's first out*in elements, quantized on the device */
        fq_tensor v = fq_nn_view(&b->tmp->buf, 0, b->tmp->dtype, 2, shape, wn);
        FQ_TRY(fq_nn_random(b->ctx, &v, next_seed(b), ws, 0.0f));
        FQ_TRY(fq_quantize_4bit(b->ctx, &v, &b->p->qp, &r->l->qw));
        fq_qtensor_info qi;
        fq_qtensor_get_info(r->l->qw, &qi);
        b->m->weight_bytes += qi.bytes;
    }
    return dense(b, bn, 1, &r->out, 0.02f, 0.0f, &r->l->b);
}

fq_status fq_flux_random(fq_ctx *ctx, const fq_flux_config *c, const fq_flux_random_params *params,
                         fq_flux_model **out) {
    if (!c || !out) return fq_err(ctx, FQ_ERR_INVALID_ARG, "flux_random: NULL config or output");
    fq_flux_random_params p = params ? *params : fq_flux_random_default_params();
    if (p.weight_dtype != FQ_F32 && p.weight_dtype != FQ_F16 && p.weight_dtype != FQ_BF16)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "flux_random: weight dtype %s is not f32, f16 or bf16",
                      fq_dtype_name(p.weight_dtype));
    fq_dtype cd = p.compute_dtype >= 0 ? (fq_dtype)p.compute_dtype : p.quantize ? FQ_BF16 : p.weight_dtype;
    if (cd != FQ_F32 && cd != FQ_F16 && cd != FQ_BF16)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "flux_random: compute dtype %s is not f32, bf16 or f16",
                      fq_dtype_name(cd));
    FQ_TRY(fq_device_check(ctx, p.device));
    fq_flux_model *m = calloc(1, sizeof *m);
    if (!m) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "flux_random: out of host memory");
    m->cfg = *c;
    m->device = p.device;
    m->weight_dtype = p.weight_dtype;
    m->compute_dtype = cd;
    m->quantized = p.quantize ? 1 : 0;
    m->blocks = calloc((size_t)c->num_layers + 1, sizeof *m->blocks);
    m->single = calloc((size_t)c->num_single_layers + 1, sizeof *m->single);
    tensor_list tl = {0};
    builder b = {ctx, &p, m, 0, NULL};
    fq_status s = m->blocks && m->single ? list_tensors(ctx, m, &tl)
                                         : fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "flux_random: out of host memory");
    if (s == FQ_OK && p.quantize) {
        int64_t most = 0;
        for (int64_t i = 0; i < tl.nlin; i++) most = tl.lin[i].out * tl.lin[i].in > most ? tl.lin[i].out * tl.lin[i].in : most;
        s = fq_tensor_create(ctx, p.device, p.weight_dtype, 1, &most, &b.tmp);
    }
    for (int64_t i = 0; s == FQ_OK && i < tl.nlin; i++) {
        s = make_linear(&b, &tl.lin[i]);
        if (s != FQ_OK) s = fq_err_prefix(ctx, s, "flux_random: %s", tl.lin[i].name);
    }
    const int64_t dh = c->attention_head_dim;
    for (int64_t i = 0; s == FQ_OK && i < tl.nvec; i++) s = dense(&b, tl.vec[i].name, 1, &dh, 0.1f, 1.0f, tl.vec[i].t);
    if (s == FQ_OK) s = fq_nn_sync(ctx, p.device); /* report a failed fill here, not in the first forward */
    fq_tensor_free(b.tmp);
    free(tl.lin);
    free(tl.vec);
    if (s != FQ_OK) {
        fq_flux_free(m);
        return s;
    }
    *out = m;
    return FQ_OK;
}

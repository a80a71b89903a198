/* Loading a FluxTransformer2DModel: config.json, then every tensor by name from a
 * diffusers folder (dense or bitsandbytes 4-bit) or a BFL single file.
 *
 * Both layouts go through one table-free path: the loader asks for each layer
 * by its diffusers role and a small naming function says which file key (and,
 * for BFL's fused tensors, which rows of it) holds that layer. */
#include "models/flux.h"

#include "io/bnb_io.h"
#include "io/json_util.h"
#include "io/model_config.h"
#include "io/safetensors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ---- config --------------------------------------------------------------------- */

/* Reads integer field `key` (absent or null: *v keeps its default). */
static fq_status cfg_int(fq_ctx *ctx, const cJSON *j, const char *key, int64_t *v, int allow_null) {
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(j, key);
    if (!n || (allow_null && cJSON_IsNull(n))) return FQ_OK;
    if (!cJSON_IsNumber(n) || !fq_json_get_int64(n, v))
        return fq_err(ctx, FQ_ERR_FORMAT, "'%s' is not an integer", key);
    return FQ_OK;
}

fq_status fq_flux_config_from_json(fq_ctx *ctx, const struct cJSON *json, fq_flux_config *c) {
    const cJSON *j = (const cJSON *)json;
    if (!cJSON_IsObject(j)) return fq_err(ctx, FQ_ERR_FORMAT, "config.json is not a JSON object");
    /* diffusers' defaults for fields a config leaves out */
    fq_flux_config d = {.patch_size = 1, .in_channels = 64, .out_channels = 0, .num_layers = 19,
                        .num_single_layers = 38, .attention_head_dim = 128, .num_attention_heads = 24,
                        .joint_attention_dim = 4096, .pooled_projection_dim = 768, .guidance_embeds = 0,
                        .axes_dims_rope = {16, 56, 56}};
    const cJSON *cls = cJSON_GetObjectItemCaseSensitive(j, "_class_name");
    if (cls && (!cJSON_IsString(cls) || strcmp(cls->valuestring, "FluxTransformer2DModel") != 0))
        return fq_err(ctx, FQ_ERR_FORMAT, "'_class_name' is %s%s%s, not FluxTransformer2DModel",
                      cJSON_IsString(cls) ? "'" : "", cJSON_IsString(cls) ? cls->valuestring : "not a string",
                      cJSON_IsString(cls) ? "'" : "");
    FQ_TRY(cfg_int(ctx, j, "patch_size", &d.patch_size, 0));
    FQ_TRY(cfg_int(ctx, j, "in_channels", &d.in_channels, 0));
    FQ_TRY(cfg_int(ctx, j, "out_channels", &d.out_channels, 1));
    FQ_TRY(cfg_int(ctx, j, "num_layers", &d.num_layers, 0));
    FQ_TRY(cfg_int(ctx, j, "num_single_layers", &d.num_single_layers, 0));
    FQ_TRY(cfg_int(ctx, j, "attention_head_dim", &d.attention_head_dim, 0));
    FQ_TRY(cfg_int(ctx, j, "num_attention_heads", &d.num_attention_heads, 0));
    FQ_TRY(cfg_int(ctx, j, "joint_attention_dim", &d.joint_attention_dim, 0));
    FQ_TRY(cfg_int(ctx, j, "pooled_projection_dim", &d.pooled_projection_dim, 0));
    const cJSON *g = cJSON_GetObjectItemCaseSensitive(j, "guidance_embeds");
    if (g) {
        if (!cJSON_IsBool(g)) return fq_err(ctx, FQ_ERR_FORMAT, "'guidance_embeds' is not a boolean");
        d.guidance_embeds = cJSON_IsTrue(g);
    }
    const cJSON *ax = cJSON_GetObjectItemCaseSensitive(j, "axes_dims_rope");
    if (ax) {
        if (!cJSON_IsArray(ax) || cJSON_GetArraySize(ax) != 3)
            return fq_err(ctx, FQ_ERR_FORMAT, "'axes_dims_rope' is not a list of 3 integers");
        int i = 0;
        for (const cJSON *e = ax->child; e; e = e->next, i++)
            if (!fq_json_get_int64(e, &d.axes_dims_rope[i]))
                return fq_err(ctx, FQ_ERR_FORMAT, "'axes_dims_rope' is not a list of 3 integers");
    }
    const int64_t lim = (int64_t)1 << 24; /* sizes beyond this are nonsense, and keep products in range */
    struct { const char *k; int64_t v, lo; } f[] = {
        {"patch_size", d.patch_size, 1}, {"in_channels", d.in_channels, 1},
        {"out_channels", d.out_channels, 0}, {"num_layers", d.num_layers, 0},
        {"num_single_layers", d.num_single_layers, 0}, {"attention_head_dim", d.attention_head_dim, 2},
        {"num_attention_heads", d.num_attention_heads, 1}, {"joint_attention_dim", d.joint_attention_dim, 1},
        {"pooled_projection_dim", d.pooled_projection_dim, 1}};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        if (f[i].v < f[i].lo || f[i].v > lim)
            return fq_err(ctx, FQ_ERR_FORMAT, "'%s' = %lld is out of range", f[i].k, (long long)f[i].v);
    if (d.num_layers > 4096 || d.num_single_layers > 4096 || d.attention_head_dim > 4096)
        return fq_err(ctx, FQ_ERR_FORMAT, "layer counts or head dim out of range");
    int64_t sum = 0;
    for (int i = 0; i < 3; i++) {
        if (d.axes_dims_rope[i] < 0 || d.axes_dims_rope[i] % 2)
            return fq_err(ctx, FQ_ERR_FORMAT, "'axes_dims_rope' entries must be even and >= 0");
        sum += d.axes_dims_rope[i];
    }
    if (sum != d.attention_head_dim)
        return fq_err(ctx, FQ_ERR_FORMAT, "'axes_dims_rope' sums to %lld but 'attention_head_dim' is %lld",
                      (long long)sum, (long long)d.attention_head_dim);
    if (d.out_channels == 0) d.out_channels = d.in_channels;
    d.inner_dim = d.num_attention_heads * d.attention_head_dim;
    if (d.inner_dim > lim) return fq_err(ctx, FQ_ERR_FORMAT, "inner dim out of range");
    d.mlp_dim = 4 * d.inner_dim; /* int(dim * mlp_ratio) with mlp_ratio = 4.0 */
    d.out_dim = d.patch_size * d.patch_size * d.out_channels;
    *c = d;
    return FQ_OK;
}

/* ---- the loader's state ------------------------------------------------------------- */

typedef struct {
    fq_ctx *ctx;
    const fq_st_set *set;
    const char *path;
    fq_device dev;
    int bfl;
    const char *prefix;            /* "" or ComfyUI's "model.diffusion_model." (BFL) */
    fq_flux_model *m;
    int have_bnb;                  /* config has a quantization_config */
    fq_bnb_config bnb;
    const char **names;            /* every key of the set, sorted    */
    unsigned char *used;           /* per sorted key: consumed        */
    int64_t n;
} loader;

static int cmp_str(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

static void mark_used(loader *L, const char *key) {
    const char **hit = bsearch(&key, L->names, (size_t)L->n, sizeof *L->names, cmp_str);
    if (hit) L->used[hit - L->names] = 1;
}

static int is_used(loader *L, const char *key) {
    const char **hit = bsearch(&key, L->names, (size_t)L->n, sizeof *L->names, cmp_str);
    return hit && L->used[hit - L->names];
}

static fq_status missing(loader *L, const char *key) {
    return fq_err(L->ctx, FQ_ERR_FORMAT, "flux: tensor '%s' is missing from %s (config.json expects it)", key, L->path);
}

static fq_status bad_shape(loader *L, const char *key, const fq_st_tensor *t, int ndim, const int64_t *shape) {
    char a[96], b[96];
    return fq_err(L->ctx, FQ_ERR_SHAPE, "flux: tensor '%s' in %s has shape %s; config.json implies %s", key, L->path,
                  fq_shape_str(t->ndim, t->shape, a, sizeof a), fq_shape_str(ndim, shape, b, sizeof b));
}

static const fq_st_tensor *find_float(loader *L, const char *key, fq_status *s) {
    const fq_st_tensor *t = fq_st_set_find(L->set, key);
    if (!t) { *s = missing(L, key); return NULL; }
    if (t->dtype != FQ_F32 && t->dtype != FQ_F16 && t->dtype != FQ_BF16) {
        *s = fq_err(L->ctx, FQ_ERR_FORMAT, "flux: tensor '%s' in %s has dtype %s; expected f32, f16 or bf16", key,
                    L->path, fq_dtype_name(t->dtype));
        return NULL;
    }
    *s = FQ_OK;
    return t;
}

/* A dense tensor from `key` of shape `shape`: rows (first dim) taken from the
 * pieces (row0, nrows) of a file tensor with `file_rows` rows, in order. The
 * model keeps the file's dtype. */
typedef struct { int64_t row0, nrows; } piece;

static fq_status load_rows(loader *L, const char *key, int64_t file_rows, int ndim, const int64_t *shape,
                           const piece *pc, int npc, fq_tensor **out) {
    fq_status s;
    const fq_st_tensor *t = find_float(L, key, &s);
    if (!t) return s;
    int64_t fshape[FQ_MAX_DIMS];
    memcpy(fshape, shape, sizeof(int64_t) * (size_t)ndim);
    fshape[0] = file_rows;
    if (t->ndim != ndim || memcmp(t->shape, fshape, sizeof(int64_t) * (size_t)ndim) != 0)
        return bad_shape(L, key, t, ndim, fshape);
    fq_tensor *r;
    FQ_TRY(fq_tensor_create(L->ctx, L->dev, t->dtype, ndim, shape, &r));
    size_t row_bytes = (size_t)(file_rows ? t->numel / file_rows : 0) * fq_dtype_size(t->dtype), off = 0;
    for (int i = 0; i < npc && (s = FQ_OK) == FQ_OK; i++) {
        s = fq_buf_write(L->ctx, &r->buf, off, (const char *)t->data + (size_t)pc[i].row0 * row_bytes,
                         (size_t)pc[i].nrows * row_bytes);
        off += (size_t)pc[i].nrows * row_bytes;
    }
    if (s == FQ_OK) s = fq_tensor_set_name(L->ctx, r, key);
    if (s != FQ_OK) { fq_tensor_free(r); return s; }
    mark_used(L, key);
    L->m->weight_bytes += r->buf.bytes;
    if (L->m->weight_dtype == FQ_DTYPE_COUNT) L->m->weight_dtype = t->dtype;
    *out = r;
    return FQ_OK;
}

static fq_status load_vec(loader *L, const char *key, int64_t n, fq_tensor **out) {
    piece all = {0, n};
    char full[256];
    snprintf(full, sizeof full, "%s%s", L->prefix, key);
    return load_rows(L, full, n, 1, &n, &all, 1, out);
}

/* The f32 absmax of every block of q (host), reconstructed from the double-quant
 * state exactly as dequantize does: ftz(code[q] * nested_absmax) + offset.
 * Caller frees. */
static float *absmax_f32(fq_ctx *ctx, const fq_qtensor *q, fq_status *s) {
    const fq_qtensor_info *qi = &q->info;
    float *a = malloc(sizeof(float) * (size_t)(qi->nblocks ? qi->nblocks : 1));
    if (!a) { *s = fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "flux: out of host memory"); return NULL; }
    if (!qi->double_quant) {
        memcpy(a, q->m[FQ_QMEMBER_ABSMAX].ptr, sizeof(float) * (size_t)qi->nblocks);
        *s = FQ_OK;
        return a;
    }
    int64_t nq[1] = {qi->nblocks}, nn[1] = {qi->nested_nblocks};
    fq_tensor *tq = NULL, *tn = NULL, *out = NULL;
    *s = fq_tensor_from_host(ctx, FQ_CPU, FQ_U8, 1, nq, q->m[FQ_QMEMBER_ABSMAX].ptr, &tq);
    if (*s == FQ_OK) *s = fq_tensor_from_host(ctx, FQ_CPU, FQ_F32, 1, nn, q->m[FQ_QMEMBER_NESTED_ABSMAX].ptr, &tn);
    if (*s == FQ_OK) *s = fq_tensor_create(ctx, FQ_CPU, FQ_F32, 1, nq, &out);
    if (*s == FQ_OK) *s = fq_dequantize_8bit_dynamic(ctx, tq, tn, 256, out);
    if (*s == FQ_OK) {
        const float *d = fq_tensor_host_data(out);
        for (int64_t i = 0; i < qi->nblocks; i++) a[i] = d[i] + qi->offset;
    }
    fq_tensor_free(tq);
    fq_tensor_free(tn);
    fq_tensor_free(out);
    if (*s != FQ_OK) { free(a); return NULL; }
    return a;
}

/* Rows (pieces) of a fused 4-bit BFL weight (Forge-style NF4 files: fused qkv,
 * linear1, the final modulation) as one 4-bit tensor. Pieces start and end on
 * block boundaries, so their packed bytes and absmax are those of the fused
 * tensor; a double-quantized state keeps its exact per-block absmax in f32
 * (the nested statistics of the fused tensor do not split). */
static fq_status load_q4_rows(loader *L, const char *wk, int64_t file_rows, int64_t in, const piece *pc, int npc,
                              int64_t rows, fq_qtensor **out) {
    fq_ctx *ctx = L->ctx;
    fq_qtensor *full = NULL;
    FQ_TRY(fq_bnb_load(ctx, L->set, wk, FQ_CPU, &full));
    const fq_qtensor_info *fi = &full->info;
    fq_status s = FQ_OK;
    if (fi->ndim != 2 || fi->shape[0] != file_rows || fi->shape[1] != in)
        s = fq_err(ctx, FQ_ERR_SHAPE, "flux: 4-bit tensor '%s' in %s has shape [%lld, %lld]; config.json implies "
                   "[%lld, %lld]", wk, L->path, (long long)fi->shape[0], (long long)(fi->ndim > 1 ? fi->shape[1] : 0),
                   (long long)file_rows, (long long)in);
    for (int i = 0; s == FQ_OK && i < npc; i++)
        if ((pc[i].row0 * in) % fi->blocksize || ((pc[i].row0 + pc[i].nrows) * in) % fi->blocksize)
            s = fq_err(ctx, FQ_ERR_UNSUPPORTED, "flux: 4-bit tensor '%s': rows %lld..%lld do not fall on blocks of %lld; "
                       "it cannot be split into diffusers' layers", wk, (long long)pc[i].row0,
                       (long long)(pc[i].row0 + pc[i].nrows), (long long)fi->blocksize);
    float *am = s == FQ_OK ? absmax_f32(ctx, full, &s) : NULL;
    fq_qtensor_info oi = *fi;
    oi.shape[0] = rows;
    oi.double_quant = 0;
    oi.offset = 0.0f;
    uint8_t *packed = NULL;
    float *absmax = NULL;
    if (s == FQ_OK) {
        packed = malloc((size_t)(rows * in + 1) / 2);
        absmax = malloc(sizeof(float) * (size_t)((rows * in) / fi->blocksize + 1));
        if (!packed || !absmax) s = fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "flux: out of host memory");
    }
    int64_t pe = 0; /* elements written */
    for (int i = 0; s == FQ_OK && i < npc; i++) {
        int64_t e0 = pc[i].row0 * in, ne = pc[i].nrows * in;
        memcpy(packed + pe / 2, (const uint8_t *)full->m[FQ_QMEMBER_PACKED].ptr + e0 / 2, (size_t)ne / 2);
        memcpy(absmax + pe / fi->blocksize, am + e0 / fi->blocksize, sizeof(float) * (size_t)(ne / fi->blocksize));
        pe += ne;
    }
    if (s == FQ_OK) {
        const void *members[FQ_QMEMBER_COUNT] = {packed, absmax, full->m[FQ_QMEMBER_QUANT_MAP].ptr, NULL, NULL};
        s = fq_qtensor_from_members(ctx, L->dev, &oi, members, out);
        if (s == FQ_OK) s = fq_qtensor_set_name(ctx, *out, wk);
    }
    free(packed);
    free(absmax);
    free(am);
    fq_qtensor_free(full);
    return s;
}

/* A linear layer whose weight is `base`.weight (rows as pieces of file_rows) and
 * bias `base`.bias. */
static fq_status load_linear_rows(loader *L, const char *base, int64_t file_rows, int64_t in, const piece *pc,
                                  int npc, fq_flux_linear *out) {
    char wk[256], bk[256];
    snprintf(wk, sizeof wk, "%s%s.weight", L->prefix, base);
    snprintf(bk, sizeof bk, "%s%s.bias", L->prefix, base);
    int64_t rows = 0;
    for (int i = 0; i < npc; i++) rows += pc[i].nrows;
    fq_quant_type qt;
    if (fq_bnb_is_quantized(L->set, wk, &qt)) {
        if (L->have_bnb && qt != L->bnb.quant_type)
            return fq_err(L->ctx, FQ_ERR_FORMAT, "flux: '%s' is %s but config.json's quantization_config says %s",
                          wk, fq_quant_type_name(qt), fq_quant_type_name(L->bnb.quant_type));
        if (npc != 1 || pc[0].row0 != 0 || pc[0].nrows != file_rows)
            FQ_TRY(load_q4_rows(L, wk, file_rows, in, pc, npc, rows, &out->qw));
        else
            FQ_TRY(fq_bnb_load(L->ctx, L->set, wk, L->dev, &out->qw));
        fq_qtensor_info qi;
        fq_qtensor_get_info(out->qw, &qi);
        if (qi.ndim != 2 || qi.shape[0] != rows || qi.shape[1] != in) {
            char a[96], b[96];
            int64_t want[2] = {rows, in};
            fq_status s = fq_err(L->ctx, FQ_ERR_SHAPE, "flux: 4-bit tensor '%s' in %s has shape %s; config.json implies %s",
                                 wk, L->path, fq_shape_str(qi.ndim, qi.shape, a, sizeof a), fq_shape_str(2, want, b, sizeof b));
            fq_qtensor_free(out->qw);
            out->qw = NULL;
            return s;
        }
        mark_used(L, wk);
        L->m->weight_bytes += qi.bytes;
        L->m->quantized = 1;
    } else {
        int64_t shape[2] = {rows, in};
        FQ_TRY(load_rows(L, wk, file_rows, 2, shape, pc, npc, &out->w));
    }
    int64_t bshape[1] = {rows};
    return load_rows(L, bk, file_rows, 1, bshape, pc, npc, &out->b);
}

static fq_status load_linear(loader *L, const char *base, int64_t out_f, int64_t in, fq_flux_linear *out) {
    piece all = {0, out_f};
    return load_linear_rows(L, base, out_f, in, &all, 1, out);
}

/* ---- the two layouts ------------------------------------------------------------------ */

static fq_status load_diffusers(loader *L) {
    fq_flux_model *m = L->m;
    const fq_flux_config *c = &m->cfg;
    const int64_t D = c->inner_dim, Fm = c->mlp_dim, Dh = c->attention_head_dim;
    char b[160], k[224];
    FQ_TRY(load_linear(L, "time_text_embed.timestep_embedder.linear_1", D, 256, &m->time_l1));
    FQ_TRY(load_linear(L, "time_text_embed.timestep_embedder.linear_2", D, D, &m->time_l2));
    if (c->guidance_embeds) {
        FQ_TRY(load_linear(L, "time_text_embed.guidance_embedder.linear_1", D, 256, &m->guid_l1));
        FQ_TRY(load_linear(L, "time_text_embed.guidance_embedder.linear_2", D, D, &m->guid_l2));
    }
    FQ_TRY(load_linear(L, "time_text_embed.text_embedder.linear_1", D, c->pooled_projection_dim, &m->text_l1));
    FQ_TRY(load_linear(L, "time_text_embed.text_embedder.linear_2", D, D, &m->text_l2));
    FQ_TRY(load_linear(L, "context_embedder", D, c->joint_attention_dim, &m->context_embedder));
    FQ_TRY(load_linear(L, "x_embedder", D, c->in_channels, &m->x_embedder));
    for (int64_t i = 0; i < c->num_layers; i++) {
        fq_flux_double *bl = &m->blocks[i];
        struct { const char *n; int64_t o, in; fq_flux_linear *l; } lin[] = {
            {"norm1.linear", 6 * D, D, &bl->norm1}, {"norm1_context.linear", 6 * D, D, &bl->norm1_context},
            {"attn.to_q", D, D, &bl->to_q}, {"attn.to_k", D, D, &bl->to_k}, {"attn.to_v", D, D, &bl->to_v},
            {"attn.add_q_proj", D, D, &bl->add_q}, {"attn.add_k_proj", D, D, &bl->add_k},
            {"attn.add_v_proj", D, D, &bl->add_v}, {"attn.to_out.0", D, D, &bl->to_out},
            {"attn.to_add_out", D, D, &bl->to_add_out}, {"ff.net.0.proj", Fm, D, &bl->ff1},
            {"ff.net.2", D, Fm, &bl->ff2}, {"ff_context.net.0.proj", Fm, D, &bl->ff_ctx1},
            {"ff_context.net.2", D, Fm, &bl->ff_ctx2}};
        for (size_t j = 0; j < sizeof lin / sizeof lin[0]; j++) {
            snprintf(b, sizeof b, "transformer_blocks.%lld.%s", (long long)i, lin[j].n);
            FQ_TRY(load_linear(L, b, lin[j].o, lin[j].in, lin[j].l));
        }
        struct { const char *n; fq_tensor **t; } nv[] = {
            {"norm_q", &bl->norm_q}, {"norm_k", &bl->norm_k},
            {"norm_added_q", &bl->norm_added_q}, {"norm_added_k", &bl->norm_added_k}};
        for (size_t j = 0; j < 4; j++) {
            snprintf(k, sizeof k, "transformer_blocks.%lld.attn.%s.weight", (long long)i, nv[j].n);
            FQ_TRY(load_vec(L, k, Dh, nv[j].t));
        }
    }
    for (int64_t i = 0; i < c->num_single_layers; i++) {
        fq_flux_single *sb = &m->single[i];
        struct { const char *n; int64_t o, in; fq_flux_linear *l; } lin[] = {
            {"norm.linear", 3 * D, D, &sb->norm}, {"attn.to_q", D, D, &sb->to_q}, {"attn.to_k", D, D, &sb->to_k},
            {"attn.to_v", D, D, &sb->to_v}, {"proj_mlp", Fm, D, &sb->proj_mlp}, {"proj_out", D, D + Fm, &sb->proj_out}};
        for (size_t j = 0; j < sizeof lin / sizeof lin[0]; j++) {
            snprintf(b, sizeof b, "single_transformer_blocks.%lld.%s", (long long)i, lin[j].n);
            FQ_TRY(load_linear(L, b, lin[j].o, lin[j].in, lin[j].l));
        }
        snprintf(k, sizeof k, "single_transformer_blocks.%lld.attn.norm_q.weight", (long long)i);
        FQ_TRY(load_vec(L, k, Dh, &sb->norm_q));
        snprintf(k, sizeof k, "single_transformer_blocks.%lld.attn.norm_k.weight", (long long)i);
        FQ_TRY(load_vec(L, k, Dh, &sb->norm_k));
    }
    FQ_TRY(load_linear(L, "norm_out.linear", 2 * D, D, &m->norm_out));
    return load_linear(L, "proj_out", c->out_dim, D, &m->proj_out);
}

/* BFL names (flux/model.py): fused qkv and linear1 are split by rows; the final
 * AdaLN's (shift, scale) halves are swapped into diffusers' (scale, shift). */
static fq_status load_bfl(loader *L) {
    fq_flux_model *m = L->m;
    const fq_flux_config *c = &m->cfg;
    const int64_t D = c->inner_dim, Fm = c->mlp_dim, Dh = c->attention_head_dim;
    char b[160], k[224];
    FQ_TRY(load_linear(L, "time_in.in_layer", D, 256, &m->time_l1));
    FQ_TRY(load_linear(L, "time_in.out_layer", D, D, &m->time_l2));
    if (c->guidance_embeds) {
        FQ_TRY(load_linear(L, "guidance_in.in_layer", D, 256, &m->guid_l1));
        FQ_TRY(load_linear(L, "guidance_in.out_layer", D, D, &m->guid_l2));
    }
    FQ_TRY(load_linear(L, "vector_in.in_layer", D, c->pooled_projection_dim, &m->text_l1));
    FQ_TRY(load_linear(L, "vector_in.out_layer", D, D, &m->text_l2));
    FQ_TRY(load_linear(L, "txt_in", D, c->joint_attention_dim, &m->context_embedder));
    FQ_TRY(load_linear(L, "img_in", D, c->in_channels, &m->x_embedder));
    for (int64_t i = 0; i < c->num_layers; i++) {
        fq_flux_double *bl = &m->blocks[i];
        const char *side[2] = {"img", "txt"};
        fq_flux_linear *mod[2] = {&bl->norm1, &bl->norm1_context};
        fq_flux_linear *qkv[2][3] = {{&bl->to_q, &bl->to_k, &bl->to_v}, {&bl->add_q, &bl->add_k, &bl->add_v}};
        fq_flux_linear *proj[2] = {&bl->to_out, &bl->to_add_out};
        fq_flux_linear *mlp[2][2] = {{&bl->ff1, &bl->ff2}, {&bl->ff_ctx1, &bl->ff_ctx2}};
        fq_tensor **qn[2][2] = {{&bl->norm_q, &bl->norm_k}, {&bl->norm_added_q, &bl->norm_added_k}};
        for (int s = 0; s < 2; s++) {
            snprintf(b, sizeof b, "double_blocks.%lld.%s_mod.lin", (long long)i, side[s]);
            FQ_TRY(load_linear(L, b, 6 * D, D, mod[s]));
            snprintf(b, sizeof b, "double_blocks.%lld.%s_attn.qkv", (long long)i, side[s]);
            for (int j = 0; j < 3; j++) {
                piece p = {j * D, D};
                FQ_TRY(load_linear_rows(L, b, 3 * D, D, &p, 1, qkv[s][j]));
            }
            snprintf(b, sizeof b, "double_blocks.%lld.%s_attn.proj", (long long)i, side[s]);
            FQ_TRY(load_linear(L, b, D, D, proj[s]));
            snprintf(b, sizeof b, "double_blocks.%lld.%s_mlp.0", (long long)i, side[s]);
            FQ_TRY(load_linear(L, b, Fm, D, mlp[s][0]));
            snprintf(b, sizeof b, "double_blocks.%lld.%s_mlp.2", (long long)i, side[s]);
            FQ_TRY(load_linear(L, b, D, Fm, mlp[s][1]));
            snprintf(k, sizeof k, "double_blocks.%lld.%s_attn.norm.query_norm.scale", (long long)i, side[s]);
            FQ_TRY(load_vec(L, k, Dh, qn[s][0]));
            snprintf(k, sizeof k, "double_blocks.%lld.%s_attn.norm.key_norm.scale", (long long)i, side[s]);
            FQ_TRY(load_vec(L, k, Dh, qn[s][1]));
        }
    }
    for (int64_t i = 0; i < c->num_single_layers; i++) {
        fq_flux_single *sb = &m->single[i];
        snprintf(b, sizeof b, "single_blocks.%lld.modulation.lin", (long long)i);
        FQ_TRY(load_linear(L, b, 3 * D, D, &sb->norm));
        snprintf(b, sizeof b, "single_blocks.%lld.linear1", (long long)i);
        fq_flux_linear *parts[4] = {&sb->to_q, &sb->to_k, &sb->to_v, &sb->proj_mlp};
        for (int j = 0; j < 4; j++) {
            piece p = {j * D, j < 3 ? D : Fm};
            FQ_TRY(load_linear_rows(L, b, 3 * D + Fm, D, &p, 1, parts[j]));
        }
        snprintf(b, sizeof b, "single_blocks.%lld.linear2", (long long)i);
        FQ_TRY(load_linear(L, b, D, D + Fm, &sb->proj_out));
        snprintf(k, sizeof k, "single_blocks.%lld.norm.query_norm.scale", (long long)i);
        FQ_TRY(load_vec(L, k, Dh, &sb->norm_q));
        snprintf(k, sizeof k, "single_blocks.%lld.norm.key_norm.scale", (long long)i);
        FQ_TRY(load_vec(L, k, Dh, &sb->norm_k));
    }
    piece swap[2] = {{D, D}, {0, D}};
    FQ_TRY(load_linear_rows(L, "final_layer.adaLN_modulation.1", 2 * D, D, swap, 2, &m->norm_out));
    return load_linear(L, "final_layer.linear", c->out_dim, D, &m->proj_out);
}

/* Every key of the file must belong to the model: a leftover means the config
 * and the checkpoint disagree (more blocks, a different architecture). */
static fq_status check_leftovers(loader *L) {
    char owner[256];
    for (int64_t i = 0; i < L->n; i++) {
        if (L->used[i]) continue;
        if (fq_bnb_owner(L->set, L->names[i], owner, sizeof owner) && is_used(L, owner)) continue;
        return fq_err(L->ctx, FQ_ERR_FORMAT,
                      "flux: tensor '%s' in %s is not part of a FluxTransformer2DModel with this config.json "
                      "(%s layout, %lld double and %lld single blocks)",
                      L->names[i], L->path, L->bfl ? "BFL" : "diffusers", (long long)L->m->cfg.num_layers,
                      (long long)L->m->cfg.num_single_layers);
    }
    return FQ_OK;
}

/* ---- the model ------------------------------------------------------------------------- */

fq_flux_load_params fq_flux_load_default_params(void) {
    fq_flux_load_params p = {FQ_CPU, FQ_FLUX_LAYOUT_AUTO, NULL, -1};
    return p;
}

static void free_linear(fq_flux_linear *l) {
    fq_tensor_free(l->w);
    fq_qtensor_free(l->qw);
    fq_tensor_free(l->b);
}

void fq_flux_free(fq_flux_model *m) {
    if (!m) return;
    fq_flux_linear *top[] = {&m->time_l1, &m->time_l2, &m->guid_l1, &m->guid_l2, &m->text_l1, &m->text_l2,
                             &m->context_embedder, &m->x_embedder, &m->norm_out, &m->proj_out};
    for (size_t i = 0; i < sizeof top / sizeof top[0]; i++) free_linear(top[i]);
    for (int64_t i = 0; m->blocks && i < m->cfg.num_layers; i++) {
        fq_flux_double *b = &m->blocks[i];
        fq_flux_linear *l[] = {&b->norm1, &b->norm1_context, &b->to_q, &b->to_k, &b->to_v, &b->add_q, &b->add_k,
                               &b->add_v, &b->to_out, &b->to_add_out, &b->ff1, &b->ff2, &b->ff_ctx1, &b->ff_ctx2};
        for (size_t j = 0; j < sizeof l / sizeof l[0]; j++) free_linear(l[j]);
        fq_tensor_free(b->norm_q);
        fq_tensor_free(b->norm_k);
        fq_tensor_free(b->norm_added_q);
        fq_tensor_free(b->norm_added_k);
    }
    for (int64_t i = 0; m->single && i < m->cfg.num_single_layers; i++) {
        fq_flux_single *s = &m->single[i];
        fq_flux_linear *l[] = {&s->norm, &s->to_q, &s->to_k, &s->to_v, &s->proj_mlp, &s->proj_out};
        for (size_t j = 0; j < sizeof l / sizeof l[0]; j++) free_linear(l[j]);
        fq_tensor_free(s->norm_q);
        fq_tensor_free(s->norm_k);
    }
    free(m->blocks);
    free(m->single);
    free(m);
}

static int is_dir(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* config.json for the checkpoint at path: <path>/config.json for a folder; for
 * a file, params->config_path (a file or a folder) or config.json beside it. */
static fq_status config_file(fq_ctx *ctx, const char *path, int folder, const char *cfg_path, char *out, size_t n) {
    const char *base = cfg_path ? cfg_path : path;
    int len;
    if (cfg_path ? is_dir(cfg_path) : folder) {
        len = snprintf(out, n, "%s/config.json", base);
    } else if (cfg_path) {
        len = snprintf(out, n, "%s", cfg_path);
    } else {
        const char *slash = strrchr(path, '/');
        len = slash ? snprintf(out, n, "%.*s/config.json", (int)(slash - path), path) : snprintf(out, n, "config.json");
    }
    if (len < 0 || (size_t)len >= n) return fq_err(ctx, FQ_ERR_INVALID_ARG, "flux: path too long: %s", base);
    return FQ_OK;
}

static fq_status pick_compute_dtype(loader *L, int requested) {
    fq_flux_model *m = L->m;
    fq_dtype cd;
    if (requested >= 0) cd = (fq_dtype)requested;
    else if (L->have_bnb && m->quantized) cd = L->bnb.compute_dtype;
    else cd = m->weight_dtype == FQ_DTYPE_COUNT ? FQ_F32 : m->weight_dtype;
    if (cd != FQ_F32 && cd != FQ_BF16 && cd != FQ_F16)
        return fq_err(L->ctx, FQ_ERR_INVALID_ARG, "flux: compute dtype %s is not f32, bf16 or f16", fq_dtype_name(cd));
    m->compute_dtype = cd;
    return FQ_OK;
}

/* A BFL single file without a config: the sizes its shapes determine (block
 * counts, widths, head dim from the q/k norm scales, guidance), the rest from
 * FLUX.1's values (the config defaults). Fills cfg, a JSON object. */
static const fq_st_tensor *bfl_find(const fq_st_set *set, const char *pre, const char *name) {
    char k[256];
    snprintf(k, sizeof k, "%s%s", pre, name);
    return fq_st_set_find(set, k);
}

static int64_t bfl_count(const fq_st_set *set, const char *pre, const char *block) {
    char k[256];
    int64_t n = 0;
    for (;; n++) {
        snprintf(k, sizeof k, "%s%s.%lld.%s", pre, block, (long long)n,
                 block[0] == 'd' ? "img_attn.norm.query_norm.scale" : "norm.query_norm.scale");
        if (!fq_st_set_find(set, k)) return n;
    }
}

static fq_status infer_bfl_config(fq_ctx *ctx, const char *path, cJSON *cfg) {
    fq_st_set *set = NULL;
    FQ_TRY(fq_st_set_open(ctx, path, &set));
    const char *pre = fq_st_set_find(set, "model.diffusion_model.img_in.weight") ? "model.diffusion_model." : "";
    const fq_st_tensor *img = bfl_find(set, pre, "img_in.weight"), *txt = bfl_find(set, pre, "txt_in.weight"),
                       *vec = bfl_find(set, pre, "vector_in.in_layer.weight"),
                       *qn = bfl_find(set, pre, "double_blocks.0.img_attn.norm.query_norm.scale"),
                       *fin = bfl_find(set, pre, "final_layer.linear.weight");
    fq_status s = FQ_OK;
    if (!img || !txt || !vec || !qn || !fin || img->ndim != 2 || txt->ndim != 2 || vec->ndim != 2 || qn->ndim != 1 ||
        fin->ndim != 2 || qn->shape[0] <= 0 || img->shape[0] % qn->shape[0] != 0) {
        s = fq_err(ctx, FQ_ERR_FORMAT, "flux: %s does not look like a FLUX.1 BFL checkpoint (img_in, txt_in, "
                   "vector_in, double_blocks.0 q-norm or final_layer missing or misshapen); pass --config", path);
    } else {
        struct { const char *k; int64_t v; } f[] = {
            {"num_layers", bfl_count(set, pre, "double_blocks")},
            {"num_single_layers", bfl_count(set, pre, "single_blocks")},
            {"attention_head_dim", qn->shape[0]},
            {"num_attention_heads", img->shape[0] / qn->shape[0]},
            {"in_channels", img->shape[1]},
            {"out_channels", fin->shape[0]},
            {"joint_attention_dim", txt->shape[1]},
            {"pooled_projection_dim", vec->shape[1]},
        };
        for (size_t i = 0; i < sizeof f / sizeof *f; i++) cJSON_AddNumberToObject(cfg, f[i].k, (double)f[i].v);
        cJSON_AddBoolToObject(cfg, "guidance_embeds", bfl_find(set, pre, "guidance_in.in_layer.weight") != NULL);
        fq_log(ctx, FQ_LOG_INFO, "flux: %s has no config; inferred %lld double and %lld single blocks, %lld heads of "
               "%lld, the rest from FLUX.1's config", path, (long long)f[0].v, (long long)f[1].v, (long long)f[3].v,
               (long long)f[2].v);
    }
    fq_st_set_close(set);
    return s;
}

static fq_status load_all(loader *L, const char *path, const fq_flux_load_params *p) {
    fq_ctx *ctx = L->ctx;
    int folder = is_dir(path);
    L->bfl = p->layout == FQ_FLUX_LAYOUT_BFL || (p->layout == FQ_FLUX_LAYOUT_AUTO && !folder);
    char cfgp[4096];
    FQ_TRY(config_file(ctx, path, folder, p->config_path, cfgp, sizeof cfgp));
    struct stat sb;
    cJSON *cfg = NULL;
    fq_status s = FQ_OK;
    if (L->bfl && !p->config_path && stat(cfgp, &sb) != 0) {
        /* a single file holds no config: infer what its shapes determine */
        if (!(cfg = cJSON_CreateObject())) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "flux: out of host memory");
        s = infer_bfl_config(ctx, path, cfg);
        snprintf(cfgp, sizeof cfgp, "(config inferred from %s)", path);
    } else {
        FQ_TRY(fq_config_read(ctx, cfgp, &cfg));
    }
    if (s == FQ_OK) s = fq_flux_config_from_json(ctx, cfg, &L->m->cfg);
    if (s == FQ_OK) s = fq_config_get_bnb(ctx, cfg, &L->have_bnb, &L->bnb);
    cJSON_Delete(cfg);
    if (s != FQ_OK) return fq_err_prefix(ctx, s, "%s", cfgp);
    const fq_flux_config *c = &L->m->cfg;
    L->m->blocks = calloc((size_t)c->num_layers + 1, sizeof *L->m->blocks);
    L->m->single = calloc((size_t)c->num_single_layers + 1, sizeof *L->m->single);
    if (!L->m->blocks || !L->m->single) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "flux: out of host memory");

    fq_st_set *set = NULL;
    FQ_TRY(fq_st_set_open(ctx, path, &set));
    L->set = set;
    L->n = fq_st_set_count(set);
    L->names = malloc(sizeof *L->names * (size_t)(L->n + 1));
    L->used = calloc((size_t)L->n + 1, 1);
    if (!L->names || !L->used) {
        s = fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "flux: out of host memory");
    } else {
        for (int64_t i = 0; i < L->n; i++) L->names[i] = fq_st_set_get(set, i)->name;
        qsort(L->names, (size_t)L->n, sizeof *L->names, cmp_str);
        /* BFL checkpoints saved by ComfyUI carry this prefix on every key */
        L->prefix = L->bfl && fq_st_set_find(set, "model.diffusion_model.img_in.weight") ? "model.diffusion_model." : "";
        s = L->bfl ? load_bfl(L) : load_diffusers(L);
        if (s == FQ_OK) s = check_leftovers(L);
        if (s == FQ_OK && L->have_bnb && !L->m->quantized)
            s = fq_err(ctx, FQ_ERR_FORMAT, "flux: config.json has a bitsandbytes quantization_config but %s holds no "
                       "4-bit weights", path);
        /* Forge-style BFL files carry 4-bit weights without any config */
        if (s == FQ_OK && !L->have_bnb && L->m->quantized && !L->bfl)
            s = fq_err(ctx, FQ_ERR_FORMAT, "flux: %s holds 4-bit weights but config.json has no quantization_config",
                       path);
        if (s == FQ_OK) s = pick_compute_dtype(L, p->compute_dtype);
    }
    free(L->names);
    free(L->used);
    fq_st_set_close(set);
    return s;
}

fq_status fq_flux_load(fq_ctx *ctx, const char *path, const fq_flux_load_params *params, fq_flux_model **out) {
    if (!path || !out) return fq_err(ctx, FQ_ERR_INVALID_ARG, "flux_load: NULL path or output");
    fq_flux_load_params p = params ? *params : fq_flux_load_default_params();
    FQ_TRY(fq_device_check(ctx, p.device));
    fq_flux_model *m = calloc(1, sizeof *m);
    if (!m) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "flux: out of host memory");
    m->device = p.device;
    m->weight_dtype = FQ_DTYPE_COUNT; /* "none seen yet" */
    loader L = {.ctx = ctx, .path = path, .dev = p.device, .m = m, .prefix = ""};
    fq_status s = load_all(&L, path, &p);
    if (L.have_bnb) fq_bnb_config_clear(&L.bnb);
    if (s != FQ_OK) {
        fq_flux_free(m);
        return s;
    }
    *out = m;
    return FQ_OK;
}

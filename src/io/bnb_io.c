/* bitsandbytes 4-bit serialization: quant_state JSON, loading and writing a qtensor. */
#include "io/bnb_io.h"
#include "core/qtensor.h"
#include "io/json_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QS_PREFIX ".quant_state.bitsandbytes__"

static const char *state_dtype_name(fq_dtype t) {
    return t == FQ_F32 ? "float32" : t == FQ_F16 ? "float16" : t == FQ_BF16 ? "bfloat16" : NULL;
}

static int state_dtype_parse(const char *s, fq_dtype *t) {
    if (!strcmp(s, "float32")) *t = FQ_F32;
    else if (!strcmp(s, "float16")) *t = FQ_F16;
    else if (!strcmp(s, "bfloat16")) *t = FQ_BF16;
    else return 0;
    return 1;
}

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

/* ---- the quant_state JSON --------------------------------------------------------- */

static fq_status bad(fq_ctx *ctx, const char *key, const char *what, const char *field) {
    return fq_err(ctx, FQ_ERR_FORMAT, "'%s': quant state %s '%s'", key, what, field);
}

static fq_status parse_fields(fq_ctx *ctx, const char *key, const cJSON *root, fq_bnb_state *st) {
    if (!cJSON_IsObject(root)) return fq_err(ctx, FQ_ERR_FORMAT, "'%s': quant state is not a JSON object", key);
    int have_type = 0, have_bs = 0, have_dt = 0, have_shape = 0, nested = 0;
    for (const cJSON *c = root->child; c; c = c->next) {
        const char *k = c->string;
        if (!strcmp(k, "quant_type")) {
            if (!cJSON_IsString(c) || fq_quant_type_parse(NULL, c->valuestring, &st->type) != FQ_OK)
                return bad(ctx, key, "has a bad", k);
            have_type = 1;
        } else if (!strcmp(k, "blocksize")) {
            if (!fq_json_get_int64(c, &st->blocksize)) return bad(ctx, key, "has a non-integer", k);
            if (!fq_blocksize_valid(st->blocksize))
                return fq_err(ctx, FQ_ERR_FORMAT, "'%s': quant state blocksize %lld is not supported", key,
                              (long long)st->blocksize);
            have_bs = 1;
        } else if (!strcmp(k, "dtype")) {
            if (!cJSON_IsString(c) || !state_dtype_parse(c->valuestring, &st->dtype))
                return bad(ctx, key, "has a bad (not float32/float16/bfloat16)", k);
            have_dt = 1;
        } else if (!strcmp(k, "shape")) {
            if (!cJSON_IsArray(c) || cJSON_GetArraySize(c) > FQ_MAX_DIMS) return bad(ctx, key, "has a bad", k);
            st->ndim = 0;
            for (const cJSON *d = c->child; d; d = d->next)
                if (!fq_json_get_int64(d, &st->shape[st->ndim++]) || st->shape[st->ndim - 1] < 0)
                    return bad(ctx, key, "has a negative or non-integer dimension in", k);
            have_shape = 1;
        } else if (!strcmp(k, "nested_blocksize")) {
            if (!fq_json_get_int64(c, &st->nested_blocksize) || st->nested_blocksize != 256)
                return bad(ctx, key, "has a bad (must be 256)", k);
            nested++;
        } else if (!strcmp(k, "nested_dtype")) {
            if (!cJSON_IsString(c) || !state_dtype_parse(c->valuestring, &st->nested_dtype) ||
                st->nested_dtype != FQ_F32)
                return bad(ctx, key, "has a bad (must be float32)", k);
            nested++;
        } else if (!strcmp(k, "nested_offset")) {
            if (!cJSON_IsNumber(c)) return bad(ctx, key, "has a non-number", k);
            st->nested_offset = c->valuedouble;
            if (!isfinite(st->nested_offset) || !isfinite((float)st->nested_offset))
                return fq_err(ctx, FQ_ERR_NONFINITE, "'%s': quant state nested_offset is not a finite float32",
                              key);
            nested++;
        } else {
            return bad(ctx, key, "has an unknown key", k);
        }
    }
    const char *miss = !have_type ? "quant_type" : !have_bs ? "blocksize" : !have_dt ? "dtype" : !have_shape ? "shape" : NULL;
    if (miss) return bad(ctx, key, "lacks", miss);
    if (nested != 0 && nested != 3)
        return bad(ctx, key, "has only some of", "nested_blocksize, nested_dtype, nested_offset");
    st->nested = nested == 3;
    return FQ_OK;
}

fq_status fq_bnb_state_parse(fq_ctx *ctx, const char *key, const void *bytes, size_t n, fq_bnb_state *out) {
    fq_bnb_state st = {.nested_dtype = FQ_F32};
    cJSON *root;
    FQ_TRY(fq_json_parse(ctx, key, bytes, n, &root));
    fq_status s = parse_fields(ctx, key, root, &st);
    cJSON_Delete(root);
    if (s != FQ_OK) return s;
    const char *suffix = strstr(key, QS_PREFIX) ? strstr(key, QS_PREFIX) + strlen(QS_PREFIX) : NULL;
    if (suffix && strcmp(suffix, fq_quant_type_name(st.type)) != 0)
        return fq_err(ctx, FQ_ERR_FORMAT, "'%s': quant_type \"%s\" does not match the key", key,
                      fq_quant_type_name(st.type));
    *out = st;
    return FQ_OK;
}

fq_status fq_bnb_state_format(fq_ctx *ctx, const fq_bnb_state *st, char **out, size_t *len) {
    const char *dt = state_dtype_name(st->dtype);
    if (!dt) return fq_err(ctx, FQ_ERR_INVALID_ARG, "quant state dtype %s is not f32, f16 or bf16", fq_dtype_name(st->dtype));
    if (st->nested && !isfinite(st->nested_offset))
        return fq_err(ctx, FQ_ERR_NONFINITE, "quant state nested_offset is NaN or Inf");
    fq_sbuf b = {0};
    /* json.dumps with default separators, keys in the order bitsandbytes uses. */
    fq_sb_printf(&b, "{\"quant_type\": \"%s\", \"blocksize\": %lld, \"dtype\": \"%s\", \"shape\": [",
                 fq_quant_type_name(st->type), (long long)st->blocksize, dt);
    for (int i = 0; i < st->ndim; i++) fq_sb_printf(&b, i ? ", %lld" : "%lld", (long long)st->shape[i]);
    fq_sb_puts(&b, "]");
    if (st->nested) {
        char num[32];
        fq_py_float_repr(st->nested_offset, num, sizeof num);
        fq_sb_printf(&b, ", \"nested_blocksize\": %lld, \"nested_dtype\": \"float32\", \"nested_offset\": %s",
                     (long long)st->nested_blocksize, num);
    }
    fq_sb_puts(&b, "}");
    if (b.oom) {
        free(b.p);
        return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    }
    *out = b.p;
    *len = b.len;
    return FQ_OK;
}

/* ---- keys ------------------------------------------------------------------------- */

/* Looks up "<P><suffix>" in the set. */
static const fq_st_tensor *find2(const fq_st_set *set, const char *P, const char *suffix) {
    size_t a = strlen(P), b = strlen(suffix);
    char stackbuf[512], *buf = a + b + 1 <= sizeof stackbuf ? stackbuf : malloc(a + b + 1);
    if (!buf) return NULL;
    memcpy(buf, P, a);
    memcpy(buf + a, suffix, b + 1);
    const fq_st_tensor *t = fq_st_set_find(set, buf);
    if (buf != stackbuf) free(buf);
    return t;
}

int fq_bnb_is_quantized(const fq_st_set *set, const char *P, fq_quant_type *type) {
    if (find2(set, P, QS_PREFIX "nf4")) {
        if (type) *type = FQ_QUANT_NF4;
        return 1;
    }
    if (find2(set, P, QS_PREFIX "fp4")) {
        if (type) *type = FQ_QUANT_FP4;
        return 1;
    }
    return 0;
}

static const char *const g_member_suffix[] = {"", ".absmax", ".quant_map", ".nested_absmax",
                                               ".nested_quant_map", QS_PREFIX "nf4", QS_PREFIX "fp4"};

int fq_bnb_owner(const fq_st_set *set, const char *key, char *buf, size_t n) {
    for (size_t i = 0; i < sizeof g_member_suffix / sizeof g_member_suffix[0]; i++) {
        if (!ends_with(key, g_member_suffix[i])) continue;
        size_t plen = strlen(key) - strlen(g_member_suffix[i]);
        char *P = malloc(plen + 1);
        if (!P) return 0;
        memcpy(P, key, plen);
        P[plen] = '\0';
        int q = plen > 0 && fq_bnb_is_quantized(set, P, NULL);
        if (q) snprintf(buf, n, "%s", P);
        free(P);
        if (q) return 1;
    }
    return 0;
}

/* ---- loading ------------------------------------------------------------------------ */

typedef struct {
    const char *suffix;
    fq_qmember m;
} member_spec;

static const member_spec g_members[FQ_QMEMBER_COUNT] = {
    {"", FQ_QMEMBER_PACKED},
    {".absmax", FQ_QMEMBER_ABSMAX},
    {".quant_map", FQ_QMEMBER_QUANT_MAP},
    {".nested_absmax", FQ_QMEMBER_NESTED_ABSMAX},
    {".nested_quant_map", FQ_QMEMBER_NESTED_QUANT_MAP},
};

/* A float member as an aligned host array (the mapping may be unaligned).
 * *copy: a buffer to free, or NULL when t->data could be used directly. */
static fq_status aligned_floats(fq_ctx *ctx, const fq_st_tensor *t, const float **out, void **copy) {
    *copy = NULL;
    if ((uintptr_t)t->data % sizeof(float) == 0) {
        *out = t->data;
        return FQ_OK;
    }
    *copy = malloc(t->nbytes ? t->nbytes : 1);
    if (!*copy) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    memcpy(*copy, t->data, t->nbytes);
    *out = *copy;
    return FQ_OK;
}

/* Checks one member's presence, dtype and length; returns its tensor. */
static fq_status member_tensor(fq_ctx *ctx, const fq_st_set *set, const char *P, const char *suffix,
                               fq_dtype dtype, int64_t numel, const fq_st_tensor **out) {
    const fq_st_tensor *t = find2(set, P, suffix);
    if (!t) return fq_err(ctx, FQ_ERR_FORMAT, "'%s%s': missing (quantized tensor '%s')", P, suffix, P);
    if (t->dtype != dtype)
        return fq_err(ctx, FQ_ERR_FORMAT, "'%s%s': dtype %s, expected %s", P, suffix, fq_st_dtype_str(t->dtype),
                      fq_st_dtype_str(dtype));
    if (t->numel != numel)
        return fq_err(ctx, FQ_ERR_FORMAT, "'%s%s': %lld elements, expected %lld", P, suffix, (long long)t->numel,
                      (long long)numel);
    *out = t;
    return FQ_OK;
}

/* The 16- and 256-entry tables must be the standard ones: the kernels use
 * their own copies, so a different table would be silently ignored. */
static fq_status check_table(fq_ctx *ctx, const char *P, const char *suffix, const float *v, const float *ref,
                             int n) {
    for (int i = 0; i < n; i++) {
        if (!isfinite(v[i]))
            return fq_err(ctx, FQ_ERR_NONFINITE, "'%s%s': entry %d is NaN or Inf", P, suffix, i);
        if (v[i] != ref[i])
            return fq_err(ctx, FQ_ERR_UNSUPPORTED, "'%s%s': entry %d is %.9g, not the standard %.9g", P, suffix, i,
                          (double)v[i], (double)ref[i]);
    }
    return FQ_OK;
}

static fq_status check_finite(fq_ctx *ctx, const char *P, const char *suffix, const float *v, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(v[i]))
            return fq_err(ctx, FQ_ERR_NONFINITE, "'%s%s': element %lld is NaN or Inf", P, suffix, (long long)i);
    return FQ_OK;
}

fq_status fq_bnb_load(fq_ctx *ctx, const fq_st_set *set, const char *P, fq_device dev, fq_qtensor **out) {
    const fq_st_tensor *qs_nf4 = find2(set, P, QS_PREFIX "nf4"), *qs_fp4 = find2(set, P, QS_PREFIX "fp4");
    if (qs_nf4 && qs_fp4)
        return fq_err(ctx, FQ_ERR_FORMAT, "'%s': has both an nf4 and an fp4 quant state", P);
    const fq_st_tensor *qs = qs_nf4 ? qs_nf4 : qs_fp4;
    if (!qs) return fq_err(ctx, FQ_ERR_FORMAT, "'%s' is not a bitsandbytes 4-bit tensor (no '%s" QS_PREFIX "nf4')", P, P);
    if (qs->dtype != FQ_U8)
        return fq_err(ctx, FQ_ERR_FORMAT, "'%s': dtype %s, expected U8", qs->name, fq_st_dtype_str(qs->dtype));
    fq_bnb_state st;
    FQ_TRY(fq_bnb_state_parse(ctx, qs->name, qs->data, qs->nbytes, &st));

    fq_qtensor_info info = {.type = st.type, .blocksize = st.blocksize, .double_quant = st.nested,
                            .orig_dtype = st.dtype, .ndim = st.ndim, .offset = (float)st.nested_offset};
    memcpy(info.shape, st.shape, sizeof st.shape);
    fq_qmember_loc loc[FQ_QMEMBER_COUNT];
    fq_status s = fq_qtensor_layout(ctx, &info, loc);
    if (s != FQ_OK) return fq_err_prefix(ctx, s, "'%s'", qs->name);

    const int64_t numel[FQ_QMEMBER_COUNT] = {(info.numel + 1) / 2, info.nblocks, 16, info.nested_nblocks, 256};
    const fq_dtype dtypes[FQ_QMEMBER_COUNT] = {FQ_U8, st.nested ? FQ_U8 : FQ_F32, FQ_F32, FQ_F32, FQ_F32};
    const fq_st_tensor *t[FQ_QMEMBER_COUNT] = {0};
    int nmem = st.nested ? FQ_QMEMBER_COUNT : FQ_QMEMBER_NESTED_ABSMAX;
    for (int i = 0; i < nmem; i++)
        FQ_TRY(member_tensor(ctx, set, P, g_members[i].suffix, dtypes[i], numel[i], &t[i]));
    for (int i = nmem; i < FQ_QMEMBER_COUNT; i++)
        if (find2(set, P, g_members[i].suffix))
            return fq_err(ctx, FQ_ERR_FORMAT, "'%s%s': present, but the quant state has no double quantization",
                          P, g_members[i].suffix);

    const void *members[FQ_QMEMBER_COUNT] = {0};
    void *copies[FQ_QMEMBER_COUNT] = {0};
    members[0] = t[0]->data;
    for (int i = 1; i < nmem && s == FQ_OK; i++) {
        if (dtypes[i] != FQ_F32) { members[i] = t[i]->data; continue; }
        const float *f = NULL;
        s = aligned_floats(ctx, t[i], &f, &copies[i]);
        members[i] = f;
    }
    if (s == FQ_OK && !st.nested) s = check_finite(ctx, P, ".absmax", members[FQ_QMEMBER_ABSMAX], info.nblocks);
    if (s == FQ_OK && st.nested)
        s = check_finite(ctx, P, ".nested_absmax", members[FQ_QMEMBER_NESTED_ABSMAX], info.nested_nblocks);
    if (s == FQ_OK) s = check_table(ctx, P, ".quant_map", members[FQ_QMEMBER_QUANT_MAP], fq_quant_map(st.type), 16);
    if (s == FQ_OK && st.nested)
        s = check_table(ctx, P, ".nested_quant_map", members[FQ_QMEMBER_NESTED_QUANT_MAP],
                        fq_dynamic_map_signed(), 256);
    fq_qtensor *q = NULL;
    if (s == FQ_OK) {
        s = fq_qtensor_from_members(ctx, dev, &info, members, &q);
        if (s != FQ_OK) fq_err_prefix(ctx, s, "'%s'", P);
    }
    if (s == FQ_OK) {
        s = fq_qtensor_set_name(ctx, q, P);
        if (s != FQ_OK) fq_qtensor_free(q);
    }
    for (int i = 0; i < FQ_QMEMBER_COUNT; i++) free(copies[i]);
    if (s != FQ_OK) return s;
    *out = q;
    return FQ_OK;
}

/* ---- writing ------------------------------------------------------------------------ */

static fq_status add_member(fq_ctx *ctx, fq_st_writer *w, const fq_qtensor *q, const char *P, int i,
                            fq_dtype dtype, int ndim, const int64_t *shape) {
    size_t nb = fq_qtensor_member_bytes(q, g_members[i].m);
    void *host = malloc(nb ? nb : 1);
    char *key = malloc(strlen(P) + 32);
    if (!host || !key) {
        free(host);
        free(key);
        return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    }
    sprintf(key, "%s%s", P, g_members[i].suffix);
    fq_status s = nb ? fq_qtensor_member_to_host(ctx, q, g_members[i].m, host) : FQ_OK;
    if (s == FQ_OK) s = fq_st_writer_add(ctx, w, key, dtype, ndim, shape, host, nb, 1);
    else free(host);
    free(key);
    return s;
}

static fq_status write_all(fq_ctx *ctx, fq_st_writer *w, const char *P, const fq_qtensor *q) {
    fq_qtensor_info info;
    fq_qtensor_get_info(q, &info);
    fq_bnb_state st = {.type = info.type, .blocksize = info.blocksize, .dtype = info.orig_dtype,
                       .ndim = info.ndim, .nested = info.double_quant, .nested_blocksize = 256,
                       .nested_dtype = FQ_F32, .nested_offset = (double)info.offset};
    memcpy(st.shape, info.shape, sizeof st.shape);
    char *json;
    size_t jlen;
    FQ_TRY(fq_bnb_state_format(ctx, &st, &json, &jlen));
    int64_t packed[2] = {(info.numel + 1) / 2, 1}, nb[1] = {info.nblocks}, n16[1] = {16},
            nnb[1] = {info.nested_nblocks}, n256[1] = {256}, js[1] = {(int64_t)jlen};
    fq_status s = add_member(ctx, w, q, P, 0, FQ_U8, 2, packed);
    if (s == FQ_OK) s = add_member(ctx, w, q, P, 1, info.double_quant ? FQ_U8 : FQ_F32, 1, nb);
    if (s == FQ_OK) s = add_member(ctx, w, q, P, 2, FQ_F32, 1, n16);
    if (s == FQ_OK && info.double_quant) s = add_member(ctx, w, q, P, 3, FQ_F32, 1, nnb);
    if (s == FQ_OK && info.double_quant) s = add_member(ctx, w, q, P, 4, FQ_F32, 1, n256);
    char *key = malloc(strlen(P) + 40);
    if (s == FQ_OK && !key) s = fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    if (s == FQ_OK) {
        sprintf(key, "%s" QS_PREFIX "%s", P, fq_quant_type_name(info.type));
        s = fq_st_writer_add(ctx, w, key, FQ_U8, 1, js, json, jlen, 1);
        json = NULL; /* the writer owns (or already freed) it */
    }
    free(json);
    free(key);
    return s;
}

fq_status fq_bnb_write(fq_ctx *ctx, fq_st_writer *w, const char *P, const fq_qtensor *q) {
    int64_t mark = fq_st_writer_count(w);
    fq_status s = write_all(ctx, w, P, q);
    if (s != FQ_OK) {
        fq_st_writer_truncate(w, mark);
        return fq_err_prefix(ctx, s, "writing quantized tensor '%s'", P);
    }
    return FQ_OK;
}

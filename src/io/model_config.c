/* config.json reading/writing and the bitsandbytes quantization_config. */
#include "io/model_config.h"
#include "io/atomic_file.h"
#include "io/json_util.h"

#include <stdlib.h>
#include <string.h>

#define CONFIG_MAX_BYTES ((size_t)16 << 20)

fq_status fq_config_read(fq_ctx *ctx, const char *path, cJSON **out) {
    char *text;
    size_t len;
    FQ_TRY(fq_read_file(ctx, path, CONFIG_MAX_BYTES, &text, &len));
    cJSON *root;
    fq_status s = fq_json_parse(ctx, path, text, len, &root);
    free(text);
    if (s != FQ_OK) return s;
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return fq_err(ctx, FQ_ERR_FORMAT, "%s: not a JSON object", path);
    }
    *out = root;
    return FQ_OK;
}

fq_status fq_config_to_string(fq_ctx *ctx, const cJSON *cfg, char **out, size_t *len) {
    char *s;
    size_t n;
    FQ_TRY(fq_json_dump_py(ctx, cfg, 2, 1, &s, &n));
    char *t = realloc(s, n + 2);
    if (!t) {
        free(s);
        return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    }
    t[n] = '\n'; /* to_json_string appends one newline */
    t[n + 1] = '\0';
    *out = t;
    if (len) *len = n + 1;
    return FQ_OK;
}

fq_status fq_config_write(fq_ctx *ctx, const char *path, const cJSON *cfg) {
    char *s;
    size_t n;
    FQ_TRY(fq_config_to_string(ctx, cfg, &s, &n));
    fq_status st = fq_write_file_atomic(ctx, path, s, n, 0);
    free(s);
    return st;
}

void fq_bnb_config_clear(fq_bnb_config *c) {
    for (int64_t i = 0; i < c->nskip; i++) free(c->skip_modules[i]);
    free(c->skip_modules);
    c->skip_modules = NULL;
    c->nskip = 0;
}

static const char *dtype_torch_name(fq_dtype t) {
    return t == FQ_F32 ? "float32" : t == FQ_F16 ? "float16" : t == FQ_BF16 ? "bfloat16" : NULL;
}

/* A boolean field; absent counts as `dflt`. -1 on a non-boolean. */
static int get_bool(const cJSON *o, const char *k, int dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!v) return dflt;
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : -1;
}

#define QC "quantization_config"

fq_status fq_config_get_bnb(fq_ctx *ctx, const cJSON *cfg, int *present, fq_bnb_config *out) {
    const cJSON *q = cJSON_GetObjectItemCaseSensitive(cfg, QC);
    if (!q || cJSON_IsNull(q)) {
        *present = 0;
        return FQ_OK;
    }
    if (!cJSON_IsObject(q)) return fq_err(ctx, FQ_ERR_FORMAT, "config: '" QC "' is not an object");
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(q, "quant_method");
    if (m && !(cJSON_IsString(m) && !strcmp(m->valuestring, "bitsandbytes")))
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "config: quant_method %s%s%s is not supported (only bitsandbytes)",
                      cJSON_IsString(m) ? "'" : "", cJSON_IsString(m) ? m->valuestring : "(not a string)",
                      cJSON_IsString(m) ? "'" : "");
    int l4 = get_bool(q, "load_in_4bit", -2), l4b = get_bool(q, "_load_in_4bit", -2);
    int l8 = get_bool(q, "load_in_8bit", 0), l8b = get_bool(q, "_load_in_8bit", 0);
    int dq = get_bool(q, "bnb_4bit_use_double_quant", 0);
    if (l4 == -1 || l4b == -1 || l8 < 0 || l8b < 0 || dq < 0)
        return fq_err(ctx, FQ_ERR_FORMAT, "config: a load_in_* or bnb_4bit_use_double_quant field is not a boolean");
    if (l8 == 1 || l8b == 1)
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "config: 8-bit bitsandbytes (load_in_8bit) is not supported");
    if (l4 != 1 && l4b != 1)
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "config: '" QC "' does not set load_in_4bit");
    fq_bnb_config c = {.quant_type = FQ_QUANT_FP4, .double_quant = dq, .compute_dtype = FQ_F32};
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(q, "bnb_4bit_quant_type");
    if (t && (!cJSON_IsString(t) || fq_quant_type_parse(NULL, t->valuestring, &c.quant_type) != FQ_OK))
        return fq_err(ctx, FQ_ERR_FORMAT, "config: bnb_4bit_quant_type is not \"nf4\" or \"fp4\"");
    const cJSON *d = cJSON_GetObjectItemCaseSensitive(q, "bnb_4bit_compute_dtype");
    if (d && !cJSON_IsNull(d)) {
        const char *ds = cJSON_IsString(d) ? d->valuestring : "";
        if (!strncmp(ds, "torch.", 6)) ds += 6;
        if (!strcmp(ds, "float32")) c.compute_dtype = FQ_F32;
        else if (!strcmp(ds, "float16")) c.compute_dtype = FQ_F16;
        else if (!strcmp(ds, "bfloat16")) c.compute_dtype = FQ_BF16;
        else return fq_err(ctx, FQ_ERR_FORMAT, "config: bnb_4bit_compute_dtype is not float32, float16 or bfloat16");
    }
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(q, "bnb_4bit_quant_storage");
    if (st && !cJSON_IsNull(st) && !(cJSON_IsString(st) && !strcmp(st->valuestring, "uint8")))
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "config: bnb_4bit_quant_storage other than uint8 is not supported");
    const cJSON *sk = cJSON_GetObjectItemCaseSensitive(q, "llm_int8_skip_modules");
    if (sk && !cJSON_IsNull(sk)) {
        if (!cJSON_IsArray(sk)) return fq_err(ctx, FQ_ERR_FORMAT, "config: llm_int8_skip_modules is not a list");
        int n = cJSON_GetArraySize(sk);
        c.skip_modules = calloc((size_t)n + 1, sizeof *c.skip_modules);
        if (!c.skip_modules) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
        for (const cJSON *e = sk->child; e; e = e->next) {
            char *v = cJSON_IsString(e) ? fq_strdup(e->valuestring) : NULL;
            if (!v) {
                fq_bnb_config_clear(&c);
                return cJSON_IsString(e) ? fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory")
                                         : fq_err(ctx, FQ_ERR_FORMAT, "config: llm_int8_skip_modules holds a non-string");
            }
            c.skip_modules[c.nskip++] = v;
        }
    }
    *present = 1;
    *out = c;
    return FQ_OK;
}

/* Adds k: v to o; takes v (also on failure). 0 on OOM. */
static int put(cJSON *o, const char *k, cJSON *v) {
    if (!v) return 0;
    if (!cJSON_AddItemToObject(o, k, v)) {
        cJSON_Delete(v);
        return 0;
    }
    return 1;
}

fq_status fq_config_set_bnb(fq_ctx *ctx, cJSON *cfg, const fq_bnb_config *qc) {
    const char *cd = dtype_torch_name(qc->compute_dtype);
    if (!cd) return fq_err(ctx, FQ_ERR_INVALID_ARG, "compute dtype %s is not f32, f16 or bf16", fq_dtype_name(qc->compute_dtype));
    if (qc->quant_type != FQ_QUANT_NF4 && qc->quant_type != FQ_QUANT_FP4)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "unknown quant type %d", (int)qc->quant_type);
    cJSON *skip = cJSON_CreateNull();
    if (qc->nskip > 0) {
        cJSON_Delete(skip);
        skip = cJSON_CreateArray();
        for (int64_t i = 0; skip && i < qc->nskip; i++) {
            cJSON *s = cJSON_CreateString(qc->skip_modules[i]);
            if (!s || !cJSON_AddItemToArray(skip, s)) {
                cJSON_Delete(s);
                cJSON_Delete(skip);
                skip = NULL;
            }
        }
    }
    /* The fields of BitsAndBytesConfig.to_dict() for 4-bit, as a diffusers
     * save_pretrained folder has them (sorted when written). */
    cJSON *q = cJSON_CreateObject();
    int ok = q && put(q, "_load_in_4bit", cJSON_CreateTrue()) && put(q, "_load_in_8bit", cJSON_CreateFalse()) &&
             put(q, "bnb_4bit_compute_dtype", cJSON_CreateString(cd)) &&
             put(q, "bnb_4bit_quant_storage", cJSON_CreateString("uint8")) &&
             put(q, "bnb_4bit_quant_type", cJSON_CreateString(fq_quant_type_name(qc->quant_type))) &&
             put(q, "bnb_4bit_use_double_quant", cJSON_CreateBool(qc->double_quant != 0)) &&
             put(q, "llm_int8_enable_fp32_cpu_offload", cJSON_CreateFalse()) &&
             put(q, "llm_int8_has_fp16_weight", cJSON_CreateFalse());
    if (ok) ok = put(q, "llm_int8_skip_modules", skip); /* put() takes skip */
    else cJSON_Delete(skip);
    ok = ok && put(q, "llm_int8_threshold", fq_json_new_float(6.0)) && put(q, "load_in_4bit", cJSON_CreateTrue()) &&
         put(q, "load_in_8bit", cJSON_CreateFalse()) && put(q, "quant_method", cJSON_CreateString("bitsandbytes"));
    if (ok) {
        ok = cJSON_GetObjectItemCaseSensitive(cfg, QC) ? cJSON_ReplaceItemInObjectCaseSensitive(cfg, QC, q)
                                                        : cJSON_AddItemToObject(cfg, QC, q);
        if (ok) return FQ_OK;
    }
    cJSON_Delete(q);
    return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
}

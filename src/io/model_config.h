/* diffusers / transformers config.json: read any JSON object, write it back the
 * way save_pretrained does (json.dumps(indent=2, sort_keys=True) + "\n"), and
 * read/write its bitsandbytes 4-bit "quantization_config". */
#ifndef FQ_IO_MODEL_CONFIG_H
#define FQ_IO_MODEL_CONFIG_H

#include "core/core.h"

#include <cjson/cJSON.h>

/* Reads path (at most 16 MB) as a JSON object (strict, see json_util.h).
 * *out: caller frees with cJSON_Delete. */
fq_status fq_config_read(fq_ctx *ctx, const char *path, cJSON **out);
/* Serializes cfg exactly as diffusers' to_json_string does. *out: NUL-terminated,
 * caller frees; *len may be NULL. */
fq_status fq_config_to_string(fq_ctx *ctx, const cJSON *cfg, char **out, size_t *len);
/* Writes cfg to path atomically (temp file + fsync + rename). */
fq_status fq_config_write(fq_ctx *ctx, const char *path, const cJSON *cfg);

/* The 4-bit settings of a BitsAndBytesConfig. */
typedef struct {
    fq_quant_type quant_type;   /* bnb_4bit_quant_type */
    int double_quant;           /* bnb_4bit_use_double_quant */
    fq_dtype compute_dtype;     /* bnb_4bit_compute_dtype (f32 when null) */
    int64_t nskip;              /* llm_int8_skip_modules (null: 0 and skip NULL) */
    char **skip_modules;
} fq_bnb_config;

/* Reads cfg["quantization_config"]. *present = 0 (and *out untouched) when it is
 * absent or null. Errors: FQ_ERR_UNSUPPORTED for another quant_method or 8-bit;
 * FQ_ERR_FORMAT for wrong types or values. Free *out with fq_bnb_config_clear. */
fq_status fq_config_get_bnb(fq_ctx *ctx, const cJSON *cfg, int *present, fq_bnb_config *out);
void fq_bnb_config_clear(fq_bnb_config *c);
/* Sets cfg["quantization_config"] to what diffusers' BitsAndBytesConfig.to_dict()
 * gives for these 4-bit settings (replacing any existing one). cfg is unchanged
 * on failure. */
fq_status fq_config_set_bnb(fq_ctx *ctx, cJSON *cfg, const fq_bnb_config *qc);

#endif

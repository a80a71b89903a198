/* bitsandbytes 4-bit serialization of one quantized tensor named P
 * (e.g. "transformer_blocks.0.attn.to_q.weight"):
 *
 *   P                                   u8  [(n+1)/2, 1]  packed nibbles
 *   P.absmax                            f32 [nblocks]     (u8 [nblocks] with double quant)
 *   P.quant_map                         f32 [16]
 *   P.nested_absmax                     f32 [ceil(nblocks/256)]   double quant only
 *   P.nested_quant_map                  f32 [256]                 double quant only
 *   P.quant_state.bitsandbytes__nf4|fp4 u8  [len]  UTF-8 JSON, exactly as bnb writes it:
 *     {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [3072, 3072],
 *      "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0116...}
 */
#ifndef FQ_IO_BNB_IO_H
#define FQ_IO_BNB_IO_H

#include "core/core.h"
#include "io/safetensors.h"

/* The non-tensor fields of a quant state (the JSON). */
typedef struct {
    fq_quant_type type;
    int64_t blocksize;
    fq_dtype dtype;             /* original dtype: f32, f16 or bf16 */
    int ndim;
    int64_t shape[FQ_MAX_DIMS];
    int nested;                 /* double quantization */
    int64_t nested_blocksize;   /* 256 */
    fq_dtype nested_dtype;      /* f32 */
    double nested_offset;       /* a float32 value, printed as Python prints it */
} fq_bnb_state;

/* Parses the quant_state bytes of tensor `key` (its name picks nf4/fp4 and must
 * agree with "quant_type"). Checks: JSON object, known keys only, each with the
 * right type, blocksize supported, dtype f32/f16/bf16, shape of non-negative
 * integers, nested fields all or none, nested_blocksize 256, nested_dtype
 * float32, nested_offset finite. Errors (FQ_ERR_FORMAT, FQ_ERR_NONFINITE)
 * name the key. */
fq_status fq_bnb_state_parse(fq_ctx *ctx, const char *key, const void *bytes, size_t n, fq_bnb_state *out);
/* The JSON bytes bitsandbytes writes for st (no trailing NUL counted in *len;
 * *out is NUL-terminated, caller frees). */
fq_status fq_bnb_state_format(fq_ctx *ctx, const fq_bnb_state *st, char **out, size_t *len);

/* 1 if the set holds "P.quant_state.bitsandbytes__nf4" or "__fp4" (*type set
 * when not NULL). */
int fq_bnb_is_quantized(const fq_st_set *set, const char *P, fq_quant_type *type);

/* If `key` is P or one of P's member keys for a quantized P in the set, writes
 * P into buf (NUL-terminated, truncated to n) and returns 1; else 0. Lets a
 * converter skip every key that belongs to a quantized weight. */
int fq_bnb_owner(const fq_st_set *set, const char *key, char *buf, size_t n);

/* Loads quantized tensor P from the set onto dev (all members checked: present,
 * right dtype and length, no NaN/Inf in absmax, nested_absmax, quant maps or
 * offset; no stray member keys). *out: caller frees with fq_qtensor_free; it is
 * named P. Errors name the offending key. */
fq_status fq_bnb_load(fq_ctx *ctx, const fq_st_set *set, const char *P, fq_device dev, fq_qtensor **out);

/* Adds q's members under P to the writer, as bitsandbytes names and shapes
 * them (copies to host; the writer owns the copies). On failure the writer
 * is left as it was. */
fq_status fq_bnb_write(fq_ctx *ctx, fq_st_writer *w, const char *P, const fq_qtensor *q);

#endif

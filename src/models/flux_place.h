/* Placement of a Flux model: every buffer listed by name, a check that the model
 * is wholly on one device, all-or-nothing moves, and quantization at load. */
#ifndef FQ_MODELS_FLUX_PLACE_H
#define FQ_MODELS_FLUX_PLACE_H

#include "models/flux.h"

/* One buffer of the model. `member` is NULL for a dense tensor, else the
 * quant-state member ("packed", "absmax", ...) of a 4-bit weight. */
typedef struct {
    const char *name;     /* diffusers parameter name, e.g. transformer_blocks.3.attn.to_q.weight */
    const char *member;
    fq_device device;
    size_t bytes;
    fq_dtype dtype;       /* dense tensors; U8 for 4-bit members */
} fq_flux_buffer;

typedef void (*fq_flux_audit_fn)(void *user, const fq_flux_buffer *b);

/* Calls fn for every buffer of m, in parameter order. Returns the number of buffers. */
int64_t fq_flux_audit(const fq_flux_model *m, fq_flux_audit_fn fn, void *user);
/* FQ_OK if every buffer (every quant-state member included) is on dev; else a
 * device-mismatch error naming the first misplaced tensor and member. */
fq_status fq_flux_check_on(fq_ctx *ctx, const fq_flux_model *m, fq_device dev);
/* Moves every weight to dev, all-or-nothing: copies everything first, then swaps;
 * on failure m is unchanged and nothing leaks. */
fq_status fq_flux_move(fq_ctx *ctx, fq_flux_model *m, fq_device dev);
/* Quantizes every dense linear weight on the model's device, except those whose
 * module name (parameter name without ".weight") contains one of skip[0..nskip)
 * (like diffusers' llm_int8_skip_modules). All-or-nothing. */
fq_status fq_flux_quantize(fq_ctx *ctx, fq_flux_model *m, const fq_quant_params *p, char *const *skip,
                           int nskip);

#endif

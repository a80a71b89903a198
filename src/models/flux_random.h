/* A FluxTransformer2DModel with random weights, built directly on a device
 * (benchmarks at full size without a checkpoint, tests that compare devices).
 *
 * Every tensor is filled on its device by fq_nn_random from (seed, tensor
 * index) alone, so the same seed gives bit-identical weights on the CPU and on
 * any GPU. With `quantize`, each linear weight is generated into one reused
 * 16-bit scratch tensor on the device and quantized there (fq_quantize_4bit):
 * nothing is staged on the host, and at most one dense weight exists at a time.
 *
 * Values: a linear [out, in] is uniform in ±sqrt(3/in) (unit gain), biases
 * ±0.02, RMSNorm weights 1 ± 0.1. */
#ifndef FQ_MODELS_FLUX_RANDOM_H
#define FQ_MODELS_FLUX_RANDOM_H

#include "models/flux.h"

typedef struct {
    fq_device device;       /* default cpu                                              */
    fq_dtype weight_dtype;  /* dense weights and biases: f32, f16 or bf16 (default bf16) */
    int quantize;           /* 1: every linear weight 4-bit with qp (default 0)          */
    fq_quant_params qp;     /* default NF4, blocksize 64, no double quant                */
    uint64_t seed;          /* default 0                                                 */
    int compute_dtype;      /* -1 (default): bf16 when quantized, else weight_dtype      */
} fq_flux_random_params;

fq_flux_random_params fq_flux_random_default_params(void);

/* Sizes by name: "dev" (FLUX.1-dev: 19 + 38 blocks, 24 heads of 128, guidance
 * embedder), "schnell" (the same without guidance), or the path of a diffusers
 * config.json (a file, or a folder holding one). */
fq_status fq_flux_config_named(fq_ctx *ctx, const char *name, fq_flux_config *out);

/* *out: a model of config c with random weights on p->device (caller frees with
 * fq_flux_free). On failure nothing is returned and nothing leaks. */
fq_status fq_flux_random(fq_ctx *ctx, const fq_flux_config *c, const fq_flux_random_params *p,
                         fq_flux_model **out);

#endif

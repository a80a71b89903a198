/* Reading golden tensors (recorded by diffusers / float64 references) from an
 * opened safetensors file, shared by the FLUX tests. Not part of the library. */
#ifndef FQ_TEST_GOLDEN_H
#define FQ_TEST_GOLDEN_H

#include "io/safetensors.h"

/* The values of tensor `name` of f as doubles (f32, f64 or bf16 stored); NULL
 * if absent. *n gets the count. Caller frees. */
double *gold_values(const fq_st_file *f, const char *name, int64_t *n);
/* A CPU tensor holding tensor `name` in its own dtype (bf16 stays bf16: that
 * is what the bf16 pipeline hands the model; f64 becomes f32); NULL if absent.
 * Caller frees with fq_tensor_free. */
fq_tensor *gold_input(fq_ctx *ctx, const fq_st_file *f, const char *name);

#endif

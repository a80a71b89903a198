/* Checkpoint conversion shared by `fluxq quantize`, `fluxq dequantize` and the demo. */
#ifndef FQ_CLI_CONVERT_H
#define FQ_CLI_CONVERT_H

#include "cli/cli.h"
#include "io/safetensors.h"

#define CLI_MAX_GLOBS 64
#define CLI_MAX_SKIP 4096

typedef struct {
    bool quantize;            /* true: float -> 4-bit; false: 4-bit -> float */
    fq_quant_params params;   /* quantize */
    int out_dtype;            /* dequantize: fq_dtype, or -1 for the original */
    fq_device device;         /* where the kernels run */
    char *include[CLI_MAX_GLOBS];
    int n_include;
    char *exclude[CLI_MAX_GLOBS];
    int n_exclude;
    bool quiet;
} cli_convert_opts;

typedef struct {
    int64_t converted, copied, kept_quantized;
    int64_t bytes_out;
    char *skipped[CLI_MAX_SKIP]; /* float linear weights left unquantized (module names) */
    int n_skipped;
} cli_convert_stats;

/* True if tensor t is one `quantize` turns into 4-bit under opts o. */
bool cli_should_quantize(const cli_convert_opts *o, const fq_st_tensor *t);
/* Converts IN (file or diffusers folder) into OUT. Writes nothing on failure. */
fq_status cli_convert(fq_ctx *ctx, const cli_convert_opts *o, const char *in, const char *out,
                      cli_convert_stats *st);
void cli_convert_stats_clear(cli_convert_stats *st);
/* The default device: the first GPU if there is one, else the CPU. */
fq_device cli_default_device(void);

#endif

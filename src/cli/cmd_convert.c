/* fluxq quantize / fluxq dequantize: argument handling around cli_convert. */
#include "cli/convert.h"

#include <string.h>

fq_device cli_default_device(void) { return fq_cuda_device_count() > 0 ? FQ_CUDA(0) : FQ_CPU; }

static const char *QUANTIZE_HELP =
    "usage: fluxq quantize IN OUT [--type nf4|fp4] [--blocksize N] [--double-quant]\n"
    "                             [--device DEV] [--include GLOB]... [--exclude GLOB]...\n"
    "\n"
    "Quantizes the floating tensors of IN into bitsandbytes 4-bit tensors in OUT.\n"
    "IN/OUT: a .safetensors file, or a diffusers model folder (config.json +\n"
    "diffusion_pytorch_model*.safetensors, sharded with an index); for a folder the\n"
    "output config.json gets a quantization_config the way diffusers writes it.\n"
    "\n"
    "  --type nf4|fp4     4-bit code (default nf4)\n"
    "  --blocksize N      32, 64 (default), 128, 256, 512, 1024, 2048 or 4096\n"
    "  --double-quant     also quantize the absmax (bitsandbytes compress_statistics)\n"
    "  --device DEV       where to run: cpu, cuda, cuda:N (default: first GPU, else cpu)\n"
    "  --include GLOB     quantize floating tensors whose name matches (repeatable);\n"
    "                     default: every floating 2-D tensor named *.weight\n"
    "  --exclude GLOB     never quantize tensors whose name matches (repeatable)\n"
    "  --quiet            no progress on stderr\n"
    "\n"
    "Tensors already in 4-bit are kept as they are (never quantized twice); every\n"
    "other tensor is copied unchanged. The bytes are identical to bitsandbytes' CUDA\n"
    "kernels on every device.\n";

static const char *DEQUANTIZE_HELP =
    "usage: fluxq dequantize IN OUT [--dtype f32|f16|bf16] [--device DEV]\n"
    "\n"
    "Turns every bitsandbytes 4-bit tensor of IN back into a float tensor of its\n"
    "original shape; other tensors are copied. For a folder the quantization_config\n"
    "is removed from config.json.\n"
    "\n"
    "  --dtype T      output dtype (default: each tensor's original dtype)\n"
    "  --device DEV   where to run (default: first GPU, else cpu)\n"
    "  --quiet        no progress on stderr\n";

static int run(int argc, char **argv, bool quantize) {
    const char *cmd = quantize ? "quantize" : "dequantize";
    if (cli_wants_help(argc, argv)) { fputs(quantize ? QUANTIZE_HELP : DEQUANTIZE_HELP, stdout); return EXIT_OK; }
    fq_ctx *ctx;
    if (fq_ctx_create(&ctx) != FQ_OK) { fprintf(stderr, "fluxq: out of memory\n"); return EXIT_ERR; }
    fq_ctx_set_log(ctx, cli_log, NULL, FQ_LOG_WARN);
    cli_convert_opts o = {.quantize = quantize, .params = fq_quant_default_params(), .out_dtype = -1};
    const char *pos[2] = {0};
    int npos = 0, rc = EXIT_OK;
    const char *dev = NULL;
    for (int i = 1; i < argc && rc == EXIT_OK; i++) {
        bool miss = false;
        const char *v;
        if (quantize && (v = cli_opt(argc, argv, &i, "--type", &miss))) {
            if (fq_quant_type_parse(ctx, v, &o.params.type) != FQ_OK) rc = cli_usage_error(cmd, "%s", fq_ctx_error(ctx));
        } else if (quantize && (v = cli_opt(argc, argv, &i, "--blocksize", &miss))) {
            long long b;
            if (!cli_parse_i64(v, &b) || !(b == 32 || b == 64 || b == 128 || b == 256 || b == 512 ||
                                            b == 1024 || b == 2048 || b == 4096))
                rc = cli_usage_error(cmd, "unsupported --blocksize '%s' (32, 64, ..., 4096)", v);
            o.params.blocksize = b;
        } else if (quantize && !strcmp(argv[i], "--double-quant")) {
            o.params.double_quant = 1;
        } else if (quantize && (v = cli_opt(argc, argv, &i, "--include", &miss))) {
            if (o.n_include == CLI_MAX_GLOBS) rc = cli_usage_error(cmd, "too many --include");
            else o.include[o.n_include++] = (char *)v;
        } else if (quantize && (v = cli_opt(argc, argv, &i, "--exclude", &miss))) {
            if (o.n_exclude == CLI_MAX_GLOBS) rc = cli_usage_error(cmd, "too many --exclude");
            else o.exclude[o.n_exclude++] = (char *)v;
        } else if (!quantize && (v = cli_opt(argc, argv, &i, "--dtype", &miss))) {
            fq_dtype t;
            if (fq_dtype_parse(ctx, v, &t) != FQ_OK || !(t == FQ_F32 || t == FQ_F16 || t == FQ_BF16))
                rc = cli_usage_error(cmd, "--dtype must be f32, f16 or bf16, not '%s'", v);
            o.out_dtype = (int)t;
        } else if ((v = cli_opt(argc, argv, &i, "--device", &miss))) {
            dev = v;
        } else if (!strcmp(argv[i], "--quiet")) {
            o.quiet = true;
        } else if (miss) {
            rc = cli_usage_error(cmd, "%s needs a value", argv[i]);
        } else if (argv[i][0] == '-' && argv[i][1]) {
            rc = cli_usage_error(cmd, "unknown option '%s'", argv[i]);
        } else if (npos < 2) {
            pos[npos++] = argv[i];
        } else {
            rc = cli_usage_error(cmd, "unexpected argument '%s'", argv[i]);
        }
    }
    if (rc == EXIT_OK && npos != 2) rc = cli_usage_error(cmd, "needs IN and OUT");
    o.device = cli_default_device();
    if (rc == EXIT_OK && dev && fq_device_parse(ctx, dev, &o.device) != FQ_OK)
        rc = cli_usage_error(cmd, "%s", fq_ctx_error(ctx));
    if (rc == EXIT_OK) {
        fq_status s = fq_device_check(ctx, o.device);
        static cli_convert_stats st; /* large; one conversion per process */
        if (s == FQ_OK) s = cli_convert(ctx, &o, pos[0], pos[1], &st);
        if (s != FQ_OK) {
            rc = cli_fail(ctx, cmd, s);
            cli_convert_stats_clear(&st);
        } else {
            char dn[16];
            fprintf(stderr, "fluxq %s: %s -> %s on %s: %lld converted, %lld copied, %lld already 4-bit\n", cmd,
                    pos[0], pos[1], fq_device_name(o.device, dn, sizeof dn), (long long)st.converted,
                    (long long)st.copied, (long long)st.kept_quantized);
            cli_convert_stats_clear(&st);
        }
    }
    fq_ctx_free(ctx);
    return rc;
}

int cmd_quantize(int argc, char **argv) { return run(argc, argv, true); }
int cmd_dequantize(int argc, char **argv) { return run(argc, argv, false); }

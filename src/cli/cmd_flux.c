/* fluxq forward / fluxq audit: one transformer forward from a safetensors of
 * inputs, and the placement report of a loaded model. */
#include "cli/convert.h"
#include "models/flux_place.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *FORWARD_HELP =
    "usage: fluxq forward --model PATH --inputs IN.safetensors --output OUT.safetensors\n"
    "                     [--device DEV] [--quantize nf4|fp4] [--double-quant] [--skip MODULE]...\n"
    "                     [--dtype f32|bf16|f16] [--config CONFIG.json]\n"
    "\n"
    "Runs one FluxTransformer2DModel forward. PATH: a diffusers model folder (f32/bf16/f16\n"
    "or bitsandbytes 4-bit) or a Black Forest Labs single file (flux1-*.safetensors; sizes\n"
    "from --config or a config.json beside it). IN holds the diffusers forward arguments:\n"
    "hidden_states [B,Si,C], encoder_hidden_states [B,St,Dt], pooled_projections [B,Dp],\n"
    "timestep [B] (sigma in [0,1]), guidance [B] (optional), img_ids [Si,3], txt_ids [St,3];\n"
    "other tensors are ignored. OUT gets sample [B,Si,Cout] (f32).\n"
    "\n"
    "  --device DEV        where the model and the forward live (default: cpu)\n"
    "  --quantize T        quantize dense linear weights to nf4/fp4 at load time\n"
    "  --double-quant      with --quantize: double quantization\n"
    "  --skip MODULE       with --quantize: keep modules whose name contains MODULE\n"
    "  --dtype T           compute dtype (default: the model's, as diffusers would)\n"
    "  --config FILE       config.json for a single-file checkpoint\n";

static const char *AUDIT_HELP =
    "usage: fluxq audit --model PATH [--device DEV] [--config CONFIG.json] [--quiet]\n"
    "\n"
    "Loads the model onto DEV (default cpu) and lists every buffer it holds: parameter,\n"
    "quant-state member, device and bytes; then checks that the whole model is on DEV\n"
    "(exit 1 if not). --quiet prints only the totals and the check.\n";

typedef struct {
    const char *model, *inputs, *output, *config;
    fq_device dev;
    int quantize;              /* 0 none, else 1 + fq_quant_type */
    fq_quant_params qp;
    char *skip[CLI_MAX_GLOBS];
    int nskip;
    int dtype;                 /* -1: the model's */
    bool quiet;
} flux_opts;

static int parse(int argc, char **argv, const char *cmd, flux_opts *o, fq_ctx *ctx) {
    *o = (flux_opts){.dev = FQ_CPU, .qp = fq_quant_default_params(), .dtype = -1};
    for (int i = 1; i < argc; i++) {
        bool miss = false;
        const char *v;
        if ((v = cli_opt(argc, argv, &i, "--model", &miss))) o->model = v;
        else if ((v = cli_opt(argc, argv, &i, "--inputs", &miss))) o->inputs = v;
        else if ((v = cli_opt(argc, argv, &i, "--output", &miss))) o->output = v;
        else if ((v = cli_opt(argc, argv, &i, "--config", &miss))) o->config = v;
        else if ((v = cli_opt(argc, argv, &i, "--device", &miss))) {
            if (fq_device_parse(ctx, v, &o->dev) != FQ_OK) return cli_usage_error(cmd, "%s", fq_ctx_error(ctx));
        } else if ((v = cli_opt(argc, argv, &i, "--quantize", &miss))) {
            if (fq_quant_type_parse(ctx, v, &o->qp.type) != FQ_OK) return cli_usage_error(cmd, "%s", fq_ctx_error(ctx));
            o->quantize = 1;
        } else if (!strcmp(argv[i], "--double-quant")) {
            o->qp.double_quant = 1;
        } else if ((v = cli_opt(argc, argv, &i, "--skip", &miss))) {
            if (o->nskip == CLI_MAX_GLOBS) return cli_usage_error(cmd, "too many --skip");
            o->skip[o->nskip++] = (char *)v;
        } else if ((v = cli_opt(argc, argv, &i, "--dtype", &miss))) {
            fq_dtype t;
            if (fq_dtype_parse(ctx, v, &t) != FQ_OK || !(t == FQ_F32 || t == FQ_F16 || t == FQ_BF16))
                return cli_usage_error(cmd, "--dtype must be f32, bf16 or f16");
            o->dtype = (int)t;
        } else if (!strcmp(argv[i], "--quiet")) {
            o->quiet = true;
        } else {
            return cli_usage_error(cmd, miss ? "%s needs a value" : "unknown argument '%s'", argv[i]);
        }
    }
    if (!o->model) return cli_usage_error(cmd, "needs --model PATH");
    return EXIT_OK;
}

static fq_status load_model(fq_ctx *ctx, const flux_opts *o, fq_flux_model **m) {
    fq_flux_load_params lp = fq_flux_load_default_params();
    lp.device = o->dev;
    lp.config_path = o->config;
    lp.compute_dtype = o->dtype;
    FQ_TRY(fq_device_check(ctx, o->dev));
    FQ_TRY(fq_flux_load(ctx, o->model, &lp, m));
    if (o->quantize) {
        fq_status s = fq_flux_quantize(ctx, *m, &o->qp, o->skip, o->nskip);
        if (s != FQ_OK) {
            fq_flux_free(*m);
            *m = NULL;
            return s;
        }
    }
    return FQ_OK;
}

/* Reads a forward argument onto dev (f64 becomes f32). NULL and FQ_OK if absent. */
static fq_status read_input(fq_ctx *ctx, const fq_st_file *f, const char *name, fq_device dev, fq_tensor **out) {
    const fq_st_tensor *t = fq_st_find(f, name);
    *out = NULL;
    if (!t) return FQ_OK;
    if (!fq_dtype_is_float(t->dtype))
        return fq_err(ctx, FQ_ERR_SHAPE, "input '%s' has dtype %s; expected a float dtype", name, fq_dtype_name(t->dtype));
    if (t->dtype != FQ_F64) return fq_tensor_from_host(ctx, dev, t->dtype, t->ndim, t->shape, t->data, out);
    float *tmp = malloc(sizeof(float) * (size_t)(t->numel ? t->numel : 1));
    if (!tmp) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    for (int64_t i = 0; i < t->numel; i++) {
        double d;
        memcpy(&d, (const char *)t->data + 8 * i, 8);
        tmp[i] = (float)d;
    }
    fq_status s = fq_tensor_from_host(ctx, dev, FQ_F32, t->ndim, t->shape, tmp, out);
    free(tmp);
    return s;
}

static fq_status run_forward(fq_ctx *ctx, const flux_opts *o, fq_flux_model *m) {
    static const char *keys[7] = {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                  "guidance", "img_ids", "txt_ids"};
    fq_st_file *f = NULL;
    fq_tensor *t[7] = {0}, *out = NULL;
    fq_flux_plan *plan = NULL;
    float *host = NULL;
    fq_st_writer *w = NULL;
    fq_status s = fq_st_open(ctx, o->inputs, &f);
    for (int i = 0; s == FQ_OK && i < 7; i++) {
        s = read_input(ctx, f, keys[i], o->dev, &t[i]);
        if (s == FQ_OK && !t[i] && i != 4)
            s = fq_err(ctx, FQ_ERR_FORMAT, "%s: missing input '%s'", o->inputs, keys[i]);
    }
    if (s == FQ_OK && (t[0]->ndim != 3 || t[1]->ndim != 3))
        s = fq_err(ctx, FQ_ERR_SHAPE, "hidden_states and encoder_hidden_states must be 3-D [B, S, C]");
    int64_t B = 0, Si = 0, St = 0;
    if (s == FQ_OK) {
        B = t[0]->shape[0], Si = t[0]->shape[1], St = t[1]->shape[1];
        s = fq_flux_plan_create(ctx, m, B, St, Si, &plan);
    }
    int64_t oshape[3] = {B, Si, m->cfg.out_dim};
    if (s == FQ_OK) s = fq_tensor_create(ctx, o->dev, FQ_F32, 3, oshape, &out);
    fq_flux_inputs in = {t[0], t[1], t[2], t[3], t[4], t[5], t[6]};
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    if (s == FQ_OK) s = fq_flux_forward(ctx, m, plan, &in, out);
    clock_gettime(CLOCK_MONOTONIC, &b);
    if (s == FQ_OK && !(host = malloc(fq_tensor_nbytes(out)))) s = fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    if (s == FQ_OK) s = fq_tensor_to_host(ctx, out, host);
    if (s == FQ_OK) s = fq_st_writer_create(ctx, &w);
    if (s == FQ_OK) {
        s = fq_st_writer_add(ctx, w, "sample", FQ_F32, 3, oshape, host, fq_tensor_nbytes(out), 1);
        host = NULL; /* owned by the writer now, even on failure */
    }
    if (s == FQ_OK) s = fq_st_writer_commit(ctx, w, o->output);
    if (s == FQ_OK && !o->quiet) {
        char dn[16];
        fprintf(stderr, "fluxq forward: B=%lld, %lld text + %lld image tokens on %s in %.1f ms (weights %.1f MiB, "
                "activations %.1f MiB) -> %s\n", (long long)B, (long long)St, (long long)Si,
                fq_device_name(o->dev, dn, sizeof dn),
                (double)(b.tv_sec - a.tv_sec) * 1e3 + (double)(b.tv_nsec - a.tv_nsec) / 1e6,
                (double)m->weight_bytes / 1048576.0, plan ? (double)fq_flux_plan_bytes(plan) / 1048576.0 : 0.0,
                o->output);
    }
    free(host);
    fq_st_writer_free(w);
    fq_tensor_free(out);
    fq_flux_plan_free(plan);
    for (int i = 0; i < 7; i++) fq_tensor_free(t[i]);
    fq_st_close(f);
    return s;
}

int cmd_forward(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) { fputs(FORWARD_HELP, stdout); return EXIT_OK; }
    fq_ctx *ctx;
    if (fq_ctx_create(&ctx) != FQ_OK) return EXIT_ERR;
    flux_opts o;
    int rc = parse(argc, argv, "forward", &o, ctx);
    if (rc == EXIT_OK && (!o.inputs || !o.output)) rc = cli_usage_error("forward", "needs --inputs and --output");
    fq_flux_model *m = NULL;
    if (rc == EXIT_OK) {
        fq_status s = load_model(ctx, &o, &m);
        if (s == FQ_OK) s = run_forward(ctx, &o, m);
        if (s != FQ_OK) rc = cli_fail(ctx, "forward", s);
    }
    fq_flux_free(m);
    fq_ctx_free(ctx);
    return rc;
}

typedef struct {
    bool quiet;
    size_t bytes[FQ_MAX_CUDA_DEVICES + 1];
} audit_totals;

static void print_buffer(void *u, const fq_flux_buffer *b) {
    audit_totals *t = u;
    char dn[16];
    int slot = b->device.type == FQ_DEVICE_CPU ? 0 : 1 + b->device.index;
    if (slot <= FQ_MAX_CUDA_DEVICES) t->bytes[slot] += b->bytes;
    if (!t->quiet)
        printf("%-64s %-18s %-8s %12zu\n", b->name, b->member ? b->member : fq_dtype_name(b->dtype),
               fq_device_name(b->device, dn, sizeof dn), b->bytes);
}

int cmd_audit(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) { fputs(AUDIT_HELP, stdout); return EXIT_OK; }
    fq_ctx *ctx;
    if (fq_ctx_create(&ctx) != FQ_OK) return EXIT_ERR;
    flux_opts o;
    int rc = parse(argc, argv, "audit", &o, ctx);
    fq_flux_model *m = NULL;
    if (rc == EXIT_OK) {
        fq_status s = load_model(ctx, &o, &m);
        if (s != FQ_OK) rc = cli_fail(ctx, "audit", s);
    }
    if (rc == EXIT_OK) {
        audit_totals t = {.quiet = o.quiet};
        if (!o.quiet) printf("%-64s %-18s %-8s %12s\n", "parameter", "dtype/member", "device", "bytes");
        int64_t n = fq_flux_audit(m, print_buffer, &t);
        printf("\n%lld buffers:", (long long)n);
        for (int i = 0; i <= FQ_MAX_CUDA_DEVICES; i++) {
            if (!t.bytes[i]) continue;
            char dn[16];
            printf(" %s %.2f MiB", fq_device_name(i ? FQ_CUDA(i - 1) : FQ_CPU, dn, sizeof dn),
                   (double)t.bytes[i] / 1048576.0);
        }
        printf("\n");
        fq_status s = fq_flux_check_on(ctx, m, o.dev);
        char dn[16];
        if (s == FQ_OK) printf("placement check: every buffer is on %s\n", fq_device_name(o.dev, dn, sizeof dn));
        else rc = cli_fail(ctx, "audit", s);
    }
    fq_flux_free(m);
    fq_ctx_free(ctx);
    return rc;
}

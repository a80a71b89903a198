/* fluxq inspect: every tensor with dtype, shape and bytes; quantization states
 * summarized; totals; every validation problem found (exit 1 if any). */
#include "cli/cli.h"
#include "io/bnb_io.h"
#include "io/safetensors.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

static const char *HELP =
    "usage: fluxq inspect PATH [--json]\n"
    "\n"
    "PATH: a .safetensors file, a *.safetensors.index.json or a model folder.\n"
    "Lists every tensor (a bitsandbytes 4-bit weight is one line: type, blocksize,\n"
    "double quant, original dtype and shape, bytes of all its members), totals, and\n"
    "every problem found (corrupt header, bad quant state, NaN absmax, stray\n"
    "quant-state keys). Exit status 1 if there is a problem.\n"
    "\n"
    "  --json   machine-readable output on stdout\n";

static const char *MEMBER_SUFFIX[] = {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                                      ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"};

/* A key that looks like a quant-state member but belongs to no quantized weight. */
static bool stray_member(const char *name) {
    size_t n = strlen(name);
    for (size_t i = 0; i < sizeof MEMBER_SUFFIX / sizeof *MEMBER_SUFFIX; i++) {
        size_t k = strlen(MEMBER_SUFFIX[i]);
        if (n > k && strcmp(name + n - k, MEMBER_SUFFIX[i]) == 0) return true;
    }
    return false;
}

static int64_t bnb_member_bytes(const fq_st_set *set, const char *P) {
    int64_t b = 0;
    char owner[1024];
    for (int64_t i = 0; i < fq_st_set_count(set); i++) {
        const fq_st_tensor *t = fq_st_set_get(set, i);
        if (fq_bnb_owner(set, t->name, owner, sizeof owner) && !strcmp(owner, P)) b += (int64_t)t->nbytes;
    }
    return b;
}

static cJSON *shape_json(int ndim, const int64_t *shape) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i < ndim; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber((double)shape[i]));
    return a;
}

int cmd_inspect(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) { fputs(HELP, stdout); return EXIT_OK; }
    const char *path = NULL;
    bool json = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) json = true;
        else if (argv[i][0] == '-' && argv[i][1]) return cli_usage_error("inspect", "unknown option '%s'", argv[i]);
        else if (!path) path = argv[i];
        else return cli_usage_error("inspect", "unexpected argument '%s'", argv[i]);
    }
    if (!path) return cli_usage_error("inspect", "needs PATH");
    fq_ctx *ctx;
    if (fq_ctx_create(&ctx) != FQ_OK) return EXIT_ERR;
    cJSON *root = cJSON_CreateObject(), *list = cJSON_CreateArray(), *problems = cJSON_CreateArray();
    cJSON_AddStringToObject(root, "path", path);
    cJSON_AddItemToObject(root, "tensors", list);
    cJSON_AddItemToObject(root, "problems", problems);
    int nproblems = 0;
    fq_st_set *set = NULL;
    fq_status s = fq_st_set_open(ctx, path, &set);
    if (s != FQ_OK) {
        cJSON_AddItemToArray(problems, cJSON_CreateString(fq_ctx_error(ctx)));
        nproblems++;
        if (!json) printf("problem: %s\n", fq_ctx_error(ctx));
    }
    int64_t ntensors = 0, nquant = 0, params = 0, bytes = 0;
    if (set && !json) printf("%-56s %-22s %-18s %14s\n", "tensor", "dtype", "shape", "bytes");
    for (int64_t i = 0; set && i < fq_st_set_count(set); i++) {
        const fq_st_tensor *t = fq_st_set_get(set, i);
        char owner[1024], shp[160], kind[64];
        bytes += (int64_t)t->nbytes;
        if (fq_bnb_owner(set, t->name, owner, sizeof owner)) {
            if (strcmp(owner, t->name) != 0) continue;
            fq_qtensor *q = NULL;
            fq_qtensor_info info = {0};
            cJSON *e = cJSON_CreateObject();
            cJSON_AddStringToObject(e, "name", t->name);
            if (fq_bnb_load(ctx, set, t->name, FQ_CPU, &q) == FQ_OK) {
                fq_qtensor_get_info(q, &info);
                snprintf(kind, sizeof kind, "%s/bs%lld%s<-%s", fq_quant_type_name(info.type),
                         (long long)info.blocksize, info.double_quant ? "/dq" : "", fq_dtype_name(info.orig_dtype));
                cJSON_AddStringToObject(e, "dtype", fq_quant_type_name(info.type));
                cJSON_AddItemToObject(e, "shape", shape_json(info.ndim, info.shape));
                cJSON_AddNumberToObject(e, "blocksize", (double)info.blocksize);
                cJSON_AddBoolToObject(e, "double_quant", info.double_quant);
                cJSON_AddStringToObject(e, "original_dtype", fq_dtype_name(info.orig_dtype));
                params += info.numel;
                fq_shape_str(info.ndim, info.shape, shp, sizeof shp);
            } else {
                snprintf(kind, sizeof kind, "4-bit (invalid)");
                snprintf(shp, sizeof shp, "?");
                cJSON_AddItemToArray(problems, cJSON_CreateString(fq_ctx_error(ctx)));
                nproblems++;
                if (!json) printf("problem: %s\n", fq_ctx_error(ctx));
            }
            int64_t mb = bnb_member_bytes(set, t->name);
            cJSON_AddNumberToObject(e, "bytes", (double)mb);
            cJSON_AddItemToArray(list, e);
            if (!json) printf("%-56s %-22s %-18s %14lld\n", t->name, kind, shp, (long long)mb);
            fq_qtensor_free(q);
            nquant++;
            ntensors++;
            continue;
        }
        if (stray_member(t->name)) {
            char msg[1200];
            snprintf(msg, sizeof msg, "'%s' looks like a bitsandbytes quant-state member but no quantized "
                     "weight owns it", t->name);
            cJSON_AddItemToArray(problems, cJSON_CreateString(msg));
            nproblems++;
            if (!json) printf("problem: %s\n", msg);
        }
        fq_shape_str(t->ndim, t->shape, shp, sizeof shp);
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "name", t->name);
        cJSON_AddStringToObject(e, "dtype", fq_dtype_name(t->dtype));
        cJSON_AddItemToObject(e, "shape", shape_json(t->ndim, t->shape));
        cJSON_AddNumberToObject(e, "bytes", (double)t->nbytes);
        cJSON_AddItemToArray(list, e);
        if (!json) printf("%-56s %-22s %-18s %14zu\n", t->name, fq_dtype_name(t->dtype), shp, t->nbytes);
        if (fq_dtype_is_float(t->dtype)) params += t->numel;
        ntensors++;
    }
    cJSON *tot = cJSON_CreateObject();
    cJSON_AddNumberToObject(tot, "tensors", (double)ntensors);
    cJSON_AddNumberToObject(tot, "quantized", (double)nquant);
    cJSON_AddNumberToObject(tot, "parameters", (double)params);
    cJSON_AddNumberToObject(tot, "bytes", (double)bytes);
    cJSON_AddNumberToObject(tot, "files", set ? fq_st_set_nfiles(set) : 0);
    cJSON_AddNumberToObject(tot, "problems", nproblems);
    cJSON_AddItemToObject(root, "totals", tot);
    if (json) {
        char *txt = cJSON_Print(root);
        if (txt) { puts(txt); free(txt); }
    } else {
        printf("\n%lld tensors (%lld 4-bit), %lld parameters, %.3f MiB in %d file(s); %d problem(s)\n",
               (long long)ntensors, (long long)nquant, (long long)params, (double)bytes / 1048576.0,
               set ? fq_st_set_nfiles(set) : 0, nproblems);
    }
    cJSON_Delete(root);
    fq_st_set_close(set);
    fq_ctx_free(ctx);
    return nproblems ? EXIT_ERR : EXIT_OK;
}

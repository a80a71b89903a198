/* fluxq quantize / dequantize: checkpoint conversion between float and
 * bitsandbytes 4-bit safetensors, for single files and diffusers folders. */
#include "cli/convert.h"
#include "io/bnb_io.h"
#include "io/model_config.h"
#include "io/safetensors.h"

#include <errno.h>
#include <fnmatch.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static bool is_dir(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static bool any_match(char *const *globs, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (fnmatch(globs[i], name, 0) == 0) return true;
    return false;
}

static bool is_float_dtype(fq_dtype t) { return t == FQ_F32 || t == FQ_F16 || t == FQ_BF16; }

bool cli_should_quantize(const cli_convert_opts *o, const fq_st_tensor *t) {
    if (!is_float_dtype(t->dtype) || t->numel == 0) return false;
    bool in = o->n_include ? any_match(o->include, o->n_include, t->name)
                           : (t->ndim == 2 && strlen(t->name) > 7 &&
                              strcmp(t->name + strlen(t->name) - 7, ".weight") == 0);
    return in && !any_match(o->exclude, o->n_exclude, t->name);
}

/* Where the weights of a folder live and what the output file is called. */
static const char *weights_name(const fq_st_set *set) {
    const char *p = fq_st_path(fq_st_set_file(set, 0));
    const char *b = strrchr(p, '/');
    b = b ? b + 1 : p;
    return strncmp(b, "model", 5) == 0 ? "model.safetensors" : "diffusion_pytorch_model.safetensors";
}

static void copy_metadata(fq_ctx *ctx, fq_st_writer *w, const fq_st_set *set, fq_status *s) {
    const fq_st_file *f = fq_st_set_file(set, 0);
    for (int64_t i = 0; *s == FQ_OK && i < fq_st_metadata_count(f); i++) {
        const char *k, *v;
        fq_st_metadata_get(f, i, &k, &v);
        *s = fq_st_writer_set_metadata(ctx, w, k, v);
    }
}

/* Adds each tensor of the set to w: quantized (mode Q), dequantized (mode D) or copied. */
static fq_status convert_tensors(fq_ctx *ctx, const cli_convert_opts *o, const fq_st_set *set,
                                 fq_st_writer *w, cli_convert_stats *st) {
    int64_t n = fq_st_set_count(set);
    for (int64_t i = 0; i < n; i++) {
        const fq_st_tensor *t = fq_st_set_get(set, i);
        char owner[1024];
        fq_status s = FQ_OK;
        if (!o->quiet) cli_progress(t->name, i + 1, n);
        if (fq_bnb_owner(set, t->name, owner, sizeof owner)) {
            if (strcmp(owner, t->name) != 0) continue; /* a member: written with its owner */
            fq_qtensor *q = NULL;
            s = fq_bnb_load(ctx, set, t->name, o->quantize ? FQ_CPU : o->device, &q);
            if (s == FQ_OK && o->quantize) {
                s = fq_bnb_write(ctx, w, t->name, q); /* already 4-bit: kept as it is */
                st->kept_quantized++;
            } else if (s == FQ_OK) {
                fq_tensor *y = NULL;
                fq_qtensor_info info;
                fq_qtensor_get_info(q, &info);
                s = fq_dequantize_4bit(ctx, q, o->out_dtype, &y);
                void *host = NULL;
                if (s == FQ_OK && !(host = malloc(fq_tensor_nbytes(y) ? fq_tensor_nbytes(y) : 1)))
                    s = fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
                if (s == FQ_OK) s = fq_tensor_to_host(ctx, y, host);
                if (s == FQ_OK)
                    s = fq_st_writer_add(ctx, w, t->name, fq_tensor_dtype(y), info.ndim, info.shape, host,
                                         fq_tensor_nbytes(y), 1);
                else
                    free(host);
                fq_tensor_free(y);
                st->converted++;
            }
            fq_qtensor_free(q);
        } else if (o->quantize && cli_should_quantize(o, t)) {
            fq_tensor *x = NULL;
            fq_qtensor *q = NULL;
            s = fq_tensor_from_host(ctx, o->device, t->dtype, t->ndim, t->shape, t->data, &x);
            if (s == FQ_OK) s = fq_tensor_set_name(ctx, x, t->name);
            if (s == FQ_OK) s = fq_quantize_4bit(ctx, x, &o->params, &q);
            if (s == FQ_OK) s = fq_bnb_write(ctx, w, t->name, q);
            if (s == FQ_OK) st->bytes_out += fq_qtensor_member_bytes(q, FQ_QMEMBER_PACKED);
            fq_qtensor_free(q);
            fq_tensor_free(x);
            st->converted++;
        } else {
            /* A linear weight left in float: diffusers must be told not to expect 4-bit. */
            if (o->quantize && is_float_dtype(t->dtype) && t->ndim == 2 && strlen(t->name) > 7 &&
                strcmp(t->name + strlen(t->name) - 7, ".weight") == 0 && st->n_skipped < CLI_MAX_SKIP) {
                size_t len = strlen(t->name) - 7;
                char *m = malloc(len + 1);
                if (m) { memcpy(m, t->name, len); m[len] = '\0'; st->skipped[st->n_skipped++] = m; }
            }
            s = fq_st_writer_add(ctx, w, t->name, t->dtype, t->ndim, t->shape, t->data, t->nbytes, 0);
            st->copied++;
        }
        if (s != FQ_OK) return fq_err_prefix(ctx, s, "tensor '%s'", t->name);
    }
    if (!o->quiet) cli_progress_done();
    return FQ_OK;
}

/* The compute dtype diffusers will use: the dtype of the first quantized weight. */
static fq_dtype first_float_dtype(const fq_st_set *set) {
    for (int64_t i = 0; i < fq_st_set_count(set); i++) {
        const fq_st_tensor *t = fq_st_set_get(set, i);
        if (is_float_dtype(t->dtype)) return t->dtype;
    }
    return FQ_BF16;
}

static fq_status write_folder_config(fq_ctx *ctx, const cli_convert_opts *o, const char *in_dir,
                                     const char *out_dir, const fq_st_set *set, const cli_convert_stats *st) {
    char src[4096], dst[4096];
    snprintf(src, sizeof src, "%s/config.json", in_dir);
    snprintf(dst, sizeof dst, "%s/config.json", out_dir);
    cJSON *cfg = NULL;
    if (access(src, F_OK) != 0) {
        if (!o->quantize) return FQ_OK;
        cfg = cJSON_CreateObject(); /* a folder without config: write just the quantization */
        if (!cfg) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    } else {
        FQ_TRY(fq_config_read(ctx, src, &cfg));
    }
    fq_status s = FQ_OK;
    if (o->quantize) {
        fq_bnb_config bc = {0};
        bc.quant_type = o->params.type;
        bc.double_quant = o->params.double_quant;
        bc.compute_dtype = first_float_dtype(set);
        bc.nskip = st->n_skipped;
        bc.skip_modules = st->n_skipped ? (char **)st->skipped : NULL;
        s = fq_config_set_bnb(ctx, cfg, &bc);
    } else {
        cJSON_DeleteItemFromObjectCaseSensitive(cfg, "quantization_config");
    }
    if (s == FQ_OK) s = fq_config_write(ctx, dst, cfg);
    cJSON_Delete(cfg);
    return s;
}

void cli_convert_stats_clear(cli_convert_stats *st) {
    for (int i = 0; i < st->n_skipped; i++) free(st->skipped[i]);
    memset(st, 0, sizeof *st);
}

fq_status cli_convert(fq_ctx *ctx, const cli_convert_opts *o, const char *in, const char *out,
                      cli_convert_stats *st) {
    memset(st, 0, sizeof *st);
    fq_st_set *set = NULL;
    FQ_TRY(fq_st_set_open(ctx, in, &set));
    bool folder = is_dir(in);
    bool made_dir = false;
    char out_file[4096];
    fq_status s = FQ_OK;
    if (folder) {
        if (!is_dir(out)) {
            if (mkdir(out, 0777) != 0)
                s = fq_err(ctx, FQ_ERR_IO, "cannot create output folder '%s': %s", out, strerror(errno));
            made_dir = s == FQ_OK;
        }
        snprintf(out_file, sizeof out_file, "%s/%s", out, weights_name(set));
    } else {
        snprintf(out_file, sizeof out_file, "%s", out);
    }
    fq_st_writer *w = NULL;
    if (s == FQ_OK) s = fq_st_writer_create(ctx, &w);
    /* converted tensors wait on disk next to the output, not in memory (FLUX.1-dev
     * dequantized to bf16 is 24 GB) */
    char spool_dir[4096];
    snprintf(spool_dir, sizeof spool_dir, "%s", folder ? out : out_file);
    if (!folder) {
        char *slash = strrchr(spool_dir, '/');
        if (slash) slash[slash == spool_dir ? 1 : 0] = '\0';
        else snprintf(spool_dir, sizeof spool_dir, ".");
    }
    if (s == FQ_OK) s = fq_st_writer_spool(ctx, w, spool_dir);
    if (s == FQ_OK) copy_metadata(ctx, w, set, &s);
    if (s == FQ_OK) s = convert_tensors(ctx, o, set, w, st);
    if (s == FQ_OK) s = fq_st_writer_commit(ctx, w, out_file);
    bool wrote = s == FQ_OK;
    if (s == FQ_OK && folder) s = write_folder_config(ctx, o, in, out, set, st);
    if (s != FQ_OK) {
        /* nothing half-written: the weights go if the config could not be written */
        if (wrote) unlink(out_file);
        if (made_dir) rmdir(out);
    }
    fq_st_writer_free(w);
    fq_st_set_close(set);
    return s;
}

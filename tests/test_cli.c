/* The fluxq command end to end: exit codes, outputs, and that bad input leaves
 * nothing behind. Runs the binary named by $FLUXQ (set by tests/run.sh). */
#include "check.h"
#include "support/files.h"
#include "io/bnb_io.h"
#include "io/safetensors.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *g_bin;
static char g_dir[256];
static char g_out[1 << 16];

/* Runs `fluxq ARGS` with stdout+stderr captured into g_out; returns the exit code. */
static int fluxq(const char *args) {
    char cmd[4096], log[300];
    snprintf(log, sizeof log, "%s/log.txt", g_dir);
    snprintf(cmd, sizeof cmd, "cd '%s' && '%s' %s > '%s' 2>&1", g_dir, g_bin, args, log);
    int st = system(cmd);
    g_out[0] = '\0';
    FILE *f = fopen(log, "rb");
    if (f) {
        size_t n = fread(g_out, 1, sizeof g_out - 1, f);
        g_out[n] = '\0';
        fclose(f);
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static bool exists(const char *name) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    struct stat s;
    return stat(p, &s) == 0;
}

/* No "*.tmp*" file may be left in the test folder. */
static int temp_files(void) {
    DIR *d = opendir(g_dir);
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d));)
        if (strstr(e->d_name, ".tmp")) n++;
    if (d) closedir(d);
    return n;
}

static float frand(unsigned *s) {
    *s = *s * 1664525u + 1013904223u;
    return ((float)(*s >> 8) / 16777216.0f - 0.5f) * 2.0f;
}

static void write_input(fq_ctx *ctx, const char *name) {
    fq_st_writer *w;
    CHECK_OK(ctx, fq_st_writer_create(ctx, &w));
    unsigned seed = 7;
    int64_t s1[2] = {64, 96}, s2[1] = {64}, s3[2] = {5, 7}, s4[3] = {3, 4, 5};
    float *a = malloc(64 * 96 * 4), *b = malloc(64 * 4), *c = malloc(35 * 4), *e = malloc(60 * 4);
    for (int i = 0; i < 64 * 96; i++) a[i] = frand(&seed);
    for (int i = 0; i < 64; i++) b[i] = frand(&seed);
    for (int i = 0; i < 35; i++) c[i] = frand(&seed) * 3.0f;
    for (int i = 0; i < 60; i++) e[i] = frand(&seed);
    CHECK_OK(ctx, fq_st_writer_add(ctx, w, "blocks.0.proj.weight", FQ_F32, 2, s1, a, sizeof(float) * 64 * 96, 1));
    CHECK_OK(ctx, fq_st_writer_add(ctx, w, "blocks.0.proj.bias", FQ_F32, 1, s2, b, sizeof(float) * 64, 1));
    CHECK_OK(ctx, fq_st_writer_add(ctx, w, "odd.weight", FQ_F32, 2, s3, c, sizeof(float) * 35, 1));
    CHECK_OK(ctx, fq_st_writer_add(ctx, w, "embed.table", FQ_F32, 3, s4, e, sizeof(float) * 60, 1));
    char p[512];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    CHECK_OK(ctx, fq_st_writer_commit(ctx, w, p));
    fq_st_writer_free(w);
}

/* Relative L2 distance between a float tensor in two files. */
static double rel_err(fq_ctx *ctx, const char *fa, const char *fb, const char *name) {
    char pa[512], pb[512];
    snprintf(pa, sizeof pa, "%s/%s", g_dir, fa);
    snprintf(pb, sizeof pb, "%s/%s", g_dir, fb);
    fq_st_file *a = NULL, *b = NULL;
    double r = 1e9;
    if (fq_st_open(ctx, pa, &a) == FQ_OK && fq_st_open(ctx, pb, &b) == FQ_OK) {
        const fq_st_tensor *ta = fq_st_find(a, name), *tb = fq_st_find(b, name);
        if (ta && tb && ta->numel == tb->numel && ta->dtype == FQ_F32 && tb->dtype == FQ_F32) {
            double e = 0, n = 0;
            for (int64_t i = 0; i < ta->numel; i++) {
                float x, y;
                memcpy(&x, (const char *)ta->data + 4 * i, 4);
                memcpy(&y, (const char *)tb->data + 4 * i, 4);
                e += (double)(x - y) * (x - y);
                n += (double)x * x;
            }
            r = sqrt(e / n);
        }
    }
    fq_st_close(a);
    fq_st_close(b);
    return r;
}

int main(void) {
    g_bin = getenv("FLUXQ");
    if (!g_bin) {
        SKIP("FLUXQ is not set (run through tests/run.sh)");
        return check_summary("test_cli");
    }
    char abs_bin[4096];
    if (g_bin[0] != '/' && getcwd(abs_bin, sizeof abs_bin - strlen(g_bin) - 2)) {
        strcat(abs_bin, "/");
        strcat(abs_bin, g_bin);
        g_bin = abs_bin;
    }
    snprintf(g_dir, sizeof g_dir, "/tmp/fluxq-cli-XXXXXX");
    CHECK(mkdtemp(g_dir) != NULL, "mkdtemp");
    fq_ctx *ctx;
    fq_ctx_create(&ctx);

    /* help and usage errors */
    CHECK(fluxq("--help") == 0 && strstr(g_out, "quantize"), "--help: %s", g_out);
    const char *cmds[] = {"quantize", "dequantize", "inspect", "demo", "bench", "forward", "audit"};
    for (int i = 0; i < 7; i++) {
        char a[64];
        snprintf(a, sizeof a, "%s --help", cmds[i]);
        CHECK(fluxq(a) == 0 && strstr(g_out, "usage:"), "%s --help: %s", cmds[i], g_out);
    }
    CHECK(fluxq("frobnicate") == 2, "unknown command -> 2");
    CHECK(fluxq("quantize") == 2, "missing args -> 2: %s", g_out);
    CHECK(fluxq("quantize in.safetensors out.safetensors --blocksize 100") == 2, "bad blocksize -> 2");
    CHECK(strstr(g_out, "blocksize"), "message names blocksize: %s", g_out);
    CHECK(fluxq("quantize a b --type nf5") == 2, "bad type -> 2");
    CHECK(fluxq("quantize a b --device tpu:0") == 2, "bad device -> 2");
    CHECK(fluxq("inspect --bogus x") == 2, "unknown option -> 2");
    CHECK(fluxq("bench gemm-group --help") == 0 && strstr(g_out, "usage:"), "bench gemm-group --help: %s", g_out);
    CHECK(fluxq("bench gemm-group --shapes 4608x3072") == 2 && strstr(g_out, "MxNxKxG"),
          "bench gemm-group: a shape without K and G -> 2: %s", g_out);
    CHECK(fluxq("bench gemm-group --reps 0") == 2, "bench gemm-group --reps 0 -> 2: %s", g_out);
    CHECK(fluxq("bench frobnicate") == 2 && strstr(g_out, "gemm-group"), "unknown benchmark -> 2: %s", g_out);

    /* quantize -> inspect -> dequantize */
    write_input(ctx, "in.safetensors");
    CHECK(fluxq("quantize in.safetensors q.safetensors --device cpu --double-quant") == 0, "quantize: %s", g_out);
    CHECK(exists("q.safetensors") && temp_files() == 0, "output written, no temp files");
    CHECK(fluxq("inspect q.safetensors") == 0, "inspect: %s", g_out);
    CHECK(strstr(g_out, "blocks.0.proj.weight") && strstr(g_out, "nf4/bs64/dq<-f32") && strstr(g_out, "0 problem"),
          "inspect lists the 4-bit weight: %s", g_out);
    CHECK(fluxq("inspect q.safetensors --json") == 0, "inspect --json");
    cJSON *j = cJSON_Parse(g_out);
    cJSON *tot = j ? cJSON_GetObjectItem(j, "totals") : NULL;
    CHECK(tot && cJSON_GetObjectItem(tot, "quantized")->valuedouble == 2 &&
              cJSON_GetObjectItem(tot, "tensors")->valuedouble == 4,
          "json totals: %s", g_out);
    cJSON_Delete(j);
    CHECK(fluxq("dequantize q.safetensors d.safetensors --device cpu") == 0, "dequantize: %s", g_out);
    double e = rel_err(ctx, "in.safetensors", "d.safetensors", "blocks.0.proj.weight");
    CHECK(e > 0.01 && e < 0.15, "NF4 round trip error %.4f", e);
    CHECK(rel_err(ctx, "in.safetensors", "d.safetensors", "blocks.0.proj.bias") == 0.0, "bias copied exactly");
    CHECK(rel_err(ctx, "in.safetensors", "d.safetensors", "embed.table") == 0.0, "3-D tensor not quantized");

    /* --include / --exclude and fp4 */
    CHECK(fluxq("quantize in.safetensors f.safetensors --device cpu --type fp4 --blocksize 32 --include '*' "
                "--exclude 'blocks.*'") == 0, "include/exclude: %s", g_out);
    CHECK(fluxq("inspect f.safetensors --json") == 0, "inspect f");
    j = cJSON_Parse(g_out);
    tot = j ? cJSON_GetObjectItem(j, "totals") : NULL;
    CHECK(tot && cJSON_GetObjectItem(tot, "quantized")->valuedouble == 2, "odd.weight + embed.table: %s", g_out);
    cJSON_Delete(j);

    /* quantizing a quantized file keeps the 4-bit tensors byte for byte */
    CHECK(fluxq("quantize q.safetensors qq.safetensors --device cpu --type fp4") == 0, "requantize: %s", g_out);
    CHECK(strstr(g_out, "2 already 4-bit"), "kept: %s", g_out);
    {
        char pa[512], pb[512];
        snprintf(pa, sizeof pa, "%s/q.safetensors", g_dir);
        snprintf(pb, sizeof pb, "%s/qq.safetensors", g_dir);
        fq_st_file *a = NULL, *b = NULL;
        CHECK_OK(ctx, fq_st_open(ctx, pa, &a));
        CHECK_OK(ctx, fq_st_open(ctx, pb, &b));
        int same = a && b && fq_st_count(a) == fq_st_count(b);
        for (int64_t i = 0; same && i < fq_st_count(a); i++) {
            const fq_st_tensor *x = fq_st_get(a, i), *y = fq_st_find(b, x->name);
            same = y && x->nbytes == y->nbytes && memcmp(x->data, y->data, x->nbytes) == 0;
        }
        CHECK(same, "4-bit tensors unchanged by a second quantize");
        fq_st_close(a);
        fq_st_close(b);
    }

    /* bad input: truncated file, NaN absmax -> exit 1, a clear message, no output */
    {
        char p[512], t[512];
        snprintf(p, sizeof p, "%s/q.safetensors", g_dir);
        snprintf(t, sizeof t, "%s/trunc.safetensors", g_dir);
        FILE *f = fopen(p, "rb"), *g = fopen(t, "wb");
        char buf[1000];
        size_t n = fread(buf, 1, sizeof buf, f);
        fwrite(buf, 1, n, g);
        fclose(f);
        fclose(g);
    }
    CHECK(fluxq("dequantize trunc.safetensors out1.safetensors --device cpu") == 1, "truncated -> 1: %s", g_out);
    CHECK(strstr(g_out, "trunc.safetensors") != NULL, "message names the file: %s", g_out);
    CHECK(!exists("out1.safetensors") && temp_files() == 0, "no output left");
    CHECK(fluxq("inspect trunc.safetensors") == 1 && strstr(g_out, "problem"), "inspect truncated: %s", g_out);
    CHECK(fluxq("quantize missing.safetensors out2.safetensors --device cpu") == 1, "missing input -> 1");
    CHECK(!exists("out2.safetensors"), "no output for a missing input");
    {
        /* the same quantized file with one absmax entry set to NaN */
        char p[512];
        snprintf(p, sizeof p, "%s/q.safetensors", g_dir);
        fq_st_file *a = NULL;
        CHECK_OK(ctx, fq_st_open(ctx, p, &a));
        fq_st_writer *w;
        fq_st_writer_create(ctx, &w);
        for (int64_t i = 0; a && i < fq_st_count(a); i++) {
            const fq_st_tensor *x = fq_st_get(a, i);
            uint8_t *d = malloc(x->nbytes ? x->nbytes : 1);
            memcpy(d, x->data, x->nbytes);
            if (!strcmp(x->name, "blocks.0.proj.weight.nested_absmax")) {
                float nan = NAN;
                memcpy(d, &nan, 4);
            }
            fq_st_writer_add(ctx, w, x->name, x->dtype, x->ndim, x->shape, d, x->nbytes, 1);
        }
        snprintf(p, sizeof p, "%s/nan.safetensors", g_dir);
        CHECK_OK(ctx, fq_st_writer_commit(ctx, w, p));
        fq_st_writer_free(w);
        fq_st_close(a);
    }
    CHECK(fluxq("inspect nan.safetensors") == 1 && strstr(g_out, "nested_absmax"), "NaN found: %s", g_out);
    CHECK(fluxq("dequantize nan.safetensors out3.safetensors --device cpu") == 1, "NaN -> 1: %s", g_out);
    CHECK(!exists("out3.safetensors") && temp_files() == 0, "no output for NaN absmax");

    /* folder in, folder out: config.json gets quantization_config */
    {
        char p[512];
        snprintf(p, sizeof p, "%s/model", g_dir);
        mkdir(p, 0777);
        snprintf(p, sizeof p, "%s/model/config.json", g_dir);
        FILE *f = fopen(p, "w");
        fputs("{\"_class_name\": \"Toy\", \"num_layers\": 1}\n", f);
        fclose(f);
        char cmd[700];
        snprintf(cmd, sizeof cmd, "cp '%s/in.safetensors' '%s/model/diffusion_pytorch_model.safetensors'", g_dir, g_dir);
        CHECK(system(cmd) == 0, "cp");
    }
    CHECK(fluxq("quantize model model-nf4 --device cpu --exclude 'odd.*'") == 0, "folder quantize: %s", g_out);
    CHECK(exists("model-nf4/config.json") && exists("model-nf4/diffusion_pytorch_model.safetensors"), "folder out");
    {
        char p[512];
        snprintf(p, sizeof p, "%s/model-nf4/config.json", g_dir);
        char *buf = (char *)tf_read_all(p, NULL);
        if (!buf) buf = calloc(1, 1);
        CHECK(strstr(buf, "\"quant_method\": \"bitsandbytes\"") && strstr(buf, "\"bnb_4bit_quant_type\": \"nf4\"") &&
                  strstr(buf, "\"_class_name\": \"Toy\""),
              "config: %s", buf);
        CHECK(strstr(buf, "\"odd\""), "float linear weight listed in llm_int8_skip_modules: %s", buf);
        free(buf);
    }
    CHECK(fluxq("dequantize model-nf4 model-back --device cpu") == 0, "folder dequantize: %s", g_out);

    /* forward and audit on the tiny golden FLUX model (fixtures: tests/fixtures/flux) */
    {
        char root[4096], args[16384];
        if (!getcwd(root, sizeof root)) root[0] = '\0';
        snprintf(args, sizeof args, "forward --model '%s/tests/fixtures/flux/flux/model_fp32' --inputs "
                 "'%s/tests/fixtures/flux/flux/inputs.safetensors' --output fwd.safetensors --device cpu", root, root);
        CHECK(fluxq(args) == 0, "forward: %s", g_out);
        char p[512], q[4200];
        snprintf(p, sizeof p, "%s/fwd.safetensors", g_dir);
        snprintf(q, sizeof q, "%s/tests/fixtures/flux/flux/outputs.safetensors", root);
        fq_st_file *a = NULL, *b = NULL;
        CHECK_OK(ctx, fq_st_open(ctx, p, &a));
        CHECK_OK(ctx, fq_st_open(ctx, q, &b));
        const fq_st_tensor *y = a ? fq_st_find(a, "sample") : NULL, *r = b ? fq_st_find(b, "out.f64_cpu") : NULL;
        double e = 0, nn = 0;
        int same = y && r && y->numel == r->numel && y->dtype == FQ_F32 && r->dtype == FQ_F64;
        for (int64_t i = 0; same && i < y->numel; i++) {
            float v;
            double w;
            memcpy(&v, (const char *)y->data + 4 * i, 4);
            memcpy(&w, (const char *)r->data + 8 * i, 8);
            e += (v - w) * (v - w);
            nn += w * w;
        }
        CHECK(same && sqrt(e / nn) < 2e-5, "forward output vs float64 diffusers: rel L2 %.3g", same ? sqrt(e / nn) : -1.0);
        fq_st_close(a);
        fq_st_close(b);
        snprintf(args, sizeof args, "forward --model '%s/tests/fixtures/flux/flux/model_fp32' --inputs in.safetensors "
                 "--output fwd2.safetensors --device cpu", root);
        CHECK(fluxq(args) == 1 && strstr(g_out, "hidden_states") && !exists("fwd2.safetensors"),
              "forward with wrong inputs -> 1, names the input, no output: %s", g_out);
        snprintf(args, sizeof args, "audit --model '%s/tests/fixtures/flux/flux/model_nf4_dq' --quiet", root);
        CHECK(fluxq(args) == 0 && strstr(g_out, "every buffer is on cpu"), "audit: %s", g_out);
        CHECK(fluxq("forward --inputs a --output b") == 2, "forward without --model -> 2");
    }

    /* fluxq quantize of diffusers' bf16 folder writes the very bytes diffusers +
     * bitsandbytes saved for NF4, FP4 and NF4 with double quant */
    {
        static const struct { const char *args, *out, *ref; } k[] = {
            {"", "q-nf4", "model_nf4"}, {"--type fp4", "q-fp4", "model_fp4"}, {"--double-quant", "q-nf4dq", "model_nf4_dq"}};
        char root[4096];
        if (!getcwd(root, sizeof root)) root[0] = '\0';
        for (int i = 0; i < 3; i++) {
            char args[9000], a[9000], b[9000];
            snprintf(args, sizeof args, "quantize '%s/tests/fixtures/flux/flux/model_bf16' %s --device cpu --quiet %s", root,
                     k[i].out, k[i].args);
            CHECK(fluxq(args) == 0, "%s: %s", args, g_out);
            snprintf(a, sizeof a, "%s/%s/diffusion_pytorch_model.safetensors", g_dir, k[i].out);
            snprintf(b, sizeof b, "%s/tests/fixtures/flux/flux/%s/diffusion_pytorch_model.safetensors", root, k[i].ref);
            CHECK(tf_same_bytes(a, b), "%s: weights byte-identical to diffusers' %s", k[i].out, k[i].ref);
            /* the quantization_config is the one diffusers wrote */
            snprintf(a, sizeof a, "%s/%s/config.json", g_dir, k[i].out);
            snprintf(b, sizeof b, "%s/tests/fixtures/flux/flux/%s/config.json", root, k[i].ref);
            char *ta = (char *)tf_read_all(a, NULL), *tb = (char *)tf_read_all(b, NULL);
            cJSON *ja = ta ? cJSON_Parse(ta) : NULL, *jb = tb ? cJSON_Parse(tb) : NULL;
            free(ta);
            free(tb);
            CHECK(ja && jb && cJSON_Compare(cJSON_GetObjectItem(ja, "quantization_config"),
                                            cJSON_GetObjectItem(jb, "quantization_config"), 1),
                  "%s: quantization_config as diffusers wrote it", k[i].out);
            cJSON_Delete(ja);
            cJSON_Delete(jb);
        }
    }

    /* the demo runs on the CPU */
    CHECK(fluxq("demo --device cpu") == 0 && strstr(g_out, "same bytes: yes"), "demo: %s", g_out);

    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    fq_ctx_free(ctx);
    return check_summary("test_cli");
}

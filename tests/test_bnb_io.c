/* bitsandbytes serialization: byte-identical round trips of files bitsandbytes
 * and diffusers wrote, bad quant states and members, Python float repr, and
 * the diffusers config.json quantization_config. */
#include "check.h"
#include "support/files.h"
#include "core/core.h"
#include "io/bnb_io.h"
#include "io/json_util.h"
#include "io/model_config.h"
#include "io/safetensors.h"

#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FIX "tests/fixtures/io/"

static char g_dir[64];

static const char *tmp_path(const char *name) {
    static char buf[8][256];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", g_dir, name);
    return buf[k];
}

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

/* ---- Python float repr -------------------------------------------------------------- */

static void test_float_repr(void) {
    struct { double v; const char *want; } c[] = {
        {0.1, "0.1"},
        {1e-05, "1e-05"},
        {1.5e-05, "1.5e-05"},
        {0.3251224756240845, "0.3251224756240845"},
        {1e16, "1e+16"},
        {123456789.0, "123456789.0"},
        {0.011669921875, "0.011669921875"},
        {0.0001, "0.0001"},
        {9999999999999998.0, "9999999999999998.0"},
        {6.0, "6.0"},
        {-2.5, "-2.5"},
        {0.0, "0.0"},
        {-0.0, "-0.0"},
        {1e22, "1e+22"},
        {5e-324, "5e-324"},
        {1.7976931348623157e308, "1.7976931348623157e+308"},
        {(double)0.3f, "0.30000001192092896"},
        {1.0 / 3.0, "0.3333333333333333"},
        {2.0e-7, "2e-07"},
        {1e100, "1e+100"},
        {NAN, "NaN"},
        {-INFINITY, "-Infinity"},
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        char buf[32];
        int n = fq_py_float_repr(c[i].v, buf, sizeof buf);
        CHECK(!strcmp(buf, c[i].want) && n == (int)strlen(c[i].want), "repr(%.17g) = %s, want %s", c[i].v, buf,
              c[i].want);
    }
}

/* ---- golden round trips --------------------------------------------------------------- */

/* Loads every quantized weight of src onto the CPU, writes it back together
 * with the other tensors and the metadata, and compares the whole file. */
static void roundtrip_file(fq_ctx *ctx, const char *src, int want_quantized) {
    fq_st_set *set = NULL;
    CHECK_OK(ctx, fq_st_set_open(ctx, src, &set));
    if (!set) return;
    fq_st_writer *w = NULL;
    CHECK_OK(ctx, fq_st_writer_create(ctx, &w));
    const fq_st_file *f = fq_st_set_file(set, 0);
    for (int64_t i = 0; i < fq_st_metadata_count(f); i++) {
        const char *k, *v;
        fq_st_metadata_get(f, i, &k, &v);
        CHECK_OK(ctx, fq_st_writer_set_metadata(ctx, w, k, v));
    }
    int nq = 0;
    char P[512];
    for (int64_t i = 0; i < fq_st_set_count(set); i++) {
        const fq_st_tensor *t = fq_st_set_get(set, i);
        if (!fq_bnb_owner(set, t->name, P, sizeof P)) {
            CHECK_OK(ctx, fq_st_writer_add(ctx, w, t->name, t->dtype, t->ndim, t->shape, t->data, t->nbytes, 0));
            continue;
        }
        if (strcmp(t->name, P) != 0) continue; /* a member: handled with P */
        fq_qtensor *q = NULL;
        CHECK_OK(ctx, fq_bnb_load(ctx, set, P, FQ_CPU, &q));
        if (!q) continue;
        nq++;
        CHECK(!strcmp(fq_qtensor_name(q), P), "named %s", fq_qtensor_name(q));
        CHECK_OK(ctx, fq_bnb_write(ctx, w, P, q));
        fq_qtensor_free(q);
    }
    CHECK(nq == want_quantized, "%s: %d quantized weights, want %d", src, nq, want_quantized);
    const char *out = tmp_path("roundtrip.safetensors");
    CHECK_OK(ctx, fq_st_writer_commit(ctx, w, out));
    fq_st_writer_free(w);
    /* Every tensor (the JSON strings included) and then the whole file match. */
    fq_st_file *g = NULL;
    CHECK_OK(ctx, fq_st_open(ctx, out, &g));
    for (int64_t i = 0; g && i < fq_st_set_count(set); i++) {
        const fq_st_tensor *a = fq_st_set_get(set, i), *b = fq_st_find(g, a->name);
        CHECK(b && b->dtype == a->dtype && b->ndim == a->ndim && b->nbytes == a->nbytes &&
                  !memcmp(a->shape, b->shape, sizeof a->shape) && !memcmp(a->data, b->data, a->nbytes),
              "%s: tensor %s identical", src, a->name);
        if (b && strstr(a->name, ".quant_state.") && b->nbytes == a->nbytes)
            CHECK(!memcmp(a->data, b->data, a->nbytes), "JSON %.*s", (int)b->nbytes, (const char *)b->data);
    }
    CHECK(g && fq_st_count(g) == fq_st_set_count(set), "same tensor count");
    fq_st_close(g);
    size_t na = 0, nb = 0;
    unsigned char *a = tf_read_all(src, &na), *b = tf_read_all(out, &nb);
    CHECK(a && b && na == nb && !memcmp(a, b, na), "%s: whole file byte-identical (%zu vs %zu)", src, na, nb);
    free(a);
    free(b);
    fq_st_set_close(set);
}

static void test_golden(fq_ctx *ctx) {
    fq_st_set *set = NULL;
    CHECK_OK(ctx, fq_st_set_open(ctx, FIX "linear4bit_nf4_dq.state_dict.safetensors", &set));
    if (set) {
        fq_quant_type t;
        char P[64];
        CHECK(fq_bnb_is_quantized(set, "weight", &t) && t == FQ_QUANT_NF4, "weight is nf4");
        CHECK(!fq_bnb_is_quantized(set, "bias", NULL), "bias is not");
        CHECK(fq_bnb_owner(set, "weight.nested_absmax", P, sizeof P) && !strcmp(P, "weight"), "owner");
        CHECK(fq_bnb_owner(set, "weight.quant_state.bitsandbytes__nf4", P, sizeof P) && !strcmp(P, "weight"),
              "owner of the state");
        CHECK(!fq_bnb_owner(set, "bias", P, sizeof P), "bias has no owner");
        fq_qtensor *q = NULL;
        CHECK_OK(ctx, fq_bnb_load(ctx, set, "weight", FQ_CPU, &q));
        if (q) {
            fq_qtensor_info in;
            fq_qtensor_get_info(q, &in);
            CHECK(in.type == FQ_QUANT_NF4 && in.blocksize == 64 && in.double_quant && in.orig_dtype == FQ_F32 &&
                      in.ndim == 2 && in.shape[0] == 40 && in.shape[1] == 64 && in.nblocks == 40 &&
                      in.nested_nblocks == 1 && (double)in.offset == 0.3251224756240845,
                  "info");
            fq_qtensor_free(q);
        }
        fq_bnb_load(ctx, set, "bias", FQ_CPU, &q);
        CHECK(strstr(fq_ctx_error(ctx), "'bias' is not a bitsandbytes"), "bias: %s", fq_ctx_error(ctx));
        fq_st_set_close(set);
    }
    roundtrip_file(ctx, FIX "linear4bit_fp4.state_dict.safetensors", 1);
    roundtrip_file(ctx, FIX "linear4bit_nf4_dq.state_dict.safetensors", 1);
    roundtrip_file(ctx, FIX "flux_nf4_dq.safetensors", 56);
}

/* A header whose length is not a multiple of 4 leaves every f32 member
 * unaligned in the mapping; loading must still work (and be UBSan-clean). */
static void test_unaligned(fq_ctx *ctx) {
    size_t n = 0;
    unsigned char *b = tf_read_all(FIX "linear4bit_fp4.state_dict.safetensors", &n);
    uint64_t hlen = 0;
    for (int i = 7; b && i >= 0; i--) hlen = (hlen << 8) | b[i];
    CHECK(b && b[8 + hlen - 1] == ' ', "the fixture's header has padding to remove");
    if (!b || b[8 + hlen - 1] != ' ') { free(b); return; }
    hlen -= 1;
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(hlen >> (8 * i));
    memmove(b + 8 + hlen, b + 8 + hlen + 1, n - 8 - hlen - 1);
    const char *p = tmp_path("unaligned.safetensors");
    FILE *f = fopen(p, "wb");
    fwrite(b, 1, n - 1, f);
    fclose(f);
    free(b);
    fq_st_set *set = NULL;
    CHECK_OK(ctx, fq_st_set_open(ctx, p, &set));
    if (!set) return;
    const fq_st_tensor *am = fq_st_set_find(set, "weight.absmax");
    CHECK(am && (uintptr_t)am->data % 4 != 0, "absmax really is unaligned");
    fq_qtensor *q = NULL;
    CHECK_OK(ctx, fq_bnb_load(ctx, set, "weight", FQ_CPU, &q));
    if (q && am) {
        float back[40];
        CHECK_OK(ctx, fq_qtensor_member_to_host(ctx, q, FQ_QMEMBER_ABSMAX, back));
        CHECK(!memcmp(back, am->data, sizeof back), "unaligned absmax loaded");
    }
    fq_qtensor_free(q);
    fq_st_set_close(set);
}

/* ---- bad quant states -------------------------------------------------------------- */

static void test_bad_states(fq_ctx *ctx) {
    const char *K = "blocks.0.w.quant_state.bitsandbytes__nf4";
    struct { const char *label, *json; fq_status want; const char *needle; } c[] = {
        {"not JSON", "{quant_type: nf4}", FQ_ERR_FORMAT, "invalid JSON"},
        {"not an object", "[1, 2]", FQ_ERR_FORMAT, "not a JSON object"},
        {"missing blocksize", "{\"quant_type\": \"nf4\", \"dtype\": \"float32\", \"shape\": [4]}", FQ_ERR_FORMAT,
         "lacks 'blocksize'"},
        {"unknown key",
         "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [4], \"foo\": 1}",
         FQ_ERR_FORMAT, "unknown key 'foo'"},
        {"blocksize string", "{\"quant_type\": \"nf4\", \"blocksize\": \"64\", \"dtype\": \"float32\", \"shape\": [4]}",
         FQ_ERR_FORMAT, "'blocksize'"},
        {"blocksize 48", "{\"quant_type\": \"nf4\", \"blocksize\": 48, \"dtype\": \"float32\", \"shape\": [4]}",
         FQ_ERR_FORMAT, "blocksize 48"},
        {"blocksize 64.5", "{\"quant_type\": \"nf4\", \"blocksize\": 64.5, \"dtype\": \"float32\", \"shape\": [4]}",
         FQ_ERR_FORMAT, "'blocksize'"},
        {"type mismatch", "{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [4]}",
         FQ_ERR_FORMAT, "does not match"},
        {"bad quant_type", "{\"quant_type\": \"int4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [4]}",
         FQ_ERR_FORMAT, "'quant_type'"},
        {"bad dtype", "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"int8\", \"shape\": [4]}",
         FQ_ERR_FORMAT, "'dtype'"},
        {"negative dim", "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [4, -1]}",
         FQ_ERR_FORMAT, "'shape'"},
        {"shape not list", "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": 4}",
         FQ_ERR_FORMAT, "'shape'"},
        {"partial nested",
         "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [4], \"nested_blocksize\": 256}",
         FQ_ERR_FORMAT, "only some"},
        {"nested blocksize",
         "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [4], \"nested_blocksize\": "
         "128, \"nested_dtype\": \"float32\", \"nested_offset\": 0.5}",
         FQ_ERR_FORMAT, "'nested_blocksize'"},
        {"NaN offset",
         "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [4], \"nested_blocksize\": "
         "256, \"nested_dtype\": \"float32\", \"nested_offset\": NaN}",
         FQ_ERR_FORMAT, "invalid JSON"},
        {"huge offset",
         "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [4], \"nested_blocksize\": "
         "256, \"nested_dtype\": \"float32\", \"nested_offset\": 1e39}",
         FQ_ERR_NONFINITE, "nested_offset"},
        {"offset string",
         "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [4], \"nested_blocksize\": "
         "256, \"nested_dtype\": \"float32\", \"nested_offset\": \"0.5\"}",
         FQ_ERR_FORMAT, "'nested_offset'"},
        {"duplicate key",
         "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [4]}",
         FQ_ERR_FORMAT, "duplicate key"},
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        fq_bnb_state st;
        fq_status s = fq_bnb_state_parse(ctx, K, c[i].json, strlen(c[i].json), &st);
        const char *m = fq_ctx_error(ctx);
        CHECK(s == c[i].want, "%s: %s (%s)", c[i].label, fq_status_str(s), m);
        CHECK(strstr(m, K) != NULL, "%s: names the key: %s", c[i].label, m);
        CHECK(strstr(m, c[i].needle) != NULL, "%s: says '%s': %s", c[i].label, c[i].needle, m);
    }
    /* A good one, and its exact re-serialization. */
    const char *good = "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [3072, 3072], "
                       "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.011669921875}";
    fq_bnb_state st;
    CHECK_OK(ctx, fq_bnb_state_parse(ctx, K, good, strlen(good), &st));
    char *js = NULL;
    size_t n = 0;
    CHECK_OK(ctx, fq_bnb_state_format(ctx, &st, &js, &n));
    CHECK(js && n == strlen(good) && !strcmp(js, good), "format: %s", js ? js : "");
    free(js);
    st.nested = 0;
    st.shape[0] = 7;
    st.ndim = 1;
    st.dtype = FQ_F16;
    CHECK_OK(ctx, fq_bnb_state_format(ctx, &st, &js, &n));
    CHECK(js && !strcmp(js, "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float16\", \"shape\": [7]}"),
          "format plain: %s", js ? js : "");
    free(js);
}

/* ---- bad members: files made from the golden ones with one tensor changed -------------- */

/* Copies src to dst, dropping `drop` and adding `add` (if not NULL). */
static void make_variant(fq_ctx *ctx, const char *src, const char *dst, const char *drop, const char *add,
                         fq_dtype dt, int64_t n, const void *data) {
    fq_st_file *f = NULL;
    fq_st_writer *w = NULL;
    CHECK_OK(ctx, fq_st_open(ctx, src, &f));
    CHECK_OK(ctx, fq_st_writer_create(ctx, &w));
    if (!f || !w) return;
    for (int64_t i = 0; i < fq_st_count(f); i++) {
        const fq_st_tensor *t = fq_st_get(f, i);
        if (drop && !strcmp(t->name, drop)) continue;
        CHECK_OK(ctx, fq_st_writer_add(ctx, w, t->name, t->dtype, t->ndim, t->shape, t->data, t->nbytes, 0));
    }
    if (add) CHECK_OK(ctx, fq_st_writer_add_copy(ctx, w, add, dt, 1, &n, data, (size_t)n * fq_dtype_size(dt)));
    CHECK_OK(ctx, fq_st_writer_commit(ctx, w, dst));
    fq_st_writer_free(w);
    fq_st_close(f);
}

static void expect_load_fails(fq_ctx *ctx, const char *label, const char *path, fq_status want,
                              const char *key) {
    fq_st_set *set = NULL;
    CHECK_OK(ctx, fq_st_set_open(ctx, path, &set));
    if (!set) return;
    fq_qtensor *q = NULL;
    fq_status s = fq_bnb_load(ctx, set, "weight", FQ_CPU, &q);
    CHECK(s == want && q == NULL, "%s: %s (%s)", label, fq_status_str(s), fq_ctx_error(ctx));
    CHECK(strstr(fq_ctx_error(ctx), key) != NULL, "%s: names '%s': %s", label, key, fq_ctx_error(ctx));
    fq_qtensor_free(q);
    fq_st_set_close(set);
}

static void test_bad_members(fq_ctx *ctx) {
    const char *fp4 = FIX "linear4bit_fp4.state_dict.safetensors", *dq = FIX "linear4bit_nf4_dq.state_dict.safetensors";
    const char *p = tmp_path("variant.safetensors");
    float absmax[41];
    for (int i = 0; i < 41; i++) absmax[i] = 0.5f;
    make_variant(ctx, fp4, p, "weight.absmax", "weight.absmax", FQ_F32, 39, absmax);
    expect_load_fails(ctx, "short absmax", p, FQ_ERR_FORMAT, "'weight.absmax': 39 elements, expected 40");
    make_variant(ctx, fp4, p, "weight.absmax", "weight.absmax", FQ_F32, 41, absmax);
    expect_load_fails(ctx, "long absmax", p, FQ_ERR_FORMAT, "'weight.absmax'");
    absmax[17] = NAN;
    make_variant(ctx, fp4, p, "weight.absmax", "weight.absmax", FQ_F32, 40, absmax);
    expect_load_fails(ctx, "NaN absmax", p, FQ_ERR_NONFINITE, "'weight.absmax': element 17");
    absmax[17] = INFINITY;
    make_variant(ctx, fp4, p, "weight.absmax", "weight.absmax", FQ_F32, 40, absmax);
    expect_load_fails(ctx, "Inf absmax", p, FQ_ERR_NONFINITE, "'weight.absmax'");
    unsigned char codes[40] = {0};
    make_variant(ctx, fp4, p, "weight.absmax", "weight.absmax", FQ_U8, 40, codes);
    expect_load_fails(ctx, "u8 absmax without double quant", p, FQ_ERR_FORMAT, "'weight.absmax': dtype U8");
    make_variant(ctx, fp4, p, "weight.quant_map", NULL, FQ_F32, 0, NULL);
    expect_load_fails(ctx, "missing quant_map", p, FQ_ERR_FORMAT, "'weight.quant_map': missing");
    float qm[16] = {0};
    make_variant(ctx, fp4, p, "weight.quant_map", "weight.quant_map", FQ_F32, 16, qm);
    expect_load_fails(ctx, "custom quant_map", p, FQ_ERR_UNSUPPORTED, "'weight.quant_map'");
    float nest[1] = {NAN};
    make_variant(ctx, fp4, p, NULL, "weight.nested_absmax", FQ_F32, 1, nest);
    expect_load_fails(ctx, "stray nested key", p, FQ_ERR_FORMAT, "'weight.nested_absmax': present");
    make_variant(ctx, dq, p, "weight.nested_absmax", "weight.nested_absmax", FQ_F32, 1, nest);
    expect_load_fails(ctx, "NaN nested_absmax", p, FQ_ERR_NONFINITE, "'weight.nested_absmax'");
    make_variant(ctx, dq, p, "weight.nested_quant_map", NULL, FQ_F32, 0, NULL);
    expect_load_fails(ctx, "missing nested_quant_map", p, FQ_ERR_FORMAT, "'weight.nested_quant_map'");
    make_variant(ctx, dq, p, "weight", "weight", FQ_U8, 40, codes);
    expect_load_fails(ctx, "short packed", p, FQ_ERR_FORMAT, "'weight': 40 elements, expected 1280");
    const char *js = "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [40, 64], "
                     "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": Infinity}";
    make_variant(ctx, dq, p, "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__nf4", FQ_U8,
                 (int64_t)strlen(js), js);
    expect_load_fails(ctx, "Inf offset", p, FQ_ERR_FORMAT, "weight.quant_state.bitsandbytes__nf4");
    js = "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [40, 64]}";
    make_variant(ctx, fp4, p, NULL, "weight.quant_state.bitsandbytes__nf4", FQ_U8, (int64_t)strlen(js), js);
    expect_load_fails(ctx, "both nf4 and fp4", p, FQ_ERR_FORMAT, "both");
    js = "{\"quant_type\": \"fp4\", \"blocksize\": 128, \"dtype\": \"float32\", \"shape\": [40, 64]}";
    make_variant(ctx, fp4, p, "weight.quant_state.bitsandbytes__fp4", "weight.quant_state.bitsandbytes__fp4", FQ_U8,
                 (int64_t)strlen(js), js);
    expect_load_fails(ctx, "blocksize disagrees with absmax", p, FQ_ERR_FORMAT, "'weight.absmax': 40 elements, expected 20");
}

/* ---- config.json ------------------------------------------------------------------------ */

static char *config_string(fq_ctx *ctx, const cJSON *cfg) {
    char *s = NULL;
    CHECK_OK(ctx, fq_config_to_string(ctx, cfg, &s, NULL));
    return s;
}

static void test_config(fq_ctx *ctx) {
    struct { const char *file; fq_quant_type t; int dq; } g[] = {
        {FIX "config_nf4.json", FQ_QUANT_NF4, 0},
        {FIX "config_nf4_dq.json", FQ_QUANT_NF4, 1},
        {FIX "config_fp4.json", FQ_QUANT_FP4, 0},
    };
    for (size_t i = 0; i < 3; i++) {
        cJSON *cfg = NULL;
        CHECK_OK(ctx, fq_config_read(ctx, g[i].file, &cfg));
        if (!cfg) continue;
        size_t n = 0;
        unsigned char *orig = tf_read_all(g[i].file, &n);
        char *s = config_string(ctx, cfg);
        CHECK(s && orig && !strcmp(s, (char *)orig), "%s re-serialized byte-identical:\n%s", g[i].file, s ? s : "");
        free(s);
        int present = 0;
        fq_bnb_config qc = {0};
        CHECK_OK(ctx, fq_config_get_bnb(ctx, cfg, &present, &qc));
        CHECK(present && qc.quant_type == g[i].t && qc.double_quant == g[i].dq && qc.compute_dtype == FQ_BF16 &&
                  qc.nskip == 0,
              "%s: parsed settings", g[i].file);
        /* Rebuilt from the settings alone, quantization_config is the same. */
        cJSON_DeleteItemFromObjectCaseSensitive(cfg, "quantization_config");
        CHECK_OK(ctx, fq_config_set_bnb(ctx, cfg, &qc));
        const char *out = tmp_path("config.json");
        CHECK_OK(ctx, fq_config_write(ctx, out, cfg));
        size_t m = 0;
        unsigned char *back = tf_read_all(out, &m);
        CHECK(back && orig && m == n && !memcmp(back, orig, n), "%s: written config byte-identical", g[i].file);
        free(back);
        free(orig);
        fq_bnb_config_clear(&qc);
        cJSON_Delete(cfg);
    }

    /* An unquantized config gains the section; replacing it keeps one. */
    cJSON *cfg = NULL, *ref = NULL;
    CHECK_OK(ctx, fq_config_read(ctx, FIX "config_fp32.json", &cfg));
    CHECK_OK(ctx, fq_config_read(ctx, FIX "config_nf4.json", &ref));
    if (cfg && ref) {
        int present = 1;
        fq_bnb_config qc = {.quant_type = FQ_QUANT_FP4, .compute_dtype = FQ_F32};
        CHECK_OK(ctx, fq_config_get_bnb(ctx, cfg, &present, &qc));
        CHECK(!present, "fp32 config has no quantization_config");
        CHECK_OK(ctx, fq_config_set_bnb(ctx, cfg, &qc)); /* first fp4, then replaced by nf4 */
        qc.quant_type = FQ_QUANT_NF4;
        qc.compute_dtype = FQ_BF16;
        CHECK_OK(ctx, fq_config_set_bnb(ctx, cfg, &qc));
        cJSON_DeleteItemFromObjectCaseSensitive(ref, "_name_or_path");
        char *a = config_string(ctx, cfg), *b = config_string(ctx, ref);
        CHECK(a && b && !strcmp(a, b), "fp32 + nf4 settings == the diffusers nf4 config:\n%s\n%s", a, b);
        free(a);
        free(b);
        /* Skip modules survive a round trip. */
        char *mods[2] = {"proj_out", "x_embedder"};
        qc.skip_modules = mods;
        qc.nskip = 2;
        CHECK_OK(ctx, fq_config_set_bnb(ctx, cfg, &qc));
        fq_bnb_config back = {0};
        CHECK_OK(ctx, fq_config_get_bnb(ctx, cfg, &present, &back));
        CHECK(present && back.nskip == 2 && !strcmp(back.skip_modules[1], "x_embedder"), "skip modules");
        fq_bnb_config_clear(&back);
        /* A failed write leaves nothing. */
        fq_status s = fq_config_write(ctx, tmp_path("missing/config.json"), cfg);
        CHECK(s == FQ_ERR_IO && access(tmp_path("missing/config.json"), F_OK) != 0, "write into a missing folder");
    }
    cJSON_Delete(cfg);
    cJSON_Delete(ref);

    /* Unsupported or malformed sections. */
    struct { const char *json; fq_status want; const char *needle; } bad[] = {
        {"{\"quantization_config\": {\"quant_method\": \"gguf\"}}", FQ_ERR_UNSUPPORTED, "gguf"},
        {"{\"quantization_config\": {\"quant_method\": \"bitsandbytes\", \"load_in_8bit\": true}}", FQ_ERR_UNSUPPORTED,
         "8-bit"},
        {"{\"quantization_config\": {\"quant_method\": \"bitsandbytes\", \"load_in_4bit\": true, "
         "\"bnb_4bit_quant_type\": \"int4\"}}",
         FQ_ERR_FORMAT, "bnb_4bit_quant_type"},
        {"{\"quantization_config\": {\"load_in_4bit\": true, \"bnb_4bit_compute_dtype\": \"int8\"}}", FQ_ERR_FORMAT,
         "compute_dtype"},
        {"{\"quantization_config\": {\"load_in_4bit\": true, \"llm_int8_skip_modules\": [1]}}", FQ_ERR_FORMAT,
         "skip_modules"},
        {"{\"quantization_config\": 5}", FQ_ERR_FORMAT, "not an object"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cJSON *c = NULL;
        CHECK_OK(ctx, fq_json_parse(ctx, "test", bad[i].json, strlen(bad[i].json), &c));
        if (!c) continue;
        int present = 0;
        fq_bnb_config qc = {0};
        fq_status s = fq_config_get_bnb(ctx, c, &present, &qc);
        CHECK(s == bad[i].want && strstr(fq_ctx_error(ctx), bad[i].needle), "bad config %zu: %s (%s)", i,
              fq_status_str(s), fq_ctx_error(ctx));
        cJSON_Delete(c);
    }

    /* Python-style output: floats, ints, unicode, empty containers, key order. */
    const char *in = "{\"b\": [1.0, 1e-06, 100, -0, 12345678901234567890, 2.50], \"a\": \"\xc3\xa9\xf0\x9f\x98\x80/\\\"\", "
                     "\"c\": {}, \"d\": [], \"e\": null}";
    cJSON *c = NULL;
    CHECK_OK(ctx, fq_json_parse(ctx, "test", in, strlen(in), &c));
    char *s = NULL;
    if (c) CHECK_OK(ctx, fq_json_dump_py(ctx, c, -1, 1, &s, NULL));
    const char *want = "{\"a\": \"\\u00e9\\ud83d\\ude00/\\\"\", \"b\": [1.0, 1e-06, 100, 0, 12345678901234567890, 2.5], "
                       "\"c\": {}, \"d\": [], \"e\": null}";
    CHECK(s && !strcmp(s, want), "dumps: %s", s ? s : "");
    free(s);
    cJSON_Delete(c);
}

int main(void) {
    fq_ctx *ctx;
    if (fq_ctx_create(&ctx) != FQ_OK) return 1;
    snprintf(g_dir, sizeof g_dir, "/tmp/fluxq_bnb_XXXXXX");
    if (!mkdtemp(g_dir)) { perror("mkdtemp"); return 1; }

    test_float_repr();
    test_golden(ctx);
    test_unaligned(ctx);
    test_bad_states(ctx);
    test_bad_members(ctx);
    test_config(ctx);

    nftw(g_dir, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    fq_ctx_free(ctx);
    return check_summary("test_bnb_io");
}

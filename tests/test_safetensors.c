/* safetensors: header validation against corrupt/lying files, sharded sets,
 * the writer (every dtype, the reference byte layout, failed commits). */
#include "check.h"
#include "support/files.h"
#include "core/core.h"
#include "io/safetensors.h"

#include <dirent.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char g_dir[64];

static const char *tmp_path(const char *name) {
    static char buf[8][256];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", g_dir, name);
    return buf[k];
}

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(2); }
    if (n) fwrite(p, 1, n, f);
    fclose(f);
}

/* A file: 8-byte length (hlen_field), header text, then dlen bytes of data. */
static void write_st(const char *path, uint64_t hlen_field, const char *hdr, size_t dlen) {
    size_t hl = strlen(hdr);
    unsigned char *b = calloc(1, 8 + hl + dlen + 1);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(hlen_field >> (8 * i));
    memcpy(b + 8, hdr, hl);
    for (size_t i = 0; i < dlen; i++) b[8 + hl + i] = (unsigned char)i;
    write_bytes(path, b, 8 + hl + dlen);
    free(b);
}

static void write_st_hdr(const char *path, const char *hdr, size_t dlen) {
    write_st(path, strlen(hdr), hdr, dlen);
}

static int exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0;
}

/* Files in the temp dir whose name contains ".tmp." */
static int count_temp_files(void) {
    DIR *d = opendir(g_dir);
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d));)
        if (strstr(e->d_name, ".tmp.")) n++;
    if (d) closedir(d);
    return n;
}

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

/* Opening must fail with status `want` and a message holding every needle. */
static void expect_bad(fq_ctx *ctx, const char *label, const char *path, fq_status want, const char *n1,
                       const char *n2) {
    fq_st_file *f = NULL;
    fq_status s = fq_st_open(ctx, path, &f);
    const char *m = fq_ctx_error(ctx);
    CHECK(s == want, "%s: got %s (%s), want %s", label, fq_status_str(s), m, fq_status_str(want));
    CHECK(f == NULL, "%s: no handle on failure", label);
    CHECK(strstr(m, path) != NULL, "%s: message names the file: %s", label, m);
    if (n1) CHECK(strstr(m, n1) != NULL, "%s: message has '%s': %s", label, n1, m);
    if (n2) CHECK(strstr(m, n2) != NULL, "%s: message has '%s': %s", label, n2, m);
    fq_st_close(f);
}

static void test_bad_headers(fq_ctx *ctx) {
    const char *p = tmp_path("bad.safetensors");
    write_bytes(p, "\x10\0\0", 3);
    expect_bad(ctx, "3-byte file", p, FQ_ERR_FORMAT, "too short", NULL);
    write_st(p, 1000, "{}", 16);
    expect_bad(ctx, "length > file", p, FQ_ERR_FORMAT, "larger than the file", NULL);
    write_st(p, (uint64_t)200000000, "{}", 16);
    expect_bad(ctx, "length > 100 MB", p, FQ_ERR_FORMAT, "exceeds the limit", NULL);
    write_st(p, UINT64_MAX, "{}", 16);
    expect_bad(ctx, "length 2^64-1", p, FQ_ERR_FORMAT, "exceeds the limit", NULL);
    write_st_hdr(p, "{not json}", 0);
    expect_bad(ctx, "non-JSON", p, FQ_ERR_FORMAT, "invalid JSON", NULL);
    write_st_hdr(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", 4);
    expect_bad(ctx, "unterminated", p, FQ_ERR_FORMAT, "JSON", NULL);
    write_st_hdr(p, "{\"\xff\":1}", 0);
    expect_bad(ctx, "bad UTF-8", p, FQ_ERR_FORMAT, "UTF-8", NULL);
    write_st_hdr(p, "[1,2]   ", 0);
    expect_bad(ctx, "array header", p, FQ_ERR_FORMAT, "not a JSON object", NULL);
    write_st_hdr(p, "{} x", 0);
    expect_bad(ctx, "trailing junk", p, FQ_ERR_FORMAT, "after the JSON", NULL);
    write_st_hdr(p, "{\"a\x01\":{}}", 0);
    expect_bad(ctx, "control char", p, FQ_ERR_FORMAT, "control character", NULL);
    write_st_hdr(p, "{\"a\":{\"dtype\":\"F7\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4);
    expect_bad(ctx, "unknown dtype", p, FQ_ERR_FORMAT, "'F7'", "'a'");
    write_st_hdr(p, "{\"a\":{\"dtype\":\"U32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4);
    expect_bad(ctx, "unsupported dtype", p, FQ_ERR_UNSUPPORTED, "'U32'", "'a'");
    write_st_hdr(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4);
    expect_bad(ctx, "negative shape", p, FQ_ERR_FORMAT, "shape[0]", "'w'");
    write_st_hdr(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4);
    expect_bad(ctx, "fractional shape", p, FQ_ERR_FORMAT, "shape[0]", "'w'");
    write_st_hdr(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[\"4\"],\"data_offsets\":[0,4]}}", 4);
    expect_bad(ctx, "string shape", p, FQ_ERR_FORMAT, "shape[0]", "'w'");
    write_st_hdr(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4);
    expect_bad(ctx, "rank 9", p, FQ_ERR_UNSUPPORTED, "rank 9", "'w'");
    write_st_hdr(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,4],\"data_offsets\":[0,4]}}", 4);
    expect_bad(ctx, "numel overflow", p, FQ_ERR_FORMAT, "overflows", "'w'");
    write_st_hdr(p, "{\"w\":{\"dtype\":\"F64\",\"shape\":[2305843009213693952],\"data_offsets\":[0,4]}}", 4);
    expect_bad(ctx, "nbytes overflow", p, FQ_ERR_FORMAT, "overflows", "'w'");
    write_st_hdr(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[99999999999999999999],\"data_offsets\":[0,4]}}", 4);
    expect_bad(ctx, "dim beyond int64", p, FQ_ERR_FORMAT, "shape[0]", "'w'");
    write_st_hdr(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8);
    expect_bad(ctx, "offsets out of range (truncated data)", p, FQ_ERR_FORMAT, "out of range", "'w'");
    write_st_hdr(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 8);
    expect_bad(ctx, "begin > end", p, FQ_ERR_FORMAT, "begin > end", "'w'");
    write_st_hdr(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 8);
    expect_bad(ctx, "negative offset", p, FQ_ERR_FORMAT, "data_offsets", "'w'");
    write_st_hdr(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8);
    expect_bad(ctx, "3 offsets", p, FQ_ERR_FORMAT, "data_offsets", "'w'");
    write_st_hdr(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 16);
    expect_bad(ctx, "size != numel*itemsize", p, FQ_ERR_FORMAT, "need 12", "'w'");
    write_st_hdr(p,
                 "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                 "\"y\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[6,10]}}",
                 16);
    expect_bad(ctx, "overlap", p, FQ_ERR_FORMAT, "'y' overlaps tensor 'x'", NULL);
    write_st_hdr(p,
                 "{\"x\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                 "\"y\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[4,6]}}",
                 16);
    expect_bad(ctx, "nested overlap", p, FQ_ERR_FORMAT, "overlaps", "'x'");
    write_st_hdr(p,
                 "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                 "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
                 2);
    expect_bad(ctx, "duplicate key", p, FQ_ERR_FORMAT, "duplicate key 'a'", NULL);
    write_st_hdr(p, "{\"__metadata__\":{\"k\":1}}", 0);
    expect_bad(ctx, "metadata non-string", p, FQ_ERR_FORMAT, "__metadata__", "'k'");
    write_st_hdr(p, "{\"__metadata__\":[]}", 0);
    expect_bad(ctx, "metadata array", p, FQ_ERR_FORMAT, "__metadata__", NULL);
    write_st_hdr(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4);
    expect_bad(ctx, "missing offsets", p, FQ_ERR_FORMAT, "missing field 'data_offsets'", "'w'");
    write_st_hdr(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":0}}", 4);
    expect_bad(ctx, "extra field", p, FQ_ERR_FORMAT, "unexpected field 'x'", "'w'");
    write_st_hdr(p, "{\"w\":[1]}", 4);
    expect_bad(ctx, "entry not object", p, FQ_ERR_FORMAT, "'w'", NULL);
    write_st_hdr(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[01],\"data_offsets\":[0,4]}}", 4);
    expect_bad(ctx, "leading zero", p, FQ_ERR_FORMAT, "bad JSON number", NULL);
    write_st_hdr(p, "{\"a\\u0000b\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0);
    expect_bad(ctx, "NUL escape", p, FQ_ERR_FORMAT, "\\u0000", NULL);
    expect_bad(ctx, "missing file", tmp_path("nope.safetensors"), FQ_ERR_IO, "cannot open", NULL);
}

/* Accepted oddities: gaps, empty tensors at any offset, scalars, no tensors. */
static void test_good_headers(fq_ctx *ctx) {
    const char *p = tmp_path("good.safetensors");
    write_st_hdr(p,
                 "{\"__metadata__\":{\"format\":\"pt\",\"k\":\"v\"},"
                 "\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]},"
                 "\"e\":{\"dtype\":\"F32\",\"shape\":[3,0],\"data_offsets\":[2,2]},"
                 "\"g\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[8,12]}}     ",
                 16);
    fq_st_file *f = NULL;
    CHECK_OK(ctx, fq_st_open(ctx, p, &f));
    if (f) {
        CHECK(fq_st_count(f) == 3, "3 tensors");
        const fq_st_tensor *s = fq_st_find(f, "s"), *e = fq_st_find(f, "e"), *g = fq_st_find(f, "g");
        CHECK(s && s->ndim == 0 && s->numel == 1 && s->nbytes == 4, "scalar");
        CHECK(e && e->ndim == 2 && e->numel == 0 && e->nbytes == 0, "empty");
        CHECK(g && g->dtype == FQ_BF16 && g->nbytes == 4 && ((const unsigned char *)g->data)[0] == 8, "gap");
        CHECK(fq_st_find(f, "nope") == NULL, "absent name");
        CHECK(fq_st_get(f, 0) == s && fq_st_get(f, 2) == g, "header order");
        CHECK(fq_st_metadata(f, "format") && !strcmp(fq_st_metadata(f, "format"), "pt"), "metadata");
        CHECK(fq_st_metadata(f, "x") == NULL && fq_st_metadata_count(f) == 2, "metadata count");
        fq_st_close(f);
    }
    write_st_hdr(p, "{}      ", 0);
    f = NULL;
    CHECK_OK(ctx, fq_st_open(ctx, p, &f));
    CHECK(f && fq_st_count(f) == 0, "no tensors");
    fq_st_close(f);
}

/* Two shards and an index; then the ways an index can lie. */
static void test_sets(fq_ctx *ctx) {
    mkdir(tmp_path("sharded"), 0755);
    write_st_hdr(tmp_path("sharded/a.safetensors"),
                 "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8);
    write_st_hdr(tmp_path("sharded/b.safetensors"),
                 "{\"y\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]},"
                 "\"z\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[3,4]}}",
                 4);
    const char *idx = tmp_path("sharded/model.safetensors.index.json");
    const char *good = "{\"metadata\":{\"total_size\":12},\"weight_map\":"
                       "{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\",\"z\":\"b.safetensors\"}}";
    write_bytes(idx, good, strlen(good));
    fq_st_set *s = NULL;
    CHECK_OK(ctx, fq_st_set_open(ctx, idx, &s));
    if (s) {
        CHECK(fq_st_set_nfiles(s) == 2 && fq_st_set_count(s) == 3, "two shards, three tensors");
        const fq_st_tensor *y = fq_st_set_find(s, "y");
        CHECK(y && y->nbytes == 3 && strstr(fq_st_path(y->file), "b.safetensors"), "y from shard b");
        CHECK(fq_st_set_find(s, "x") && !fq_st_set_find(s, "w"), "find");
        fq_st_set_close(s);
    }
    s = NULL;
    CHECK_OK(ctx, fq_st_set_open(ctx, tmp_path("sharded"), &s)); /* the folder finds its index */
    CHECK(s && fq_st_set_count(s) == 3, "folder -> index");
    fq_st_set_close(s);
    s = NULL;
    CHECK_OK(ctx, fq_st_set_open(ctx, tmp_path("sharded/a.safetensors"), &s));
    CHECK(s && fq_st_set_count(s) == 1, "single file set");
    fq_st_set_close(s);

    struct { const char *label, *json; fq_status want; const char *n1, *n2; } bad[] = {
        {"missing shard", "{\"weight_map\":{\"x\":\"a.safetensors\",\"q\":\"c.safetensors\"}}", FQ_ERR_IO,
         "'c.safetensors'", "'q'"},
        {"tensor not in its shard", "{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"a.safetensors\"}}",
         FQ_ERR_FORMAT, "'y'", "'a.safetensors'"},
        {"path in shard name", "{\"weight_map\":{\"x\":\"../a.safetensors\"}}", FQ_ERR_FORMAT, "'x'",
         "plain file name"},
        {"no weight_map", "{\"metadata\":{}}", FQ_ERR_FORMAT, "weight_map", NULL},
        {"not JSON", "weight_map", FQ_ERR_FORMAT, "JSON", NULL},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_bytes(idx, bad[i].json, strlen(bad[i].json));
        s = NULL;
        fq_status st = fq_st_set_open(ctx, idx, &s);
        const char *m = fq_ctx_error(ctx);
        CHECK(st == bad[i].want && s == NULL, "%s: %s (%s)", bad[i].label, fq_status_str(st), m);
        CHECK(strstr(m, "model.safetensors.index.json") != NULL, "%s: names the index: %s", bad[i].label, m);
        if (bad[i].n1) CHECK(strstr(m, bad[i].n1) != NULL, "%s: has %s: %s", bad[i].label, bad[i].n1, m);
        if (bad[i].n2) CHECK(strstr(m, bad[i].n2) != NULL, "%s: has %s: %s", bad[i].label, bad[i].n2, m);
        fq_st_set_close(s);
    }
    /* The same name in two shards is ambiguous. */
    write_st_hdr(tmp_path("sharded/c.safetensors"),
                 "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                 "\"w\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[8,8]}}",
                 8);
    const char *dup = "{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\",\"w\":\"c.safetensors\"}}";
    write_bytes(idx, dup, strlen(dup));
    s = NULL;
    fq_status st = fq_st_set_open(ctx, idx, &s);
    CHECK(st == FQ_ERR_FORMAT && strstr(fq_ctx_error(ctx), "'x' is in both"), "name in two shards: %s",
          fq_ctx_error(ctx));
    fq_st_set_close(s);
    /* A folder with several files and no index is ambiguous... */
    unlink(idx);
    s = NULL;
    st = fq_st_set_open(ctx, tmp_path("sharded"), &s);
    CHECK(st == FQ_ERR_FORMAT && strstr(fq_ctx_error(ctx), "name one"), "ambiguous folder: %s", fq_ctx_error(ctx));
    fq_st_set_close(s);
    /* ...unless one has the diffusers name. */
    rename(tmp_path("sharded/b.safetensors"), tmp_path("sharded/diffusion_pytorch_model.safetensors"));
    s = NULL;
    CHECK_OK(ctx, fq_st_set_open(ctx, tmp_path("sharded"), &s));
    CHECK(s && fq_st_set_count(s) == 2 && fq_st_set_find(s, "z"), "diffusers name preferred");
    fq_st_set_close(s);
    s = NULL;
    st = fq_st_set_open(ctx, tmp_path("empty_dir_that_is_missing"), &s);
    CHECK(st == FQ_ERR_IO && s == NULL, "missing path: %s", fq_ctx_error(ctx));
}

/* Every dtype round-trips; the file has the reference layout. */
static void test_writer_roundtrip(fq_ctx *ctx) {
    fq_st_writer *w = NULL;
    CHECK_OK(ctx, fq_st_writer_create(ctx, &w));
    if (!w) return;
    unsigned char data[FQ_DTYPE_COUNT][24];
    const char *names[FQ_DTYPE_COUNT] = {"t_f32", "t_f16", "t_bf16", "t_f64", "t_u8",
                                         "t_i8",  "t_i16", "t_i32",  "t_i64", "t_bool"};
    for (int d = 0; d < FQ_DTYPE_COUNT; d++) {
        size_t isz = fq_dtype_size((fq_dtype)d);
        int64_t shape[2] = {3, 1};
        for (size_t i = 0; i < 3 * isz; i++) data[d][i] = (unsigned char)(17 * d + i);
        CHECK_OK(ctx, fq_st_writer_add(ctx, w, names[d], (fq_dtype)d, 2, shape, data[d], 3 * isz, 0));
    }
    int64_t none = 0;
    CHECK_OK(ctx, fq_st_writer_add(ctx, w, "empty", FQ_F32, 1, &none, NULL, 0, 0));
    float one = 2.5f;
    CHECK_OK(ctx, fq_st_writer_add_copy(ctx, w, "scalar", FQ_F32, 0, NULL, &one, 4));
    CHECK_OK(ctx, fq_st_writer_set_metadata(ctx, w, "format", "pt"));
    CHECK_OK(ctx, fq_st_writer_set_metadata(ctx, w, "quote\"d", "tab\there \xc3\xa9"));
    CHECK_OK(ctx, fq_st_writer_set_metadata(ctx, w, "format", "pt2")); /* replaced in place */
    /* Bad adds: wrong size, bad dtype; an owned buffer is freed even then. */
    int64_t two = 2;
    CHECK(fq_st_writer_add(ctx, w, "bad", FQ_F32, 1, &two, malloc(4), 4, 1) == FQ_ERR_SHAPE, "size mismatch");
    CHECK(fq_st_writer_add(ctx, w, "__metadata__", FQ_U8, 1, &two, "ab", 2, 0) == FQ_ERR_INVALID_ARG,
          "reserved name");
    CHECK(fq_st_writer_count(w) == FQ_DTYPE_COUNT + 2, "count");
    const char *p = tmp_path("all.safetensors");
    CHECK_OK(ctx, fq_st_writer_commit(ctx, w, p));
    fq_st_writer_free(w);

    size_t n = 0;
    unsigned char *raw = tf_read_all(p, &n);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0 && raw; i--) hlen = (hlen << 8) | raw[i];
    CHECK(raw && hlen % 8 == 0 && 8 + hlen <= n, "header padded to a multiple of 8: %llu", (unsigned long long)hlen);
    const char *want_prefix = "{\"__metadata__\":{\"format\":\"pt2\",\"quote\\\"d\":\"tab\\there \xc3\xa9\"},"
                              "\"t_i64\":{\"dtype\":\"I64\",\"shape\":[3,1],\"data_offsets\":[0,24]},"
                              "\"t_f64\":{\"dtype\":\"F64\"";
    CHECK(raw && !memcmp(raw + 8, want_prefix, strlen(want_prefix)), "header layout: %.*s", (int)hlen,
          raw ? (char *)raw + 8 : "");
    free(raw);

    fq_st_file *f = NULL;
    CHECK_OK(ctx, fq_st_open(ctx, p, &f));
    if (!f) return;
    /* The reference order: I64 F64 F32 I32 BF16 F16 I16 I8 U8 BOOL, names ascending. */
    const char *order[] = {"t_i64", "t_f64", "empty", "scalar", "t_f32", "t_i32", "t_bf16",
                           "t_f16", "t_i16", "t_i8",  "t_u8",   "t_bool"};
    for (int i = 0; i < 12; i++)
        CHECK(!strcmp(fq_st_get(f, i)->name, order[i]), "order %d: %s", i, fq_st_get(f, i)->name);
    for (int d = 0; d < FQ_DTYPE_COUNT; d++) {
        const fq_st_tensor *t = fq_st_find(f, names[d]);
        CHECK(t && t->dtype == (fq_dtype)d && t->ndim == 2 && t->shape[0] == 3 && t->shape[1] == 1 &&
                  !memcmp(t->data, data[d], t->nbytes),
              "dtype %s round trip", fq_dtype_name((fq_dtype)d));
    }
    const fq_st_tensor *sc = fq_st_find(f, "scalar");
    float back = 0;
    if (sc) memcpy(&back, sc->data, 4);
    CHECK(sc && sc->ndim == 0 && back == 2.5f, "scalar");
    CHECK(fq_st_metadata(f, "quote\"d") && !strcmp(fq_st_metadata(f, "quote\"d"), "tab\there \xc3\xa9"),
          "escaped metadata");
    fq_st_close(f);
}

/* Writing back every tensor of a file written by the reference implementation
 * (with its metadata in the same order) gives the same bytes. */
static void test_writer_matches_reference(fq_ctx *ctx, const char *src) {
    fq_st_file *f = NULL;
    CHECK_OK(ctx, fq_st_open(ctx, src, &f));
    if (!f) return;
    fq_st_writer *w = NULL;
    CHECK_OK(ctx, fq_st_writer_create(ctx, &w));
    for (int64_t i = 0; i < fq_st_metadata_count(f); i++) {
        const char *k, *v;
        fq_st_metadata_get(f, i, &k, &v);
        CHECK_OK(ctx, fq_st_writer_set_metadata(ctx, w, k, v));
    }
    for (int64_t i = fq_st_count(f) - 1; i >= 0; i--) { /* any order in */
        const fq_st_tensor *t = fq_st_get(f, i);
        CHECK_OK(ctx, fq_st_writer_add(ctx, w, t->name, t->dtype, t->ndim, t->shape, t->data, t->nbytes, 0));
    }
    const char *p = tmp_path("rewrite.safetensors");
    CHECK_OK(ctx, fq_st_writer_commit(ctx, w, p));
    fq_st_writer_free(w);
    fq_st_close(f);
    size_t na = 0, nb = 0;
    unsigned char *a = tf_read_all(src, &na), *b = tf_read_all(p, &nb);
    CHECK(a && b && na == nb && !memcmp(a, b, na), "%s rewritten byte-identical (%zu vs %zu bytes)", src, na, nb);
    free(a);
    free(b);
    unlink(p);
}

static void test_failed_commits(fq_ctx *ctx) {
    const char *p = tmp_path("out.safetensors");
    fq_st_writer *w = NULL;
    CHECK_OK(ctx, fq_st_writer_create(ctx, &w));
    if (!w) return;
    int64_t shape[1] = {4};
    float v[4] = {1, 2, 3, 4};
    CHECK_OK(ctx, fq_st_writer_add_copy(ctx, w, "v", FQ_F32, 1, shape, v, sizeof v));

    fq_status s = fq_st_writer_commit(ctx, w, tmp_path("no/such/dir/x.safetensors"));
    CHECK(s == FQ_ERR_IO && strstr(fq_ctx_error(ctx), "no/such/dir"), "missing folder: %s", fq_ctx_error(ctx));
    for (int stage = 1; stage <= 3; stage++) {
        fq_st_writer_test_fail(w, stage);
        s = fq_st_writer_commit(ctx, w, p);
        CHECK(s == FQ_ERR_IO, "stage %d fails: %s", stage, fq_status_str(s));
        CHECK(!exists(p) && count_temp_files() == 0, "stage %d: no output, no temp file", stage);
    }
    /* An existing file survives a failed commit untouched. */
    write_bytes(p, "keep", 4);
    fq_st_writer_test_fail(w, 3);
    CHECK(fq_st_writer_commit(ctx, w, p) == FQ_ERR_IO, "rename fails");
    size_t n = 0;
    unsigned char *b = tf_read_all(p, &n);
    CHECK(b && n == 4 && !memcmp(b, "keep", 4) && count_temp_files() == 0, "old file kept");
    free(b);
    /* A stale temp file of the same pid does not block a commit. */
    char stale[300];
    snprintf(stale, sizeof stale, "%s.tmp.%ld", p, (long)getpid());
    write_bytes(stale, "stale", 5);
    fq_st_writer_test_fail(w, 0);
    CHECK_OK(ctx, fq_st_writer_commit(ctx, w, p));
    CHECK(count_temp_files() == 0, "temp replaced");
    /* Duplicate names are refused at commit, with nothing written. */
    CHECK_OK(ctx, fq_st_writer_add_copy(ctx, w, "v", FQ_F32, 1, shape, v, sizeof v));
    const char *p2 = tmp_path("dup.safetensors");
    s = fq_st_writer_commit(ctx, w, p2);
    CHECK(s == FQ_ERR_INVALID_ARG && strstr(fq_ctx_error(ctx), "'v'") && !exists(p2), "duplicate: %s",
          fq_ctx_error(ctx));
    fq_st_writer_truncate(w, 1);
    CHECK_OK(ctx, fq_st_writer_commit(ctx, w, p2));
    fq_st_writer_free(w);
    fq_st_file *f = NULL;
    CHECK_OK(ctx, fq_st_open(ctx, p2, &f));
    CHECK(f && fq_st_count(f) == 1, "after truncate");
    fq_st_close(f);
}

static int count_files(void) {
    DIR *d = opendir(g_dir);
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d));)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    if (d) closedir(d);
    return n;
}

/* Adds the same tensors to w: borrowed, copied and owned buffers, plus one
 * owned tensor that is then dropped by truncate (spooled bytes reclaimed). */
static void add_spool_set(fq_ctx *ctx, fq_st_writer *w, const float *big, int64_t nbig) {
    int64_t sh[1] = {nbig}, s3[1] = {3}, s5[1] = {5};
    static const unsigned char u8[5] = {1, 2, 3, 250, 255};
    static const float f3[3] = {0.5f, -1.0f, 3.25f}; /* borrowed: valid until commit */
    CHECK_OK(ctx, fq_st_writer_set_metadata(ctx, w, "format", "pt"));
    CHECK_OK(ctx, fq_st_writer_add(ctx, w, "borrowed", FQ_F32, 1, s3, f3, sizeof f3, 0));
    CHECK_OK(ctx, fq_st_writer_add_copy(ctx, w, "copied", FQ_U8, 1, s5, u8, sizeof u8));
    float *own = malloc(sizeof(float) * (size_t)nbig);
    if (own) memcpy(own, big, sizeof(float) * (size_t)nbig);
    CHECK_OK(ctx, fq_st_writer_add(ctx, w, "owned", FQ_F32, 1, sh, own, sizeof(float) * (size_t)nbig, 1));
    const int64_t keep = fq_st_writer_count(w);
    CHECK_OK(ctx, fq_st_writer_add_copy(ctx, w, "dropped", FQ_F32, 1, sh, big, sizeof(float) * (size_t)nbig));
    fq_st_writer_truncate(w, keep);
    CHECK_OK(ctx, fq_st_writer_add_copy(ctx, w, "after", FQ_F32, 1, s3, big + 7, 3 * sizeof(float)));
}

/* A spooling writer keeps owned tensors in an unlinked file (nothing shows in
 * the folder) and writes the same bytes as one that keeps them in memory, also
 * after a failed commit and after truncate; a spool folder that does not exist
 * is an I/O error naming it. */
static void test_writer_spool(fq_ctx *ctx) {
    const int64_t nbig = 300000; /* 1.2 MB */
    float *big = malloc(sizeof(float) * (size_t)nbig);
    if (!big) return;
    for (int64_t i = 0; i < nbig; i++) big[i] = (float)(i % 977) * 0.25f - 7.0f;
    fq_st_writer *a = NULL, *b = NULL;
    CHECK_OK(ctx, fq_st_writer_create(ctx, &a));
    CHECK_OK(ctx, fq_st_writer_create(ctx, &b));
    if (!a || !b) goto out;
    const int before = count_files();
    CHECK_OK(ctx, fq_st_writer_spool(ctx, b, g_dir));
    CHECK(fq_st_writer_spool(ctx, b, g_dir) == FQ_ERR_INVALID_ARG, "spooling twice refused");
    add_spool_set(ctx, a, big, nbig);
    add_spool_set(ctx, b, big, nbig);
    CHECK(count_files() == before, "the spool file is not visible in the folder (%d files, %d before)",
          count_files(), before);
    const char *pa = tmp_path("mem.safetensors"), *pb = tmp_path("spool.safetensors");
    CHECK_OK(ctx, fq_st_writer_commit(ctx, a, pa));
    fq_st_writer_test_fail(b, 2);
    CHECK(fq_st_writer_commit(ctx, b, pb) == FQ_ERR_IO && !exists(pb), "failed spooled commit leaves nothing");
    fq_st_writer_test_fail(b, 0);
    CHECK_OK(ctx, fq_st_writer_commit(ctx, b, pb));
    size_t na = 0, nb = 0;
    unsigned char *ra = tf_read_all(pa, &na), *rb = tf_read_all(pb, &nb);
    CHECK(ra && rb && na == nb && na > (size_t)nbig * 4 && !memcmp(ra, rb, na),
          "spooled file byte-identical to the in-memory one (%zu vs %zu bytes)", na, nb);
    free(ra);
    free(rb);
    fq_st_file *f = NULL;
    CHECK_OK(ctx, fq_st_open(ctx, pb, &f));
    const fq_st_tensor *t = f ? fq_st_find(f, "owned") : NULL;
    CHECK(t && t->nbytes == (size_t)nbig * 4 && !memcmp(t->data, big, t->nbytes), "owned tensor read back");
    CHECK(f && !fq_st_find(f, "dropped") && fq_st_find(f, "after"), "truncated tensor gone, later one kept");
    fq_st_close(f);
    fq_st_writer *c = NULL;
    CHECK_OK(ctx, fq_st_writer_create(ctx, &c));
    if (c) {
        fq_status s = fq_st_writer_spool(ctx, c, tmp_path("no/such/dir"));
        CHECK(s == FQ_ERR_IO && strstr(fq_ctx_error(ctx), "no/such/dir"), "missing spool folder: %s",
              fq_ctx_error(ctx));
    }
    fq_st_writer_free(c);
    unlink(pa);
    unlink(pb);
out:
    fq_st_writer_free(a);
    fq_st_writer_free(b);
    free(big);
}

int main(void) {
    fq_ctx *ctx;
    if (fq_ctx_create(&ctx) != FQ_OK) return 1;
    snprintf(g_dir, sizeof g_dir, "/tmp/fluxq_st_XXXXXX");
    if (!mkdtemp(g_dir)) { perror("mkdtemp"); return 1; }

    test_bad_headers(ctx);
    test_good_headers(ctx);
    test_sets(ctx);
    test_writer_roundtrip(ctx);
    test_writer_matches_reference(ctx, "tests/fixtures/io/linear4bit_fp4.state_dict.safetensors");
    test_writer_matches_reference(ctx, "tests/fixtures/io/linear4bit_nf4_dq.state_dict.safetensors");
    test_writer_matches_reference(ctx, "tests/fixtures/io/flux_nf4_dq.safetensors");
    test_failed_commits(ctx);
    test_writer_spool(ctx);

    nftw(g_dir, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    fq_ctx_free(ctx);
    return check_summary("test_safetensors");
}

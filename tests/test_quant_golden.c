/* Byte equality with real bitsandbytes (CUDA, H100) on every golden quantization
 * case copied into tests/fixtures/golden/quant (see its README.md):
 *  - blockwise4/: 30 inputs (f32/f16/bf16; blocksizes 32..4096; 1-D and 2-D)
 *    x {nf4, fp4} x {plain, double quant}: packed, absmax, absmax codes, offset,
 *    nested absmax, reconstructed absmax, dequantized output;
 *  - nan_inf: NaN/Inf inputs; blockwise8: the 8-bit dynamic scheme alone;
 *  - linear4bit: two Linear4bit state dicts (members, quant_map, offset).
 * Runs the public ops on the CPU; prints how many cases matched. */
#include "check.h"
#include "core/qtensor.h"
#include "kernels/kernels.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* ---- a minimal safetensors reader (whole file in memory) ---- */

typedef struct {
    unsigned char *buf;
    size_t len, data_off;
    cJSON *hdr;
} stfile;

typedef struct {
    const void *data;
    size_t bytes;
    fq_dtype dtype;
    int ndim;
    int64_t shape[FQ_MAX_DIMS];
} stt;

static int st_open(const char *path, stfile *f) {
    memset(f, 0, sizeof *f);
    FILE *fp = fopen(path, "rb");
    if (!fp) return 0;
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    f->buf = malloc((size_t)n + 1);
    if (!f->buf || fread(f->buf, 1, (size_t)n, fp) != (size_t)n) { fclose(fp); free(f->buf); return 0; }
    fclose(fp);
    f->len = (size_t)n;
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | f->buf[i];
    if (hl > f->len - 8) { free(f->buf); return 0; }
    f->hdr = cJSON_ParseWithLength((const char *)f->buf + 8, (size_t)hl);
    f->data_off = 8 + (size_t)hl;
    return f->hdr != NULL;
}

static void st_close(stfile *f) {
    cJSON_Delete(f->hdr);
    free(f->buf);
}

static int st_get(const stfile *f, const char *name, stt *t) {
    cJSON *e = cJSON_GetObjectItemCaseSensitive(f->hdr, name);
    if (!e) return 0;
    const char *dt = cJSON_GetStringValue(cJSON_GetObjectItem(e, "dtype"));
    cJSON *sh = cJSON_GetObjectItem(e, "shape"), *off = cJSON_GetObjectItem(e, "data_offsets");
    static const struct { const char *n; fq_dtype t; } map[] = {
        {"F32", FQ_F32}, {"F16", FQ_F16}, {"BF16", FQ_BF16}, {"U8", FQ_U8}, {"I64", FQ_I64}, {"F64", FQ_F64}};
    t->dtype = FQ_DTYPE_COUNT;
    for (size_t i = 0; dt && i < sizeof map / sizeof map[0]; i++)
        if (strcmp(dt, map[i].n) == 0) t->dtype = map[i].t;
    t->ndim = cJSON_GetArraySize(sh);
    for (int i = 0; i < t->ndim && i < FQ_MAX_DIMS; i++) t->shape[i] = (int64_t)cJSON_GetArrayItem(sh, i)->valuedouble;
    size_t a = (size_t)cJSON_GetArrayItem(off, 0)->valuedouble, b = (size_t)cJSON_GetArrayItem(off, 1)->valuedouble;
    t->data = f->buf + f->data_off + a;
    t->bytes = b - a;
    return t->dtype != FQ_DTYPE_COUNT && f->data_off + b <= f->len;
}

static const char *st_meta(const stfile *f, const char *key) {
    return cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(f->hdr, "__metadata__"), key));
}

/* ---- comparisons; each returns 1 on byte equality and reports the first difference ---- */

static uint64_t fnv1a64(const void *p, size_t n) {
    const unsigned char *c = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ c[i]) * 0x100000001b3ull;
    return h;
}

static int same_bytes(const char *what, const void *ours, size_t n, const stt *ref, size_t elem) {
    if (ref->bytes != n) {
        fprintf(stderr, "  %s: %zu bytes, golden has %zu\n", what, n, ref->bytes);
        return 0;
    }
    if (memcmp(ours, ref->data, n) == 0) return 1;
    const unsigned char *a = ours, *b = ref->data;
    size_t i = 0;
    while (a[i] == b[i]) i++;
    i -= i % elem;
    uint64_t va = 0, vb = 0;
    memcpy(&va, a + i, elem);
    memcpy(&vb, b + i, elem);
    fprintf(stderr, "  %s: first difference at element %zu: ours 0x%llx, golden 0x%llx\n", what, i / elem,
            (unsigned long long)va, (unsigned long long)vb);
    return 0;
}

/* A golden tensor stored whole, or as "<name>.fnv1a64" when large. */
static int same_as_golden(const stfile *f, const char *name, const void *ours, size_t n, size_t elem) {
    stt ref;
    if (st_get(f, name, &ref)) return same_bytes(name, ours, n, &ref, elem);
    char hn[128];
    snprintf(hn, sizeof hn, "%s.fnv1a64", name);
    if (!st_get(f, hn, &ref) || ref.bytes != 8) {
        fprintf(stderr, "  golden tensor %s missing\n", name);
        return 0;
    }
    uint64_t h = fnv1a64(ours, n), g;
    memcpy(&g, ref.data, 8);
    if (h != g) fprintf(stderr, "  %s: hash differs (ours %016llx, golden %016llx)\n", name,
                        (unsigned long long)h, (unsigned long long)g);
    return h == g;
}

static int member_matches(fq_ctx *ctx, const fq_qtensor *q, fq_qmember m, const stfile *f, const char *name,
                          size_t elem) {
    size_t n = fq_qtensor_member_bytes(q, m);
    void *buf = malloc(n ? n : 1);
    int ok = buf && fq_qtensor_member_to_host(ctx, q, m, buf) == FQ_OK && same_as_golden(f, name, buf, n, elem);
    free(buf);
    return ok;
}

static int dequant_matches(fq_ctx *ctx, const fq_qtensor *q, const stfile *f, const char *name) {
    fq_tensor *y = NULL;
    if (fq_dequantize_4bit(ctx, q, -1, &y) != FQ_OK) {
        fprintf(stderr, "  dequantize: %s\n", fq_ctx_error(ctx));
        return 0;
    }
    int ok = same_as_golden(f, name, fq_tensor_host_data(y), fq_tensor_nbytes(y), fq_dtype_size(fq_tensor_dtype(y)));
    fq_tensor_free(y);
    return ok;
}

static const char *g_dir = "tests/fixtures/golden/quant";
static int g_cases, g_matched;

static void count_case(int ok, const char *what) {
    g_cases++;
    g_matched += ok;
    CHECK(ok, "golden case %s differs from bitsandbytes", what);
}

/* One blockwise4 file: {nf4, fp4} x {plain, double quant}. */
static void run_blockwise4(fq_ctx *ctx, const char *path, const char *fname) {
    stfile f;
    stt in;
    if (!st_open(path, &f) || !st_get(&f, "input", &in)) {
        CHECK(0, "cannot read %s", path);
        return;
    }
    int64_t bs = atoll(st_meta(&f, "blocksize") ? st_meta(&f, "blocksize") : "0");
    fq_tensor *x = NULL;
    CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CPU, in.dtype, in.ndim, in.shape, in.data, &x));
    for (int qt = 0; x && qt < 2; qt++) {
        for (int dq = 0; dq < 2; dq++) {
            const char *qn = qt ? "fp4" : "nf4";
            char name[256], what[300];
            snprintf(what, sizeof what, "%s %s%s", fname, qn, dq ? " dq" : "");
            fq_quant_params p = {qt ? FQ_QUANT_FP4 : FQ_QUANT_NF4, bs, dq};
            fq_qtensor *q = NULL;
            fq_status s = fq_quantize_4bit(ctx, x, &p, &q);
            if (s != FQ_OK) {
                fprintf(stderr, "  quantize %s: %s\n", what, fq_ctx_error(ctx));
                count_case(0, what);
                continue;
            }
            int ok = 1;
            snprintf(name, sizeof name, "%s.packed", qn);
            ok &= member_matches(ctx, q, FQ_QMEMBER_PACKED, &f, name, 1);
            if (!dq) {
                snprintf(name, sizeof name, "%s.absmax", qn);
                ok &= member_matches(ctx, q, FQ_QMEMBER_ABSMAX, &f, name, 4);
                snprintf(name, sizeof name, "%s.dequant", qn);
                ok &= dequant_matches(ctx, q, &f, name);
                /* The scalar reference path gives the same bytes as the optimized one. */
                size_t ob = (size_t)fq_tensor_numel(x) * fq_dtype_size(in.dtype);
                void *ref = malloc(ob);
                fq_cpu_dequantize4_ref(ctx, q->m[FQ_QMEMBER_PACKED].ptr, q->m[FQ_QMEMBER_ABSMAX].ptr,
                                       fq_tensor_numel(x), bs, p.type, ref, in.dtype);
                ok &= ref && same_as_golden(&f, name, ref, ob, fq_dtype_size(in.dtype));
                free(ref);
            } else {
                fq_qtensor_info info;
                fq_qtensor_get_info(q, &info);
                snprintf(name, sizeof name, "%s.dq.absmax_q", qn);
                ok &= member_matches(ctx, q, FQ_QMEMBER_ABSMAX, &f, name, 1);
                snprintf(name, sizeof name, "%s.dq.nested_absmax", qn);
                ok &= member_matches(ctx, q, FQ_QMEMBER_NESTED_ABSMAX, &f, name, 4);
                snprintf(name, sizeof name, "%s.dq.offset", qn);
                ok &= same_as_golden(&f, name, &info.offset, 4, 4);
                /* The absmax dequantize_4bit reconstructs: ftz(code[q] * amax2) + offset. */
                uint8_t *qa = malloc((size_t)info.nblocks);
                float *nab = malloc((size_t)info.nested_nblocks * 4), *deq = malloc((size_t)info.nblocks * 4);
                ok &= qa && nab && deq && fq_qtensor_member_to_host(ctx, q, FQ_QMEMBER_ABSMAX, qa) == FQ_OK &&
                      fq_qtensor_member_to_host(ctx, q, FQ_QMEMBER_NESTED_ABSMAX, nab) == FQ_OK;
                if (ok) {
                    fq_cpu_dequantize8(qa, nab, fq_dynamic_map_signed(), info.offset, info.nblocks, 256, deq);
                    snprintf(name, sizeof name, "%s.dq.absmax_deq", qn);
                    ok &= same_as_golden(&f, name, deq, (size_t)info.nblocks * 4, 4);
                }
                free(qa);
                free(nab);
                free(deq);
                snprintf(name, sizeof name, "%s.dq.dequant", qn);
                ok &= dequant_matches(ctx, q, &f, name);
            }
            count_case(ok, what);
            fq_qtensor_free(q);
        }
    }
    fq_tensor_free(x);
    st_close(&f);
}

/* NaN/Inf inputs: what bitsandbytes' CUDA kernels make of them. */
static void run_nan_inf(fq_ctx *ctx) {
    char path[512];
    snprintf(path, sizeof path, "%s/nan_inf_float32_bs64.safetensors", g_dir);
    stfile f;
    stt in;
    if (!st_open(path, &f) || !st_get(&f, "input", &in)) { CHECK(0, "cannot read %s", path); return; }
    fq_tensor *x = NULL;
    CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CPU, in.dtype, in.ndim, in.shape, in.data, &x));
    for (int qt = 0; x && qt < 2; qt++) {
        const char *qn = qt ? "fp4" : "nf4";
        char name[128], what[64];
        snprintf(what, sizeof what, "nan_inf %s", qn);
        fq_quant_params p = {qt ? FQ_QUANT_FP4 : FQ_QUANT_NF4, 64, 0};
        fq_qtensor *q = NULL;
        int ok = fq_quantize_4bit(ctx, x, &p, &q) == FQ_OK;
        if (ok) {
            snprintf(name, sizeof name, "cuda.%s.packed", qn);
            ok &= member_matches(ctx, q, FQ_QMEMBER_PACKED, &f, name, 1);
            snprintf(name, sizeof name, "cuda.%s.absmax", qn);
            ok &= member_matches(ctx, q, FQ_QMEMBER_ABSMAX, &f, name, 4);
            snprintf(name, sizeof name, "cuda.%s.dequant", qn);
            ok &= dequant_matches(ctx, q, &f, name);
        }
        count_case(ok, what);
        fq_qtensor_free(q);
    }
    fq_tensor_free(x);
    st_close(&f);
}

/* The 8-bit dynamic scheme alone (quantize_blockwise / dequantize_blockwise). */
static void run_blockwise8(fq_ctx *ctx) {
    char path[512];
    snprintf(path, sizeof path, "%s/blockwise8_float32_bs256.safetensors", g_dir);
    stfile f;
    stt in;
    if (!st_open(path, &f) || !st_get(&f, "input", &in)) { CHECK(0, "cannot read %s", path); return; }
    int64_t n = in.shape[0], nb = (n + 255) / 256;
    fq_tensor *x = NULL, *q = NULL, *am = NULL, *y = NULL;
    int ok = fq_tensor_from_host(ctx, FQ_CPU, FQ_F32, 1, &n, in.data, &x) == FQ_OK &&
             fq_tensor_create(ctx, FQ_CPU, FQ_U8, 1, &n, &q) == FQ_OK &&
             fq_tensor_create(ctx, FQ_CPU, FQ_F32, 1, &nb, &am) == FQ_OK &&
             fq_tensor_create(ctx, FQ_CPU, FQ_F32, 1, &n, &y) == FQ_OK;
    ok = ok && fq_quantize_8bit_dynamic(ctx, x, 256, q, am) == FQ_OK &&
         fq_dequantize_8bit_dynamic(ctx, q, am, 256, y) == FQ_OK;
    if (ok) {
        ok &= same_as_golden(&f, "cuda.quantized", fq_tensor_host_data(q), (size_t)n, 1);
        ok &= same_as_golden(&f, "cuda.absmax", fq_tensor_host_data(am), (size_t)nb * 4, 4);
        ok &= same_as_golden(&f, "cuda.dequant", fq_tensor_host_data(y), (size_t)n * 4, 4);
    } else {
        fprintf(stderr, "  blockwise8: %s\n", fq_ctx_error(ctx));
    }
    count_case(ok, "blockwise8 float32 bs256");
    fq_tensor_free(x);
    fq_tensor_free(q);
    fq_tensor_free(am);
    fq_tensor_free(y);
    st_close(&f);
}

/* Linear4bit state dicts: quantize the layer's f32 weight and compare every member. */
static void run_linear4bit(fq_ctx *ctx, const char *which) {
    char path[512];
    snprintf(path, sizeof path, "%s/linear4bit_%s.safetensors", g_dir, which);
    stfile f;
    stt w;
    cJSON *qs = NULL;
    if (!st_open(path, &f) || !st_get(&f, "weight_fp32", &w) || !(qs = cJSON_Parse(st_meta(&f, "quant_state")))) {
        CHECK(0, "cannot read %s", path);
        return;
    }
    const char *qt = cJSON_GetStringValue(cJSON_GetObjectItem(qs, "quant_type"));
    cJSON *off = cJSON_GetObjectItem(qs, "nested_offset");
    fq_quant_params p = {qt && strcmp(qt, "fp4") == 0 ? FQ_QUANT_FP4 : FQ_QUANT_NF4,
                         (int64_t)cJSON_GetObjectItem(qs, "blocksize")->valuedouble, off != NULL};
    fq_tensor *x = NULL;
    fq_qtensor *q = NULL;
    int ok = fq_tensor_from_host(ctx, FQ_CPU, w.dtype, w.ndim, w.shape, w.data, &x) == FQ_OK &&
             fq_quantize_4bit(ctx, x, &p, &q) == FQ_OK;
    if (ok) {
        ok &= member_matches(ctx, q, FQ_QMEMBER_PACKED, &f, "weight", 1);
        ok &= member_matches(ctx, q, FQ_QMEMBER_ABSMAX, &f, "weight.absmax", p.double_quant ? 1 : 4);
        ok &= member_matches(ctx, q, FQ_QMEMBER_QUANT_MAP, &f, "weight.quant_map", 4);
        if (p.double_quant) {
            fq_qtensor_info info;
            fq_qtensor_get_info(q, &info);
            ok &= member_matches(ctx, q, FQ_QMEMBER_NESTED_ABSMAX, &f, "weight.nested_absmax", 4);
            ok &= member_matches(ctx, q, FQ_QMEMBER_NESTED_QUANT_MAP, &f, "weight.nested_quant_map", 4);
            float want = (float)off->valuedouble; /* JSON holds the float's exact double */
            if (memcmp(&want, &info.offset, 4) != 0) {
                fprintf(stderr, "  nested_offset: ours %.9g, golden %.9g\n", info.offset, want);
                ok = 0;
            }
        }
        ok &= dequant_matches(ctx, q, &f, "weight_dequantized");
    } else {
        fprintf(stderr, "  linear4bit %s: %s\n", which, fq_ctx_error(ctx));
    }
    char what[64];
    snprintf(what, sizeof what, "linear4bit %s", which);
    count_case(ok, what);
    fq_qtensor_free(q);
    fq_tensor_free(x);
    cJSON_Delete(qs);
    st_close(&f);
}

int main(void) {
    if (getenv("FQ_TEST_GOLDEN_QUANT")) g_dir = getenv("FQ_TEST_GOLDEN_QUANT");
    fq_ctx *ctx;
    CHECK(fq_ctx_create(&ctx) == FQ_OK, "ctx");
    char dir[512];
    snprintf(dir, sizeof dir, "%s/blockwise4", g_dir);
    DIR *d = opendir(dir);
    CHECK(d != NULL, "fixture folder %s (run from the repository root)", dir);
    int files = 0;
    for (struct dirent *e; d && (e = readdir(d));) {
        size_t l = strlen(e->d_name);
        if (l < 12 || strcmp(e->d_name + l - 12, ".safetensors") != 0) continue;
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        run_blockwise4(ctx, path, e->d_name);
        files++;
    }
    if (d) closedir(d);
    CHECK(files == 30, "expected 30 blockwise4 fixtures, found %d", files);
    run_nan_inf(ctx);
    run_blockwise8(ctx);
    run_linear4bit(ctx, "fp4");
    run_linear4bit(ctx, "nf4_dq");
    printf("golden: %d of %d bitsandbytes cases byte-identical\n", g_matched, g_cases);
    fq_ctx_free(ctx);
    return check_summary("test_quant_golden");
}

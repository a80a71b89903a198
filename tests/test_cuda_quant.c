/* The CUDA quantization kernels, on every visible GPU (skips without one):
 *  - golden: byte equality with real bitsandbytes on every fixture case, run
 *    through the public API with the tensors on cuda:N;
 *  - CPU == CUDA on random inputs with special blocks (zero, subnormal, Inf,
 *    NaN), several lengths (partial blocks and tiles), every blocksize,
 *    f32/f16/bf16, nf4/fp4, with and without double quant, and every output
 *    dtype of dequantize; torch's mean and the 8-bit step on their own;
 *  - rcp.approx.ftz.f32 of this GPU == the H100 table over all 2^23 mantissas;
 *  - a tensor of 2^31 + 4097 elements, checked against the CPU on slices;
 *  - moves cuda:0 -> cpu -> cuda:N, all-or-nothing under injected allocation
 *    failures; the seed scenario (a misplaced quant_map) on a real GPU.
 * Mismatches print the index and both values. */
#include "check.h"
#include "core/qtensor.h"
#include "kernels/kernels.h"
#include "support/st_read.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static const char *g_dir = "tests/fixtures/golden/quant";

#ifdef FQ_HAVE_CUDA
#include "core/cuda_device.h"

/* ---- small helpers --------------------------------------------------------- */

static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 16);
}
static float rnd_unit(void) { return (float)(rnd() >> 8) / 16777216.0f; } /* [0, 1) */
static float rnd_normal(void) { /* roughly N(0, 1) */
    float s = 0.0f;
    for (int i = 0; i < 4; i++) s += rnd_unit();
    return (s - 2.0f) * 1.7320508f;
}

static uint16_t to_bf16(float f) {
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* f32 -> f16 bits, round to nearest even (values here stay finite or are Inf/NaN). */
static uint16_t to_f16(float f) {
    uint32_t u = f2u(f), sign = (u >> 16) & 0x8000u, ex = (u >> 23) & 0xff, m = u & 0x7fffffu;
    if (ex == 0xff) return (uint16_t)(sign | 0x7c00u | (m ? 0x200u : 0u));
    int32_t e = (int32_t)ex - 112;
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    if (e < -10) return (uint16_t)sign;
    uint32_t mant = e > 0 ? ((uint32_t)e << 23) | m : m | 0x800000u;
    uint32_t shift = e > 0 ? 13u : (uint32_t)(14 - e);
    uint32_t r = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) r++;
    return (uint16_t)(sign | r);
}

/* n values of dtype dt: per block a random scale, plus special blocks. */
static void *make_input(fq_dtype dt, int64_t n, int64_t bs) {
    size_t es = fq_dtype_size(dt);
    unsigned char *x = malloc((size_t)n * es + 1);
    if (!x) return NULL;
    int lo = dt == FQ_F16 ? -12 : -30, hi = dt == FQ_F16 ? 4 : 30;
    for (int64_t b = 0; b * bs < n; b++) {
        int64_t s0 = b * bs, len = n - s0 < bs ? n - s0 : bs;
        uint32_t kind = rnd() % 64;
        float scale = ldexpf(1.0f, lo + (int)(rnd() % (uint32_t)(hi - lo + 1)));
        for (int64_t i = 0; i < len; i++) {
            float v = rnd_normal() * scale;
            if (kind == 0) v = (i & 1) ? -0.0f : 0.0f;                   /* all zero           */
            else if (kind == 1) v = u2f((rnd() & 0x807fffffu));          /* f32 subnormals     */
            else if (kind == 2 && i == len / 2) v = (rnd() & 1) ? INFINITY : -INFINITY;
            else if (kind == 3 && i == len / 3) v = NAN;
            else if (kind == 4) v = NAN;                                 /* all NaN            */
            else if (kind == 5) v = ldexpf(rnd_normal(), -130);          /* tiny: flushes      */
            uint16_t h;
            if (dt == FQ_F32) memcpy(x + i * 4 + s0 * 4, &v, 4);
            else {
                if (dt == FQ_BF16) h = kind == 1 ? (uint16_t)(rnd() & 0x807fu) : to_bf16(v);
                else h = to_f16(v); /* f16 "subnormals" are normal floats: nothing flushes */
                memcpy(x + (s0 + i) * 2, &h, 2);
            }
        }
    }
    return x;
}

/* Prints the first difference of two arrays of elem-byte elements; returns the count. */
static int64_t report_diff(const char *what, const void *a, const void *b, int64_t count, size_t elem) {
    const unsigned char *pa = a, *pb = b;
    int64_t diffs = 0, first = -1;
    for (int64_t i = 0; i < count; i++)
        if (memcmp(pa + i * elem, pb + i * elem, elem) != 0) {
            if (first < 0) first = i;
            diffs++;
        }
    if (diffs) {
        uint64_t va = 0, vb = 0;
        memcpy(&va, pa + first * elem, elem);
        memcpy(&vb, pb + first * elem, elem);
        fprintf(stderr, "  %s: %lld of %lld elements differ; first at %lld: cuda 0x%llx, cpu 0x%llx\n", what,
                (long long)diffs, (long long)count, (long long)first, (unsigned long long)va, (unsigned long long)vb);
    }
    return diffs;
}

static fq_device qdev(const fq_qtensor *q) {
    fq_qtensor_info i;
    fq_qtensor_get_info(q, &i);
    return i.device;
}

static void *member_host(fq_ctx *ctx, const fq_qtensor *q, fq_qmember m) {
    size_t n = fq_qtensor_member_bytes(q, m);
    void *p = malloc(n ? n : 1);
    if (p && n && fq_qtensor_member_to_host(ctx, q, m, p) != FQ_OK) { free(p); return NULL; }
    return p;
}

static void *tensor_host(fq_ctx *ctx, const fq_tensor *t) {
    void *p = malloc(fq_tensor_nbytes(t) + 1);
    if (p && fq_tensor_to_host(ctx, t, p) != FQ_OK) { free(p); return NULL; }
    return p;
}

/* ---- golden cases on cuda:N ------------------------------------------------- */

static int golden_member(fq_ctx *ctx, const fq_qtensor *q, fq_qmember m, const stf_file *f, const char *name,
                         size_t elem, const char *what) {
    void *h = member_host(ctx, q, m);
    int ok = h && stf_match(f, name, h, fq_qtensor_member_bytes(q, m), elem, what);
    free(h);
    return ok;
}

static int golden_dequant(fq_ctx *ctx, const fq_qtensor *q, const stf_file *f, const char *name, const char *what) {
    fq_tensor *y = NULL;
    if (fq_dequantize_4bit(ctx, q, -1, &y) != FQ_OK) {
        fprintf(stderr, "  %s dequantize: %s\n", what, fq_ctx_error(ctx));
        return 0;
    }
    void *h = tensor_host(ctx, y);
    int ok = fq_device_equal(fq_tensor_device(y), qdev(q)) && h &&
             stf_match(f, name, h, fq_tensor_nbytes(y), fq_dtype_size(fq_tensor_dtype(y)), what);
    free(h);
    fq_tensor_free(y);
    return ok;
}

static int g_gcases, g_gmatched;

static void golden_blockwise4(fq_ctx *ctx, int dev, const char *path, const char *fname) {
    stf_file f;
    stf_tensor in;
    if (!stf_open(path, &f) || !stf_get(&f, "input", &in)) {
        CHECK(0, "cannot read %s", path);
        return;
    }
    const char *bss = stf_meta(&f, "blocksize");
    int64_t bs = bss ? atoll(bss) : 0;
    fq_tensor *x = NULL;
    CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CUDA(dev), in.dtype, in.ndim, in.shape, in.data, &x));
    for (int qt = 0; x && qt < 2; qt++)
        for (int dq = 0; dq < 2; dq++) {
            const char *qn = qt ? "fp4" : "nf4";
            char name[128], what[256];
            snprintf(what, sizeof what, "cuda:%d %s %s%s", dev, fname, qn, dq ? " dq" : "");
            fq_quant_params p = {qt ? FQ_QUANT_FP4 : FQ_QUANT_NF4, bs, dq};
            fq_qtensor *q = NULL;
            int ok = fq_quantize_4bit(ctx, x, &p, &q) == FQ_OK;
            if (!ok) fprintf(stderr, "  %s quantize: %s\n", what, fq_ctx_error(ctx));
            if (ok) {
                snprintf(name, sizeof name, "%s.packed", qn);
                ok &= golden_member(ctx, q, FQ_QMEMBER_PACKED, &f, name, 1, what);
                if (!dq) {
                    snprintf(name, sizeof name, "%s.absmax", qn);
                    ok &= golden_member(ctx, q, FQ_QMEMBER_ABSMAX, &f, name, 4, what);
                    snprintf(name, sizeof name, "%s.dequant", qn);
                    ok &= golden_dequant(ctx, q, &f, name, what);
                } else {
                    fq_qtensor_info info;
                    fq_qtensor_get_info(q, &info);
                    snprintf(name, sizeof name, "%s.dq.absmax_q", qn);
                    ok &= golden_member(ctx, q, FQ_QMEMBER_ABSMAX, &f, name, 1, what);
                    snprintf(name, sizeof name, "%s.dq.nested_absmax", qn);
                    ok &= golden_member(ctx, q, FQ_QMEMBER_NESTED_ABSMAX, &f, name, 4, what);
                    snprintf(name, sizeof name, "%s.dq.offset", qn);
                    ok &= stf_match(&f, name, &info.offset, 4, 4, what);
                    snprintf(name, sizeof name, "%s.dq.dequant", qn);
                    ok &= golden_dequant(ctx, q, &f, name, what);
                }
            }
            g_gcases++;
            g_gmatched += ok;
            CHECK(ok, "golden case %s differs from bitsandbytes", what);
            fq_qtensor_free(q);
        }
    fq_tensor_free(x);
    stf_close(&f);
}

static void golden_nan_inf(fq_ctx *ctx, int dev) {
    char path[512];
    snprintf(path, sizeof path, "%s/nan_inf_float32_bs64.safetensors", g_dir);
    stf_file f;
    stf_tensor in;
    if (!stf_open(path, &f) || !stf_get(&f, "input", &in)) { CHECK(0, "cannot read %s", path); return; }
    fq_tensor *x = NULL;
    CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CUDA(dev), in.dtype, in.ndim, in.shape, in.data, &x));
    for (int qt = 0; x && qt < 2; qt++) {
        const char *qn = qt ? "fp4" : "nf4";
        char name[128], what[64];
        snprintf(what, sizeof what, "cuda:%d nan_inf %s", dev, qn);
        fq_quant_params p = {qt ? FQ_QUANT_FP4 : FQ_QUANT_NF4, 64, 0};
        fq_qtensor *q = NULL;
        int ok = fq_quantize_4bit(ctx, x, &p, &q) == FQ_OK;
        if (ok) {
            snprintf(name, sizeof name, "cuda.%s.packed", qn);
            ok &= golden_member(ctx, q, FQ_QMEMBER_PACKED, &f, name, 1, what);
            snprintf(name, sizeof name, "cuda.%s.absmax", qn);
            ok &= golden_member(ctx, q, FQ_QMEMBER_ABSMAX, &f, name, 4, what);
            snprintf(name, sizeof name, "cuda.%s.dequant", qn);
            ok &= golden_dequant(ctx, q, &f, name, what);
        }
        g_gcases++;
        g_gmatched += ok;
        CHECK(ok, "golden case %s differs from bitsandbytes: %s", what, ok ? "" : fq_ctx_error(ctx));
        fq_qtensor_free(q);
    }
    fq_tensor_free(x);
    stf_close(&f);
}

static void golden_blockwise8(fq_ctx *ctx, int dev) {
    char path[512];
    snprintf(path, sizeof path, "%s/blockwise8_float32_bs256.safetensors", g_dir);
    stf_file f;
    stf_tensor in;
    if (!stf_open(path, &f) || !stf_get(&f, "input", &in)) { CHECK(0, "cannot read %s", path); return; }
    int64_t n = in.shape[0], nb = (n + 255) / 256;
    fq_device d = FQ_CUDA(dev);
    fq_tensor *x = NULL, *q = NULL, *am = NULL, *y = NULL;
    int ok = fq_tensor_from_host(ctx, d, FQ_F32, 1, &n, in.data, &x) == FQ_OK &&
             fq_tensor_create(ctx, d, FQ_U8, 1, &n, &q) == FQ_OK &&
             fq_tensor_create(ctx, d, FQ_F32, 1, &nb, &am) == FQ_OK &&
             fq_tensor_create(ctx, d, FQ_F32, 1, &n, &y) == FQ_OK &&
             fq_quantize_8bit_dynamic(ctx, x, 256, q, am) == FQ_OK &&
             fq_dequantize_8bit_dynamic(ctx, q, am, 256, y) == FQ_OK;
    char what[64];
    snprintf(what, sizeof what, "cuda:%d blockwise8", dev);
    if (ok) {
        void *hq = tensor_host(ctx, q), *ha = tensor_host(ctx, am), *hy = tensor_host(ctx, y);
        ok = hq && ha && hy;
        ok = ok && stf_match(&f, "cuda.quantized", hq, (size_t)n, 1, what);
        ok = ok && stf_match(&f, "cuda.absmax", ha, (size_t)nb * 4, 4, what);
        ok = ok && stf_match(&f, "cuda.dequant", hy, (size_t)n * 4, 4, what);
        free(hq);
        free(ha);
        free(hy);
    } else {
        fprintf(stderr, "  %s: %s\n", what, fq_ctx_error(ctx));
    }
    g_gcases++;
    g_gmatched += ok;
    CHECK(ok, "golden case %s differs from bitsandbytes", what);
    fq_tensor_free(x);
    fq_tensor_free(q);
    fq_tensor_free(am);
    fq_tensor_free(y);
    stf_close(&f);
}

static void golden_linear4bit(fq_ctx *ctx, int dev, const char *which) {
    char path[512];
    snprintf(path, sizeof path, "%s/linear4bit_%s.safetensors", g_dir, which);
    stf_file f;
    stf_tensor w;
    if (!stf_open(path, &f) || !stf_get(&f, "weight_fp32", &w)) { CHECK(0, "cannot read %s", path); return; }
    cJSON *qs = cJSON_Parse(stf_meta(&f, "quant_state") ? stf_meta(&f, "quant_state") : "");
    const char *qts = cJSON_GetStringValue(cJSON_GetObjectItem(qs, "quant_type"));
    const cJSON *bsj = cJSON_GetObjectItem(qs, "blocksize");
    int dq = cJSON_GetObjectItem(qs, "nested_offset") != NULL;
    fq_quant_params p = {qts && strcmp(qts, "fp4") == 0 ? FQ_QUANT_FP4 : FQ_QUANT_NF4,
                         bsj ? (int64_t)bsj->valuedouble : 0, dq};
    cJSON_Delete(qs);
    char what[64];
    snprintf(what, sizeof what, "cuda:%d linear4bit %s", dev, which);
    fq_tensor *x = NULL;
    fq_qtensor *q = NULL;
    int ok = fq_tensor_from_host(ctx, FQ_CUDA(dev), w.dtype, w.ndim, w.shape, w.data, &x) == FQ_OK &&
             fq_quantize_4bit(ctx, x, &p, &q) == FQ_OK;
    if (ok) {
        ok &= golden_member(ctx, q, FQ_QMEMBER_PACKED, &f, "weight", 1, what);
        ok &= golden_member(ctx, q, FQ_QMEMBER_ABSMAX, &f, "weight.absmax", dq ? 1 : 4, what);
        ok &= golden_member(ctx, q, FQ_QMEMBER_QUANT_MAP, &f, "weight.quant_map", 4, what);
        if (dq) {
            ok &= golden_member(ctx, q, FQ_QMEMBER_NESTED_ABSMAX, &f, "weight.nested_absmax", 4, what);
            ok &= golden_member(ctx, q, FQ_QMEMBER_NESTED_QUANT_MAP, &f, "weight.nested_quant_map", 4, what);
        }
        ok &= golden_dequant(ctx, q, &f, "weight_dequantized", what);
    } else {
        fprintf(stderr, "  %s: %s\n", what, fq_ctx_error(ctx));
    }
    g_gcases++;
    g_gmatched += ok;
    CHECK(ok, "golden case %s differs from bitsandbytes", what);
    fq_qtensor_free(q);
    fq_tensor_free(x);
    stf_close(&f);
}

static void golden_all(fq_ctx *ctx, int dev) {
    char dir[600];
    snprintf(dir, sizeof dir, "%s/blockwise4", g_dir);
    DIR *d = opendir(dir);
    CHECK(d != NULL, "fixture folder %s (run from the repository root)", dir);
    int files = 0;
    for (struct dirent *e; d && (e = readdir(d));) {
        size_t l = strlen(e->d_name);
        if (l < 12 || strcmp(e->d_name + l - 12, ".safetensors") != 0) continue;
        char path[1200];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        golden_blockwise4(ctx, dev, path, e->d_name);
        files++;
    }
    if (d) closedir(d);
    CHECK(files == 30, "expected 30 blockwise4 fixtures, found %d", files);
    golden_nan_inf(ctx, dev);
    golden_blockwise8(ctx, dev);
    golden_linear4bit(ctx, dev, "fp4");
    golden_linear4bit(ctx, dev, "nf4_dq");
}

/* ---- CPU == CUDA on random inputs ------------------------------------------- */

static int64_t g_cmp_cases, g_cmp_bad;

static void cpu_vs_cuda(fq_ctx *ctx, int dev, fq_dtype dt, int64_t n, int64_t bs, fq_quant_type qt, int dq) {
    char what[160];
    snprintf(what, sizeof what, "cuda:%d %s n=%lld bs=%lld %s%s", dev, fq_dtype_name(dt), (long long)n,
             (long long)bs, fq_quant_type_name(qt), dq ? " dq" : "");
    void *x = make_input(dt, n, bs);
    fq_tensor *xc = NULL, *xg = NULL;
    fq_qtensor *qc = NULL, *qg = NULL;
    fq_quant_params p = {qt, bs, dq};
    int ok = x && fq_tensor_from_host(ctx, FQ_CPU, dt, 1, &n, x, &xc) == FQ_OK &&
             fq_tensor_from_host(ctx, FQ_CUDA(dev), dt, 1, &n, x, &xg) == FQ_OK &&
             fq_quantize_4bit(ctx, xc, &p, &qc) == FQ_OK && fq_quantize_4bit(ctx, xg, &p, &qg) == FQ_OK;
    if (!ok) fprintf(stderr, "  %s: %s\n", what, fq_ctx_error(ctx));
    int64_t bad = 0;
    for (int m = 0; ok && m < FQ_QMEMBER_COUNT; m++) {
        size_t nb = fq_qtensor_member_bytes(qc, (fq_qmember)m);
        if (!nb) continue;
        void *a = member_host(ctx, qg, (fq_qmember)m), *b = member_host(ctx, qc, (fq_qmember)m);
        size_t elem = (m == FQ_QMEMBER_PACKED || (m == FQ_QMEMBER_ABSMAX && dq)) ? 1 : 4;
        char w2[220];
        snprintf(w2, sizeof w2, "%s %s", what, fq_qmember_name((fq_qmember)m));
        bad += (a && b) ? report_diff(w2, a, b, (int64_t)(nb / elem), elem) : 1;
        free(a);
        free(b);
    }
    if (ok && dq) {
        fq_qtensor_info ic, ig;
        fq_qtensor_get_info(qc, &ic);
        fq_qtensor_get_info(qg, &ig);
        if (f2u(ic.offset) != f2u(ig.offset)) {
            fprintf(stderr, "  %s offset: cuda %08x (%.9g), cpu %08x (%.9g)\n", what, f2u(ig.offset), ig.offset,
                    f2u(ic.offset), ic.offset);
            bad++;
        }
    }
    /* Dequantize the CPU's state on both sides, into every output dtype. */
    fq_qtensor *qcg = NULL;
    if (ok && fq_qtensor_copy_to(ctx, qc, FQ_CUDA(dev), &qcg) != FQ_OK) ok = 0;
    const fq_dtype outs[3] = {FQ_F32, FQ_F16, FQ_BF16};
    for (int o = 0; ok && o < 3; o++) {
        fq_tensor *yc = NULL, *yg = NULL;
        if (fq_dequantize_4bit(ctx, qc, (int)outs[o], &yc) != FQ_OK ||
            fq_dequantize_4bit(ctx, qcg, (int)outs[o], &yg) != FQ_OK) {
            fprintf(stderr, "  %s dequantize: %s\n", what, fq_ctx_error(ctx));
            bad++;
        } else {
            void *a = tensor_host(ctx, yg), *b = tensor_host(ctx, yc);
            char w2[220];
            snprintf(w2, sizeof w2, "%s dequantize->%s", what, fq_dtype_name(outs[o]));
            bad += (a && b) ? report_diff(w2, a, b, n, fq_dtype_size(outs[o])) : 1;
            free(a);
            free(b);
        }
        fq_tensor_free(yc);
        fq_tensor_free(yg);
    }
    g_cmp_cases++;
    g_cmp_bad += !ok || bad;
    CHECK(ok && bad == 0, "%s: CUDA differs from CPU", what);
    fq_qtensor_free(qcg);
    fq_qtensor_free(qc);
    fq_qtensor_free(qg);
    fq_tensor_free(xc);
    fq_tensor_free(xg);
    free(x);
}

static void cpu_vs_cuda_all(fq_ctx *ctx, int dev) {
    /* Lengths around blocks, 16-byte vectors and CTA tiles (8192/4096 elements). */
    static const int64_t small[] = {1, 2, 7, 31, 33, 64, 65, 127, 255, 1000, 4095, 4097, 8191, 8193, 3 * 8192 + 4101};
    static const int64_t bss[] = {32, 64, 128, 256, 512, 1024, 2048, 4096};
    static const fq_dtype dts[] = {FQ_F32, FQ_F16, FQ_BF16};
    for (size_t i = 0; i < sizeof small / sizeof small[0]; i++)
        for (size_t b = 0; b < sizeof bss / sizeof bss[0]; b++)
            for (size_t d = 0; d < 3; d++)
                for (int qt = 0; qt < 2; qt++)
                    for (int dq = 0; dq < 2; dq++) cpu_vs_cuda(ctx, dev, dts[d], small[i], bss[b], (fq_quant_type)qt, dq);
    /* Larger: many tiles per CTA, a double-quant state with several nested blocks. */
    static const int64_t big[] = {(1 << 20), (1 << 20) + 333, 3072 * 1024 + 77};
    static const int64_t bbs[] = {32, 64, 4096};
    for (size_t i = 0; i < 3; i++)
        for (size_t b = 0; b < 3; b++)
            for (size_t d = 0; d < 3; d++)
                for (int qt = 0; qt < 2; qt++) cpu_vs_cuda(ctx, dev, dts[d], big[i], bbs[b], (fq_quant_type)qt, 1);
    printf("cuda:%d: CPU == CUDA in %lld of %lld random cases\n", dev, (long long)(g_cmp_cases - g_cmp_bad),
           (long long)g_cmp_cases);
}

/* ---- launchers on their own: torch mean, the 8-bit step, rcp table ------------ */

typedef struct {
    fq_cuda_dev *d;
    fq_cuda_guard g;
} launch_scope;

static int scope_enter(fq_ctx *ctx, int dev, launch_scope *s) {
    return fq_cuda_dev_get(ctx, dev, &s->d) == FQ_OK && fq_cuda_guard_enter(ctx, dev, &s->g) == FQ_OK;
}
static int scope_exit(launch_scope *s, int launch_err) {
    int e = (int)cudaStreamSynchronize(s->d->stream);
    fq_cuda_guard_exit(&s->g);
    return launch_err ? launch_err : e;
}

static void mean_and_q8(fq_ctx *ctx, int dev) {
    /* Every length up to 600, then sizes that split over many of torch's CTAs
     * (126 for FLUX.1's 12288x3072 at blocksize 64, 528+ beyond ~4M). */
    int64_t ns[640];
    int cnt = 0;
    for (int64_t n = 1; n <= 600; n++) ns[cnt++] = n;
    const int64_t more[] = {1023, 4096, 8191, 30001, 65536, 147456, 589824, 1032192, 2000003, 4194305, 70000001};
    for (size_t i = 0; i < sizeof more / sizeof more[0]; i++) ns[cnt++] = more[i];
    int64_t maxn = more[sizeof more / sizeof more[0] - 1];
    float *x = malloc((size_t)maxn * 4);
    uint8_t *q8 = malloc((size_t)maxn), *q8c = malloc((size_t)maxn);
    float *am = malloc((size_t)(maxn / 64 + 2) * 4), *amc = malloc((size_t)(maxn / 64 + 2) * 4);
    float *y = malloc((size_t)maxn * 4), *yc = malloc((size_t)maxn * 4);
    fq_buffer bx = {0}, bq = {0}, ba = {0}, by = {0}, bc = {0};
    int ok = x && q8 && q8c && am && amc && y && yc &&
             fq_buf_alloc(ctx, FQ_CUDA(dev), (size_t)maxn * 4 + 16, &bx) == FQ_OK &&
             fq_buf_alloc(ctx, FQ_CUDA(dev), (size_t)maxn, &bq) == FQ_OK &&
             fq_buf_alloc(ctx, FQ_CUDA(dev), (size_t)(maxn / 64 + 2) * 4, &ba) == FQ_OK &&
             fq_buf_alloc(ctx, FQ_CUDA(dev), (size_t)maxn * 4, &by) == FQ_OK &&
             fq_buf_alloc(ctx, FQ_CUDA(dev), 256 * 4 + 16, &bc) == FQ_OK &&
             fq_buf_write(ctx, &bc, 0, fq_dynamic_map_signed(), 256 * 4) == FQ_OK;
    CHECK(ok, "buffers for the launcher tests: %s", fq_ctx_error(ctx));
    int mean_bad = 0, q8_bad = 0;
    for (int i = 0; ok && i < cnt; i++) {
        int64_t n = ns[i];
        /* absmax-like positives over a wide range, a few zeros */
        for (int64_t k = 0; k < n; k++) x[k] = (rnd() % 97 == 0) ? 0.0f : ldexpf(rnd_unit() + 0.5f, (int)(rnd() % 12) - 8);
        float off_dev = 0.0f;
        launch_scope s;
        ok = fq_buf_write(ctx, &bx, 0, x, (size_t)n * 4) == FQ_OK && scope_enter(ctx, dev, &s);
        if (!ok) break;
        float *dx = bx.ptr, *doff = (float *)((char *)bc.ptr + 256 * 4);
        int e = fq_cuda_torch_mean(dx, n, doff, s.d->stream);
        e = scope_exit(&s, e);
        CHECK(e == 0, "fq_cuda_torch_mean(n=%lld) -> cuda error %d", (long long)n, e);
        if (e || fq_buf_read(ctx, &bc, 256 * 4, &off_dev, 4) != FQ_OK) { ok = 0; break; }
        float off_cpu = fq_cpu_torch_mean(x, n);
        if (f2u(off_dev) != f2u(off_cpu)) {
            if (mean_bad++ < 10)
                fprintf(stderr, "  torch mean n=%lld: cuda %08x (%.9g), cpu %08x (%.9g)\n", (long long)n, f2u(off_dev),
                        off_dev, f2u(off_cpu), off_cpu);
        }
        /* The 8-bit step of double quant with that offset, at a few blocksizes. */
        if ((n % 7 != 1 && n < 600) || n > 4194305) continue;
        const int64_t bs8[] = {64, 256, 4096};
        for (int b = 0; b < 3; b++) {
            int64_t bs = bs8[b], nb = (n + bs - 1) / bs;
            fq_cpu_quantize8(x, off_cpu, n, bs, fq_dynamic_map_signed(), q8c, amc);
            fq_cpu_dequantize8(q8c, amc, fq_dynamic_map_signed(), off_cpu, n, bs, yc);
            if (!scope_enter(ctx, dev, &s)) { ok = 0; break; }
            e = fq_cuda_quantize8(dx, doff, n, bs, bc.ptr, bq.ptr, ba.ptr, s.d->stream);
            if (!e) e = fq_cuda_dequantize8(bq.ptr, ba.ptr, bc.ptr, off_cpu, n, bs, by.ptr, s.d->stream);
            e = scope_exit(&s, e);
            CHECK(e == 0, "quantize8/dequantize8 (n=%lld) -> cuda error %d", (long long)n, e);
            if (e || fq_buf_read(ctx, &bq, 0, q8, (size_t)n) != FQ_OK || fq_buf_read(ctx, &ba, 0, am, (size_t)nb * 4) != FQ_OK ||
                fq_buf_read(ctx, &by, 0, y, (size_t)n * 4) != FQ_OK) { ok = 0; break; }
            char w[96];
            snprintf(w, sizeof w, "cuda:%d quantize8 n=%lld bs=%lld", dev, (long long)n, (long long)bs);
            int64_t d = report_diff(w, q8, q8c, n, 1) + report_diff(w, am, amc, nb, 4) + report_diff(w, y, yc, n, 4);
            q8_bad += d != 0;
        }
    }
    CHECK(mean_bad == 0, "cuda:%d: torch mean differs from the CPU replay for %d lengths", dev, mean_bad);
    CHECK(q8_bad == 0, "cuda:%d: the 8-bit step differs from the CPU in %d cases", dev, q8_bad);
    printf("cuda:%d: torch mean checked on %d lengths (up to %lld), %d differ\n", dev, cnt, (long long)maxn, mean_bad);
    fq_buf_free(&bx);
    fq_buf_free(&bq);
    fq_buf_free(&ba);
    fq_buf_free(&by);
    fq_buf_free(&bc);
    free(x);
    free(q8);
    free(q8c);
    free(am);
    free(amc);
    free(y);
    free(yc);
}

static void rcp_table(fq_ctx *ctx, int dev) {
    const int64_t n = (int64_t)1 << 23;
    uint32_t *h = malloc((size_t)n * 4);
    fq_buffer b = {0};
    launch_scope s;
    int ok = h && fq_buf_alloc(ctx, FQ_CUDA(dev), (size_t)n * 4, &b) == FQ_OK && scope_enter(ctx, dev, &s);
    CHECK(ok, "rcp table buffers: %s", fq_ctx_error(ctx));
    if (ok) {
        int e = scope_exit(&s, fq_cuda_rcp_table(b.ptr, s.d->stream));
        CHECK(e == 0, "fq_cuda_rcp_table -> cuda error %d", e);
        if (!e && fq_buf_read(ctx, &b, 0, h, (size_t)n * 4) == FQ_OK) {
            int64_t diffs = 0, first = -1;
            for (int64_t m = 0; m < n; m++) {
                uint32_t want = f2u(fq_rcp_approx(u2f(0x3f800000u | (uint32_t)m)));
                if (h[m] != want) {
                    if (first < 0) first = m;
                    diffs++;
                }
            }
            printf("cuda:%d: rcp.approx.ftz.f32 differs from the H100 table for %lld of %lld mantissas\n", dev,
                   (long long)diffs, (long long)n);
            if (first >= 0)
                fprintf(stderr, "  first at mantissa 0x%06llx: gpu %08x, table %08x\n", (long long)first, h[first],
                        f2u(fq_rcp_approx(u2f(0x3f800000u | (uint32_t)first))));
            CHECK(diffs == 0, "this GPU's reciprocal differs from the H100's: quantized bytes would differ");
        }
    }
    fq_buf_free(&b);
    free(h);
}

/* ---- more than 2^31 elements ---------------------------------------------------- */

static size_t free_bytes(fq_ctx *ctx, int dev) {
    launch_scope s;
    size_t fr = 0, tot = 0;
    if (!scope_enter(ctx, dev, &s)) return 0;
    cudaError_t e = cudaMemGetInfo(&fr, &tot);
    fq_cuda_guard_exit(&s.g);
    return e == cudaSuccess ? fr : 0;
}

/* Reads bytes [off, off+n) of member m of q into dst. */
static int member_slice(fq_ctx *ctx, const fq_qtensor *q, fq_qmember m, size_t off, size_t n, void *dst) {
    return fq_buf_read(ctx, &q->buf, q->m[m].offset + off, dst, n) == FQ_OK;
}

static void huge_tensor(fq_ctx *ctx, int dev) {
    const int64_t n = ((int64_t)1 << 31) + 4097, bs = 64, nb = (n + bs - 1) / bs;
    size_t fr = free_bytes(ctx, dev);
    if (fr < ((size_t)16 << 30)) {
        SKIP("cuda:%d: %zu MiB free, the 2^31+4097-element test needs 16 GiB", dev, fr >> 20);
        return;
    }
    uint16_t *x = malloc((size_t)n * 2);
    if (!x) { SKIP("no host memory for the 2^31-element test"); return; }
    for (int64_t i = 0; i < n; i++) { /* cheap varied bf16 values, 2^-15 .. 2^16, both signs */
        uint32_t h = (uint32_t)i * 2654435761u ^ (uint32_t)(i >> 11) * 40503u;
        x[i] = (uint16_t)(((h >> 16) & 0x8000u) | (0x3800u + ((h >> 5) & 0x0fffu)));
    }
    for (int64_t i = 0; i < 64; i++) x[(((int64_t)1 << 31) - 64) + i] = 0; /* an all-zero block at the 2^31 edge */
    fq_tensor *xg = NULL, *yg = NULL;
    fq_qtensor *q = NULL;
    fq_quant_params p = {FQ_QUANT_NF4, bs, 0};
    int ok = fq_tensor_from_host(ctx, FQ_CUDA(dev), FQ_BF16, 1, &n, x, &xg) == FQ_OK &&
             fq_quantize_4bit(ctx, xg, &p, &q) == FQ_OK;
    CHECK(ok, "quantize of 2^31+4097 elements on cuda:%d: %s", dev, fq_ctx_error(ctx));
    float *absmax = ok ? malloc((size_t)nb * 4) : NULL;
    ok = ok && absmax && member_slice(ctx, q, FQ_QMEMBER_ABSMAX, 0, (size_t)nb * 4, absmax);
    if (ok) ok = fq_dequantize_4bit(ctx, q, -1, &yg) == FQ_OK;
    CHECK(ok, "dequantize of 2^31+4097 elements on cuda:%d: %s", dev, fq_ctx_error(ctx));
    /* Slices: the start, across 2^31 (and 2^31 bytes of input), the partial end. */
    const int64_t L = 1 << 20;
    const int64_t starts[] = {0, ((int64_t)1 << 30) - L / 2, ((int64_t)1 << 31) - L / 2, (n - L) / bs * bs};
    const int64_t cap = L + bs; /* the last slice runs to the partial end */
    uint8_t *pk = malloc((size_t)cap / 2 + 2), *pkc = malloc((size_t)cap / 2 + 2);
    float *amc = malloc((size_t)(cap / bs + 2) * 4);
    uint16_t *y = malloc((size_t)cap * 2), *yc = malloc((size_t)cap * 2);
    int64_t bad = 0;
    ok = ok && pk && pkc && amc && y && yc;
    for (int i = 0; ok && i < 4; i++) {
        /* n is only 4097 past 2^31: the slice across 2^31 also ends at n */
        int64_t s0 = starts[i] / bs * bs, len = (i == 3 || n - s0 < L) ? n - s0 : L, lnb = (len + bs - 1) / bs;
        fq_cpu_quantize4(ctx, x + s0, FQ_BF16, len, bs, FQ_QUANT_NF4, pkc, amc);
        fq_cpu_dequantize4(ctx, pkc, amc, len, bs, FQ_QUANT_NF4, yc, FQ_BF16);
        ok = member_slice(ctx, q, FQ_QMEMBER_PACKED, (size_t)s0 / 2, (size_t)(len + 1) / 2, pk) &&
             fq_buf_read(ctx, &yg->buf, (size_t)s0 * 2, y, (size_t)len * 2) == FQ_OK;
        if (!ok) break;
        char w[96];
        snprintf(w, sizeof w, "cuda:%d 2^31+4097 slice at %lld", dev, (long long)s0);
        bad += report_diff(w, pk, pkc, (len + 1) / 2, 1);
        bad += report_diff(w, absmax + s0 / bs, amc, lnb, 4);
        bad += report_diff(w, y, yc, len, 2);
    }
    CHECK(ok && bad == 0, "2^31+4097 elements on cuda:%d: slices differ from the CPU", dev);
    fq_tensor_free(yg);
    yg = NULL;
    fq_qtensor_free(q);
    q = NULL;
    /* Double quant of the same tensor: offset over 33.5M absmax values, the 8-bit step. */
    if (ok) {
        float off_cpu = fq_cpu_torch_mean(absmax, nb);
        uint8_t *qa = malloc((size_t)nb), *qac = malloc((size_t)nb);
        int64_t nn = (nb + 255) / 256;
        float *na = malloc((size_t)nn * 4), *nac = malloc((size_t)nn * 4);
        fq_quant_params pd = {FQ_QUANT_NF4, bs, 1};
        ok = qa && qac && na && nac && fq_quantize_4bit(ctx, xg, &pd, &q) == FQ_OK;
        CHECK(ok, "double-quant of 2^31+4097 elements on cuda:%d: %s", dev, fq_ctx_error(ctx));
        if (ok) {
            fq_cpu_quantize8(absmax, off_cpu, nb, 256, fq_dynamic_map_signed(), qac, nac);
            fq_qtensor_info info;
            fq_qtensor_get_info(q, &info);
            ok = member_slice(ctx, q, FQ_QMEMBER_ABSMAX, 0, (size_t)nb, qa) &&
                 member_slice(ctx, q, FQ_QMEMBER_NESTED_ABSMAX, 0, (size_t)nn * 4, na);
            CHECK(f2u(info.offset) == f2u(off_cpu), "2^31 offset: cuda %.9g, cpu %.9g", info.offset, off_cpu);
            CHECK(ok && report_diff("2^31 absmax codes", qa, qac, nb, 1) == 0, "2^31 double-quant codes differ");
            CHECK(ok && report_diff("2^31 nested absmax", na, nac, nn, 4) == 0, "2^31 nested absmax differs");
            /* Dequantize through the nested state; check the last slice. */
            if (ok && fq_dequantize_4bit(ctx, q, -1, &yg) == FQ_OK) {
                int64_t s0 = (n - L) / bs * bs, len = n - s0, lnb = (len + bs - 1) / bs;
                float *amd = malloc((size_t)lnb * 4);
                uint8_t *pkl = malloc((size_t)(len + 1) / 2);
                uint16_t *yl = malloc((size_t)len * 2), *ylc = malloc((size_t)len * 2);
                if (amd && pkl && yl && ylc && member_slice(ctx, q, FQ_QMEMBER_PACKED, (size_t)s0 / 2, (size_t)(len + 1) / 2, pkl) &&
                    fq_buf_read(ctx, &yg->buf, (size_t)s0 * 2, yl, (size_t)len * 2) == FQ_OK) {
                    /* blocks s0/bs .. : nested block of block b is b / 256 */
                    for (int64_t b = 0; b < lnb; b++) {
                        int64_t gb = s0 / bs + b;
                        fq_cpu_dequantize8(qac + gb, nac + gb / 256, fq_dynamic_map_signed(), off_cpu, 1, 256, amd + b);
                    }
                    fq_cpu_dequantize4(ctx, pkl, amd, len, bs, FQ_QUANT_NF4, ylc, FQ_BF16);
                    CHECK(report_diff("2^31 nested dequantize, last slice", yl, ylc, len, 2) == 0,
                          "nested dequantize differs");
                } else {
                    CHECK(0, "reading the nested dequantize result: %s", fq_ctx_error(ctx));
                }
                free(amd);
                free(pkl);
                free(yl);
                free(ylc);
            } else {
                CHECK(0, "nested dequantize of 2^31+4097 elements: %s", fq_ctx_error(ctx));
            }
        }
        free(qa);
        free(qac);
        free(na);
        free(nac);
    }
    printf("cuda:%d: 2^31+4097 bf16 elements quantized and dequantized, slices %s\n", dev,
           ok && bad == 0 ? "match the CPU" : "DIFFER");
    fq_tensor_free(yg);
    fq_qtensor_free(q);
    fq_tensor_free(xg);
    free(absmax);
    free(pk);
    free(pkc);
    free(amc);
    free(y);
    free(yc);
    free(x);
}

/* ---- moves and the seed scenario ---------------------------------------------- */

static int members_equal(fq_ctx *ctx, const fq_qtensor *a, const fq_qtensor *b) {
    int same = 1;
    for (int m = 0; m < FQ_QMEMBER_COUNT; m++) {
        size_t n = fq_qtensor_member_bytes(a, (fq_qmember)m);
        if (n != fq_qtensor_member_bytes(b, (fq_qmember)m)) return 0;
        if (!n) continue;
        void *x = member_host(ctx, a, (fq_qmember)m), *y = member_host(ctx, b, (fq_qmember)m);
        same &= x && y && memcmp(x, y, n) == 0;
        free(x);
        free(y);
    }
    return same;
}

static void *dequant_bytes(fq_ctx *ctx, const fq_qtensor *q, size_t *n) {
    fq_tensor *y = NULL;
    if (fq_dequantize_4bit(ctx, q, -1, &y) != FQ_OK) return NULL;
    void *h = tensor_host(ctx, y);
    *n = fq_tensor_nbytes(y);
    fq_tensor_free(y);
    return h;
}

static void moves(fq_ctx *ctx, int ndev) {
    int last = ndev - 1;
    int64_t shape[2] = {96, 200};
    void *x = make_input(FQ_BF16, 96 * 200, 64);
    fq_tensor *xt = NULL;
    fq_qtensor *q = NULL, *ref = NULL;
    fq_quant_params p = {FQ_QUANT_NF4, 64, 1};
    CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CUDA(0), FQ_BF16, 2, shape, x, &xt));
    CHECK_OK(ctx, fq_quantize_4bit(ctx, xt, &p, &q));
    CHECK_OK(ctx, fq_qtensor_copy_to(ctx, q, FQ_CPU, &ref)); /* a snapshot of every member */
    if (!q || !ref) goto out;
    fq_qtensor_set_name(ctx, q, "transformer_blocks.0.ff.net.0.proj");
    size_t n0 = 0, n1 = 0;
    void *y0 = dequant_bytes(ctx, q, &n0);
    CHECK(y0 != NULL, "dequantize on cuda:0: %s", fq_ctx_error(ctx));
    const fq_device targets[2] = {FQ_CPU, FQ_CUDA(last)};
    for (int t = 0; t < 2; t++) {
        char dn[16];
        fq_device_name(targets[t], dn, sizeof dn);
        fq_device before = qdev(q);
        /* Fail each of the first allocations the move makes: all-or-nothing. */
        for (int k = 1; k <= 2; k++) {
            fq_test_fail_alloc_in(ctx, k);
            fq_status s = fq_qtensor_move(ctx, q, targets[t]);
            fq_test_fail_alloc_in(ctx, 0);
            if (s == FQ_OK) { /* the move needed fewer allocations than k: undo for the next round */
                CHECK_OK(ctx, fq_qtensor_move(ctx, q, before));
                continue;
            }
            CHECK(s == FQ_ERR_OUT_OF_MEMORY, "move to %s with allocation %d failing -> %s", dn, k, fq_status_str(s));
            CHECK(fq_device_equal(qdev(q), before), "a failed move left the source where it was");
            CHECK(members_equal(ctx, q, ref), "a failed move to %s left every member intact", dn);
        }
        CHECK_OK(ctx, fq_qtensor_move(ctx, q, targets[t]));
        CHECK(fq_device_equal(qdev(q), targets[t]), "moved to %s", dn);
        CHECK(members_equal(ctx, q, ref), "every member arrived on %s unchanged (never re-quantized)", dn);
        CHECK(strcmp(fq_qtensor_name(q), "transformer_blocks.0.ff.net.0.proj") == 0, "name kept");
    }
    void *y1 = dequant_bytes(ctx, q, &n1);
    CHECK(y0 && y1 && n0 == n1 && memcmp(y0, y1, n0) == 0,
          "dequantize after cuda:0 -> cpu -> cuda:%d equals dequantize on cuda:0", last);
    free(y0);
    free(y1);
out:
    fq_qtensor_free(q);
    fq_qtensor_free(ref);
    fq_tensor_free(xt);
    free(x);
}

/* diffusers#10798: quant_map left behind on another device. Every op must
 * refuse with a message naming the tensor, the member and both devices. */
static void seed_scenario(fq_ctx *ctx, int ndev) {
    fq_device other = ndev > 1 ? FQ_CUDA(1) : FQ_CPU;
    char on[16];
    fq_device_name(other, on, sizeof on);
    int64_t shape[2] = {64, 64};
    void *x = make_input(FQ_BF16, 64 * 64, 64);
    fq_tensor *xt = NULL;
    CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CUDA(0), FQ_BF16, 2, shape, x, &xt));
    const fq_qmember ms[2] = {FQ_QMEMBER_QUANT_MAP, FQ_QMEMBER_NESTED_QUANT_MAP};
    for (int dq = 0; xt && dq < 2; dq++)
        for (int i = 0; i <= dq; i++) {
            fq_quant_params p = {FQ_QUANT_NF4, 64, dq};
            fq_qtensor *q = NULL;
            fq_tensor *y = NULL;
            CHECK_OK(ctx, fq_quantize_4bit(ctx, xt, &p, &q));
            if (!q) continue;
            CHECK_OK(ctx, fq_qtensor_set_name(ctx, q, "transformer_blocks.3.attn.to_q"));
            CHECK_OK(ctx, fq_test_misplace_member(ctx, q, ms[i], other));
            fq_status s = fq_dequantize_4bit(ctx, q, -1, &y);
            const char *msg = fq_ctx_error(ctx);
            CHECK(s == FQ_ERR_DEVICE_MISMATCH && y == NULL, "misplaced %s on %s -> %s", fq_qmember_name(ms[i]), on,
                  fq_status_str(s));
            CHECK(strstr(msg, "transformer_blocks.3.attn.to_q") && strstr(msg, fq_qmember_name(ms[i])) &&
                      strstr(msg, "cuda:0") && strstr(msg, on),
                  "message names tensor, member and both devices: %s", msg);
            fq_tensor_free(y);
            fq_qtensor_free(q); /* frees the stray copy as well */
        }
    fq_tensor_free(xt);
    free(x);
}

#endif /* FQ_HAVE_CUDA */

int main(int argc, char **argv) {
    if (getenv("FQ_TEST_GOLDEN_QUANT")) g_dir = getenv("FQ_TEST_GOLDEN_QUANT");
    int quick = argc > 1 && strcmp(argv[1], "--quick") == 0; /* skips the 2^31 test */
    setvbuf(stdout, NULL, _IONBF, 0); /* results survive a crash */
    int ndev = fq_cuda_device_count();
    if (ndev == 0) {
        SKIP("no CUDA device: the CUDA quantization tests need a GPU");
        return check_summary("test_cuda_quant");
    }
#ifdef FQ_HAVE_CUDA
    fq_ctx *ctx;
    CHECK(fq_ctx_create(&ctx) == FQ_OK, "ctx");
    for (int dev = 0; dev < ndev; dev++) {
        g_gcases = g_gmatched = 0;
        golden_all(ctx, dev);
        printf("cuda:%d: golden: %d of %d bitsandbytes cases byte-identical\n", dev, g_gmatched, g_gcases);
        g_cmp_cases = g_cmp_bad = 0;
        cpu_vs_cuda_all(ctx, dev);
        fprintf(stderr, "section: torch mean and 8-bit step\n");
        mean_and_q8(ctx, dev);
        fprintf(stderr, "section: rcp table\n");
        rcp_table(ctx, dev);
    }
    fprintf(stderr, "section: 2^31+ elements\n");
    if (!quick) huge_tensor(ctx, 0);
    else SKIP("--quick: the 2^31+4097-element test");
    fprintf(stderr, "section: moves\n");
    moves(ctx, ndev);
    fprintf(stderr, "section: seed scenario\n");
    seed_scenario(ctx, ndev);
    fq_ctx_free(ctx);
#else
    (void)quick;
#endif
    return check_summary("test_cuda_quant");
}

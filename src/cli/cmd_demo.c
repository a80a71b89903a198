/* fluxq demo: the built-in default job. Generates a small FLUX-shaped
 * checkpoint, quantizes it like `fluxq quantize`, then on every device:
 * quantizes again (same bytes?), moves the loaded 4-bit weights there
 * (all-or-nothing) and dequantizes (same bytes?), and reports the error. */
#include "cli/convert.h"
#include "io/bnb_io.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *HELP =
    "usage: fluxq demo [--device DEV]... [--type nf4|fp4] [--no-double-quant] [--keep DIR]\n"
    "\n"
    "Generates a FLUX.1-shaped checkpoint (one attention block: to_q, to_k, to_v,\n"
    "to_out.0 of 3072x3072 in bf16, plus biases and norm scales), quantizes it with\n"
    "bitsandbytes' format, then on every device (default: cpu and every GPU) quantizes\n"
    "again and compares bytes, moves the 4-bit weights there, dequantizes and compares\n"
    "bytes, and reports the quantization error. Needs no download.\n"
    "\n"
    "  --device DEV        a device to visit (repeatable; default: all)\n"
    "  --type nf4|fp4      4-bit code (default nf4)\n"
    "  --no-double-quant   keep absmax in f32\n"
    "  --keep DIR          write the checkpoints into DIR and keep them\n";

#define MAX_DEV 66
#define DIM 3072

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static double uniform(void) {
    g_rng ^= g_rng << 13, g_rng ^= g_rng >> 7, g_rng ^= g_rng << 17;
    return ((double)(g_rng >> 11) + 0.5) / 9007199254740992.0;
}
static double normal(void) { return sqrt(-2.0 * log(uniform())) * cos(6.283185307179586 * uniform()); }

static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static fq_status add_random(fq_ctx *ctx, fq_st_writer *w, const char *name, int ndim, const int64_t *shape,
                            double mean, double std) {
    int64_t n = fq_shape_numel(ndim, shape);
    uint16_t *d = malloc((size_t)n * 2);
    if (!d) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    for (int64_t i = 0; i < n; i++) d[i] = to_bf16((float)(mean + std * normal()));
    return fq_st_writer_add(ctx, w, name, FQ_BF16, ndim, shape, d, (size_t)n * 2, 1);
}

static fq_status make_checkpoint(fq_ctx *ctx, const char *path) {
    static const char *lin[] = {"to_q", "to_k", "to_v", "to_out.0"};
    fq_st_writer *w;
    FQ_TRY(fq_st_writer_create(ctx, &w));
    fq_status s = FQ_OK;
    char name[128];
    int64_t wshape[2] = {DIM, DIM}, bshape[1] = {DIM}, nshape[1] = {128};
    for (int i = 0; s == FQ_OK && i < 4; i++) {
        snprintf(name, sizeof name, "transformer_blocks.0.attn.%s.weight", lin[i]);
        s = add_random(ctx, w, name, 2, wshape, 0.0, 1.0 / sqrt((double)DIM));
        snprintf(name, sizeof name, "transformer_blocks.0.attn.%s.bias", lin[i]);
        if (s == FQ_OK) s = add_random(ctx, w, name, 1, bshape, 0.0, 0.05);
    }
    if (s == FQ_OK) s = add_random(ctx, w, "transformer_blocks.0.attn.norm_q.weight", 1, nshape, 1.0, 0.1);
    if (s == FQ_OK) s = add_random(ctx, w, "transformer_blocks.0.attn.norm_k.weight", 1, nshape, 1.0, 0.1);
    if (s == FQ_OK) s = fq_st_writer_commit(ctx, w, path);
    fq_st_writer_free(w);
    return s;
}

typedef struct {
    fq_device dev;
    double quant_ms, move_ms, dequant_ms;
    bool quant_same, dequant_same;
} dev_report;

/* Copies q's packed and absmax bytes to one host buffer for comparison. Caller frees. */
static uint8_t *state_bytes(fq_ctx *ctx, const fq_qtensor *q, size_t *len) {
    size_t a = fq_qtensor_member_bytes(q, FQ_QMEMBER_PACKED), b = fq_qtensor_member_bytes(q, FQ_QMEMBER_ABSMAX);
    uint8_t *buf = malloc(a + b);
    if (!buf) return NULL;
    if (fq_qtensor_member_to_host(ctx, q, FQ_QMEMBER_PACKED, buf) != FQ_OK ||
        fq_qtensor_member_to_host(ctx, q, FQ_QMEMBER_ABSMAX, buf + a) != FQ_OK) {
        free(buf);
        return NULL;
    }
    *len = a + b;
    return buf;
}

/* One weight through every device. ref_deq: dequantized bytes of the first device. */
static fq_status visit_weight(fq_ctx *ctx, const fq_st_set *in, const fq_st_set *qset, const char *P,
                              const fq_quant_params *qp, dev_report *rep, int ndev, double *err2, double *ref2) {
    const fq_st_tensor *orig = fq_st_set_find(in, P);
    fq_qtensor *q = NULL;
    FQ_TRY(fq_bnb_load(ctx, qset, P, FQ_CPU, &q));
    size_t flen = 0;
    uint8_t *file_bytes = state_bytes(ctx, q, &flen);
    uint16_t *first = NULL;
    fq_status s = file_bytes ? FQ_OK : fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    for (int d = 0; s == FQ_OK && d < ndev; d++) {
        dev_report *r = &rep[d];
        /* quantize the original again on this device: the same bytes as the file? */
        fq_tensor *x = NULL;
        fq_qtensor *q2 = NULL;
        s = fq_tensor_from_host(ctx, r->dev, orig->dtype, orig->ndim, orig->shape, orig->data, &x);
        double t0 = now_ms();
        if (s == FQ_OK) s = fq_quantize_4bit(ctx, x, qp, &q2);
        r->quant_ms += now_ms() - t0;
        size_t len2 = 0;
        uint8_t *b2 = s == FQ_OK ? state_bytes(ctx, q2, &len2) : NULL;
        if (s == FQ_OK && !(b2 && len2 == flen && memcmp(b2, file_bytes, flen) == 0)) r->quant_same = false;
        free(b2);
        fq_qtensor_free(q2);
        fq_tensor_free(x);
        /* move the loaded weight here (all-or-nothing) and dequantize on this device */
        t0 = now_ms();
        if (s == FQ_OK) s = fq_qtensor_move(ctx, q, r->dev);
        r->move_ms += now_ms() - t0;
        fq_tensor *y = NULL;
        t0 = now_ms();
        if (s == FQ_OK) s = fq_dequantize_4bit(ctx, q, -1, &y);
        r->dequant_ms += now_ms() - t0;
        uint16_t *h = NULL;
        if (s == FQ_OK && !(h = malloc(fq_tensor_nbytes(y)))) s = fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
        if (s == FQ_OK) s = fq_tensor_to_host(ctx, y, h);
        if (s == FQ_OK && !first) {
            first = h;
            h = NULL;
            const uint16_t *o = orig->data; /* bf16 input; may be unaligned: copy per element */
            for (int64_t i = 0; i < orig->numel; i++) {
                uint16_t ov;
                memcpy(&ov, (const char *)o + 2 * i, 2);
                double a = from_bf16(ov), b = from_bf16(first[i]);
                *err2 += (a - b) * (a - b);
                *ref2 += a * a;
            }
        } else if (s == FQ_OK && memcmp(h, first, fq_tensor_nbytes(y)) != 0) {
            r->dequant_same = false;
        }
        free(h);
        fq_tensor_free(y);
    }
    free(first);
    free(file_bytes);
    fq_qtensor_free(q);
    return s;
}

int cmd_demo(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) { fputs(HELP, stdout); return EXIT_OK; }
    fq_ctx *ctx;
    if (fq_ctx_create(&ctx) != FQ_OK) return EXIT_ERR;
    fq_ctx_set_log(ctx, cli_log, NULL, FQ_LOG_WARN);
    dev_report rep[MAX_DEV];
    int ndev = 0, rc = EXIT_OK;
    fq_quant_params qp = fq_quant_default_params();
    qp.double_quant = 1;
    const char *keep = NULL;
    for (int i = 1; i < argc && rc == EXIT_OK; i++) {
        bool miss = false;
        const char *v;
        if ((v = cli_opt(argc, argv, &i, "--device", &miss))) {
            if (ndev == MAX_DEV) rc = cli_usage_error("demo", "too many devices");
            else if (fq_device_parse(ctx, v, &rep[ndev].dev) != FQ_OK) rc = cli_usage_error("demo", "%s", fq_ctx_error(ctx));
            else ndev++;
        } else if ((v = cli_opt(argc, argv, &i, "--type", &miss))) {
            if (fq_quant_type_parse(ctx, v, &qp.type) != FQ_OK) rc = cli_usage_error("demo", "%s", fq_ctx_error(ctx));
        } else if (!strcmp(argv[i], "--no-double-quant")) {
            qp.double_quant = 0;
        } else if ((v = cli_opt(argc, argv, &i, "--keep", &miss))) {
            keep = v;
        } else {
            rc = cli_usage_error("demo", miss ? "%s needs a value" : "unknown argument '%s'", argv[i]);
        }
    }
    if (rc != EXIT_OK) { fq_ctx_free(ctx); return rc; }
    if (ndev == 0) {
        rep[ndev++].dev = FQ_CPU;
        int n = fq_cuda_device_count();
        for (int i = 0; i < n && ndev < MAX_DEV; i++) rep[ndev++].dev = FQ_CUDA(i);
    }
    fq_status s = FQ_OK;
    for (int d = 0; d < ndev; d++) {
        rep[d].quant_ms = rep[d].move_ms = rep[d].dequant_ms = 0;
        rep[d].quant_same = rep[d].dequant_same = true;
        if (s == FQ_OK) s = fq_device_check(ctx, rep[d].dev);
    }
    char dir[4096] = "", src[4200], dst[4200];
    if (s == FQ_OK) {
        if (keep) snprintf(dir, sizeof dir, "%s", keep);
        else {
            snprintf(dir, sizeof dir, "%s/fluxq-demo-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
            if (!mkdtemp(dir)) s = fq_err(ctx, FQ_ERR_IO, "cannot create a temporary folder in %s", dir);
        }
    }
    snprintf(src, sizeof src, "%s/example-bf16.safetensors", dir);
    snprintf(dst, sizeof dst, "%s/example-%s.safetensors", dir, fq_quant_type_name(qp.type));
    char dn[16];
    if (s == FQ_OK) {
        printf("fluxq demo: generating a FLUX-shaped bf16 checkpoint (4 x %dx%d linear weights) in %s\n", DIM, DIM, dir);
        s = make_checkpoint(ctx, src);
    }
    cli_convert_opts o = {.quantize = true, .params = qp, .out_dtype = -1, .device = rep[0].dev, .quiet = true};
    static cli_convert_stats st;
    if (s == FQ_OK) {
        printf("quantizing to %s, blocksize %lld%s on %s (bitsandbytes format)\n", fq_quant_type_name(qp.type),
               (long long)qp.blocksize, qp.double_quant ? ", double quant" : "", fq_device_name(o.device, dn, sizeof dn));
        s = cli_convert(ctx, &o, src, dst, &st);
        cli_convert_stats_clear(&st);
    }
    fq_st_set *in = NULL, *qset = NULL;
    if (s == FQ_OK) s = fq_st_set_open(ctx, src, &in);
    if (s == FQ_OK) s = fq_st_set_open(ctx, dst, &qset);
    double err2 = 0, ref2 = 0;
    int nw = 0;
    for (int64_t i = 0; s == FQ_OK && i < fq_st_set_count(qset); i++) {
        const fq_st_tensor *t = fq_st_set_get(qset, i);
        if (!fq_bnb_is_quantized(qset, t->name, NULL)) continue;
        s = visit_weight(ctx, in, qset, t->name, &qp, rep, ndev, &err2, &ref2);
        nw++;
    }
    if (s != FQ_OK) {
        rc = cli_fail(ctx, "demo", s);
    } else {
        bool all_same = true;
        printf("\n%-8s %12s %12s %12s  %-22s %-22s\n", "device", "quantize ms", "move ms", "dequant ms",
               "quantized bytes", "dequantized bytes");
        for (int d = 0; d < ndev; d++) {
            printf("%-8s %12.2f %12.2f %12.2f  %-22s %-22s\n", fq_device_name(rep[d].dev, dn, sizeof dn),
                   rep[d].quant_ms, rep[d].move_ms, rep[d].dequant_ms,
                   rep[d].quant_same ? "= file" : "DIFFERENT", d == 0 ? "(reference)" : rep[d].dequant_same ? "= first device" : "DIFFERENT");
            all_same = all_same && rep[d].quant_same && rep[d].dequant_same;
        }
        printf("\n%d weights, %s: relative L2 error of the dequantized weights %.5f\n", nw, fq_quant_type_name(qp.type),
               ref2 > 0 ? sqrt(err2 / ref2) : 0.0);
        printf("every device produced the same bytes: %s\n", all_same ? "yes" : "NO");
        if (!all_same) rc = EXIT_ERR;
    }
    fq_st_set_close(qset);
    fq_st_set_close(in);
    if (!keep && dir[0]) {
        unlink(src);
        unlink(dst);
        rmdir(dir);
    } else if (keep && rc == EXIT_OK) {
        printf("checkpoints kept: %s, %s\n", src, dst);
    }
    fq_ctx_free(ctx);
    return rc;
}

/* Quantized tensors as one unit: layout, moves, copies, validation, placement checks. */
#include "core/qtensor.h"
#include "formats/formats.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *g_member_names[FQ_QMEMBER_COUNT] = {
    "packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map"};

const char *fq_qmember_name(fq_qmember m) {
    return (unsigned)m < FQ_QMEMBER_COUNT ? g_member_names[m] : "?";
}

const char *fq_quant_type_name(fq_quant_type q) { return q == FQ_QUANT_FP4 ? "fp4" : "nf4"; }

fq_status fq_quant_type_parse(fq_ctx *ctx, const char *s, fq_quant_type *out) {
    if (s && strcmp(s, "nf4") == 0) { *out = FQ_QUANT_NF4; return FQ_OK; }
    if (s && strcmp(s, "fp4") == 0) { *out = FQ_QUANT_FP4; return FQ_OK; }
    return fq_err(ctx, FQ_ERR_INVALID_ARG, "unknown quant type '%s' (expected nf4 or fp4)", s ? s : "");
}

fq_quant_params fq_quant_default_params(void) {
    return (fq_quant_params){FQ_QUANT_NF4, 64, 0};
}

int fq_blocksize_valid(int64_t bs) {
    return bs == 32 || bs == 64 || bs == 128 || bs == 256 || bs == 512 || bs == 1024 || bs == 2048 ||
           bs == 4096;
}

static size_t align_up(size_t x) { return (x + 255) & ~(size_t)255; }

fq_status fq_qtensor_layout(fq_ctx *ctx, fq_qtensor_info *info, fq_qmember_loc m[FQ_QMEMBER_COUNT]) {
    if (!fq_blocksize_valid(info->blocksize))
        return fq_err(ctx, FQ_ERR_INVALID_ARG,
                      "unsupported blocksize %lld (expected 32, 64, 128, 256, 512, 1024, 2048 or 4096)",
                      (long long)info->blocksize);
    if (info->type != FQ_QUANT_NF4 && info->type != FQ_QUANT_FP4)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "unknown quant type %d", (int)info->type);
    if (info->ndim < 0 || info->ndim > FQ_MAX_DIMS)
        return fq_err(ctx, FQ_ERR_SHAPE, "quantized tensor rank %d out of range", info->ndim);
    int64_t n = 1;
    for (int i = 0; i < info->ndim; i++) {
        if (info->shape[i] < 0 || (info->shape[i] && n > (INT64_MAX / 4) / info->shape[i]))
            return fq_err(ctx, FQ_ERR_SHAPE, "quantized tensor dimension %lld out of range",
                          (long long)info->shape[i]);
        n *= info->shape[i];
    }
    info->numel = n;
    info->nblocks = (n + info->blocksize - 1) / info->blocksize;
    info->nested_nblocks = info->double_quant ? (info->nblocks + 255) / 256 : 0;
    size_t sz[FQ_QMEMBER_COUNT] = {
        (size_t)((n + 1) / 2),
        (size_t)info->nblocks * (info->double_quant ? 1 : 4),
        16 * sizeof(float),
        (size_t)info->nested_nblocks * 4,
        info->double_quant ? 256 * sizeof(float) : 0,
    };
    size_t off = 0;
    for (int i = 0; i < FQ_QMEMBER_COUNT; i++) {
        m[i].offset = off;
        m[i].bytes = sz[i];
        m[i].ptr = NULL;
        off = align_up(off + sz[i]);
    }
    info->bytes = off;
    return FQ_OK;
}

static void point_members(fq_qtensor *q) {
    for (int i = 0; i < FQ_QMEMBER_COUNT; i++) {
        q->m[i].dev = q->buf.dev;
        q->m[i].ptr = q->m[i].bytes ? (char *)q->buf.ptr + q->m[i].offset : NULL;
    }
    q->info.device = q->buf.dev;
}

fq_status fq_qtensor_alloc(fq_ctx *ctx, fq_device dev, const fq_qtensor_info *info, fq_qtensor **out) {
    fq_qtensor *q = calloc(1, sizeof *q);
    if (!q) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    q->info = *info;
    fq_status s = fq_qtensor_layout(ctx, &q->info, q->m);
    if (s == FQ_OK) s = fq_device_check(ctx, dev);
    if (s == FQ_OK) s = fq_buf_alloc(ctx, dev, q->info.bytes, &q->buf);
    if (s != FQ_OK) { free(q); return s; }
    point_members(q);
    s = fq_buf_write(ctx, &q->buf, q->m[FQ_QMEMBER_QUANT_MAP].offset, fq_quant_map(info->type),
                     16 * sizeof(float));
    if (s == FQ_OK && info->double_quant)
        s = fq_buf_write(ctx, &q->buf, q->m[FQ_QMEMBER_NESTED_QUANT_MAP].offset,
                         fq_dynamic_map_signed(), 256 * sizeof(float));
    if (s != FQ_OK) { fq_qtensor_free(q); return s; }
    *out = q;
    return FQ_OK;
}

void fq_qtensor_free(fq_qtensor *q) {
    if (!q) return;
    fq_buf_free(&q->buf);
    fq_buf_free(&q->stray);
    free(q->name);
    free(q);
}

void fq_qtensor_get_info(const fq_qtensor *q, fq_qtensor_info *info) { *info = q->info; }
const char *fq_qtensor_name(const fq_qtensor *q) { return q->name ? q->name : ""; }

fq_status fq_qtensor_set_name(fq_ctx *ctx, fq_qtensor *q, const char *name) {
    char *n = fq_strdup(name);
    if (!n) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    free(q->name);
    q->name = n;
    return FQ_OK;
}

size_t fq_qtensor_member_bytes(const fq_qtensor *q, fq_qmember m) {
    return (unsigned)m < FQ_QMEMBER_COUNT ? q->m[m].bytes : 0;
}

fq_status fq_qtensor_member_to_host(fq_ctx *ctx, const fq_qtensor *q, fq_qmember m, void *dst) {
    if ((unsigned)m >= FQ_QMEMBER_COUNT || !q->m[m].bytes)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "quantized tensor '%s' has no member '%s'",
                      fq_qtensor_name(q), fq_qmember_name(m));
    fq_buffer b = {q->m[m].dev, q->m[m].ptr, q->m[m].bytes};
    return fq_buf_read(ctx, &b, 0, dst, q->m[m].bytes);
}

/* Copies every member of src into a fresh allocation on dev. src is untouched. */
static fq_status clone_onto(fq_ctx *ctx, const fq_qtensor *src, fq_device dev, fq_qtensor **out) {
    FQ_TRY(fq_check_qtensor(ctx, "copy", src, src->info.device));
    FQ_TRY(fq_device_check(ctx, dev));
    fq_qtensor *c = calloc(1, sizeof *c);
    if (!c) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    c->info = src->info;
    memcpy(c->m, src->m, sizeof c->m);
    fq_status s = src->name ? ((c->name = fq_strdup(src->name)) ? FQ_OK : FQ_ERR_OUT_OF_MEMORY) : FQ_OK;
    if (s != FQ_OK) { free(c); return fq_err(ctx, s, "out of host memory"); }
    s = fq_buf_alloc(ctx, dev, src->info.bytes, &c->buf);
    if (s == FQ_OK) {
        point_members(c);
        /* One copy of the whole allocation moves every member at once. */
        s = fq_buf_copy(ctx, &c->buf, 0, &src->buf, 0, src->info.bytes);
    }
    if (s != FQ_OK) {
        fq_qtensor_free(c);
        return fq_err_prefix(ctx, s, "copying quantized tensor '%s'", fq_qtensor_name(src));
    }
    c->ready = 1; /* fq_buf_copy synchronizes */
    *out = c;
    return FQ_OK;
}

fq_status fq_qtensor_copy_to(fq_ctx *ctx, const fq_qtensor *q, fq_device dev, fq_qtensor **out) {
    return clone_onto(ctx, q, dev, out);
}

fq_status fq_qtensor_move(fq_ctx *ctx, fq_qtensor *q, fq_device dev) {
    if (fq_device_equal(q->info.device, dev)) return fq_check_qtensor(ctx, "move", q, dev);
    fq_qtensor *c = NULL;
    FQ_TRY(clone_onto(ctx, q, dev, &c));
    /* Swap: q takes the new allocation; the old one is freed with c. */
    fq_qtensor tmp = *q;
    q->buf = c->buf;
    memcpy(q->m, c->m, sizeof q->m);
    q->info.device = dev;
    q->ready = c->ready;
    c->buf = tmp.buf;
    c->stray = (fq_buffer){0};
    free(c->name);
    c->name = NULL;
    fq_qtensor_free(c);
    return FQ_OK;
}

fq_status fq_check_qtensor(fq_ctx *ctx, const char *op, const fq_qtensor *q, fq_device exec) {
    char a[16], b[16];
    if (!q) return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: quantized tensor is NULL", op);
    for (int i = 0; i < FQ_QMEMBER_COUNT; i++) {
        if (!q->m[i].bytes) continue;
        if (!fq_device_equal(q->m[i].dev, exec))
            return fq_err(ctx, FQ_ERR_DEVICE_MISMATCH,
                          "%s: device mismatch: quantized tensor '%s' member '%s' is on %s but the op "
                          "runs on %s",
                          op, q->name ? q->name : "(unnamed)", g_member_names[i],
                          fq_device_name(q->m[i].dev, a, sizeof a), fq_device_name(exec, b, sizeof b));
    }
    return FQ_OK;
}

static int all_finite(const float *v, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(v[i])) return 0;
    return 1;
}

fq_status fq_qtensor_from_members(fq_ctx *ctx, fq_device dev, const fq_qtensor_info *info_in,
                                  const void *const members[FQ_QMEMBER_COUNT], fq_qtensor **out) {
    fq_qtensor_info info = *info_in;
    fq_qmember_loc m[FQ_QMEMBER_COUNT];
    FQ_TRY(fq_qtensor_layout(ctx, &info, m));
    if (!fq_dtype_is_float(info.orig_dtype) || info.orig_dtype == FQ_F64)
        return fq_err(ctx, FQ_ERR_FORMAT, "quant state dtype %s is not f32, f16 or bf16",
                      fq_dtype_name(info.orig_dtype));
    for (int i = 0; i < FQ_QMEMBER_COUNT; i++) {
        if (m[i].bytes && !members[i])
            return fq_err(ctx, FQ_ERR_FORMAT, "quant state lacks member '%s'", g_member_names[i]);
    }
    if (!info.double_quant && !all_finite(members[FQ_QMEMBER_ABSMAX], info.nblocks))
        return fq_err(ctx, FQ_ERR_NONFINITE, "absmax contains NaN or Inf");
    if (info.double_quant) {
        if (!isfinite(info.offset))
            return fq_err(ctx, FQ_ERR_NONFINITE, "nested_offset is NaN or Inf");
        if (!all_finite(members[FQ_QMEMBER_NESTED_ABSMAX], info.nested_nblocks))
            return fq_err(ctx, FQ_ERR_NONFINITE, "nested_absmax contains NaN or Inf");
        if (!all_finite(members[FQ_QMEMBER_NESTED_QUANT_MAP], 256))
            return fq_err(ctx, FQ_ERR_NONFINITE, "nested_quant_map contains NaN or Inf");
    }
    if (!all_finite(members[FQ_QMEMBER_QUANT_MAP], 16))
        return fq_err(ctx, FQ_ERR_NONFINITE, "quant_map contains NaN or Inf");
    fq_qtensor *q;
    FQ_TRY(fq_qtensor_alloc(ctx, dev, &info, &q));
    for (int i = 0; i < FQ_QMEMBER_COUNT; i++) {
        if (!q->m[i].bytes) continue;
        fq_status s = fq_buf_write(ctx, &q->buf, q->m[i].offset, members[i], q->m[i].bytes);
        if (s != FQ_OK) { fq_qtensor_free(q); return s; }
    }
    q->ready = 1; /* fq_buf_write synchronizes */
    *out = q;
    return FQ_OK;
}

fq_status fq_test_misplace_member(fq_ctx *ctx, fq_qtensor *q, fq_qmember m, fq_device dev) {
    if ((unsigned)m >= FQ_QMEMBER_COUNT || !q->m[m].bytes)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "no member %d to misplace", (int)m);
    fq_buf_free(&q->stray);
    if (fq_device_check(NULL, dev) == FQ_OK) {
        FQ_TRY(fq_buf_alloc(ctx, dev, q->m[m].bytes, &q->stray));
        fq_buffer src = {q->m[m].dev, q->m[m].ptr, q->m[m].bytes};
        FQ_TRY(fq_buf_copy(ctx, &q->stray, 0, &src, 0, q->m[m].bytes));
        q->m[m].ptr = q->stray.ptr;
    }
    q->m[m].dev = dev;
    return FQ_OK;
}

void fq_test_fail_alloc_in(fq_ctx *ctx, int64_t n) { ctx->test_fail_alloc_in = n; }

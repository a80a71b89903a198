/* Dense tensors: dtype, 64-bit shape, one owned buffer on one device. */
#include "core/core.h"

#include <stdlib.h>
#include <string.h>

static const struct { const char *name; size_t size; } g_dtypes[FQ_DTYPE_COUNT] = {
    [FQ_F32] = {"f32", 4}, [FQ_F16] = {"f16", 2}, [FQ_BF16] = {"bf16", 2}, [FQ_F64] = {"f64", 8},
    [FQ_U8] = {"u8", 1},   [FQ_I8] = {"i8", 1},   [FQ_I16] = {"i16", 2},   [FQ_I32] = {"i32", 4},
    [FQ_I64] = {"i64", 8}, [FQ_BOOL] = {"bool", 1},
};

size_t fq_dtype_size(fq_dtype t) { return (unsigned)t < FQ_DTYPE_COUNT ? g_dtypes[t].size : 0; }
const char *fq_dtype_name(fq_dtype t) { return (unsigned)t < FQ_DTYPE_COUNT ? g_dtypes[t].name : "?"; }
int fq_dtype_is_float(fq_dtype t) { return t == FQ_F32 || t == FQ_F16 || t == FQ_BF16 || t == FQ_F64; }

fq_status fq_dtype_parse(fq_ctx *ctx, const char *s, fq_dtype *out) {
    static const struct { const char *n; fq_dtype t; } alias[] = {
        {"float32", FQ_F32}, {"float16", FQ_F16}, {"bfloat16", FQ_BF16}, {"float64", FQ_F64},
        {"fp32", FQ_F32},    {"fp16", FQ_F16},    {"half", FQ_F16},      {"uint8", FQ_U8},
        {"int32", FQ_I32},   {"int64", FQ_I64},
    };
    if (s) {
        for (int i = 0; i < FQ_DTYPE_COUNT; i++)
            if (strcmp(s, g_dtypes[i].name) == 0) { *out = (fq_dtype)i; return FQ_OK; }
        for (size_t i = 0; i < sizeof alias / sizeof alias[0]; i++)
            if (strcmp(s, alias[i].n) == 0) { *out = alias[i].t; return FQ_OK; }
    }
    return fq_err(ctx, FQ_ERR_INVALID_ARG, "unknown dtype '%s'", s ? s : "(null)");
}

fq_status fq_tensor_create(fq_ctx *ctx, fq_device dev, fq_dtype dtype, int ndim,
                           const int64_t *shape, fq_tensor **out) {
    if (!out || (unsigned)dtype >= FQ_DTYPE_COUNT || ndim < 0 || ndim > FQ_MAX_DIMS || (ndim && !shape))
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "tensor_create: bad dtype or rank %d", ndim);
    int64_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (shape[i] && numel > INT64_MAX / 16 / shape[i]))
            return fq_err(ctx, FQ_ERR_SHAPE, "tensor_create: bad dimension %lld", (long long)shape[i]);
        numel *= shape[i];
    }
    FQ_TRY(fq_device_check(ctx, dev));
    fq_tensor *t = calloc(1, sizeof *t);
    if (!t) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "tensor_create: out of host memory");
    t->dtype = dtype;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    t->numel = numel;
    fq_status s = fq_buf_alloc(ctx, dev, (size_t)numel * fq_dtype_size(dtype), &t->buf);
    if (s != FQ_OK) { free(t); return s; }
    *out = t;
    return FQ_OK;
}

fq_status fq_tensor_from_host(fq_ctx *ctx, fq_device dev, fq_dtype dtype, int ndim,
                              const int64_t *shape, const void *data, fq_tensor **out) {
    fq_tensor *t;
    FQ_TRY(fq_tensor_create(ctx, dev, dtype, ndim, shape, &t));
    fq_status s = fq_buf_write(ctx, &t->buf, 0, data, t->buf.bytes);
    if (s != FQ_OK) { fq_tensor_free(t); return s; }
    *out = t;
    return FQ_OK;
}

void fq_tensor_free(fq_tensor *t) {
    if (!t) return;
    fq_buf_free(&t->buf);
    free(t->name);
    free(t);
}

fq_status fq_tensor_to_host(fq_ctx *ctx, const fq_tensor *t, void *dst) {
    return fq_buf_read(ctx, &t->buf, 0, dst, t->buf.bytes);
}

fq_status fq_tensor_copy_to(fq_ctx *ctx, const fq_tensor *t, fq_device dev, fq_tensor **out) {
    fq_tensor *c;
    FQ_TRY(fq_tensor_create(ctx, dev, t->dtype, t->ndim, t->shape, &c));
    fq_status s = fq_buf_copy(ctx, &c->buf, 0, &t->buf, 0, t->buf.bytes);
    if (s == FQ_OK && t->name) s = fq_tensor_set_name(ctx, c, t->name);
    if (s != FQ_OK) { fq_tensor_free(c); return s; }
    *out = c;
    return FQ_OK;
}

fq_device fq_tensor_device(const fq_tensor *t) { return t->buf.dev; }
fq_dtype fq_tensor_dtype(const fq_tensor *t) { return t->dtype; }
int fq_tensor_ndim(const fq_tensor *t) { return t->ndim; }
const int64_t *fq_tensor_shape(const fq_tensor *t) { return t->shape; }
int64_t fq_tensor_numel(const fq_tensor *t) { return t->numel; }
size_t fq_tensor_nbytes(const fq_tensor *t) { return t->buf.bytes; }
void *fq_tensor_host_data(fq_tensor *t) { return t->buf.dev.type == FQ_DEVICE_CPU ? t->buf.ptr : NULL; }
const char *fq_tensor_name(const fq_tensor *t) { return t->name ? t->name : ""; }

fq_status fq_tensor_set_name(fq_ctx *ctx, fq_tensor *t, const char *name) {
    char *n = fq_strdup(name);
    if (!n) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "tensor_set_name: out of host memory");
    free(t->name);
    t->name = n;
    return FQ_OK;
}

fq_status fq_check_tensor(fq_ctx *ctx, const char *op, const char *role, const fq_tensor *t,
                          fq_device exec) {
    char a[16], b[16];
    if (!t) return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: operand '%s' is NULL", op, role);
    if (!fq_device_equal(t->buf.dev, exec))
        return fq_err(ctx, FQ_ERR_DEVICE_MISMATCH,
                      "%s: device mismatch: tensor '%s' (%s) is on %s but the op runs on %s", op,
                      t->name ? t->name : role, role, fq_device_name(t->buf.dev, a, sizeof a),
                      fq_device_name(exec, b, sizeof b));
    return FQ_OK;
}

fq_status fq_check_float(fq_ctx *ctx, const char *op, const char *role, const fq_tensor *t) {
    if (t->dtype != FQ_F32 && t->dtype != FQ_F16 && t->dtype != FQ_BF16)
        return fq_err(ctx, FQ_ERR_SHAPE, "%s: tensor '%s' (%s) has dtype %s; expected f32, f16 or bf16",
                      op, t->name ? t->name : role, role, fq_dtype_name(t->dtype));
    return FQ_OK;
}

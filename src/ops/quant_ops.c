/* Public 4-bit and 8-bit quantization ops: check every operand (placement of
 * each tensor and of each member of a quantization state, dtype, shape), then
 * run the CPU kernels or the CUDA launchers on the data's own device. */
#include "core/qtensor.h"
#include "core/cuda_device.h"
#include "kernels/kernels.h"

#include <string.h>

#define Q_MEMBER(q, which) ((q)->m[(which)].ptr)

static fq_status same_shape(fq_ctx *ctx, const char *op, const fq_tensor *t, int ndim, const int64_t *shape) {
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == shape[i];
    if (ok) return FQ_OK;
    char a[160], b[160];
    return fq_err(ctx, FQ_ERR_SHAPE, "%s: tensor '%s' has shape %s; expected %s", op, fq_tensor_name(t),
                  fq_shape_str(t->ndim, t->shape, a, sizeof a), fq_shape_str(ndim, shape, b, sizeof b));
}

static fq_status check_dtype(fq_ctx *ctx, const char *op, const char *role, const fq_tensor *t, fq_dtype want) {
    if (t->dtype == want) return FQ_OK;
    return fq_err(ctx, FQ_ERR_SHAPE, "%s: tensor '%s' (%s) has dtype %s; expected %s", op, fq_tensor_name(t),
                  role, fq_dtype_name(t->dtype), fq_dtype_name(want));
}

static fq_status check_numel(fq_ctx *ctx, const char *op, const char *role, const fq_tensor *t, int64_t n) {
    if (t->numel == n) return FQ_OK;
    return fq_err(ctx, FQ_ERR_SHAPE, "%s: tensor '%s' (%s) has %lld elements; expected %lld", op,
                  fq_tensor_name(t), role, (long long)t->numel, (long long)n);
}

/* ---- CUDA dispatch ------------------------------------------------------------ */
#ifdef FQ_HAVE_CUDA
/* Enters the guard of `dev` for a launch sequence on its stream; pair with cuda_end. */
static fq_status cuda_begin(fq_ctx *ctx, int dev, fq_cuda_dev **d, fq_cuda_guard *g) {
    FQ_TRY(fq_cuda_dev_get(ctx, dev, d));
    return fq_cuda_guard_enter(ctx, dev, g);
}

/* Waits for the stream, leaves the guard, turns the first error into a status. */
static fq_status cuda_end(fq_ctx *ctx, int launch_err, const char *what, fq_cuda_dev *d, fq_cuda_guard *g) {
    cudaError_t e = (cudaError_t)launch_err;
    cudaError_t se = cudaStreamSynchronize(d->stream);
    if (e == cudaSuccess) e = se;
    fq_cuda_guard_exit(g);
    return e == cudaSuccess ? FQ_OK : fq_cuda_status(ctx, e, what, d->index);
}

#else
static fq_status no_cuda(fq_ctx *ctx, const char *op, fq_device dev) {
    char dn[16];
    return fq_err(ctx, FQ_ERR_UNSUPPORTED, "%s: cannot run on %s: built without CUDA", op,
                  fq_device_name(dev, dn, sizeof dn));
}
#endif

/* ---- 4-bit quantize ----------------------------------------------------------- */

/* Fills q's packed data and state from x (both on q's device). */
static fq_status quantize4_into(fq_ctx *ctx, const fq_tensor *x, fq_qtensor *q) {
    const fq_qtensor_info *in = &q->info;
    fq_device dev = in->device;
    uint8_t *packed = Q_MEMBER(q, FQ_QMEMBER_PACKED);
    if (!in->double_quant) {
        if (dev.type == FQ_DEVICE_CPU) {
            fq_cpu_quantize4(ctx, x->buf.ptr, x->dtype, in->numel, in->blocksize, in->type, packed,
                             Q_MEMBER(q, FQ_QMEMBER_ABSMAX));
            return FQ_OK;
        }
#ifdef FQ_HAVE_CUDA
        fq_cuda_dev *d;
        fq_cuda_guard g;
        FQ_TRY(cuda_begin(ctx, dev.index, &d, &g));
        int e = fq_cuda_quantize4(x->buf.ptr, x->dtype, in->numel, in->blocksize, in->type, packed,
                                  Q_MEMBER(q, FQ_QMEMBER_ABSMAX), d->stream);
        return cuda_end(ctx, e, "quantize_4bit", d, &g);
#else
        return no_cuda(ctx, "quantize_4bit", dev);
#endif
    }
    /* Double quant: f32 absmax into a scratch (plus one float for the offset on a
     * GPU), offset = torch's mean, then 8-bit codes of (absmax - offset). */
    size_t abytes = (size_t)in->nblocks * sizeof(float);
    fq_buffer scratch;
    FQ_TRY(fq_buf_alloc(ctx, dev, abytes + sizeof(float), &scratch));
    float *absmax = scratch.ptr, offset = 0.0f;
    fq_status s = FQ_OK;
    if (dev.type == FQ_DEVICE_CPU) {
        fq_cpu_quantize4(ctx, x->buf.ptr, x->dtype, in->numel, in->blocksize, in->type, packed, absmax);
        offset = fq_cpu_torch_mean(absmax, in->nblocks);
        fq_cpu_quantize8(absmax, offset, in->nblocks, 256, fq_dynamic_map_signed(),
                         Q_MEMBER(q, FQ_QMEMBER_ABSMAX), Q_MEMBER(q, FQ_QMEMBER_NESTED_ABSMAX));
    } else {
#ifdef FQ_HAVE_CUDA
        fq_cuda_dev *d;
        fq_cuda_guard g;
        s = cuda_begin(ctx, dev.index, &d, &g);
        if (s == FQ_OK) {
            float *off_dev = absmax + in->nblocks;
            int e = fq_cuda_quantize4(x->buf.ptr, x->dtype, in->numel, in->blocksize, in->type, packed,
                                      absmax, d->stream);
            if (!e) e = fq_cuda_torch_mean(absmax, in->nblocks, off_dev, d->stream);
            if (!e)
                e = fq_cuda_quantize8(absmax, off_dev, in->nblocks, 256,
                                      Q_MEMBER(q, FQ_QMEMBER_NESTED_QUANT_MAP),
                                      Q_MEMBER(q, FQ_QMEMBER_ABSMAX),
                                      Q_MEMBER(q, FQ_QMEMBER_NESTED_ABSMAX), d->stream);
            s = cuda_end(ctx, e, "quantize_4bit (double quant)", d, &g);
        }
        if (s == FQ_OK) s = fq_buf_read(ctx, &scratch, abytes, &offset, sizeof offset);
#else
        s = no_cuda(ctx, "quantize_4bit", dev);
#endif
    }
    fq_buf_free(&scratch);
    if (s == FQ_OK) q->info.offset = offset;
    return s;
}

fq_status fq_quantize_4bit(fq_ctx *ctx, const fq_tensor *x, const fq_quant_params *p, fq_qtensor **out) {
    static const char *op = "quantize_4bit";
    if (!out) return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: out is NULL", op);
    if (!x) return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: x is NULL", op);
    fq_device dev = x->buf.dev;
    FQ_TRY(fq_check_tensor(ctx, op, "x", x, dev));
    FQ_TRY(fq_check_float(ctx, op, "x", x));
    if (x->numel == 0) return fq_err(ctx, FQ_ERR_SHAPE, "%s: tensor '%s' is empty", op, fq_tensor_name(x));
    fq_quant_params prm = p ? *p : fq_quant_default_params();
    fq_qtensor_info info;
    memset(&info, 0, sizeof info);
    info.type = prm.type;
    info.blocksize = prm.blocksize;
    info.double_quant = prm.double_quant ? 1 : 0;
    info.orig_dtype = x->dtype;
    info.ndim = x->ndim;
    memcpy(info.shape, x->shape, sizeof info.shape);
    fq_qtensor *q;
    fq_status s = fq_qtensor_alloc(ctx, dev, &info, &q);
    if (s != FQ_OK) return fq_err_prefix(ctx, s, "%s of '%s'", op, fq_tensor_name(x));
    if (x->name) s = fq_qtensor_set_name(ctx, q, x->name);
    if (s == FQ_OK) s = quantize4_into(ctx, x, q);
    if (s != FQ_OK) {
        fq_qtensor_free(q);
        return s;
    }
    q->ready = 1; /* quantize4_into ends with a synchronize on GPUs */
    *out = q;
    return FQ_OK;
}

/* ---- 4-bit dequantize --------------------------------------------------------- */

fq_status fq_dequantize_4bit_into(fq_ctx *ctx, const fq_qtensor *q, fq_tensor *out) {
    static const char *op = "dequantize_4bit";
    if (!q || !out) return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: %s is NULL", op, q ? "out" : "q");
    const fq_qtensor_info *in = &q->info;
    fq_device dev = in->device;
    FQ_TRY(fq_check_qtensor(ctx, op, q, dev));
    FQ_TRY(fq_check_tensor(ctx, op, "out", out, dev));
    FQ_TRY(fq_check_float(ctx, op, "out", out));
    FQ_TRY(same_shape(ctx, op, out, in->ndim, in->shape));
    const uint8_t *packed = Q_MEMBER(q, FQ_QMEMBER_PACKED);
    if (dev.type == FQ_DEVICE_CPU) {
        if (!in->double_quant) {
            fq_cpu_dequantize4(ctx, packed, Q_MEMBER(q, FQ_QMEMBER_ABSMAX), in->numel, in->blocksize,
                               in->type, out->buf.ptr, out->dtype);
            return FQ_OK;
        }
        /* Reconstruct the f32 absmax as bitsandbytes does, then dequantize. */
        fq_buffer scratch;
        FQ_TRY(fq_buf_alloc(ctx, dev, (size_t)in->nblocks * sizeof(float), &scratch));
        fq_cpu_dequantize8(Q_MEMBER(q, FQ_QMEMBER_ABSMAX), Q_MEMBER(q, FQ_QMEMBER_NESTED_ABSMAX),
                           Q_MEMBER(q, FQ_QMEMBER_NESTED_QUANT_MAP), in->offset, in->nblocks, 256,
                           scratch.ptr);
        fq_cpu_dequantize4(ctx, packed, scratch.ptr, in->numel, in->blocksize, in->type, out->buf.ptr,
                           out->dtype);
        fq_buf_free(&scratch);
        return FQ_OK;
    }
#ifdef FQ_HAVE_CUDA
    fq_cuda_dev *d;
    fq_cuda_guard g;
    FQ_TRY(cuda_begin(ctx, dev.index, &d, &g));
    int e = in->double_quant
                ? fq_cuda_dequantize4_nested(packed, Q_MEMBER(q, FQ_QMEMBER_ABSMAX),
                                             Q_MEMBER(q, FQ_QMEMBER_NESTED_ABSMAX),
                                             Q_MEMBER(q, FQ_QMEMBER_NESTED_QUANT_MAP), in->offset,
                                             in->numel, in->blocksize, in->type, out->buf.ptr, out->dtype,
                                             d->stream)
                : fq_cuda_dequantize4(packed, Q_MEMBER(q, FQ_QMEMBER_ABSMAX), in->numel, in->blocksize,
                                      in->type, out->buf.ptr, out->dtype, d->stream);
    return cuda_end(ctx, e, op, d, &g);
#else
    return no_cuda(ctx, op, dev);
#endif
}

fq_status fq_dequantize_4bit(fq_ctx *ctx, const fq_qtensor *q, int out_dtype, fq_tensor **out) {
    static const char *op = "dequantize_4bit";
    if (!q || !out) return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: %s is NULL", op, q ? "out" : "q");
    /* Check the state before allocating anything for the result. */
    FQ_TRY(fq_check_qtensor(ctx, op, q, q->info.device));
    fq_dtype dt = out_dtype < 0 ? q->info.orig_dtype : (fq_dtype)out_dtype;
    if (dt != FQ_F32 && dt != FQ_F16 && dt != FQ_BF16)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: output dtype %d is not f32, f16 or bf16", op, out_dtype);
    fq_tensor *t;
    FQ_TRY(fq_tensor_create(ctx, q->info.device, dt, q->info.ndim, q->info.shape, &t));
    fq_status s = q->name ? fq_tensor_set_name(ctx, t, q->name) : FQ_OK;
    if (s == FQ_OK) s = fq_dequantize_4bit_into(ctx, q, t);
    if (s != FQ_OK) {
        fq_tensor_free(t);
        return s;
    }
    *out = t;
    return FQ_OK;
}

/* ---- 8-bit dynamic ------------------------------------------------------------ */

static int blocksize8_valid(int64_t bs) { return bs >= 64 && fq_blocksize_valid(bs); }

/* Common checks of the 8-bit ops: q u8 [n], absmax f32 [ceil(n/bs)], all on `dev`. */
static fq_status check8(fq_ctx *ctx, const char *op, fq_device dev, int64_t n, int64_t bs, const fq_tensor *q,
                        const fq_tensor *absmax) {
    if (!blocksize8_valid(bs))
        return fq_err(ctx, FQ_ERR_INVALID_ARG,
                      "%s: unsupported blocksize %lld (expected 64, 128, 256, 512, 1024, 2048 or 4096)", op,
                      (long long)bs);
    if (!q || !absmax) return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: %s is NULL", op, q ? "absmax" : "q");
    FQ_TRY(fq_check_tensor(ctx, op, "q", q, dev));
    FQ_TRY(fq_check_tensor(ctx, op, "absmax", absmax, dev));
    FQ_TRY(check_dtype(ctx, op, "q", q, FQ_U8));
    FQ_TRY(check_dtype(ctx, op, "absmax", absmax, FQ_F32));
    FQ_TRY(check_numel(ctx, op, "q", q, n));
    return check_numel(ctx, op, "absmax", absmax, (n + bs - 1) / bs);
}

fq_status fq_quantize_8bit_dynamic(fq_ctx *ctx, const fq_tensor *x, int64_t blocksize, fq_tensor *q,
                                   fq_tensor *absmax) {
    static const char *op = "quantize_8bit_dynamic";
    if (!x) return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: x is NULL", op);
    fq_device dev = x->buf.dev;
    FQ_TRY(fq_check_tensor(ctx, op, "x", x, dev));
    FQ_TRY(fq_check_float(ctx, op, "x", x));
    FQ_TRY(check_dtype(ctx, op, "x", x, FQ_F32));
    FQ_TRY(check8(ctx, op, dev, x->numel, blocksize, q, absmax));
    if (dev.type == FQ_DEVICE_CPU) {
        /* x - (+0.0f) is x bit for bit: plain quantization. */
        fq_cpu_quantize8(x->buf.ptr, 0.0f, x->numel, blocksize, fq_dynamic_map_signed(), q->buf.ptr,
                         absmax->buf.ptr);
        return FQ_OK;
    }
#ifdef FQ_HAVE_CUDA
    /* The launcher reads the offset and the code from device memory. */
    fq_buffer scratch;
    FQ_TRY(fq_buf_alloc(ctx, dev, 256 * sizeof(float) + sizeof(float), &scratch));
    fq_status s = fq_buf_write(ctx, &scratch, 0, fq_dynamic_map_signed(), 256 * sizeof(float));
    if (s == FQ_OK) s = fq_buf_zero(ctx, &scratch, 256 * sizeof(float), sizeof(float));
    if (s == FQ_OK) {
        fq_cuda_dev *d;
        fq_cuda_guard g;
        s = cuda_begin(ctx, dev.index, &d, &g);
        if (s == FQ_OK) {
            const float *code = scratch.ptr;
            int e = fq_cuda_quantize8(x->buf.ptr, code + 256, x->numel, blocksize, code, q->buf.ptr,
                                      absmax->buf.ptr, d->stream);
            s = cuda_end(ctx, e, op, d, &g);
        }
    }
    fq_buf_free(&scratch);
    return s;
#else
    return no_cuda(ctx, op, dev);
#endif
}

fq_status fq_dequantize_8bit_dynamic(fq_ctx *ctx, const fq_tensor *q, const fq_tensor *absmax,
                                     int64_t blocksize, fq_tensor *out) {
    static const char *op = "dequantize_8bit_dynamic";
    if (!q || !out) return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: %s is NULL", op, q ? "out" : "q");
    fq_device dev = q->buf.dev;
    FQ_TRY(check8(ctx, op, dev, q->numel, blocksize, q, absmax));
    FQ_TRY(fq_check_tensor(ctx, op, "out", out, dev));
    FQ_TRY(check_dtype(ctx, op, "out", out, FQ_F32));
    FQ_TRY(check_numel(ctx, op, "out", out, q->numel));
    /* y + (-0.0f) is y bit for bit: no offset. */
    if (dev.type == FQ_DEVICE_CPU) {
        fq_cpu_dequantize8(q->buf.ptr, absmax->buf.ptr, fq_dynamic_map_signed(), -0.0f, q->numel, blocksize,
                           out->buf.ptr);
        return FQ_OK;
    }
#ifdef FQ_HAVE_CUDA
    fq_buffer code;
    FQ_TRY(fq_buf_alloc(ctx, dev, 256 * sizeof(float), &code));
    fq_status s = fq_buf_write(ctx, &code, 0, fq_dynamic_map_signed(), 256 * sizeof(float));
    if (s == FQ_OK) {
        fq_cuda_dev *d;
        fq_cuda_guard g;
        s = cuda_begin(ctx, dev.index, &d, &g);
        if (s == FQ_OK) {
            int e = fq_cuda_dequantize8(q->buf.ptr, absmax->buf.ptr, code.ptr, -0.0f, q->numel, blocksize,
                                        out->buf.ptr, d->stream);
            s = cuda_end(ctx, e, op, d, &g);
        }
    }
    fq_buf_free(&code);
    return s;
#else
    return no_cuda(ctx, op, dev);
#endif
}

/* fluxq: FLUX inference with bitsandbytes-compatible 4-bit weights.
 *
 * The one public header. Conventions:
 *  - Every function that can fail returns an fq_status; on failure the context
 *    holds a message (fq_ctx_error) and every output and input is left as it was.
 *  - Nothing depends on a "current" CUDA device: every object records the device
 *    it lives on, and every call runs on the device of the data it touches.
 *  - A function that hands out memory says who frees it, next to its declaration.
 */
#ifndef FLUXQ_H
#define FLUXQ_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FQ_VERSION_STRING "0.1.0"

/* ---- statuses ------------------------------------------------------------ */

typedef enum {
    FQ_OK = 0,
    FQ_ERR_INVALID_ARG,     /* a bad argument (NULL, unknown name, bad blocksize, ...) */
    FQ_ERR_OUT_OF_MEMORY,   /* host or device allocation failed                       */
    FQ_ERR_DEVICE_MISMATCH, /* an operand (or a member of its quant state) is elsewhere */
    FQ_ERR_SHAPE,           /* shape, dtype or contiguity does not fit the op         */
    FQ_ERR_IO,              /* open/read/write/rename failed                          */
    FQ_ERR_FORMAT,          /* a file or header is corrupt, truncated or lying         */
    FQ_ERR_UNSUPPORTED,     /* valid but not implemented (e.g. CUDA in a CPU build)    */
    FQ_ERR_NO_DEVICE,       /* the named device does not exist                        */
    FQ_ERR_CUDA,            /* a CUDA call failed                                     */
    FQ_ERR_NONFINITE        /* NaN or Inf where a finite value is required            */
} fq_status;

/* A short constant name for a status ("device mismatch"). Never NULL. */
const char *fq_status_str(fq_status s);

/* ---- context ------------------------------------------------------------- */

/* A context holds the last error message, the log callback and the per-device
 * state (streams, handles, tables) created lazily on first use of a device.
 * One context per thread of use; contexts are independent. */
typedef struct fq_ctx fq_ctx;

typedef enum { FQ_LOG_DEBUG = 0, FQ_LOG_INFO, FQ_LOG_WARN, FQ_LOG_ERROR } fq_log_level;
typedef void (*fq_log_fn)(void *user, fq_log_level level, const char *msg);

/* *out receives a new context; free it with fq_ctx_free. */
fq_status fq_ctx_create(fq_ctx **out);
void fq_ctx_free(fq_ctx *ctx);
/* The message of the last failure on this context ("" if none). Owned by ctx,
 * valid until the next call on ctx. */
const char *fq_ctx_error(const fq_ctx *ctx);
/* Library code never prints; messages go to this callback (default: none). */
void fq_ctx_set_log(fq_ctx *ctx, fq_log_fn fn, void *user, fq_log_level min_level);

/* ---- devices ------------------------------------------------------------- */

typedef enum { FQ_DEVICE_CPU = 0, FQ_DEVICE_CUDA = 1 } fq_device_type;
typedef struct {
    fq_device_type type;
    int index; /* 0 for cpu; N for cuda:N */
} fq_device;

#define FQ_CPU ((fq_device){FQ_DEVICE_CPU, 0})
#define FQ_CUDA(i) ((fq_device){FQ_DEVICE_CUDA, (i)})

/* Parses "cpu", "cuda", "cuda:N" (like torch; "cuda" means cuda:0). */
fq_status fq_device_parse(fq_ctx *ctx, const char *s, fq_device *out);
/* Writes "cpu" or "cuda:N" into buf (at least 16 bytes); returns buf. */
char *fq_device_name(fq_device d, char *buf, size_t n);
int fq_device_equal(fq_device a, fq_device b);
/* Number of CUDA devices visible (0 in a CPU-only build or without a driver).
 * Creates no CUDA context on any device. */
int fq_cuda_device_count(void);
/* 1 if the library was built with the CUDA backend. */
int fq_has_cuda(void);
/* Checks that d exists; an error naming it otherwise. */
fq_status fq_device_check(fq_ctx *ctx, fq_device d);

/* ---- dtypes and tensors -------------------------------------------------- */

typedef enum {
    FQ_F32 = 0, FQ_F16, FQ_BF16, FQ_F64, FQ_U8, FQ_I8, FQ_I16, FQ_I32, FQ_I64, FQ_BOOL,
    FQ_DTYPE_COUNT
} fq_dtype;

size_t fq_dtype_size(fq_dtype t);
/* Short name: "f32", "bf16", ... */
const char *fq_dtype_name(fq_dtype t);
/* Accepts our short names and torch names ("float32", "bfloat16", "float16"). */
fq_status fq_dtype_parse(fq_ctx *ctx, const char *s, fq_dtype *out);
int fq_dtype_is_float(fq_dtype t);

#define FQ_MAX_DIMS 8

/* A dense, row-major tensor that owns one buffer on one device. */
typedef struct fq_tensor fq_tensor;

/* *out receives a new uninitialized tensor on dev; free with fq_tensor_free. */
fq_status fq_tensor_create(fq_ctx *ctx, fq_device dev, fq_dtype dtype, int ndim,
                           const int64_t *shape, fq_tensor **out);
/* As fq_tensor_create, then copies nbytes from host memory `data`. */
fq_status fq_tensor_from_host(fq_ctx *ctx, fq_device dev, fq_dtype dtype, int ndim,
                              const int64_t *shape, const void *data, fq_tensor **out);
void fq_tensor_free(fq_tensor *t);
/* Copies the whole tensor into host memory dst (fq_tensor_nbytes bytes). */
fq_status fq_tensor_to_host(fq_ctx *ctx, const fq_tensor *t, void *dst);
/* *out receives a copy of t on dev (caller frees). t is unchanged. */
fq_status fq_tensor_copy_to(fq_ctx *ctx, const fq_tensor *t, fq_device dev, fq_tensor **out);
fq_device fq_tensor_device(const fq_tensor *t);
fq_dtype fq_tensor_dtype(const fq_tensor *t);
int fq_tensor_ndim(const fq_tensor *t);
const int64_t *fq_tensor_shape(const fq_tensor *t);
int64_t fq_tensor_numel(const fq_tensor *t);
size_t fq_tensor_nbytes(const fq_tensor *t);
/* Host pointer of a CPU tensor, NULL for a device tensor. Owned by t. */
void *fq_tensor_host_data(fq_tensor *t);
/* The tensor's name, used in error messages ("" if unset). Owned by t. */
const char *fq_tensor_name(const fq_tensor *t);
fq_status fq_tensor_set_name(fq_ctx *ctx, fq_tensor *t, const char *name);

/* ---- 4-bit quantized tensors (bitsandbytes NF4 / FP4) -------------------- */

typedef enum { FQ_QUANT_NF4 = 0, FQ_QUANT_FP4 = 1 } fq_quant_type;

const char *fq_quant_type_name(fq_quant_type q); /* "nf4" / "fp4" */
fq_status fq_quant_type_parse(fq_ctx *ctx, const char *s, fq_quant_type *out);

typedef struct {
    fq_quant_type type;   /* default NF4 */
    int64_t blocksize;    /* 32, 64 (default), 128, ..., 4096 */
    int double_quant;     /* bitsandbytes compress_statistics; default 0 */
} fq_quant_params;

fq_quant_params fq_quant_default_params(void);

/* A quantized weight: packed nibbles plus its complete quantization state
 * (absmax or 8-bit absmax + offset + nested absmax + nested code, the 16-entry
 * code table, blocksize, type, original shape and dtype), held in ONE
 * allocation on ONE device. There is no way to move a member alone. */
typedef struct fq_qtensor fq_qtensor;

/* Quantizes x (f32/f16/bf16, any shape) on x's device, bit-identical to
 * bitsandbytes' CUDA kernels. *out receives a new qtensor on the same device
 * (caller frees with fq_qtensor_free). */
fq_status fq_quantize_4bit(fq_ctx *ctx, const fq_tensor *x, const fq_quant_params *p,
                           fq_qtensor **out);
/* Dequantizes q on q's device into a new tensor of dtype out_dtype
 * (f32/f16/bf16; pass -1 for the original dtype). Caller frees *out. */
fq_status fq_dequantize_4bit(fq_ctx *ctx, const fq_qtensor *q, int out_dtype, fq_tensor **out);
/* Dequantizes into an existing tensor on q's device with q's shape. */
fq_status fq_dequantize_4bit_into(fq_ctx *ctx, const fq_qtensor *q, fq_tensor *out);

/* Moves q to dev, all-or-nothing: allocate on dev, copy every member, then free
 * the source. On failure q is unchanged and nothing leaks. Never re-quantizes. */
fq_status fq_qtensor_move(fq_ctx *ctx, fq_qtensor *q, fq_device dev);
/* *out receives an independent copy of q on dev (caller frees). */
fq_status fq_qtensor_copy_to(fq_ctx *ctx, const fq_qtensor *q, fq_device dev, fq_qtensor **out);
void fq_qtensor_free(fq_qtensor *q);

typedef struct {
    fq_quant_type type;
    int64_t blocksize;
    int double_quant;
    fq_dtype orig_dtype;      /* dtype dequantize returns by default   */
    int ndim;
    int64_t shape[FQ_MAX_DIMS];
    int64_t numel;
    int64_t nblocks;          /* ceil(numel / blocksize)               */
    int64_t nested_nblocks;   /* ceil(nblocks / 256) with double quant */
    float offset;             /* double quant offset (mean of absmax)  */
    size_t bytes;             /* the one allocation, all members       */
    fq_device device;
} fq_qtensor_info;

void fq_qtensor_get_info(const fq_qtensor *q, fq_qtensor_info *info);
const char *fq_qtensor_name(const fq_qtensor *q);
fq_status fq_qtensor_set_name(fq_ctx *ctx, fq_qtensor *q, const char *name);

/* Members of the quantization state, as bitsandbytes names them in files. */
typedef enum {
    FQ_QMEMBER_PACKED = 0,        /* u8  [(n+1)/2]                               */
    FQ_QMEMBER_ABSMAX,            /* f32 [nblocks], or u8 [nblocks] with double quant */
    FQ_QMEMBER_QUANT_MAP,         /* f32 [16]                                     */
    FQ_QMEMBER_NESTED_ABSMAX,     /* f32 [nested_nblocks] (double quant only)     */
    FQ_QMEMBER_NESTED_QUANT_MAP,  /* f32 [256]            (double quant only)     */
    FQ_QMEMBER_COUNT
} fq_qmember;
const char *fq_qmember_name(fq_qmember m); /* "packed", "absmax", "quant_map", ... */

/* Copies one member to host memory dst (size from fq_qtensor_member_bytes). */
size_t fq_qtensor_member_bytes(const fq_qtensor *q, fq_qmember m);
fq_status fq_qtensor_member_to_host(fq_ctx *ctx, const fq_qtensor *q, fq_qmember m, void *dst);

/* Builds a qtensor on dev from host copies of every member, as read from a
 * file. Validates lengths, blocksize and finiteness of absmax/offset/nested
 * values. members[m] may be NULL for members the state does not have.
 * Caller frees *out. */
fq_status fq_qtensor_from_members(fq_ctx *ctx, fq_device dev, const fq_qtensor_info *info,
                                  const void *const members[FQ_QMEMBER_COUNT], fq_qtensor **out);

/* 8-bit blockwise dynamic quantization (the scheme of the double-quant absmax). */
/* q: u8 [n], absmax: f32 [ceil(n/blocksize)], on x's device, both preallocated. */
fq_status fq_quantize_8bit_dynamic(fq_ctx *ctx, const fq_tensor *x, int64_t blocksize,
                                   fq_tensor *q, fq_tensor *absmax);
fq_status fq_dequantize_8bit_dynamic(fq_ctx *ctx, const fq_tensor *q, const fq_tensor *absmax,
                                     int64_t blocksize, fq_tensor *out);

/* ---- 4-bit linear layers ------------------------------------------------- */

/* y = x · Wᵀ (+ bias), accumulating in f32.
 * x: [..., K] (f32/f16/bf16); w: quantized [N, K] (NF4/FP4, any blocksize, with or
 * without double quant); bias: [N] (any float dtype) or NULL; y: [..., N]
 * (f32/f16/bf16), preallocated, same leading dims as x. Every operand and every
 * member of w's state must be on one device, where the op runs. */
fq_status fq_linear_4bit(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *w, const fq_tensor *bias,
                         fq_tensor *y);

/* Which kernel fq_linear_4bit uses; AUTO picks by M, shape and architecture. */
typedef enum {
    FQ_LINEAR_AUTO = 0,
    FQ_LINEAR_GEMV,        /* CUDA small-M streaming kernel                     */
    FQ_LINEAR_GEMM,        /* CUDA tensor-core GEMM dequantizing tiles on chip  */
    FQ_LINEAR_DEQUANT_BLAS /* reference: dequantize to a scratch + cuBLASLt/BLAS */
} fq_linear_kernel;
void fq_ctx_set_linear_kernel(fq_ctx *ctx, fq_linear_kernel k);

/* The 256-entry signed dynamic map bitsandbytes uses (f32). */
const float *fq_dynamic_map_signed(void);
/* The 16-entry code tables as written to files (FP4 has +0.0 at index 8). */
const float *fq_quant_map(fq_quant_type t);

#ifdef __cplusplus
}
#endif
#endif /* FLUXQ_H */

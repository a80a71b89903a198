/* Kernel entry points per backend. The ops layer (src/ops) checks placement,
 * dtype and shape, then calls these with raw pointers that are known to be on
 * the right device. Kernels never allocate, never print and know no files.
 *
 * Numerics shared by both backends (see docs/bnb-exactness.md):
 *  - the reciprocal of absmax is the H100's rcp.approx.ftz.f32 (CPU: table);
 *  - subnormals are flushed to zero wherever bitsandbytes' fast-math build does;
 *  - the double-quant offset is torch's CUDA mean in torch's reduction order. */
#ifndef FQ_KERNELS_H
#define FQ_KERNELS_H

#include "core/core.h"

#include <stdint.h>

/* ---- CPU (src/kernels/cpu) ---------------------------------------------- */

/* x: n elements of dtype (f32/f16/bf16). packed: (n+1)/2 bytes. absmax: ceil(n/bs). */
void fq_cpu_quantize4(fq_ctx *ctx, const void *x, fq_dtype dtype, int64_t n, int64_t blocksize,
                      fq_quant_type qt, uint8_t *packed, float *absmax);
/* out: n elements of out_dtype (f32/f16/bf16). absmax: f32 per block (already
 * reconstructed when the state is double-quantized). */
void fq_cpu_dequantize4(fq_ctx *ctx, const uint8_t *packed, const float *absmax, int64_t n,
                        int64_t blocksize, fq_quant_type qt, void *out, fq_dtype out_dtype);
/* The same, always on the plain scalar path (the reference the SIMD path is tested against). */
void fq_cpu_dequantize4_ref(fq_ctx *ctx, const uint8_t *packed, const float *absmax, int64_t n,
                            int64_t blocksize, fq_quant_type qt, void *out, fq_dtype out_dtype);
/* torch.mean of float32 values on CUDA, in torch's reduction order (H100: 132 SMs). */
float fq_cpu_torch_mean(const float *x, int64_t n);
/* 8-bit dynamic blockwise quantization of (x - offset) with the 256-entry map. */
void fq_cpu_quantize8(const float *x, float offset, int64_t n, int64_t blocksize, const float *code,
                      uint8_t *q, float *absmax);
/* out[i] = ftz(code[q[i]] * absmax[i / blocksize]) + offset. */
void fq_cpu_dequantize8(const uint8_t *q, const float *absmax, const float *code, float offset,
                        int64_t n, int64_t blocksize, float *out);
/* rcp.approx.ftz.f32 as the H100 computes it. */
float fq_rcp_approx(float x);

/* ---- CUDA (src/kernels/cuda); return a cudaError_t as int, 0 = success ---- */
#ifdef FQ_HAVE_CUDA
#include <cuda_runtime_api.h>

int fq_cuda_quantize4(const void *x, fq_dtype dtype, int64_t n, int64_t blocksize, fq_quant_type qt,
                      uint8_t *packed, float *absmax, cudaStream_t stream);
/* The host-built decision table fq_cuda_quantize4 passes to its kernel (no GPU
 * needed): for bucket k of 16 p + 40 (|p| for FP4), the threshold inside it (+inf if
 * none) and how many thresholds lie below it. Tests check it, because a compiler once
 * dropped the table's construction (see build_table in quant4.cu). */
void fq_cuda_quant4_bucket_table(fq_quant_type qt, float thr[64], uint8_t base[64]);
/* absmax is f32 per block (non-nested case). */
int fq_cuda_dequantize4(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                        fq_quant_type qt, void *out, fq_dtype out_dtype, cudaStream_t stream);
/* Double-quantized state, absmax reconstructed on the fly:
 * absmax[b] = ftz(code256[qabsmax[b]] * nested_absmax[b / 256]) + offset. */
int fq_cuda_dequantize4_nested(const uint8_t *packed, const uint8_t *qabsmax, const float *nested_absmax,
                               const float *code256, float offset, int64_t n, int64_t blocksize,
                               fq_quant_type qt, void *out, fq_dtype out_dtype, cudaStream_t stream);
/* *out (device, 1 float) = torch's CUDA mean of x[0..n) in torch's order. */
int fq_cuda_torch_mean(const float *x, int64_t n, float *out, cudaStream_t stream);
/* Same as fq_cpu_quantize8; offset read from device memory (*offset). */
int fq_cuda_quantize8(const float *x, const float *offset, int64_t n, int64_t blocksize,
                      const float *code, uint8_t *q, float *absmax, cudaStream_t stream);
int fq_cuda_dequantize8(const uint8_t *q, const float *absmax, const float *code, float offset,
                        int64_t n, int64_t blocksize, float *out, cudaStream_t stream);
/* Writes rcp.approx.ftz.f32(1.m) for all 2^23 mantissas m into out (device). */
int fq_cuda_rcp_table(uint32_t *out, cudaStream_t stream);
#endif

#endif

/* Device helpers shared by the nn_*.cu kernels: the rounding of fq_round_to
 * (bit for bit the CPU's), loads of any float dtype, launch sizes and block
 * reductions. */
#ifndef FQ_NN_COMMON_CUH
#define FQ_NN_COMMON_CUH

#include "kernels/cuda/nn_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace fqnn {

constexpr int kThreads = 256;

/* Round to bf16 and back, as fq_f32_to_bf16_bits (a NaN stays a quiet NaN). */
__device__ __forceinline__ float bf16_round(float x) {
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __uint_as_float(((u >> 16) | 0x40u) << 16);
    u += 0x7fffu + ((u >> 16) & 1u);
    return __uint_as_float(u & 0xffff0000u);
}

/* Round to f16 and back (the hardware conversion rounds to nearest even,
 * subnormals included, as fq_f32_to_f16_bits does). */
__device__ __forceinline__ float f16_round(float x) { return __half2float(__float2half_rn(x)); }

__device__ __forceinline__ float rnd_to(float x, int rnd) {
    return rnd == FQ_BF16 ? bf16_round(x) : rnd == FQ_F16 ? f16_round(x) : x;
}

/* Element i of an array of dtype t (f32/f16/bf16/f64) as f32. */
__device__ __forceinline__ float load_any(const void *p, int t, int64_t i) {
    switch (t) {
    case FQ_F16: return __half2float(static_cast<const __half *>(p)[i]);
    case FQ_BF16: return __bfloat162float(static_cast<const __nv_bfloat16 *>(p)[i]);
    case FQ_F64: return (float)static_cast<const double *>(p)[i];
    default: return static_cast<const float *>(p)[i];
    }
}

/* Activation storage: f32, or bf16 holding values already rounded to bf16
 * (the ops store rnd_to(v, FQ_BF16), so the narrowing below is exact). */
__device__ __forceinline__ float ldv(const float *p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ldv(const __nv_bfloat16 *p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void stv(float *p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void stv(__nv_bfloat16 *p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

/* Grid for a grid-stride loop over n items with kThreads threads per block. */
inline unsigned grid_for(int64_t n, int64_t per_thread = 1) {
    int64_t b = (n + (int64_t)kThreads * per_thread - 1) / ((int64_t)kThreads * per_thread);
    if (b < 1) b = 1;
    if (b > (1 << 20)) b = 1 << 20;
    return (unsigned)b;
}

__device__ __forceinline__ int64_t gtid() { return (int64_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t gstride() { return (int64_t)gridDim.x * blockDim.x; }

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum of v over the block (blockDim.x a multiple of 32, at most 1024); every
 * thread gets the total. sh: 33 doubles of shared memory, reusable right after. */
__device__ __forceinline__ double block_sum(double v, double *sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double t = lane < nw ? sh[lane] : 0.0;
        t = warp_sum(t);
        if (lane == 0) sh[32] = t;
    }
    __syncthreads();
    const double r = sh[32];
    __syncthreads(); /* sh may be reused by the next reduction */
    return r;
}

inline int launch_status() { return (int)cudaGetLastError(); }

} // namespace fqnn

#endif

/* Device helpers shared by the quantization kernels: the fast-math steps of
 * bitsandbytes' CUDA build spelled out as .ftz PTX instructions (so the
 * result never depends on compiler flags), launch sizing, and the 16-byte
 * vector type. Included by .cu files only. */
#ifndef FQ_QUANT_COMMON_CUH
#define FQ_QUANT_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "core/core.h"
#include "kernels/cuda/stream_device.cuh"
#include "formats/formats.h"
/* kernels.h is a C header without C++ guards: give its launchers C linkage here
 * (everything it includes is already in, so only its own declarations land here). */
extern "C" {
#include "kernels/kernels.h"
}

/* rcp.approx.ftz.f32: what `1.0f / x` compiles to under --use_fast_math. */
__device__ __forceinline__ float fq_rcp_ftz(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

/* a * b with subnormal operands and result flushed to zero (mul.ftz). Written
 * as PTX so that it can never be contracted into an FMA. */
__device__ __forceinline__ float fq_mul_ftz(float a, float b) {
    float r;
    asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

/* a + b with subnormal operands and result flushed to zero (add.ftz). */
__device__ __forceinline__ float fq_add_ftz(float a, float b) {
    float r;
    asm("add.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

/* Flushes a subnormal to a zero of the same sign (in integer ops: no rewrite can drop it). */
__device__ __forceinline__ float fq_ftz(float a) {
    uint32_t u = __float_as_uint(a);
    return (u & 0x7f800000u) ? a : __uint_as_float(u & 0x80000000u);
}

/* fmaxf(m, |x|) with x flushed to zero first; NaN x leaves m (fmaxf semantics). */
__device__ __forceinline__ float fq_absmax_ftz(float m, float x) {
    float r;
    asm("max.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(m), "f"(fabsf(x)));
    return r;
}

/* y + offset in IEEE float (torch's add), never fused with the product before it. */
__device__ __forceinline__ float fq_add_rn(float a, float b) { return __fadd_rn(a, b); }

/* Value of element j (0..EV-1) of a 16-byte vector holding T values, as float (exact). */
template <typename T> struct fq_vec;
template <> struct fq_vec<float> {
    static constexpr int EV = 4;
    static __device__ __forceinline__ float get(const uint4 &v, int j) {
        return __uint_as_float(j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w);
    }
};
template <> struct fq_vec<__half> {
    static constexpr int EV = 8;
    static __device__ __forceinline__ float get(const uint4 &v, int j) {
        uint32_t w = (j >> 1) == 0 ? v.x : (j >> 1) == 1 ? v.y : (j >> 1) == 2 ? v.z : v.w;
        uint16_t h = (uint16_t)((j & 1) ? (w >> 16) : (w & 0xffffu));
        return __half2float(__ushort_as_half(h));
    }
};
template <> struct fq_vec<__nv_bfloat16> {
    static constexpr int EV = 8;
    static __device__ __forceinline__ float get(const uint4 &v, int j) {
        uint32_t w = (j >> 1) == 0 ? v.x : (j >> 1) == 1 ? v.y : (j >> 1) == 2 ? v.z : v.w;
        return __uint_as_float((j & 1) ? (w & 0xffff0000u) : (w << 16));
    }
};

/* Persistent-grid size: at most what fills every SM of the stream's device
 * (fq_stream_device: no process-wide cache of device attributes), then
 * trimmed so that every CTA walks the same number of tiles (no tail round in
 * which a few CTAs work alone; the bytes in flight stay ample). */
static inline cudaError_t fq_grid_for(cudaStream_t stream, int64_t tiles, int ctas_per_sm, int *grid) {
    int dev = 0, sms = 0;
    cudaError_t e = fq_stream_device(stream, &dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return e;
    int64_t maxg = (int64_t)(sms > 0 ? sms : 1) * ctas_per_sm;
    if (tiles < 1) tiles = 1;
    int64_t per = (tiles + maxg - 1) / maxg; /* tiles per CTA */
    *grid = (int)((tiles + per - 1) / per);
    return cudaSuccess;
}

static inline bool fq_aligned(const void *p, uintptr_t a) { return ((uintptr_t)p & (a - 1)) == 0; }

/* The error a launch left behind (and clears it, so the next call starts clean). */
static inline int fq_launch_status(void) { return (int)cudaGetLastError(); }

#endif

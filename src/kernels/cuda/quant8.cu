/* 8-bit dynamic blockwise quantization (bitsandbytes' quantize_blockwise with
 * a sorted 256-entry code, dQuantize<0>), used for the double-quant absmax,
 * and its dequantization. Byte-identical to bitsandbytes' fast-math kernel:
 * d = x - offset (torch's IEEE subtraction), amax = fmaxf over ftz(|d|) of the
 * zero-padded block, r = rcp.approx.ftz(amax), q = dQuantize(code, ftz(d * r)).
 * These arrays are small (one value per 4-bit block), so a warp per block is
 * plenty; the code table lives in shared memory. */
#include "kernels/cuda/quant_common.cuh"

#include <float.h>

namespace {

constexpr int kThreads = 256;

/* bitsandbytes' dQuantize<0>: a 7-step binary search over the sorted code,
 * then the nearer neighbour by the midpoint (ties stay on the pivot), with
 * the fast-math build's flushed operands. */
__device__ __forceinline__ uint32_t dquantize(const float *code, float x) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f, val = code[pivot];
#pragma unroll
    for (int i = 64; i > 0; i >>= 1) {
        if (x > fq_ftz(val)) {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[upper_pivot];
    if (lower_pivot == 0) lower = code[lower_pivot];
    if (x > fq_ftz(val)) {
        float mid = fq_mul_ftz(fq_add_ftz(upper, val), 0.5f);
        return x > mid ? (uint32_t)upper_pivot : (uint32_t)pivot;
    }
    float mid = fq_mul_ftz(fq_add_ftz(lower, val), 0.5f);
    return x < mid ? (uint32_t)lower_pivot : (uint32_t)pivot;
}

/* One warp per block of `bs` values; lanes stride through it (coalesced). */
__global__ void __launch_bounds__(kThreads)
    k_quantize8(const float *__restrict__ x, const float *__restrict__ offset, int64_t n, int bs,
                const float *__restrict__ code, uint8_t *__restrict__ q, float *__restrict__ absmax) {
    __shared__ float s_code[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_code[i] = code[i];
    __syncthreads();
    const float off = *offset;
    const int lane = threadIdx.x & 31;
    const int64_t nblocks = (n + bs - 1) / bs;
    const int64_t warps = (int64_t)gridDim.x * (kThreads / 32);
    for (int64_t b = (int64_t)blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5); b < nblocks; b += warps) {
        const int64_t start = b * bs;
        const int len = n - start < bs ? (int)(n - start) : bs;
        /* A partial block also sees bnb's zero padding: the max starts at 0 there. */
        float m = len == bs ? -FLT_MAX : 0.0f;
        for (int i = lane; i < len; i += 32) m = fq_absmax_ftz(m, __fsub_rn(x[start + i], off));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (lane == 0) absmax[b] = m;
        const float r = fq_rcp_ftz(m);
        for (int i = lane; i < len; i += 32)
            q[start + i] = (uint8_t)dquantize(s_code, fq_mul_ftz(__fsub_rn(x[start + i], off), r));
    }
}

/* out[i] = ftz(code[q[i]] * absmax[i / bs]) + offset (the add is torch's, IEEE). */
__global__ void __launch_bounds__(kThreads)
    k_dequantize8(const uint8_t *__restrict__ q, const float *__restrict__ absmax, const float *__restrict__ code,
                  float offset, int64_t n, int bs, float *__restrict__ out) {
    __shared__ float s_code[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_code[i] = code[i];
    __syncthreads();
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = __fadd_rn(fq_mul_ftz(s_code[q[i]], absmax[i / bs]), offset);
}

bool bs8_ok(int64_t bs) { return bs >= 32 && bs <= 4096 && (bs & (bs - 1)) == 0; }

} // namespace

extern "C" int fq_cuda_quantize8(const float *x, const float *offset, int64_t n, int64_t blocksize,
                                 const float *code, uint8_t *q, float *absmax, cudaStream_t stream) {
    if (n < 0 || !bs8_ok(blocksize) || !x || !offset || !code || !q || !absmax) return (int)cudaErrorInvalidValue;
    if (n == 0) return 0;
    int grid;
    int64_t blocks = (n + blocksize - 1) / blocksize;
    cudaError_t e = fq_grid_for(stream, (blocks + kThreads / 32 - 1) / (kThreads / 32), 8, &grid);
    if (e != cudaSuccess) return (int)e;
    k_quantize8<<<grid, kThreads, 0, stream>>>(x, offset, n, (int)blocksize, code, q, absmax);
    return fq_launch_status();
}

extern "C" int fq_cuda_dequantize8(const uint8_t *q, const float *absmax, const float *code, float offset,
                                   int64_t n, int64_t blocksize, float *out, cudaStream_t stream) {
    if (n < 0 || !bs8_ok(blocksize) || !q || !absmax || !code || !out) return (int)cudaErrorInvalidValue;
    if (n == 0) return 0;
    int grid;
    cudaError_t e = fq_grid_for(stream, (n + kThreads - 1) / kThreads, 8, &grid);
    if (e != cudaSuccess) return (int)e;
    k_dequantize8<<<grid, kThreads, 0, stream>>>(q, absmax, code, offset, n, (int)blocksize, out);
    return fq_launch_status();
}

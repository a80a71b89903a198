/* Measures this GPU's rcp.approx.ftz.f32 over every mantissa: out[m] = bits of
 * the instruction's result for 1.m (exponent 0). The result of the
 * instruction depends only on the mantissa, so this is the whole table that
 * the CPU path (fq_rcp_approx) reproduces from the H100's measurement. */
#include "kernels/cuda/quant_common.cuh"

namespace {

__global__ void k_rcp_table(uint32_t *out) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t m = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; m < (1 << 23); m += stride)
        out[m] = __float_as_uint(fq_rcp_ftz(__uint_as_float(0x3f800000u | (uint32_t)m)));
}

} // namespace

extern "C" int fq_cuda_rcp_table(uint32_t *out, cudaStream_t stream) {
    if (!out || !fq_aligned(out, 4)) return (int)cudaErrorInvalidValue;
    int grid;
    cudaError_t e = fq_grid_for(stream, (1 << 23) / 256, 8, &grid);
    if (e != cudaSuccess) return (int)e;
    k_rcp_table<<<grid, 256, 0, stream>>>(out);
    return fq_launch_status();
}

/* stream_probe: the fastest read of a byte range we know how to write, for the
 * benchmark only (bench_linear --ceiling). It reads the bytes and nothing else, so
 * its time per call is a floor for any M = 1 kernel that must read the same weight
 * once per call: the issue-3 target "M = 1 at >= 0.85 of the copy bandwidth" can be
 * checked against what a kernel with no decode at all reaches in the same harness.
 *
 * Shape: 256-thread blocks, 2 per SM (so that the next call's blocks can be resident
 * while this call's are still running); each thread keeps 8 independent 16-byte
 * loads (ld.global.nc, no L1 allocation, 256-byte L2 fetch) in flight, a warp's
 * loads are 512 contiguous bytes. The loaded words are folded into one value that
 * is stored only if it equals a constant the data never produces, so the loads
 * cannot be dropped.
 *
 * Modes (what the call may overlap with its predecessor in the stream):
 *   0 plain launch: starts after the previous kernel has finished;
 *   1 programmatic dependent launch, griddepcontrol.wait before the first load
 *     (what our GEMV kernels do);
 *   2 programmatic dependent launch, all loads before griddepcontrol.wait (only the
 *     final store waits): consecutive calls overlap as far as the hardware lets
 *     them - a bound no kernel that must wait for its input can beat;
 *   3 as 2, but each block also holds 100 KB of shared memory, so that the next
 *     call's blocks cannot start on an SM before this call's have left it (what a
 *     kernel with one large block per SM gets from loading before the wait). */
#include "kernels/cuda/lin4_common.cuh"

#define SP_THREADS 256
#define SP_BLOCKS_PER_SM 2
#define SP_UNROLL 8
#define SP_HOG_SMEM (100 << 10) /* mode 3: two blocks fill an SM's shared memory */

typedef struct {
    const uint4 *p;
    int64_t n16; /* 16-byte words to read */
    unsigned *sink;
} sp_args;

template <int MODE>
__global__ void __launch_bounds__(SP_THREADS) stream_probe_kernel(sp_args a) {
    const uint4 *p = a.p;
    const int64_t n16 = a.n16;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (MODE >= 1) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    if (MODE == 1) asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
    const int64_t T = (int64_t)gridDim.x * SP_THREADS;
    /* warp-contiguous: lane l of warp w reads uint4 (w * 32 + l) + j * T */
    int64_t i = (int64_t)blockIdx.x * SP_THREADS + threadIdx.x;
    unsigned acc = 0;
    for (; i + (SP_UNROLL - 1) * T < n16; i += SP_UNROLL * T) {
        uint4 v[SP_UNROLL];
#pragma unroll
        for (int u = 0; u < SP_UNROLL; u++) v[u] = fq_lin4_ld_stream16(p + i + u * T);
#pragma unroll
        for (int u = 0; u < SP_UNROLL; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n16; i += T) {
        const uint4 v = fq_lin4_ld_stream16(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (MODE == 2) asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
    if (acc == 0x9e3779b9u) *a.sink = acc; /* never in practice; keeps the loads */
}

extern "C" int fq_cuda_stream_probe(const void *p, size_t bytes, unsigned *sink, int mode, int sm_count,
                                    cudaStream_t stream) {
    if (!p || !sink || ((uintptr_t)p & 15) || mode < 0 || mode > 3) return (int)cudaErrorInvalidValue;
    const int64_t n16 = (int64_t)(bytes / 16);
    if (n16 == 0) return (int)cudaSuccess;
    int64_t blocks = (int64_t)(sm_count > 0 ? sm_count : 132) * SP_BLOCKS_PER_SM;
    const int64_t need = (n16 + SP_THREADS - 1) / SP_THREADS;
    if (blocks > need) blocks = need;
    void (*fn)(sp_args) =
        mode == 0 ? stream_probe_kernel<0> : mode == 1 ? stream_probe_kernel<1> : stream_probe_kernel<2>;
    const size_t smem = mode == 3 ? SP_HOG_SMEM : 0;
    if (mode == 3) {
        const cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return (int)e;
    }
    const sp_args a = {(const uint4 *)p, n16, sink};
    return fq_lin4_launch(fn, (unsigned)blocks, SP_THREADS, smem, stream, a, mode == 0);
}

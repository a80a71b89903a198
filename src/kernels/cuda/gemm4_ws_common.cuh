/* Device helpers shared by the sm_90a 4-bit GEMMs gemm4_ws_sm90.cu and gemm4_sa_sm90.cu:
 * mbarriers, TMA copies, register reallocation, the exact 4-bit decode (a 16-entry code
 * table addressed with one PRMT) and the register-tile epilogue. Everything here is
 * compiled only for sm_90a (FQ_WS_DEVICE); fq_ws_tmap_2d is the host side's tensor-map
 * encoder (gemm4_ws_sm90.cu, after fq_cuda_gemm4_ws_prepare). */
#ifndef FQ_GEMM4_WS_COMMON_CUH
#define FQ_GEMM4_WS_COMMON_CUH

#include "kernels/cuda/lin4_common.cuh"

#include <cuda.h>
#include <cudaTypedefs.h>

/* A 2-D tensor map (inner dimension first) for TMA copies; cudaSuccess or cudaErrorInvalidValue
 * (cudaErrorInitializationError before fq_cuda_gemm4_ws_prepare). */
int fq_ws_tmap_2d(CUtensorMap *map, CUtensorMapDataType dt, void *ptr, uint64_t inner, uint64_t outer,
                  uint64_t stride_bytes, uint32_t box_inner, uint32_t box_outer, CUtensorMapSwizzle swz);

/* gemm4_sa_sm90.cu, reached through gemm4_ws's configurations whose ws_config.sa is set:
 * bx = x rows per consumer warpgroup (216 or 256); cudaSuccess or a CUDA error code. */
int fq_cuda_gemm4_sa(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e, int bx, int sm_count,
                     cudaStream_t stream);
int fq_cuda_gemm4_sa_prepare(void);

#if defined(FQ_BUILD_SM90A) && defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FQ_WS_DEVICE 1
#endif

#ifdef FQ_WS_DEVICE
/* ---- mbarriers and TMA ---- */
static __device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
static __device__ __forceinline__ void mbar_arrive_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.release.cta.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
}
static __device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.release.cta.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
                 : "memory");
}
static __device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile("{\n.reg .pred done;\n"
                 "WAIT_%=:\n"
                 "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
                 "r"(parity)
                 : "memory");
}
static __device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap *map, int c0, int c1,
                                                   uint32_t bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
                 "%3}], [%4];\n" ::"r"(dst),
                 "l"((uint64_t)map), "r"(c0), "r"(c1), "r"(bar)
                 : "memory");
}


static __device__ __forceinline__ void tma_store_2d(const CUtensorMap *map, uint32_t src, int c0, int c1) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"((uint64_t)map),
                 "r"(c0), "r"(c1), "r"(src)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
/* The bulk stores this thread issued have read their shared memory. */
static __device__ __forceinline__ void tma_store_wait_read(void) {
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
static __device__ __forceinline__ void tma_store_wait_all(void) {
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

template <int R> static __device__ __forceinline__ void setmaxnreg_inc(void) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R> static __device__ __forceinline__ void setmaxnreg_dec(void) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}

/* GELU (tanh form), as fq_epi computes it. */
static __device__ __forceinline__ float ws_gelu(float v) {
    const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.0f + tanhf(u));
}

template <int YT> static __device__ __forceinline__ void ws_st1(void *p, int64_t i, float v) {
    if (YT == FQ_BF16) ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
    else if (YT == FQ_F16) ((__half *)p)[i] = __float2half_rn(v);
    else ((float *)p)[i] = v;
}
template <int YT> static __device__ __forceinline__ void ws_st2(void *p, int64_t i, float v0, float v1) {
    if (YT == FQ_BF16) *(__nv_bfloat162 *)((__nv_bfloat16 *)p + i) = __floats2bfloat162_rn(v0, v1);
    else if (YT == FQ_F16) *(__half2 *)((__half *)p + i) = __floats2half2_rn(v0, v1);
    else *(float2 *)((float *)p + i) = make_float2(v0, v1);
}

/* Stores a consumer's 64 x BX accumulator tile: acc[4j + v] is (W row nA + 8 (v >> 1),
 * x row m0 + 8j + 2 t4 + (v & 1)). Lanes g and g ^ 1 swap one value so that each
 * holds two neighbouring n of one x row (n = nA or nA + 8, minus 1 on odd g): one
 * 4/8-byte store per pair when N is even (PAIR). b: the bias of those two n for the
 * two row groups. Compile-time type and activation keep the code small (the hot
 * loop shares the instruction cache with it). */
template <int BX, int YT, bool GELU, bool PAIR>
static __device__ __forceinline__ void ws_epilogue(const float *acc, void *y, int64_t M, int64_t N, int64_t m0,
                                                   int64_t nA, bool odd, int t4, const float (&b)[2][2]) {
#pragma unroll
    for (int j = 0; j < BX / 8; j++) {
        const int64_t m = m0 + 8 * j + 2 * t4 + (odd ? 1 : 0);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
            const float r = __shfl_xor_sync(0xffffffffu, odd ? v0 : v1, 4);
            const int64_t n = nA + 8 * h - (odd ? 1 : 0);
            float lo = (odd ? r : v0) + b[h][0], hi = (odd ? v1 : r) + b[h][1];
            if (GELU) {
                lo = ws_gelu(lo);
                hi = ws_gelu(hi);
            }
            if (m >= M) continue;
            if (PAIR) {
                if (n < N) ws_st2<YT>(y, m * N + n, lo, hi);
            } else {
                if (n < N) ws_st1<YT>(y, m * N + n, lo);
                if (n + 1 < N) ws_st1<YT>(y, m * N + n + 1, hi);
            }
        }
    }
}

/* ws_epilogue with y's type, GELU and the pair stores (N even) chosen at run time. */
template <int BX>
static __device__ __forceinline__ void ws_epilogue_any(const float *acc, void *y, int yt, bool gelu, int64_t M,
                                                       int64_t N, int64_t m0, int64_t nA, bool odd, int t4,
                                                       const float (&b)[2][2]) {
    const bool pair = (N & 1) == 0;
#define WS_EPI(YT, GL, PR) ws_epilogue<BX, YT, GL, PR>(acc, y, M, N, m0, nA, odd, t4, b)
    if (yt == FQ_BF16 && pair && !gelu) WS_EPI(FQ_BF16, false, true);
    else if (yt == FQ_F16 && pair && !gelu) WS_EPI(FQ_F16, false, true);
    else if (yt == FQ_F32 && pair && !gelu) WS_EPI(FQ_F32, false, true);
    else if (yt == FQ_BF16 && pair) WS_EPI(FQ_BF16, true, true);
    else if (yt == FQ_F16 && pair) WS_EPI(FQ_F16, true, true);
    else if (yt == FQ_F32 && pair) WS_EPI(FQ_F32, true, true);
    else if (yt == FQ_BF16) { if (gelu) WS_EPI(FQ_BF16, true, false); else WS_EPI(FQ_BF16, false, false); }
    else if (yt == FQ_F16) { if (gelu) WS_EPI(FQ_F16, true, false); else WS_EPI(FQ_F16, false, false); }
    else { if (gelu) WS_EPI(FQ_F32, true, false); else WS_EPI(FQ_F32, false, false); }
#undef WS_EPI
}

/* The bias of the two output pairs a lane stores (see ws_epilogue), 0 without a bias. */
static __device__ __forceinline__ void ws_bias_pairs(const fq_lin4_epilogue &e, int64_t N, int64_t nA, bool odd,
                                                     float (&b)[2][2]) {
    if (!e.bias) return;
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int64_t n = nA + 8 * h - (odd ? 1 : 0) + i;
            if (n < N) b[h][i] = fq_ldf(e.bias, e.bias_dtype, n);
        }
}


/* code[nibble] from the 16-entry table at shared address tb (256-byte aligned): byte j of
 * the offsets word o (nibble x 4) and the upper bytes of tb make the address in one PRMT.
 * The table is written before the kernel's __syncthreads and never again. */
static __device__ __forceinline__ float ws_code(uint32_t o, uint32_t tb, int j) {
    float v;
    asm("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(__byte_perm(o, tb, 0x7650u | (uint32_t)j)));
    return v;
}

/* Byte j of a word of gathered bytes (H = high nibbles x 4, L = low nibbles x 4): the
 * pair packed as dequantize rounds it, bf16/f16(code[nibble] * am) with mul.rn.ftz. */
template <typename T>
static __device__ __forceinline__ uint32_t ws_dec_pair(uint32_t tb, uint32_t H, uint32_t L, int j, float am) {
    return fq_mma_t<T>::pack(fq_lin4_mul_ftz(ws_code(H, tb, j), am), fq_lin4_mul_ftz(ws_code(L, tb, j), am));
}
#endif /* FQ_WS_DEVICE */

#endif

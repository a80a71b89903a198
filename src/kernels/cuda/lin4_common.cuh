/* Device helpers shared by the 4-bit linear kernels (gemv4.cu, gemm4.cu,
 * gemm4_sm90.cu): dtype loads/stores, the epilogue, the shared-memory decode
 * table and the mma.sync wrapper. Included by .cu files only. */
#ifndef FQ_LIN4_COMMON_CUH
#define FQ_LIN4_COMMON_CUH

#include "kernels/cuda/linear_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

/* ---- scalar loads/stores by run-time dtype ------------------------------------- */

static __device__ __forceinline__ float fq_ldf(const void *p, int dt, int64_t i) {
    switch (dt) {
    case FQ_F32: return ((const float *)p)[i];
    case FQ_F16: return __half2float(((const __half *)p)[i]);
    case FQ_BF16: return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    case FQ_F64: return (float)((const double *)p)[i];
    default: return 0.0f;
    }
}

static __device__ __forceinline__ void fq_stf(void *p, int dt, int64_t i, float v) {
    switch (dt) {
    case FQ_F32: ((float *)p)[i] = v; break;
    case FQ_F16: ((__half *)p)[i] = __float2half_rn(v); break;
    case FQ_BF16: ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v); break;
    default: break;
    }
}

/* Two consecutive outputs y[i], y[i+1] (i even, row length even => aligned). */
static __device__ __forceinline__ void fq_stf2(void *p, int dt, int64_t i, float v0, float v1) {
    switch (dt) {
    case FQ_F32: *(float2 *)((float *)p + i) = make_float2(v0, v1); break;
    case FQ_F16: *(__half2 *)((__half *)p + i) = __floats2half2_rn(v0, v1); break;
    case FQ_BF16: *(__nv_bfloat162 *)((__nv_bfloat16 *)p + i) = __floats2bfloat162_rn(v0, v1); break;
    default: break;
    }
}

/* ---- epilogue ------------------------------------------------------------------- */

static __device__ __forceinline__ float fq_epi(const fq_lin4_epilogue &e, int64_t n, float v) {
    if (e.bias) v += fq_ldf(e.bias, e.bias_dtype, n);
    if (e.act == FQ_EPI_GELU_TANH) {
        float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
        v = 0.5f * v * (1.0f + tanhf(u));
    }
    return v;
}

/* ---- the decode table -------------------------------------------------------------
 * FQ_TBL_WORDS 32-bit words in shared memory: for every byte value b (two nibbles)
 * and every lane l, word b*32 + l holds the pair (code[b >> 4], code[b & 15]) in the
 * MMA operand type, the high nibble (the even, first element) in the low half.
 * 32 copies, one per lane: lane l only reads bank l, so lookups never conflict. */
#define FQ_TBL_WORDS (256 * 32)

template <typename T> struct fq_mma_t;
template <> struct fq_mma_t<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *(uint32_t *)&h;
    }
    /* Exact f32 values of a packed pair. */
    static __device__ __forceinline__ float2 unpack(uint32_t v) {
        return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
    }
};
template <> struct fq_mma_t<__half> {
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *(uint32_t *)&h;
    }
    static __device__ __forceinline__ float2 unpack(uint32_t v) {
        __half2 h = *(__half2 *)&v;
        return __half22float2(h);
    }
};

/* Fills tbl (FQ_TBL_WORDS words, 16-byte aligned) from the 16 code values in qm_s
 * (shared memory). Thread b < 256 writes the 32 copies of entry b as eight 16-byte
 * stores, rotated by b so that the 8 threads of a store phase hit distinct banks.
 * The caller syncs before and after. */
template <typename T>
static __device__ __forceinline__ void fq_tbl_build(uint32_t *tbl, const float *qm_s) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
        const uint32_t v = fq_mma_t<T>::pack(qm_s[b >> 4], qm_s[b & 15]);
        const uint4 vv = make_uint4(v, v, v, v);
        uint4 *row = (uint4 *)(tbl + b * 32);
#pragma unroll
        for (int j = 0; j < 8; j++) row[(j + b) & 7] = vv;
    }
}

/* a * b rounded to nearest with subnormals flushed (bitsandbytes' fast-math
 * product), whatever the compiler flags. */
static __device__ __forceinline__ float fq_lin4_mul_ftz(float a, float b) {
    float r;
    asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

/* A 16-byte read-only load of streamed weights: not kept in L1, 256-byte L2 sectors. */
static __device__ __forceinline__ uint4 fq_lin4_ld_stream16(const void *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

/* Absmax of block `blk` (f32, or reconstructed from the nested state). code_s is
 * the 256-entry nested map in shared memory. */
static __device__ __forceinline__ float fq_absmax(const fq_lin4_weight &w, const float *code_s, int64_t blk) {
    if (w.nested) return code_s[w.qabsmax[blk]] * __ldg(&w.nested_absmax[blk >> 8]) + w.offset;
    return __ldg(&w.absmax[blk]);
}

/* ---- tensor-core wrappers ------------------------------------------------------- */

template <typename T>
static __device__ __forceinline__ void fq_mma16816(float c[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                   uint32_t a3, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void fq_mma16816<__nv_bfloat16>(float c[4], uint32_t a0, uint32_t a1,
                                                          uint32_t a2, uint32_t a3, uint32_t b0,
                                                          uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    (void)c; (void)a0; (void)a1; (void)a2; (void)a3; (void)b0; (void)b1;
#endif
}
template <>
__device__ __forceinline__ void fq_mma16816<__half>(float c[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                   uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    (void)c; (void)a0; (void)a1; (void)a2; (void)a3; (void)b0; (void)b1;
#endif
}

/* ---- memory helpers --------------------------------------------------------------- */

/* Streaming 8-byte load of weight data: read once, keep it out of L1, and let L2
 * fetch the rest of the 256-byte line (the next segments of the same row). */
static __device__ __forceinline__ uint2 fq_ld_stream_u2(const void *p) {
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0,%1}, [%2];\n"
                 : "=r"(v.x), "=r"(v.y)
                 : "l"(p));
    return v;
}

static __device__ __forceinline__ uint4 fq_ld_u4(const void *p) {
    return __ldg((const uint4 *)p);
}

static __device__ __forceinline__ uint32_t fq_smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

static __device__ __forceinline__ void fq_cp_async16(void *smem, const void *gmem, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    int n = pred ? 16 : 0; /* src-size 0: zero fill */
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(fq_smem_addr(smem)), "l"(gmem),
                 "r"(n));
#else
    (void)smem; (void)gmem; (void)pred;
#endif
}
static __device__ __forceinline__ void fq_cp_async4(void *smem, const void *gmem, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    int n = pred ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(fq_smem_addr(smem)), "l"(gmem),
                 "r"(n));
#else
    (void)smem; (void)gmem; (void)pred;
#endif
}
static __device__ __forceinline__ void fq_cp_async_commit(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> static __device__ __forceinline__ void fq_cp_async_wait(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

/* ---- mbarriers and bulk copies (sm_90) ------------------------------------------- */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
static __device__ __forceinline__ void fq_mbar_init(uint64_t *b, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(fq_smem_addr(b)), "r"(count) : "memory");
}
/* one arrival that also announces `bytes` of bulk copies completing on b */
static __device__ __forceinline__ void fq_mbar_arrive_tx(uint64_t *b, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(fq_smem_addr(b)), "r"(bytes)
                 : "memory");
}
static __device__ __forceinline__ void fq_mbar_arrive(uint64_t *b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(fq_smem_addr(b)) : "memory");
}
/* waits until the phase of parity `parity` of b has completed */
static __device__ __forceinline__ void fq_mbar_wait(uint64_t *b, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     " selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(fq_smem_addr(b)), "r"(parity)
                     : "memory");
    } while (!done);
}
/* global -> shared bulk copy (16-byte aligned, bytes % 16 == 0) completing on bar */
static __device__ __forceinline__ void fq_bulk_g2s(void *dst, const void *src, uint32_t bytes, uint64_t *bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     fq_smem_addr(dst)),
                 "l"(src), "r"(bytes), "r"(fq_smem_addr(bar))
                 : "memory");
}
#endif
/* Asks L2 to fetch [p, p + bytes) (p and bytes multiples of 16); a hint into L2, the
 * coherent point, so it never returns stale data. Nothing before sm_90. */
static __device__ __forceinline__ void fq_bulk_prefetch_l2(const void *p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (bytes) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
#else
    (void)p; (void)bytes;
#endif
}

/* ---- launching ------------------------------------------------------------------ */

/* fn<<<grid, block, smem, stream>>>(a) as a programmatic dependent launch (the
 * kernel may start while the previous kernel on the stream finishes; it must run
 * griddepcontrol.wait before reading anything that one writes), or as a plain
 * launch (needed before sm_90). Returns a cudaError_t. */
template <typename A>
static inline int fq_lin4_launch(void (*fn)(A), unsigned grid, unsigned block, size_t smem, cudaStream_t stream,
                                 const A &a, bool plain) {
    if (plain) {
        fn<<<grid, block, smem, stream>>>(a);
        return (int)cudaGetLastError();
    }
    cudaLaunchConfig_t lc = {};
    cudaLaunchAttribute attr[1] = {};
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    lc.gridDim = dim3(grid);
    lc.blockDim = dim3(block);
    lc.dynamicSmemBytes = smem;
    lc.stream = stream;
    lc.attrs = attr;
    lc.numAttrs = 1;
    const cudaError_t err = cudaLaunchKernelEx(&lc, fn, a);
    if (err != cudaSuccess) return (int)err;
    return (int)cudaGetLastError();
}

static __host__ __device__ __forceinline__ int fq_log2i(int64_t v) {
    int l = 0;
    while (((int64_t)1 << l) < v) l++;
    return l;
}

#endif

/* wgmma.mma_async m64nNk16 for the 4-bit GEMMs (gemm4_sm90.cu, gemm4_ws_sm90.cu),
 * sm_90a: A from registers (the lane's four 32-bit words of the m64k16 fragment),
 * B from shared memory through its descriptor (K-major, 128-byte swizzle), N / 2
 * f32 accumulators per lane in d; acc = 0 overwrites them instead of adding. One
 * template for N = 128, 192, 216, 256 and bf16/f16 operands. Inline asm needs every
 * operand named in a string literal, so the macros below spell the lists out. */
#ifndef FQ_WGMMA_RS_SM90_CUH
#define FQ_WGMMA_RS_SM90_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

/* The fragments, the wait and the descriptor are those of wgmma.mma_async (PTX ISA,
 * "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"). */

/* the accumulators' places in the assembler string, 16 at a time (%96 .. %107: N = 216) */
#define FQ_WG_S0 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define FQ_WG_S1 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define FQ_WG_S2 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
#define FQ_WG_S3 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define FQ_WG_S4 "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79"
#define FQ_WG_S5 "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define FQ_WG_S6 "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111"
#define FQ_WG_S7 "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define FQ_WG_S6_216 "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107"
#define FQ_WG_S_128 FQ_WG_S0 "," FQ_WG_S1 "," FQ_WG_S2 "," FQ_WG_S3
#define FQ_WG_S_192 FQ_WG_S_128 "," FQ_WG_S4 "," FQ_WG_S5
#define FQ_WG_S_216 FQ_WG_S_192 "," FQ_WG_S6_216
#define FQ_WG_S_256 FQ_WG_S_192 "," FQ_WG_S6 "," FQ_WG_S7
/* the operands after them: the four A words, the descriptor, acc (the predicate) */
#define FQ_WG_T_128 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
#define FQ_WG_P_128 "%69"
#define FQ_WG_T_192 "}, {%96, %97, %98, %99}, %100, p, 1, 1, 0;\n}\n"
#define FQ_WG_P_192 "%101"
#define FQ_WG_T_216 "}, {%108, %109, %110, %111}, %112, p, 1, 1, 0;\n}\n"
#define FQ_WG_P_216 "%113"
#define FQ_WG_T_256 "}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
#define FQ_WG_P_256 "%133"
/* the accumulator operands */
#define FQ_WG_D8(i) \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define FQ_WG_D_128 FQ_WG_D8(0), FQ_WG_D8(8), FQ_WG_D8(16), FQ_WG_D8(24), FQ_WG_D8(32), FQ_WG_D8(40), FQ_WG_D8(48), FQ_WG_D8(56)
#define FQ_WG_D_192 FQ_WG_D_128, FQ_WG_D8(64), FQ_WG_D8(72), FQ_WG_D8(80), FQ_WG_D8(88)
#define FQ_WG_D_216 FQ_WG_D_192, FQ_WG_D8(96), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107])
#define FQ_WG_D_256 FQ_WG_D_192, FQ_WG_D8(96), FQ_WG_D8(104), FQ_WG_D8(112), FQ_WG_D8(120)

template <typename T, int N>
__device__ __forceinline__ void fq_wgmma_rs(float *d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint64_t desc,
                                            uint32_t acc);

#define FQ_WG_RS(T, TS, N)                                                                                      \
    template <>                                                                                                  \
    __device__ __forceinline__ void fq_wgmma_rs<T, N>(float *d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, \
                                                      uint64_t desc, uint32_t acc) {                             \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " FQ_WG_P_##N ", 0;\n"                                    \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TS "." TS " {" FQ_WG_S_##N FQ_WG_T_##N      \
                     : FQ_WG_D_##N                                                                               \
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(acc));                                 \
    }
FQ_WG_RS(__nv_bfloat16, "bf16", 128)
FQ_WG_RS(__nv_bfloat16, "bf16", 192)
FQ_WG_RS(__nv_bfloat16, "bf16", 216)
FQ_WG_RS(__nv_bfloat16, "bf16", 256)
FQ_WG_RS(__half, "f16", 128)
FQ_WG_RS(__half, "f16", 192)
FQ_WG_RS(__half, "f16", 216)
FQ_WG_RS(__half, "f16", 256)
#undef FQ_WG_RS

static __device__ __forceinline__ void fq_wgmma_fence(void) { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
static __device__ __forceinline__ void fq_wgmma_commit(void) {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
/* waits until at most N committed groups are pending */
template <int N> static __device__ __forceinline__ void fq_wgmma_wait(void) {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

/* Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024
 * bytes apart; saddr lies in a 1024-aligned tile (plus the k offset). */
static __device__ __forceinline__ uint64_t fq_wgmma_desc(uint32_t saddr) {
    uint64_t d = 0;
    d |= (uint64_t)((saddr & 0x3FFFFu) >> 4);
    d |= (uint64_t)1 << 16;           /* leading byte offset (unused with this swizzle): 16 B */
    d |= (uint64_t)(1024 >> 4) << 32; /* stride byte offset: 1024 B */
    d |= (uint64_t)1 << 62;           /* 128-byte swizzle */
    return d;
}

#endif

/* 16-byte accesses of 8 consecutive activations (f32 or bf16 storage) for the
 * bandwidth-bound kernels of nn_elementwise.cu and nn_norm.cu. A chunk keeps
 * the stored bits (8 bf16 in one uint4, 8 f32 in two float4), so a row held
 * in registers costs half as many registers with bf16 storage; values convert
 * to f32 exactly on use. Stores narrow with round-to-nearest, exact for the
 * values the ops store (already rounded to the storage dtype). */
#ifndef FQ_NN_VEC_CUH
#define FQ_NN_VEC_CUH

#include "kernels/cuda/nn_common.cuh"

namespace fqnn {

template <typename T>
struct Chunk8;

template <>
struct Chunk8<__nv_bfloat16> {
    uint4 u;
    __device__ __forceinline__ void load(const __nv_bfloat16 *p) { u = *reinterpret_cast<const uint4 *>(p); }
    __device__ __forceinline__ void store(__nv_bfloat16 *p) const { *reinterpret_cast<uint4 *>(p) = u; }
    __device__ __forceinline__ static float2 un(uint32_t w) {
        return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&w));
    }
    __device__ __forceinline__ static uint32_t pk(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
    __device__ __forceinline__ void get(float v[8]) const {
        float2 a = un(u.x), b = un(u.y), c = un(u.z), d = un(u.w);
        v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y, v[4] = c.x, v[5] = c.y, v[6] = d.x, v[7] = d.y;
    }
    __device__ __forceinline__ void set(const float v[8]) {
        u = make_uint4(pk(v[0], v[1]), pk(v[2], v[3]), pk(v[4], v[5]), pk(v[6], v[7]));
    }
};

template <>
struct Chunk8<float> {
    float4 a, b;
    __device__ __forceinline__ void load(const float *p) {
        a = reinterpret_cast<const float4 *>(p)[0];
        b = reinterpret_cast<const float4 *>(p)[1];
    }
    __device__ __forceinline__ void store(float *p) const {
        reinterpret_cast<float4 *>(p)[0] = a;
        reinterpret_cast<float4 *>(p)[1] = b;
    }
    __device__ __forceinline__ void get(float v[8]) const {
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }
    __device__ __forceinline__ void set(const float v[8]) {
        a = make_float4(v[0], v[1], v[2], v[3]);
        b = make_float4(v[4], v[5], v[6], v[7]);
    }
};

/* 8 f32 values (a modulation chunk) at a 16-byte aligned address. */
__device__ __forceinline__ void ld8f(const float *p, float v[8]) {
    const float4 a = reinterpret_cast<const float4 *>(p)[0], b = reinterpret_cast<const float4 *>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

/* Rounding of two values to bf16 and back (bf16_round) with the hardware
 * conversion (cvt.rn.bf16x2: to nearest even, subnormals kept): one packed
 * conversion and two unpacks instead of bf16_round's ~8 integer ALU
 * operations per value, which made the norm kernels ALU-bound. The two give
 * the same bits except for NaN (canonical NaN here, the quieted payload in
 * bf16_round), so nf accumulates fma(v, 0, nf) over the inputs: it turns NaN
 * when any input is NaN or infinite, and the caller then redoes its values
 * with rnd_to (see k_adaln_row). */
__device__ __forceinline__ void bf16_round2_hw(float &a, float &b, float &nf) {
    nf = __fmaf_rn(a, 0.0f, nf);
    nf = __fmaf_rn(b, 0.0f, nf);
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    const uint32_t w = *reinterpret_cast<uint32_t *>(&h);
    a = __uint_as_float(w << 16);
    b = __uint_as_float(w & 0xffff0000u);
}

/* h = rnd(h + rnd(gate * a)) over 8 values (the gated residual add), the
 * hardware rounding where rnd is bf16 and every value is finite. */
__device__ __forceinline__ void gated_add8(float h[8], const float g[8], const float a[8], int rnd) {
    if (rnd == FQ_BF16) {
        float nf = 0.0f, t[8];
#pragma unroll
        for (int e = 0; e < 8; e++) t[e] = __fmul_rn(g[e], a[e]);
#pragma unroll
        for (int e = 0; e < 8; e += 2) bf16_round2_hw(t[e], t[e + 1], nf);
#pragma unroll
        for (int e = 0; e < 8; e++) t[e] = __fadd_rn(h[e], t[e]);
#pragma unroll
        for (int e = 0; e < 8; e += 2) bf16_round2_hw(t[e], t[e + 1], nf);
        if (nf == nf) {
#pragma unroll
            for (int e = 0; e < 8; e++) h[e] = t[e];
            return;
        }
    }
#pragma unroll
    for (int e = 0; e < 8; e++) h[e] = rnd_to(__fadd_rn(h[e], rnd_to(__fmul_rn(g[e], a[e]), rnd)), rnd);
}

inline bool al16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

} // namespace fqnn

#endif

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

inline bool al16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

} // namespace fqnn

#endif

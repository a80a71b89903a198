/* Elementwise transformer kernels (see nn_cuda.h): each mirrors the CPU loop of
 * nn_cpu.c operation by operation, with explicit round-to-nearest products and
 * sums (__fmul_rn / __fadd_rn) where the CPU code rounds, so that no fused
 * multiply-add makes a result differ from the CPU's. */
#include "kernels/cuda/nn_common.cuh"
#include "kernels/cuda/nn_vec.cuh"

#include <math.h>
#include <type_traits>

using namespace fqnn;

namespace {

/* One grid-stride loop per functor: f(i) for i in [0, n). */
template <class F>
__global__ void __launch_bounds__(kThreads) k_map(int64_t n, F f) {
    for (int64_t i = gtid(); i < n; i += gstride()) f(i);
}

/* The same with 32-bit index arithmetic (n < 2^31): fewer instructions per
 * element for the cheap functors. */
template <class F>
__global__ void __launch_bounds__(kThreads) k_map32(uint32_t n, F f) {
    const uint32_t stride = gridDim.x * blockDim.x;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) f((int64_t)i);
}

template <class F>
int run_map(int64_t n, const F &f, cudaStream_t st) {
    if (n <= 0) return 0;
    if (n < ((int64_t)1 << 31)) k_map32<F><<<grid_for(n, 4), kThreads, 0, st>>>((uint32_t)n, f);
    else k_map<F><<<grid_for(n, 4), kThreads, 0, st>>>(n, f);
    return launch_status();
}

template <typename T>
struct Cast {
    const void *x;
    int xt;
    T *y;
    int rnd;
    __device__ void operator()(int64_t i) const { stv(y, i, rnd_to(load_any(x, xt, i), rnd)); }
};

struct Scale {
    const float *x;
    float alpha;
    float *y;
    int rnd;
    __device__ void operator()(int64_t i) const { y[i] = rnd_to(__fmul_rn(x[i], alpha), rnd); }
};

struct Add {
    const float *a, *b;
    float *y;
    int rnd;
    __device__ void operator()(int64_t i) const { y[i] = rnd_to(__fadd_rn(a[i], b[i]), rnd); }
};

template <typename T>
struct Silu {
    const T *x;
    T *y;
    int rnd;
    __device__ void operator()(int64_t i) const {
        const float v = ldv(x, i);
        stv(y, i, rnd_to(__fdiv_rn(v, __fadd_rn(1.0f, expf(-v))), rnd));
    }
};

/* 0.5 * v * (1 + tanh(beta * (v + kappa * v^3))), each step an f32 op */
__device__ __forceinline__ float gelu_tanh_f(float v) {
    const float beta = (float)(1.41421356237309504880 * 1.12837916709551257390 * 0.5), kappa = 0.044715f;
    const float cube = __fmul_rn(__fmul_rn(v, v), v);
    const float inner = __fmul_rn(beta, __fadd_rn(v, __fmul_rn(kappa, cube)));
    return __fmul_rn(__fmul_rn(0.5f, v), __fadd_rn(1.0f, tanhf(inner)));
}

/* Element i of a [rows, cols] view with row strides ldx (x) and ldy (y): the
 * unaligned fallback of k_gelu_rows8 (one 64-bit division per element). */
template <typename T>
struct GeluTanhRows {
    const T *x;
    T *y;
    int64_t cols, ldx, ldy;
    int rnd;
    __device__ void operator()(int64_t i) const {
        const int64_t r = i / cols, c = i - r * cols;
        stv(y + r * ldy, c, rnd_to(gelu_tanh_f(ldv(x + r * ldx, c)), rnd));
    }
};

/* GELU over a [rows, 8*cpr] view, 8 elements (16 bytes of bf16) per thread
 * and step: the same f32 expression as the scalar functor, so the same bits;
 * the eight tanhf are independent, so they overlap the memory accesses. */
template <typename T>
__global__ void __launch_bounds__(kThreads)
    k_gelu_rows8(const T *x, int64_t ldx, T *y, int64_t ldy, uint32_t cpr, uint32_t n8, int rnd) {
    const uint32_t stride = gridDim.x * blockDim.x;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += stride) {
        const uint32_t r = i / cpr, c = (i - r * cpr) * 8;
        Chunk8<T> ch;
        ch.load(x + (int64_t)r * ldx + c);
        float v[8];
        ch.get(v);
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = rnd_to(gelu_tanh_f(v[e]), rnd);
        ch.set(v);
        ch.store(y + (int64_t)r * ldy + c);
    }
}

struct Clamp {
    float *x;
    float lo, hi;
    __device__ void operator()(int64_t i) const {
        const float v = x[i];
        x[i] = v < lo ? lo : v > hi ? hi : v;
    }
};

struct Round {
    float *x;
    int rnd;
    __device__ void operator()(int64_t i) const { x[i] = rnd_to(x[i], rnd); }
};

/* h = rnd(h + rnd(gate * a)) with batch items along grid z, their rows along
 * y and columns along x: no integer division at all (a 64-bit division per
 * element made this kernel compute-bound). */
/* The same, 8 elements per thread and step with 16-byte accesses (d a
 * multiple of 8, every row and the gate 16-byte aligned); cpr = d / 8. */
template <typename T>
__global__ void __launch_bounds__(kThreads)
    k_gated_add8(T *__restrict__ h, const float *__restrict__ gate, int64_t mod_stride, const T *__restrict__ a,
                 int64_t batch, int64_t rows, uint32_t cpr, int rnd) {
    const int64_t d = (int64_t)cpr * 8;
    for (int64_t b = blockIdx.z; b < batch; b += gridDim.z) {
        const float *g = gate + b * mod_stride;
        for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
            T *hr = h + (b * rows + r) * d;
            const T *ar = a + (b * rows + r) * d;
            for (uint32_t c = blockIdx.x * blockDim.x + threadIdx.x; c < cpr; c += gridDim.x * blockDim.x) {
                Chunk8<T> hc, ac;
                hc.load(hr + 8 * (int64_t)c);
                ac.load(ar + 8 * (int64_t)c);
                float hv[8], av[8], gv[8];
                hc.get(hv);
                ac.get(av);
                ld8f(g + 8 * (int64_t)c, gv);
                gated_add8(hv, gv, av, rnd);
                hc.set(hv);
                hc.store(hr + 8 * (int64_t)c);
            }
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    k_gated_add(T *__restrict__ h, const float *__restrict__ gate, int64_t mod_stride, const T *__restrict__ a,
                int64_t batch, int64_t rows, int64_t d, int rnd) {
    for (int64_t b = blockIdx.z; b < batch; b += gridDim.z) {
        const float *g = gate + b * mod_stride;
        for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
            T *hr = h + (b * rows + r) * d;
            const T *ar = a + (b * rows + r) * d;
            for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < d;
                 c += (int64_t)gridDim.x * blockDim.x)
                stv(hr, c, rnd_to(__fadd_rn(ldv(hr, c), rnd_to(__fmul_rn(g[c], ldv(ar, c)), rnd)), rnd));
        }
    }
}


template <typename To>
struct Convert {
    const void *x;
    int xt;
    To *y;
    __device__ void operator()(int64_t i) const {
        const float v = load_any(x, xt, i);
        if constexpr (sizeof(To) == 4) y[i] = v;
        else if constexpr (std::is_same<To, __half>::value) y[i] = __float2half_rn(v);
        else y[i] = __float2bfloat16_rn(v);
    }
};

struct FillRows {
    float *y;
    const float *row;
    int64_t n;
    __device__ void operator()(int64_t i) const { y[i] = row ? row[i % n] : 0.0f; }
};

template <typename To>
struct Random {
    To *y;
    uint64_t seed;
    float scale, shift;
    __device__ void operator()(int64_t i) const {
        const float v = __fadd_rn(__fmul_rn(fq_nn_hash_uniform(seed, (uint64_t)i), scale), shift);
        if constexpr (sizeof(To) == 4) y[i] = v;
        else if constexpr (std::is_same<To, __half>::value) y[i] = __float2half_rn(v);
        else y[i] = __float2bfloat16_rn(v);
    }
};

/* 8 elements per thread, 16-byte loads and stores: f32 -> 16-bit and back. */
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t u);
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u));
}
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t u) {
    return __half22float2(*reinterpret_cast<const __half2 *>(&u));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) k_narrow8(const float4 *__restrict__ x, uint4 *__restrict__ y, int64_t n8) {
    for (int64_t i = gtid(); i < n8; i += gstride()) {
        const float4 a = x[2 * i], b = x[2 * i + 1];
        y[i] = make_uint4(pack2<T>(a.x, a.y), pack2<T>(a.z, a.w), pack2<T>(b.x, b.y), pack2<T>(b.z, b.w));
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) k_widen8(const uint4 *__restrict__ x, float4 *__restrict__ y, int64_t n8) {
    for (int64_t i = gtid(); i < n8; i += gstride()) {
        const uint4 v = x[i];
        const float2 a = unpack2<T>(v.x), b = unpack2<T>(v.y), c = unpack2<T>(v.z), d = unpack2<T>(v.w);
        y[2 * i] = make_float4(a.x, a.y, b.x, b.y);
        y[2 * i + 1] = make_float4(c.x, c.y, d.x, d.y);
    }
}

bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* The vector kernels for the aligned bulk of an f32 <-> 16-bit conversion;
 * returns the number of elements done (a multiple of 8, possibly 0). */
int64_t convert_bulk(const void *x, fq_dtype xt, void *y, fq_dtype yt, int64_t n, cudaStream_t st, int *err) {
    const int64_t n8 = n / 8;
    *err = 0;
    if (n8 == 0 || !aligned16(x) || !aligned16(y)) return 0;
    const bool narrow = xt == FQ_F32 && (yt == FQ_BF16 || yt == FQ_F16);
    const bool widen = yt == FQ_F32 && (xt == FQ_BF16 || xt == FQ_F16);
    if (!narrow && !widen) return 0;
    const unsigned grid = grid_for(n8, 2);
    if (narrow && yt == FQ_BF16)
        k_narrow8<__nv_bfloat16><<<grid, kThreads, 0, st>>>((const float4 *)x, (uint4 *)y, n8);
    else if (narrow)
        k_narrow8<__half><<<grid, kThreads, 0, st>>>((const float4 *)x, (uint4 *)y, n8);
    else if (xt == FQ_BF16)
        k_widen8<__nv_bfloat16><<<grid, kThreads, 0, st>>>((const uint4 *)x, (float4 *)y, n8);
    else
        k_widen8<__half><<<grid, kThreads, 0, st>>>((const uint4 *)x, (float4 *)y, n8);
    *err = launch_status();
    return 8 * n8;
}

/* cat/split of rows: whole row r = [a row r (ia bytes) | b row r (ib bytes)],
 * 16-byte chunks, rows along grid y. */
__global__ void __launch_bounds__(kThreads)
    k_cat_rows(uint4 *whole, uint4 *a, uint4 *b, int64_t ca, int64_t cb, int64_t rows, int split) {
    const int64_t cw = ca + cb;
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
        uint4 *w = whole + r * cw, *pa = a + r * ca, *pb = b + r * cb;
        for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < cw; c += (int64_t)gridDim.x * blockDim.x) {
            uint4 *o = c < ca ? pa + c : pb + (c - ca);
            if (split) *o = w[c];
            else w[c] = *o;
        }
    }
}

/* dst rows (pitch dp chunks) <- src rows (pitch sp), w 16-byte chunks each, rows along grid y. */
__global__ void __launch_bounds__(kThreads)
    k_copy_rows(uint4 *__restrict__ dst, int64_t dp, const uint4 *__restrict__ src, int64_t sp, int64_t w, int64_t rows) {
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y)
        for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < w; c += (int64_t)gridDim.x * blockDim.x)
            dst[r * dp + c] = src[r * sp + c];
}

} // namespace

extern "C" int fq_cuda_nn_cat_rows(void *whole, void *a, void *b, size_t ia, size_t ib, int64_t rows, int split,
                                   cudaStream_t st) {
    if (((uintptr_t)whole | (uintptr_t)a | (uintptr_t)b | ia | ib) & 15u) return -1; /* not 16-byte aligned */
    if (rows <= 0 || ia + ib == 0) return 0;
    const int64_t ca = (int64_t)(ia / 16), cb = (int64_t)(ib / 16), gx = (ca + cb + kThreads - 1) / kThreads;
    const dim3 grid((unsigned)(gx < 1024 ? gx : 1024), (unsigned)(rows < 65535 ? rows : 65535));
    k_cat_rows<<<grid, kThreads, 0, st>>>(static_cast<uint4 *>(whole), static_cast<uint4 *>(a), static_cast<uint4 *>(b),
                                          ca, cb, rows, split);
    return launch_status();
}

extern "C" int fq_cuda_nn_cast(const void *x, fq_dtype xt, void *y, fq_dtype yt, int64_t n, fq_dtype rnd,
                               cudaStream_t st) {
    if (yt == FQ_BF16)
        return run_map(n, Cast<__nv_bfloat16>{x, (int)xt, static_cast<__nv_bfloat16 *>(y), (int)rnd}, st);
    return run_map(n, Cast<float>{x, (int)xt, static_cast<float *>(y), (int)rnd}, st);
}

extern "C" int fq_cuda_nn_scale(const float *x, float alpha, float *y, int64_t n, fq_dtype rnd, cudaStream_t st) {
    return run_map(n, Scale{x, alpha, y, (int)rnd}, st);
}

extern "C" int fq_cuda_nn_add(const float *a, const float *b, float *y, int64_t n, fq_dtype rnd, cudaStream_t st) {
    return run_map(n, Add{a, b, y, (int)rnd}, st);
}

extern "C" int fq_cuda_nn_silu(const void *x, void *y, fq_dtype xt, int64_t n, fq_dtype rnd, cudaStream_t st) {
    typedef __nv_bfloat16 bf;
    if (xt == FQ_BF16) return run_map(n, Silu<bf>{static_cast<const bf *>(x), static_cast<bf *>(y), (int)rnd}, st);
    return run_map(n, Silu<float>{static_cast<const float *>(x), static_cast<float *>(y), (int)rnd}, st);
}

extern "C" int fq_cuda_nn_gelu_tanh_rows(const void *x, int64_t ldx, void *y, int64_t ldy, fq_dtype xt, int64_t rows,
                                         int64_t cols, fq_dtype rnd, cudaStream_t st) {
    typedef __nv_bfloat16 bf;
    if (rows <= 0 || cols <= 0) return 0;
    const int64_t n8 = rows * (cols / 8);
    if (cols % 8 == 0 && ldx % 8 == 0 && ldy % 8 == 0 && al16(x) && al16(y) && n8 < ((int64_t)1 << 31)) {
        const unsigned grid = grid_for(n8);
        if (xt == FQ_BF16)
            k_gelu_rows8<bf><<<grid, kThreads, 0, st>>>(static_cast<const bf *>(x), ldx, static_cast<bf *>(y), ldy,
                                                        (uint32_t)(cols / 8), (uint32_t)n8, (int)rnd);
        else
            k_gelu_rows8<float><<<grid, kThreads, 0, st>>>(static_cast<const float *>(x), ldx, static_cast<float *>(y),
                                                           ldy, (uint32_t)(cols / 8), (uint32_t)n8, (int)rnd);
        return launch_status();
    }
    if (xt == FQ_BF16)
        return run_map(rows * cols,
                       GeluTanhRows<bf>{static_cast<const bf *>(x), static_cast<bf *>(y), cols, ldx, ldy, (int)rnd}, st);
    return run_map(rows * cols,
                   GeluTanhRows<float>{static_cast<const float *>(x), static_cast<float *>(y), cols, ldx, ldy, (int)rnd},
                   st);
}

extern "C" int fq_cuda_nn_gelu_tanh(const void *x, void *y, fq_dtype xt, int64_t n, fq_dtype rnd, cudaStream_t st) {
    return fq_cuda_nn_gelu_tanh_rows(x, n, y, n, xt, 1, n, rnd, st);
}

extern "C" int fq_cuda_nn_copy_rows(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
                                    int64_t rows, cudaStream_t st) {
    if (rows <= 0 || width == 0) return 0;
    if (((uintptr_t)dst | (uintptr_t)src | dpitch | spitch | width) & 15u) return -1; /* not 16-byte aligned */
    const int64_t w16 = (int64_t)(width / 16), gx = (w16 + kThreads - 1) / kThreads;
    const dim3 grid((unsigned)(gx < 1024 ? gx : 1024), (unsigned)(rows < 65535 ? rows : 65535));
    k_copy_rows<<<grid, kThreads, 0, st>>>(static_cast<uint4 *>(dst), (int64_t)(dpitch / 16),
                                           static_cast<const uint4 *>(src), (int64_t)(spitch / 16), w16, rows);
    return launch_status();
}

extern "C" int fq_cuda_nn_clamp(float *x, int64_t n, float lo, float hi, cudaStream_t st) {
    return run_map(n, Clamp{x, lo, hi}, st);
}

extern "C" int fq_cuda_nn_round(float *x, int64_t n, fq_dtype rnd, cudaStream_t st) {
    if (rnd == FQ_F32) return 0;
    return run_map(n, Round{x, (int)rnd}, st);
}

extern "C" int fq_cuda_nn_gated_add(void *h, const float *gate, int64_t mod_stride, const void *a, fq_dtype xt,
                                    int64_t batch, int64_t rows, int64_t d, fq_dtype rnd, cudaStream_t st) {
    typedef __nv_bfloat16 bf;
    if (d <= 0 || rows <= 0 || batch <= 0) return 0;
    if (d % 8 == 0 && d / 8 < ((int64_t)1 << 31) && mod_stride % 4 == 0 && al16(h) && al16(a) && al16(gate) &&
        (d * (int64_t)fq_dtype_size(xt)) % 16 == 0) {
        const int64_t cpr = d / 8, gx = (cpr + kThreads - 1) / kThreads;
        const dim3 grid((unsigned)(gx < 1024 ? gx : 1024), (unsigned)(rows < 65535 ? rows : 65535),
                        (unsigned)(batch < 65535 ? batch : 65535));
        if (xt == FQ_BF16)
            k_gated_add8<bf><<<grid, kThreads, 0, st>>>(static_cast<bf *>(h), gate, mod_stride,
                                                        static_cast<const bf *>(a), batch, rows, (uint32_t)cpr, (int)rnd);
        else
            k_gated_add8<float><<<grid, kThreads, 0, st>>>(static_cast<float *>(h), gate, mod_stride,
                                                           static_cast<const float *>(a), batch, rows, (uint32_t)cpr,
                                                           (int)rnd);
        return launch_status();
    }
    const int64_t gx = (d + kThreads - 1) / kThreads;
    const dim3 grid((unsigned)(gx < 1024 ? gx : 1024), (unsigned)(rows < 65535 ? rows : 65535),
                    (unsigned)(batch < 65535 ? batch : 65535));
    if (xt == FQ_BF16)
        k_gated_add<bf><<<grid, kThreads, 0, st>>>(static_cast<bf *>(h), gate, mod_stride, static_cast<const bf *>(a),
                                                   batch, rows, d, (int)rnd);
    else
        k_gated_add<float><<<grid, kThreads, 0, st>>>(static_cast<float *>(h), gate, mod_stride,
                                                      static_cast<const float *>(a), batch, rows, d, (int)rnd);
    return launch_status();
}

extern "C" int fq_cuda_nn_convert(const void *x, fq_dtype xt, void *y, fq_dtype yt, int64_t n, cudaStream_t st) {
    int e = 0;
    const int64_t done = convert_bulk(x, xt, y, yt, n, st, &e);
    if (e || done == n) return e;
    x = static_cast<const char *>(x) + done * (int64_t)fq_dtype_size(xt);
    y = static_cast<char *>(y) + done * (int64_t)fq_dtype_size(yt);
    n -= done;
    switch (yt) {
    case FQ_F32: return run_map(n, Convert<float>{x, (int)xt, static_cast<float *>(y)}, st);
    case FQ_F16: return run_map(n, Convert<__half>{x, (int)xt, static_cast<__half *>(y)}, st);
    case FQ_BF16: return run_map(n, Convert<__nv_bfloat16>{x, (int)xt, static_cast<__nv_bfloat16 *>(y)}, st);
    default: return (int)cudaErrorInvalidValue;
    }
}

extern "C" int fq_cuda_nn_fill_rows(float *y, const float *row, int64_t rows, int64_t n, cudaStream_t st) {
    if (n <= 0) return 0;
    return run_map(rows * n, FillRows{y, row, n}, st);
}

extern "C" int fq_cuda_nn_random(void *y, fq_dtype t, int64_t n, uint64_t seed, float scale, float shift,
                                 cudaStream_t st) {
    switch (t) {
    case FQ_F32: return run_map(n, Random<float>{static_cast<float *>(y), seed, scale, shift}, st);
    case FQ_F16: return run_map(n, Random<__half>{static_cast<__half *>(y), seed, scale, shift}, st);
    case FQ_BF16: return run_map(n, Random<__nv_bfloat16>{static_cast<__nv_bfloat16 *>(y), seed, scale, shift}, st);
    default: return (int)cudaErrorInvalidValue;
    }
}

/* Elementwise transformer kernels (see nn_cuda.h): each mirrors the CPU loop of
 * nn_cpu.c operation by operation, with explicit round-to-nearest products and
 * sums (__fmul_rn / __fadd_rn) where the CPU code rounds, so that no fused
 * multiply-add makes a result differ from the CPU's. */
#include "kernels/cuda/nn_common.cuh"

#include <math.h>
#include <type_traits>

using namespace fqnn;

namespace {

/* One grid-stride loop per functor: f(i) for i in [0, n). */
template <class F>
__global__ void __launch_bounds__(kThreads) k_map(int64_t n, F f) {
    for (int64_t i = gtid(); i < n; i += gstride()) f(i);
}

template <class F>
int run_map(int64_t n, const F &f, cudaStream_t st) {
    if (n <= 0) return 0;
    k_map<F><<<grid_for(n, 4), kThreads, 0, st>>>(n, f);
    return launch_status();
}

struct Cast {
    const void *x;
    int xt;
    float *y;
    int rnd;
    __device__ void operator()(int64_t i) const { y[i] = rnd_to(load_any(x, xt, i), rnd); }
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

struct Silu {
    const float *x;
    float *y;
    int rnd;
    __device__ void operator()(int64_t i) const {
        const float v = x[i];
        y[i] = rnd_to(__fdiv_rn(v, __fadd_rn(1.0f, expf(-v))), rnd);
    }
};

struct GeluTanh {
    const float *x;
    float *y;
    int rnd;
    __device__ void operator()(int64_t i) const {
        /* 0.5 * v * (1 + tanh(beta * (v + kappa * v^3))), each step an f32 op */
        const float beta = (float)(1.41421356237309504880 * 1.12837916709551257390 * 0.5), kappa = 0.044715f;
        const float v = x[i];
        const float cube = __fmul_rn(__fmul_rn(v, v), v);
        const float inner = __fmul_rn(beta, __fadd_rn(v, __fmul_rn(kappa, cube)));
        y[i] = rnd_to(__fmul_rn(__fmul_rn(0.5f, v), __fadd_rn(1.0f, tanhf(inner))), rnd);
    }
};

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

struct GatedAdd {
    float *h;
    const float *gate, *a;
    int64_t mod_stride, rows, d;
    int rnd;
    __device__ void operator()(int64_t i) const {
        const int64_t row = i / d, col = i - row * d, b = row / rows;
        const float g = gate[b * mod_stride + col];
        h[i] = rnd_to(__fadd_rn(h[i], rnd_to(__fmul_rn(g, a[i]), rnd)), rnd);
    }
};

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

} // namespace

extern "C" int fq_cuda_nn_cast(const void *x, fq_dtype xt, float *y, int64_t n, fq_dtype rnd, cudaStream_t st) {
    return run_map(n, Cast{x, (int)xt, y, (int)rnd}, st);
}

extern "C" int fq_cuda_nn_scale(const float *x, float alpha, float *y, int64_t n, fq_dtype rnd, cudaStream_t st) {
    return run_map(n, Scale{x, alpha, y, (int)rnd}, st);
}

extern "C" int fq_cuda_nn_add(const float *a, const float *b, float *y, int64_t n, fq_dtype rnd, cudaStream_t st) {
    return run_map(n, Add{a, b, y, (int)rnd}, st);
}

extern "C" int fq_cuda_nn_silu(const float *x, float *y, int64_t n, fq_dtype rnd, cudaStream_t st) {
    return run_map(n, Silu{x, y, (int)rnd}, st);
}

extern "C" int fq_cuda_nn_gelu_tanh(const float *x, float *y, int64_t n, fq_dtype rnd, cudaStream_t st) {
    return run_map(n, GeluTanh{x, y, (int)rnd}, st);
}

extern "C" int fq_cuda_nn_clamp(float *x, int64_t n, float lo, float hi, cudaStream_t st) {
    return run_map(n, Clamp{x, lo, hi}, st);
}

extern "C" int fq_cuda_nn_round(float *x, int64_t n, fq_dtype rnd, cudaStream_t st) {
    if (rnd == FQ_F32) return 0;
    return run_map(n, Round{x, (int)rnd}, st);
}

extern "C" int fq_cuda_nn_gated_add(float *h, const float *gate, int64_t mod_stride, const float *a, int64_t batch,
                                    int64_t rows, int64_t d, fq_dtype rnd, cudaStream_t st) {
    if (d <= 0 || rows <= 0) return 0;
    return run_map(batch * rows * d, GatedAdd{h, gate, a, mod_stride, rows, d, (int)rnd}, st);
}

extern "C" int fq_cuda_nn_convert(const void *x, fq_dtype xt, void *y, fq_dtype yt, int64_t n, cudaStream_t st) {
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

/* Positions and time (see nn_cuda.h): the RoPE tables (f64 frequencies and
 * angles, cos/sin cast to f32, each value repeated for its pair), the rotation
 * of adjacent pairs, and the sinusoidal timestep projection evaluated step by
 * step in f32 in PyTorch's order (the guidance argument is ~3500 rad: any
 * extra rounding moves its phase). Same expressions as nn_cpu.c. */
#include "kernels/cuda/nn_common.cuh"

#include <math.h>

using namespace fqnn;

namespace {

struct Axes {
    int64_t w[3];
};

/* One thread per (token, pair): pair p of the row belongs to the axis whose
 * range of pairs holds it. */
__global__ void __launch_bounds__(kThreads)
    k_rope_table(const float *__restrict__ ids, int64_t seq, Axes axes, double theta, float *__restrict__ cos_t,
                 float *__restrict__ sin_t, int64_t dh) {
    const int64_t half = dh / 2, n = seq * half;
    for (int64_t i = gtid(); i < n; i += gstride()) {
        const int64_t s = i / half, p = i - s * half;
        int a = 0;
        int64_t j = p;
        while (a < 2 && j >= axes.w[a] / 2) {
            j -= axes.w[a] / 2;
            a++;
        }
        const double pos = (double)ids[s * 3 + a];
        const double freq = 1.0 / pow(theta, (double)(2 * j) / (double)axes.w[a]);
        const double ang = pos * freq;
        const float c = (float)cos(ang), sn = (float)sin(ang);
        const int64_t o = s * dh + 2 * p;
        cos_t[o] = c;
        cos_t[o + 1] = c;
        sin_t[o] = sn;
        sin_t[o + 1] = sn;
    }
}

/* One thread per pair (x[2i], x[2i+1]) of one head of one token: batch items
 * along grid z, tokens along y, the heads*dh/2 pairs of a token along x (a
 * token's row is far below 2^32 elements, so its pair index divides in 32
 * bits; no 64-bit division per element). */
template <typename T>
__global__ void __launch_bounds__(kThreads)
    k_rope(T *x, const float *__restrict__ cos_t, const float *__restrict__ sin_t, int64_t batch, int64_t seq,
           int64_t heads, int64_t dh, int rnd) {
    const uint32_t half = (uint32_t)(dh / 2), per = (uint32_t)(heads * (dh / 2));
    for (int64_t b = blockIdx.z; b < batch; b += gridDim.z)
    for (int64_t s = blockIdx.y; s < seq; s += gridDim.y) {
      const int64_t t = b * seq + s;
      for (uint32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < per; j += gridDim.x * blockDim.x) {
        const uint32_t hd = j / half, pr = j - hd * half;
        T *v = x + (t * heads + hd) * dh + 2 * pr;
        const float *c = cos_t + s * dh + 2 * pr, *sn = sin_t + s * dh + 2 * pr;
        const float re = ldv(v, 0), im = ldv(v, 1);
        const float p0 = __fmul_rn(re, c[0]), q0 = __fmul_rn(-im, sn[0]);
        const float p1 = __fmul_rn(im, c[1]), q1 = __fmul_rn(re, sn[1]);
        stv(v, 0, rnd_to(__fadd_rn(p0, q0), rnd));
        stv(v, 1, rnd_to(__fadd_rn(p1, q1), rnd));
      }
    }
}

__global__ void __launch_bounds__(kThreads)
    k_timestep_proj(const float *__restrict__ t, int64_t batch, int64_t half, float neg_log, float *__restrict__ out) {
    const int64_t n = batch * half;
    for (int64_t i = gtid(); i < n; i += gstride()) {
        const int64_t b = i / half, j = i - b * half;
        const float e = __fdiv_rn(__fmul_rn(neg_log, (float)j), (float)half);
        const float arg = __fmul_rn(t[b], expf(e));
        out[b * 2 * half + j] = cosf(arg);
        out[b * 2 * half + half + j] = sinf(arg);
    }
}

} // namespace

extern "C" int fq_cuda_nn_rope_table(const float *ids, int64_t seq, const int64_t axes[3], double theta,
                                     float *cos_t, float *sin_t, int64_t dh, cudaStream_t st) {
    const int64_t n = seq * (dh / 2);
    if (n <= 0) return 0;
    Axes a = {{axes[0], axes[1], axes[2]}};
    k_rope_table<<<grid_for(n), kThreads, 0, st>>>(ids, seq, a, theta, cos_t, sin_t, dh);
    return launch_status();
}

extern "C" int fq_cuda_nn_rope(void *x, fq_dtype xt, const float *cos_t, const float *sin_t, int64_t batch, int64_t seq,
                               int64_t heads, int64_t dh, fq_dtype rnd, cudaStream_t st) {
    const int64_t per = heads * (dh / 2);
    if (batch <= 0 || seq <= 0 || per <= 0) return 0;
    if (per >= ((int64_t)1 << 32)) return (int)cudaErrorInvalidValue; /* one token's row: below 2^32 pairs */
    const int64_t gx = (per + kThreads - 1) / kThreads;
    const dim3 grid((unsigned)(gx < 1024 ? gx : 1024), (unsigned)(seq < 65535 ? seq : 65535),
                    (unsigned)(batch < 65535 ? batch : 65535));
    if (xt == FQ_BF16)
        k_rope<__nv_bfloat16><<<grid, kThreads, 0, st>>>(static_cast<__nv_bfloat16 *>(x), cos_t, sin_t, batch, seq,
                                                         heads, dh, (int)rnd);
    else
        k_rope<float><<<grid, kThreads, 0, st>>>(static_cast<float *>(x), cos_t, sin_t, batch, seq, heads, dh,
                                                 (int)rnd);
    return launch_status();
}

extern "C" int fq_cuda_nn_timestep_proj(const float *t, int64_t batch, int64_t half, float neg_log, float *out,
                                        cudaStream_t st) {
    const int64_t n = batch * half;
    if (n <= 0) return 0;
    k_timestep_proj<<<grid_for(n), kThreads, 0, st>>>(t, batch, half, neg_log, out);
    return launch_status();
}

/* Norm kernels (see nn_cuda.h): AdaLN (affine-free LayerNorm fused with the
 * modulation x*(1+scale)+shift) and per-head RMSNorm. Statistics are
 * accumulated in f64 like the CPU kernels (only the summation order differs),
 * and the normalized value goes through the same f64 expression before its
 * f32 cast, so results match the CPU's to the last bit almost everywhere. */
#include "kernels/cuda/nn_common.cuh"

#include <math.h>

using namespace fqnn;

namespace {

/* One block per row (grid-stride over rows); rows of the batch item b share
 * shift/scale at b*mod_stride. In place allowed: every thread reads and writes
 * only its own elements after the two reductions. */
template <typename T>
__global__ void __launch_bounds__(kThreads)
    k_adaln(const T *x, T *y, int64_t nrows, int64_t rows, int64_t d,
            const float *__restrict__ shift, const float *__restrict__ scale, int64_t mod_stride, float eps,
            int rnd) {
    __shared__ double sh[33];
    for (int64_t r = blockIdx.x; r < nrows; r += gridDim.x) {
        const T *xr = x + r * d;
        T *yr = y + r * d;
        const int64_t b = r / rows;
        const float *sft = shift + b * mod_stride, *scl = scale + b * mod_stride;
        double s = 0.0;
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) s += (double)ldv(xr, i);
        const double mean = block_sum(s, sh) / (double)d;
        double q = 0.0;
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
            const double c = (double)ldv(xr, i) - mean;
            q += c * c;
        }
        const double rstd = 1.0 / sqrt(block_sum(q, sh) / (double)d + (double)eps);
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
            const float nrm = rnd_to((float)(((double)ldv(xr, i) - mean) * rstd), rnd);
            const float t = rnd_to(__fmul_rn(nrm, rnd_to(__fadd_rn(1.0f, scl[i]), rnd)), rnd);
            stv(yr, i, rnd_to(__fadd_rn(t, sft[i]), rnd));
        }
    }
}

/* The same for d <= PER * blockDim.x with the row held in registers: x is
 * read once. Thread t sums elements t, t + blockDim.x, ... in that order, as
 * k_adaln does, so the results are the same bits. */
template <typename T, int PER>
__global__ void __launch_bounds__(kThreads, PER <= 12 ? 3 : 2)
    k_adaln_reg(const T *x, T *y, int64_t batch, int64_t rows, int64_t d, const float *__restrict__ shift,
                const float *__restrict__ scale, int64_t mod_stride, float eps, int rnd) {
    __shared__ double sh[33];
    for (int64_t b = blockIdx.y; b < batch; b += gridDim.y)
    for (int64_t rr = blockIdx.x; rr < rows; rr += gridDim.x) {
        const int64_t r = b * rows + rr; /* batch items along grid y: no division */
        const T *xr = x + r * d;
        T *yr = y + r * d;
        const float *sft = shift + b * mod_stride, *scl = scale + b * mod_stride;
        float v[PER];
        double s = 0.0;
#pragma unroll
        for (int j = 0; j < PER; j++) {
            const int64_t i = threadIdx.x + (int64_t)j * blockDim.x;
            v[j] = i < d ? ldv(xr, i) : 0.0f;
            if (i < d) s += (double)v[j];
        }
        const double mean = block_sum(s, sh) / (double)d;
        double q = 0.0;
#pragma unroll
        for (int j = 0; j < PER; j++) {
            const int64_t i = threadIdx.x + (int64_t)j * blockDim.x;
            const double c = (double)v[j] - mean;
            if (i < d) q += c * c;
        }
        const double rstd = 1.0 / sqrt(block_sum(q, sh) / (double)d + (double)eps);
#pragma unroll
        for (int j = 0; j < PER; j++) {
            const int64_t i = threadIdx.x + (int64_t)j * blockDim.x;
            if (i >= d) continue;
            const float nrm = rnd_to((float)(((double)v[j] - mean) * rstd), rnd);
            const float t = rnd_to(__fmul_rn(nrm, rnd_to(__fadd_rn(1.0f, scl[i]), rnd)), rnd);
            stv(yr, i, rnd_to(__fadd_rn(t, sft[i]), rnd));
        }
    }
}

/* One warp per group of d (a head); 8 groups per block. */
template <typename T>
__global__ void __launch_bounds__(kThreads)
    k_rmsnorm(const T *x, const void *__restrict__ w, int wt, T *y, int64_t groups,
              int64_t d, float eps, int rnd) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t wpb = blockDim.x >> 5;
    for (int64_t g = (int64_t)blockIdx.x * wpb + warp; g < groups; g += (int64_t)gridDim.x * wpb) {
        const T *xr = x + g * d;
        T *yr = y + g * d;
        double q = 0.0;
        for (int64_t i = lane; i < d; i += 32) q += (double)ldv(xr, i) * (double)ldv(xr, i);
        q = warp_sum(q);
        const double r = 1.0 / sqrt(q / (double)d + (double)eps);
        for (int64_t i = lane; i < d; i += 32)
            stv(yr, i, rnd_to((float)((double)ldv(xr, i) * r * (double)load_any(w, wt, i)), rnd));
    }
}

/* k_rmsnorm then RoPE in one pass, in place: x [groups = ntok*heads, d] whose
 * token t (of each batch item's n) takes row t0 + t of cos/sin [*, d]. Lane l
 * holds elements l + 32j as in k_rmsnorm (same sums, same bits); the pair
 * (2p, 2p+1) of RoPE sits in lanes (l, l+1) of one j, so the partner comes
 * by a shuffle. d a multiple of 32. */
template <typename T>
__global__ void __launch_bounds__(kThreads)
    k_rmsnorm_rope(T *x, const void *__restrict__ w, int wt, const float *__restrict__ cos_t,
                   const float *__restrict__ sin_t, int64_t groups, int64_t heads, int64_t n, int64_t t0, int64_t d,
                   float eps, int rnd) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t wpb = blockDim.x >> 5;
    for (int64_t g = (int64_t)blockIdx.x * wpb + warp; g < groups; g += (int64_t)gridDim.x * wpb) {
        T *xr = x + g * d;
        const int64_t row = t0 + (g / heads) % n;
        const float *cr = cos_t + row * d, *sr = sin_t + row * d;
        double q = 0.0;
        for (int64_t i = lane; i < d; i += 32) q += (double)ldv(xr, i) * (double)ldv(xr, i);
        q = warp_sum(q);
        const double r = 1.0 / sqrt(q / (double)d + (double)eps);
        for (int64_t i = lane; i < d; i += 32) {
            const float v = rnd_to((float)((double)ldv(xr, i) * r * (double)load_any(w, wt, i)), rnd);
            const float o = __shfl_xor_sync(0xffffffffu, v, 1);
            float res;
            if (!(lane & 1)) res = __fadd_rn(__fmul_rn(v, cr[i]), __fmul_rn(-o, sr[i]));  /* re*c - im*s */
            else res = __fadd_rn(__fmul_rn(v, cr[i]), __fmul_rn(o, sr[i]));              /* im*c + re*s */
            stv(xr, i, rnd_to(res, rnd));
        }
    }
}

} // namespace

extern "C" int fq_cuda_nn_rmsnorm_rope(void *x, fq_dtype xt, const void *w, fq_dtype wt, const float *cos_t,
                                       const float *sin_t, int64_t batch, int64_t n, int64_t heads, int64_t t0,
                                       int64_t d, float eps, fq_dtype rnd, cudaStream_t st) {
    const int64_t groups = batch * n * heads;
    if (groups <= 0 || d <= 0) return 0;
    if (d % 32) return (int)cudaErrorInvalidValue;
    const int64_t wpb = kThreads / 32;
    int64_t blocks = (groups + wpb - 1) / wpb;
    if (blocks > (1 << 20)) blocks = 1 << 20;
    if (xt == FQ_BF16)
        k_rmsnorm_rope<__nv_bfloat16><<<(unsigned)blocks, kThreads, 0, st>>>(
            static_cast<__nv_bfloat16 *>(x), w, (int)wt, cos_t, sin_t, groups, heads, n, t0, d, eps, (int)rnd);
    else
        k_rmsnorm_rope<float><<<(unsigned)blocks, kThreads, 0, st>>>(static_cast<float *>(x), w, (int)wt, cos_t, sin_t,
                                                                     groups, heads, n, t0, d, eps, (int)rnd);
    return launch_status();
}

extern "C" int fq_cuda_nn_adaln(const void *x, void *y, fq_dtype xt, int64_t batch, int64_t rows, int64_t d,
                                const float *shift, const float *scale, int64_t mod_stride, float eps,
                                fq_dtype rnd, cudaStream_t st) {
    const int64_t nrows = batch * rows;
    if (nrows <= 0 || d <= 0) return 0;
    int threads = d >= kThreads ? kThreads : (int)((d + 31) / 32 * 32);
    const unsigned grid = (unsigned)(nrows < (1 << 20) ? nrows : (1 << 20));
    typedef __nv_bfloat16 bf;
    if (threads == kThreads && d <= 16 * kThreads) {
        const dim3 g2((unsigned)(rows < (1 << 20) ? rows : (1 << 20)), (unsigned)(batch < 65535 ? batch : 65535));
        const bf *xb = static_cast<const bf *>(x);
        const float *xf = static_cast<const float *>(x);
        if (d <= 12 * kThreads) { /* FLUX's 3072: 12 values per thread */
            if (xt == FQ_BF16)
                k_adaln_reg<bf, 12><<<g2, threads, 0, st>>>(xb, static_cast<bf *>(y), batch, rows, d, shift, scale,
                                                            mod_stride, eps, (int)rnd);
            else
                k_adaln_reg<float, 12><<<g2, threads, 0, st>>>(xf, static_cast<float *>(y), batch, rows, d, shift,
                                                               scale, mod_stride, eps, (int)rnd);
        } else if (xt == FQ_BF16) {
            k_adaln_reg<bf, 16><<<g2, threads, 0, st>>>(xb, static_cast<bf *>(y), batch, rows, d, shift, scale,
                                                        mod_stride, eps, (int)rnd);
        } else {
            k_adaln_reg<float, 16><<<g2, threads, 0, st>>>(xf, static_cast<float *>(y), batch, rows, d, shift, scale,
                                                           mod_stride, eps, (int)rnd);
        }
        return launch_status();
    }
    if (xt == FQ_BF16)
        k_adaln<__nv_bfloat16><<<grid, threads, 0, st>>>(static_cast<const __nv_bfloat16 *>(x),
                                                         static_cast<__nv_bfloat16 *>(y), nrows, rows, d, shift, scale,
                                                         mod_stride, eps, (int)rnd);
    else
        k_adaln<float><<<grid, threads, 0, st>>>(static_cast<const float *>(x), static_cast<float *>(y), nrows, rows, d,
                                                 shift, scale, mod_stride, eps, (int)rnd);
    return launch_status();
}

extern "C" int fq_cuda_nn_rmsnorm(const void *x, const void *w, fq_dtype wt, void *y, fq_dtype xt, int64_t groups, int64_t d,
                                  float eps, fq_dtype rnd, cudaStream_t st) {
    if (groups <= 0 || d <= 0) return 0;
    const int64_t wpb = kThreads / 32;
    int64_t blocks = (groups + wpb - 1) / wpb;
    if (blocks > (1 << 20)) blocks = 1 << 20;
    if (xt == FQ_BF16)
        k_rmsnorm<__nv_bfloat16><<<(unsigned)blocks, kThreads, 0, st>>>(static_cast<const __nv_bfloat16 *>(x), w,
                                                                        (int)wt, static_cast<__nv_bfloat16 *>(y),
                                                                        groups, d, eps, (int)rnd);
    else
        k_rmsnorm<float><<<(unsigned)blocks, kThreads, 0, st>>>(static_cast<const float *>(x), w, (int)wt,
                                                                static_cast<float *>(y), groups, d, eps, (int)rnd);
    return launch_status();
}

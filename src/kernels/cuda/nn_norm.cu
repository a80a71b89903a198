/* Norm kernels (see nn_cuda.h): AdaLN (affine-free LayerNorm fused with the
 * modulation x*(1+scale)+shift) and per-head RMSNorm. Statistics are
 * accumulated in f64 like the CPU kernels (only the summation order differs),
 * and the normalized value goes through the same f64 expression before its
 * f32 cast, so results match the CPU's to the last bit almost everywhere. */
#include "kernels/cuda/nn_common.cuh"
#include "kernels/cuda/nn_vec.cuh"

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

/* AdaLN with one warp per row and the row in registers (x read once), 16-byte
 * accesses: lane l holds the 8-element chunks l, l + 32, ... (CH of them, d a
 * multiple of 8, d <= 256 * CH). Sums run over a lane's chunks in order, then
 * across lanes; f64 like the CPU (only the order differs, as in every GPU
 * reduction), and the same kernel serves f32 and bf16 storage, so the two
 * give the same bits. GATED first applies the gated residual add of
 * k_gated_add to the row (h = rnd(h + rnd(gate * a)), written back) and
 * normalizes the new h: one read of h instead of two. In place allowed
 * (y == x, or y == a): a warp reads its whole row before writing it. */
template <typename T, int CH, bool GATED>
__global__ void __launch_bounds__(128)
    k_adaln_warp(T *h, const T *a, const float *gate, T *y, int64_t batch, int64_t rows, int64_t d,
                 const float *__restrict__ shift, const float *__restrict__ scale, int64_t mod_stride, float eps,
                 int rnd) {
    const int lane = threadIdx.x & 31;
    const int64_t wpb = blockDim.x >> 5, nrows = batch * rows, nch = d / 8;
    for (int64_t r = (int64_t)blockIdx.x * wpb + (threadIdx.x >> 5); r < nrows; r += (int64_t)gridDim.x * wpb) {
        const int64_t b = r / rows; /* once per row */
        T *hr = h + r * d, *yr = y + r * d;
        Chunk8<T> v[CH];
        double s = 0.0;
#pragma unroll
        for (int j = 0; j < CH; j++) {
            const int64_t c = lane + 32 * j;
            if (c < nch) v[j].load(hr + 8 * c);
        }
        if (GATED) {
            const T *ar = a + r * d;
            const float *g = gate + b * mod_stride;
#pragma unroll
            for (int j = 0; j < CH; j++) {
                const int64_t c = lane + 32 * j;
                if (c >= nch) continue;
                Chunk8<T> ac;
                ac.load(ar + 8 * c);
                float hv[8], av[8], gv[8];
                v[j].get(hv);
                ac.get(av);
                ld8f(g + 8 * c, gv);
#pragma unroll
                for (int e = 0; e < 8; e++) hv[e] = rnd_to(__fadd_rn(hv[e], rnd_to(__fmul_rn(gv[e], av[e]), rnd)), rnd);
                v[j].set(hv);
                v[j].store(hr + 8 * c);
            }
        }
#pragma unroll
        for (int j = 0; j < CH; j++) {
            if (lane + 32 * j >= nch) continue;
            float f[8];
            v[j].get(f);
#pragma unroll
            for (int e = 0; e < 8; e++) s += (double)f[e];
        }
        const double mean = warp_sum(s) / (double)d;
        double q = 0.0;
#pragma unroll
        for (int j = 0; j < CH; j++) {
            if (lane + 32 * j >= nch) continue;
            float f[8];
            v[j].get(f);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                const double c = (double)f[e] - mean;
                q += c * c;
            }
        }
        const double rstd = 1.0 / sqrt(warp_sum(q) / (double)d + (double)eps);
        const float *sft = shift + b * mod_stride, *scl = scale + b * mod_stride;
#pragma unroll
        for (int j = 0; j < CH; j++) {
            const int64_t c = lane + 32 * j;
            if (c >= nch) continue;
            float f[8], sf[8], sc[8];
            v[j].get(f);
            ld8f(sft + 8 * c, sf);
            ld8f(scl + 8 * c, sc);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                const float nrm = rnd_to((float)(((double)f[e] - mean) * rstd), rnd);
                const float t = rnd_to(__fmul_rn(nrm, rnd_to(__fadd_rn(1.0f, sc[e]), rnd)), rnd);
                f[e] = rnd_to(__fadd_rn(t, sf[e]), rnd);
            }
            v[j].set(f);
            v[j].store(yr + 8 * c);
        }
    }
}

template <typename T, bool GATED>
int launch_adaln_warp(T *h, const T *a, const float *gate, T *y, int64_t batch, int64_t rows, int64_t d,
                      const float *shift, const float *scale, int64_t mod_stride, float eps, int rnd, cudaStream_t st) {
    const int64_t nrows = batch * rows, wpb = 4, ch = (d / 8 + 31) / 32;
    int64_t blocks = (nrows + wpb - 1) / wpb;
    if (blocks > (1 << 20)) blocks = 1 << 20;
    const unsigned g = (unsigned)blocks, t = (unsigned)(32 * wpb);
#define FQ_ADALN_CH(N)                                                                                           \
    if (ch <= N) {                                                                                              \
        k_adaln_warp<T, N, GATED><<<g, t, 0, st>>>(h, a, gate, y, batch, rows, d, shift, scale, mod_stride, eps, \
                                                   rnd);                                                        \
        return launch_status();                                                                                 \
    }
    FQ_ADALN_CH(1)
    FQ_ADALN_CH(2)
    FQ_ADALN_CH(4)
    FQ_ADALN_CH(8)
    FQ_ADALN_CH(12)
    FQ_ADALN_CH(16)
#undef FQ_ADALN_CH
    return (int)cudaErrorInvalidValue;
}

/* Whether k_adaln_warp runs these operands: d a multiple of 8 up to 4096,
 * every row and modulation chunk 16-byte aligned. */
bool adaln_warp_ok(const void *x, const void *y, const void *a, const float *p0, const float *p1, const float *p2,
                   int64_t d, int64_t mod_stride) {
    return d % 8 == 0 && d <= 4096 && mod_stride % 4 == 0 && al16(x) && al16(y) && (!a || al16(a)) && al16(p0) &&
           al16(p1) && (!p2 || al16(p2));
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

/* 4 consecutive activations: one 8-byte (bf16) or 16-byte (f32) access. */
__device__ __forceinline__ void ld4(const __nv_bfloat16 *p, float v[4]) {
    const uint2 u = *reinterpret_cast<const uint2 *>(p);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.y));
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
}
__device__ __forceinline__ void ld4(const float *p, float v[4]) {
    const float4 a = *reinterpret_cast<const float4 *>(p);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
}
__device__ __forceinline__ void st4(__nv_bfloat16 *p, const float v[4]) {
    __nv_bfloat162 a = __floats2bfloat162_rn(v[0], v[1]), b = __floats2bfloat162_rn(v[2], v[3]);
    uint2 u;
    u.x = *reinterpret_cast<uint32_t *>(&a);
    u.y = *reinterpret_cast<uint32_t *>(&b);
    *reinterpret_cast<uint2 *>(p) = u;
}
__device__ __forceinline__ void st4(float *p, const float v[4]) {
    *reinterpret_cast<float4 *>(p) = make_float4(v[0], v[1], v[2], v[3]);
}

/* k_rmsnorm_rope for head dim 128 with vector accesses: lane l holds elements
 * 4l..4l+3 of a head (two RoPE pairs, no shuffle), its norm weights and the
 * token's cos/sin in registers; a warp does HG heads of one token at once
 * (independent reductions that overlap). The same expressions per element;
 * only the order of the f64 sum of squares differs from k_rmsnorm (sums of
 * f32 squares, exact in f64 unless their exponents span more than ~29 bits).
 * The same kernel for f32 and bf16 storage. */
template <typename T, int HG>
__global__ void __launch_bounds__(kThreads)
    k_rmsnorm_rope128(T *x, const void *__restrict__ w, int wt, const float *__restrict__ cos_t,
                      const float *__restrict__ sin_t, int64_t ntok, int64_t heads, int64_t n, int64_t t0, float eps,
                      int rnd) {
    const int lane = threadIdx.x & 31, e0 = 4 * lane;
    const int64_t wpb = blockDim.x >> 5, groups = (heads + HG - 1) / HG, items = ntok * groups;
    double wd[4];
#pragma unroll
    for (int e = 0; e < 4; e++) wd[e] = (double)load_any(w, wt, e0 + e);
    for (int64_t it = (int64_t)blockIdx.x * wpb + (threadIdx.x >> 5); it < items; it += (int64_t)gridDim.x * wpb) {
        const int64_t tok = it / groups, h0 = (it - tok * groups) * HG;
        const int64_t row = t0 + tok % n;
        float c[4], sn[4];
        ld4(cos_t + row * 128 + e0, c);
        ld4(sin_t + row * 128 + e0, sn);
        float v[HG][4];
        double q[HG];
#pragma unroll
        for (int g = 0; g < HG; g++) {
            q[g] = 0.0;
            if (h0 + g < heads) ld4(x + (tok * heads + h0 + g) * 128 + e0, v[g]);
            else v[g][0] = v[g][1] = v[g][2] = v[g][3] = 0.0f;
#pragma unroll
            for (int e = 0; e < 4; e++) q[g] += (double)v[g][e] * (double)v[g][e];
        }
#pragma unroll
        for (int g = 0; g < HG; g++) q[g] = warp_sum(q[g]);
#pragma unroll
        for (int g = 0; g < HG; g++) {
            if (h0 + g >= heads) continue;
            const double r = 1.0 / sqrt(q[g] / 128.0 + (double)eps);
            float nv[4], o[4];
#pragma unroll
            for (int e = 0; e < 4; e++) nv[e] = rnd_to((float)((double)v[g][e] * r * wd[e]), rnd);
#pragma unroll
            for (int p = 0; p < 4; p += 2) {
                o[p] = rnd_to(__fadd_rn(__fmul_rn(nv[p], c[p]), __fmul_rn(-nv[p + 1], sn[p])), rnd);         /* re*c - im*s */
                o[p + 1] = rnd_to(__fadd_rn(__fmul_rn(nv[p + 1], c[p + 1]), __fmul_rn(nv[p], sn[p + 1])), rnd); /* im*c + re*s */
            }
            st4(x + (tok * heads + h0 + g) * 128 + e0, o);
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
    if (d == 128 && al16(x) && al16(cos_t) && al16(sin_t)) {
        const int64_t items = batch * n * ((heads + 3) / 4);
        int64_t nb = (items + wpb - 1) / wpb;
        if (nb > (1 << 20)) nb = 1 << 20;
        if (xt == FQ_BF16)
            k_rmsnorm_rope128<__nv_bfloat16, 4><<<(unsigned)nb, kThreads, 0, st>>>(
                static_cast<__nv_bfloat16 *>(x), w, (int)wt, cos_t, sin_t, batch * n, heads, n, t0, eps, (int)rnd);
        else
            k_rmsnorm_rope128<float, 4><<<(unsigned)nb, kThreads, 0, st>>>(static_cast<float *>(x), w, (int)wt, cos_t,
                                                                           sin_t, batch * n, heads, n, t0, eps, (int)rnd);
        return launch_status();
    }
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
    typedef __nv_bfloat16 bf;
    if (adaln_warp_ok(x, y, NULL, shift, scale, NULL, d, mod_stride)) {
        /* (x is only read: the non-gated kernel never writes through h) */
        if (xt == FQ_BF16)
            return launch_adaln_warp<bf, false>(const_cast<bf *>(static_cast<const bf *>(x)), NULL, NULL,
                                                static_cast<bf *>(y), batch, rows, d, shift, scale, mod_stride, eps,
                                                (int)rnd, st);
        return launch_adaln_warp<float, false>(const_cast<float *>(static_cast<const float *>(x)), NULL, NULL,
                                               static_cast<float *>(y), batch, rows, d, shift, scale, mod_stride, eps,
                                               (int)rnd, st);
    }
    const int threads = d >= kThreads ? kThreads : (int)((d + 31) / 32 * 32);
    const unsigned grid = (unsigned)(nrows < (1 << 20) ? nrows : (1 << 20));
    if (xt == FQ_BF16)
        k_adaln<bf><<<grid, threads, 0, st>>>(static_cast<const bf *>(x), static_cast<bf *>(y), nrows, rows, d, shift,
                                              scale, mod_stride, eps, (int)rnd);
    else
        k_adaln<float><<<grid, threads, 0, st>>>(static_cast<const float *>(x), static_cast<float *>(y), nrows, rows, d,
                                                 shift, scale, mod_stride, eps, (int)rnd);
    return launch_status();
}

extern "C" int fq_cuda_nn_gated_add_adaln(void *h, const void *a, const float *gate, void *y, fq_dtype xt,
                                          int64_t batch, int64_t rows, int64_t d, const float *shift,
                                          const float *scale, int64_t mod_stride, float eps, fq_dtype rnd,
                                          cudaStream_t st) {
    if (batch * rows <= 0 || d <= 0) return 0;
    typedef __nv_bfloat16 bf;
    if (adaln_warp_ok(h, y, a, shift, scale, gate, d, mod_stride)) {
        if (xt == FQ_BF16)
            return launch_adaln_warp<bf, true>(static_cast<bf *>(h), static_cast<const bf *>(a), gate,
                                               static_cast<bf *>(y), batch, rows, d, shift, scale, mod_stride, eps,
                                               (int)rnd, st);
        return launch_adaln_warp<float, true>(static_cast<float *>(h), static_cast<const float *>(a), gate,
                                              static_cast<float *>(y), batch, rows, d, shift, scale, mod_stride, eps,
                                              (int)rnd, st);
    }
    /* the two kernels, in order */
    int e = fq_cuda_nn_gated_add(h, gate, mod_stride, a, xt, batch, rows, d, rnd, st);
    return e ? e : fq_cuda_nn_adaln(h, y, xt, batch, rows, d, shift, scale, mod_stride, eps, rnd, st);
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

/* Norm kernels (see nn_cuda.h): AdaLN (affine-free LayerNorm fused with the
 * modulation x*(1+scale)+shift) and per-head RMSNorm. Statistics are
 * accumulated in f64 like the CPU kernels (only the summation order differs),
 * and the normalized value goes through the same f64 expression before its
 * f32 cast, so results match the CPU's to the last bit almost everywhere. */
#include "kernels/cuda/stream_device.cuh"
#include "kernels/cuda/nn_common.cuh"
#include "kernels/cuda/nn_vec.cuh"

#include <math.h>
#include <stdlib.h>
#include <string.h>

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

/* AdaLN with one block per row: thread c holds the 8-element chunk c of the
 * row (d / 8 threads, rounded up to a warp), its modulation (the rounded
 * 1 + scale, and shift) stays in registers across the rows the block strides
 * over, and the next P rows are loaded while the current one is reduced.
 * Why not one warp per row (k_adaln_warp): a warp then owns 96 elements per
 * lane of a d = 3072 row, too many to keep as f64, so every element went
 * through the f32 -> f64 conversion (16 per clock and SM on sm_90, a quarter
 * of the f64 rate) three times plus once back, along serial f64 chains,
 * with the whole row loaded before any work and stored after: loads,
 * conversions and stores of a wave did not overlap. Here each element is
 * converted once in and once out and the x - mean of the variance is reused
 * for the output. Same per-element expressions as k_adaln_warp; the sums run
 * over a thread's 8 elements, across the warp, then over the warps in order
 * (f64, only the order differs). In place allowed: a thread reads and writes
 * only its own chunk of a row. */
template <typename T, bool GATED, int P>
__global__ void __launch_bounds__(384, 2)
    k_adaln_row(T *h, const T *a, const float *gate, T *y, int nrows, int rows, int d,
                const float *__restrict__ shift, const float *__restrict__ scale, int64_t mod_stride, float eps,
                int rnd) {
    __shared__ double sh[2][12];
    const int c = threadIdx.x, lane = c & 31, warp = c >> 5, nw = blockDim.x >> 5;
    const bool on = c < d / 8;
    int cur_b = -1;
    float sc1[8], sf[8];
    /* hb[0]: this row's chunk; hb[1..P]: the next P rows' (of this block),
     * in flight while this one is worked on */
    Chunk8<T> hb[P + 1], ab[P + 1];
    int r = blockIdx.x;
#pragma unroll
    for (int i = 0; i < P; i++) {
        const int ri = r + i * (int)gridDim.x;
        if (on && ri < nrows) {
            hb[i].load(h + (int64_t)ri * d + 8 * c);
            if (GATED) ab[i].load(a + (int64_t)ri * d + 8 * c);
        }
    }
    for (; r < nrows; r += gridDim.x) {
        const int rn = r + P * (int)gridDim.x;
        if (on && rn < nrows) {
            hb[P].load(h + (int64_t)rn * d + 8 * c);
            if (GATED) ab[P].load(a + (int64_t)rn * d + 8 * c);
        }
        Chunk8<T> &hv = hb[0], &av = ab[0];
        const int b = r / rows;
        if (b != cur_b && on) {
            cur_b = b;
            float sc[8];
            ld8f(shift + b * mod_stride + 8 * c, sf);
            ld8f(scale + b * mod_stride + 8 * c, sc);
#pragma unroll
            for (int e = 0; e < 8; e++) sc1[e] = rnd_to(__fadd_rn(1.0f, sc[e]), rnd);
        }
        double xd[8], s = 0.0;
        if (on) {
            float f[8];
            hv.get(f);
            if (GATED) {
                float av8[8], gv[8]; /* (the gate from L1 each row: registers are short) */
                av.get(av8);
                ld8f(gate + b * mod_stride + 8 * c, gv);
                gated_add8(f, gv, av8, rnd);
                hv.set(f);
                hv.store(h + (int64_t)r * d + 8 * c);
            }
#pragma unroll
            for (int e = 0; e < 8; e++) {
                xd[e] = (double)f[e];
                s += xd[e];
            }
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++) xd[e] = 0.0;
        }
        s = warp_sum(s);
        if (lane == 0) sh[0][warp] = s;
        __syncthreads();
        double tot = 0.0;
        for (int w = 0; w < nw; w++) tot += sh[0][w];
        const double mean = tot / (double)d;
        double q = 0.0;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            xd[e] = xd[e] - mean;
            q += xd[e] * xd[e];
        }
        if (!on) q = 0.0;
        q = warp_sum(q);
        if (lane == 0) sh[1][warp] = q;
        __syncthreads(); /* also: every thread has read sh[0] before the next row writes it */
        tot = 0.0;
        for (int w = 0; w < nw; w++) tot += sh[1][w];
        const double rstd = 1.0 / sqrt(tot / (double)d + (double)eps);
        if (on) {
            float o[8];
            bool done = false;
            if (rnd == FQ_BF16) { /* hardware rounding unless a value is NaN or infinite */
                float nf = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; e++) o[e] = (float)(xd[e] * rstd);
#pragma unroll
                for (int e = 0; e < 8; e += 2) bf16_round2_hw(o[e], o[e + 1], nf);
#pragma unroll
                for (int e = 0; e < 8; e++) o[e] = __fmul_rn(o[e], sc1[e]);
#pragma unroll
                for (int e = 0; e < 8; e += 2) bf16_round2_hw(o[e], o[e + 1], nf);
#pragma unroll
                for (int e = 0; e < 8; e++) o[e] = __fadd_rn(o[e], sf[e]);
#pragma unroll
                for (int e = 0; e < 8; e += 2) bf16_round2_hw(o[e], o[e + 1], nf);
                done = nf == nf;
            }
            if (!done) {
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    const float nrm = rnd_to((float)(xd[e] * rstd), rnd);
                    const float t = rnd_to(__fmul_rn(nrm, sc1[e]), rnd);
                    o[e] = rnd_to(__fadd_rn(t, sf[e]), rnd);
                }
            }
            Chunk8<T> out;
            out.set(o);
            out.store(y + (int64_t)r * d + 8 * c);
        }
#pragma unroll
        for (int i = 0; i < P; i++) {
            hb[i] = hb[i + 1];
            if (GATED) ab[i] = ab[i + 1];
        }
    }
}

/* cvt.rn.bf16x2 of two values (round to nearest even: bf16_round's bits for
 * every value but NaN) and the two halves back as f32. */
__device__ __forceinline__ uint32_t bf2_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}
__device__ __forceinline__ float bf2_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf2_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

/* 16-byte copies global -> shared that run in the background (cp.async,
 * sm_80+), in groups a thread commits and later waits for; the "memory"
 * clobbers keep the compiler from moving shared accesses across them. */
__device__ __forceinline__ void cp16_async(void *smem, const void *gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"((uint32_t)__cvta_generic_to_shared(smem)),
                 "l"(gmem)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* AdaLN with K rows per block at a time (the successor of k_adaln_row, same
 * layout: thread c holds chunk c of each row and the modulation stays in
 * registers). Why: k_adaln_row worked on one row per block (two per SM)
 * with two rows ahead in registers, too few bytes in flight for the memory;
 * every row waited on two block reductions with the serial f64 division and
 * square roots between them; and each element paid two f32<->f64
 * conversions (16 per clock and SM on sm_90), each pair four cvt.rn.bf16x2.
 * Here:
 * - the next S groups of K rows stream into a shared-memory ring (cp.async;
 *   each thread copies and later reads only its own chunks, so no barrier
 *   guards the ring) while this group is worked on, without registers;
 * - one reduction round per K rows: the f64 sums of x and x^2 (one
 *   conversion per element; a bf16-valued square is exact in f64), and the
 *   sum of squares about the mean as Q - S*mean (one rounding, then clamped
 *   at 0). Against the CPU's two-pass sum of (x - mean)^2 this differs in the
 *   last bits (more where |mean| >> the spread), far below what the f32 cast
 *   of the normalized value can show except in rare near-ties;
 * - warps k < K finish row k's statistics (division, square root) for all;
 * - with bf16 rounding the normalized value (x - mean) * rstd is evaluated in
 *   f32 pairs (x - mean by an exact two-sum against mean = hi + lo, the
 *   product with rstd = hi + lo by an exact fma split), ~2^-44 from the f64
 *   expression, so its f32 cast agrees but for values within that of an f32
 *   rounding boundary, and the bf16 result but for such a value that is also
 *   a bf16 tie; no f64 per element. The three roundings are one
 *   cvt.rn.bf16x2 per pair each and the last one is what gets stored.
 *   A chunk whose outputs are not all finite (NaN/inf in the row or the
 *   modulation, an overflow) and every chunk at f32/f16 rounding take the
 *   f64 expressions and rnd_to of k_adaln_row instead.
 * The per-row sums are independent of K and S (a thread's 8 elements in
 * order, the warp, the warps' partials over one warp), so the fused and the
 * plain kernel, f32 and bf16 storage, give the same bits. In place allowed:
 * a thread reads and writes only its own chunks. */
template <typename T, bool GATED, int K, int S>
__global__ void __launch_bounds__(384, 2)
    k_adaln_rows(T *h, const T *a, const float *gate, T *y, int nrows, int rows, int d,
                 const float *__restrict__ shift, const float *__restrict__ scale, int64_t mod_stride, float eps,
                 int rnd) {
    constexpr int NA = GATED ? 2 : 1, CW = (int)sizeof(T) / 2; /* arrays per row, 16-byte pieces per chunk */
    __shared__ uint4 ring[S][K * NA][384 * CW];
    __shared__ double ps[K][12], pq[K][12];
    __shared__ double2 st64[K]; /* mean, rstd */
    __shared__ float4 st32[K];  /* -mean as hi, lo; rstd as hi, lo */
    const int c = threadIdx.x, lane = c & 31, warp = c >> 5, nw = blockDim.x >> 5;
    const bool on = c < d / 8;
    const int ngroups = (nrows + K - 1) / K, G = (int)gridDim.x;
    /* the batch item whose modulation (gate) is in registers, and the row
     * where it ends: rows only grow, so a division only when one passes it */
    int mod_b = 0, mod_hi = 0, gate_b = 0, gate_hi = 0;
    float sc1[8], sf[8], gv[8];
    /* group g's chunks into ring slot sl; one commit per call, empty or not,
     * so that "group i has landed" is always "at most S - 1 pending" */
    auto fetch = [&](int g, int sl) {
        if (g < ngroups && on) {
#pragma unroll
            for (int k = 0; k < K; k++) {
                const int r = g * K + k;
                if (r >= nrows) break;
                const uint4 *src = reinterpret_cast<const uint4 *>(h + (int64_t)r * d + 8 * c);
#pragma unroll
                for (int w = 0; w < CW; w++) cp16_async(&ring[sl][k * NA][c * CW + w], src + w);
                if (GATED) {
                    const uint4 *sa = reinterpret_cast<const uint4 *>(a + (int64_t)r * d + 8 * c);
#pragma unroll
                    for (int w = 0; w < CW; w++) cp16_async(&ring[sl][k * NA + NA - 1][c * CW + w], sa + w);
                }
            }
        }
        cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < S; i++) fetch((int)blockIdx.x + i * G, i);
    int sl = 0;
    for (int gi = blockIdx.x; gi < ngroups; gi += G) {
        cp_async_wait<S - 1>();
        Chunk8<T> hc[K];
        double s[K], q[K];
#pragma unroll
        for (int k = 0; k < K; k++) {
            const int r = gi * K + k;
            s[k] = q[k] = 0.0;
            if (on && r < nrows) {
                float f[8];
                hc[k].load(reinterpret_cast<const T *>(&ring[sl][k * NA][c * CW]));
                hc[k].get(f);
                if (GATED) {
                    if (r >= gate_hi) {
                        gate_b = r / rows;
                        gate_hi = (gate_b + 1) * rows;
                        ld8f(gate + gate_b * mod_stride + 8 * c, gv);
                    }
                    Chunk8<T> ac;
                    ac.load(reinterpret_cast<const T *>(&ring[sl][k * NA + NA - 1][c * CW]));
                    float av[8];
                    ac.get(av);
                    gated_add8(f, gv, av, rnd);
                    hc[k].set(f);
                    hc[k].store(h + (int64_t)r * d + 8 * c);
                }
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    const double v = (double)f[e];
                    s[k] += v;
                    q[k] = fma(v, v, q[k]);
                }
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
            for (int k = 0; k < K; k++) {
                s[k] += __shfl_xor_sync(0xffffffffu, s[k], o);
                q[k] += __shfl_xor_sync(0xffffffffu, q[k], o);
            }
        }
        if (lane == 0) {
#pragma unroll
            for (int k = 0; k < K; k++) ps[k][warp] = s[k], pq[k][warp] = q[k];
        }
        __syncthreads();
        /* this slot's chunks are in registers and used: refill it (after the
         * barrier, so that no read of it can still be under way) */
        fetch(gi + S * G, sl);
        sl = sl + 1 == S ? 0 : sl + 1;
        for (int k = warp; k < K; k += nw) {
            double ts = lane < nw ? ps[k][lane] : 0.0, tq = lane < nw ? pq[k][lane] : 0.0;
            ts = warp_sum(ts);
            tq = warp_sum(tq);
            if (lane == 0) {
                const double mean = ts / (double)d;
                double sq = fma(-ts, mean, tq);
                if (sq < 0.0) sq = 0.0; /* (NaN stays) */
                const double rstd = 1.0 / sqrt(sq / (double)d + (double)eps);
                const float mh = (float)mean, rh = (float)rstd;
                st64[k] = make_double2(mean, rstd);
                st32[k] = make_float4(-mh, -(float)(mean - (double)mh), rh, (float)(rstd - (double)rh));
            }
        }
        __syncthreads(); /* (and every ps/pq read before the next group writes them) */
#pragma unroll
        for (int k = 0; k < K; k++) {
            const int r = gi * K + k;
            if (!on || r >= nrows) continue;
            if (r >= mod_hi) {
                mod_b = r / rows;
                mod_hi = (mod_b + 1) * rows;
                float sc[8];
                ld8f(shift + mod_b * mod_stride + 8 * c, sf);
                ld8f(scale + mod_b * mod_stride + 8 * c, sc);
#pragma unroll
                for (int e = 0; e < 8; e++) sc1[e] = rnd_to(__fadd_rn(1.0f, sc[e]), rnd);
            }
            float x[8];
            hc[k].get(x);
            T *yp = y + (int64_t)r * d + 8 * c;
            if (rnd == FQ_BF16) {
                const float4 m = st32[k];
                uint32_t w[4];
                float nf = 0.0f;
#pragma unroll
                for (int p = 0; p < 4; p++) {
                    float o[2];
#pragma unroll
                    for (int j = 0; j < 2; j++) {
                        const float xv = x[2 * p + j];
                        const float dh = __fadd_rn(xv, m.x); /* x - mean = dh + er + lo(-mean) */
                        const float bb = __fsub_rn(dh, xv);
                        const float er = __fadd_rn(__fsub_rn(xv, __fsub_rn(dh, bb)), __fsub_rn(m.x, bb));
                        const float dl = __fadd_rn(er, m.y);
                        const float pr = __fmul_rn(dh, m.z);
                        const float pe = __fmaf_rn(dh, m.z, -pr);
                        o[j] = __fadd_rn(pr, __fmaf_rn(dh, m.w, __fmaf_rn(dl, m.z, pe)));
                    }
                    uint32_t u = bf2_pack(o[0], o[1]);
                    u = bf2_pack(__fmul_rn(bf2_lo(u), sc1[2 * p]), __fmul_rn(bf2_hi(u), sc1[2 * p + 1]));
                    const float y0 = __fadd_rn(bf2_lo(u), sf[2 * p]), y1 = __fadd_rn(bf2_hi(u), sf[2 * p + 1]);
                    nf = __fmaf_rn(y0, 0.0f, nf);
                    nf = __fmaf_rn(y1, 0.0f, nf);
                    w[p] = bf2_pack(y0, y1);
                }
                if (nf == nf) {
                    Chunk8<T> out;
                    if constexpr (sizeof(T) == 2) {
                        out.u = make_uint4(w[0], w[1], w[2], w[3]);
                    } else {
                        const float v[8] = {bf2_lo(w[0]), bf2_hi(w[0]), bf2_lo(w[1]), bf2_hi(w[1]),
                                            bf2_lo(w[2]), bf2_hi(w[2]), bf2_lo(w[3]), bf2_hi(w[3])};
                        out.set(v);
                    }
                    out.store(yp);
                    continue;
                }
            }
            const double2 mr = st64[k];
            float o[8];
#pragma unroll
            for (int e = 0; e < 8; e++) {
                const float nrm = rnd_to((float)(((double)x[e] - mr.x) * mr.y), rnd);
                const float t = rnd_to(__fmul_rn(nrm, sc1[e]), rnd);
                o[e] = rnd_to(__fadd_rn(t, sf[e]), rnd);
            }
            Chunk8<T> out;
            out.set(o);
            out.store(yp);
        }
    }
    cp_async_wait<0>(); /* (only empty groups can be left) */
}

/* Blocks that are resident at once (the grid-stride kernels above run one
 * wave; more blocks would queue behind whole blocks and leave a tail). */
template <typename K>
int resident_blocks(K kern, int threads, int64_t want, unsigned *grid, cudaStream_t st) {
    /* the occupancy of the last kernel and block size asked for (otherwise a
     * host query per launch; a race between host threads can only give a
     * grid of another size, which the grid-stride loops handle) */
    static const void *last_kern = NULL;
    static int last_threads = 0, last_per = 0;
    int dev = 0, sms = 0, per = 0;
    cudaError_t e = fq_stream_device(st, &dev); /* the stream's device: no current-device query */
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e == cudaSuccess &&
        !(last_kern == (const void *)kern && threads == last_threads && (per = last_per) > 0)) {
        e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, kern, threads, 0);
        if (e == cudaSuccess) last_per = per, last_threads = threads, last_kern = (const void *)kern;
    }
    if (e != cudaSuccess) return (int)e;
    int64_t g = (int64_t)sms * (per > 0 ? per : 1);
    if (g > want) g = want;
    *grid = (unsigned)(g > 0 ? g : 1);
    return 0;
}

/* 1 if the environment variable `name` is set to `value` (the baseline knobs
 * below; each caller reads it once). */
static bool env_is(const char *name, const char *value) {
    const char *s = getenv(name);
    return s && !strcmp(s, value);
}

/* FQ_NORM_KERNELS=old selects the earlier AdaLN and RMSNorm+RoPE kernels
 * (k_adaln_warp, k_rmsnorm_rope128), for a baseline in the same run. */
bool norm_old() {
    static const bool v = env_is("FQ_NORM_KERNELS", "old");
    return v;
}

template <typename T, bool GATED>
int launch_adaln_row(T *h, const T *a, const float *gate, T *y, int64_t batch, int64_t rows, int64_t d,
                     const float *shift, const float *scale, int64_t mod_stride, float eps, int rnd, cudaStream_t st) {
    const int threads = (int)((d / 8 + 31) / 32 * 32);
    unsigned g = 0;
    /* rows loaded ahead: FQ_ADALN_PREFETCH=1 or 2 (the default; bf16 storage) */
    static const int pf = env_is("FQ_ADALN_PREFETCH", "1") ? 1 : 2;
    int e;
    if (pf == 1 || sizeof(T) == 4) { /* (f32 storage: too few registers for 2) */
        e = resident_blocks(k_adaln_row<T, GATED, 1>, threads, batch * rows, &g, st);
        if (!e)
            k_adaln_row<T, GATED, 1><<<g, threads, 0, st>>>(h, a, gate, y, (int)(batch * rows), (int)rows, (int)d,
                                                            shift, scale, mod_stride, eps, rnd);
    } else {
        e = resident_blocks(k_adaln_row<T, GATED, 2>, threads, batch * rows, &g, st);
        if (!e)
            k_adaln_row<T, GATED, 2><<<g, threads, 0, st>>>(h, a, gate, y, (int)(batch * rows), (int)rows, (int)d,
                                                            shift, scale, mod_stride, eps, rnd);
    }
    return e ? e : launch_status();
}

/* FQ_ADALN=row selects k_adaln_row instead of k_adaln_rows, for a baseline
 * in the same run. */
bool adaln_rowk() {
    static const bool v = env_is("FQ_ADALN", "row");
    return v;
}

template <typename T, bool GATED, int K, int S>
int launch_adaln_rows_ks(T *h, const T *a, const float *gate, T *y, int64_t batch, int64_t rows, int64_t d,
                         const float *shift, const float *scale, int64_t mod_stride, float eps, int rnd,
                         cudaStream_t st) {
    const int threads = (int)((d / 8 + 31) / 32 * 32);
    const int64_t nrows = batch * rows;
    unsigned g = 0;
    const int e = resident_blocks(k_adaln_rows<T, GATED, K, S>, threads, (nrows + K - 1) / K, &g, st);
    if (!e)
        k_adaln_rows<T, GATED, K, S><<<g, threads, 0, st>>>(h, a, gate, y, (int)nrows, (int)rows, (int)d, shift,
                                                            scale, mod_stride, eps, rnd);
    return e ? e : launch_status();
}

/* The AdaLN kernel for adaln_row_ok operands: k_adaln_rows with 2 rows at a
 * time (1 when fused with f32 storage) and a ring of 24-36 KB (bf16: 3 groups
 * ahead, 1 when fused; f32: 1), within the 48 KB of static shared memory.
 * H100, FLUX step: fused with 1 ahead beat 1 row x 3 ahead (3.86 vs 4.13-4.21
 * ms over 111 calls), plain 2 x 3 beat 1 x 6 (0.11 vs 0.13 ms, 4 calls). */
template <typename T, bool GATED>
int launch_adaln_rows(T *h, const T *a, const float *gate, T *y, int64_t batch, int64_t rows, int64_t d,
                      const float *shift, const float *scale, int64_t mod_stride, float eps, int rnd, cudaStream_t st) {
    if (adaln_rowk())
        return launch_adaln_row<T, GATED>(h, a, gate, y, batch, rows, d, shift, scale, mod_stride, eps, rnd, st);
    constexpr int K = sizeof(T) == 4 && GATED ? 1 : 2, S = sizeof(T) == 2 && !GATED ? 3 : 1;
    return launch_adaln_rows_ks<T, GATED, K, S>(h, a, gate, y, batch, rows, d, shift, scale, mod_stride, eps, rnd,
                                                st);
}

/* Whether k_adaln_rows (k_adaln_row) runs these operands (on top of
 * adaln_warp_ok). */
bool adaln_row_ok(int64_t batch, int64_t rows, int64_t d) {
    return !norm_old() && d <= 8 * 384 && batch * rows < (1 << 30);
}

/* k_rmsnorm_rope128 with 16-byte accesses and less per-head overhead: a warp
 * does 4 heads of one token, a half-warp a head at a time, lane l holding
 * elements 8(l & 15) .. +7 (four RoPE pairs) of heads h0 + (l >> 4) and
 * h0 + 2 + (l >> 4), its norm weights (f64) and the token's cos/sin. The sum
 * of squares is reduced over 16 lanes (4 shuffle rounds instead of 5), the
 * f64 square root and division (a long DFMA sequence) run once per warp for
 * two heads (even lanes do one head, odd lanes the other, then swap) instead
 * of once per head, index math is 32-bit (the 64-bit divisions per item were
 * about as many instructions as the elements' work), and each element is
 * converted to f64 once. Same expressions per element as k_rmsnorm; only the
 * order of the f64 sum of squares differs (exact for f32 squares unless their
 * exponents span more than ~29 bits). */
template <typename T>
__global__ void __launch_bounds__(256, 2)
    k_rmsnorm_rope128v(T *x, const void *__restrict__ w, int wt, const float *__restrict__ cos_t,
                       const float *__restrict__ sin_t, int ntok, int heads, int n, int t0, float eps, int rnd) {
    const int lane = threadIdx.x & 31, e0 = 8 * (lane & 15), hl = lane >> 4;
    const int gpt = (heads + 3) / 4, items = ntok * gpt, wpb = blockDim.x >> 5;
    double wd[8];
#pragma unroll
    for (int e = 0; e < 8; e++) wd[e] = (double)load_any(w, wt, e0 + e);
    const int stride = gridDim.x * wpb;
    /* the item's two chunks (zeros past the last head); the next item's are
     * loaded while this one is worked on */
    auto load_item = [&](int it, Chunk8<T> ch[2]) {
        const int tok = it / gpt, h0 = (it - tok * gpt) * 4;
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int hh = h0 + 2 * k + hl;
            if (hh < heads) {
                ch[k].load(x + ((int64_t)tok * heads + hh) * 128 + e0);
            } else {
                const float z[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
                ch[k].set(z);
            }
        }
    };
    Chunk8<T> cur[2], nxt[2];
    int it = blockIdx.x * wpb + (threadIdx.x >> 5);
    if (it < items) load_item(it, cur);
    for (; it < items; it += stride) {
        const int tok = it / gpt, h0 = (it - tok * gpt) * 4, row = t0 + tok % n;
        if (it + stride < items) load_item(it + stride, nxt);
        float c[8], sn[8];
        ld8f(cos_t + (int64_t)row * 128 + e0, c);
        ld8f(sin_t + (int64_t)row * 128 + e0, sn);
        double v[2][8], q[2];
#pragma unroll
        for (int k = 0; k < 2; k++) {
            q[k] = 0.0;
            float f[8];
            cur[k].get(f);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                v[k][e] = (double)f[e];
                q[k] += v[k][e] * v[k][e];
            }
        }
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) {
            q[0] += __shfl_xor_sync(0xffffffffu, q[0], o);
            q[1] += __shfl_xor_sync(0xffffffffu, q[1], o);
        }
        const bool odd = lane & 1;
        const double rm = 1.0 / sqrt((odd ? q[1] : q[0]) / 128.0 + (double)eps);
        const double ro = __shfl_xor_sync(0xffffffffu, rm, 1);
        const double r[2] = {odd ? ro : rm, odd ? rm : ro};
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int hh = h0 + 2 * k + hl;
            if (hh >= heads) continue;
            float nv[8], o[8];
            bool done = false;
            if (rnd == FQ_BF16) { /* hardware rounding unless a value is NaN or infinite (nn_vec.cuh) */
                float nf = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; e++) nv[e] = (float)(v[k][e] * r[k] * wd[e]);
#pragma unroll
                for (int e = 0; e < 8; e += 2) bf16_round2_hw(nv[e], nv[e + 1], nf);
#pragma unroll
                for (int p = 0; p < 8; p += 2) {
                    o[p] = __fadd_rn(__fmul_rn(nv[p], c[p]), __fmul_rn(-nv[p + 1], sn[p]));
                    o[p + 1] = __fadd_rn(__fmul_rn(nv[p + 1], c[p + 1]), __fmul_rn(nv[p], sn[p + 1]));
                    bf16_round2_hw(o[p], o[p + 1], nf);
                }
                done = nf == nf;
            }
            if (!done) {
#pragma unroll
                for (int e = 0; e < 8; e++) nv[e] = rnd_to((float)(v[k][e] * r[k] * wd[e]), rnd);
#pragma unroll
                for (int p = 0; p < 8; p += 2) {
                    o[p] = rnd_to(__fadd_rn(__fmul_rn(nv[p], c[p]), __fmul_rn(-nv[p + 1], sn[p])), rnd); /* re*c - im*s */
                    o[p + 1] =
                        rnd_to(__fadd_rn(__fmul_rn(nv[p + 1], c[p + 1]), __fmul_rn(nv[p], sn[p + 1])), rnd); /* im*c + re*s */
                }
            }
            Chunk8<T> out;
            out.set(o);
            out.store(x + ((int64_t)tok * heads + hh) * 128 + e0);
        }
        cur[0] = nxt[0];
        cur[1] = nxt[1];
    }
}

/* The parts of one k_rmsnorm_rope128s launch: x [ntok tokens, heads*128] with
 * norm weights w (dtype wt), token t on table row t0 + t % n, its items
 * (tokens) numbered [it0, it0 + ntok) in the launch. */
constexpr int kRopeParts = FQ_CUDA_ROPE_PARTS, kRopeHeads = 24;
struct RopePart {
    void *x;
    const void *w;
    int wt, ntok, n, t0, it0;
};
struct RopeParts {
    RopePart p[kRopeParts];
    int np, items;
};

/* k_rmsnorm_rope128v with the data streamed in: one warp per token (all its
 * heads, up to 24) instead of per 4 heads, the tokens of up to 4 tensors (q
 * and k of both streams) in one launch. Why: k_rmsnorm_rope128v kept one
 * item (1 KB) ahead per warp in registers, ~16 KB in flight per SM; its
 * cos/sin rows came from L2 on the critical path of every item; and a step
 * ran 152 launches, 38 of them of 512 text tokens that are mostly launch and
 * tail. Here each warp copies its next token (6 KB in bf16) and its cos/sin
 * rows into a ring of two slots in shared memory (cp.async, no registers)
 * while it works on this one; a lane copies the x chunks it later reads
 * itself, the table rows are shared by the warp (hence the __syncwarp). The
 * work per token runs over groups of 4 G heads, G groups at once for
 * independent latency chains, with k_rmsnorm_rope128v's lane layout and
 * expressions (lane l holds elements 8(l & 15).. of heads h0 + (l >> 4),
 * h0 + 2 + (l >> 4), ...; the same f64 sums, shuffles, square root and
 * division, the same rounding points), so the bits are the same. With bf16
 * rounding the guard that sends a chunk with a non-finite value to rnd_to
 * looks at the rotated values only (a non-finite normed value makes its
 * rotated one non-finite: inf * c is inf or NaN, so the decision is the
 * same), sums in four chains instead of one (it only tells whether one is
 * non-finite), and the packed bf16 pairs are stored as they come out of the
 * rounding (no unpack and repack).
 * Tried and slower on the H100 (bench/results/bench_flux_rope_h100_2026-11-27_session5.txt):
 * three slots instead of two (fewer warps: shared memory), three groups at
 * once (179 registers), and the normalized value as an f32 product checked
 * against the bf16 rounding boundaries instead of the f64 product (more
 * integer work than the conversions it saves: the kernel is bound by issue
 * and latency, not by the f64 units). */
template <typename T, int WPB, int G>
__global__ void __launch_bounds__(32 * WPB)
    k_rmsnorm_rope128s(RopeParts ps, const float *__restrict__ cos_t, const float *__restrict__ sin_t, int heads,
                       float eps, int rnd) {
    constexpr int S = 2;                     /* ring slots */
    constexpr int CW = (int)sizeof(T) / 2;   /* 16-byte pieces per 8-element chunk */
    constexpr int XS = kRopeHeads * 16 * CW; /* a token's x: 16 chunks a head */
    constexpr int ST = XS + 64;              /* then its cos and sin rows, 32 pieces each */
    constexpr int K = 2 * G;                 /* chunks per lane and step */
    __shared__ uint4 ring[WPB][S][ST];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, e0 = 8 * (lane & 15), hl = lane >> 4;
    const int nw = (int)gridDim.x * WPB, npair = (heads + 1) / 2;
    uint4(*rg)[ST] = ring[warp];
    /* the part of item it (unrolled: no dynamic index into the parameters) */
    auto part_of = [&](int it, int &pi) -> RopePart {
        RopePart pp = ps.p[0];
        pi = 0;
#pragma unroll
        for (int q = 1; q < kRopeParts; q++)
            if (q < ps.np && it >= ps.p[q].it0) pp = ps.p[q], pi = q;
        return pp;
    };
    /* token it into slot sl; one commit per call, empty or not, so that
     * "this token has landed" is always "at most S - 1 groups pending".
     * Pair j of the token (heads 2j, 2j + 1) sits at pieces (32j + lane) * CW. */
    auto fetch = [&](int it, int sl) {
        if (it < ps.items) {
            int pi;
            const RopePart pp = part_of(it, pi);
            const int tok = it - pp.it0, row = pp.t0 + tok % pp.n;
            const T *xr = static_cast<const T *>(pp.x) + (int64_t)tok * heads * 128 + e0;
#pragma unroll
            for (int j = 0; j < kRopeHeads / 2; j++) {
                if (2 * j + hl >= heads) break;
                const uint4 *src = reinterpret_cast<const uint4 *>(xr + (2 * j + hl) * 128);
#pragma unroll
                for (int w = 0; w < CW; w++) cp16_async(&rg[sl][(32 * j + lane) * CW + w], src + w);
            }
            cp16_async(&rg[sl][XS + lane], reinterpret_cast<const uint4 *>(cos_t + (int64_t)row * 128) + lane);
            cp16_async(&rg[sl][XS + 32 + lane], reinterpret_cast<const uint4 *>(sin_t + (int64_t)row * 128) + lane);
        }
        cp_async_commit();
    };
    const int it_first = (int)blockIdx.x * WPB + warp;
#pragma unroll
    for (int i = 0; i < S; i++) fetch(it_first + i * nw, i);
    int sl = 0, cur = -1;
    double wd[8];
    for (int it = it_first; it < ps.items; it += nw) {
        cp_async_wait<S - 1>();
        __syncwarp(); /* (the table pieces other lanes copied) */
        int pi;
        const RopePart pp = part_of(it, pi);
        if (pi != cur) {
            cur = pi;
#pragma unroll
            for (int e = 0; e < 8; e++) wd[e] = (double)load_any(pp.w, pp.wt, e0 + e);
        }
        T *xr = static_cast<T *>(pp.x) + (int64_t)(it - pp.it0) * heads * 128 + e0;
        float c[8], sn[8];
        {
            const float4 *tc = reinterpret_cast<const float4 *>(&rg[sl][XS]), *ts = tc + 32;
            const float4 c0 = tc[2 * (lane & 15)], c1 = tc[2 * (lane & 15) + 1];
            const float4 s0 = ts[2 * (lane & 15)], s1 = ts[2 * (lane & 15) + 1];
            c[0] = c0.x, c[1] = c0.y, c[2] = c0.z, c[3] = c0.w, c[4] = c1.x, c[5] = c1.y, c[6] = c1.z, c[7] = c1.w;
            sn[0] = s0.x, sn[1] = s0.y, sn[2] = s0.z, sn[3] = s0.w, sn[4] = s1.x, sn[5] = s1.y, sn[6] = s1.z,
            sn[7] = s1.w;
        }
        for (int j0 = 0; j0 < npair; j0 += K) { /* pairs j0 .. j0 + K - 1 */
            double v[K][8], q[K];
#pragma unroll
            for (int k = 0; k < K; k++) {
                float f[8];
                if (2 * (j0 + k) + hl < heads) {
                    Chunk8<T> ch;
                    ch.load(reinterpret_cast<const T *>(&rg[sl][(32 * (j0 + k) + lane) * CW]));
                    ch.get(f);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; e++) f[e] = 0.0f;
                }
                q[k] = 0.0;
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    v[k][e] = (double)f[e];
                    q[k] += v[k][e] * v[k][e];
                }
            }
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) {
#pragma unroll
                for (int k = 0; k < K; k++) q[k] += __shfl_xor_sync(0xffffffffu, q[k], o);
            }
            /* even lanes the square root and division of chunks 0, 2, ..,
             * odd lanes of 1, 3, ..; then swapped */
            const bool odd = lane & 1;
            double r[K];
#pragma unroll
            for (int g = 0; g < G; g++) {
                const double rm = 1.0 / sqrt((odd ? q[2 * g + 1] : q[2 * g]) / 128.0 + (double)eps);
                const double ro = __shfl_xor_sync(0xffffffffu, rm, 1);
                r[2 * g] = odd ? ro : rm;
                r[2 * g + 1] = odd ? rm : ro;
            }
#pragma unroll
            for (int k = 0; k < K; k++) {
                const int hh = 2 * (j0 + k) + hl;
                if (hh >= heads) continue;
                float nv[8], o[8];
                if (rnd == FQ_BF16) { /* as in k_rmsnorm_rope128v (see above for the guard) */
                    float nf[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    uint32_t ow[4];
#pragma unroll
                    for (int e = 0; e < 8; e++) nv[e] = (float)(v[k][e] * r[k] * wd[e]);
#pragma unroll
                    for (int e = 0; e < 8; e += 2) {
                        const uint32_t u = bf2_pack(nv[e], nv[e + 1]);
                        nv[e] = bf2_lo(u), nv[e + 1] = bf2_hi(u);
                    }
#pragma unroll
                    for (int p = 0; p < 8; p += 2) {
                        o[p] = __fadd_rn(__fmul_rn(nv[p], c[p]), __fmul_rn(-nv[p + 1], sn[p]));
                        o[p + 1] = __fadd_rn(__fmul_rn(nv[p + 1], c[p + 1]), __fmul_rn(nv[p], sn[p + 1]));
                        nf[p / 2] = __fmaf_rn(o[p + 1], 0.0f, __fmaf_rn(o[p], 0.0f, nf[p / 2]));
                        ow[p / 2] = bf2_pack(o[p], o[p + 1]);
                    }
                    const float t = (nf[0] + nf[1]) + (nf[2] + nf[3]); /* NaN iff one is */
                    if (t == t) {
                        Chunk8<T> out;
                        if constexpr (sizeof(T) == 2) {
                            out.u = make_uint4(ow[0], ow[1], ow[2], ow[3]);
                        } else {
                            const float w8[8] = {bf2_lo(ow[0]), bf2_hi(ow[0]), bf2_lo(ow[1]), bf2_hi(ow[1]),
                                                 bf2_lo(ow[2]), bf2_hi(ow[2]), bf2_lo(ow[3]), bf2_hi(ow[3])};
                            out.set(w8);
                        }
                        out.store(xr + hh * 128);
                        continue;
                    }
                }
                {
#pragma unroll
                    for (int e = 0; e < 8; e++) nv[e] = rnd_to((float)(v[k][e] * r[k] * wd[e]), rnd);
#pragma unroll
                    for (int p = 0; p < 8; p += 2) {
                        o[p] = rnd_to(__fadd_rn(__fmul_rn(nv[p], c[p]), __fmul_rn(-nv[p + 1], sn[p])), rnd);
                        o[p + 1] = rnd_to(__fadd_rn(__fmul_rn(nv[p + 1], c[p + 1]), __fmul_rn(nv[p], sn[p + 1])), rnd);
                    }
                }
                Chunk8<T> out;
                out.set(o);
                out.store(xr + hh * 128);
            }
        }
        __syncwarp(); /* every lane is done with the slot before it is refilled */
        fetch(it + S * nw, sl);
        sl = sl + 1 == S ? 0 : sl + 1;
    }
    cp_async_wait<0>(); /* (only empty groups can be left) */
}

} // namespace

/* The kernels before k_rmsnorm_rope128s, one tensor a launch: k_rmsnorm_rope128v
 * (FQ_NORM_KERNELS=old: k_rmsnorm_rope128), k_rmsnorm_rope off d = 128. */
static int rmsnorm_rope_prev(void *x, fq_dtype xt, const void *w, fq_dtype wt, const float *cos_t,
                             const float *sin_t, int64_t batch, int64_t n, int64_t heads, int64_t t0, int64_t d,
                             float eps, fq_dtype rnd, cudaStream_t st) {
    const int64_t groups = batch * n * heads;
    if (groups <= 0 || d <= 0) return 0;
    if (d % 32) return (int)cudaErrorInvalidValue;
    const int64_t wpb = kThreads / 32;
    if (d == 128 && al16(x) && al16(cos_t) && al16(sin_t) && !norm_old() && batch * n * heads < (1 << 30) &&
        t0 + n < (1 << 30)) {
        const int64_t items = batch * n * ((heads + 3) / 4);
        unsigned g = 0;
        int e = 0;
        if (xt == FQ_BF16) {
            e = resident_blocks(k_rmsnorm_rope128v<__nv_bfloat16>, kThreads, (items + wpb - 1) / wpb, &g, st);
            if (!e)
                k_rmsnorm_rope128v<__nv_bfloat16><<<g, kThreads, 0, st>>>(static_cast<__nv_bfloat16 *>(x), w, (int)wt,
                                                                          cos_t, sin_t, (int)(batch * n), (int)heads,
                                                                          (int)n, (int)t0, eps, (int)rnd);
        } else {
            e = resident_blocks(k_rmsnorm_rope128v<float>, kThreads, (items + wpb - 1) / wpb, &g, st);
            if (!e)
                k_rmsnorm_rope128v<float><<<g, kThreads, 0, st>>>(static_cast<float *>(x), w, (int)wt, cos_t, sin_t,
                                                                  (int)(batch * n), (int)heads, (int)n, (int)t0, eps,
                                                                  (int)rnd);
        }
        return e ? e : launch_status();
    }
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

/* FQ_RMSNORM_ROPE=v: the previous kernels (rmsnorm_rope_prev) for every
 * call; =g1: k_rmsnorm_rope128s with one group of 4 heads at once instead of
 * two (H100: the same speed within noise, 106 instead of 141 registers). */
static int rope_knob() {
    static const int v = env_is("FQ_RMSNORM_ROPE", "v") ? 1 : env_is("FQ_RMSNORM_ROPE", "g1") ? 2 : 0;
    return v;
}

template <typename T, int WPB, int G>
static int launch_rope_s(const RopeParts &ps, const float *cos_t, const float *sin_t, int heads, float eps, int rnd,
                         cudaStream_t st) {
    unsigned g = 0;
    const int e = resident_blocks(k_rmsnorm_rope128s<T, WPB, G>, 32 * WPB, (ps.items + WPB - 1) / WPB, &g, st);
    if (!e) k_rmsnorm_rope128s<T, WPB, G><<<g, 32 * WPB, 0, st>>>(ps, cos_t, sin_t, heads, eps, rnd);
    return e ? e : launch_status();
}

extern "C" int fq_cuda_nn_rmsnorm_rope_n(const fq_cuda_rope_part *parts, int np, fq_dtype xt, const float *cos_t,
                                         const float *sin_t, int64_t heads, int64_t d, float eps, fq_dtype rnd,
                                         int impl, cudaStream_t st) {
    if (np < 0 || np > kRopeParts) return (int)cudaErrorInvalidValue;
    /* k_rmsnorm_rope128s: d 128, up to 24 heads, 16-byte aligned tensors
     * and tables, 32-bit item and row numbers */
    bool one = impl == 0 && !norm_old() && rope_knob() != 1 && d == 128 && heads > 0 && heads <= kRopeHeads &&
               al16(cos_t) && al16(sin_t) && (xt == FQ_BF16 || xt == FQ_F32);
    RopeParts ps;
    memset(&ps, 0, sizeof ps);
    int64_t items = 0;
    for (int i = 0; i < np && one; i++) {
        const fq_cuda_rope_part &p = parts[i];
        const int64_t nt = p.batch * p.n;
        if (nt <= 0) continue;
        if (!al16(p.x) || p.t0 < 0 || p.t0 + p.n >= (1 << 30) || items + nt >= (1 << 30)) {
            one = false;
            break;
        }
        RopePart &q = ps.p[ps.np++];
        q.x = p.x, q.w = p.w, q.wt = (int)p.wt, q.ntok = (int)nt, q.n = (int)p.n, q.t0 = (int)p.t0;
        q.it0 = (int)items;
        items += nt;
    }
    if (one) {
        if (!ps.np) return 0;
        ps.items = (int)items;
        for (int i = ps.np; i < kRopeParts; i++) ps.p[i] = ps.p[ps.np - 1]; /* (never selected) */
        typedef __nv_bfloat16 bf;
        const int h = (int)heads, rn = (int)rnd;
        if (xt == FQ_F32) return launch_rope_s<float, 1, 1>(ps, cos_t, sin_t, h, eps, rn, st);
        if (rope_knob() == 2) return launch_rope_s<bf, 2, 1>(ps, cos_t, sin_t, h, eps, rn, st);
        return launch_rope_s<bf, 2, 2>(ps, cos_t, sin_t, h, eps, rn, st);
    }
    for (int i = 0; i < np; i++) {
        const fq_cuda_rope_part &p = parts[i];
        const int e = rmsnorm_rope_prev(p.x, xt, p.w, p.wt, cos_t, sin_t, p.batch, p.n, heads, p.t0, d, eps, rnd, st);
        if (e) return e;
    }
    return 0;
}

extern "C" int fq_cuda_nn_rmsnorm_rope(void *x, fq_dtype xt, const void *w, fq_dtype wt, const float *cos_t,
                                       const float *sin_t, int64_t batch, int64_t n, int64_t heads, int64_t t0,
                                       int64_t d, float eps, fq_dtype rnd, cudaStream_t st) {
    fq_cuda_rope_part p;
    p.x = x, p.w = w, p.wt = wt, p.batch = batch, p.n = n, p.t0 = t0;
    return fq_cuda_nn_rmsnorm_rope_n(&p, 1, xt, cos_t, sin_t, heads, d, eps, rnd, 0, st);
}

extern "C" int fq_cuda_nn_adaln(const void *x, void *y, fq_dtype xt, int64_t batch, int64_t rows, int64_t d,
                                const float *shift, const float *scale, int64_t mod_stride, float eps,
                                fq_dtype rnd, cudaStream_t st) {
    const int64_t nrows = batch * rows;
    if (nrows <= 0 || d <= 0) return 0;
    typedef __nv_bfloat16 bf;
    if (adaln_warp_ok(x, y, NULL, shift, scale, NULL, d, mod_stride)) {
        /* (x is only read: the non-gated kernels never write through h) */
        if (adaln_row_ok(batch, rows, d)) {
            if (xt == FQ_BF16)
                return launch_adaln_rows<bf, false>(const_cast<bf *>(static_cast<const bf *>(x)), NULL, NULL,
                                                    static_cast<bf *>(y), batch, rows, d, shift, scale, mod_stride, eps,
                                                    (int)rnd, st);
            return launch_adaln_rows<float, false>(const_cast<float *>(static_cast<const float *>(x)), NULL, NULL,
                                                   static_cast<float *>(y), batch, rows, d, shift, scale, mod_stride,
                                                   eps, (int)rnd, st);
        }
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
        if (adaln_row_ok(batch, rows, d)) {
            if (xt == FQ_BF16)
                return launch_adaln_rows<bf, true>(static_cast<bf *>(h), static_cast<const bf *>(a), gate,
                                                   static_cast<bf *>(y), batch, rows, d, shift, scale, mod_stride, eps,
                                                   (int)rnd, st);
            return launch_adaln_rows<float, true>(static_cast<float *>(h), static_cast<const float *>(a), gate,
                                                  static_cast<float *>(y), batch, rows, d, shift, scale, mod_stride,
                                                  eps, (int)rnd, st);
        }
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

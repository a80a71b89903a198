/* torch.mean of a contiguous 1-D float32 CUDA tensor, bit for bit, on the CPU.
 *
 * bitsandbytes' double-quant offset is `absmax.mean()` run by torch on the GPU,
 * so its bits depend on the order torch's reduction kernel (ATen's Reduce.cuh,
 * launched by mean_kernel_cuda with 4 accumulators and 4-wide vector loads)
 * adds the values in: a float sum, then times float(1/n). We replay that order
 * on one thread. Every step is an IEEE float add (torch is not built with
 * fast-math), so only the order matters.
 *
 * The launch shape for n inputs and one output (setReduceConfig):
 *  - n <= 128: w = the largest power of two <= n threads; thread t adds
 *    elements t, t+w, t+2w, ... round-robin into 4 accumulators, then
 *    combines them in order;
 *  - n > 128: 4-wide vector loads (Reduce.cuh: dim0 > 128); w = min(largest power of two <= n/4, 512);
 *    thread t of CTA c reads vectors t + c*w, stepping w*ctas, one accumulator
 *    per vector lane; the n%4 tail elements go to threads 0.. of CTA 0;
 *  - threads combine by halving through shared memory down to 32, then a warp
 *    shuffle with offsets 16, 8, 4, 2, 1;
 *  - when each thread would see >= 256 values the input is split over
 *    ctas = max(min(SMs * 2048/w, ceil(vpt/16)), ceil(vpt/256)) CTAs; the last
 *    CTA folds the partials with the same w-thread scheme.
 * SMs = 132 (H100 SXM): for large inputs the offset depends on the GPU model.
 * Valid for n < 2^31 (torch splits larger inputs differently). */
#include "kernels/kernels.h"

#include <math.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && !defined(__STRICT_ANSI__)
#error "build in ISO C mode (-std=c11): GCC then keeps float expressions unfused (-ffp-contract=off)"
#endif
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

enum {
    TORCH_SM_COUNT = 132,         /* H100 SXM multiprocessors */
    TORCH_THREADS_PER_SM = 2048,  /* maxThreadsPerMultiProcessor */
    TORCH_MAX_THREADS = 512,      /* Reduce.cuh MAX_NUM_THREADS for float */
    TORCH_SCALAR_MAX = 128,       /* vectorize the input only when n > 128 */
    TORCH_VEC = 4,                /* vt0 = input_vec_size = 4 for float */
    WARP = 32,
};

static int64_t last_pow2(int64_t n) {
    int64_t p = 1;
    while (p * 2 <= n) p *= 2;
    return p;
}

/* block_x_reduce: shared-memory halving down to a warp, then shuffles. v is consumed. */
static float block_reduce(float *v, int64_t w) {
    int64_t dim = w;
    if (dim > WARP) {
        for (int64_t off = dim / 2; off >= WARP; off >>= 1)
            for (int64_t t = 0; t < off; t++) v[t] = v[t] + v[t + off];
        dim = WARP;
    }
    for (int64_t off = dim >> 1; off > 0; off >>= 1)
        for (int64_t t = 0; t < off; t++) v[t] = v[t] + v[t + off];
    return v[0];
}

/* n <= 128: one element per step, 4 accumulators filled round-robin. */
static float sum_scalar(const float *x, int64_t n) {
    float v[TORCH_SCALAR_MAX];
    int64_t w = last_pow2(n);
    for (int64_t t = 0; t < w; t++) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        int64_t k = 0;
        for (int64_t i = t; i < n; i += w, k++) acc[k & 3] = acc[k & 3] + x[i];
        v[t] = ((acc[0] + acc[1]) + acc[2]) + acc[3];
    }
    return block_reduce(v, w);
}

/* n > 128: the vectorized path, possibly split over several CTAs. */
static float sum_vector(const float *x, int64_t n) {
    int64_t dim0 = n / TORCH_VEC;
    int64_t w = dim0 < TORCH_MAX_THREADS ? last_pow2(dim0) : TORCH_MAX_THREADS;
    int64_t vpt = (n + w - 1) / w; /* values_per_thread counts elements, not vectors */
    int64_t ctas = 1;
    if (vpt >= 256) {
        int64_t c1 = (int64_t)TORCH_SM_COUNT * (TORCH_THREADS_PER_SM / w);
        int64_t c2 = (vpt + 15) / 16, c3 = (vpt + 255) / 256;
        ctas = c1 < c2 ? c1 : c2;
        if (ctas < c3) ctas = c3;
    }
    int64_t stride = w * ctas, tail = n % TORCH_VEC, tail_start = n - tail;
    float v[TORCH_MAX_THREADS], g[TORCH_MAX_THREADS];
    for (int64_t t = 0; t < w; t++) g[t] = 0.0f;
    for (int64_t c = 0; c < ctas; c++) {
        for (int64_t t = 0; t < w; t++) {
            float lane[TORCH_VEC] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int64_t idx = t + c * w; idx * TORCH_VEC + TORCH_VEC - 1 < n; idx += stride)
                for (int i = 0; i < TORCH_VEC; i++) lane[i] = lane[i] + x[idx * TORCH_VEC + i];
            if (c == 0 && t < tail) lane[0] = lane[0] + x[tail_start + t];
            v[t] = ((lane[0] + lane[1]) + lane[2]) + lane[3];
        }
        float partial = block_reduce(v, w);
        if (ctas == 1) return partial;
        /* Global reduce: thread t of the last CTA adds partials t, t+w, ... from 0. */
        g[c % w] = g[c % w] + partial;
    }
    for (int64_t t = 0; t < w; t++) v[t] = g[t];
    return block_reduce(v, w);
}

float fq_cpu_torch_mean(const float *x, int64_t n) {
    if (n <= 0) return NAN; /* torch: the mean of nothing is NaN */
    float sum = n <= TORCH_SCALAR_MAX ? sum_scalar(x, n) : sum_vector(x, n);
    float factor = 1.0f / (float)n; /* MeanOps factor: float(1) / numel */
    float mean = sum * factor;
    /* inf + -inf (an Inf block next to an all-NaN one, whose absmax is -FLT_MAX)
     * gives NaN; the GPU writes the canonical 0x7fffffff, x86 0xffc00000. */
    if (mean != mean) {
        uint32_t canon = 0x7fffffffu;
        memcpy(&mean, &canon, sizeof mean);
    }
    return mean;
}

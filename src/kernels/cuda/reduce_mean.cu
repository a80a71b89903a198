/* torch.mean of a contiguous float32 vector, in the exact order torch's CUDA
 * reduction (ATen Reduce.cuh, mean_kernel_cuda) adds the values, so that the
 * double-quant offset matches bitsandbytes bit for bit. The order is the one
 * src/kernels/cpu/torch_mean.c replays (it explains the launch shape); the
 * SM count in it is fixed at 132 (H100), so the result never depends on the
 * GPU that runs this.
 *
 * torch spreads the sum over `ctas` CTAs of w threads. Here one warp plays one
 * of torch's CTAs: lane l holds torch's threads l, l+32, ... (up to 16 of
 * them), which turns torch's shared-memory halving into register adds inside
 * each lane, followed by the same shuffle tree. The CTA partials are folded
 * in torch's global-reduce order by one CTA. To read the input at full speed
 * on Hopper, 8 CTAs form a thread-block cluster and hand their partials to
 * CTA 0 through distributed shared memory (no scratch memory needed); other
 * GPUs use a single CTA. All adds are IEEE (torch is not built fast-math). */
#include "kernels/cuda/quant_common.cuh"

#include <cooperative_groups.h>

/* Thread-block clusters exist from sm_90 on (and in the host pass). */
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define FQ_CLUSTER_OK 1
#else
#define FQ_CLUSTER_OK 0
#endif

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kCluster = 8;
constexpr int64_t kMaxCtas = 4096; /* partials kept in shared memory */
constexpr int kSmCount = 132, kThreadsPerSm = 2048, kMaxW = 512;

struct MeanPlan {
    int64_t n;
    int64_t w;    /* torch's threads per CTA */
    int64_t ctas; /* torch's CTAs (1: no global reduce) */
    int vec;      /* 1: 4-wide vector loads (n > 128, as Reduce.cuh's dim0 > 128) */
    float factor; /* float(1) / n */
};

int64_t last_pow2(int64_t n) {
    int64_t p = 1;
    while (p * 2 <= n) p *= 2;
    return p;
}

MeanPlan make_plan(int64_t n) {
    MeanPlan P;
    P.n = n > 0 ? n : 0;
    P.vec = n > 128;
    P.ctas = 1;
    if (!P.vec) {
        P.w = last_pow2(n);
    } else {
        int64_t dim0 = n / 4;
        P.w = dim0 < kMaxW ? last_pow2(dim0) : kMaxW;
        int64_t vpt = (n + P.w - 1) / P.w; /* values_per_thread counts elements */
        if (vpt >= 256) {
            int64_t c1 = (int64_t)kSmCount * (kThreadsPerSm / P.w), c2 = (vpt + 15) / 16, c3 = (vpt + 255) / 256;
            P.ctas = c1 < c2 ? c1 : c2;
            if (P.ctas < c3) P.ctas = c3;
        }
    }
    P.factor = 1.0f / (float)n;
    return P;
}

/* torch's block_x_reduce for w threads, lane l holding threads l + 32k in
 * leaf[k] (k < w/32, or leaf[0] alone when w < 32). Result in lane 0. */
__device__ __forceinline__ float block_tree(float (&leaf)[16], int64_t w) {
    const int K = w >= 32 ? (int)(w / 32) : 1;
    /* shared-memory halving, offsets w/2 .. 32 (leaf k pairs with k + off/32) */
    if (K > 8) {
#pragma unroll
        for (int k = 0; k < 8; k++) leaf[k] = __fadd_rn(leaf[k], leaf[k + 8]);
    }
    if (K > 4) {
#pragma unroll
        for (int k = 0; k < 4; k++) leaf[k] = __fadd_rn(leaf[k], leaf[k + 4]);
    }
    if (K > 2) {
        leaf[0] = __fadd_rn(leaf[0], leaf[2]);
        leaf[1] = __fadd_rn(leaf[1], leaf[3]);
    }
    if (K > 1) leaf[0] = __fadd_rn(leaf[0], leaf[1]);
    /* warp shuffle, offsets 16, 8, 4, 2, 1 (from w/2 when w < 32) */
    float v = leaf[0];
    const int64_t first = w >= 32 ? 16 : w / 2;
    if (first >= 16) v = __fadd_rn(v, __shfl_down_sync(0xffffffffu, v, 16));
    if (first >= 8) v = __fadd_rn(v, __shfl_down_sync(0xffffffffu, v, 8));
    if (first >= 4) v = __fadd_rn(v, __shfl_down_sync(0xffffffffu, v, 4));
    if (first >= 2) v = __fadd_rn(v, __shfl_down_sync(0xffffffffu, v, 2));
    if (first >= 1) v = __fadd_rn(v, __shfl_down_sync(0xffffffffu, v, 1));
    return v;
}

/* The block-reduced sum of torch's CTA c, computed by one warp (lane 0). */
__device__ __forceinline__ float cta_sum(const float *__restrict__ x, const MeanPlan &P, int64_t c, int lane) {
    float leaf[16];
    if (!P.vec) {
        /* n <= 128: thread t adds t, t+w, ... round-robin into 4 accumulators. */
        const int K = P.w >= 32 ? (int)(P.w / 32) : 1;
#pragma unroll
        for (int k = 0; k < 16; k++) {
            const int64_t t = lane + 32 * k;
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (k < K && t < P.w) {
                /* element t + j*w goes to accumulator j % 4 */
                for (int64_t i = t; i < P.n; i += 4 * P.w) {
#pragma unroll
                    for (int a = 0; a < 4; a++)
                        if (i + a * P.w < P.n) acc[a] = __fadd_rn(acc[a], x[i + a * P.w]);
                }
            }
            leaf[k] = __fadd_rn(__fadd_rn(__fadd_rn(acc[0], acc[1]), acc[2]), acc[3]);
        }
        return block_tree(leaf, P.w);
    }
    /* n > 128: thread t reads vectors t + c*w, stepping w*ctas, one
     * accumulator per vector lane. A pass handles 4 of this lane's threads
     * and loads 4 steps of each at once (16 vector loads in flight); the
     * adds then run in each thread's own order. */
    const int K = (int)(P.w / 32);
    const int64_t step = P.w * P.ctas;
    const int64_t tail = P.n % 4;
#pragma unroll
    for (int h = 0; h < 16; h += 4) {
        float acc[4][4];
#pragma unroll
        for (int k = 0; k < 4; k++) acc[k][0] = acc[k][1] = acc[k][2] = acc[k][3] = 0.0f;
        if (h < K) {
            for (int64_t j0 = c * P.w; j0 * 4 + 3 < P.n; j0 += 4 * step) {
                float4 v[4][4];
#pragma unroll
                for (int u = 0; u < 4; u++)
#pragma unroll
                    for (int k = 0; k < 4; k++) {
                        const int64_t idx = j0 + u * step + lane + 32 * (h + k);
                        v[u][k] = (h + k < K && idx * 4 + 3 < P.n) ? *reinterpret_cast<const float4 *>(x + idx * 4)
                                                                   : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                    }
#pragma unroll
                for (int u = 0; u < 4; u++)
#pragma unroll
                    for (int k = 0; k < 4; k++) {
                        const int64_t idx = j0 + u * step + lane + 32 * (h + k);
                        if (h + k < K && idx * 4 + 3 < P.n) {
                            acc[k][0] = __fadd_rn(acc[k][0], v[u][k].x);
                            acc[k][1] = __fadd_rn(acc[k][1], v[u][k].y);
                            acc[k][2] = __fadd_rn(acc[k][2], v[u][k].z);
                            acc[k][3] = __fadd_rn(acc[k][3], v[u][k].w);
                        }
                    }
            }
        }
        /* The n % 4 tail goes to threads 0.. of CTA 0, after the vector loop. */
        if (h == 0 && c == 0 && lane < tail) acc[0][0] = __fadd_rn(acc[0][0], x[P.n - tail + lane]);
#pragma unroll
        for (int k = 0; k < 4; k++)
            leaf[h + k] = __fadd_rn(__fadd_rn(__fadd_rn(acc[k][0], acc[k][1]), acc[k][2]), acc[k][3]);
    }
    return block_tree(leaf, P.w);
}

/* Partials of torch's CTAs c = (rank * kWarps + warp) + i * nranks * kWarps go
 * to CTA 0's shared memory; CTA 0 then folds them as torch's last CTA does. */
template <bool CLUSTER>
__device__ __forceinline__ void mean_body(const float *__restrict__ x, const MeanPlan &P, float *__restrict__ out) {
    __shared__ float s_part[kMaxCtas];
    __shared__ float s_fold[kMaxW];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int rank = 0, nranks = 1;
    float *dst = s_part;
#if FQ_CLUSTER_OK
    if constexpr (CLUSTER) {
        namespace cg = cooperative_groups;
        cg::cluster_group cl = cg::this_cluster();
        rank = (int)cl.block_rank();
        nranks = (int)cl.num_blocks();
        dst = cl.map_shared_rank(s_part, 0);
        cl.sync(); /* every CTA of the cluster runs before anyone writes to CTA 0 */
    }
#endif
    for (int64_t c = (int64_t)rank * kWarps + warp; c < P.ctas; c += (int64_t)nranks * kWarps) {
        float v = cta_sum(x, P, c, lane);
        if (lane == 0) dst[c] = v;
    }
#if FQ_CLUSTER_OK
    if constexpr (CLUSTER) cooperative_groups::this_cluster().sync();
    else __syncthreads();
#else
    __syncthreads();
#endif
    if (rank != 0) return;
    if (P.ctas == 1) {
        if (threadIdx.x == 0) *out = __fmul_rn(s_part[0], P.factor);
        return;
    }
    /* Global reduce: thread t (t < w) adds partials t, t+w, ... starting from 0. */
    if (threadIdx.x < P.w) {
        float v = 0.0f;
        for (int64_t i = threadIdx.x; i < P.ctas; i += P.w) v = __fadd_rn(v, s_part[i]);
        s_fold[threadIdx.x] = v;
    }
    __syncthreads();
    if (warp == 0) {
        float leaf[16];
#pragma unroll
        for (int k = 0; k < 16; k++) leaf[k] = (lane + 32 * k < P.w) ? s_fold[lane + 32 * k] : 0.0f;
        float v = block_tree(leaf, P.w);
        if (lane == 0) *out = __fmul_rn(v, P.factor);
    }
}

template <bool CLUSTER>
__global__ void __launch_bounds__(kThreads) k_torch_mean(const float *__restrict__ x, const MeanPlan P,
                                                         float *__restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    if constexpr (CLUSTER) { /* clusters need sm_90; the launcher never picks this below it */
        if (blockIdx.x == 0 && threadIdx.x == 0) *out = __int_as_float(0x7fffffff);
    } else {
        mean_body<false>(x, P, out);
    }
#else
    mean_body<CLUSTER>(x, P, out);
#endif
}

} // namespace

extern "C" int fq_cuda_torch_mean(const float *x, int64_t n, float *out, cudaStream_t stream) {
    if (!out || (n > 0 && (!x || !fq_aligned(x, 16)))) return (int)cudaErrorInvalidValue;
    const MeanPlan P = make_plan(n);
    if (P.ctas > kMaxCtas) return (int)cudaErrorInvalidValue; /* n above ~2^29: not supported */
    int dev = 0, major = 0;
    cudaError_t e = fq_stream_device(stream, &dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    if (e != cudaSuccess) return (int)e;
    if (major >= 9 && P.ctas >= 2) {
        /* Hopper and later: a cluster of 8 CTAs reads the input. */
        cudaLaunchConfig_t cfg = {};
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeClusterDimension;
        attr[0].val.clusterDim.x = kCluster;
        attr[0].val.clusterDim.y = 1;
        attr[0].val.clusterDim.z = 1;
        cfg.gridDim = dim3(kCluster);
        cfg.blockDim = dim3(kThreads);
        cfg.dynamicSmemBytes = 0;
        cfg.stream = stream;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
        e = cudaLaunchKernelEx(&cfg, k_torch_mean<true>, x, P, out);
        if (e == cudaSuccess) return fq_launch_status();
        (void)cudaGetLastError(); /* the cluster did not launch: fall back to one CTA */
    }
    k_torch_mean<false><<<1, kThreads, 0, stream>>>(x, P, out);
    return fq_launch_status();
}

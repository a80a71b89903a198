/* stream_probe: the fastest read of a byte range we know how to write, for the
 * benchmark only (bench_linear --ceiling). It reads the bytes and nothing else, so
 * its time per call is a floor for any M = 1 kernel that must read the same weight
 * once per call: the issue-3 target "M = 1 at >= 0.85 of the copy bandwidth" can be
 * checked against what a kernel with no decode at all reaches in the same harness.
 *
 * Shape: 256-thread blocks, 2 per SM (so that the next call's blocks can be resident
 * while this call's are still running); each thread keeps 8 independent 16-byte
 * loads (ld.global.nc, no L1 allocation, 256-byte L2 fetch) in flight, a warp's
 * loads are 512 contiguous bytes. The loaded words are folded into one value that
 * is stored only if it equals a constant the data never produces, so the loads
 * cannot be dropped.
 *
 * Modes (what the call may overlap with its predecessor in the stream):
 *   0 plain launch: starts after the previous kernel has finished;
 *   1 programmatic dependent launch, griddepcontrol.wait before the first load
 *     (what our GEMV kernels do);
 *   2 programmatic dependent launch, all loads before griddepcontrol.wait (only the
 *     final store waits): consecutive calls overlap as far as the hardware lets
 *     them - a bound no kernel that must wait for its input can beat;
 *   3 as 2, but each block also holds 100 KB of shared memory, so that the next
 *     call's blocks cannot start on an SM before this call's have left it (what a
 *     kernel with one large block per SM gets from loading before the wait). */
#include "kernels/cuda/lin4_common.cuh"

#define SP_THREADS 256
#define SP_BLOCKS_PER_SM 2
#define SP_UNROLL 8
#define SP_HOG_SMEM (100 << 10) /* mode 3: two blocks fill an SM's shared memory */

typedef struct {
    const uint4 *p;
    int64_t n16; /* 16-byte words to read */
    unsigned *sink;
} sp_args;

template <int MODE>
__global__ void __launch_bounds__(SP_THREADS) stream_probe_kernel(sp_args a) {
    const uint4 *p = a.p;
    const int64_t n16 = a.n16;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (MODE >= 1) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    if (MODE == 1) asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
    const int64_t T = (int64_t)gridDim.x * SP_THREADS;
    /* warp-contiguous: lane l of warp w reads uint4 (w * 32 + l) + j * T */
    int64_t i = (int64_t)blockIdx.x * SP_THREADS + threadIdx.x;
    unsigned acc = 0;
    for (; i + (SP_UNROLL - 1) * T < n16; i += SP_UNROLL * T) {
        uint4 v[SP_UNROLL];
#pragma unroll
        for (int u = 0; u < SP_UNROLL; u++) v[u] = fq_lin4_ld_stream16(p + i + u * T);
#pragma unroll
        for (int u = 0; u < SP_UNROLL; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n16; i += T) {
        const uint4 v = fq_lin4_ld_stream16(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (MODE == 2) asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
    if (acc == 0x9e3779b9u) *a.sink = acc; /* never in practice; keeps the loads */
}

extern "C" int fq_cuda_stream_probe(const void *p, size_t bytes, unsigned *sink, int mode, int sm_count,
                                    cudaStream_t stream) {
    if (!p || !sink || ((uintptr_t)p & 15) || mode < 0 || mode > 3) return (int)cudaErrorInvalidValue;
    const int64_t n16 = (int64_t)(bytes / 16);
    if (n16 == 0) return (int)cudaSuccess;
    int64_t blocks = (int64_t)(sm_count > 0 ? sm_count : 132) * SP_BLOCKS_PER_SM;
    const int64_t need = (n16 + SP_THREADS - 1) / SP_THREADS;
    if (blocks > need) blocks = need;
    void (*fn)(sp_args) =
        mode == 0 ? stream_probe_kernel<0> : mode == 1 ? stream_probe_kernel<1> : stream_probe_kernel<2>;
    const size_t smem = mode == 3 ? SP_HOG_SMEM : 0;
    if (mode == 3) {
        const cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return (int)e;
    }
    const sp_args a = {(const uint4 *)p, n16, sink};
    return fq_lin4_launch(fn, (unsigned)blocks, SP_THREADS, smem, stream, a, mode == 0);
}

/* ---- l2_probe: how fast L2 hands an L2-resident range to the SMs ----------------------
 * For the benchmark only (bench_linear --l2). Every block reads the whole range `reps`
 * times, the way each CTA of the 4-bit GEMMs reads its x tiles (at M = 256 and K = 3072,
 * x is 1.5 MB and every CTA reads all of it once per W tile), so the total is blocks x
 * bytes x reps. how 0: 16-byte register loads, 256 threads a block, 8 in flight per
 * thread; how 1: bulk copies (cp.async.bulk) of 16 KB into an 8-deep shared-memory ring
 * issued by one thread, as gemm4_ws's producer does, each block starting at its own
 * offset; how 2: as 1, every block starting at offset 0 (the blocks read in step). */
#define LP_PIECE (16 << 10)
#define LP_SLOTS 8

typedef struct {
    const uint8_t *p;
    int64_t bytes; /* a multiple of LP_PIECE */
    int reps;
    unsigned *sink;
} lp_args;

__global__ void __launch_bounds__(SP_THREADS) l2_probe_loads_kernel(lp_args a) {
    const uint4 *p = (const uint4 *)a.p;
    const int64_t n16 = a.bytes / 16;
    const int64_t start = ((int64_t)blockIdx.x * 4099 * 16) % n16; /* blocks at scattered offsets */
    unsigned acc = 0;
    for (int r = 0; r < a.reps; r++)
        for (int64_t i = threadIdx.x; i < n16; i += SP_UNROLL * SP_THREADS) {
            uint4 v[SP_UNROLL];
#pragma unroll
            for (int u = 0; u < SP_UNROLL; u++) {
                int64_t j = i + u * SP_THREADS;
                j = j < n16 ? j + start : start; /* past the end: any word, read again */
                if (j >= n16) j -= n16;
                v[u] = __ldg(p + j);
            }
#pragma unroll
            for (int u = 0; u < SP_UNROLL; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
        }
    if (acc == 0x9e3779b9u) *a.sink = acc;
}

template <bool IN_STEP> __global__ void __launch_bounds__(32) l2_probe_bulk_kernel(lp_args a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) uint8_t lp_sm[];
    __shared__ uint64_t bars[LP_SLOTS];
    if (threadIdx.x != 0) return;
    for (int s = 0; s < LP_SLOTS; s++) fq_mbar_init(&bars[s], 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    const int64_t pieces = a.bytes / LP_PIECE, total = pieces * a.reps;
    const int64_t start = IN_STEP ? 0 : (int64_t)blockIdx.x * 7 % pieces;
    int64_t k = 0;
    for (; k < total; k++) {
        const int s = (int)(k % LP_SLOTS);
        if (k >= LP_SLOTS) fq_mbar_wait(&bars[s], (uint32_t)((k / LP_SLOTS - 1) & 1));
        const int64_t piece = (k + start) % pieces;
        fq_mbar_arrive_tx(&bars[s], LP_PIECE);
        fq_bulk_g2s(lp_sm + (size_t)s * LP_PIECE, a.p + piece * LP_PIECE, LP_PIECE, &bars[s]);
    }
    for (int64_t j = k > LP_SLOTS ? k - LP_SLOTS : 0; j < k; j++)
        fq_mbar_wait(&bars[j % LP_SLOTS], (uint32_t)((j / LP_SLOTS) & 1));
    if (lp_sm[0] == 0xa5 && lp_sm[1] == 0x5a && a.sink) *a.sink = lp_sm[2]; /* keeps the copies */
#else
    (void)a;
    __trap(); /* never launched: the host checks for sm_90 */
#endif
}

extern "C" int fq_cuda_l2_probe(const void *p, size_t bytes, int reps, int how, int blocks, unsigned *sink,
                                int cc_major, cudaStream_t stream) {
    if (!p || !sink || ((uintptr_t)p & 15) || bytes % LP_PIECE || bytes == 0 || reps < 1 || blocks < 1 || how < 0 ||
        how > 2 || (how > 0 && cc_major < 9))
        return (int)cudaErrorInvalidValue;
    const lp_args a = {(const uint8_t *)p, (int64_t)bytes, reps, sink};
    if (how == 0) {
        l2_probe_loads_kernel<<<(unsigned)blocks, SP_THREADS, 0, stream>>>(a);
        return (int)cudaGetLastError();
    }
    void (*fn)(lp_args) = how == 1 ? l2_probe_bulk_kernel<false> : l2_probe_bulk_kernel<true>;
    const int smem = LP_SLOTS * LP_PIECE;
    const cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return (int)e;
    fn<<<(unsigned)blocks, 32, (size_t)smem, stream>>>(a);
    return (int)cudaGetLastError();
}

/* ---- dsmem_probe: how fast CTAs exchange data through a cluster's shared memory -------
 * For the benchmark only (bench_linear --dsmem). A K split reduced inside a cluster
 * would send each CTA's f32 partial, all but the chunk it finishes itself, into the
 * shared memory of the CTAs finishing the other chunks. `reps` times:
 *  how 0: every block writes `bytes` into the shared memory of the next block of its
 *         cluster (16-byte st.shared::cluster, 256 threads), the cluster synchronizes,
 *         every block reads what it received, the cluster synchronizes again;
 *  how 2: as 0, but each block writes the bytes into its own shared memory and one thread
 *         sends them with bulk copies (shared::cta -> shared::cluster, 16 KB each) that
 *         complete on the next CTA's mbarrier (twice the bytes of shared memory);
 *  how 1: for comparison, the same bytes written to global memory (block b's slot of
 *         `scratch`) and the next block's slot read back, with no synchronization between
 *         blocks (only the traffic counts);
 *  how 3: as 1, the bytes sent from shared memory by bulk copies (global <- shared::cta,
 *         as a TMA-stored partial would be);
 *  how 4, 5: 1 and 3 without the read (the writes alone). */
#define DP_THREADS 256
#define DP_PIECE (16 << 10)

typedef struct {
    int64_t bytes; /* a multiple of 16 */
    int reps;
    uint4 *scratch; /* how 1: [blocks][bytes / 16] */
    unsigned *sink;
} dp_args;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 /* used by the cluster kernels only */
static __device__ __forceinline__ void dp_cluster_sync(void) {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

/* The xor of this thread's share of n16 16-byte words at p (keeps the reads). */
static __device__ __forceinline__ unsigned dp_xor(const uint4 *p, int n16) {
    unsigned acc = 0;
    for (int i = threadIdx.x; i < n16; i += DP_THREADS) {
        const uint4 v = p[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    return acc;
}
#endif

/* how 0 (BULK false) and 2 (BULK true). Shared memory: BULK [0, bytes) outgoing and
 * [bytes, 2 bytes) incoming; otherwise [0, bytes) incoming, written by the previous CTA. */
template <bool BULK> __global__ void __launch_bounds__(DP_THREADS) dsmem_probe_kernel(dp_args a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) uint8_t dp_sm[];
    __shared__ uint64_t bar; /* BULK: the incoming copies complete here */
    uint32_t rank, n;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
    asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
    const uint32_t out = fq_smem_addr(dp_sm), in = BULK ? out + (uint32_t)a.bytes : out, next = (rank + 1) % n;
    uint32_t rin, rbar; /* the next CTA's incoming range and barrier */
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(rin) : "r"(in), "r"(next));
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(rbar) : "r"(fq_smem_addr(&bar)), "r"(next));
    if (BULK && threadIdx.x == 0) {
        fq_mbar_init(&bar, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    dp_cluster_sync();
    const int n16 = (int)(a.bytes / 16);
    unsigned acc = 0;
    for (int r = 0; r < a.reps; r++) {
        if (!BULK) {
            for (int i = threadIdx.x; i < n16; i += DP_THREADS)
                asm volatile("st.shared::cluster.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(rin + 16u * (uint32_t)i),
                             "r"(i), "r"(r), "r"(rank), "r"(n)
                             : "memory");
            dp_cluster_sync();
        } else {
            for (int i = threadIdx.x; i < n16; i += DP_THREADS)
                ((uint4 *)dp_sm)[i] = make_uint4((unsigned)i, r, rank, n);
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); /* visible to the bulk copies */
            __syncthreads();
            if (threadIdx.x == 0) {
                fq_mbar_arrive_tx(&bar, (uint32_t)a.bytes); /* what the previous CTA sends here */
                for (int64_t off = 0; off < a.bytes; off += DP_PIECE) {
                    const uint32_t len = (uint32_t)(a.bytes - off < DP_PIECE ? a.bytes - off : DP_PIECE);
                    asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], "
                                 "%2, [%3];\n" ::"r"(rin + (uint32_t)off),
                                 "r"(out + (uint32_t)off), "r"(len), "r"(rbar)
                                 : "memory");
                }
            }
            fq_mbar_wait(&bar, (uint32_t)(r & 1));
        }
        acc ^= dp_xor((const uint4 *)(dp_sm + (in - out)), n16);
        dp_cluster_sync(); /* read before the next round's data arrive; outgoing sent */
    }
    if (acc == 0x9e3779b9u) *a.sink = acc;
#else
    (void)a;
    __trap(); /* never launched: the host checks for sm_90 */
#endif
}

/* how 1, 3, 4, 5: BULK - the block's bytes written to its shared memory and sent to its
 * slot with bulk copies (16 KB each), waited for; else 16-byte stores. READ - then the
 * next block's slot read back. */
template <bool BULK, bool READ> __global__ void __launch_bounds__(DP_THREADS) gmem_exchange_probe_kernel(dp_args a) {
    extern __shared__ __align__(128) uint8_t dp_sm[];
    const int64_t n16 = a.bytes / 16;
    uint4 *mine = a.scratch + (int64_t)blockIdx.x * n16;
    const uint4 *next = a.scratch + (int64_t)((blockIdx.x + 1) % gridDim.x) * n16;
    unsigned acc = 0;
    for (int r = 0; r < a.reps; r++) {
        if (!BULK) {
            for (int64_t i = threadIdx.x; i < n16; i += DP_THREADS) __stcg(mine + i, make_uint4((unsigned)i, r, 0, 0));
        } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
            for (int64_t i = threadIdx.x; i < n16; i += DP_THREADS)
                ((uint4 *)dp_sm)[i] = make_uint4((unsigned)i, r, 0, 0);
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); /* visible to the bulk copies */
            __syncthreads();
            if (threadIdx.x == 0) {
                for (int64_t off = 0; off < a.bytes; off += DP_PIECE) {
                    const uint32_t len = (uint32_t)(a.bytes - off < DP_PIECE ? a.bytes - off : DP_PIECE);
                    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(
                                     (uint8_t *)mine + off),
                                 "r"(fq_smem_addr(dp_sm) + (uint32_t)off), "r"(len)
                                 : "memory");
                }
                asm volatile("cp.async.bulk.commit_group;\ncp.async.bulk.wait_group 0;\n" ::: "memory");
            }
#else
            __trap(); /* never launched: the host checks for sm_90 */
#endif
        }
        __syncthreads();
        if (READ) {
            for (int64_t i = threadIdx.x; i < n16; i += DP_THREADS) {
                const uint4 v = __ldcg(next + i);
                acc ^= v.x ^ v.y ^ v.z ^ v.w;
            }
            __syncthreads();
        }
    }
    if (acc == 0x9e3779b9u) *a.sink = acc;
}

extern "C" int fq_cuda_dsmem_probe(size_t bytes, int reps, int cluster, int how, int blocks, void *scratch,
                                   unsigned *sink, int cc_major, cudaStream_t stream) {
    const bool cl = how == 0 || how == 2, gm_bulk = how == 3 || how == 5;
    if (!sink || bytes == 0 || bytes % 16 || bytes > (how == 2 ? 100u << 10 : 200u << 10) || reps < 1 || blocks < 1 ||
        how < 0 || how > 5 || ((cl || gm_bulk) && cc_major < 9) ||
        (cl && (cluster < 1 || cluster > 8 || blocks % cluster)) || (!cl && (!scratch || ((uintptr_t)scratch & 15))))
        return (int)cudaErrorInvalidValue;
    const dp_args a = {(int64_t)bytes, reps, (uint4 *)scratch, sink};
    if (!cl) {
        void (*gfn)(dp_args) = how == 1   ? gmem_exchange_probe_kernel<false, true>
                               : how == 3 ? gmem_exchange_probe_kernel<true, true>
                               : how == 4 ? gmem_exchange_probe_kernel<false, false>
                                          : gmem_exchange_probe_kernel<true, false>;
        const size_t gsm = gm_bulk ? bytes : 0;
        const cudaError_t ge = cudaFuncSetAttribute(gfn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)gsm);
        if (ge != cudaSuccess) return (int)ge;
        gfn<<<(unsigned)blocks, DP_THREADS, gsm, stream>>>(a);
        return (int)cudaGetLastError();
    }
    void (*fn)(dp_args) = how == 0 ? dsmem_probe_kernel<false> : dsmem_probe_kernel<true>;
    const size_t smem = how == 0 ? bytes : 2 * bytes;
    cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return (int)e;
    cudaLaunchConfig_t lc = {};
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeClusterDimension;
    at[0].val.clusterDim.x = (unsigned)cluster;
    at[0].val.clusterDim.y = 1;
    at[0].val.clusterDim.z = 1;
    lc.gridDim = dim3((unsigned)blocks);
    lc.blockDim = dim3(DP_THREADS);
    lc.dynamicSmemBytes = smem;
    lc.stream = stream;
    lc.attrs = at;
    lc.numAttrs = 1;
    e = cudaLaunchKernelEx(&lc, fn, a);
    return (int)(e != cudaSuccess ? e : cudaGetLastError());
}

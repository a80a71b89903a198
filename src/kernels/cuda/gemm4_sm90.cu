/* 4-bit linear layers for large M with Hopper warpgroup MMA (sm_90a).
 *
 * The problem is computed transposed, D[n, m] = W[n, :] . x[m, :], so that the
 * 4-bit weight is the A operand of wgmma.mma_async and is decoded straight into
 * registers (no shared-memory round trip for decoded weights); x is the B operand,
 * read by the tensor cores from shared memory in the canonical K-major layout with
 * the 128-byte swizzle.
 *
 * A CTA has WGS (2 to 4) warpgroups; each owns 64 rows of W and all BX rows of
 * the x tile (wgmma n = BX). Per K tile of 64, a cp.async pipeline of S stages
 * brings the x tile (BX x 128 bytes) and the packed W tile (64*WGS x 32 bytes) into
 * shared memory. Each warp then decodes its 16 rows for the four k16 steps: lane
 * (g, t) takes byte t of every 4-byte word of rows g and g+8 (k = 16s + 2t, +1 and
 * 16s + 8 + 2t, +1), looks both nibbles up in the 16-entry f32 code table (16
 * consecutive words: conflict-free), multiplies by the block's absmax in f32 and
 * rounds once to bf16/f16 - exactly the value dequantize produces. The decode of
 * K tile j+1 overlaps the asynchronous MMAs of tile j (two register buffers).
 *
 * When the tile grid is too small for the SMs (small M), K is split over
 * blockIdx.z and f32 partials go to a workspace that fq_cuda_lin4_splitk_reduce
 * sums in a fixed order (results do not depend on timing).
 *
 * Built only for sm_90a (see the Makefile); elsewhere this file reduces to stubs
 * and fq_cuda_gemm4_wgmma_built() returns 0.
 *
 * Requires: x f16/bf16, blocksize >= 64, K a multiple of it, 16-byte aligned x
 * and packed weight. */
#include "kernels/cuda/lin4_common.cuh"
#include "kernels/cuda/wgmma_rs_sm90.cuh"

#define WG_BK 64

typedef struct {
    fq_lin4_weight w;
    const void *x;
    void *y;
    int y_dtype;
    int64_t m;
    fq_lin4_epilogue e;
    int lg2bs;
    float *partial;       /* [splits][m][n] when splits > 1 */
    int64_t kt_per_split; /* K tiles per blockIdx.z */
} wg_args;

/* WGS warpgroups (64 W rows each), BX x rows, S stages. */
template <int WGS, int BX, int S> struct wg_cfg {
    static constexpr int THREADS = 128 * WGS;
    static constexpr int ROWS = 64 * WGS;         /* W rows per CTA */
    static constexpr int X_STAGE = BX * 128;      /* bytes; a multiple of 1024 */
    static constexpr int W_STAGE = ROWS * 32;     /* a multiple of 1024 */
    static constexpr int STAGE = X_STAGE + W_STAGE;
    static constexpr int SMEM = S * STAGE + 1024 /* alignment slack */ + 16 * 4 + 256 * 4;
    static constexpr int X_CHUNKS = BX * 8 / THREADS; /* 16-byte copies per thread */
    static_assert(BX * 8 % THREADS == 0, "x tile must split evenly over the threads");
};

#if defined(FQ_BUILD_SM90A)

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FQ_WG_DEVICE 1
#endif

#ifdef FQ_WG_DEVICE
static __device__ __forceinline__ void fence_proxy_async(void) {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
#endif /* FQ_WG_DEVICE */

template <typename T, int WGS, int BX, int S, bool NESTED>
__global__ void __launch_bounds__(128 * WGS, (WGS == 2 && BX <= 128) ? 2 : 1) gemm4_wgmma_kernel(wg_args a) {
#ifdef FQ_WG_DEVICE
    typedef wg_cfg<WGS, BX, S> C;
    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = fq_smem_addr(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    uint8_t *sm = smem_raw + (base - raw);
    float *qm_s = (float *)(sm + S * C::STAGE);
    float *code_s = qm_s + 16;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int64_t M = a.m, N = a.w.n, K = a.w.k;
    const int64_t n0 = (int64_t)blockIdx.x * C::ROWS, m0 = (int64_t)blockIdx.y * BX;
    const int64_t ktiles = K / WG_BK;
    const int64_t kt0 = (int64_t)blockIdx.z * a.kt_per_split;
    const int64_t kt1 = min(ktiles, kt0 + a.kt_per_split);
    const int64_t nkt = kt1 - kt0;
    const int64_t kb = K >> a.lg2bs;

    if (tid < 16) qm_s[tid] = __ldg(&a.w.quant_map[tid]);
    if (NESTED) code_s[tid] = __ldg(&a.w.nested_code[tid]);

    /* this thread's two W rows (A fragment rows g and g+8 of its warp) */
    const int rA = (warp >> 2) * 64 + (warp & 3) * 16 + g, rB = rA + 8;
    const int64_t nA = n0 + rA, nB = n0 + rB;

    const T *xg = (const T *)a.x;
    auto load_tile = [&](int64_t kt, int st) {
        uint8_t *xd = sm + st * C::STAGE;
#pragma unroll
        for (int i = 0; i < C::X_CHUNKS; i++) {
            const int idx = tid + i * C::THREADS, r = idx >> 3, c = idx & 7;
            const int64_t row = m0 + r;
            const bool ok = row < M;
            fq_cp_async16(xd + r * 128 + ((c ^ (r & 7)) << 4), xg + (ok ? row : 0) * K + kt * WG_BK + c * 8, ok);
        }
        uint8_t *wd = xd + C::X_STAGE;
        {
            const int r = tid >> 1, p = tid & 1; /* ROWS rows x 2 parts = THREADS */
            const int64_t row = n0 + r;
            const bool ok = row < N;
            fq_cp_async16(wd + r * 32 + p * 16, a.w.packed + (ok ? row : 0) * (K >> 1) + kt * (WG_BK / 2) + p * 16,
                          ok);
        }
    };

    /* absmax of rows nA, nB, one K tile ahead */
    uint32_t qa = 0, qb = 0;
    float va = 0.0f, vb = 0.0f, amA = 0.0f, amB = 0.0f;
    auto fetch_absmax = [&](int64_t kt) {
        if (kt < kt1) {
            const int64_t kk = (kt * WG_BK) >> a.lg2bs;
            const int64_t ba = (nA < N ? nA : 0) * kb + kk, bbk = (nB < N ? nB : 0) * kb + kk;
            if (NESTED) {
                qa = __ldg(&a.w.qabsmax[ba]);
                qb = __ldg(&a.w.qabsmax[bbk]);
                va = __ldg(&a.w.nested_absmax[ba >> 8]);
                vb = __ldg(&a.w.nested_absmax[bbk >> 8]);
            } else {
                va = __ldg(&a.w.absmax[ba]);
                vb = __ldg(&a.w.absmax[bbk]);
            }
        }
    };
    auto take_absmax = [&]() {
        if (NESTED) {
            amA = code_s[qa] * va + a.w.offset;
            amB = code_s[qb] * vb + a.w.offset;
        } else {
            amA = va;
            amB = vb;
        }
        if (nA >= N) amA = 0.0f;
        if (nB >= N) amB = 0.0f;
    };

    /* decode the A fragment of k16 step s of the W tile in stage st: rows g, g+8
     * take byte t of the words 2s (k = 16s + 2t, +1) and 2s+1 (k = 16s + 8 + 2t, +1) */
    const int sh = 8 * t;
    auto decode = [&](int st, int s, uint32_t (&af)[4]) {
        const uint8_t *wd = sm + st * C::STAGE + C::X_STAGE + s * 8;
        const uint2 pa = *(const uint2 *)(wd + rA * 32), pb = *(const uint2 *)(wd + rB * 32);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const uint32_t ba = ((h ? pa.y : pa.x) >> sh) & 0xffu, bbt = ((h ? pb.y : pb.x) >> sh) & 0xffu;
            af[2 * h] = fq_mma_t<T>::pack(qm_s[ba >> 4] * amA, qm_s[ba & 15u] * amA);
            af[2 * h + 1] = fq_mma_t<T>::pack(qm_s[bbt >> 4] * amB, qm_s[bbt & 15u] * amB);
        }
    };

    float acc[BX / 2];
#pragma unroll
    for (int i = 0; i < BX / 2; i++) acc[i] = 0.0f;
    uint32_t af[4][4]; /* one A fragment per k16 step of a K tile */

    /* prologue: stages 0..S-2 in flight, tile 0 landed, its absmax known */
#pragma unroll
    for (int st = 0; st < S - 1; st++) {
        if (st < nkt) load_tile(kt0 + st, st);
        fq_cp_async_commit();
    }
    fetch_absmax(kt0);
    fq_cp_async_wait<S - 2>();
    fence_proxy_async();
    __syncthreads();
    take_absmax();
    fetch_absmax(kt0 + 1);
    decode(0, 0, af[0]);

    /* Each k16 step is its own wgmma group. Before fragment s is rewritten, at most
     * 3 groups are pending, so the group that last read it (same step, previous
     * tile) has retired. */
    for (int64_t j = 0; j < nkt; j++) {
        const int st = (int)(j % S);
        const uint32_t xa = base + st * C::STAGE;
#pragma unroll
        for (int s = 0; s < 4; s++) {
            fq_wgmma_fence();
            fq_wgmma_rs<T, BX>(acc, af[s][0], af[s][1], af[s][2], af[s][3], fq_wgmma_desc(xa + s * 32), 1u);
            fq_wgmma_commit();
            fq_wgmma_wait<3>();
            if (s < 3) decode(st, s + 1, af[s + 1]);
        }
        /* all groups of tile j-1 retired (at most 3 of tile j pending): its stage is free */
        fq_cp_async_wait<S - 3>(); /* tile j+1 landed (this thread's copies) */
        fence_proxy_async();
        __syncthreads();
        const int64_t nk = j + S - 1;
        if (nk < nkt) load_tile(kt0 + nk, (int)(nk % S));
        fq_cp_async_commit();
        take_absmax();
        fetch_absmax(kt0 + j + 2);
        if (j + 1 < nkt) decode((int)((j + 1) % S), 0, af[0]);
    }
    fq_wgmma_wait<0>();
    fq_cp_async_wait<0>();

    /* epilogue: acc[4j + v] is (W row g + 8*(v>>1), x row 8j + 2t + (v&1)) */
#pragma unroll
    for (int j = 0; j < BX / 8; j++) {
#pragma unroll
        for (int v = 0; v < 4; v++) {
            const int64_t n = (v >> 1) ? nB : nA;
            const int64_t m = m0 + 8 * j + 2 * t + (v & 1);
            if (n >= N || m >= M) continue;
            if (a.partial) a.partial[((int64_t)blockIdx.z * M + m) * N + n] = acc[4 * j + v];
            else fq_stf(a.y, a.y_dtype, m * N + n, fq_epi(a.e, n, acc[4 * j + v]));
        }
    }
#else
    (void)a;
#endif
}

/* ---- configurations and launch ------------------------------------------------------ */

typedef void (*wg_kernel_fn)(wg_args);
typedef struct {
    int rows, bx, threads, smem, per_sm; /* per_sm: CTAs resident per SM */
    wg_kernel_fn fn[2][2];               /* [f16 = 0, bf16 = 1][nested] */
    const char *name;
} wg_config;

#define WG_CONFIG(WGS, BX, S, NAME)                                                                              \
    {64 * WGS, BX, 128 * WGS, wg_cfg<WGS, BX, S>::SMEM, (WGS == 2 && BX <= 128) ? 2 : 1,                         \
     {{gemm4_wgmma_kernel<__half, WGS, BX, S, false>, gemm4_wgmma_kernel<__half, WGS, BX, S, true>},             \
      {gemm4_wgmma_kernel<__nv_bfloat16, WGS, BX, S, false>, gemm4_wgmma_kernel<__nv_bfloat16, WGS, BX, S, true>}}, \
     NAME}

/* W rows x x rows per CTA. Taller W tiles cut the re-reads of the (bf16) x tile
 * from L2; the register file bounds the area (accumulators: rows * BX / threads). */
static const wg_config *wg_configs(void) {
    static const wg_config c[FQ_GEMM4_WGMMA_CONFIGS] = {
        WG_CONFIG(2, 256, 4, "wgmma 128x256x64 s4"),
        WG_CONFIG(2, 192, 4, "wgmma 128x192x64 s4"),
        WG_CONFIG(2, 128, 5, "wgmma 128x128x64 s5"),
        WG_CONFIG(3, 192, 4, "wgmma 192x192x64 s4"),
        WG_CONFIG(4, 128, 4, "wgmma 256x128x64 s4"),
    };
    return c;
}

extern "C" int fq_cuda_gemm4_wgmma_built(void) { return 1; }

extern "C" int fq_cuda_gemm4_wgmma_prepare(void) {
    const wg_config *c = wg_configs();
    for (int i = 0; i < FQ_GEMM4_WGMMA_CONFIGS; i++)
        for (int t = 0; t < 2; t++)
            for (int n = 0; n < 2; n++) {
                cudaError_t e =
                    cudaFuncSetAttribute(c[i].fn[t][n], cudaFuncAttributeMaxDynamicSharedMemorySize, c[i].smem);
                if (e != cudaSuccess) return (int)e;
            }
    return (int)cudaSuccess;
}

static int64_t cdiv64(int64_t a, int64_t b) { return (a + b - 1) / b; }

typedef struct {
    int ci;
    int64_t splits, kt_per_split;
} wg_plan;

/* cfg: low 4 bits = tile configuration (0 = choose), bits 4..7 = K splits (0 = choose). */
static wg_plan plan_for(const fq_lin4_weight *w, const fq_lin4_io *io, int sm_count, int cfg) {
    const int64_t sms = sm_count > 0 ? sm_count : 132;
    const int64_t ktiles = w->k / WG_BK;
    const int want_ci = (cfg & 15) - 1, want_splits = (cfg >> 4) & 15;
    wg_plan best = {0, 1, ktiles};
    int64_t best_cost = -1;
    for (int ci = 0; ci < FQ_GEMM4_WGMMA_CONFIGS; ci++) {
        if (want_ci >= 0 && ci != want_ci) continue;
        const int64_t bx = wg_configs()[ci].bx, rows = wg_configs()[ci].rows, per_sm = wg_configs()[ci].per_sm;
        const int64_t tiles = cdiv64(w->n, rows) * cdiv64(io->m, bx);
        int64_t splits = 1;
        if (want_splits > 0) splits = want_splits;
        else if (tiles < sms * per_sm) {
            splits = sms * per_sm / tiles;
            if (splits > ktiles / 4) splits = ktiles / 4;
            if (splits > 15) splits = 15;
            if (splits < 1) splits = 1;
        }
        if (splits > ktiles) splits = ktiles;
        const int64_t kps = cdiv64(ktiles, splits);
        splits = cdiv64(ktiles, kps);
        /* time ~ rounds of resident CTAs x the MMA work of one (CTAs sharing an SM
         * share its tensor cores), plus a fixed cost of about two K tiles per CTA
         * and the reduce pass */
        const int64_t rounds = cdiv64(tiles * splits, sms * per_sm);
        const int64_t cost = rounds * per_sm * rows * bx * (kps + 2) + (splits > 1 ? splits * rows * bx : 0);
        if (best_cost < 0 || cost < best_cost) {
            best_cost = cost;
            best.ci = ci;
            best.splits = splits;
            best.kt_per_split = kps;
        }
    }
    return best;
}

extern "C" size_t fq_cuda_gemm4_wgmma_workspace(const fq_lin4_weight *w, const fq_lin4_io *io, int sm_count,
                                                int cfg) {
    if (!fq_cuda_gemm4_wgmma_supported(w, io) || io->m <= 0) return 0;
    const wg_plan p = plan_for(w, io, sm_count, cfg);
    return p.splits > 1 ? (size_t)p.splits * (size_t)io->m * (size_t)w->n * sizeof(float) : 0;
}

extern "C" int fq_cuda_gemm4_wgmma(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                                   int sm_count, int cfg, float *ws, size_t ws_bytes, cudaStream_t stream) {
    if (!fq_cuda_gemm4_wgmma_supported(w, io)) return (int)cudaErrorInvalidValue;
    if (io->m <= 0) return (int)cudaSuccess;
    wg_plan p = plan_for(w, io, sm_count, cfg);
    const size_t need = (size_t)p.splits * (size_t)io->m * (size_t)w->n * sizeof(float);
    if (p.splits > 1 && (!ws || ws_bytes < need)) {
        p.splits = 1;
        p.kt_per_split = w->k / WG_BK;
    }
    const wg_config *c = &wg_configs()[p.ci];
    const int64_t gx = cdiv64(w->n, c->rows), gy = cdiv64(io->m, c->bx);
    if (gx > 0x7fffffff || gy > 65535) return (int)cudaErrorInvalidConfiguration;
    wg_args a;
    a.w = *w;
    a.x = io->x;
    a.y = io->y;
    a.y_dtype = io->y_dtype;
    a.m = io->m;
    a.e = *e;
    a.lg2bs = fq_log2i(w->blocksize);
    a.partial = p.splits > 1 ? ws : NULL;
    a.kt_per_split = p.kt_per_split;
    c->fn[io->x_dtype == FQ_BF16 ? 1 : 0][w->nested ? 1 : 0]<<<dim3((unsigned)gx, (unsigned)gy, (unsigned)p.splits),
                                                                c->threads, c->smem, stream>>>(a);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || p.splits == 1) return (int)err;
    return fq_cuda_lin4_splitk_reduce(ws, (int)p.splits, io, w->n, e, stream);
}

extern "C" const char *fq_cuda_gemm4_wgmma_config_name(int cfg) {
    const int ci = (cfg & 15) - 1;
    return ci >= 0 && ci < FQ_GEMM4_WGMMA_CONFIGS ? wg_configs()[ci].name : "auto";
}

#else /* !FQ_BUILD_SM90A: built without architecture 90 */

extern "C" int fq_cuda_gemm4_wgmma_built(void) { return 0; }
extern "C" int fq_cuda_gemm4_wgmma_prepare(void) { return (int)cudaSuccess; }
extern "C" size_t fq_cuda_gemm4_wgmma_workspace(const fq_lin4_weight *w, const fq_lin4_io *io, int sm_count,
                                                int cfg) {
    (void)w; (void)io; (void)sm_count; (void)cfg;
    return 0;
}
extern "C" int fq_cuda_gemm4_wgmma(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                                   int sm_count, int cfg, float *ws, size_t ws_bytes, cudaStream_t stream) {
    (void)w; (void)io; (void)e; (void)sm_count; (void)cfg; (void)ws; (void)ws_bytes; (void)stream;
    return (int)cudaErrorNotSupported;
}
extern "C" const char *fq_cuda_gemm4_wgmma_config_name(int cfg) {
    (void)cfg;
    return "not built";
}
#endif

extern "C" int fq_cuda_gemm4_wgmma_supported(const fq_lin4_weight *w, const fq_lin4_io *io) {
    const int xt = io->x_dtype, yt = io->y_dtype;
    return fq_cuda_gemm4_wgmma_built() && (xt == FQ_BF16 || xt == FQ_F16) &&
           (yt == FQ_BF16 || yt == FQ_F16 || yt == FQ_F32) && w->blocksize >= 64 && w->k >= WG_BK &&
           w->k % w->blocksize == 0 && w->n >= 1 && ((uintptr_t)io->x & 15) == 0 &&
           ((uintptr_t)w->packed & 15) == 0 && w->quant_map != NULL;
}

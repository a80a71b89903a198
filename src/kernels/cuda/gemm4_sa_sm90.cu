/* gemm4_sa: the 4-bit GEMM for many rows (sm_90a) with each weight decoded once per
 * 2 x BX rows of x instead of once per BX ("shared A"). Reached through gemm4_ws's
 * configurations 11 and 12 (FQ_LIN4_SELECT(FQ_LIN4_GEMM_WS, 11 or 12)).
 *
 * D[n, m] = W[n, :] . x[m, :] as in gemm4_ws, but the CTA tile is 64 W rows x 2 BX x
 * rows: both consumer warpgroups multiply the same 64 W rows, warpgroup c by x rows
 * [c BX, (c + 1) BX) of the tile. Per K tile of 64 the 256 consumer threads decode
 * the 64 x 64 weights once - 16 per thread, exactly as dequantize rounds them - into
 * a bf16/f16 A tile in shared memory (128-byte swizzle, two buffers), and each
 * warpgroup runs wgmma with A and B from shared memory. gemm4_ws decodes 32 weights
 * per thread for the same MMA work.
 *
 * That tile needs twice the x bytes per K tile (~57 KB against ~32 KB), more than the
 * L2 hands the SMs at cuBLASLt's rate, so CTAs run in clusters of two on neighbouring
 * W tiles of the same x rows, and each CTA's producer loads one of the two x boxes with
 * a multicast TMA copy into both CTAs. x and W have rings of their own: an x stage
 * (55-64 KB, three of them) is refilled once the consumers of both CTAs have released it
 * (each consumer warpgroup arrives on both CTAs' "empty" barrier), a W stage (2 KB and
 * its absmax, four) as soon as it is decoded; the two CTAs walk the same x tiles in the
 * same order.
 *
 * Per K tile a consumer warpgroup waits for its x stage, issues its 4 wgmma on the A
 * buffer decoded in the previous K tile, decodes the next K tile into the other buffer
 * while they run, waits for them to retire (which frees the x stage at once, giving the
 * x ring two K tiles of lead), and meets the other warpgroup at a named barrier: the new
 * A tile is complete and the old one is no longer read. (A first version kept x and W in
 * one three-stage ring released a K tile later: every K tile then waited for its copy,
 * 0.30-0.36x cuBLASLt at 4608 rows.)
 *
 * Requires what gemm4_ws requires (x f16/bf16, blocksize >= 64 dividing K); K splits
 * and stream-K do not apply (the plan is one tile per cluster and pass). */
#include "kernels/cuda/gemm4_ws_common.cuh"
#include "kernels/cuda/wgmma_rs_sm90.cuh"

#include <stdlib.h>
#include <string.h>

#define SA_BK 64       /* K tile */
#define SA_ROWS 64     /* W rows per CTA tile */
#define SA_THREADS 384 /* producer warpgroup + 2 consumer warpgroups */
#define SA_XST 3 /* x stages: 2 BX rows each, freed when the K tile's wgmma retire */
#define SA_WST 4 /* W stages (bytes + absmax), freed once decoded */
#define SA_ABUFS 2
#define SA_ABYTES (SA_ROWS * SA_BK * 2) /* one decoded A tile: 8 KB */

typedef struct {
    fq_lin4_weight w;
    void *y;
    int y_dtype;
    int lg2bs;
    int64_t m;
    fq_lin4_epilogue e;
    int ktiles;   /* K / SA_BK */
    int nt, nt2;  /* W tiles of 64 rows; pairs of them (one pair per cluster and pass) */
    int mt;       /* x tiles of 2 BX rows */
    int probe;    /* EXPERIMENT (FQ_SA_PROBE): 1 no decode, 2 no MMA, 4 no multicast (each CTA loads both boxes) */
} sa_args;

/* A cluster's work item: the pair p of W tiles (this CTA takes tile 2 (p % nt2) + rank)
 * of x tile p / nt2, K tile kt; it counts the items. */
typedef struct {
    int64_t p;
    int kt, n0, mti;
    uint32_t it;
    bool valid;
} sa_item;

#if defined(FQ_BUILD_SM90A) /* without it (no 90 in CUDA_ARCHS) this file builds empty */

template <int BX> struct sa_cfg {
    static constexpr int X_BOX = BX * 128; /* one warpgroup's x rows, a multiple of 1024 */
    static constexpr int X_STAGE = 2 * X_BOX;
    static constexpr int W_STAGE = SA_ROWS * SA_BK / 2;
    /* x stages, A buffers, W stages, absmax, the 16 + 256 codes, 2 + 2 barrier rings */
    static constexpr int SMEM = 1024 /* alignment slack */ + SA_XST * X_STAGE + SA_ABUFS * SA_ABYTES +
                                SA_WST * W_STAGE + SA_WST * SA_ROWS * 4 + (16 + 256) * 4 + 2 * (SA_XST + SA_WST) * 8;
    static_assert((SA_WST * W_STAGE + SA_WST * SA_ROWS * 4) % 256 == 0, "the code table must be 256-byte aligned");
};

#ifdef FQ_WS_DEVICE
static __device__ __forceinline__ uint32_t sa_rank(void) {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
/* the same shared-memory offset in CTA `rank` of the cluster */
static __device__ __forceinline__ uint32_t sa_mapa(uint32_t addr, uint32_t rank) {
    uint32_t r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
    return r;
}
static __device__ __forceinline__ void sa_arrive_cluster(uint32_t cluster_addr) {
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_addr) : "memory");
}
/* waits for a barrier that the other CTA of the cluster arrives on as well */
static __device__ __forceinline__ void sa_wait_cluster(uint32_t bar, uint32_t parity) {
    asm volatile("{\n.reg .pred done;\n"
                 "WAIT_%=:\n"
                 "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
                 "r"(parity)
                 : "memory");
}
/* a TMA copy written into the same offset of both CTAs, completing bytes on each one's
 * barrier at that offset */
static __device__ __forceinline__ void sa_tma_load_mc(uint32_t dst, const CUtensorMap *map, int c0, int c1,
                                                      uint32_t bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
                 " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
                 "l"((uint64_t)map), "r"(c0), "r"(c1), "r"(bar), "h"((unsigned short)3)
                 : "memory");
}
static __device__ __forceinline__ void sa_cluster_sync(void) {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

static __device__ __forceinline__ void sa_set(const sa_args &a, uint32_t rank, sa_item &c) {
    c.valid = c.p < (int64_t)a.nt2 * a.mt;
    if (!c.valid) return;
    c.n0 = (int)(2 * (c.p % a.nt2) + rank) * SA_ROWS;
    c.mti = (int)(c.p / a.nt2);
}
static __device__ __forceinline__ sa_item sa_first(const sa_args &a, uint32_t rank) {
    sa_item c;
    c.p = blockIdx.x >> 1;
    c.kt = 0;
    c.it = 0;
    sa_set(a, rank, c);
    return c;
}
static __device__ __forceinline__ void sa_next(const sa_args &a, uint32_t rank, sa_item &c) {
    if (!c.valid) return;
    c.it++;
    if (++c.kt < a.ktiles) return;
    c.kt = 0;
    c.p += gridDim.x >> 1;
    sa_set(a, rank, c);
}
#endif

template <typename T, int BX, bool NESTED>
__global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(SA_THREADS, 1)
    gemm4_sa_kernel(const __grid_constant__ CUtensorMap tmx, const __grid_constant__ CUtensorMap tmw, const sa_args a) {
#ifdef FQ_WS_DEVICE
    typedef sa_cfg<BX> C;
    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = fq_smem_addr(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    uint8_t *sm = smem_raw + (base - raw);
    const uint32_t abuf0 = base + SA_XST * C::X_STAGE;       /* [2][64 rows][128 bytes] */
    const uint32_t wst0 = abuf0 + SA_ABUFS * SA_ABYTES;       /* [SA_WST][64 rows][32 bytes] */
    float *am_s = (float *)(sm + (wst0 - base) + SA_WST * C::W_STAGE); /* [SA_WST][64] */
    const uint32_t qm_a = wst0 + SA_WST * C::W_STAGE + SA_WST * SA_ROWS * 4; /* 16 codes, 256-aligned */
    float *qm_s = am_s + SA_WST * SA_ROWS;
    float *code_s = qm_s + 16;
    const uint32_t fullx0 = qm_a + (16 + 256) * 4, emptyx0 = fullx0 + 8 * SA_XST;
    const uint32_t fullw0 = emptyx0 + 8 * SA_XST, emptyw0 = fullw0 + 8 * SA_WST;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const uint32_t rank = sa_rank();
    const int64_t M = a.m, N = a.w.n;

    if (tid < 16) qm_s[tid] = __ldg(&a.w.quant_map[tid]);
    if (NESTED && tid < 256) code_s[tid] = __ldg(&a.w.nested_code[tid]);
    if (tid == 0) {
        for (int s = 0; s < SA_XST; s++) {
            mbar_init(fullx0 + 8 * s, 1);  /* this CTA's TMA lane (the other CTA's copy adds bytes only) */
            mbar_init(emptyx0 + 8 * s, (a.probe & 4) ? 2 : 4); /* each consumer warpgroup of both CTAs */
        }
        for (int s = 0; s < SA_WST; s++) {
            mbar_init(fullw0 + 8 * s, 33); /* the TMA lane + 32 absmax lanes */
            mbar_init(emptyw0 + 8 * s, 1); /* one consumer thread once the stage is decoded */
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    sa_cluster_sync(); /* the other CTA's barriers exist before anything arrives on them */

    if (warp < 4) {
        /* ---- producer warpgroup ---- */
        setmaxnreg_dec<56>();
        if (warp == 0 && lane == 0) {
            sa_item c = sa_first(a, rank);
            while (c.valid) {
                const uint32_t sw = c.it % SA_WST, sx = c.it % SA_XST;
                const bool ldw = c.n0 < N; /* a W tile past N (odd tile count) decodes to zeros */
                mbar_wait(emptyw0 + 8 * sw, ((c.it / SA_WST) & 1u) ^ 1u);
                mbar_arrive_tx(fullw0 + 8 * sw, ldw ? C::W_STAGE : 0);
                if (ldw) tma_load_2d(wst0 + sw * C::W_STAGE, &tmw, c.kt * (SA_BK / 2), c.n0, fullw0 + 8 * sw);
                const int64_t m0 = (int64_t)c.mti * 2 * BX;
                /* boxes that start past M are not loaded (their rows are never stored) */
                const int boxes = m0 + BX < M ? 2 : 1;
                sa_wait_cluster(emptyx0 + 8 * sx, ((c.it / SA_XST) & 1u) ^ 1u);
                mbar_arrive_tx(fullx0 + 8 * sx, boxes * C::X_BOX);
                if (a.probe & 4) {
                    for (int bi = 0; bi < boxes; bi++)
                        tma_load_2d(base + sx * C::X_STAGE + bi * C::X_BOX, &tmx, c.kt * SA_BK, (int)(m0 + bi * BX),
                                    fullx0 + 8 * sx);
                } else if ((int)rank < boxes)
                    sa_tma_load_mc(base + sx * C::X_STAGE + rank * C::X_BOX, &tmx, c.kt * SA_BK, (int)(m0 + rank * BX),
                                   fullx0 + 8 * sx);
                sa_next(a, rank, c);
            }
        } else if (warp >= 1) {
            /* warps 1..3: the absmax of the tile's 64 rows, stage it taken by warp 1 + it % 3,
             * the next stage's raw values loaded before waiting for the current one */
            const int64_t kb = a.w.k >> a.lg2bs;
            auto load_raw = [&](const sa_item &c, uint32_t (&q)[2], float (&v)[2]) {
                const int64_t kk = ((int64_t)c.kt * SA_BK) >> a.lg2bs;
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    const int64_t n = c.n0 + lane + 32 * i;
                    q[i] = 0;
                    v[i] = 0.0f;
                    if (n < N) {
                        const int64_t blk = n * kb + kk;
                        if (NESTED) {
                            q[i] = __ldg(&a.w.qabsmax[blk]);
                            v[i] = __ldg(&a.w.nested_absmax[blk >> 8]);
                        } else {
                            v[i] = __ldg(&a.w.absmax[blk]);
                        }
                    }
                }
            };
            sa_item c = sa_first(a, rank);
            for (int i = 1; i < warp; i++) sa_next(a, rank, c);
            uint32_t q[2], q2[2];
            float v[2], v2[2];
            if (c.valid) load_raw(c, q, v);
            while (c.valid) {
                sa_item nx = c;
                sa_next(a, rank, nx);
                sa_next(a, rank, nx);
                sa_next(a, rank, nx);
                if (nx.valid) load_raw(nx, q2, v2);
                const uint32_t sw = c.it % SA_WST;
                mbar_wait(emptyw0 + 8 * sw, ((c.it / SA_WST) & 1u) ^ 1u);
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    const float am = NESTED ? __fadd_rn(fq_lin4_mul_ftz(code_s[q[i]], v[i]), a.w.offset) : v[i];
                    am_s[sw * SA_ROWS + lane + 32 * i] = (c.n0 + lane + 32 * i < N) ? am : 0.0f;
                }
                mbar_arrive(fullw0 + 8 * sw);
                c = nx;
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    q[i] = q2[i];
                    v[i] = v2[i];
                }
            }
        }
    } else {
        /* ---- consumers ---- */
        setmaxnreg_inc<224>();
        const int ct = tid - 128, cw = ct >> 7, wl = (ct >> 5) & 3, g = lane >> 2, t4 = lane & 3;
        const int dr = ct >> 2, dq = ct & 3; /* decode: A row dr, its bytes 8 dq .. 8 dq + 7 */
        const int rA = wl * 16 + g;          /* the lane's accumulator rows: rA, rA + 8 */
        const bool leader = (ct & 127) == 0;
        const uint32_t emptyx_peer = sa_mapa(emptyx0, rank ^ 1u), emptyx_own = sa_mapa(emptyx0, rank);
        /* row dr of a K tile's W (32 bytes, bitsandbytes' order) into A buffer b: 16 weights,
         * bf16/f16(code * absmax) with mul.rn.ftz as dequantize, two 16-byte chunks at their
         * 128-byte-swizzle places (chunk j of row r at j ^ (r & 7)) */
        auto decode = [&](uint32_t sw, uint32_t b) {
            const uint2 wv = *(const uint2 *)(sm + (wst0 - base) + sw * C::W_STAGE + dr * 32 + dq * 8);
            const float am = am_s[sw * SA_ROWS + dr];
            const uint32_t H0 = (wv.x >> 2) & 0x3c3c3c3cu, L0 = (wv.x << 2) & 0x3c3c3c3cu;
            const uint32_t H1 = (wv.y >> 2) & 0x3c3c3c3cu, L1 = (wv.y << 2) & 0x3c3c3c3cu;
            uint32_t p[8];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                p[j] = ws_dec_pair<T>(qm_a, H0, L0, j, am);
                p[4 + j] = ws_dec_pair<T>(qm_a, H1, L1, j, am);
            }
            const uint32_t row = abuf0 + b * SA_ABYTES + (uint32_t)dr * 128u, swz = (uint32_t)dr & 7u;
            asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(row + (((2u * dq) ^ swz) << 4)), "r"(p[0]),
                         "r"(p[1]), "r"(p[2]), "r"(p[3])
                         : "memory");
            asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(row + (((2u * dq + 1u) ^ swz) << 4)),
                         "r"(p[4]), "r"(p[5]), "r"(p[6]), "r"(p[7])
                         : "memory");
        };
        /* the decoded tile visible to the tensor cores, and both warpgroups past this point */
        auto meet = [&] {
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            asm volatile("bar.sync 1, 256;\n" ::: "memory");
        };
        float acc[BX / 2];
        sa_item c = sa_first(a, rank);
        /* x stage sx (phase px) and A buffer ab of item c; W stage sw (phase pw) of the next
         * item to decode */
        uint32_t sx = 0, px = 0, ab = 0, sw = 0, pw = 0;
        auto decode_next = [&](uint32_t buf) {
            mbar_wait(fullw0 + 8 * sw, pw);
            if (!(a.probe & 1)) decode(sw, buf);
        };
        auto w_done = [&] { /* after meet(): every thread has decoded W stage sw */
            if (ct == 0) mbar_arrive(emptyw0 + 8 * sw);
            if (++sw == SA_WST) {
                sw = 0;
                pw ^= 1u;
            }
        };
        const uint64_t xd0 = fq_wgmma_desc(base + cw * C::X_BOX), ad0 = fq_wgmma_desc(abuf0);
        if (c.valid) {
            decode_next(0);
            meet();
            w_done();
        }
        while (c.valid) {
            const sa_item tile = c;
            int nk = 0;
            for (;;) {
                /* this K tile: x stage sx, A buffer ab (decoded in the previous iteration) */
                mbar_wait(fullx0 + 8 * sx, px);
                const uint64_t xd = xd0 + (uint64_t)((sx * C::X_STAGE) >> 4), ad = ad0 + (uint64_t)((ab * SA_ABYTES) >> 4);
                if (!(a.probe & 2)) {
                    fq_wgmma_fence();
#pragma unroll
                    for (int s = 0; s < 4; s++)
                        fq_wgmma_ss<T, BX>(acc, ad + 2 * s, xd + 2 * s, (nk > 0 || s > 0) ? 1u : 0u);
                    fq_wgmma_commit();
                }
                sa_next(a, rank, c);
                nk++;
                ab ^= 1u;
                if (c.valid) decode_next(ab); /* while this K tile's wgmma run */
                fq_wgmma_wait<0>();
                if (leader) { /* its x stage is free in both CTAs' eyes */
                    sa_arrive_cluster(emptyx_own + 8 * sx);
                    if (!(a.probe & 4)) sa_arrive_cluster(emptyx_peer + 8 * sx);
                }
                if (++sx == SA_XST) {
                    sx = 0;
                    px ^= 1u;
                }
                meet();
                if (c.valid) w_done();
                if (!c.valid || c.p != tile.p) break;
            }
            /* the warpgroup's 64 x BX results, as gemm4_ws stores them */
            const int64_t nA = tile.n0 + rA, m0 = (int64_t)tile.mti * 2 * BX + (int64_t)cw * BX;
            const bool odd = (g & 1) != 0;
            float b[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
            ws_bias_pairs(a.e, N, nA, odd, b);
            ws_epilogue_any<BX>(acc, a.y, a.y_dtype, a.e.act == FQ_EPI_GELU_TANH, M, N, m0, nA, odd, t4, b);
        }
    }
    /* neither CTA leaves while the other may still arrive on its barriers */
    sa_cluster_sync();
#else
    (void)tmx;
    (void)tmw;
    (void)a;
#endif
}

typedef void (*sa_kernel_fn)(const CUtensorMap, const CUtensorMap, const sa_args);
typedef struct {
    int bx, smem;
    sa_kernel_fn fn[2][2]; /* [f16 = 0, bf16 = 1][nested] */
} sa_config;
#define SA_CONFIG(BX)                                                                                       \
    {BX,                                                                                                    \
     sa_cfg<BX>::SMEM,                                                                                      \
     {{gemm4_sa_kernel<__half, BX, false>, gemm4_sa_kernel<__half, BX, true>},                              \
      {gemm4_sa_kernel<__nv_bfloat16, BX, false>, gemm4_sa_kernel<__nv_bfloat16, BX, true>}}}
static const sa_config g_sa[2] = {SA_CONFIG(216), SA_CONFIG(256)};

static const sa_config *sa_find(int bx) {
    for (int i = 0; i < 2; i++)
        if (g_sa[i].bx == bx) return &g_sa[i];
    return NULL;
}

int fq_cuda_gemm4_sa_prepare(void) {
    for (int i = 0; i < 2; i++)
        for (int t = 0; t < 2; t++)
            for (int n = 0; n < 2; n++) {
                cudaError_t e =
                    cudaFuncSetAttribute(g_sa[i].fn[t][n], cudaFuncAttributeMaxDynamicSharedMemorySize, g_sa[i].smem);
                if (e != cudaSuccess) return (int)e;
            }
    return (int)cudaSuccess;
}

int fq_cuda_gemm4_sa(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e, int bx, int sm_count,
                     cudaStream_t stream) {
    const sa_config *c = sa_find(bx);
    if (!c) return (int)cudaErrorInvalidValue;
    if (io->m <= 0) return (int)cudaSuccess;
    CUtensorMap tmx, tmw;
    int rc = fq_ws_tmap_2d(&tmx, io->x_dtype == FQ_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                           (void *)io->x, (uint64_t)w->k, (uint64_t)io->m, (uint64_t)w->k * 2, SA_BK, (uint32_t)bx,
                           CU_TENSOR_MAP_SWIZZLE_128B);
    if (!rc)
        rc = fq_ws_tmap_2d(&tmw, CU_TENSOR_MAP_DATA_TYPE_UINT8, (void *)w->packed, (uint64_t)w->k / 2, (uint64_t)w->n,
                           (uint64_t)w->k / 2, SA_BK / 2, SA_ROWS, CU_TENSOR_MAP_SWIZZLE_NONE);
    if (rc) return rc;
    sa_args a;
    memset(&a, 0, sizeof a);
    a.w = *w;
    a.y = io->y;
    a.y_dtype = io->y_dtype;
    a.lg2bs = fq_log2i(w->blocksize);
    a.m = io->m;
    a.e = *e;
    a.ktiles = (int)(w->k / SA_BK);
    a.nt = (int)((w->n + SA_ROWS - 1) / SA_ROWS);
    a.nt2 = (a.nt + 1) / 2;
    a.mt = (int)((io->m + 2 * bx - 1) / (2 * bx));
    {
        const char *pe = getenv("FQ_SA_PROBE");
        a.probe = pe ? atoi(pe) : 0;
    }
    /* persistent clusters of two, at most one CTA per SM */
    const int64_t pairs = (int64_t)a.nt2 * a.mt, sms = sm_count > 1 ? sm_count : 132;
    const int64_t clusters = pairs < sms / 2 ? pairs : sms / 2;
    const sa_kernel_fn fn = c->fn[io->x_dtype == FQ_BF16 ? 1 : 0][w->nested ? 1 : 0];
    fn<<<(unsigned)(2 * clusters), SA_THREADS, c->smem, stream>>>(tmx, tmw, a);
    return (int)cudaGetLastError();
}

#endif

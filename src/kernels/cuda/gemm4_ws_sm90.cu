/* Warp-specialized 4-bit GEMM for Hopper (sm_90a): TMA + mbarrier pipeline,
 * the 4-bit weight decoded straight into wgmma A-operand registers.
 *
 * D[n, m] = W[n, :] . x[m, :] is computed transposed, so that W (bitsandbytes'
 * row-major [N, K/2] nibbles) is the A operand of wgmma.mma_async, taken from
 * registers, and x (K-major) is the B operand, read by the tensor cores from
 * shared memory with the 128-byte swizzle.
 *
 * A CTA has 3 warpgroups. Warpgroup 0 is the producer (setmaxnreg down to 56):
 * one lane issues, per K tile of 64, two TMA copies into a stage of an S-deep
 * ring - the x tile (BX rows x 128 bytes, 128-byte swizzle) and the packed W
 * tile (128 rows x 32 bytes) - and warps 1..3 write the 128 absmax values of
 * the tile into the stage (the nested absmax rebuilt exactly as dequantize does:
 * add.rn(mul.rn.ftz(code256[q], nested_absmax), offset)), then arrive on the
 * stage's "full" mbarrier (32 arrivals + the TMA bytes). Warpgroups 1 and 2 are
 * consumers (setmaxnreg up), 64 W rows each. Per K tile a lane decodes all 32 of
 * its weights (rows g and g+8) as bf16/f16(code[nibble] * absmax) with
 * mul.rn.ftz - the very values dequantize_4bit writes - into one of two sets of
 * A fragments, issues its 4 wgmma m64nBXk16 groups, then waits until at most 4
 * groups are pending: the previous K tile's groups have retired, so its
 * fragment set is free and its stage is handed back (the "empty" mbarrier, one
 * arrival per consumer warpgroup), while this K tile's groups keep the tensor
 * cores busy during the next decode. The fast configurations (bf16 x only) decode a
 * byte instead as its bf16 code pair, looked up in a 32 KB table, times the bf16 absmax
 * pair in one bf16x2 multiply: bitsandbytes' inference-kernel rounding, not
 * dequantize's, in fewer than half the instructions (at 700 W that is clock).
 *
 * CTAs are persistent: tile t = blockIdx.x + i * gridDim.x, tiles ordered N
 * fastest (the CTAs running together share x tiles in L2), then M, then K split.
 * With K split (small M), f32 partials go to a workspace that
 * fq_cuda_lin4_splitk_reduce sums in a fixed order, so results never depend on
 * timing.
 *
 * Requires: x f16/bf16 (16-byte aligned), blocksize >= 64 and K a multiple of
 * it (one absmax per row and K tile), packed weight 16-byte aligned. */
#include "kernels/cuda/lin4_common.cuh"
#include "kernels/cuda/wgmma_rs_sm90.cuh"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <stdlib.h>
#include <string.h>

#define WS_BK 64      /* K tile */
#define WS_ROWS 128   /* W rows per tile (2 consumer warpgroups x 64) */
#define WS_THREADS 384
#define WS_AUTO_CONFIGS 4 /* configurations the automatic plan chooses from (ws_auto_ci) */
/* The bench probes (ws_args.probe) exist only in builds with FQ_WS_PROBES (make
 * WS_PROBES=1): elsewhere the hot loops carry no test of the flag (re-read from constant
 * memory every K tile, it cost a short-scoreboard stall right after the W bytes' loads). */
#ifdef FQ_WS_PROBES
#define WS_PROBE(a, bit) (((a).probe & (bit)) != 0)
#else
#define WS_PROBE(a, bit) false
#endif
/* Probe 64 (a timeline, results right): consumer warpgroup 0 of each CTA stamps the
 * global timer at its start (slot 0) and, for its n-th segment (a tile or a stream-K
 * piece of one, n < 4), at the segment's start, after its last MMA, after the stream-K
 * publish or collect, and after the store (slots 1 + 4n .. 4 + 4n); the host clears and
 * reads them with fq_cuda_gemm4_ws_stamps (the launches since the last clear). */
#define WS_STAMPS 16
#ifdef FQ_WS_PROBES
__device__ unsigned long long g_ws_stamps[FQ_GEMM4_WS_MAX_SMS * WS_STAMPS];
#endif
#if defined(FQ_WS_PROBES) && defined(__CUDA_ARCH__)
#define WS_STAMP(a, slot)                                                                                  \
    do {                                                                                                   \
        if (WS_PROBE(a, 64) && (slot) < WS_STAMPS && (threadIdx.x & 127) == 0 && threadIdx.x < 256) {      \
            unsigned long long t_;                                                                         \
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                                         \
            g_ws_stamps[blockIdx.x * WS_STAMPS + (slot)] = t_;                                             \
        }                                                                                                  \
    } while (0)
#else
#define WS_STAMP(a, slot) \
    do {                  \
    } while (0)
#endif

typedef struct {
    fq_lin4_weight w;
    void *y;
    int y_dtype;
    int lg2bs;
    int64_t m;
    fq_lin4_epilogue e;
    float *partial;   /* [splits][m][n] when splits > 1 */
    int ktiles;       /* K / WS_BK */
    int kps;          /* K tiles per split */
    int nt, mt, splits;
    /* stream-K (splits == 1): CTA b takes the K-tile units
     * [units b / grid, units (b + 1) / grid) of the tile-major order, so every CTA
     * gets the same share. A tile split between CTAs is finished by the CTA holding
     * its first K tile ("owner"), which adds the later CTAs' f32 partials (sk_part,
     * one slot per CTA and consumer warpgroup, published through sk_flag) in CTA
     * order: the sums never depend on timing. All CTAs are co-resident (cooperative
     * launch, one per SM), so the owner's wait always ends. */
    int streamk;
    int64_t units;
    float *sk_part; /* [grid][2]: 128 x BX / 2 floats, float4 j of lane l at [j][l] */
    int *sk_flag;   /* [grid][2]: 1 = the slot's partial is ready; reset to 0 by the owner */
    /* TS configurations: y (16-bit, N % 8 == 0, no K split) is written through a
     * shared-memory tile per consumer warpgroup and a TMA store, so the next tile's
     * main loop starts while the store drains */
    int tma_y;
    int probe; /* bench probes (FQ_WS_PROBE, WRONG results): 1 no decode, 2 no absmax loads, 4 no MMA, 8 no stores,
                16 no W copy, 32 no x copy; 64 a timeline (WS_STAMP, right results) */
} ws_args;

/* One stage's work: tile t (N fastest, then M, then the K split), K tile kt. */
typedef struct {
    int64_t t;
    int64_t u, u1; /* stream-K: the current unit and the end of this CTA's range */
    int kt, kt1, n0, mti, sp;
    uint32_t it;
    bool valid;
} ws_item;



template <int BX, int S, bool TS, bool FAST> struct ws_cfg {
    static constexpr int X_STAGE = BX * 128;            /* bytes; BX % 8 == 0 => a multiple of 1024 */
    static constexpr int W_STAGE = WS_ROWS * WS_BK / 2; /* 4096 */
    static constexpr int STAGE = X_STAGE + W_STAGE;
    /* TS: two output tiles (one per consumer warpgroup) of BX rows x 64 16-bit values,
     * 128-byte swizzled, after the stages (1024-aligned) */
    static constexpr int OUT = TS ? 2 * BX * 128 : 0;
    /* FAST: the byte -> code pair table (fq_tbl_build, 32 copies), after the output tiles */
    static constexpr int TBL = FAST ? FQ_TBL_WORDS * 4 : 0;
    static constexpr int SMEM =
        1024 /* alignment slack */ + S * STAGE + OUT + TBL + S * WS_ROWS * 4 + 2 * S * 8 + (16 + 256) * 4;
    static_assert((S * STAGE + OUT + TBL + S * WS_ROWS * 4) % 256 == 0, "the code table must be 256-byte aligned");
};

#if defined(FQ_BUILD_SM90A)

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FQ_WS_DEVICE 1
#endif

#ifdef FQ_WS_DEVICE
/* ---- mbarriers and TMA ---- */
static __device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
static __device__ __forceinline__ void mbar_arrive_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.release.cta.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
}
static __device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.release.cta.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
                 : "memory");
}
static __device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile("{\n.reg .pred done;\n"
                 "WAIT_%=:\n"
                 "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
                 "r"(parity)
                 : "memory");
}
static __device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap *map, int c0, int c1,
                                                   uint32_t bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
                 "%3}], [%4];\n" ::"r"(dst),
                 "l"((uint64_t)map), "r"(c0), "r"(c1), "r"(bar)
                 : "memory");
}


static __device__ __forceinline__ void tma_store_2d(const CUtensorMap *map, uint32_t src, int c0, int c1) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"((uint64_t)map),
                 "r"(c0), "r"(c1), "r"(src)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
/* The bulk stores this thread issued have read their shared memory. */
static __device__ __forceinline__ void tma_store_wait_read(void) {
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
static __device__ __forceinline__ void tma_store_wait_all(void) {
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

template <int R> static __device__ __forceinline__ void setmaxnreg_inc(void) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R> static __device__ __forceinline__ void setmaxnreg_dec(void) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}
static __device__ __forceinline__ void ws_tile(const ws_args &a, int64_t total, ws_item &c) {
    c.valid = c.t < total;
    if (!c.valid) return;
    const int nti = (int)(c.t % a.nt);
    const int64_t r = c.t / a.nt;
    c.n0 = nti * WS_ROWS;
    c.mti = (int)(r % a.mt);
    c.sp = (int)(r / a.mt);
    c.kt = c.sp * a.kps;
    c.kt1 = min(a.ktiles, c.kt + a.kps);
}
/* Stream-K: unit c.u is tile u / ktiles, K tile u % ktiles; the segment runs to the
 * tile's end or the range's. */
static __device__ __forceinline__ void ws_unit(const ws_args &a, ws_item &c) {
    c.valid = c.u < c.u1;
    if (!c.valid) return;
    c.t = c.u / a.ktiles;
    const int kt = (int)(c.u - c.t * a.ktiles);
    const int nti = (int)(c.t % a.nt);
    c.n0 = nti * WS_ROWS;
    c.mti = (int)(c.t / a.nt);
    c.sp = 0;
    c.kt = kt;
    c.kt1 = (int)min((int64_t)a.ktiles, (int64_t)kt + (c.u1 - c.u));
}
static __device__ __forceinline__ int64_t ws_sk_start(const ws_args &a, int64_t b) {
    return a.units * b / gridDim.x;
}
static __device__ __forceinline__ ws_item ws_first(const ws_args &a, int64_t total) {
    ws_item c;
    c.it = 0;
    if (a.streamk) {
        c.u = ws_sk_start(a, blockIdx.x);
        c.u1 = ws_sk_start(a, blockIdx.x + 1);
        ws_unit(a, c);
        return c;
    }
    c.u = c.u1 = 0;
    c.t = blockIdx.x;
    ws_tile(a, total, c);
    return c;
}
static __device__ __forceinline__ void ws_next(const ws_args &a, int64_t total, ws_item &c) {
    if (!c.valid) return;
    c.it++;
    c.u++;
    if (++c.kt < c.kt1) return;
    if (a.streamk) {
        ws_unit(a, c);
        return;
    }
    c.t += gridDim.x;
    ws_tile(a, total, c);
}

/* Named barrier of one consumer warpgroup (ids 1, 2; 0 is __syncthreads). */
static __device__ __forceinline__ void ws_wg_sync(int cw) {
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + cw) : "memory");
}

/* Stream-K, a segment that starts inside its tile: the warpgroup's accumulators go
 * to its slot (16 bytes a store: float4 j of lane lt at p[j * 128 + lt]), then the
 * slot's flag is raised. The warpgroup's barrier orders every lane's stores before lane
 * 0's release (as CUTLASS's split-K semaphore does). Until session 10 every lane stored
 * 4 bytes at a time and fenced: ~3.7 us per publish at BX = 256 by the timeline, now
 * ~3.1 us; the rest is the stores themselves. */
template <int BX>
static __device__ __forceinline__ void ws_sk_publish(const ws_args &a, const float *acc, int cw) {
    const int slot = 2 * blockIdx.x + cw, lt = threadIdx.x & 127;
    float4 *p = (float4 *)(a.sk_part + (size_t)slot * 128 * (BX / 2));
#pragma unroll
    for (int j = 0; j < BX / 8; j++)
        __stcg(p + j * 128 + lt, make_float4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]));
    ws_wg_sync(cw);
    if (lt == 0) asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(a.sk_flag + slot), "r"(1) : "memory");
}

/* Stream-K, the owner of a tile whose first segment ended at K tile kt1: adds the
 * partials of the CTAs after this one that hold the rest of the tile, in CTA order. */
template <int BX>
static __device__ __forceinline__ void ws_sk_collect(const ws_args &a, float *acc, const ws_item &tile, int cw) {
    const int lt = threadIdx.x & 127;
    const int64_t tile_end = (tile.t + 1) * (int64_t)a.ktiles;
    int64_t covered = tile.t * (int64_t)a.ktiles + tile.kt1;
    for (int64_t b = blockIdx.x + 1; covered < tile_end && b < gridDim.x; b++) {
        const int64_t e = ws_sk_start(a, b + 1);
        if (e == covered) continue; /* an empty range publishes nothing */
        const int slot = 2 * (int)b + cw;
        if (lt == 0) {
            int f = 0;
            do {
                asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(f) : "l"(a.sk_flag + slot) : "memory");
            } while (f == 0);
        }
        ws_wg_sync(cw);
        const float4 *p = (const float4 *)(a.sk_part + (size_t)slot * 128 * (BX / 2));
#pragma unroll
        for (int j = 0; j < BX / 8; j++) {
            const float4 v = __ldcg(p + j * 128 + lt);
            acc[4 * j] += v.x;
            acc[4 * j + 1] += v.y;
            acc[4 * j + 2] += v.z;
            acc[4 * j + 3] += v.w;
        }
        ws_wg_sync(cw); /* every lane has read the slot before the flag is lowered */
        if (lt == 0) a.sk_flag[slot] = 0;
        covered = e < tile_end ? e : tile_end;
    }
}

/* GELU (tanh form), as fq_epi computes it. */
static __device__ __forceinline__ float ws_gelu(float v) {
    const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.0f + tanhf(u));
}

template <int YT> static __device__ __forceinline__ void ws_st1(void *p, int64_t i, float v) {
    if (YT == FQ_BF16) ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
    else if (YT == FQ_F16) ((__half *)p)[i] = __float2half_rn(v);
    else ((float *)p)[i] = v;
}
template <int YT> static __device__ __forceinline__ void ws_st2(void *p, int64_t i, float v0, float v1) {
    if (YT == FQ_BF16) *(__nv_bfloat162 *)((__nv_bfloat16 *)p + i) = __floats2bfloat162_rn(v0, v1);
    else if (YT == FQ_F16) *(__half2 *)((__half *)p + i) = __floats2half2_rn(v0, v1);
    else *(float2 *)((float *)p + i) = make_float2(v0, v1);
}

/* Stores a consumer's 64 x BX accumulator tile: acc[4j + v] is (W row nA + 8 (v >> 1),
 * x row m0 + 8j + 2 t4 + (v & 1)). Lanes g and g ^ 1 swap one value so that each
 * holds two neighbouring n of one x row (n = nA or nA + 8, minus 1 on odd g): one
 * 4/8-byte store per pair when N is even (PAIR). b: the bias of those two n for the
 * two row groups. Compile-time type and activation keep the code small (the hot
 * loop shares the instruction cache with it). */
template <int BX, int YT, bool GELU, bool PAIR>
static __device__ __forceinline__ void ws_epilogue(const float *acc, void *y, int64_t M, int64_t N, int64_t m0,
                                                   int64_t nA, bool odd, int t4, const float (&b)[2][2]) {
#pragma unroll
    for (int j = 0; j < BX / 8; j++) {
        const int64_t m = m0 + 8 * j + 2 * t4 + (odd ? 1 : 0);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
            const float r = __shfl_xor_sync(0xffffffffu, odd ? v0 : v1, 4);
            const int64_t n = nA + 8 * h - (odd ? 1 : 0);
            float lo = (odd ? r : v0) + b[h][0], hi = (odd ? v1 : r) + b[h][1];
            if (GELU) {
                lo = ws_gelu(lo);
                hi = ws_gelu(hi);
            }
            if (m >= M) continue;
            if (PAIR) {
                if (n < N) ws_st2<YT>(y, m * N + n, lo, hi);
            } else {
                if (n < N) ws_st1<YT>(y, m * N + n, lo);
                if (n + 1 < N) ws_st1<YT>(y, m * N + n + 1, hi);
            }
        }
    }
}

/* The bias of the two output pairs a lane stores (see ws_epilogue), 0 without a bias. */
static __device__ __forceinline__ void ws_bias_pairs(const ws_args &a, int64_t nA, bool odd, float (&b)[2][2]) {
    if (!a.e.bias) return;
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int64_t n = nA + 8 * h - (odd ? 1 : 0) + i;
            if (n < a.w.n) b[h][i] = fq_ldf(a.e.bias, a.e.bias_dtype, n);
        }
}

/* A consumer's epilogue (see ws_epilogue); split K: raw f32 partials. */
template <int BX>
static __device__ __forceinline__ void ws_store_tile(const ws_args &a, const float *acc, const ws_item &tile, int rA,
                                                     int g, int t4, int64_t M, int64_t N) {
    const int64_t nA = tile.n0 + rA, m0 = (int64_t)tile.mti * BX;
    const bool odd = (g & 1) != 0;
    float b[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
    if (!a.partial) ws_bias_pairs(a, nA, odd, b);
    const bool pair = (N & 1) == 0, gelu = !a.partial && a.e.act == FQ_EPI_GELU_TANH;
    void *yp = a.partial ? (void *)(a.partial + (int64_t)tile.sp * M * N) : a.y;
    const int yt = a.partial ? FQ_F32 : a.y_dtype;
#define WS_EPI(YT, GL, PR) ws_epilogue<BX, YT, GL, PR>(acc, yp, M, N, m0, nA, odd, t4, b)
    if (yt == FQ_BF16 && pair && !gelu) WS_EPI(FQ_BF16, false, true);
    else if (yt == FQ_F16 && pair && !gelu) WS_EPI(FQ_F16, false, true);
    else if (yt == FQ_F32 && pair && !gelu) WS_EPI(FQ_F32, false, true);
    else if (yt == FQ_BF16 && pair) WS_EPI(FQ_BF16, true, true);
    else if (yt == FQ_F16 && pair) WS_EPI(FQ_F16, true, true);
    else if (yt == FQ_F32 && pair) WS_EPI(FQ_F32, true, true);
    else if (yt == FQ_BF16) { if (gelu) WS_EPI(FQ_BF16, true, false); else WS_EPI(FQ_BF16, false, false); }
    else if (yt == FQ_F16) { if (gelu) WS_EPI(FQ_F16, true, false); else WS_EPI(FQ_F16, false, false); }
    else { if (gelu) WS_EPI(FQ_F32, true, false); else WS_EPI(FQ_F32, false, false); }
#undef WS_EPI
}

/* The TS epilogue: the same values as ws_epilogue (lanes g, g ^ 1 swap one value; bias,
 * GELU, one rounding), written as 16-bit pairs into the warpgroup's output tile (row
 * = x row in the tile, 64 W rows of 2 bytes = 128 bytes, 16-byte chunks swizzled with
 * the row's low 3 bits, as the TMA store's SWIZZLE_128B expects: conflict-free here). */
template <int BX, int YT, bool GELU>
static __device__ __forceinline__ void ws_epilogue_smem(const float *acc, uint32_t out, int wl, int g, bool odd,
                                                        int t4, const float (&b)[2][2]) {
#pragma unroll
    for (int j = 0; j < BX / 8; j++) {
        const int m = 8 * j + 2 * t4 + (odd ? 1 : 0);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
            const float r = __shfl_xor_sync(0xffffffffu, odd ? v0 : v1, 4);
            float lo = (odd ? r : v0) + b[h][0], hi = (odd ? v1 : r) + b[h][1];
            if (GELU) {
                lo = ws_gelu(lo);
                hi = ws_gelu(hi);
            }
            uint32_t pk;
            if (YT == FQ_BF16) {
                __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
                memcpy(&pk, &v, 4);
            } else {
                __half2 v = __floats2half2_rn(lo, hi);
                memcpy(&pk, &v, 4);
            }
            const int byte = 2 * (wl * 16 + g + 8 * h - (odd ? 1 : 0));
            const uint32_t addr = out + (uint32_t)m * 128u + ((uint32_t)((byte >> 4) ^ (m & 7)) << 4) + (byte & 15);
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(pk) : "memory");
        }
    }
}

/* A consumer warpgroup's tile through its output tile and one TMA store (TS, tma_y). */
template <int BX>
static __device__ __forceinline__ void ws_store_tile_tma(const ws_args &a, const CUtensorMap *tmy, const float *acc,
                                                         const ws_item &tile, int cw, int rA, int g, int t4,
                                                         uint32_t out) {
    const int lt = threadIdx.x & 127, wl = (lt >> 5);
    const bool odd = (g & 1) != 0;
    float b[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
    ws_bias_pairs(a, tile.n0 + rA, odd, b);
    /* the previous tile's store has read the output tile */
    if (lt == 0) tma_store_wait_read();
    ws_wg_sync(cw);
    const bool gelu = a.e.act == FQ_EPI_GELU_TANH;
    if (a.y_dtype == FQ_BF16) {
        if (gelu) ws_epilogue_smem<BX, FQ_BF16, true>(acc, out, wl, g, odd, t4, b);
        else ws_epilogue_smem<BX, FQ_BF16, false>(acc, out, wl, g, odd, t4, b);
    } else {
        if (gelu) ws_epilogue_smem<BX, FQ_F16, true>(acc, out, wl, g, odd, t4, b);
        else ws_epilogue_smem<BX, FQ_F16, false>(acc, out, wl, g, odd, t4, b);
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); /* visible to the TMA unit */
    ws_wg_sync(cw);
    if (lt == 0) tma_store_2d(tmy, out, tile.n0 + cw * 64, tile.mti * BX);
}

/* Byte t4 (sel = t4 | (t4 + 4) << 4) of each of four words, gathered into one word. */
static __device__ __forceinline__ uint32_t ws_gather4(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3,
                                                      uint32_t sel) {
    return __byte_perm(__byte_perm(w0, w1, sel), __byte_perm(w2, w3, sel), 0x5410);
}

/* code[nibble] from the 16-entry table at shared address tb (256-byte aligned): byte j of
 * the offsets word o (nibble x 4) and the upper bytes of tb make the address in one PRMT.
 * The table is written before the kernel's __syncthreads and never again. */
static __device__ __forceinline__ float ws_code(uint32_t o, uint32_t tb, int j) {
    float v;
    asm("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(__byte_perm(o, tb, 0x7650u | (uint32_t)j)));
    return v;
}

/* Byte j of a word of gathered bytes (H = high nibbles x 4, L = low nibbles x 4): the
 * pair packed as dequantize rounds it, bf16/f16(code[nibble] * am) with mul.rn.ftz. */
template <typename T>
static __device__ __forceinline__ uint32_t ws_dec_pair(uint32_t tb, uint32_t H, uint32_t L, int j, float am) {
    return fq_mma_t<T>::pack(fq_lin4_mul_ftz(ws_code(H, tb, j), am), fq_lin4_mul_ftz(ws_code(L, tb, j), am));
}

/* The fast decode (FAST configurations, bf16 only): the byte of word w that this lane
 * owns (sel = 0x4440 | t4) picks its code pair, already bf16, from the lane's copy of
 * the pair table (tl = table + 4 lane), and one bf16x2 multiply by the bf16 absmax pair
 * scales both: bf16(bf16(code) * bf16(absmax)), the rounding of bitsandbytes' own
 * 4-bit inference kernels rather than dequantize's. */
static __device__ __forceinline__ uint32_t ws_fast_pair(uint32_t tl, uint32_t w, uint32_t sel, uint32_t am2) {
    uint32_t v, r;
    asm("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(__byte_perm(w, 0u, sel) * 128u + tl));
    asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(r) : "r"(v), "r"(am2));
    return r;
}
#endif /* FQ_WS_DEVICE */

template <typename T, int BX, int S, bool NESTED, bool TS, bool FAST>
__global__ void __launch_bounds__(WS_THREADS, 1)
    gemm4_ws_kernel(const __grid_constant__ CUtensorMap tmx, const __grid_constant__ CUtensorMap tmw,
                    const __grid_constant__ CUtensorMap tmy, const ws_args a) {
#ifdef FQ_WS_DEVICE
    typedef ws_cfg<BX, S, TS, FAST> C;
    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = fq_smem_addr(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    uint8_t *sm = smem_raw + (base - raw);
    const uint32_t out_a = base + S * C::STAGE;            /* TS: [2][BX][128 bytes] */
    const uint32_t tbl_a = base + S * C::STAGE + C::OUT; /* FAST: [256][32] code pairs */
    float *am_s = (float *)(sm + S * C::STAGE + C::OUT + C::TBL); /* [S][WS_ROWS] */
    /* the 16 codes at a 256-byte aligned address (ws_dec_pair forms lookups with one PRMT),
     * then the 256 nested codes, then the mbarriers */
    const uint32_t qm_a = base + S * C::STAGE + C::OUT + C::TBL + S * WS_ROWS * 4;
    float *qm_s = (float *)(sm + S * C::STAGE + C::OUT + C::TBL + S * WS_ROWS * 4);
    float *code_s = qm_s + 16;
    const uint32_t full0 = qm_a + (16 + 256) * 4, empty0 = full0 + 8 * S;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t M = a.m, N = a.w.n;
    const int64_t total = (int64_t)a.nt * a.mt * a.splits;

    if (tid < 16) qm_s[tid] = __ldg(&a.w.quant_map[tid]);
    if (NESTED && tid < 256) code_s[tid] = __ldg(&a.w.nested_code[tid]);
    if (tid == 0) {
        for (int s = 0; s < S; s++) {
            mbar_init(full0 + 8 * s, 33); /* the TMA lane + 32 absmax lanes */
            mbar_init(empty0 + 8 * s, 2);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    if (FAST) {
        fq_tbl_build<T>((uint32_t *)(sm + S * C::STAGE + C::OUT), qm_s);
        __syncthreads();
    }

    if (warp < 4) {
        /* ---- producer warpgroup ---- */
        setmaxnreg_dec<56>();
        if (warp == 0) {
            /* one lane issues the two TMA copies of every stage */
            if (lane != 0) return;
            ws_item c = ws_first(a, total);
            while (c.valid) {
                const int st = (int)(c.it % S);
                mbar_wait(empty0 + 8 * st, ((c.it / S) & 1u) ^ 1u);
                const uint32_t full = full0 + 8 * st, xs = base + st * C::STAGE;
                const bool ldw = !WS_PROBE(a, 16), ldx = !WS_PROBE(a, 32);
                mbar_arrive_tx(full, (ldx ? C::X_STAGE : 0) + (ldw ? C::W_STAGE : 0));
                if (ldx) tma_load_2d(xs, &tmx, c.kt * WS_BK, c.mti * BX, full);
                if (ldw) tma_load_2d(xs + C::X_STAGE, &tmw, c.kt * (WS_BK / 2), c.n0, full);
                ws_next(a, total, c);
            }
            return;
        }
        /* warps 1..3: the absmax of the tile's 128 rows, stage it taken by warp
         * 1 + it % 3; the raw values of a warp's next stage are loaded before it
         * waits for the current one, so three to six stages of loads are in flight */
        const int64_t kb = a.w.k >> a.lg2bs; /* absmax blocks per row */
        const bool probe_noabs = WS_PROBE(a, 2);
        auto load_raw = [&](const ws_item &c, uint32_t (&q)[4], float (&v)[4]) {
            const int64_t kk = ((int64_t)c.kt * WS_BK) >> a.lg2bs;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int64_t n = c.n0 + lane + 32 * i;
                q[i] = 0;
                v[i] = 0.0f;
                if (n < N && !probe_noabs) {
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
        ws_item c = ws_first(a, total);
        for (int i = 1; i < warp; i++) ws_next(a, total, c);
        uint32_t q[4], q2[4];
        float v[4], v2[4];
        if (c.valid) load_raw(c, q, v);
        while (c.valid) {
            ws_item nx = c;
            ws_next(a, total, nx);
            ws_next(a, total, nx);
            ws_next(a, total, nx);
            if (nx.valid) load_raw(nx, q2, v2);
            const int st = (int)(c.it % S);
            mbar_wait(empty0 + 8 * st, ((c.it / S) & 1u) ^ 1u);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                /* the nested absmax exactly as dequantize rebuilds it */
                const float am = NESTED ? __fadd_rn(fq_lin4_mul_ftz(code_s[q[i]], v[i]), a.w.offset) : v[i];
                am_s[st * WS_ROWS + lane + 32 * i] = (c.n0 + lane + 32 * i < N) ? am : 0.0f;
            }
            mbar_arrive(full0 + 8 * st);
            c = nx;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                q[i] = q2[i];
                v[i] = v2[i];
            }
        }
        return;
    }

    /* ---- consumers ---- */
    setmaxnreg_inc<224>();
    const int g = lane >> 2, t4 = lane & 3;
    const int cw = (warp >> 2) - 1;               /* consumer warpgroup 0/1 */
    const int rA = cw * 64 + (warp & 3) * 16 + g; /* this lane's W rows in the tile: rA, rA + 8 */
    const bool leader = (tid & 127) == 0;
    const bool probe_nodec = WS_PROBE(a, 1), probe_nomma = WS_PROBE(a, 4);
    float acc[BX / 2];
    int seg = 0; /* WS_STAMP's segment count */
    if (cw == 0) WS_STAMP(a, 0);
    /* Two fragment sets (two K tiles): a K tile's 32 weights per lane are decoded at
     * once, right after its stage is full, while the previous K tile's 4 wgmma groups
     * (and the other warpgroup's) keep the tensor cores busy; after issuing its own 4
     * groups the warpgroup waits until at most 4 are pending, which frees the set and
     * the x stage of the previous K tile. */
    const uint32_t sel = (uint32_t)t4 | (uint32_t)(t4 + 4) << 4;
    const uint32_t fsel = 0x4440u | (uint32_t)t4, tl = tbl_a + 4u * (uint32_t)lane; /* FAST */
    uint32_t af[2][4][4];
    ws_item c = ws_first(a, total);
    /* stage of item c.it, its full-barrier parity, and the previous item's stage, kept
     * as counters (c.it % S and c.it / S cost a division per K tile) */
    uint32_t st = 0, ph = 0, pst = S - 1;
    const uint64_t desc0 = fq_wgmma_desc(base); /* + (stage offset + 32 k16) / 16 below */
    uint32_t sink = 0;                          /* bench probe 4 only */
    while (c.valid) {
        const ws_item tile = c;
        if (cw == 0) WS_STAMP(a, 1 + 4 * seg);
        if (probe_nomma) {
#pragma unroll
            for (int i = 0; i < BX / 2; i++) acc[i] = 0.0f;
        }
        int nk = 0; /* K tiles of this tile so far */
        auto ktile = [&](uint32_t(&f)[4][4]) {
            mbar_wait(full0 + 8 * st, ph);
            const uint8_t *wd = sm + st * C::STAGE + C::X_STAGE;
            const uint4 pa0 = *(const uint4 *)(wd + rA * 32), pa1 = *(const uint4 *)(wd + rA * 32 + 16);
            const uint4 pb0 = *(const uint4 *)(wd + (rA + 8) * 32), pb1 = *(const uint4 *)(wd + (rA + 8) * 32 + 16);
            const float amA = am_s[st * WS_ROWS + rA], amB = am_s[st * WS_ROWS + rA + 8];
            /* the set written below was read by the K tile before the previous one, whose
             * groups retired at the previous K tile's wait */
            if (probe_nodec) { /* bench probe: raw bytes as weights */
                const uint32_t wa[8] = {pa0.x, pa0.y, pa0.z, pa0.w, pa1.x, pa1.y, pa1.z, pa1.w};
                const uint32_t wb[8] = {pb0.x, pb0.y, pb0.z, pb0.w, pb1.x, pb1.y, pb1.z, pb1.w};
#pragma unroll
                for (int s = 0; s < 4; s++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        f[s][2 * h] = wa[2 * s + h] & 0x3f3f3f3fu;
                        f[s][2 * h + 1] = wb[2 * s + h] & 0x3f3f3f3fu;
                    }
            } else if (FAST) {
                /* byte t4 of word w = 2 s + h holds this lane's two weights of k16 step s, half h */
                const uint32_t wa[8] = {pa0.x, pa0.y, pa0.z, pa0.w, pa1.x, pa1.y, pa1.z, pa1.w};
                const uint32_t wb[8] = {pb0.x, pb0.y, pb0.z, pb0.w, pb1.x, pb1.y, pb1.z, pb1.w};
                const uint32_t a2 = fq_mma_t<T>::pack(amA, amA), b2 = fq_mma_t<T>::pack(amB, amB);
#pragma unroll
                for (int s = 0; s < 4; s++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        f[s][2 * h] = ws_fast_pair(tl, wa[2 * s + h], fsel, a2);
                        f[s][2 * h + 1] = ws_fast_pair(tl, wb[2 * s + h], fsel, b2);
                    }
            } else {
                /* byte t4 of word w = 2 s + h holds this lane's two weights of k16 step s, half
                 * h: gathered into G[row][w / 4] byte w % 4, then the nibbles x 4 per byte */
                const uint32_t G[2][2] = {{ws_gather4(pa0.x, pa0.y, pa0.z, pa0.w, sel),
                                           ws_gather4(pa1.x, pa1.y, pa1.z, pa1.w, sel)},
                                          {ws_gather4(pb0.x, pb0.y, pb0.z, pb0.w, sel),
                                           ws_gather4(pb1.x, pb1.y, pb1.z, pb1.w, sel)}};
                uint32_t H[2][2], L[2][2];
#pragma unroll
                for (int r = 0; r < 2; r++)
#pragma unroll
                    for (int i = 0; i < 2; i++) {
                        H[r][i] = (G[r][i] >> 2) & 0x3c3c3c3cu;
                        L[r][i] = (G[r][i] << 2) & 0x3c3c3c3cu;
                    }
#pragma unroll
                for (int s = 0; s < 4; s++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        const int w = 2 * s + h;
                        f[s][2 * h] = ws_dec_pair<T>(qm_a, H[0][w >> 2], L[0][w >> 2], w & 3, amA);
                        f[s][2 * h + 1] = ws_dec_pair<T>(qm_a, H[1][w >> 2], L[1][w >> 2], w & 3, amB);
                    }
            }
            if (!probe_nomma) {
                /* the stage's x tile is 1024-aligned below 2^18: its descriptor is desc0 plus
                 * the offset / 16 in the low field, with no carry out of it */
                const uint64_t xd = desc0 + (uint64_t)((st * C::STAGE) >> 4);
                fq_wgmma_fence();
#pragma unroll
                for (int s = 0; s < 4; s++) {
                    fq_wgmma_rs<T, BX>(acc, f[s][0], f[s][1], f[s][2], f[s][3], xd + 2 * s, (nk > 0 || s > 0) ? 1u : 0u);
                    fq_wgmma_commit();
                }
            } else {
                /* bench probe 4: the fragments go into sink (added to the tile after its K
                 * loop), so that the decode is not dead code, and the warpgroup meets at its
                 * barrier, which the wgmma instructions otherwise do: without it the leader
                 * (whose arrival frees the stage) ran stages ahead of its other warps, and a
                 * warp left two phases behind waited at the end for a phase that never came */
#pragma unroll
                for (int s = 0; s < 4; s++) sink ^= f[s][0] ^ f[s][1] ^ f[s][2] ^ f[s][3];
                ws_wg_sync(cw);
            }
            /* the previous K tile's groups retired: its fragment set and x stage are free (this
             * K tile's 4 groups keep the tensor cores busy while the next one is decoded) */
            fq_wgmma_wait<4>();
            if (nk >= 1 && leader) mbar_arrive(empty0 + 8 * pst);
            pst = st;
            if (++st == (uint32_t)S) {
                st = 0;
                ph ^= 1u;
            }
            nk++;
            ws_next(a, total, c);
            return c.valid && c.t == tile.t;
        };
        /* K tiles alternate between the two fragment sets (registers need static indices) */
        while (ktile(af[0]) && ktile(af[1])) {
        }
        fq_wgmma_wait<0>();
        if (probe_nomma) acc[0] += __uint_as_float(sink & 1u);
        if (leader) mbar_arrive(empty0 + 8 * pst);
        if (cw == 0) WS_STAMP(a, 2 + 4 * seg);
        if (a.streamk && tile.kt > 0) { /* the rest of a tile another CTA owns */
            ws_sk_publish<BX>(a, acc, cw);
            if (cw == 0) WS_STAMP(a, 3 + 4 * seg);
            seg++;
            continue;
        }
        if (a.streamk && tile.kt1 < a.ktiles) ws_sk_collect<BX>(a, acc, tile, cw);
        if (cw == 0) WS_STAMP(a, 3 + 4 * seg);
        if (WS_PROBE(a, 8)) continue;
        if (TS && a.tma_y) ws_store_tile_tma<BX>(a, &tmy, acc, tile, cw, rA, g, t4, out_a + cw * BX * 128);
        else ws_store_tile<BX>(a, acc, tile, rA, g, t4, M, N);
        if (cw == 0) WS_STAMP(a, 4 + 4 * seg);
        seg++;
    }
    if (TS && a.tma_y && (tid & 127) == 0) tma_store_wait_all();
#else
    (void)tmx;
    (void)tmw;
    (void)tmy;
    (void)a;
#endif
}

/* ---- configurations, plan and launch ------------------------------------------------ */

typedef void (*ws_kernel_fn)(const CUtensorMap, const CUtensorMap, const CUtensorMap, const ws_args);
typedef struct {
    int bx, smem, ts;
    ws_kernel_fn fn[2][2]; /* [f16 = 0, bf16 = 1][nested]; NULL: a retired number (or f16 x, fast) */
    const char *name;
} ws_config;

/* the two nestings of one kernel: [plain absmax, nested] */
#define WS_FNS(T, BX, S, TS, FAST) \
    {gemm4_ws_kernel<T, BX, S, false, TS, FAST>, gemm4_ws_kernel<T, BX, S, true, TS, FAST>}
#define WS_CONFIG(BX, S, TS, NAME)                                                                          \
    {BX,                                                                                                    \
     ws_cfg<BX, S, TS, false>::SMEM,                                                                        \
     TS,                                                                                                    \
     {WS_FNS(__half, BX, S, TS, false), WS_FNS(__nv_bfloat16, BX, S, TS, false)},                           \
     NAME}
/* the fast decode (bf16 x only; see ws_fast_pair) */
#define WS_CONFIG_FAST(BX, S, TS, NAME)                                                                     \
    {BX, ws_cfg<BX, S, TS, true>::SMEM, TS, {{NULL, NULL}, WS_FNS(__nv_bfloat16, BX, S, TS, true)}, NAME}
/* a number no longer in use (kept so that the others keep theirs) */
#define WS_RETIRED(NAME) {0, 0, 0, {{NULL, NULL}, {NULL, NULL}}, NAME}

/* x rows per tile (the W tile is 128 rows). 216 = 4608 / 22 (rounded up to a multiple of
 * 8): with N a multiple of 3072 the FLUX M = 4608 GEMMs then have a multiple of 4 x 132 tiles.
 * The automatic plan chooses from ws_auto_ci (ws_plan_for): the "tma-store" ones (fewer stages
 * to make room for the output tiles; 3-7 % faster than their plain versions on the H100) and
 * 128 rows; the others are for benchmarks and tests (216 rows with 7 stages). 6 and 7 were
 * the first version's 4-group loop ("q4", 1.15-1.4x slower at M = 4608), removed in
 * session 10. */
static const ws_config *ws_configs(void) {
    static const ws_config c[FQ_GEMM4_WS_CONFIGS] = {
        WS_CONFIG(256, 6, false, "ws 128x256x64 s6"),
        WS_CONFIG(216, 6, false, "ws 128x216x64 s6"),
        WS_CONFIG(192, 7, false, "ws 128x192x64 s7"),
        WS_CONFIG(128, 10, false, "ws 128x128x64 s10"),
        WS_CONFIG(216, 7, false, "ws 128x216x64 s7"),
        WS_RETIRED("ws 128x216x64 s6 q4 (retired)"),
        WS_RETIRED("ws 128x256x64 s6 q4 (retired)"),
        WS_CONFIG(216, 5, true, "ws 128x216x64 s5 tma-store"),
        WS_CONFIG(256, 4, true, "ws 128x256x64 s4 tma-store"),
        WS_CONFIG(192, 6, true, "ws 128x192x64 s6 tma-store"),
        WS_CONFIG_FAST(216, 4, true, "ws 128x216x64 s4 tma-store fast"),
        WS_CONFIG_FAST(256, 3, true, "ws 128x256x64 s3 tma-store fast"),
        WS_CONFIG_FAST(192, 5, true, "ws 128x192x64 s5 tma-store fast"),
        WS_CONFIG_FAST(128, 9, false, "ws 128x128x64 s9 fast"),
    };
    return c;
}

static PFN_cuTensorMapEncodeTiled_v12000 g_encode; /* process-wide driver entry point (same on every device) */

extern "C" int fq_cuda_gemm4_ws_built(void) { return 1; }

extern "C" int fq_cuda_gemm4_ws_prepare(void) {
    if (!g_encode) {
        void *fn = NULL;
        enum cudaDriverEntryPointQueryResult q;
        cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q);
        if (e != cudaSuccess) return (int)e;
        if (q != cudaDriverEntryPointSuccess || !fn) return (int)cudaErrorNotSupported;
        g_encode = (PFN_cuTensorMapEncodeTiled_v12000)fn;
    }
    const ws_config *c = ws_configs();
    for (int i = 0; i < FQ_GEMM4_WS_CONFIGS; i++)
        for (int t = 0; t < 2; t++)
            for (int n = 0; n < 2 && c[i].fn[t][n]; n++) {
                cudaError_t e =
                    cudaFuncSetAttribute(c[i].fn[t][n], cudaFuncAttributeMaxDynamicSharedMemorySize, c[i].smem);
                if (e != cudaSuccess) return (int)e;
            }
    return (int)cudaSuccess;
}

/* FQ_WS_PROBE=n (bench only, builds with FQ_WS_PROBES; the results are then WRONG): see
 * ws_args.probe. */
static int ws_probe(void) {
#ifdef FQ_WS_PROBES
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("FQ_WS_PROBE");
        v = e ? atoi(e) & 127 : 0;
    }
    return v;
#else
    return 0;
#endif
}

static int64_t ws_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

typedef struct {
    int ci, splits, kps, streamk;
} ws_plan;

#define WS_CFG_STREAMK 15 /* cfg bits 4..7: stream-K instead of a K split */

/* cfg names an existing tile configuration, not a retired one (or 0, the plan's choice) */
static bool ws_cfg_ok(int cfg) {
    const int ci = (cfg & 15) - 1;
    return ci < FQ_GEMM4_WS_CONFIGS && (ci < 0 || ws_configs()[ci].fn[1][0] != NULL);
}

/* cfg: low 4 bits = tile configuration (0 = choose), bits 4..7 = K splits (0 = choose,
 * WS_CFG_STREAMK = stream-K). Cost model (relative time, fitted to H100 runs): rounds
 * of persistent tiles x (x rows of a tile + ~128 for the per-K-tile decode and W load)
 * x (K tiles + ~3 for the fill and epilogue), plus the split-K partials written and
 * read again. Stream-K: each CTA's share of K tiles, ~3 per segment, and a partial
 * written and read per CTA. */
static ws_plan ws_plan_for(const fq_lin4_weight *w, const fq_lin4_io *io, int sm_count, int cfg) {
    const int64_t sms = sm_count > 0 ? sm_count : 132;
    const int64_t ktiles = w->k / WS_BK;
    const int want_ci = (cfg & 15) - 1;
    int want_splits = (cfg >> 4) & 15;
    ws_plan best = {0, 1, (int)ktiles, 0};
    double best_cost = -1;
    /* automatic: 256/216/192 x rows with the TMA-stored output, 128 rows (H100, session 6);
     * with FQ_GEMM4_WS_FAST_OK and bf16 x the same tiles with the fast decode (one stage
     * fewer for the pair table; session 13) */
    static const int ws_auto_ci[2][WS_AUTO_CONFIGS] = {{8, 7, 9, 3}, {11, 10, 12, 13}};
    const int fast = (cfg & FQ_GEMM4_WS_FAST_OK) && io->x_dtype == FQ_BF16;
    for (int ai = 0; ai < (want_ci >= 0 ? 1 : WS_AUTO_CONFIGS); ai++) {
        const int ci = want_ci >= 0 ? want_ci : ws_auto_ci[fast][ai];
        const int64_t bx = ws_configs()[ci].bx, mt = ws_cdiv(io->m, bx);
        const int64_t tiles = ws_cdiv(w->n, WS_ROWS) * mt;
        /* stream-K: chosen automatically for one or two x tiles only - with more, a CTA's
         * run of consecutive tiles no longer shares x tiles with the CTAs beside it in L2
         * (3072x12288, M = 4608: 0.50x against 0.68x for the same tiles per CTA) */
        if (want_splits == WS_CFG_STREAMK || (want_splits == 0 && mt <= 2)) {
            const int64_t units = tiles * ktiles, grid = units < sms ? units : sms;
            const int64_t share = ws_cdiv(units, grid), segs = ws_cdiv(share, ktiles) + 1;
            /* + the partial written per CTA and the owner's sequential adds of its tile's
             * partials (fitted: 3072x12288 at M = 256 has 6 per tile and loses to a split) */
            const double cost = (double)(bx + 128) * (double)(share + 3 * segs) + 8.0 * (double)bx +
                                2.0 * (double)bx * (double)ws_cdiv(ktiles, share);
            if (best_cost < 0 || cost < best_cost) {
                best_cost = cost;
                best.ci = ci;
                best.splits = 1;
                best.kps = (int)ktiles;
                best.streamk = 1;
            }
        }
        if (want_splits == WS_CFG_STREAMK) continue;
        for (int64_t splits = 1; splits <= 8; splits++) {
            if (want_splits > 0 && splits != want_splits) continue;
            if (want_splits == 0 && splits > 1 && tiles * (splits - 1) >= sms) break;
            if (splits > ktiles) break;
            const int64_t kps = ws_cdiv(ktiles, splits), sp = ws_cdiv(ktiles, kps);
            const int64_t rounds = ws_cdiv(tiles * sp, sms);
            double cost = (double)rounds * (double)(bx + 128) * (double)(kps + 3);
            /* partials: sp * m * n f32 written + read, against ~1 row-K-tile unit per 16 KB per SM */
            if (sp > 1) cost += (double)sp * io->m * w->n * 8.0 / 16384.0 / (double)sms * 128.0;
            if (best_cost < 0 || cost < best_cost) {
                best_cost = cost;
                best.ci = ci;
                best.splits = (int)sp;
                best.kps = (int)kps;
                best.streamk = 0;
            }
        }
    }
    return best;
}

/* Bytes of f32 workspace plan p needs (0: none). */
static size_t ws_plan_bytes(const ws_plan &p, const fq_lin4_weight *w, const fq_lin4_io *io, int sm_count) {
    if (p.streamk) {
        const int64_t sms = sm_count > 0 ? sm_count : 132;
        return (size_t)sms * WS_ROWS * (size_t)ws_configs()[p.ci].bx * sizeof(float);
    }
    return p.splits > 1 ? (size_t)p.splits * (size_t)io->m * (size_t)w->n * sizeof(float) : 0;
}

extern "C" size_t fq_cuda_gemm4_ws_workspace(const fq_lin4_weight *w, const fq_lin4_io *io, int sm_count, int cfg) {
    if (!fq_cuda_gemm4_ws_supported(w, io) || io->m <= 0 || !ws_cfg_ok(cfg)) return 0;
    return ws_plan_bytes(ws_plan_for(w, io, sm_count, cfg), w, io, sm_count);
}

static int ws_encode(CUtensorMap *map, CUtensorMapDataType dt, void *ptr, uint64_t inner, uint64_t outer,
                     uint64_t stride_bytes, uint32_t box_inner, uint32_t box_outer, CUtensorMapSwizzle swz) {
    const cuuint64_t dims[2] = {inner, outer}, strides[1] = {stride_bytes};
    const cuuint32_t box[2] = {box_inner, box_outer}, estr[2] = {1, 1};
    CUresult r = g_encode(map, dt, 2, ptr, dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE, swz,
                          CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return r == CUDA_SUCCESS ? (int)cudaSuccess : (int)cudaErrorInvalidValue;
}

extern "C" int fq_cuda_gemm4_ws(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                                int sm_count, int cfg, float *ws, size_t ws_bytes, int *flags, cudaStream_t stream) {
    if (!fq_cuda_gemm4_ws_supported(w, io) || !ws_cfg_ok(cfg)) return (int)cudaErrorInvalidValue;
    if (!g_encode) return (int)cudaErrorInitializationError; /* fq_cuda_gemm4_ws_prepare not called */
    if (io->m <= 0) return (int)cudaSuccess;
    const int64_t sms = sm_count > 0 ? sm_count : 132;
    ws_plan p = ws_plan_for(w, io, sm_count, cfg);
    const size_t need = ws_plan_bytes(p, w, io, sm_count);
    if ((p.splits > 1 || p.streamk) && (!ws || ws_bytes < need || (p.streamk && (!flags || sms > FQ_GEMM4_WS_MAX_SMS)))) {
        p.splits = 1;
        p.kps = (int)(w->k / WS_BK);
        p.streamk = 0;
    }
    const ws_config *c = &ws_configs()[p.ci];
    CUtensorMap tmx, tmw;
    int rc = ws_encode(&tmx, io->x_dtype == FQ_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                       (void *)io->x, (uint64_t)w->k, (uint64_t)io->m, (uint64_t)w->k * 2, WS_BK, (uint32_t)c->bx,
                       CU_TENSOR_MAP_SWIZZLE_128B);
    if (!rc)
        rc = ws_encode(&tmw, CU_TENSOR_MAP_DATA_TYPE_UINT8, (void *)w->packed, (uint64_t)w->k / 2, (uint64_t)w->n,
                       (uint64_t)w->k / 2, WS_BK / 2, WS_ROWS, CU_TENSOR_MAP_SWIZZLE_NONE);
    if (rc) return rc;
    /* TS configurations store y (bf16/f16) with TMA when nothing is split and its rows
     * are 16-byte aligned; otherwise (and in the other configurations) tmy is unused */
    CUtensorMap tmy;
    memset(&tmy, 0, sizeof tmy);
    const int tma_y = c->ts && p.splits == 1 && (io->y_dtype == FQ_BF16 || io->y_dtype == FQ_F16) && w->n % 8 == 0 &&
                      ((uintptr_t)io->y & 15) == 0;
    if (tma_y) {
        rc = ws_encode(&tmy, io->y_dtype == FQ_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                       io->y, (uint64_t)w->n, (uint64_t)io->m, (uint64_t)w->n * 2, 64, (uint32_t)c->bx,
                       CU_TENSOR_MAP_SWIZZLE_128B);
        if (rc) return rc;
    }
    ws_args a;
    memset(&a, 0, sizeof a);
    a.w = *w;
    a.y = io->y;
    a.y_dtype = io->y_dtype;
    a.lg2bs = fq_log2i(w->blocksize);
    a.m = io->m;
    a.e = *e;
    a.partial = p.splits > 1 ? ws : NULL;
    a.ktiles = (int)(w->k / WS_BK);
    a.kps = p.kps;
    a.nt = (int)ws_cdiv(w->n, WS_ROWS);
    a.mt = (int)ws_cdiv(io->m, c->bx);
    a.splits = p.splits;
    a.probe = ws_probe();
    a.tma_y = tma_y;
    const int64_t total = (int64_t)a.nt * a.mt * a.splits;
    unsigned grid = (unsigned)(total < sms ? total : sms);
    const ws_kernel_fn fn = c->fn[io->x_dtype == FQ_BF16 ? 1 : 0][w->nested ? 1 : 0];
    if (!fn) return (int)cudaErrorInvalidValue; /* a fast configuration with f16 x */
    cudaError_t err;
    if (p.streamk) {
        a.streamk = 1;
        a.units = total * a.ktiles;
        a.sk_part = ws;
        a.sk_flag = flags;
        grid = (unsigned)(a.units < sms ? a.units : sms);
        /* cooperative: every CTA resident at once, or the launch fails (owners wait for
         * later CTAs' partials) */
        cudaLaunchConfig_t lc = {};
        cudaLaunchAttribute at[1];
        at[0].id = cudaLaunchAttributeCooperative;
        at[0].val.cooperative = 1;
        lc.gridDim = dim3(grid);
        lc.blockDim = dim3(WS_THREADS);
        lc.dynamicSmemBytes = (size_t)c->smem;
        lc.stream = stream;
        lc.attrs = at;
        lc.numAttrs = 1;
        err = cudaLaunchKernelEx(&lc, fn, tmx, tmw, tmy, a);
        if (err == cudaSuccess) err = cudaGetLastError();
        return (int)err;
    }
    fn<<<grid, WS_THREADS, c->smem, stream>>>(tmx, tmw, tmy, a);
    err = cudaGetLastError();
    if (err != cudaSuccess || p.splits == 1) return (int)err;
    return fq_cuda_lin4_splitk_reduce(ws, p.splits, io, w->n, e, stream);
}

extern "C" int fq_cuda_gemm4_ws_streamk(const fq_lin4_weight *w, const fq_lin4_io *io, int sm_count, int cfg) {
    if (!fq_cuda_gemm4_ws_supported(w, io) || io->m <= 0 || !ws_cfg_ok(cfg)) return 0;
    return ws_plan_for(w, io, sm_count, cfg).streamk;
}

extern "C" const char *fq_cuda_gemm4_ws_config_name(int cfg) {
    const int ci = (cfg & 15) - 1;
    return ci >= 0 && ci < FQ_GEMM4_WS_CONFIGS ? ws_configs()[ci].name : "auto";
}

#else /* !FQ_BUILD_SM90A: built without architecture 90 */

extern "C" int fq_cuda_gemm4_ws_built(void) { return 0; }
extern "C" int fq_cuda_gemm4_ws_prepare(void) { return (int)cudaSuccess; }
extern "C" size_t fq_cuda_gemm4_ws_workspace(const fq_lin4_weight *w, const fq_lin4_io *io, int sm_count, int cfg) {
    (void)w; (void)io; (void)sm_count; (void)cfg;
    return 0;
}
extern "C" int fq_cuda_gemm4_ws(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                                int sm_count, int cfg, float *ws, size_t ws_bytes, int *flags, cudaStream_t stream) {
    (void)w; (void)io; (void)e; (void)sm_count; (void)cfg; (void)ws; (void)ws_bytes; (void)flags; (void)stream;
    return (int)cudaErrorNotSupported;
}
extern "C" int fq_cuda_gemm4_ws_streamk(const fq_lin4_weight *w, const fq_lin4_io *io, int sm_count, int cfg) {
    (void)w; (void)io; (void)sm_count; (void)cfg;
    return 0;
}
extern "C" const char *fq_cuda_gemm4_ws_config_name(int cfg) {
    (void)cfg;
    return "not built";
}
#endif

/* Limits: K < 2^31 elements (int tile coordinates), M < 2^31, TMA strides < 2^40. */
/* The probe-64 timeline (FQ_WS_PROBE=64, probe builds): n entries of
 * [FQ_GEMM4_WS_MAX_SMS][WS_STAMPS] global-timer ns into out, or (out NULL) all set to 0;
 * elsewhere cudaErrorNotSupported. */
extern "C" int fq_cuda_gemm4_ws_stamps(unsigned long long *out, int n) {
#ifdef FQ_WS_PROBES
    if (n < 0 || n > FQ_GEMM4_WS_MAX_SMS * WS_STAMPS) return (int)cudaErrorInvalidValue;
    if (!out) {
        static const unsigned long long zero[FQ_GEMM4_WS_MAX_SMS * WS_STAMPS] = {0};
        return (int)cudaMemcpyToSymbol(g_ws_stamps, zero, sizeof zero);
    }
    return (int)cudaMemcpyFromSymbol(out, g_ws_stamps, (size_t)n * sizeof *out);
#else
    (void)out;
    (void)n;
    return (int)cudaErrorNotSupported;
#endif
}

extern "C" int fq_cuda_gemm4_ws_supported(const fq_lin4_weight *w, const fq_lin4_io *io) {
    const int xt = io->x_dtype, yt = io->y_dtype;
    return fq_cuda_gemm4_ws_built() && (xt == FQ_BF16 || xt == FQ_F16) &&
           (yt == FQ_BF16 || yt == FQ_F16 || yt == FQ_F32) && w->blocksize >= 64 && w->k >= WS_BK &&
           w->k % w->blocksize == 0 && w->k < ((int64_t)1 << 30) && io->m < ((int64_t)1 << 31) && w->n >= 1 &&
           ((uintptr_t)io->x & 15) == 0 && ((uintptr_t)w->packed & 15) == 0 && w->quant_map != NULL &&
           (w->nested ? w->nested_code != NULL : 1);
}

/* gemv4_bulk: an M <= 2 4-bit GEMV for sm_90 that streams the weight through
 * shared memory with the copy engine.
 *
 * Loads. A block is 8 consumer warps and one producer warp. The block owns a run
 * of consecutive 16-row tiles of W and streams them through a ring of stages (4 with
 * one x row, 3 with two), each 16 rows x up to 512 bytes of a row (one tile, one K
 * piece) plus the matching piece of x. The producer issues one bulk copy
 * (cp.async.bulk) per row and x row, completing on the stage's "full" mbarrier;
 * consumers arrive on its "empty" mbarrier once they hold the bytes in registers.
 * The producer also asks L2 for the block's whole range at start
 * (cp.async.bulk.prefetch.L2; automatic choice). The weight and x are read only
 * after griddepcontrol.wait (an earlier kernel in the stream may have written
 * them); only the L2 prefetches, which cannot return stale data, go out before.
 * Two blocks fit per SM, so with programmatic dependent launch the next call's
 * blocks start (table, prefetches) while this call streams.
 *
 * Decode. Consumer warp w takes chunk w of a stage (64 bytes of each of the 16
 * rows = 128 elements); lane (g = lane/4, t = lane%4) reads the 16 bytes [16t,
 * 16t+16) of rows g and g+8: 32 consecutive elements, inside one absmax block
 * (blocksize >= 32). MMA step s (0..7) takes byte 2s of both rows (elements 4s,
 * 4s+1 -> A slots 2t, 2t+1) and byte 2s+1 (4s+2, 4s+3 -> slots 2t+8, 2t+9); so
 * the 4 k slots of lane t in an MMA are elements of lane t's own range. x is the
 * B operand with column n = 2t + m holding x row m in lane t's slots and zero
 * elsewhere. Then the accumulator C[g][2t + m] that lane (g, t) receives is
 * exactly the partial sum of its own 32 elements of row g with x row m (and
 * C[g+8][...] for row g+8): a sum inside one absmax block, per lane.
 *  - fast decode: A = the code values in x's 16-bit type (one table lookup per
 *    byte: LDS.32 of the packed pair), absmax applied to each lane's partial sum
 *    in f32 after the MMAs (acc += absmax * C). The weight's only rounding is the
 *    code's to bf16/f16.
 *  - exact decode: A = round(code * absmax) in f32 with ftz, rounded once to x's
 *    type, the nested absmax rebuilt with dequantize's two roundings: the weight
 *    values are bit-identical to what dequantize_4bit writes.
 * The 16-row partials of the 8 warps are added in a fixed order (shuffles over t,
 * then warps 0..7 through shared memory): results do not depend on timing.
 *
 * Measured (H100, bench/results/bench_linear_gemv_h100_2026-11-27.txt): fastest
 * on small weights (3072x3072, 3072x4096), 12-18 % behind gemv4_tc on the large
 * FLUX shapes. Its loads-only probe (cfg 3, no decode) streams only ~1.4 TB/s,
 * about 10 GB/s per SM whatever the prefetch distance or the blocks per SM: our
 * reading (not profiled) is that 16 copies of 512 bytes per stage are too small
 * for the copy engine, so the next step is copies of >= 2-4 KB (16 rows x 2 KB
 * stages, one block per SM); see docs/linear-cuda.md. */
#include "kernels/cuda/lin4_common.cuh"

#define BK_WARPS 8                   /* consumer warps                                   */
#define BK_THREADS (BK_WARPS * 32 + 32)
#define BK_SB 512                    /* bytes of a row per stage                         */
#define BK_PITCH (BK_SB + 64)        /* row pitch in a stage: rows g, g+1 hit other banks */
#define BK_WBYTES (16 * BK_PITCH)    /* the W rows of a stage; x rows follow (4 * BK_SB bytes each) */
#define BK_SMAX 4                    /* stages: 4 with one x row, 3 with two             */
#define BK_TBL (256 * 256)           /* entry b at b * 256: f32 pairs [0, 128), 16-bit pairs [128, 256) */
#define BK_RED_FLOATS (2 * BK_WARPS * 16 * 2)
#define BK_RING (BK_SMAX * (BK_WBYTES + 4 * BK_SB))
#define BK_SMEM (BK_TBL + BK_RING + (256 + 16 + BK_RED_FLOATS) * 4 + 2 * BK_SMAX * 8)

typedef struct {
    fq_lin4_weight w;
    const void *x; /* [m, k] */
    void *y;       /* [m, n] */
    int y_dtype;
    int m;         /* 1 or 2 */
    fq_lin4_epilogue e;
    int lg2bs;
    int tpc;       /* tiles per block */
    int pf;        /* L2 prefetch distance in stages beyond the ring (-1: the block's whole range at start) */
    int64_t tiles;
} bk_args;

/* True when the build has sm_90 code for this file (the kernel needs the copy engine). */
static constexpr bool bk_arch_ok() {
#ifdef __CUDA_ARCH_LIST__
    constexpr int l[] = {__CUDA_ARCH_LIST__};
    for (int v : l)
        if (v >= 900) return true;
    return false;
#else
    return false;
#endif
}


/* DEC: 0 fast, 1 exact, 2 loads only (a bench probe of the streaming: wrong results). */
template <typename T, bool NESTED, int DEC>
__global__ void __launch_bounds__(BK_THREADS, 2) gemv4_bulk_kernel(bk_args a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr bool EXACT = DEC == 1;
    extern __shared__ __align__(128) uint8_t sm[];
    uint8_t *ring = sm + BK_TBL;
    float *code_s = (float *)(ring + BK_RING);
    float *qm_s = code_s + 256;
    float *red = qm_s + 16; /* [2][warp][16 rows][2 m] */
    uint64_t *full = (uint64_t *)(red + BK_RED_FLOATS);
    uint64_t *empty = full + BK_SMAX;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t N = a.w.n, K = a.w.k, rowb = K >> 1;
    const int M = a.m;
    const int S = M > 1 ? 3 : 4;                             /* stages in the ring */
    const uint32_t stage_bytes = BK_WBYTES + (uint32_t)M * 4 * BK_SB; /* W rows, then x rows */
    const int nks = (int)((rowb + BK_SB - 1) / BK_SB); /* stages per tile */
    const int64_t tile0 = (int64_t)blockIdx.x * a.tpc;
    const int64_t tile1 = min(tile0 + a.tpc, a.tiles);
    const int nst = (int)(tile1 - tile0) * nks;

    /* let the next kernel's blocks start as ours run (they wait for our results) */
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    if (tid == 0) {
        for (int s = 0; s < S; s++) {
            fq_mbar_init(&full[s], 1);
            fq_mbar_init(&empty[s], BK_WARPS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (warp == BK_WARPS) {
        /* ---- producer ---- */
        auto stage_src = [&](int i, int64_t &r0, int &rows, int64_t &kb0, uint32_t &len) {
            const int64_t tile = tile0 + i / nks;
            kb0 = (int64_t)(i % nks) * BK_SB;
            len = (uint32_t)min((int64_t)BK_SB, rowb - kb0);
            r0 = tile * 16;
            rows = (int)min((int64_t)16, N - r0);
        };
        auto prefetch_stage = [&](int i) {
            if (i >= nst) return;
            int64_t r0, kb0;
            int rows;
            uint32_t len;
            stage_src(i, r0, rows, kb0, len);
            if (lane < rows) fq_bulk_prefetch_l2(a.w.packed + (r0 + lane) * rowb + kb0, len);
        };
        /* hints before the wait: the absmax state of the block's rows, the first stages */
        if (lane == 31) {
            const int64_t kb = K >> a.lg2bs, es = NESTED ? 1 : 4;
            const char *base = NESTED ? (const char *)a.w.qabsmax : (const char *)a.w.absmax;
            const int64_t q0 = (tile0 * 16 * kb * es) & ~(int64_t)15;
            const int64_t q1 = (min(tile1 * 16, N) * kb * es + 15) & ~(int64_t)15;
            fq_bulk_prefetch_l2(base + q0, (uint32_t)(q1 - q0));
        }
        const int ahead = a.pf < 0 ? nst : S + a.pf;
        for (int i = 0; i < ahead && i < nst; i++) prefetch_stage(i);
        asm volatile("griddepcontrol.wait;\n" ::: "memory");
        int s = 0;
        uint32_t ph = 0;
        for (int i = 0; i < nst; i++) {
            if (i >= S) fq_mbar_wait(&empty[s], ph ^ 1);
            int64_t r0, kb0;
            int rows;
            uint32_t len;
            stage_src(i, r0, rows, kb0, len);
            /* x: elements [2 kb0, 2 kb0 + 2 len) of each row, 4 len bytes */
            if (lane == 0) fq_mbar_arrive_tx(&full[s], len * (uint32_t)rows + (uint32_t)M * 4 * len);
            __syncwarp();
            uint8_t *st = ring + s * stage_bytes;
            if (lane < rows) fq_bulk_g2s(st + lane * BK_PITCH, a.w.packed + (r0 + lane) * rowb + kb0, len, &full[s]);
            else if (lane >= 16 && lane < 16 + M)
                fq_bulk_g2s(st + BK_WBYTES + (lane - 16) * 4 * BK_SB,
                        (const uint8_t *)a.x + ((int64_t)(lane - 16) * K + 2 * kb0) * 2, 4 * len, &full[s]);
            if (a.pf >= 0) prefetch_stage(i + ahead);
            if (++s == S) {
                s = 0;
                ph ^= 1;
            }
        }
        return;
    }

    /* ---- consumers ---- */
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    if (tid < 16) qm_s[tid] = __ldg(&a.w.quant_map[tid]);
    if (NESTED) code_s[tid] = __ldg(&a.w.nested_code[tid]);
    asm volatile("bar.sync 1, %0;\n" ::"n"(BK_WARPS * 32) : "memory");
    {
        const int b = tid; /* one byte value per thread */
        const float lo = qm_s[b >> 4], hi = qm_s[b & 15];
        uint4 vv;
        if (EXACT) { /* 16 copies of the f32 pair: lane l reads copy l % 16 */
            vv = make_uint4(__float_as_uint(lo), __float_as_uint(hi), __float_as_uint(lo), __float_as_uint(hi));
        } else { /* 32 copies of the packed pair: lane l reads copy l */
            const uint32_t v = fq_mma_t<T>::pack(lo, hi);
            vv = make_uint4(v, v, v, v);
        }
        uint4 *dst = (uint4 *)(sm + b * 256 + (EXACT ? 0 : 128));
#pragma unroll
        for (int j = 0; j < 8; j++) dst[(j + b) & 7] = vv;
    }
    asm volatile("bar.sync 1, %0;\n" ::"n"(BK_WARPS * 32) : "memory");

    const int g = lane >> 2, t = lane & 3;
    const uint32_t tl = EXACT ? (uint32_t)(lane & 15) * 8 : 128u + (uint32_t)lane * 4;
    /* this lane feeds B column g = 2t' + m: x row m in the slots of lane t' */
    const bool xl = (g >> 1) == t && (g & 1) < M;
    const uint32_t xoff = BK_WBYTES + (uint32_t)(g & 1) * 4 * BK_SB + (uint32_t)warp * 256 + 64u * (uint32_t)t;
    const uint32_t woff = (uint32_t)warp * 64 + 16u * (uint32_t)t + (uint32_t)g * BK_PITCH;
    const uint32_t kb = (uint32_t)(K >> a.lg2bs); /* absmax blocks per row */

    auto dec = [&](uint32_t wd, int j, float am) -> uint32_t {
        const uint32_t off = __byte_perm(tl, wd, 0x1140u + ((uint32_t)j << 4)); /* byte * 256 + tl */
        if (EXACT) {
            const float2 p = *(const float2 *)(sm + off);
            return fq_mma_t<T>::pack(fq_lin4_mul_ftz(p.x, am), fq_lin4_mul_ftz(p.y, am));
        } else {
            return *(const uint32_t *)(sm + off);
        }
    };
    /* raw absmax state of stage i for this lane (rows g, g+8 of its chunk); block
     * indices fit 32 bits (checked by the launcher) */
    auto ld_am = [&](int i, uint32_t &qa, uint32_t &qb, float &va, float &vb) {
        qa = qb = 0;
        va = vb = 0.0f;
        if (DEC == 2 || i >= nst) return;
        const int64_t tile = tile0 + i / nks;
        const uint32_t c = (uint32_t)(i % nks) * (BK_SB / 64) + (uint32_t)warp; /* chunk of the row */
        if ((int64_t)c * 64 >= rowb) return;
        const uint32_t ra = (uint32_t)min(tile * 16 + g, N - 1), rb = (uint32_t)min(tile * 16 + g + 8, N - 1);
        const uint32_t kbl = (c * 128u + 32u * (uint32_t)t) >> a.lg2bs;
        const uint32_t ba = ra * kb + kbl, bb = rb * kb + kbl;
        if (NESTED) {
            qa = __ldg(&a.w.qabsmax[ba]);
            qb = __ldg(&a.w.qabsmax[bb]);
            va = __ldg(&a.w.nested_absmax[ba >> 8]);
            vb = __ldg(&a.w.nested_absmax[bb >> 8]);
        } else {
            va = __ldg(&a.w.absmax[ba]);
            vb = __ldg(&a.w.absmax[bb]);
        }
    };

    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float acc2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int s = 0;
    uint32_t ph = 0;
    /* Stage i: its absmax state was loaded two stages earlier into the set (q, v)
     * given, which is then reloaded for stage i + 2; the loop runs two stages per
     * turn with two sets, so no register is copied while its load is in flight. */
    auto step = [&](int i, uint32_t &qa, uint32_t &qb, float &va, float &vb) {
        const int ks = i % nks;
        const bool kin = ((int64_t)ks * (BK_SB / 64) + warp) * 64 < rowb; /* warp-uniform */
        fq_mbar_wait(&full[s], ph);
        const uint8_t *st = ring + s * stage_bytes;
        if (kin) {
            uint4 xv[4];
#pragma unroll
            for (int j = 0; j < 4; j++) xv[j] = xl ? *(const uint4 *)(st + xoff + 16 * j) : make_uint4(0, 0, 0, 0);
            const uint4 wa = *(const uint4 *)(st + woff);
            const uint4 wb = *(const uint4 *)(st + woff + 8 * BK_PITCH);
            __syncwarp();
            if (lane == 0) fq_mbar_arrive(&empty[s]); /* the stage's bytes are in registers now */
            if (DEC == 2) {
                acc[0] += __uint_as_float((wa.x ^ wa.y ^ wa.z ^ wa.w ^ wb.x ^ xv[0].x) & 0x3fffffffu);
            } else {
                float amA, amB;
                if (NESTED) {
                    amA = __fadd_rn(fq_lin4_mul_ftz(code_s[qa], va), a.w.offset);
                    amB = __fadd_rn(fq_lin4_mul_ftz(code_s[qb], vb), a.w.offset);
                } else {
                    amA = va;
                    amB = vb;
                }
                const uint32_t wA[4] = {wa.x, wa.y, wa.z, wa.w};
                const uint32_t wB[4] = {wb.x, wb.y, wb.z, wb.w};
                float ce[4] = {0.0f, 0.0f, 0.0f, 0.0f}, co[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int st8 = 0; st8 < 8; st8++) {
                    const int j = (st8 & 1) * 2;
                    const uint32_t a0 = dec(wA[st8 >> 1], j, amA);
                    const uint32_t a2 = dec(wA[st8 >> 1], j + 1, amA);
                    const uint32_t a1 = dec(wB[st8 >> 1], j, amB);
                    const uint32_t a3 = dec(wB[st8 >> 1], j + 1, amB);
                    const uint4 &xq = xv[st8 >> 1];
                    const uint32_t b0 = (st8 & 1) ? xq.z : xq.x, b1 = (st8 & 1) ? xq.w : xq.y;
                    if (EXACT) fq_mma16816<T>((st8 & 1) ? acc2 : acc, a0, a1, a2, a3, b0, b1);
                    else fq_mma16816<T>((st8 & 1) ? co : ce, a0, a1, a2, a3, b0, b1);
                }
                if (!EXACT) {
                    acc[0] = fmaf(amA, ce[0] + co[0], acc[0]);
                    acc[1] = fmaf(amA, ce[1] + co[1], acc[1]);
                    acc[2] = fmaf(amB, ce[2] + co[2], acc[2]);
                    acc[3] = fmaf(amB, ce[3] + co[3], acc[3]);
                }
            }
        } else {
            __syncwarp();
            if (lane == 0) fq_mbar_arrive(&empty[s]);
        }
        ld_am(i + 2, qa, qb, va, vb);
        if (++s == S) {
            s = 0;
            ph ^= 1;
        }
        if (ks == nks - 1) {
            /* the tile is done: sum over t (lanes), then over warps in order */
            const int64_t tile = tile0 + i / nks;
            float v[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                v[j] = acc[j] + acc2[j];
                v[j] += __shfl_xor_sync(0xffffffffu, v[j], 1);
                v[j] += __shfl_xor_sync(0xffffffffu, v[j], 2);
                acc[j] = acc2[j] = 0.0f;
            }
            float *rb = red + ((i / nks) & 1) * (BK_WARPS * 32);
            if (t == 0) {
                rb[warp * 32 + g * 2 + 0] = v[0];
                rb[warp * 32 + g * 2 + 1] = v[1];
                rb[warp * 32 + (g + 8) * 2 + 0] = v[2];
                rb[warp * 32 + (g + 8) * 2 + 1] = v[3];
            }
            asm volatile("bar.sync 1, %0;\n" ::"n"(BK_WARPS * 32) : "memory");
            if (tid < 32) {
                const int r = tid >> 1, m = tid & 1;
                const int64_t n = tile * 16 + r;
                if (m < M && n < N) {
                    float sum = rb[r * 2 + m];
#pragma unroll
                    for (int w = 1; w < BK_WARPS; w++) sum += rb[w * 32 + r * 2 + m];
                    fq_stf(a.y, a.y_dtype, (int64_t)m * N + n, fq_epi(a.e, n, sum));
                }
            }
        }
    };
    uint32_t qa0, qb0, qa1, qb1;
    float va0, vb0, va1, vb1;
    ld_am(0, qa0, qb0, va0, vb0);
    ld_am(1, qa1, qb1, va1, vb1);
    for (int i = 0; i < nst; i += 2) {
        step(i, qa0, qb0, va0, vb0);
        if (i + 1 < nst) step(i + 1, qa1, qb1, va1, vb1);
    }
#else
    (void)a;
    __trap(); /* never launched: the host checks the build (bk_arch_ok) and the device */
#endif
}

typedef void (*bk_fn)(bk_args);
/* [bf16 = 0, f16 = 1][decode: fast, exact][nested]; the loads-only probe: bf16 only */
static const bk_fn g_bk_fns[2][2][2] = {
    {{gemv4_bulk_kernel<__nv_bfloat16, false, 0>, gemv4_bulk_kernel<__nv_bfloat16, true, 0>},
     {gemv4_bulk_kernel<__nv_bfloat16, false, 1>, gemv4_bulk_kernel<__nv_bfloat16, true, 1>}},
    {{gemv4_bulk_kernel<__half, false, 0>, gemv4_bulk_kernel<__half, true, 0>},
     {gemv4_bulk_kernel<__half, false, 1>, gemv4_bulk_kernel<__half, true, 1>}},
};
static const bk_fn g_bk_probe[2] = {gemv4_bulk_kernel<__nv_bfloat16, false, 2>,
                                    gemv4_bulk_kernel<__nv_bfloat16, true, 2>};

extern "C" int fq_cuda_gemv4_bulk_built(void) { return bk_arch_ok() ? 1 : 0; }

extern "C" int fq_cuda_gemv4_bulk_supported(const fq_lin4_weight *w, const fq_lin4_io *io) {
    const int xt = io->x_dtype, yt = io->y_dtype;
    return bk_arch_ok() && (xt == FQ_BF16 || xt == FQ_F16) && (yt == FQ_BF16 || yt == FQ_F16 || yt == FQ_F32) &&
           io->m >= 1 && io->m <= 2 && w->blocksize >= 32 && w->k >= 128 && w->k % 128 == 0 &&
           w->k % w->blocksize == 0 && w->n >= 1 && w->n * (w->k / w->blocksize) <= 0x7fffffff /* 32-bit block index */ &&
           ((uintptr_t)io->x & 15) == 0 && ((uintptr_t)w->packed & 15) == 0 && w->quant_map != NULL;
}

extern "C" int fq_cuda_gemv4_bulk_prepare(void) {
    for (int i = 0; i < 2; i++)
        for (int d = 0; d < 2; d++)
            for (int n = 0; n < 2; n++) {
                cudaError_t e = cudaFuncSetAttribute(g_bk_fns[i][d][n], cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     BK_SMEM);
                if (e != cudaSuccess) return (int)e;
            }
    for (int n = 0; n < 2; n++) {
        cudaError_t e = cudaFuncSetAttribute(g_bk_probe[n], cudaFuncAttributeMaxDynamicSharedMemorySize, BK_SMEM);
        if (e != cudaSuccess) return (int)e;
    }
    return (int)cudaSuccess;
}

/* cfg (0 = automatic): bits 0..1 decode (0 = automatic = fast, 1 = exact, 2 = fast,
 * 3 = loads only, bf16 x: a bench probe of the streaming with WRONG results);
 * bits 2..3 L2 prefetch (0 = automatic = the block's whole range at start, the
 * fastest on every FLUX shape on the H100; 1 = none, 2 = 24 stages beyond the ring,
 * 3 = 8 stages beyond the ring); bit 4: size the grid for one block
 * per SM instead of two; bit 7: plain launch (no programmatic dependent launch). */
extern "C" int fq_cuda_gemv4_bulk(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                                  int sm_count, int cfg, cudaStream_t stream) {
    if (!fq_cuda_gemv4_bulk_supported(w, io)) return (int)cudaErrorInvalidValue;
    if (io->m <= 0) return (int)cudaSuccess;
    const int exact = (cfg & 3) == 1, probe = (cfg & 3) == 3 && io->x_dtype == FQ_BF16;
    const int pfsel = (cfg >> 2) & 3;
    const bk_fn fn = probe ? g_bk_probe[w->nested ? 1 : 0]
                           : g_bk_fns[io->x_dtype == FQ_BF16 ? 0 : 1][exact][w->nested ? 1 : 0];
    int per_sm = 0;
    cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, BK_THREADS, BK_SMEM);
    if (err != cudaSuccess) return (int)err;
    if (per_sm < 1) return (int)cudaErrorInvalidConfiguration;
    if (per_sm > 2) per_sm = 2;
    if (cfg & 0x10) per_sm = 1;
    /* Whole tiles per block, as many blocks as fit at once, each the same number of
     * tiles (the last one fewer): all blocks stream side by side and end together. */
    const int64_t tiles = (w->n + 15) / 16;
    const int64_t slots = (int64_t)(sm_count > 0 ? sm_count : 132) * per_sm;
    const int64_t tpc = (tiles + slots - 1) / slots;
    const int64_t blocks = (tiles + tpc - 1) / tpc;
    if (tpc * ((w->k / 2 + BK_SB - 1) / BK_SB) > 0x7fffffff) return (int)cudaErrorInvalidConfiguration;
    bk_args a;
    a.w = *w;
    a.x = io->x;
    a.y = io->y;
    a.y_dtype = io->y_dtype;
    a.m = (int)io->m;
    a.e = *e;
    a.lg2bs = fq_log2i(w->blocksize);
    a.tpc = (int)tpc;
    a.pf = pfsel == 1 ? 0 : pfsel == 2 ? 24 : pfsel == 3 ? 8 : -1;
    a.tiles = tiles;
    return fq_lin4_launch(fn, (unsigned)blocks, BK_THREADS, BK_SMEM, stream, a, (cfg & 0x80) != 0);
}

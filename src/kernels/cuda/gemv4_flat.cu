/* gemv4_flat: an M <= 2 4-bit GEMV whose every weight load is a contiguous run of
 * 256 bytes per warp (8 bytes per lane), with one persistent pass over W.
 *
 * Work. A warp handles pairs of rows (r, r+1) one 512-element step of K at a time:
 * lane l loads the 8 bytes [256j + 8l, +8) of both rows (two LDG.64, each a
 * contiguous 256 bytes over the warp). Blocks own equal runs of row pairs (one
 * block per SM by default, so every SM streams the same number of bytes); inside a
 * block the (pair, step) units are split evenly over the warps, so a warp may start
 * or end in the middle of a pair. Its partial sums for such a pair go to shared
 * memory and are added in warp order at the end (results do not depend on timing).
 *
 * Decode (fast only): lane (g = lane/4, t = lane%4) holds 16 elements of each row;
 * the 4 lanes of group g cover 64 consecutive elements, one absmax block (blocksize
 * >= 64, K a multiple of it). mma.sync m16n8k16 with A row g = row r's elements of
 * group g, A row g+8 = row r+1's, and B column g = the matching x values (each lane
 * puts its own x in its own k slots): the diagonal C[g][g] is then group g's partial
 * sum for row r and C[g+8][g] for row r+1 (other entries are discarded). MMA s
 * takes byte 2s (elements 4s, 4s+1: slots 2t, 2t+1) and byte 2s+1 (4s+2, 4s+3: slots
 * 2t+8, 2t+9). A = code values in x's 16-bit type (one 32-bit table lookup per
 * byte), absmax applied in f32 to each group's partial (as gemv4_tc): W is rounded
 * once, the code value to bf16/f16; not bit-identical to dequantize's rounding.
 * x lives in shared memory (16-byte chunks swizzled so the two LDS.128 per lane
 * and step do not conflict).
 *
 * Order of work in a block: griddepcontrol.wait (programmatic dependent launch;
 * W, x and the absmax state are read only after it), then the warps' first two
 * batches of W loads, and only then the tables: x, the decode table and every
 * absmax of the block's rows (f32, in shared memory) - so the setup overlaps the
 * first loads. cfg bit 4 adds an L2 prefetch of the block's range before the wait;
 * it is slower (with PDL, the next calls' prefetches compete with this call).
 *
 * Measured (H100 SXM, bench/results/bench_linear_gemv2_h100_2026-11-27.txt, M = 1,
 * NF4 double quant, bf16): 21504x3072 23.9 us (gemv4_tc 28.5, cuBLASLt bf16 48.8
 * in the same run), 18432x3072 21.8 (24.1), 3072x15360 19.5 (20.5); slower than
 * gemv4_tc on 12288x3072 and at M = 2 on the 3072-row shapes. Its loads-only probe
 * (cfg 2) needs 18.1 us on 21504x3072 and the flat probe (cfg 3: the packed bytes
 * as one range, 16-byte loads, no decode) 12.4 us = 2.66 TB/s: the two-row 8-byte
 * load pattern plus setup costs ~5.6 us, the decode ~6 us more. */
#include "kernels/cuda/lin4_common.cuh"

#define FL_TBL_BYTES (FQ_TBL_WORDS * 4) /* 32 KB: word b * 32 + lane (fq_tbl_build) */
#define FL_STEP_ELEMS 512               /* K elements per step and row (256 bytes) */
#define FL_MAX_K 16384
#define FL_AM_CAP (48 << 10) /* bytes of f32 absmax per block; more rows -> more blocks */

typedef struct {
    fq_lin4_weight w;
    const void *x; /* [m, k] */
    void *y;       /* [m, n] */
    int y_dtype;
    fq_lin4_epilogue e;
    int lg2bs;
    int steps;     /* K / 512 */
    int pf;        /* 1: L2 prefetch of the block's range before the wait */
    int am_floats; /* absmax floats per block in shared memory: 2 * max pairs per block * kb */
    int64_t pairs; /* ceil(N / 2) */
} fl_args;

/* modes: fast decode; loads-only probe (this kernel's loads, no decode: WRONG
 * results); flat probe (W as one byte range split evenly over all warps, 16-byte
 * loads: the ceiling of a pure stream; WRONG results) */
enum { FL_FAST = 0, FL_LOADS = 1, FL_FLAT = 2 };

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
static __device__ __forceinline__ uint2 fl_ld8(const void *p) {
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}
#endif

template <typename T, bool NESTED, int M, int NW, int U, int MODE>
__global__ void __launch_bounds__(NW * 32, 1) gemv4_flat_kernel(fl_args a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    extern __shared__ __align__(16) uint8_t fl_sm[];
    const int64_t N = a.w.n, K = a.w.k, rowb = K >> 1;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int S = a.steps;

#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
    if (MODE == FL_FLAT) {
        /* the whole packed weight, split evenly over all warps in 512-byte chunks */
        const int64_t chunks = N * rowb / 512, wt = (int64_t)gridDim.x * NW;
        const int64_t gw = (int64_t)blockIdx.x * NW + warp;
        const int64_t c0 = chunks * gw / wt, c1 = chunks * (gw + 1) / wt;
        if (a.pf && lane == 0) fq_bulk_prefetch_l2(a.w.packed + c0 * 512, (uint32_t)((c1 - c0) * 512));
#if __CUDA_ARCH__ >= 900
        asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
        uint32_t acc = 0;
        for (int64_t c = c0; c < c1; c += 2 * U) {
            uint4 v[2 * U];
#pragma unroll
            for (int u = 0; u < 2 * U; u++)
                v[u] = c + u < c1 ? fq_lin4_ld_stream16(a.w.packed + (c + u) * 512 + 16 * lane) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int u = 0; u < 2 * U; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
        }
        if (acc == 0x7f7f7f7fu) fq_stf(a.y, a.y_dtype, 0, 1.0f); /* keeps the loads; practically never */
        return;
    }

    /* this block's row pairs, and this warp's units (pair, step) among them */
    const int64_t pb0 = a.pairs * blockIdx.x / gridDim.x, pb1 = a.pairs * (blockIdx.x + 1) / gridDim.x;
    const int64_t ub = (pb1 - pb0) * S;
    const int64_t u0 = ub * warp / NW, u1 = ub * (warp + 1) / NW;
    const int kb = (int)(K >> a.lg2bs); /* absmax blocks per row */

    uint32_t *tbl = (uint32_t *)fl_sm;
    uint8_t *xs = fl_sm + FL_TBL_BYTES;
    float *am_s = (float *)(xs + (size_t)M * K * 2); /* [2 * (pb1 - pb0) rows][kb] */
    float *code_s = am_s + (size_t)a.am_floats;
    float *qm_s = code_s + 256;
    float *slot = qm_s + 16; /* [warp][first, last][2 rows * M] */

    if (a.pf) {
        const int64_t b0 = pb0 * 2 * rowb, b1 = min(pb1 * 2, N) * rowb;
        const int64_t pieces = (b1 - b0 + 8191) / 8192;
        for (int64_t i = tid; i < pieces; i += NW * 32)
            fq_bulk_prefetch_l2(a.w.packed + b0 + i * 8192, (uint32_t)min((int64_t)8192, b1 - b0 - i * 8192));
    }
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif

    /* load cursor: unit ul is step jl of pair pl; row r at lp, row r+1 at lp + loff
     * (loff = 0 for the last row of an odd N: it is loaded twice, not stored) */
    int64_t ul = u0, pl = pb0 + u0 / S;
    int jl = (int)(u0 % S);
    const uint8_t *lp = a.w.packed + 2 * pl * rowb + (int64_t)jl * 256 + 8 * lane;
    int64_t loff = 2 * pl + 1 < N ? rowb : 0;
    auto issue_batch = [&](uint2 (&wa)[U], uint2 (&wb)[U]) {
#pragma unroll
        for (int i = 0; i < U; i++) {
            if (ul < u1) {
                wa[i] = fl_ld8(lp);
                wb[i] = fl_ld8(lp + loff);
            }
            ul++;
            lp += 256;
            if (++jl == S) {
                jl = 0;
                pl++;
                lp += rowb;
                loff = 2 * pl + 1 < N ? rowb : 0;
            }
        }
    };
    /* the first two batches go out before the tables are built */
    uint2 aA[U], bA[U], aB[U], bB[U];
    issue_batch(aA, bA);
    issue_batch(aB, bB);

    if (tid < 16) qm_s[tid] = __ldg(&a.w.quant_map[tid]);
    if (NESTED)
        for (int i = tid; i < 256; i += NW * 32) code_s[i] = __ldg(&a.w.nested_code[i]);
    {
        /* x into shared memory; 16-byte chunk c stored at c ^ ((c >> 3) & 1) */
        const uint4 *xg = (const uint4 *)a.x;
        uint4 *xd = (uint4 *)xs;
        const int nc = (int)(M * K / 8);
        for (int c = tid; c < nc; c += NW * 32) xd[c ^ ((c >> 3) & 1)] = __ldg(&xg[c]);
    }
    __syncthreads();
    fq_tbl_build<T>(tbl, qm_s);
    if (MODE == FL_FAST) {
        /* every absmax of the block's rows, once, in f32 (rows past N: 0) */
        const int nam = (int)(2 * (pb1 - pb0)) * kb;
        const int64_t blk0 = 2 * pb0 * kb, blkN = N * kb;
        for (int i = tid; i < nam; i += NW * 32) {
            const int64_t b = blk0 + i;
            float v = 0.0f;
            if (b < blkN) {
                if (NESTED)
                    v = __fadd_rn(fq_lin4_mul_ftz(code_s[__ldg(&a.w.qabsmax[b])], __ldg(&a.w.nested_absmax[b >> 8])),
                                  a.w.offset);
                else v = __ldg(&a.w.absmax[b]);
            }
            am_s[i] = v;
        }
    }
    __syncthreads();

    float acc[2 * M]; /* rows r, r+1 (x row 0), then rows r, r+1 (x row 1) */
#pragma unroll
    for (int i = 0; i < 2 * M; i++) acc[i] = 0.0f;
    const bool holder = t == (g >> 1); /* holds C[g][g] and C[g+8][g] */
    const int64_t pfirst = pb0 + u0 / S;
    const uint32_t lt = (uint32_t)lane * 4;
    const int sw = (lane >> 2) & 1;

    auto lookup = [&](uint32_t wd, int byte) -> uint32_t {
        const uint32_t off = (byte == 0 ? (wd << 7) : (wd >> (8 * byte - 7))) & 0x7f80u;
        return *(const uint32_t *)((const uint8_t *)tbl + (off | lt));
    };

    /* pair p ends here (or the warp's range does): sum the holders' values over the
     * warp, then store, or leave the partial for the block's final sum */
    auto finish = [&](int64_t p, bool whole) {
        float v[2 * M];
#pragma unroll
        for (int i = 0; i < 2 * M; i++) {
            v[i] = holder ? acc[i] : 0.0f;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], o);
            acc[i] = 0.0f;
        }
        if (lane < 2 * M) {
            float val = v[0];
#pragma unroll
            for (int i = 1; i < 2 * M; i++)
                if (lane == i) val = v[i];
            if (whole) {
                const int64_t n = 2 * p + (lane & 1);
                const int m = lane >> 1;
                if (n < N) fq_stf(a.y, a.y_dtype, (int64_t)m * N + n, fq_epi(a.e, n, val));
            } else {
                slot[(warp * 2 + (p == pfirst ? 0 : 1)) * 2 * M + lane] = val;
            }
        }
    };

    /* compute cursor: step jc of pair pc; amr = this lane's absmax of row r, step 0 */
    int64_t pc = pfirst;
    int jc = (int)(u0 % S);
    bool started = jc == 0; /* the current pair began in this warp */
    const float *amr = am_s + (int64_t)(2 * (pc - pb0)) * kb;
    auto consume = [&](int64_t u, const uint2 &wa0, const uint2 &wb0) {
        if (u >= u1) return;
        if (MODE == FL_LOADS) {
            acc[0] += __uint_as_float((wa0.x ^ wa0.y ^ wb0.x ^ wb0.y) & 0x3fffffffu);
        } else {
            const int kbl = (jc * FL_STEP_ELEMS + 64 * g) >> a.lg2bs;
            const float amA = amr[kbl], amB = amr[kb + kbl];
            /* x: this lane's 16 elements of the step (two swizzled 16-byte chunks per row) */
            const int c = jc * 64 + 2 * lane;
            uint4 xv[M][2];
#pragma unroll
            for (int m = 0; m < M; m++) {
                const uint4 *xr = (const uint4 *)(xs + (size_t)m * K * 2);
                xv[m][0] = xr[c ^ sw];
                xv[m][1] = xr[(c + 1) ^ sw];
            }
            float cs[M][4];
#pragma unroll
            for (int m = 0; m < M; m++)
#pragma unroll
                for (int i = 0; i < 4; i++) cs[m][i] = 0.0f;
#pragma unroll
            for (int s = 0; s < 4; s++) {
                const uint32_t wa = s < 2 ? wa0.x : wa0.y, wb = s < 2 ? wb0.x : wb0.y;
                const int by = (s & 1) * 2;
                const uint32_t a0 = lookup(wa, by), a2 = lookup(wa, by + 1);
                const uint32_t a1 = lookup(wb, by), a3 = lookup(wb, by + 1);
#pragma unroll
                for (int m = 0; m < M; m++) {
                    const uint4 &q = xv[m][s >> 1];
                    const uint32_t b0 = (s & 1) ? q.z : q.x, b1 = (s & 1) ? q.w : q.y;
                    fq_mma16816<T>(cs[m], a0, a1, a2, a3, b0, b1);
                }
            }
#pragma unroll
            for (int m = 0; m < M; m++) {
                acc[2 * m] = fmaf(amA, (g & 1) ? cs[m][1] : cs[m][0], acc[2 * m]);
                acc[2 * m + 1] = fmaf(amB, (g & 1) ? cs[m][3] : cs[m][2], acc[2 * m + 1]);
            }
        }
        const bool last = u == u1 - 1;
        if (jc == S - 1 || last) finish(pc, started && jc == S - 1);
        if (++jc == S) {
            jc = 0;
            pc++;
            amr += 2 * kb;
            started = true;
        }
    };
    auto consume_batch = [&](int64_t uc, const uint2 (&wa)[U], const uint2 (&wb)[U]) {
#pragma unroll
        for (int i = 0; i < U; i++) consume(uc + i, wa[i], wb[i]);
    };
    /* two batches of U units in flight: a batch is reloaded as soon as it is decoded */
    for (int64_t uc = u0; uc < u1; uc += 2 * U) {
        consume_batch(uc, aA, bA);
        issue_batch(aA, bA);
        if (uc + U >= u1) break;
        consume_batch(uc + U, aB, bB);
        issue_batch(aB, bB);
    }

    /* pairs split between warps: the first warp boundary inside each adds the warps'
     * partials in warp order */
    __syncthreads();
    if (tid >= 1 && tid < NW) {
        const int64_t bw = ub * tid / NW, bprev = ub * (tid - 1) / NW;
        const int64_t p = bw / S; /* block-local */
        if (bw % S != 0 && bw < ub && bprev <= p * S) {
            float sum[2 * M];
#pragma unroll
            for (int i = 0; i < 2 * M; i++) sum[i] = 0.0f;
            for (int w = 0; w < NW; w++) {
                const int64_t w0 = ub * w / NW, w1 = ub * (w + 1) / NW;
                if (w0 >= w1 || w1 <= p * S || w0 >= (p + 1) * S) continue;
                const float *sl = slot + (w * 2 + (p == w0 / S ? 0 : 1)) * 2 * M;
#pragma unroll
                for (int i = 0; i < 2 * M; i++) sum[i] += sl[i];
            }
#pragma unroll
            for (int i = 0; i < 2 * M; i++) {
                const int64_t n = 2 * (pb0 + p) + (i & 1);
                if (n < N) fq_stf(a.y, a.y_dtype, (int64_t)(i >> 1) * N + n, fq_epi(a.e, n, sum[i]));
            }
        }
    }
#else
    (void)a;
    __trap(); /* never launched: the host needs sm_80 */
#endif
}

typedef void (*fl_fn)(fl_args);
/* block shapes (one block per SM): 16 warps x 4 units per batch; 16 x 8; 8 x 8 */
#define FL_SHAPES 3
static const int g_fl_nw[FL_SHAPES] = {16, 16, 8};

template <typename T, bool NESTED, int M, int MODE> struct fl_set {
    static constexpr fl_fn fns[FL_SHAPES] = {gemv4_flat_kernel<T, NESTED, M, 16, 4, MODE>,
                                             gemv4_flat_kernel<T, NESTED, M, 16, 8, MODE>,
                                             gemv4_flat_kernel<T, NESTED, M, 8, 8, MODE>};
};

/* [x bf16, f16][nested][M - 1][shape]: fast decode */
static const fl_fn *g_fl_fast[2][2][2] = {
    {{fl_set<__nv_bfloat16, false, 1, FL_FAST>::fns, fl_set<__nv_bfloat16, false, 2, FL_FAST>::fns},
     {fl_set<__nv_bfloat16, true, 1, FL_FAST>::fns, fl_set<__nv_bfloat16, true, 2, FL_FAST>::fns}},
    {{fl_set<__half, false, 1, FL_FAST>::fns, fl_set<__half, false, 2, FL_FAST>::fns},
     {fl_set<__half, true, 1, FL_FAST>::fns, fl_set<__half, true, 2, FL_FAST>::fns}},
};
/* bench probes (bf16 x, nested, M = 1): loads only; flat stream */
static const fl_fn *g_fl_probe[2] = {fl_set<__nv_bfloat16, true, 1, FL_LOADS>::fns,
                                     fl_set<__nv_bfloat16, true, 1, FL_FLAT>::fns};

static size_t fl_smem(int64_t m, int64_t k, int64_t am_floats, int nw) {
    return FL_TBL_BYTES + (size_t)(m * k * 2) + (size_t)am_floats * 4 + (256 + 16) * 4 + (size_t)nw * 2 * 4 * 4;
}

extern "C" int fq_cuda_gemv4_flat_supported(const fq_lin4_weight *w, const fq_lin4_io *io) {
    const int xt = io->x_dtype, yt = io->y_dtype;
    return (xt == FQ_BF16 || xt == FQ_F16) && (yt == FQ_BF16 || yt == FQ_F16 || yt == FQ_F32) && io->m >= 1 &&
           io->m <= 2 && w->blocksize >= 64 && w->k >= FL_STEP_ELEMS && w->k % FL_STEP_ELEMS == 0 &&
           w->k <= FL_MAX_K && w->k % w->blocksize == 0 && w->n >= 1 &&
           w->n * (w->k / w->blocksize) <= 0x7fffffff /* 32-bit block index */ && ((uintptr_t)io->x & 15) == 0 &&
           ((uintptr_t)w->packed & 15) == 0 && w->quant_map != NULL;
}

extern "C" int fq_cuda_gemv4_flat_prepare(void) {
    const int bytes = (int)fl_smem(2, FL_MAX_K, FL_AM_CAP / 4, 16);
    for (int s = 0; s < FL_SHAPES; s++) {
        for (int i = 0; i < 2; i++)
            for (int n = 0; n < 2; n++)
                for (int m = 0; m < 2; m++) {
                    cudaError_t e = cudaFuncSetAttribute(g_fl_fast[i][n][m][s],
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
                    if (e != cudaSuccess) return (int)e;
                }
        for (int p = 0; p < 2; p++) {
            cudaError_t e =
                cudaFuncSetAttribute(g_fl_probe[p][s], cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
            if (e != cudaSuccess) return (int)e;
        }
    }
    return (int)cudaSuccess;
}

/* cfg (0 = automatic): bits 0..1 mode (0/1 fast decode; 2 loads-only probe, 3 flat
 * stream probe: bench only, bf16 x, WRONG results); bits 2..3 block shape (0 =
 * automatic = 16 warps, 4 units per batch; 1 the same; 2 = 16 warps, 8 units; 3 = 8
 * warps, 8 units); bit 4: L2 prefetch of the block's range before the wait; bit 7:
 * plain launch (no programmatic dependent launch). */
extern "C" int fq_cuda_gemv4_flat(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                                  int sm_count, int cfg, cudaStream_t stream) {
    if (!fq_cuda_gemv4_flat_supported(w, io)) return (int)cudaErrorInvalidValue;
    if (io->m <= 0) return (int)cudaSuccess;
    const int mode = cfg & 3, shp = (cfg >> 2) & 3;
    const int s = shp == 0 ? 0 : shp - 1;
    const int probe = mode >= 2 && io->x_dtype == FQ_BF16 && w->nested && io->m == 1;
    const fl_fn fn = probe ? g_fl_probe[mode - 2][s]
                           : g_fl_fast[io->x_dtype == FQ_BF16 ? 0 : 1][w->nested ? 1 : 0][io->m - 1][s];
    const int nw = g_fl_nw[s];
    /* one block per SM, unless a block's absmax would not fit in FL_AM_CAP */
    const int64_t pairs = (w->n + 1) / 2, kb = w->k / w->blocksize;
    const int64_t max_pairs = FL_AM_CAP / (2 * 4 * kb); /* >= 8: kb <= 256 */
    int64_t blocks = sm_count > 0 ? sm_count : 132;
    if (blocks < (pairs + max_pairs - 1) / max_pairs) blocks = (pairs + max_pairs - 1) / max_pairs;
    if (blocks > 0x7fffffff) return (int)cudaErrorInvalidConfiguration;
    const int64_t am_floats = 2 * ((pairs + blocks - 1) / blocks) * kb;
    const size_t smem = fl_smem(io->m, w->k, am_floats, nw);
    fl_args a;
    a.w = *w;
    a.x = io->x;
    a.y = io->y;
    a.y_dtype = io->y_dtype;
    a.e = *e;
    a.lg2bs = fq_log2i(w->blocksize);
    a.steps = (int)(w->k / FL_STEP_ELEMS);
    a.pf = (cfg & 0x10) ? 1 : 0;
    a.pairs = pairs;
    a.am_floats = (int)am_floats;
    return fq_lin4_launch(fn, (unsigned)blocks, (unsigned)(nw * 32), smem, stream, a, (cfg & 0x80) != 0);
}

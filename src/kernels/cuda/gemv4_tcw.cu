/* gemv4_tcw: the M = 1 4-bit GEMV of gemv4_win's load shape with the decode on tensor
 * cores.
 *
 * Load shape (gemv4_win's). Lane l loads 16 bytes (32 elements) at element 32 l of a
 * 1024-element window of one row: every warp load is 512 contiguous bytes. A warp
 * keeps one window for all the rows it owns, so its x values stay in registers.
 *
 * Decode. gemv4_win multiplies each weight in f32 (~140 warp instructions per 512
 * bytes). Here a byte costs two instructions, a PRMT for the table offset and one
 * LDS.32 of the (code, code) pair in x's type, and the products and sums of a unit
 * (two rows x one window = 2048 weights, 1 KB) are 8 k-steps of mma.sync
 * m16n8k16: MMA row g (0..7) is the unit's first row at 128-element sub-window g
 * (lane l = 4g + t holds chunk t of sub-window g: exactly its own load), MMA row
 * 8 + g the second row.
 *
 * Columns. The MMA sums over the k slots of all four lanes of a sub-window, whose
 * chunks may lie in different absmax blocks, so a B column is one (sub-window,
 * block) pair: x where the element is in that block, 0 elsewhere. With blocksize 64
 * that is 16 columns (two n-tiles of 8, two MMAs per A fragment), with blocksize
 * >= 128 eight (one). D[row][column] is the dot product of the row with x over one
 * block when the column's sub-window is the row's; the other entries are computed
 * and ignored. Each block sum is scaled by its absmax in f32 (the code alone is
 * rounded to x's type, like gemv4_tc; W is not rounded as dequantize rounds it).
 * The lane's B values depend on the lane and the window only: in registers, as x
 * pairs of x's type, for the whole kernel.
 *
 * Sums. The scaled block sums of the two rows sit in 8 lanes each; one warp
 * butterfly (the first step exchanges the rows, four more add) leaves each row's
 * window sum in one lane; the windows of a row meet in shared memory and are added in
 * window order at the end: bit-identical reruns.
 *
 * Decode table: the 256 byte values as (code[first], code[second]) pairs in x's
 * type, 32 copies in 8-byte slots (lane l reads half l >> 4 of slot l: every LDS.32
 * of a warp hits 32 distinct banks), at offset 0 of the dynamic shared memory so that
 * a lookup offset is one PRMT of the byte next to the lane's slot offset.
 *
 * The first version (units of 8 rows x two 128-element windows, warp loads of 8 rows
 * x 64 bytes, x from shared memory) issued 27 % fewer instructions than gemv4_win and
 * was slower (21504x3072: 21.4-22.1 vs 19.1-19.4 us); its loads alone took 17.0 us:
 * its scattered 64-byte pieces were the limit, not the decode (H100, 2026-11-27). */
#include "kernels/cuda/lin4_common.cuh"

#define TW_WIN 1024                 /* elements of a row in one warp load */
#define TW_MAX_K 16384
#define TW_TBL_BYTES (256 * 32 * 8) /* 256 entries x 32 slots of 8 bytes */
#define TW_PART_CAP (32 << 10)      /* bytes of per-window row sums per block */

typedef struct {
    fq_lin4_weight w;
    const void *x; /* [1, k] in T */
    void *y;       /* [1, n] */
    int y_dtype;
    fq_lin4_epilogue e;
    int lg2bs;
    int wins;  /* ceil(K / 1024) windows per row */
    int R;     /* rows a block works on at once (warps = wins * R) */
    int probe; /* bench only: 1 = loads without the decode (WRONG results) */
    int il;    /* 1: the blocks take R-row chunks in turn (all SMs stream one region) */
} tw_args;

/* One unit in flight: the lane's 16 bytes of each of the two rows and the raw absmax
 * state of the block the lane loads for the warp. */
struct tw_unit {
    uint4 w0, w1;
    uint32_t q; /* nested: the 8-bit absmax code */
    float am;   /* nested: the nested absmax; else the absmax itself */
};

template <typename T, bool NESTED, int BPW, int U>
__global__ void __launch_bounds__(U <= 2 ? 512 : 384, 1) gemv4_tcw_kernel(tw_args a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    constexpr int NT = BPW; /* n-tiles: 8 sub-windows x BPW blocks = 8 BPW columns */
    extern __shared__ __align__(16) uint8_t tw_sm[];
    /* table at offset 0: a lookup's byte offset, (byte << 8) | slot, is one PRMT */
    uint8_t *tbl = tw_sm;
    float *code_s = (float *)(tw_sm + TW_TBL_BYTES); /* nested map, 256 */
    float *qm_s = code_s + 256;                      /* 16 codes */
    float *part = qm_s + 16;                         /* [rows of the block][wins] */

    const int64_t N = a.w.n, K = a.w.k;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int wins = a.wins, R = a.R;
    const int wi = warp % wins, ro = warp / wins;
    /* rows: contiguous runs [rb0, rb1) per block, or (il) R-row chunks dealt out to the
     * blocks in turn; a warp's rows are rbase + ro + rs i, its i-th row has the block-local
     * index i R + ro (its row sums' slot) */
    const int64_t G = gridDim.x, bid = blockIdx.x;
    const int64_t rb0 = a.il ? 0 : N * bid / G, rb1 = a.il ? N : N * (bid + 1) / G;
    const int64_t rbase = a.il ? bid * R : rb0, rs = a.il ? G * R : R;
    const int64_t kw = (int64_t)wi * TW_WIN;      /* the warp's window */
    const bool on = kw + 32 * lane < K;           /* the last window may be partial */
    /* the absmax this lane loads: BPW 2: row (l >> 4), block l & 15 of the window;
     * BPW 1: row (l >> 3) & 1, sub-window l & 7 (lanes 16..31 load nothing) */
    const int arow = BPW == 2 ? lane >> 4 : (lane >> 3) & 1;
    const int64_t ak = kw + (BPW == 2 ? 64 * (lane & 15) : 128 * (lane & 7));
    const bool a_on = (BPW == 2 || lane < 16) && ak < K;

#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif

    /* load cursor: the warp's rows r0 + rs i, two per unit, as pointers stepped by 2 rs
     * rows */
    const int64_t r0 = rbase + ro;
    const int nrow = rb1 > r0 ? (int)((rb1 - r0 + rs - 1) / rs) : 0;
    const int nunit = (nrow + 1) >> 1;
    int li = 0;
    const int64_t step = 2 * rs * K; /* elements per unit */
    const uint8_t *lp = a.w.packed + ((r0 * K + kw + 32 * lane) >> 1);
    int64_t ae = (r0 + arow * rs) * K + ak; /* flat element of the lane's absmax block */
    const int64_t rstep = rs * K >> 1;      /* bytes from a unit's first row to its second */
    auto issue = [&](tw_unit (&b)[U]) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            b[u].w0 = b[u].w1 = make_uint4(0, 0, 0, 0);
            b[u].q = 0;
            b[u].am = 0.0f;
            if (li < nunit) { /* warp-uniform */
                const bool second = 2 * li + 1 < nrow;
                if (on) {
                    b[u].w0 = fq_lin4_ld_stream16(lp);
                    if (second) b[u].w1 = fq_lin4_ld_stream16(lp + rstep);
                }
                if (a_on && (arow == 0 || second)) {
                    const int64_t blk = ae >> a.lg2bs;
                    if (NESTED) {
                        b[u].q = __ldg(a.w.qabsmax + blk);
                        b[u].am = __ldg(&a.w.nested_absmax[blk >> 8]);
                    } else {
                        b[u].am = __ldg(&a.w.absmax[blk]);
                    }
                }
                lp += step >> 1;
                ae += step;
            }
            li++;
        }
    };
    tw_unit bA[U], bB[U];
    issue(bA);
    issue(bB);

    /* x as B fragments: n-tile h, lane (g, t) = column g of the tile: BPW 2: sub-window
     * 4h + g/2, block g % 2 (zero unless chunk t lies in that block); BPW 1: sub-window g */
    uint32_t xr[NT][16];
#pragma unroll
    for (int h = 0; h < NT; h++) {
        const int sw = BPW == 2 ? 4 * h + (g >> 1) : g;
        const int64_t k0 = kw + 128 * sw + 32 * t;
        const bool live = k0 < K && (BPW == 1 || (t >> 1) == (g & 1));
#pragma unroll
        for (int i = 0; i < 4; i++) {
            uint4 v = make_uint4(0, 0, 0, 0);
            if (live) v = fq_ld_u4((const T *)a.x + k0 + 8 * i);
            xr[h][4 * i] = v.x;
            xr[h][4 * i + 1] = v.y;
            xr[h][4 * i + 2] = v.z;
            xr[h][4 * i + 3] = v.w;
        }
    }
    if (tid < 16) qm_s[tid] = __ldg(&a.w.quant_map[tid]);
    if (NESTED)
        for (int i = tid; i < 256; i += blockDim.x) code_s[i] = __ldg(&a.w.nested_code[i]);
    __syncthreads();
    for (int i = tid; i < 256 * 16; i += blockDim.x) {
        const int b = i >> 4, c = (i + b) & 15; /* rotated 16-byte columns: distinct banks per phase */
        const uint32_t v = fq_mma_t<T>::pack(qm_s[b >> 4], qm_s[b & 15]);
        *(uint4 *)(tbl + b * 256 + 16 * c) = make_uint4(v, v, v, v);
    }
    __syncthreads();

    const uint32_t slot = 8u * (uint32_t)lane + 4u * (uint32_t)(lane >> 4), tbase = fq_smem_addr(tw_sm);
    auto look = [&](uint32_t wd, int byte) -> uint32_t {
        const uint32_t off = __byte_perm(wd, slot, 0x5504u | ((uint32_t)byte << 4));
        uint32_t v;
        asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(tbase + off));
        return v;
    };
    /* the lanes whose D entries are used: BPW 2: t == g % 4 (n-tile g / 4, the row's
     * two blocks of sub-window g); BPW 1: t == g / 2 (column g = entry g % 2) */
    const bool useful = BPW == 2 ? t == (g & 3) : t == (g >> 1);
    const int hsel = BPW == 2 ? g >> 2 : 0;
    const int src0 = BPW == 2 ? 2 * g : g; /* lane holding the first row's absmax */

    int ci = 0; /* the unit's first row has the local index 2 ci R + ro */
    auto consume = [&](const tw_unit (&b)[U]) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (ci >= nunit) return; /* warp-uniform */
            float v0, v1;
            if (a.probe) { /* keep the loads live, skip everything else */
                v0 = __uint_as_float((b[u].w0.x ^ b[u].w0.y ^ b[u].w0.z ^ b[u].w0.w ^ b[u].q) & 0x3fffffffu) + b[u].am;
                v1 = __uint_as_float((b[u].w1.x ^ b[u].w1.y ^ b[u].w1.z ^ b[u].w1.w) & 0x3fffffffu);
            } else {
                float am = b[u].am;
                if (NESTED) am = __fadd_rn(fq_lin4_mul_ftz(code_s[b[u].q], am), a.w.offset);
                float d[NT][4];
#pragma unroll
                for (int h = 0; h < NT; h++) d[h][0] = d[h][1] = d[h][2] = d[h][3] = 0.0f;
                const uint32_t w0[4] = {b[u].w0.x, b[u].w0.y, b[u].w0.z, b[u].w0.w};
                const uint32_t w1[4] = {b[u].w1.x, b[u].w1.y, b[u].w1.z, b[u].w1.w};
#pragma unroll
                for (int i = 0; i < 8; i++) { /* k-step i: bytes 2i, 2i + 1 = word i / 2, bytes 2(i % 2), +1 */
                    const int q = i >> 1, by = 2 * (i & 1);
                    const uint32_t a0 = look(w0[q], by), a2 = look(w0[q], by + 1);
                    const uint32_t a1 = look(w1[q], by), a3 = look(w1[q], by + 1);
#pragma unroll
                    for (int h = 0; h < NT; h++) fq_mma16816<T>(d[h], a0, a1, a2, a3, xr[h][2 * i], xr[h][2 * i + 1]);
                }
                /* scale the row's block sums of sub-window g by their absmax */
                if (BPW == 2) {
                    const float e0 = hsel ? d[NT - 1][0] : d[0][0], e1 = hsel ? d[NT - 1][1] : d[0][1];
                    const float e2 = hsel ? d[NT - 1][2] : d[0][2], e3 = hsel ? d[NT - 1][3] : d[0][3];
                    const float m0 = __shfl_sync(0xffffffffu, am, src0), m1 = __shfl_sync(0xffffffffu, am, src0 + 1);
                    const float m2 = __shfl_sync(0xffffffffu, am, src0 + 16),
                                m3 = __shfl_sync(0xffffffffu, am, src0 + 17);
                    v0 = fmaf(e1, m1, e0 * m0);
                    v1 = fmaf(e3, m3, e2 * m2);
                } else {
                    const bool odd = (g & 1) != 0;
                    const float m0 = __shfl_sync(0xffffffffu, am, src0), m1 = __shfl_sync(0xffffffffu, am, src0 + 8);
                    v0 = (odd ? d[0][1] : d[0][0]) * m0;
                    v1 = (odd ? d[0][3] : d[0][2]) * m1;
                }
                v0 = useful ? v0 : 0.0f;
                v1 = useful ? v1 : 0.0f;
            }
            /* the two row sums over the warp: lanes with bit 4 keep the second row */
            const bool up = (lane & 16) != 0;
            float s = (up ? v1 : v0) + __shfl_xor_sync(0xffffffffu, up ? v0 : v1, 16);
#pragma unroll
            for (int bit = 8; bit >= 1; bit >>= 1) s += __shfl_xor_sync(0xffffffffu, s, bit);
            if ((lane & 15) == 0 && 2 * ci + (up ? 1 : 0) < nrow)
                part[((2 * ci + (up ? 1 : 0)) * R + ro) * wins + wi] = s;
            ci++;
        }
    };
    /* two batches of U units in flight; a batch is reloaded as soon as it is used */
    while (ci < nunit) {
        consume(bA);
        issue(bA);
        if (ci >= nunit) break;
        consume(bB);
        issue(bB);
    }
    __syncthreads();

    /* rows of the block: the window sums in window order, the epilogue, the store */
    const int64_t nloc = a.il ? (N > rbase ? (N - rbase + rs - 1) / rs : 0) * R : rb1 - rb0;
    for (int64_t i = tid; i < nloc; i += blockDim.x) {
        const int64_t n = a.il ? rbase + (i / R) * rs + i % R : rb0 + i;
        if (n >= N) continue;
        const float *p = part + i * wins;
        float v = p[0];
        for (int w = 1; w < wins; w++) v += p[w];
        fq_stf(a.y, a.y_dtype, n, fq_epi(a.e, n, v));
    }
#else
    (void)a;
    __trap(); /* never launched: the host needs sm_80 */
#endif
}

typedef void (*tw_fn)(tw_args);
#define TW_US 3 /* units per batch: 1..3 */
#define TW_ROW(T, NE, B) {gemv4_tcw_kernel<T, NE, B, 1>, gemv4_tcw_kernel<T, NE, B, 2>, gemv4_tcw_kernel<T, NE, B, 3>}
/* [f16][nested][BPW - 1][U - 1] */
static const tw_fn g_tw[2][2][2][TW_US] = {
    {{TW_ROW(__nv_bfloat16, false, 1), TW_ROW(__nv_bfloat16, false, 2)},
     {TW_ROW(__nv_bfloat16, true, 1), TW_ROW(__nv_bfloat16, true, 2)}},
    {{TW_ROW(__half, false, 1), TW_ROW(__half, false, 2)}, {TW_ROW(__half, true, 1), TW_ROW(__half, true, 2)}},
};
#undef TW_ROW

/* most warps per block and units per batch of the configurations (cfg bits 0..2; 0 = 1) */
#define TW_SHAPES 6
static const int g_tw_nw[TW_SHAPES] = {16, 16, 16, 12, 8, 8};
static const int g_tw_u[TW_SHAPES] = {2, 2, 1, 3, 2, 3};
static const int g_tw_maxw[TW_US] = {16, 16, 12}; /* the kernels' launch bounds in warps, by U */

static size_t tw_smem(int64_t rows, int wins) {
    return TW_TBL_BYTES + (256 + 16) * 4 + (size_t)(rows * wins) * 4;
}

extern "C" int fq_cuda_gemv4_tcw_supported(const fq_lin4_weight *w, const fq_lin4_io *io) {
    const int xt = io->x_dtype, yt = io->y_dtype;
    return (xt == FQ_BF16 || xt == FQ_F16) && (yt == FQ_BF16 || yt == FQ_F16 || yt == FQ_F32) && io->m == 1 &&
           w->blocksize >= 64 && w->k >= 64 && w->k % w->blocksize == 0 && w->k <= TW_MAX_K && w->n >= 1 &&
           ((uintptr_t)io->x & 15) == 0 && ((uintptr_t)w->packed & 15) == 0 && w->quant_map != NULL;
}

extern "C" int fq_cuda_gemv4_tcw_prepare(void) {
    const int bytes = (int)tw_smem(0, 0) + TW_PART_CAP;
    for (int f = 0; f < 2; f++)
        for (int n = 0; n < 2; n++)
            for (int b = 0; b < 2; b++)
                for (int u = 0; u < TW_US; u++) {
                    cudaError_t e = cudaFuncSetAttribute(g_tw[f][n][b][u], cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                         bytes);
                    if (e != cudaSuccess) return (int)e;
                }
    return (int)cudaSuccess;
}

/* cfg (0 = automatic): bits 0..2 block shape (most warps, units of two rows per batch:
 * 0/1: 16, 2; 2: 16, 1; 3: 12, 3; 4: 8, 2; 5: 8, 3); bit 3: loads-only probe (bench
 * only, WRONG results); bit 4: interleaved rows (R-row chunks dealt to the blocks in
 * turn instead of one contiguous run per block); bit 7: plain launch (no programmatic dependent launch). */
extern "C" int fq_cuda_gemv4_tcw(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                                 int sm_count, int cfg, cudaStream_t stream) {
    if (!fq_cuda_gemv4_tcw_supported(w, io)) return (int)cudaErrorInvalidValue;
    const int s = (cfg & 7) < TW_SHAPES ? cfg & 7 : 0;
    const int wins = (int)((w->k + TW_WIN - 1) / TW_WIN);
    int R = g_tw_nw[s] / wins, u = g_tw_u[s];
    if (R < 1) R = 1;
    while (u > 1 && wins * R > g_tw_maxw[u - 1]) u--; /* the launch bounds of the batch size */
    /* one block per SM, more when a block's row sums would not fit */
    int64_t blocks = sm_count > 0 ? sm_count : 132;
    const int64_t max_rows = TW_PART_CAP / ((int64_t)wins * 4) - R;
    if (blocks < (w->n + max_rows - 1) / max_rows) blocks = (w->n + max_rows - 1) / max_rows;
    if (blocks > w->n) blocks = w->n;
    if (blocks > 0x7fffffff) return (int)cudaErrorInvalidConfiguration;
    const int64_t rows = (w->n + blocks - 1) / blocks + R; /* + R: the interleaved split's last chunk */
    tw_args a;
    a.w = *w;
    a.x = io->x;
    a.y = io->y;
    a.y_dtype = io->y_dtype;
    a.e = *e;
    a.lg2bs = fq_log2i(w->blocksize);
    a.wins = wins;
    a.R = R;
    a.probe = (cfg & 8) ? 1 : 0;
    a.il = (cfg & 0x10) ? 1 : 0;
    const int bpw = w->blocksize == 64 ? 2 : 1;
    const tw_fn fn = g_tw[io->x_dtype == FQ_F16][w->nested ? 1 : 0][bpw - 1][u - 1];
    return fq_lin4_launch(fn, (unsigned)blocks, (unsigned)(wins * R * 32), tw_smem(rows, wins), stream, a,
                          (cfg & 0x80) != 0);
}

/* gemv4_win: the M <= 2 4-bit GEMV built around one load shape, a 16-byte load per
 * lane that makes every warp load one contiguous 512-byte window of one W row.
 *
 * Why this shape. A flat stream of 16-byte loads reaches 0.90 of the device copy
 * bandwidth on the H100 (gemv4_flat's probe); the earlier kernels load two rows at
 * once (8 bytes each) or 16-row tiles, which the DRAM sees as shorter runs. Here a
 * warp always reads the same window w of the rows it owns (ceil(K / 1024) windows
 * per row; the warps of a block cover all windows of R neighbouring rows, so a
 * block sweeps its rows front to back), which keeps the lane's 32 x values in
 * registers (as f32) for the whole kernel: no x traffic, no operand shuffling.
 *
 * Decode. A lane's 32 elements lie in one absmax block (blocksize >= 32, the
 * block grid is aligned to 32 elements and so is a lane's first element). Each
 * byte is looked up in a shared-memory table of f32 pairs (code[first],
 * code[second]): 16 copies of the 256 entries, lane l reading copy l % 16 (a warp's
 * LDS.64 is served per half-warp, so it never conflicts), the byte taken out by
 * one PRMT and the address formed by one LEA. Until session 14 the table had 32
 * copies (64 KB); half of it is 0-2 % faster at M = 1 and 1-4 % at M = 2 on the H100
 * with the same instruction count (a 64 KB table at a 64 KB-aligned address, its
 * address one PRMT, was 2-5 % slower at M = 1; docs/linear-cuda-history.md).
 * The lane sums code * x in f32 (four chains) and multiplies the sum by its
 * block's absmax (rebuilt from the nested state with dequantize's own roundings).
 * The weight is therefore never rounded: the result is a f32 dot product of x with
 * code * absmax, closer to the float64 reference than any kernel that rounds W to
 * bf16, but not bit-identical to dequantize + GEMM (a non-exact choice, like
 * gemv4_flat and gemv4_tc).
 *
 * Sums. The lane values of a batch of rows are added over the warp in one
 * butterfly (each step halves the rows a lane carries), the window sums of a row
 * meet in shared memory and are added in window order at the end: results are
 * bit-identical from run to run and independent of timing.
 *
 * Order in a block: griddepcontrol.launch_dependents; the code tables' loads; the
 * first two batches of W loads; the decode table; griddepcontrol.wait; x. The weight
 * is read before the wait only when it is ready (fully written before this launch was
 * enqueued, fq_lin4_weight.ready), so a call starts streaming while the previous
 * kernel finishes; otherwise the wait comes first. One block per SM (16 warps of 128
 * registers fill the register file; two 8-warp blocks on small weights); rows split
 * evenly over the blocks. In the main loop each row slot takes the warp's
 * next row, in the source, before the row it holds is decoded (1-6 % faster at M = 1,
 * 7-9 % at M = 2 than reloading a whole batch after its sums). The SASS places those
 * loads after the decode of all the batch's rows either way (ptxas reuses the rows'
 * registers at the 128-register cap), so the gain is in its schedule, not in more
 * loads in flight (docs/linear-cuda-history.md, session 9).
 *
 * Measured (H100 SXM, M = 1, NF4 + double quant, bf16; docs/linear-cuda.md):
 * 21504x3072 16.7-16.9 us (cuBLASLt bf16 48.8-49.4 in the same runs), 0.68-0.69 of the
 * copy bandwidth; in session 4, 19.4 us (gemv4_flat 24.1). Session 8 (SASS, ncu): ~123
 * instructions per row and window in the main loop (32 FFMA, 16 PRMT + 16 IMAD + 16
 * LDS for the lookups), 46 % issue utilisation, 3.7 warps per scheduler (128
 * registers), 0.86 of them eligible. Tried and slower: an L2 prefetch per row ahead of
 * the loads (the uniform-datapath loop it compiles to costs more than it hides),
 * branch-free clamped loads, the absmax of a block's rows computed into shared memory
 * at the start with three batches in flight (18432x3072: 20.0 vs 17.0 us), and a
 * per-warp cp.async ring in shared memory with 24 warps (28.8 vs 19.4 us: the ring's
 * copies and reads on top of the table lookups saturate the shared-memory pipe), and
 * (session 10) a per-warp ring filled by bulk copies, each warp refilling its own
 * slots: 18.5-20.7 vs 16.5 us on 21504x3072, slower with more slots in flight. */
#include "kernels/cuda/lin4_common.cuh"

#define GW_WIN_ELEMS 1024 /* one warp load: 32 lanes x 32 elements (16 bytes) */
#define GW_MAX_K 16384
#define GW_TBL_BYTES (256 * 16 * 8) /* f32 pairs, 16 copies */
#define GW_PART_CAP (32 << 10)      /* bytes of per-window row sums per block */

typedef struct {
    fq_lin4_weight w;
    const void *x; /* [m, k] */
    int x_dtype;
    void *y; /* [m, n] */
    int y_dtype;
    fq_lin4_epilogue e;
    int lg2bs;
    int wins; /* ceil(K / 1024) windows per row */
    int R;    /* rows a block works on at once (warps = wins * R) */
    int pf;   /* 1: L2 prefetch of the block's rows before the wait */
    int early; /* 1: the weight is ready (fq_lin4_weight.ready): its loads and the table
                * build go before griddepcontrol.wait, only x waits for the previous kernel */
} gw_args;

/* One row in flight: its 16 bytes and the raw absmax state of the lane's block. */
enum { GW_ORD_BEFORE, GW_ORD_BATCH, GW_ORD_AFTER }; /* see consume() */

struct gw_row {
    uint4 w;
    uint32_t q;  /* nested: the 8-bit absmax code */
    float am;    /* nested: the nested absmax; else the absmax itself */
};

/* L2 prefetch of the packed bytes of rows [r0, r1) in 64 KB pieces (sm_90; one thread) */
static __device__ __forceinline__ void gw_prefetch_rows(const uint8_t *packed, int64_t rowb, int64_t r0, int64_t r1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const int64_t b0 = r0 * rowb, bytes = (r1 - r0) * rowb;
    for (int64_t o = 0; o < bytes; o += 1 << 16) {
        const uint32_t n = (uint32_t)min((int64_t)1 << 16, bytes - o);
        fq_bulk_prefetch_l2(packed + b0 + o, n);
    }
#else
    (void)packed; (void)rowb; (void)r0; (void)r1;
#endif
}

/* x[m, k0 .. k0 + 32) as f32 (0 past K) */
static __device__ __forceinline__ void gw_load_x(const void *x, int dt, int64_t off, int valid, float (&xf)[32]) {
    if (!valid) {
#pragma unroll
        for (int i = 0; i < 32; i++) xf[i] = 0.0f;
        return;
    }
    if (dt == FQ_F32) {
        const float4 *p = (const float4 *)((const float *)x + off);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const float4 v = __ldg(p + i);
            xf[4 * i] = v.x;
            xf[4 * i + 1] = v.y;
            xf[4 * i + 2] = v.z;
            xf[4 * i + 3] = v.w;
        }
        return;
    }
    const uint4 *p = (const uint4 *)((const uint16_t *)x + off);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const uint4 v = __ldg(p + i);
        const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const float2 f = dt == FQ_BF16 ? fq_mma_t<__nv_bfloat16>::unpack(u[j]) : fq_mma_t<__half>::unpack(u[j]);
            xf[8 * i + 2 * j] = f.x;
            xf[8 * i + 2 * j + 1] = f.y;
        }
    }
}

/* The decode table: entry b (a byte, two nibbles), copy c at word pair b * 16 + c;
 * eight neighbouring threads store one 128-byte entry, so a store phase covers every
 * bank once. The caller syncs before (qm_s) and after. */
static __device__ __forceinline__ void gw_build_table(uint2 *tbl, const float *qm_s) {
    for (int i = threadIdx.x; i < 256 * 8; i += blockDim.x) {
        const int b = i >> 3, c = i & 7; /* 16-byte column c holds copies 2c, 2c+1 */
        const uint32_t first = __float_as_uint(qm_s[b >> 4]), second = __float_as_uint(qm_s[b & 15]);
        *(uint4 *)(tbl + b * 16 + 2 * c) = make_uint4(first, second, first, second);
    }
}

/* (code of the byte's first element, code of its second) from the lane's copy of the
 * table; lbase = the table's shared address + 8 * (lane % 16) */
static __device__ __forceinline__ float2 gw_pair(uint32_t lbase, uint32_t wd, int byte) {
    const uint32_t addr = lbase + (__byte_perm(wd, 0u, 0x4440u | (uint32_t)byte) << 7); /* PRMT, LEA */
    float2 v; /* a shared-space address (a generic pointer costs a window-base add too) */
    asm volatile("ld.shared.v2.f32 {%0,%1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr));
    return v;
}

/* One row's 16 bytes (the lane's 32 elements) against x, in four f32 chains. */
template <int M>
static __device__ __forceinline__ void gw_dot(uint4 w, uint32_t lbase, const float (&xf)[M][32], float (&s)[M][4]) {
#pragma unroll
    for (int m = 0; m < M; m++) s[m][0] = s[m][1] = s[m][2] = s[m][3] = 0.0f;
    const uint32_t wd[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int by = 0; by < 4; by++) {
            const float2 c = gw_pair(lbase, wd[j], by);
            const int i = 8 * j + 2 * by, ch = 2 * (by & 1); /* four chains */
#pragma unroll
            for (int m = 0; m < M; m++) {
                s[m][ch] = fmaf(c.x, xf[m][i], s[m][ch]);
                s[m][ch + 1] = fmaf(c.y, xf[m][i + 1], s[m][ch + 1]);
            }
        }
}

/* The U row sums of a batch (rows rc, rc + R, ...) over the warp at once: each
 * butterfly step halves the rows a lane carries (lane bit 4, then 3, ... picks which
 * half it keeps); the window's sum of each row goes to part. */
template <int M, int U>
static __device__ __forceinline__ void gw_sums(float (&v)[M][U], int lane, int64_t rc, int R, int64_t rb0,
                                               int64_t rb1, int wins, int wi, float *part) {
#pragma unroll
    for (int m = 0; m < M; m++) {
        float t[U];
#pragma unroll
        for (int u = 0; u < U; u++) t[u] = v[m][u];
        int h = U, bit = 16;
#pragma unroll
        for (; h > 1; h >>= 1, bit >>= 1) {
            const bool up = (lane & bit) != 0;
#pragma unroll
            for (int j = 0; j < h / 2; j++) {
                const float keep = up ? t[j + h / 2] : t[j], send = up ? t[j] : t[j + h / 2];
                t[j] = keep + __shfl_xor_sync(0xffffffffu, send, bit);
            }
        }
#pragma unroll
        for (; bit >= 1; bit >>= 1) t[0] += __shfl_xor_sync(0xffffffffu, t[0], bit);
        /* lane bits 4, 3, ... (log2 U of them) name the row whose sum it holds */
        const int row = U == 1 ? 0 : lane >> (5 - (U == 2 ? 1 : U == 4 ? 2 : 3));
        const int64_t r = rc + (int64_t)row * R;
        if ((lane & ((32 / U) - 1)) == 0 && r < rb1) part[((r - rb0) * M + m) * wins + wi] = t[0];
    }
}

/* The block's rows: the window sums in window order, the epilogue, the store. */
static __device__ __forceinline__ void gw_store(void *y, int y_dtype, const fq_lin4_epilogue &e, const float *part,
                                                int64_t rb0, int64_t rb1, int64_t N, int M, int wins) {
    const int64_t nr = rb1 - rb0;
    for (int64_t i = threadIdx.x; i < nr * M; i += blockDim.x) {
        const int64_t r = i / M;
        const int m = (int)(i - r * M);
        const float *p = part + i * wins;
        float v = p[0];
        for (int w = 1; w < wins; w++) v += p[w];
        const int64_t n = rb0 + r;
        fq_stf(y, y_dtype, (int64_t)m * N + n, fq_epi(e, n, v));
    }
}

template <bool NESTED, int M, int U, int ORD>
__global__ void __launch_bounds__(512, 1) gemv4_win_kernel(gw_args a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    extern __shared__ __align__(16) uint8_t gw_sm[];
    uint2 *tbl = (uint2 *)gw_sm;                      /* [256][16] f32 pairs */
    float *code_s = (float *)(gw_sm + GW_TBL_BYTES);  /* nested map, 256 */
    float *qm_s = code_s + 256;                       /* 16 codes */
    float *part = qm_s + 16;                          /* [rows of the block][M][wins] */

    const int64_t N = a.w.n, K = a.w.k;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wins = a.wins, R = a.R;
    const int wi = warp % wins, ro = warp / wins;
    const int64_t rb0 = N * blockIdx.x / gridDim.x, rb1 = N * (blockIdx.x + 1) / gridDim.x;
    const int64_t k0 = (int64_t)wi * GW_WIN_ELEMS + 32 * lane; /* this lane's first element of a row */
    const bool on = k0 < K;                                    /* the last window may be partial */

#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
    if (a.pf && tid == 0 && rb1 > rb0) gw_prefetch_rows(a.w.packed, K >> 1, rb0, rb1); /* safe before the wait */
    auto grid_wait = [] {
#if __CUDA_ARCH__ >= 900
        asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
    };
    if (!a.early) grid_wait();

    /* load cursor: this warp's next row, as pointers stepped by R rows (no 64-bit
     * multiplies per row); rows past the warp's last and lanes past K load nothing */
    const int nrow = rb1 - rb0 > ro ? (int)((rb1 - rb0 - ro + R - 1) / R) : 0;
    int li = on ? 0 : nrow;
    const int64_t estep = (int64_t)R * K;
    const uint8_t *lp = a.w.packed + (((rb0 + ro) * K + k0) >> 1);
    int64_t le = (rb0 + ro) * K + k0; /* flat element index of the lane's first element */
    auto issue1 = [&](gw_row &r) {
        r.w = make_uint4(0, 0, 0, 0);
        r.q = 0;
        r.am = 0.0f;
        if (li < nrow) {
            r.w = fq_lin4_ld_stream16(lp);
            const int64_t blk = le >> a.lg2bs;
            if (NESTED) {
                r.q = __ldg(a.w.qabsmax + blk);
                r.am = __ldg(&a.w.nested_absmax[blk >> 8]);
            } else {
                r.am = __ldg(&a.w.absmax[blk]);
            }
            lp += estep >> 1;
            le += estep;
        }
        li++;
    };
    auto issue = [&](gw_row (&b)[U]) {
#pragma unroll
        for (int u = 0; u < U; u++) issue1(b[u]);
    };
    /* the code tables' few loads go before the W loads: issued after them, they returned
     * only behind the whole first two batches (ncu, 21504x3072: ~12 % of a call's warp
     * samples were the table stores waiting for them) */
    float qpre = 0.0f, cpre[2] = {0.0f, 0.0f};
    if (tid < 16) qpre = __ldg(&a.w.quant_map[tid]);
    if (NESTED)
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const int i = tid + j * (int)blockDim.x;
            if (i < 256) cpre[j] = __ldg(&a.w.nested_code[i]);
        }
    gw_row bA[U], bB[U];
    issue(bA);
    issue(bB);

    float xf[M][32];
    if (!a.early) {
#pragma unroll
        for (int m = 0; m < M; m++) gw_load_x(a.x, a.x_dtype, (int64_t)m * K + k0, on, xf[m]);
    }
    if (tid < 16) qm_s[tid] = qpre;
    if (NESTED) {
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const int i = tid + j * (int)blockDim.x;
            if (i < 256) code_s[i] = cpre[j];
        }
        for (int i = tid + 2 * (int)blockDim.x; i < 256; i += blockDim.x) code_s[i] = __ldg(&a.w.nested_code[i]);
    }
    __syncthreads();
    gw_build_table(tbl, qm_s);
    if (a.early) {
        grid_wait(); /* x may be the previous kernel's output */
#pragma unroll
        for (int m = 0; m < M; m++) gw_load_x(a.x, a.x_dtype, (int64_t)m * K + k0, on, xf[m]);
    }
    __syncthreads();

    const uint32_t lbase = fq_smem_addr(gw_sm) + 8u * (uint32_t)(lane & 15);

    /* compute cursor */
    int64_t rc = rb0 + ro;
    /* ORD: when a row's slot takes the warp's next row (in row order either way):
     * GW_ORD_BEFORE (the default) before the row's decode, which works on a copy of its
     * bytes; GW_ORD_AFTER as soon as the row is decoded; GW_ORD_BATCH after the whole
     * batch's sums (the order before session 8). H100, one run, 21504x3072, in that
     * order: M = 1 16.5 / 17.2 / 17.6 us, M = 2 19.4 / 22.5 / 21.1 us. ptxas places the
     * loads itself: in the SASS each batch's reloads follow the decode of all its rows
     * in every order, so the order is a hint about the schedule, not exact positions. */
    auto consume = [&](gw_row (&b)[U]) {
        if (rc >= rb1) return; /* warp-uniform */
        float v[M][U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const gw_row cur = b[u];
            if (ORD == GW_ORD_BEFORE) issue1(b[u]);
            float s[M][4];
            gw_dot<M>(cur.w, lbase, xf, s);
            float am = cur.am;
            if (NESTED) am = __fadd_rn(fq_lin4_mul_ftz(code_s[cur.q], am), a.w.offset);
#pragma unroll
            for (int m = 0; m < M; m++) v[m][u] = ((s[m][0] + s[m][1]) + (s[m][2] + s[m][3])) * am;
            if (ORD == GW_ORD_AFTER) issue1(b[u]);
        }
        gw_sums<M, U>(v, lane, rc, R, rb0, rb1, wins, wi, part);
        rc += (int64_t)U * R;
    };
    /* two batches of U rows in flight; a batch is reloaded as soon as it is used */
    while (rc < rb1) {
        consume(bA);
        if (ORD == GW_ORD_BATCH) issue(bA);
        if (rc >= rb1) break;
        consume(bB);
        if (ORD == GW_ORD_BATCH) issue(bB);
    }
    __syncthreads();

    gw_store(a.y, a.y_dtype, a.e, part, rb0, rb1, N, M, wins);
#else
    (void)a;
    __trap(); /* never launched: the host needs sm_80 */
#endif
}

typedef void (*gw_fn)(gw_args);
/* configurations: {most warps per block, batch: 0 the longest without spills (4
 * rows at M = 1, 2 at M = 2; 8 and 4 spill), 1 half of it} */
#define GW_SHAPES 3
static const int g_gw_nw[GW_SHAPES] = {16, 16, 8};
static const int g_gw_half[GW_SHAPES] = {0, 1, 0};

/* [nested][M - 1][half batch][load order] */
#define GW_RE(NE, M, U) \
    {gemv4_win_kernel<NE, M, U, GW_ORD_BEFORE>, gemv4_win_kernel<NE, M, U, GW_ORD_BATCH>, \
     gemv4_win_kernel<NE, M, U, GW_ORD_AFTER>}
static const gw_fn g_gw[2][2][2][3] = {
    {{GW_RE(false, 1, 4), GW_RE(false, 1, 2)}, {GW_RE(false, 2, 2), GW_RE(false, 2, 1)}},
    {{GW_RE(true, 1, 4), GW_RE(true, 1, 2)}, {GW_RE(true, 2, 2), GW_RE(true, 2, 1)}},
};

static size_t gw_smem(int64_t rows, int64_t m, int wins) {
    return GW_TBL_BYTES + (256 + 16) * 4 + (size_t)(rows * m * wins) * 4;
}

extern "C" int fq_cuda_gemv4_win_supported(const fq_lin4_weight *w, const fq_lin4_io *io) {
    const int xt = io->x_dtype, yt = io->y_dtype;
    return (xt == FQ_BF16 || xt == FQ_F16 || xt == FQ_F32) && (yt == FQ_BF16 || yt == FQ_F16 || yt == FQ_F32) &&
           io->m >= 1 && io->m <= 2 && w->blocksize >= 32 && w->k >= 32 && w->k % 32 == 0 && w->k <= GW_MAX_K &&
           w->n >= 1 && ((uintptr_t)io->x & 15) == 0 && ((uintptr_t)w->packed & 15) == 0 && w->quant_map != NULL;
}

extern "C" int fq_cuda_gemv4_win_prepare(void) {
    const int bytes = (int)gw_smem(1, 1, 1) + GW_PART_CAP;
    for (int n = 0; n < 2; n++)
        for (int m = 0; m < 2; m++)
            for (int h = 0; h < 2; h++)
                for (int r = 0; r < 3; r++) {
                    cudaError_t e =
                        cudaFuncSetAttribute(g_gw[n][m][h][r], cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
                    if (e != cudaSuccess) return (int)e;
                }
    return (int)cudaSuccess;
}

/* cfg (0 = automatic): bits 0..1 block shape (0: automatic, see below; 1: up to 16
 * warps, batches of 4 rows at M = 1 and 2 at M = 2; 2: the same with half the
 * batch; 3: up to 8 warps); bit 4: L2 prefetch of each block's rows before the
 * wait; bits 3 and 5, the load order (consume()): by default each row's next load
 * is issued before the row is decoded; bit 3: right after it is decoded; bit 5:
 * after the batch's sums (the order before session 8); bit 6: wait before the
 * first W load even when the weight is ready; bit 7: plain launch (no programmatic
 * dependent launch). */
extern "C" int fq_cuda_gemv4_win(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                                 int sm_count, int cfg, cudaStream_t stream) {
    if (!fq_cuda_gemv4_win_supported(w, io)) return (int)cudaErrorInvalidValue;
    if (io->m <= 0) return (int)cudaSuccess;
    const int early = w->ready && !(cfg & 0x40);
    /* automatic shape: 16 warps; 8 on a ready weight of <= 2^24 elements at M = 1,
     * where two calls' blocks then share an SM and the next call streams while this
     * one finishes (3072x3072: 4.3 vs 6.6 us; with more rows per block 16 warps
     * keep more loads in flight and win: 21504x3072 17.7 vs 21.6 us) */
    const int shp = cfg & 3;
    const int s = shp != 0 ? shp - 1 : early && io->m == 1 && w->n * w->k <= ((int64_t)1 << 24) ? 2 : 0;
    const int wins = (int)((w->k + GW_WIN_ELEMS - 1) / GW_WIN_ELEMS);
    int R = g_gw_nw[s] / wins;
    if (R < 1) R = 1;
    /* one block per SM, more when a block's row sums would not fit */
    int64_t blocks = sm_count > 0 ? sm_count : 132;
    const int64_t per_row = io->m * wins * 4;
    const int64_t max_rows = GW_PART_CAP / per_row; /* >= 256 */
    if (blocks < (w->n + max_rows - 1) / max_rows) blocks = (w->n + max_rows - 1) / max_rows;
    if (blocks > w->n) blocks = w->n;
    if (blocks > 0x7fffffff) return (int)cudaErrorInvalidConfiguration;
    const int64_t rows = (w->n + blocks - 1) / blocks;
    gw_args a;
    a.w = *w;
    a.x = io->x;
    a.x_dtype = io->x_dtype;
    a.y = io->y;
    a.y_dtype = io->y_dtype;
    a.e = *e;
    a.lg2bs = fq_log2i(w->blocksize);
    a.wins = wins;
    a.R = R;
    a.pf = (cfg & 0x10) ? 1 : 0;
    a.early = early;
    const gw_fn fn = g_gw[w->nested ? 1 : 0][io->m - 1][g_gw_half[s]]
                         [(cfg & 0x20) ? GW_ORD_BATCH : (cfg & 0x08) ? GW_ORD_AFTER : GW_ORD_BEFORE];
    const size_t smem = gw_smem(rows, io->m, wins);
    const unsigned threads = (unsigned)(wins * R * 32);
    return fq_lin4_launch(fn, (unsigned)blocks, threads, smem, stream, a, (cfg & 0x80) != 0);
}

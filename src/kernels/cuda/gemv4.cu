/* 4-bit linear layers for small M: the reference scalar kernel (any format and
 * shape) and the streaming tensor-core kernel; plus the elementwise epilogue
 * kernels the cuBLASLt fallback uses.
 *
 * gemv4_tc: each warp owns a 16-row tile of W and a contiguous range of K in
 * 64-element segments. For a segment, lane (g = lane/4, t = lane%4) streams the
 * 8 bytes [8t, 8t+8) of rows g and g+8 (16 elements each) and the matching 16
 * elements of x rows g (and g+8). Those feed 4 mma.sync m16n8k16 steps with W as
 * the A operand (16 rows) and x as the B operand (8 columns = 8 rows of x):
 * step s uses byte 2s (elements 16t+4s, +1 -> A slots 2t, 2t+1) and byte 2s+1
 * (elements +2, +3 -> slots 2t+8, 2t+9), and x elements 16t+4s .. +3 in the same
 * slots of B. The k order inside an MMA is thus permuted, identically for A and
 * B, which leaves the dot product unchanged and lets every lane read contiguous
 * bytes. A segment lies inside one absmax block (blocksize >= 64 and K a multiple
 * of it), so its partial sums are scaled by absmax in f32 after the MMAs: the
 * only rounding of W is that of the code value to the MMA type. */
#include "kernels/cuda/lin4_common.cuh"

/* ---- reference kernel ------------------------------------------------------------ */

typedef struct {
    fq_lin4_weight w;
    fq_lin4_io io;
    fq_lin4_epilogue e;
    int lg2bs;
} simple_args;

/* One warp per output feature n and group of up to 8 rows of x; lanes stride K.
 * Every element is decoded exactly as dequantize does: code[nibble] * absmax of its
 * flat block, with the flat index n*K + k (blocks may straddle rows; K may be odd). */
template <bool NESTED>
__global__ void __launch_bounds__(256) gemv4_simple_kernel(simple_args a) {
    __shared__ float qm_s[16];
    __shared__ float code_s[256];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid < 16) qm_s[tid] = a.w.quant_map[tid];
    if (NESTED) code_s[tid] = a.w.nested_code[tid];
    __syncthreads();
    const int64_t N = a.w.n, K = a.w.k, M = a.io.m;
    for (int64_t n = (int64_t)blockIdx.x * 8 + warp; n < N; n += (int64_t)gridDim.x * 8) {
        for (int64_t m0 = (int64_t)blockIdx.y * 8; m0 < M; m0 += (int64_t)gridDim.y * 8) {
            const int mc = (int)(M - m0 < 8 ? M - m0 : 8);
            float acc[8];
#pragma unroll
            for (int j = 0; j < 8; j++) acc[j] = 0.0f;
            for (int64_t k = lane; k < K; k += 32) {
                const int64_t f = n * K + k;
                const uint32_t byte = a.w.packed[f >> 1];
                const uint32_t nib = (f & 1) ? (byte & 15u) : (byte >> 4);
                const int64_t blk = f >> a.lg2bs;
                const float am = NESTED ? code_s[a.w.qabsmax[blk]] * a.w.nested_absmax[blk >> 8] + a.w.offset
                                        : a.w.absmax[blk];
                const float wv = qm_s[nib] * am;
#pragma unroll
                for (int j = 0; j < 8; j++)
                    if (j < mc) acc[j] = fmaf(wv, fq_ldf(a.io.x, a.io.x_dtype, (m0 + j) * K + k), acc[j]);
            }
#pragma unroll
            for (int j = 0; j < 8; j++) {
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], o);
            }
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (j < mc && lane == j) fq_stf(a.io.y, a.io.y_dtype, (m0 + j) * N + n, fq_epi(a.e, n, acc[j]));
        }
    }
}

extern "C" int fq_cuda_gemv4_simple(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                                    cudaStream_t stream) {
    if (io->m <= 0 || w->n <= 0) return (int)cudaSuccess;
    simple_args a;
    a.w = *w;
    a.io = *io;
    a.e = *e;
    a.lg2bs = fq_log2i(w->blocksize);
    int64_t gx = (w->n + 7) / 8, gy = (io->m + 7) / 8;
    if (gx > 65535 * 16) gx = 65535 * 16;
    if (gy > 65535) gy = 65535;
    dim3 grid((unsigned)gx, (unsigned)gy);
    if (w->nested) gemv4_simple_kernel<true><<<grid, 256, 0, stream>>>(a);
    else gemv4_simple_kernel<false><<<grid, 256, 0, stream>>>(a);
    return (int)cudaGetLastError();
}

/* ---- streaming tensor-core kernel ------------------------------------------------- */

typedef struct {
    fq_lin4_weight w;
    const void *x;  /* [m, k], m <= 16 rows for this launch */
    void *y;        /* [m, n] */
    int y_dtype;
    int64_t m;
    fq_lin4_epilogue e;
    int ks;         /* warps per 16-row tile along K: 1, 2, 4, 8 */
    int lg2bs;
    int64_t ngroups; /* groups of 8/ks row tiles; block b runs groups b, b + gridDim.x, ... */
} tc_args;

#define GEMV_RED_FLOATS (8 * 2 * 4 * 32) /* [warp][NT*4][lane], NT <= 2 */
#define GEMV_SMEM_BYTES ((FQ_TBL_WORDS + 16 + 256 + GEMV_RED_FLOATS) * 4)

/* U: segments whose W loads a warp has in flight together. XPRE: x is loaded with
 * them (else just before its MMAs, from L1/L2: fewer registers, so U can be larger). */
template <typename T, int NT, int U, bool XPRE, bool NESTED>
__global__ void __launch_bounds__(256, 2) gemv4_tc_kernel(tc_args a) {
    extern __shared__ __align__(16) uint32_t sm[];
    uint32_t *tbl = sm;
    float *qm_s = (float *)(sm + FQ_TBL_WORDS);
    float *code_s = qm_s + 16;
    float *red = code_s + 256;
    const int tid = threadIdx.x;
    if (tid < 16) qm_s[tid] = __ldg(&a.w.quant_map[tid]);
    if (NESTED) code_s[tid] = __ldg(&a.w.nested_code[tid]);
    __syncthreads();
    fq_tbl_build<T>(tbl, qm_s);
    __syncthreads();

    const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int ks = a.ks, rtb = 8 / ks;
    const int wr = warp / ks, wk = warp - wr * ks;
    const int64_t N = a.w.n, K = a.w.k, M = a.m;
    const int64_t nseg = K >> 6;
    const int64_t s_beg = nseg * wk / ks, s_end = nseg * (wk + 1) / ks;
    const int64_t kb = K >> a.lg2bs; /* absmax blocks per row */
    const uint32_t *tl = tbl + lane;
    const T *xrow[NT];
    bool xok[NT];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const int64_t m = nt * 8 + g;
        xok[nt] = m < M;
        xrow[nt] = (const T *)a.x + (xok[nt] ? m : 0) * K + 16 * t;
    }

    for (int64_t grp = blockIdx.x; grp < a.ngroups; grp += gridDim.x) { /* block-uniform */
        const int64_t n0 = (grp * rtb + wr) * 16;
        float acc[NT][4];
#pragma unroll
        for (int i = 0; i < NT; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;

        if (n0 < N) {
            const int64_t r0 = min(n0 + g, N - 1), r1 = min(n0 + g + 8, N - 1);
            const uint8_t *p0 = a.w.packed + r0 * (K >> 1) + 8 * t;
            const uint8_t *p1 = a.w.packed + r1 * (K >> 1) + 8 * t;
            const int64_t bb0 = r0 * kb, bb1 = r1 * kb;

            for (int64_t s = s_beg; s < s_end; s += U) {
                uint2 wa[U], wb[U];
                float am0[U], am1[U];
                uint4 xa[XPRE ? U : 1][NT][2];
#pragma unroll
                for (int u = 0; u < U; u++) {
                    const int64_t seg = s + u;
                    if (seg < s_end) {
                        wa[u] = fq_ld_stream_u2(p0 + seg * 32);
                        wb[u] = fq_ld_stream_u2(p1 + seg * 32);
                        const int64_t kk = (seg * 64) >> a.lg2bs;
                        if (NESTED) {
                            const int64_t b0 = bb0 + kk, b1 = bb1 + kk;
                            am0[u] = code_s[__ldg(&a.w.qabsmax[b0])] * __ldg(&a.w.nested_absmax[b0 >> 8]) +
                                     a.w.offset;
                            am1[u] = code_s[__ldg(&a.w.qabsmax[b1])] * __ldg(&a.w.nested_absmax[b1 >> 8]) +
                                     a.w.offset;
                        } else {
                            am0[u] = __ldg(&a.w.absmax[bb0 + kk]);
                            am1[u] = __ldg(&a.w.absmax[bb1 + kk]);
                        }
                        if (XPRE) {
#pragma unroll
                            for (int nt = 0; nt < NT; nt++) {
                                xa[XPRE ? u : 0][nt][0] = xok[nt] ? fq_ld_u4(xrow[nt] + seg * 64) : make_uint4(0, 0, 0, 0);
                                xa[XPRE ? u : 0][nt][1] =
                                    xok[nt] ? fq_ld_u4(xrow[nt] + seg * 64 + 8) : make_uint4(0, 0, 0, 0);
                            }
                        }
                    }
                }
#pragma unroll
                for (int u = 0; u < U; u++) {
                    if (s + u < s_end) { /* warp-uniform */
                        if (!XPRE) {
#pragma unroll
                            for (int nt = 0; nt < NT; nt++) {
                                xa[0][nt][0] = xok[nt] ? fq_ld_u4(xrow[nt] + (s + u) * 64) : make_uint4(0, 0, 0, 0);
                                xa[0][nt][1] = xok[nt] ? fq_ld_u4(xrow[nt] + (s + u) * 64 + 8) : make_uint4(0, 0, 0, 0);
                            }
                        }
                        float cs[NT][4];
#pragma unroll
                        for (int i = 0; i < NT; i++)
#pragma unroll
                            for (int j = 0; j < 4; j++) cs[i][j] = 0.0f;
#pragma unroll
                        for (int st = 0; st < 4; st++) {
                            const uint32_t w0 = (st < 2) ? wa[u].x : wa[u].y;
                            const uint32_t w1 = (st < 2) ? wb[u].x : wb[u].y;
                            const int sh = (st & 1) * 16;
                            const uint32_t a0 = tl[((w0 >> sh) & 0xffu) * 32];
                            const uint32_t a2 = tl[((w0 >> (sh + 8)) & 0xffu) * 32];
                            const uint32_t a1 = tl[((w1 >> sh) & 0xffu) * 32];
                            const uint32_t a3 = tl[((w1 >> (sh + 8)) & 0xffu) * 32];
#pragma unroll
                            for (int nt = 0; nt < NT; nt++) {
                                const uint4 xv = xa[XPRE ? u : 0][nt][st >> 1];
                                const uint32_t b0 = (st & 1) ? xv.z : xv.x;
                                const uint32_t b1 = (st & 1) ? xv.w : xv.y;
                                fq_mma16816<T>(cs[nt], a0, a1, a2, a3, b0, b1);
                            }
                        }
#pragma unroll
                        for (int nt = 0; nt < NT; nt++) {
                            acc[nt][0] = fmaf(cs[nt][0], am0[u], acc[nt][0]);
                            acc[nt][1] = fmaf(cs[nt][1], am0[u], acc[nt][1]);
                            acc[nt][2] = fmaf(cs[nt][2], am1[u], acc[nt][2]);
                            acc[nt][3] = fmaf(cs[nt][3], am1[u], acc[nt][3]);
                        }
                    }
                }
            }
        }

        /* Sum the K-split partials of each row tile (fixed order), then store. */
        if (ks > 1) {
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++) red[(warp * NT * 4 + nt * 4 + i) * 32 + lane] = acc[nt][i];
            __syncthreads();
            if (wk == 0) {
                for (int j = 1; j < ks; j++)
#pragma unroll
                    for (int nt = 0; nt < NT; nt++)
#pragma unroll
                        for (int i = 0; i < 4; i++) acc[nt][i] += red[((warp + j) * NT * 4 + nt * 4 + i) * 32 + lane];
            }
            __syncthreads(); /* red is reused by the next group */
        }
        if (wk == 0 && n0 < N) {
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int64_t n = n0 + g + 8 * h;
                    if (n >= N) continue;
#pragma unroll
                    for (int j = 0; j < 2; j++) {
                        const int64_t m = nt * 8 + 2 * t + j;
                        if (m < M) fq_stf(a.y, a.y_dtype, m * N + n, fq_epi(a.e, n, acc[nt][h * 2 + j]));
                    }
                }
            }
        }
    }
}

static int is_mma_dtype(int dt) { return dt == FQ_BF16 || dt == FQ_F16; }
static int is_io_dtype(int dt) { return dt == FQ_BF16 || dt == FQ_F16 || dt == FQ_F32; }

extern "C" int fq_cuda_gemv4_tc_supported(const fq_lin4_weight *w, const fq_lin4_io *io) {
    return is_mma_dtype(io->x_dtype) && is_io_dtype(io->y_dtype) && w->blocksize >= 64 && w->k >= 64 &&
           w->k % w->blocksize == 0 && w->n >= 1 && ((uintptr_t)io->x & 15) == 0 &&
           ((uintptr_t)w->packed & 7) == 0 && w->quant_map != NULL;
}

template <typename T, int NT, int U, bool XPRE>
static void launch_tc(const tc_args &a, unsigned blocks, cudaStream_t stream) {
    if (a.w.nested) gemv4_tc_kernel<T, NT, U, XPRE, true><<<blocks, 256, GEMV_SMEM_BYTES, stream>>>(a);
    else gemv4_tc_kernel<T, NT, U, XPRE, false><<<blocks, 256, GEMV_SMEM_BYTES, stream>>>(a);
}

template <typename T>
static void launch_tc_t(const tc_args &a, int deep, unsigned blocks, cudaStream_t stream) {
    if (a.m <= 8) {
        if (deep) launch_tc<T, 1, 8, false>(a, blocks, stream);
        else launch_tc<T, 1, 4, true>(a, blocks, stream);
    } else {
        if (deep) launch_tc<T, 2, 4, false>(a, blocks, stream);
        else launch_tc<T, 2, 2, true>(a, blocks, stream);
    }
}

/* cfg (0 = automatic): bits 0..3 = K split ks (1, 2, 4 or 8 warps per row tile),
 * bit 4 = deep (twice the W segments in flight per warp, x loaded late). */
extern "C" int fq_cuda_gemv4_tc(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                                int sm_count, int cfg, cudaStream_t stream) {
    if (!fq_cuda_gemv4_tc_supported(w, io)) return (int)cudaErrorInvalidValue;
    if (io->m <= 0) return (int)cudaSuccess;
    const int64_t ntiles = (w->n + 15) / 16, nseg = w->k / 64;
    int ks = cfg & 15;
    const int deep = (cfg >> 4) & 1;
    if (ks != 1 && ks != 2 && ks != 4 && ks != 8) {
        /* Finest groups (one row tile, K over 8 warps) unless K is too short. */
        ks = 8;
        while (ks > 1 && ks > nseg) ks >>= 1;
    }
    const int rtb = 8 / ks;
    const int64_t ngroups = (ntiles + rtb - 1) / rtb;
    /* Two blocks fit per SM; give every block the same number of groups. */
    const int64_t slots = 2 * (int64_t)(sm_count > 0 ? sm_count : 132);
    const int64_t per_block = (ngroups + slots - 1) / slots;
    const int64_t blocks = (ngroups + per_block - 1) / per_block;
    if (blocks > 0x7fffffff) return (int)cudaErrorInvalidConfiguration;
    tc_args a;
    a.w = *w;
    a.e = *e;
    a.ks = ks;
    a.lg2bs = fq_log2i(w->blocksize);
    a.ngroups = ngroups;
    a.y_dtype = io->y_dtype;
    const size_t xs = io->x_dtype == FQ_F32 ? 4 : 2;
    const size_t ys = io->y_dtype == FQ_F32 ? 4 : 2;
    for (int64_t m0 = 0; m0 < io->m; m0 += 16) {
        a.m = io->m - m0 < 16 ? io->m - m0 : 16;
        a.x = (const char *)io->x + (size_t)(m0 * w->k) * xs;
        a.y = (char *)io->y + (size_t)(m0 * w->n) * ys;
        if (io->x_dtype == FQ_BF16) launch_tc_t<__nv_bfloat16>(a, deep, (unsigned)blocks, stream);
        else launch_tc_t<__half>(a, deep, (unsigned)blocks, stream);
        cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return (int)err;
    }
    return (int)cudaSuccess;
}

/* ---- streaming kernel for M <= 8 -------------------------------------------------------
 *
 * gemv4_stream: the weight is streamed once with 16-byte ld.global.nc.L1::no_allocate
 * loads. Two decodes: exact, as dequantize does, w = round_to_T(code[nibble] * absmax)
 * (f32 product with ftz; nested absmax = (code256[q] * nested_absmax, ftz) + offset,
 * two roundings); and (bf16 only) HMUL, w = bf16(bf16(code) * bf16(absmax)) in one
 * bf16x2 multiply. The decoded weights feed mma.sync m16n8k16 as the A operand (16 W
 * rows), x is the B operand (columns g < M of the 8; the rest zero), so the tensor
 * cores do the FMAs and the f32 accumulation.
 *
 * A warp owns a tile of 16 W rows and a slice of K in chunks of 128 elements (64
 * bytes per row). Lane (g, t) loads bytes [16t, 16t+16) of each chunk of rows g and
 * g+8: 32 consecutive elements each, inside one absmax block (blocksize >= 32, K a
 * multiple of it). MMA step s (0..7) of a chunk takes byte 2s (elements 4s, 4s+1 ->
 * A slots 2t, 2t+1) and byte 2s+1 (elements 4s+2, +3 -> slots 2t+8, 2t+9), and x
 * elements 4s .. 4s+3 of the same 32 in the same B slots: the k order inside an MMA
 * is permuted identically for A and B. Chunks are loaded U at a time, the next U
 * while the current ones are decoded (two register buffers); before that, each warp
 * asks L2 for its whole slice (cp.async.bulk.prefetch), so the DRAM sees every
 * request at once.
 *
 * The decode table (64 KB, entry b at byte b * 256, 128 bytes used, so that one byte
 * permute forms a lookup address): 256 byte values x 16 copies of the f32 pair (code[hi],
 * code[lo]) (exact; lane l reads copy l % 16, so the 16 lanes of each LDS.64 phase
 * hit distinct banks), or x 32 copies of the packed bf16 pair (HMUL; lane l reads
 * copy l). A block is 8 warps = ks K-slices x 8/ks row tiles; the ks partial sums
 * of a tile are added in a fixed order (results do not depend on timing). Each block
 * runs one group of tiles; the hardware balances the blocks over SMs. On sm_90 the
 * kernel is launched as a programmatic dependent launch. */

typedef struct {
    fq_lin4_weight w;
    const void *x; /* [m, k] */
    void *y;       /* [m, n] */
    int y_dtype;
    int64_t m;     /* <= 8 */
    fq_lin4_epilogue e;
    int ks;        /* K slices per tile: 1, 2, 4, 8 */
    int lg2bs;
} st_args;

#define ST_TBL_BYTES (256 * 256) /* entry b at b * 256 bytes (128 used): one PRMT forms an address */
#define ST_SMEM_BYTES (ST_TBL_BYTES + (16 + 256 + 8 * 4 * 32) * 4)

/* Decode variants: exact (f32 code * absmax, rounded once, as dequantize does);
 * HMUL (bf16 only: bf16(code) * bf16(absmax) in one bf16x2 multiply, i.e. the weight
 * rounded three times instead of once; half the shared-memory traffic); LOADS (a
 * bench-only probe that streams the weight and skips the arithmetic: wrong results). */
enum { ST_EXACT = 0, ST_HMUL = 1, ST_LOADS = 2 };

/* The L2 prefetches below (fq_bulk_prefetch_l2) send a warp's whole slice out at
 * once, beyond what registers could hold in flight. */

template <typename T, bool NESTED, int U, int DEC>
__global__ void __launch_bounds__(256, U >= 2 ? 2 : 3) gemv4_stream_kernel(st_args a) {
    extern __shared__ __align__(16) uint8_t st_sm[];
    float *qm_s = (float *)(st_sm + ST_TBL_BYTES);
    float *code_s = qm_s + 16;
    float *red = code_s + 256;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int ks = a.ks, wr = warp / ks, wk = warp - wr * ks;
    const int64_t N = a.w.n, K = a.w.k, M = a.m;
    const int64_t n0 = ((int64_t)blockIdx.x * (8 / ks) + wr) * 16;
    const int64_t C = (K + 127) >> 7; /* chunks per row */
    const int64_t c_beg = C * wk / ks, c_end = C * (wk + 1) / ks;
    const int64_t rowA = min(n0 + g, N - 1), rowB = min(n0 + g + 8, N - 1);
    const int64_t rowb = K >> 1; /* bytes per row */
    const uint8_t *pA = a.w.packed + rowA * rowb + 16 * t, *pB = a.w.packed + rowB * rowb + 16 * t;
    const int64_t eA = rowA * K + 32 * t, eB = rowB * K + 32 * t; /* flat index of the lane's chunk-0 element */
    const bool xok = g < M;
    const uint4 *xp = (const uint4 *)((const T *)a.x + (xok ? g : 0) * K + 32 * t);

    /* Programmatic dependent launch (sm_90): let the next kernel in the stream start
     * its blocks as ours retire; it waits in griddepcontrol.wait for our results. */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
    /* The warp's whole slice of W (16 rows) and the tile's absmax bytes into L2, before
     * waiting for the previous kernel: L2 is the coherent point, so a prefetch cannot
     * return data older than what that kernel writes there. */
    if (lane < 16 && c_beg < c_end) {
        const int64_t r = min(n0 + lane, N - 1);
        const int64_t b0 = c_beg * 64, b1 = min(c_end * 64, rowb);
        if (r == n0 + lane || lane == 0) fq_bulk_prefetch_l2(a.w.packed + r * rowb + b0, (uint32_t)(b1 - b0));
    } else if (lane == 16 && NESTED && wk == 0) {
        const int64_t kb = K >> a.lg2bs, r1 = min(n0 + 16, N);
        const int64_t q0 = (n0 * kb) & ~(int64_t)15, q1 = (r1 * kb + 15) & ~(int64_t)15;
        fq_bulk_prefetch_l2(a.w.qabsmax + q0, (uint32_t)(q1 - q0));
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory"); /* no-op without a programmatic launch */
#endif

    /* per chunk and lane: 16 bytes of rows A and B, their absmax (raw) */
    uint4 wa0[U], wb0[U], wa1[U], wb1[U];
    uint32_t qa0[U], qb0[U], qa1[U], qb1[U];
    float va0[U], vb0[U], va1[U], vb1[U];
    auto load = [&](int64_t cb, uint4 (&wa)[U], uint4 (&wb)[U], uint32_t (&qa)[U], uint32_t (&qb)[U], float (&va)[U],
                    float (&vb)[U]) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t c = cb + u;
            if (c < c_end && c * 128 + 32 * t < K) {
                wa[u] = fq_lin4_ld_stream16(pA + c * 64);
                wb[u] = fq_lin4_ld_stream16(pB + c * 64);
                const int64_t ba = (eA + c * 128) >> a.lg2bs, bb = (eB + c * 128) >> a.lg2bs;
                if (DEC == ST_LOADS) {
                    qa[u] = qb[u] = 0;
                    va[u] = vb[u] = 1.0f;
                } else if (NESTED) {
                    qa[u] = __ldg(&a.w.qabsmax[ba]);
                    qb[u] = __ldg(&a.w.qabsmax[bb]);
                    va[u] = __ldg(&a.w.nested_absmax[ba >> 8]);
                    vb[u] = __ldg(&a.w.nested_absmax[bb >> 8]);
                } else {
                    qa[u] = qb[u] = 0;
                    va[u] = __ldg(&a.w.absmax[ba]);
                    vb[u] = __ldg(&a.w.absmax[bb]);
                }
            } else {
                wa[u] = wb[u] = make_uint4(0, 0, 0, 0);
                qa[u] = qb[u] = 0;
                va[u] = vb[u] = 0.0f;
            }
        }
    };
    /* the first loads go out before the table is built */
    if (c_beg < c_end) load(c_beg, wa0, wb0, qa0, qb0, va0, vb0);

    if (tid < 16) qm_s[tid] = __ldg(&a.w.quant_map[tid]);
    if (NESTED) code_s[tid] = __ldg(&a.w.nested_code[tid]);
    __syncthreads();
    {
        const int b = tid; /* 256 threads: one table entry (byte value) each */
        const float lo = qm_s[b >> 4], hi = qm_s[b & 15];
        uint4 vv;
        if (DEC == ST_EXACT) { /* 16 copies of the f32 pair: lane l reads copy l % 16 */
            vv = make_uint4(__float_as_uint(lo), __float_as_uint(hi), __float_as_uint(lo), __float_as_uint(hi));
        } else { /* 32 copies of the packed pair: lane l reads copy l */
            const uint32_t v = fq_mma_t<T>::pack(lo, hi);
            vv = make_uint4(v, v, v, v);
        }
        uint4 *dst = (uint4 *)(st_sm + b * 256);
#pragma unroll
        for (int j = 0; j < 8; j++) dst[(j + b) & 7] = vv;
    }
    __syncthreads();

    const uint32_t tl = DEC == ST_EXACT ? (uint32_t)(lane & 15) * 8 : (uint32_t)lane * 4; /* this lane's copy */
    /* the decoded pair of byte j of word wd, scaled by am; the table offset
     * byte * 256 + tl is one byte permute: (tl byte 0, wd byte j, 0, 0) */
    auto dec = [&](uint32_t wd, int j, float am, __nv_bfloat162 am2) -> uint32_t {
        const uint32_t off = __byte_perm(tl, wd, 0x1140u + ((uint32_t)j << 4));
        if (DEC == ST_EXACT) {
            const float2 p = *(const float2 *)(st_sm + off);
            return fq_mma_t<T>::pack(fq_lin4_mul_ftz(p.x, am), fq_lin4_mul_ftz(p.y, am));
        } else {
            __nv_bfloat162 p = *(const __nv_bfloat162 *)(st_sm + off);
            p = __hmul2(p, am2);
            return *(uint32_t *)&p;
        }
    };
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float acc2[4] = {0.0f, 0.0f, 0.0f, 0.0f}; /* odd MMA steps: two independent chains */
    auto compute = [&](int64_t cb, const uint4 (&wa)[U], const uint4 (&wb)[U], const uint32_t (&qa)[U],
                       const uint32_t (&qb)[U], const float (&va)[U], const float (&vb)[U]) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t c = cb + u;
            if (c >= c_end) break; /* warp-uniform */
            if (DEC == ST_LOADS) {
                acc[0] += __uint_as_float((wa[u].x ^ wa[u].y ^ wa[u].z ^ wa[u].w ^ wb[u].x) & 0x3fffffffu);
                continue;
            }
            const bool kin = c * 128 + 32 * t < K;
            float amA, amB;
            if (NESTED) {
                amA = __fadd_rn(fq_lin4_mul_ftz(code_s[qa[u]], va[u]), a.w.offset);
                amB = __fadd_rn(fq_lin4_mul_ftz(code_s[qb[u]], vb[u]), a.w.offset);
            } else {
                amA = va[u];
                amB = vb[u];
            }
            if (!kin) amA = amB = 0.0f;
            const __nv_bfloat162 amA2 = __float2bfloat162_rn(amA), amB2 = __float2bfloat162_rn(amB);
            uint4 xv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) xv[i] = (xok && kin) ? __ldg(xp + c * 16 + i) : make_uint4(0, 0, 0, 0);
            const uint32_t wA[4] = {wa[u].x, wa[u].y, wa[u].z, wa[u].w};
            const uint32_t wB[4] = {wb[u].x, wb[u].y, wb[u].z, wb[u].w};
#pragma unroll
            for (int s = 0; s < 8; s++) {
                const int j = (s & 1) * 2;
                const uint32_t a0 = dec(wA[s >> 1], j, amA, amA2);
                const uint32_t a2 = dec(wA[s >> 1], j + 1, amA, amA2);
                const uint32_t a1 = dec(wB[s >> 1], j, amB, amB2);
                const uint32_t a3 = dec(wB[s >> 1], j + 1, amB, amB2);
                const uint4 &xq = xv[s >> 1];
                const uint32_t b0 = (s & 1) ? xq.z : xq.x, b1 = (s & 1) ? xq.w : xq.y;
                fq_mma16816<T>((s & 1) ? acc2 : acc, a0, a1, a2, a3, b0, b1);
            }
        }
    };

    for (int64_t cb = c_beg; cb < c_end; cb += 2 * U) {
        if (cb + U < c_end) load(cb + U, wa1, wb1, qa1, qb1, va1, vb1);
        compute(cb, wa0, wb0, qa0, qb0, va0, vb0);
        if (cb + 2 * U < c_end) load(cb + 2 * U, wa0, wb0, qa0, qb0, va0, vb0);
        if (cb + U < c_end) compute(cb + U, wa1, wb1, qa1, qb1, va1, vb1);
    }
#pragma unroll
    for (int i = 0; i < 4; i++) acc[i] += acc2[i];

    /* acc[h * 2 + j] = (W row n0 + g + 8h, x row 2t + j) */
    if (ks > 1) {
#pragma unroll
        for (int i = 0; i < 4; i++) red[(warp * 4 + i) * 32 + lane] = acc[i];
        __syncthreads();
        if (wk == 0)
            for (int j = 1; j < ks; j++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[i] += red[((warp + j) * 4 + i) * 32 + lane];
    }
    if (wk == 0) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int64_t n = n0 + g + 8 * h;
            if (n >= N) continue;
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const int64_t m = 2 * t + j;
                if (m < M) fq_stf(a.y, a.y_dtype, m * N + n, fq_epi(a.e, n, acc[h * 2 + j]));
            }
        }
    }
}

typedef void (*st_kernel_fn)(st_args);
#define ST_FNS(T, U, DEC) {gemv4_stream_kernel<T, false, U, DEC>, gemv4_stream_kernel<T, true, U, DEC>}
/* [bf16 = 0, f16 = 1][U = 2: 0, U = 1: 1][decode][nested] (f16 has no HMUL variant:
 * its absmax may not fit f16; it runs exact) */
static const st_kernel_fn g_st_fns[2][2][3][2] = {
    {{ST_FNS(__nv_bfloat16, 2, 0), ST_FNS(__nv_bfloat16, 2, 1), ST_FNS(__nv_bfloat16, 2, 2)},
     {ST_FNS(__nv_bfloat16, 1, 0), ST_FNS(__nv_bfloat16, 1, 1), ST_FNS(__nv_bfloat16, 1, 2)}},
    {{ST_FNS(__half, 2, 0), ST_FNS(__half, 2, 0), ST_FNS(__half, 2, 2)},
     {ST_FNS(__half, 1, 0), ST_FNS(__half, 1, 0), ST_FNS(__half, 1, 2)}},
};

extern "C" int fq_cuda_gemv4_stream_supported(const fq_lin4_weight *w, const fq_lin4_io *io) {
    return is_mma_dtype(io->x_dtype) && is_io_dtype(io->y_dtype) && io->m <= 8 && w->blocksize >= 32 &&
           w->k >= 32 && w->k % w->blocksize == 0 && w->n >= 1 && ((uintptr_t)io->x & 15) == 0 &&
           ((uintptr_t)w->packed & 15) == 0 && w->quant_map != NULL;
}

extern "C" int fq_cuda_gemv4_stream_prepare(void) {
    for (int i = 0; i < 2; i++)
        for (int u = 0; u < 2; u++)
            for (int d = 0; d < 3; d++)
                for (int n = 0; n < 2; n++) {
                    cudaError_t e = cudaFuncSetAttribute(g_st_fns[i][u][d][n], cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                         ST_SMEM_BYTES);
                    if (e != cudaSuccess) return (int)e;
                }
    return (int)cudaSuccess;
}

/* Automatic K slices and batch. The H100 sweeps (bench_linear --sweep, M = 1,
 * 2026-11-27) were fastest when all blocks fit in one wave of resident blocks, with
 * as many blocks as possible: 21504 x 3072 (1344 row tiles) U = 1 (3 blocks per SM) x
 * 2 slices = 336 blocks, 0.85 of a wave: 28.7 us, vs 30-51 us for the other choices;
 * 3072 x 15360 and 3072 x 3072 (192 tiles) U = 2 (2 blocks per SM) x 8 slices: 21.3 and
 * 7.1 us. So: the most blocks that fit in one wave (ties: U = 2, more bytes in flight
 * per warp); with more tiles than one wave holds, the fewest waves. A warp keeps at
 * least two chunks to stream. */
static void stream_pick(int64_t n, int64_t k, int sm_count, int *ks, int *small_u) {
    const int64_t tiles = (n + 15) / 16, C = (k + 127) / 128;
    const int64_t sms = sm_count > 0 ? sm_count : 132;
    int64_t best_blocks = -1;
    double best_waves = 0.0;
    *ks = 1;
    *small_u = 0;
    for (int u1 = 0; u1 < 2; u1++) {
        const int64_t slots = sms * (u1 ? 3 : 2);
        for (int s = 1; s <= 8; s *= 2) {
            if (s > 1 && C / s < 2) break;
            const int64_t blocks = (tiles * s + 7) / 8;
            const double waves = (double)blocks / (double)slots;
            int better;
            if (best_blocks < 0) better = 1;
            else if (waves <= 1.0 && best_waves <= 1.0) better = blocks > best_blocks;
            else if (waves <= 1.0 || best_waves <= 1.0) better = waves <= 1.0;
            else better = waves < best_waves;
            if (better) {
                best_blocks = blocks;
                best_waves = waves;
                *ks = s;
                *small_u = u1;
            }
        }
    }
}

/* cfg (0 = automatic): bits 0..3 = K slices ks (1, 2, 4 or 8; 0 = automatic, which
 * also chooses U); bit 4: U = 1 chunk per load batch instead of 2; bits 5..6: decode
 * (0 = automatic = exact, 1 = exact, 2 = HMUL (bf16 x; f16 runs exact),
 * 3 = loads only: a bench probe with wrong results); bit 7: plain launch (the caller
 * sets it before sm_90), else a programmatic dependent launch. */
extern "C" int fq_cuda_gemv4_stream(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                                    int sm_count, int cfg, cudaStream_t stream) {
    if (!fq_cuda_gemv4_stream_supported(w, io)) return (int)cudaErrorInvalidValue;
    if (io->m <= 0) return (int)cudaSuccess;
    int ks = cfg & 15, small_u = (cfg >> 4) & 1;
    const int dsel = (cfg >> 5) & 3;
    int dec = dsel == 0 ? ST_EXACT : dsel - 1;
    if (dec == ST_HMUL && io->x_dtype != FQ_BF16) dec = ST_EXACT; /* f16: its absmax may not fit f16 */
    if (ks != 1 && ks != 2 && ks != 4 && ks != 8) stream_pick(w->n, w->k, sm_count, &ks, &small_u);
    const int64_t tiles = (w->n + 15) / 16;
    const int64_t blocks = (tiles + 8 / ks - 1) / (8 / ks);
    if (blocks > 0x7fffffff) return (int)cudaErrorInvalidConfiguration;
    st_args a;
    a.w = *w;
    a.x = io->x;
    a.y = io->y;
    a.y_dtype = io->y_dtype;
    a.m = io->m;
    a.e = *e;
    a.ks = ks;
    a.lg2bs = fq_log2i(w->blocksize);
    const st_kernel_fn fn = g_st_fns[io->x_dtype == FQ_BF16 ? 0 : 1][small_u][dec][w->nested ? 1 : 0];
    /* cfg bit 7: before sm_90, no programmatic dependent launch */
    return fq_lin4_launch(fn, (unsigned)blocks, 256, ST_SMEM_BYTES, stream, a, (cfg & 0x80) != 0);
}

/* ---- elementwise epilogues ---------------------------------------------------------- */

__global__ void lin4_finish_kernel(const float *acc, fq_lin4_io io, int64_t n, fq_lin4_epilogue e) {
    const int64_t total = io.m * n;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float v = acc[i];
        fq_stf(io.y, io.y_dtype, i, fq_epi(e, i % n, v));
    }
}

__global__ void lin4_epilogue_kernel(fq_lin4_io io, int64_t n, fq_lin4_epilogue e) {
    const int64_t total = io.m * n;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float v = fq_ldf(io.y, io.y_dtype, i);
        fq_stf(io.y, io.y_dtype, i, fq_epi(e, i % n, v));
    }
}

__global__ void lin4_splitk_kernel(const float *part, int splits, fq_lin4_io io, int64_t n, fq_lin4_epilogue e) {
    const int64_t total = io.m * n;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        float v = part[i];
        for (int s = 1; s < splits; s++) v += part[(int64_t)s * total + i];
        fq_stf(io.y, io.y_dtype, i, fq_epi(e, i % n, v));
    }
}

static unsigned elementwise_blocks(int64_t total) {
    int64_t b = (total + 255) / 256;
    if (b > 65536) b = 65536;
    return (unsigned)(b > 0 ? b : 1);
}

extern "C" int fq_cuda_lin4_finish(const float *acc, const fq_lin4_io *io, int64_t n, const fq_lin4_epilogue *e,
                                   cudaStream_t stream) {
    if (io->m * n == 0) return (int)cudaSuccess;
    lin4_finish_kernel<<<elementwise_blocks(io->m * n), 256, 0, stream>>>(acc, *io, n, *e);
    return (int)cudaGetLastError();
}

extern "C" int fq_cuda_lin4_epilogue_inplace(const fq_lin4_io *io, int64_t n, const fq_lin4_epilogue *e,
                                             cudaStream_t stream) {
    if (io->m * n == 0 || (!e->bias && e->act == FQ_EPI_NONE)) return (int)cudaSuccess;
    lin4_epilogue_kernel<<<elementwise_blocks(io->m * n), 256, 0, stream>>>(*io, n, *e);
    return (int)cudaGetLastError();
}

extern "C" int fq_cuda_lin4_splitk_reduce(const float *part, int splits, const fq_lin4_io *io, int64_t n,
                                          const fq_lin4_epilogue *e, cudaStream_t stream) {
    if (io->m * n == 0) return (int)cudaSuccess;
    lin4_splitk_kernel<<<elementwise_blocks(io->m * n), 256, 0, stream>>>(part, splits, *io, n, *e);
    return (int)cudaGetLastError();
}

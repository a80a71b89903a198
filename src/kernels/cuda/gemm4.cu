/* 4-bit linear layers for large M on tensor cores (mma.sync m16n8k16, sm_80+).
 *
 * y[M, N] = x[M, K] . W[N, K]^T with W decoded tile by tile on chip; no bf16 copy
 * of W ever exists in device memory.
 *
 * A CTA computes a BM x BN tile of y with 8 warps (2 along M x 4 along N) over
 * K in tiles of 64. Per K tile, a multi-stage cp.async pipeline brings the x tile
 * (BM x 64, 16-byte chunks XOR-swizzled by row) and the packed W tile (BN rows x
 * 32 bytes) into shared memory. All threads then decode the packed tile into a
 * bf16/f16 tile in shared memory, each element exactly as dequantize computes it
 * (code[nibble] * absmax in f32, rounded once to the MMA type; the 16-entry code
 * table sits in 16 consecutive words, so lookups never conflict), and the warps
 * run the MMAs with ldmatrix from both tiles. The epilogue applies bias (and
 * later fused ops) in f32 and stores y in its dtype.
 *
 * Requires: x f16/bf16, blocksize >= 64 and K a multiple of it (each 64-wide K
 * tile of a row lies in one absmax block), 16-byte aligned x. */
#include "kernels/cuda/lin4_common.cuh"

#define GEMM_BK 64
#define GEMM_THREADS 256

typedef struct {
    fq_lin4_weight w;
    const void *x;
    void *y;
    int y_dtype;
    int64_t m;
    fq_lin4_epilogue e;
    int lg2bs;
} gemm_args;

template <int BM, int BN, int STAGES> struct gemm_cfg {
    static constexpr int X_STAGE = BM * GEMM_BK * 2; /* bytes */
    static constexpr int W_STAGE = BN * GEMM_BK / 2;
    static constexpr int B_TILE = BN * GEMM_BK * 2;
    static constexpr int SMEM = STAGES * (X_STAGE + W_STAGE) + B_TILE + 16 * 4 + 256 * 4;
    static constexpr int WTM = BM / 2, WTN = BN / 4; /* warp tile */
    static constexpr int MI = WTM / 16, NJ = WTN / 8;
    static constexpr int PARTS = BN * 2 / GEMM_THREADS; /* 16-byte packed parts per thread */
};

static __device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#else
    (void)addr;
    r[0] = r[1] = r[2] = r[3] = 0;
#endif
}

/* Byte offset of 16-byte chunk c of row r in a tile with 128-byte rows. */
static __device__ __forceinline__ int swz(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

template <typename T, int BM, int BN, int STAGES, bool NESTED>
__global__ void __launch_bounds__(GEMM_THREADS, (BM * BN > 128 * 128) ? 1 : 2) gemm4_mma_kernel(gemm_args a) {
    typedef gemm_cfg<BM, BN, STAGES> C;
    extern __shared__ __align__(128) uint8_t smem[];
    uint8_t *xs = smem;                               /* STAGES x [BM][128 B] */
    uint8_t *ws = xs + STAGES * C::X_STAGE;           /* STAGES x [BN][32 B]  */
    uint8_t *bt = ws + STAGES * C::W_STAGE;           /* [BN][128 B] decoded  */
    float *qm_s = (float *)(bt + C::B_TILE);          /* 16                   */
    float *code_s = qm_s + 16;                        /* 256 (nested)         */

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t M = a.m, N = a.w.n, K = a.w.k;
    const int64_t m0 = (int64_t)blockIdx.y * BM, n0 = (int64_t)blockIdx.x * BN;
    const int64_t ktiles = K / GEMM_BK;
    const int64_t kb = K >> a.lg2bs; /* absmax blocks per row */

    if (tid < 16) qm_s[tid] = __ldg(&a.w.quant_map[tid]);
    if (NESTED) code_s[tid] = __ldg(&a.w.nested_code[tid]);

    /* ---- loads of one K tile into stage st ---- */
    const T *xg = (const T *)a.x;
    auto load_tile = [&](int64_t kt, int st) {
        uint8_t *xd = xs + st * C::X_STAGE;
#pragma unroll
        for (int i = 0; i < BM * 8 / GEMM_THREADS; i++) {
            const int idx = tid + i * GEMM_THREADS, r = idx >> 3, c = idx & 7;
            const int64_t row = m0 + r;
            const bool ok = row < M;
            const T *src = xg + (ok ? row : 0) * K + kt * GEMM_BK + c * 8;
            fq_cp_async16(xd + swz(r, c), src, ok);
        }
        uint8_t *wd = ws + st * C::W_STAGE;
#pragma unroll
        for (int i = 0; i < (BN * 2 + GEMM_THREADS - 1) / GEMM_THREADS; i++) {
            const int idx = tid + i * GEMM_THREADS;
            if (idx < BN * 2) {
                const int r = idx >> 1, p = idx & 1;
                const int64_t row = n0 + r;
                const bool ok = row < N;
                const uint8_t *src = a.w.packed + (ok ? row : 0) * (K >> 1) + kt * (GEMM_BK / 2) + p * 16;
                fq_cp_async16(wd + r * 32 + p * 16, src, ok);
            }
        }
    };

    /* ---- absmax of this thread's decode rows, one K tile ahead ---- */
    constexpr int DP = C::PARTS > 0 ? C::PARTS : 1;
    float am_cur[DP];
    uint32_t q_nxt[DP];
    float v_nxt[DP];
    auto fetch_absmax = [&](int64_t kt) {
#pragma unroll
        for (int j = 0; j < DP; j++) {
            const int idx = tid + j * GEMM_THREADS;
            const int64_t row = n0 + (idx >> 1);
            if (kt < ktiles && idx < BN * 2 && row < N) {
                const int64_t blk = row * kb + ((kt * GEMM_BK) >> a.lg2bs);
                if (NESTED) {
                    q_nxt[j] = __ldg(&a.w.qabsmax[blk]);
                    v_nxt[j] = __ldg(&a.w.nested_absmax[blk >> 8]);
                } else {
                    v_nxt[j] = __ldg(&a.w.absmax[blk]);
                }
            } else {
                q_nxt[j] = 0;
                v_nxt[j] = 0.0f;
            }
        }
    };
    auto take_absmax = [&]() {
#pragma unroll
        for (int j = 0; j < DP; j++) {
            if (NESTED) am_cur[j] = code_s[q_nxt[j]] * v_nxt[j] + a.w.offset;
            else am_cur[j] = v_nxt[j];
        }
    };

    /* ---- decode the packed tile of stage st into bt ---- */
    auto decode_tile = [&](int st) {
        const uint8_t *wsrc = ws + st * C::W_STAGE;
#pragma unroll
        for (int j = 0; j < DP; j++) {
            const int idx = tid + j * GEMM_THREADS;
            if (idx < BN * 2) {
                const int r = idx >> 1, p = idx & 1;
                const uint4 pk = *(const uint4 *)(wsrc + r * 32 + p * 16);
                const uint32_t words[4] = {pk.x, pk.y, pk.z, pk.w};
                const float am = am_cur[j];
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    uint32_t o[4];
#pragma unroll
                    for (int b = 0; b < 4; b++) {
                        const uint32_t byte = (words[c] >> (8 * b)) & 0xffu;
                        o[b] = fq_mma_t<T>::pack(qm_s[byte >> 4] * am, qm_s[byte & 15u] * am);
                    }
                    *(uint4 *)(bt + swz(r, p * 4 + c)) = make_uint4(o[0], o[1], o[2], o[3]);
                }
            }
        }
    };

    float acc[C::MI][C::NJ][4];
#pragma unroll
    for (int i = 0; i < C::MI; i++)
#pragma unroll
        for (int j = 0; j < C::NJ; j++)
#pragma unroll
            for (int v = 0; v < 4; v++) acc[i][j][v] = 0.0f;

    const int wm = warp >> 2, wn = warp & 3;
    const uint32_t xs_addr = fq_smem_addr(xs), bt_addr = fq_smem_addr(bt);

    /* prologue */
    fetch_absmax(0);
#pragma unroll
    for (int st = 0; st < STAGES - 1; st++) {
        if (st < ktiles) load_tile(st, st);
        fq_cp_async_commit();
    }
    __syncthreads(); /* qm_s, code_s */
    take_absmax();
    fetch_absmax(1);

    for (int64_t kt = 0; kt < ktiles; kt++) {
        const int st = (int)(kt % STAGES);
        fq_cp_async_wait<STAGES - 2>();
        __syncthreads(); /* stage kt landed for everyone; previous MMAs are done with bt */
        decode_tile(st);
        take_absmax();
        fetch_absmax(kt + 2);
        {
            const int64_t nk = kt + STAGES - 1;
            if (nk < ktiles) load_tile(nk, (int)(nk % STAGES));
            fq_cp_async_commit();
        }
        __syncthreads(); /* bt complete */
        const uint32_t xa = xs_addr + st * C::X_STAGE;
#pragma unroll
        for (int s = 0; s < 4; s++) {
            uint32_t af[C::MI][4], bf[C::NJ][2];
#pragma unroll
            for (int i = 0; i < C::MI; i++) {
                const int r = wm * C::WTM + i * 16 + (lane & 15);
                ldmatrix_x4(af[i], xa + swz(r, 2 * s + (lane >> 4)));
            }
#pragma unroll
            for (int j = 0; j < C::NJ; j += 2) {
                const int q = lane >> 3;
                const int r = wn * C::WTN + j * 8 + (q >> 1) * 8 + (lane & 7);
                uint32_t t4[4];
                ldmatrix_x4(t4, bt_addr + swz(r, 2 * s + (q & 1)));
                bf[j][0] = t4[0];
                bf[j][1] = t4[1];
                bf[j + 1][0] = t4[2];
                bf[j + 1][1] = t4[3];
            }
#pragma unroll
            for (int i = 0; i < C::MI; i++)
#pragma unroll
                for (int j = 0; j < C::NJ; j++)
                    fq_mma16816<T>(acc[i][j], af[i][0], af[i][1], af[i][2], af[i][3], bf[j][0], bf[j][1]);
        }
    }
    fq_cp_async_wait<0>();

    /* epilogue */
    const int g = lane >> 2, t = lane & 3;
    const bool pair_ok = (N & 1) == 0;
#pragma unroll
    for (int j = 0; j < C::NJ; j++) {
        const int64_t n = n0 + wn * C::WTN + j * 8 + 2 * t;
        if (n >= N) continue;
        const bool has1 = n + 1 < N;
#pragma unroll
        for (int i = 0; i < C::MI; i++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int64_t m = m0 + wm * C::WTM + i * 16 + g + 8 * h;
                if (m >= M) continue;
                const float v0 = fq_epi(a.e, n, acc[i][j][2 * h]);
                if (has1 && pair_ok) {
                    fq_stf2(a.y, a.y_dtype, m * N + n, v0, fq_epi(a.e, n + 1, acc[i][j][2 * h + 1]));
                } else {
                    fq_stf(a.y, a.y_dtype, m * N + n, v0);
                    if (has1) fq_stf(a.y, a.y_dtype, m * N + n + 1, fq_epi(a.e, n + 1, acc[i][j][2 * h + 1]));
                }
            }
        }
    }
}

/* ---- configurations and launch ------------------------------------------------------- */

typedef void (*gemm_kernel_fn)(gemm_args);

template <typename T, int BM, int BN, int S> struct gemm_variant {
    static gemm_kernel_fn get(bool nested) {
        return nested ? gemm4_mma_kernel<T, BM, BN, S, true> : gemm4_mma_kernel<T, BM, BN, S, false>;
    }
    static constexpr int smem = gemm_cfg<BM, BN, S>::SMEM;
};

typedef struct {
    int bm, bn, smem;
    gemm_kernel_fn fn[2][2]; /* [f16 = 0, bf16 = 1][nested] */
    const char *name;
} gemm_config;

#define GEMM_CONFIG(BM, BN, S, NAME)                                                                   \
    {BM, BN, gemm_variant<__half, BM, BN, S>::smem,                                                    \
     {{gemm_variant<__half, BM, BN, S>::get(false), gemm_variant<__half, BM, BN, S>::get(true)},       \
      {gemm_variant<__nv_bfloat16, BM, BN, S>::get(false), gemm_variant<__nv_bfloat16, BM, BN, S>::get(true)}}, \
     NAME}

static const gemm_config *configs(void) {
    static const gemm_config c[FQ_GEMM4_MMA_CONFIGS] = {
        GEMM_CONFIG(128, 128, 3, "mma 128x128x64 s3"),
        GEMM_CONFIG(128, 256, 3, "mma 128x256x64 s3"),
        GEMM_CONFIG(64, 128, 4, "mma 64x128x64 s4"),
        GEMM_CONFIG(256, 128, 3, "mma 256x128x64 s3"),
    };
    return c;
}

extern "C" const char *fq_cuda_gemm4_mma_config_name(int cfg) {
    return cfg >= 1 && cfg <= FQ_GEMM4_MMA_CONFIGS ? configs()[cfg - 1].name : "auto";
}

extern "C" int fq_cuda_gemm4_mma_supported(const fq_lin4_weight *w, const fq_lin4_io *io) {
    const int xt = io->x_dtype, yt = io->y_dtype;
    return (xt == FQ_BF16 || xt == FQ_F16) && (yt == FQ_BF16 || yt == FQ_F16 || yt == FQ_F32) &&
           w->blocksize >= 64 && w->k >= GEMM_BK && w->k % w->blocksize == 0 && w->n >= 1 &&
           ((uintptr_t)io->x & 15) == 0 && ((uintptr_t)w->packed & 15) == 0 && w->quant_map != NULL;
}

extern "C" int fq_cuda_gemm4_mma_prepare(size_t smem_optin) {
    const gemm_config *c = configs();
    for (int i = 0; i < FQ_GEMM4_MMA_CONFIGS; i++) {
        if ((size_t)c[i].smem > smem_optin) continue;
        for (int t = 0; t < 2; t++)
            for (int n = 0; n < 2; n++) {
                cudaError_t e =
                    cudaFuncSetAttribute(c[i].fn[t][n], cudaFuncAttributeMaxDynamicSharedMemorySize, c[i].smem);
                if (e != cudaSuccess) return (int)e;
            }
    }
    return (int)cudaSuccess;
}

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

extern "C" int fq_cuda_gemm4_mma(const fq_lin4_weight *w, const fq_lin4_io *io, const fq_lin4_epilogue *e,
                                 int sm_count, size_t smem_optin, int cfg, cudaStream_t stream) {
    if (!fq_cuda_gemm4_mma_supported(w, io)) return (int)cudaErrorInvalidValue;
    if (io->m <= 0) return (int)cudaSuccess;
    const gemm_config *c = configs();
    int ci = cfg - 1;
    if (ci < 0 || ci >= FQ_GEMM4_MMA_CONFIGS || (size_t)c[ci].smem > smem_optin) {
        /* (configurations 1 and 3 need <= 77 KB: every sm_80+ part has that) */
        /* 128x128 unless that leaves the SMs short of two CTAs each: then 64x128. */
        const int64_t tiles = cdiv(io->m, 128) * cdiv(w->n, 128);
        ci = tiles >= 2 * (int64_t)(sm_count > 0 ? sm_count : 132) ? 0 : 2;
    }
    const gemm_config *cc = &c[ci];
    const int64_t gx = cdiv(w->n, cc->bn), gy = cdiv(io->m, cc->bm);
    if (gx > 0x7fffffff || gy > 65535) return (int)cudaErrorInvalidConfiguration;
    gemm_args a;
    a.w = *w;
    a.x = io->x;
    a.y = io->y;
    a.y_dtype = io->y_dtype;
    a.m = io->m;
    a.e = *e;
    a.lg2bs = fq_log2i(w->blocksize);
    cc->fn[io->x_dtype == FQ_BF16 ? 1 : 0][w->nested ? 1 : 0]<<<dim3((unsigned)gx, (unsigned)gy), GEMM_THREADS,
                                                                  cc->smem, stream>>>(a);
    return (int)cudaGetLastError();
}

/* Attention (see nn_cuda.h): out = softmax(q·kᵀ/sqrt(dh))·v per batch and head.
 *
 * MMA path (rnd bf16/f16, head dim <= 128): q, k and v (f32 [B, S, H*dh], values
 * already rounded to rnd by the ops before) are first packed exactly into 16-bit
 * head-major tiles [B*H, Sp, DP] (Sp = S rounded up to 128, DP = dh rounded up to
 * 16/32/64/128, zero padded). Then one CTA of NW warps takes 16*NW query rows of
 * one head, keeps them in registers as mma.sync A fragments, and streams K/V
 * tiles of 64 keys through shared memory (cp.async, two stages, XOR-swizzled
 * 16-byte chunks, ldmatrix / ldmatrix.trans). Per tile: S = Q·Kᵀ on tensor cores
 * (m16n8k16, f32 accumulation), an online softmax in f32 (running max and row
 * sum of the unrounded probabilities), P rounded to rnd and fed from registers
 * as the A operand of O += P·V. At the end O is divided by the row sum and
 * rounded: the rounding points of fq_cpu_attention (and of fused SDPA kernels).
 *
 * SIMT path (any rnd, head dim <= FQ_ATTN_SIMT_MAX_DH): one warp per query row,
 * 4 warps of one head sharing K/V tiles of 32 keys in shared memory, f32
 * throughout. It is the f32-compute path and the reference the tests hold the
 * MMA path against. */
#include "kernels/cuda/nn_common.cuh"

#include <math.h>
#include <type_traits>

using namespace fqnn;

namespace {

constexpr int kBN = 64;         /* keys per K/V tile (MMA)                 */
constexpr int kSeqAlign = 128;  /* packed sequence padding (>= every BM)   */
constexpr int kSimtWarps = 4;
constexpr int kSimtKeys = 32;

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

int padded_dh(int64_t dh) { return dh <= 16 ? 16 : dh <= 32 ? 32 : dh <= 64 ? 64 : 128; }

/* ---- tensor-core primitives ---------------------------------------------------------------- */

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void cp_async16(void *dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3, const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3, const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p)));
}

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
};
template <>
struct Mma<__half> {
    static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
};

/* ---- packing f32 [B, S, H*dh] -> 16-bit [B*H, Sp, DP] ----------------------------------- */

/* One thread per 8-element chunk of one packed row of q, k or v. */
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    k_attn_pack(const I *__restrict__ q, const I *__restrict__ k, const I *__restrict__ v,
                T *__restrict__ packed, int64_t B, int64_t S, int64_t Sp, int64_t H, int64_t dh, int DP) {
    const int64_t cpr = DP / 8, per = B * H * Sp * cpr, n = 3 * per;
    const int64_t plane = B * H * Sp * DP;
    for (int64_t i = gtid(); i < n; i += gstride()) {
        const int which = (int)(i / per);
        const int64_t j = i - which * per, c = j % cpr, row = j / cpr; /* row = bh*Sp + s */
        const int64_t s = row % Sp, bh = row / Sp, b = bh / H, h = bh - b * H;
        const I *src = which == 0 ? q : which == 1 ? k : v;
        float f[8];
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const int64_t d = c * 8 + e;
            f[e] = s < S && d < dh ? ldv(src, ((b * S + s) * H + h) * dh + d) : 0.0f;
        }
        *reinterpret_cast<uint4 *>(packed + which * plane + row * DP + c * 8) =
            make_uint4(Mma<T>::pack(f[0], f[1]), Mma<T>::pack(f[2], f[3]), Mma<T>::pack(f[4], f[5]),
                       Mma<T>::pack(f[6], f[7]));
    }
}

/* Element offset of 16-byte chunk c of row r in a tile with DH elements per
 * row: chunks are XOR-swizzled with the row so that the 8 rows one ldmatrix
 * matrix reads fall into different banks. */
template <int DH>
__device__ __forceinline__ int swz(int r, int c) {
    constexpr int CH = DH / 8, M = CH >= 8 ? 7 : CH - 1;
    return r * DH + ((c ^ (r & M)) << 3);
}

template <int DH, int NW>
struct MmaCfg {
    static constexpr int BM = 16 * NW;
    static constexpr int CH = DH / 8;
    static constexpr size_t smem = (size_t)(BM * DH + 4 * kBN * DH) * 2; /* Q + 2 stages of K and V */
};

/* ---- the flash-attention kernel --------------------------------------------------------------- */

/* q, k, v rows of head bh = b*H + h start at b*bstride + h*hstride and are ld
 * elements apart: the packed tiles (ld DH, hstride Sp*DH), or bf16 activations
 * [B, S, H*dh] read in place (ld H*dh, hstride dh; S a multiple of BM). */
template <typename T, int DH, int NW, typename O>
__global__ void __launch_bounds__(NW * 32, 1)
    k_attn_mma(const T *__restrict__ qp, const T *__restrict__ kp, const T *__restrict__ vp,
               O *__restrict__ out, int64_t S, int64_t ld, int64_t bstride, int64_t hstride, int64_t H, int64_t dh,
               float scale_log2, int rnd) {
    using C = MmaCfg<DH, NW>;
    constexpr int BM = C::BM, CH = C::CH, NT = NW * 32;
    constexpr int KS = DH / 16;  /* k-steps of Q·Kᵀ             */
    constexpr int SN = kBN / 8;  /* n-tiles of S (8 keys each)   */
    constexpr int ON = DH / 8;   /* n-tiles of O (8 dims each)   */
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T *sQ = reinterpret_cast<T *>(smem_raw);
    T *sK = sQ + BM * DH;        /* [2][kBN][DH] */
    T *sV = sK + 2 * kBN * DH;   /* [2][kBN][DH] */

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int64_t bh = blockIdx.y, q0 = (int64_t)blockIdx.x * BM;
    const int64_t base = (bh / H) * bstride + (bh % H) * hstride;
    const T *gQ = qp + base + q0 * ld;
    const T *gK = kp + base;
    const T *gV = vp + base;

    for (int i = tid; i < BM * CH; i += NT) {
        const int r = i / CH, c = i % CH;
        cp_async16(sQ + swz<DH>(r, c), gQ + (int64_t)r * ld + c * 8);
    }
    auto load_kv = [&](int64_t tile, int stage) {
        const T *k = gK + tile * kBN * ld, *v = gV + tile * kBN * ld;
        T *dk = sK + stage * kBN * DH, *dv = sV + stage * kBN * DH;
        for (int i = tid; i < kBN * CH; i += NT) {
            const int r = i / CH, c = i % CH;
            cp_async16(dk + swz<DH>(r, c), k + (int64_t)r * ld + c * 8);
            cp_async16(dv + swz<DH>(r, c), v + (int64_t)r * ld + c * 8);
        }
    };
    load_kv(0, 0);
    cp_async_commit();

    const int64_t ntiles = (S + kBN - 1) / kBN;
    const int g = lane >> 2, qd = lane & 3; /* fragment row group and quad position */
    float o[ON][4];
#pragma unroll
    for (int t = 0; t < ON; t++) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};
    uint32_t qf[KS][4];

    for (int64_t j = 0; j < ntiles; j++) {
        if (j + 1 < ntiles) load_kv(j + 1, (int)((j + 1) & 1));
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (j == 0) {
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                const int mi = lane >> 3, r = warp * 16 + (mi & 1) * 8 + (lane & 7), c = kk * 2 + (mi >> 1);
                ldsm_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], sQ + swz<DH>(r, c));
            }
        }
        const T *ks = sK + (j & 1) * kBN * DH, *vs = sV + (j & 1) * kBN * DH;

        /* S = Q·Kᵀ for 16 rows x 64 keys */
        float s[SN][4];
#pragma unroll
        for (int t = 0; t < SN; t++) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
#pragma unroll
            for (int nn = 0; nn < SN / 2; nn++) {
                const int mi = lane >> 3, r = nn * 16 + (mi >> 1) * 8 + (lane & 7), c = kk * 2 + (mi & 1);
                uint32_t b0, b1, b2, b3;
                ldsm_x4(b0, b1, b2, b3, ks + swz<DH>(r, c));
                Mma<T>::run(s[2 * nn], qf[kk], b0, b1);
                Mma<T>::run(s[2 * nn + 1], qf[kk], b2, b3);
            }
        }
        /* keys past the end of the sequence (last tile only) */
        if ((j + 1) * kBN > S) {
#pragma unroll
            for (int t = 0; t < SN; t++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    if (j * kBN + t * 8 + 2 * qd + (e & 1) >= S) s[t][e] = -INFINITY;
        }

        /* online softmax, in log2 units: x = s * scale * log2(e) */
        float mnew[2], alpha[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float mx = -INFINITY;
#pragma unroll
            for (int t = 0; t < SN; t++) mx = fmaxf(mx, fmaxf(s[t][2 * h], s[t][2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            mnew[h] = fmaxf(mrow[h], mx * scale_log2);
            alpha[h] = exp2f(mrow[h] - mnew[h]); /* 0 on the first tile (mrow = -inf) */
            mrow[h] = mnew[h];
            lrow[h] *= alpha[h];
        }
        uint32_t pf[kBN / 16][4];
#pragma unroll
        for (int t = 0; t < SN; t++) {
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                p[e] = exp2f(fmaf(s[t][e], scale_log2, -mnew[e >> 1]));
                lrow[e >> 1] += p[e];
            }
            /* n-tile t is half of the A fragment of key block t/2 */
            pf[t >> 1][(t & 1) * 2 + 0] = Mma<T>::pack(p[0], p[1]);
            pf[t >> 1][(t & 1) * 2 + 1] = Mma<T>::pack(p[2], p[3]);
        }
#pragma unroll
        for (int t = 0; t < ON; t++) {
            o[t][0] *= alpha[0];
            o[t][1] *= alpha[0];
            o[t][2] *= alpha[1];
            o[t][3] *= alpha[1];
        }
        /* O += P·V */
#pragma unroll
        for (int kb = 0; kb < kBN / 16; kb++) {
#pragma unroll
            for (int dn = 0; dn < DH / 16; dn++) {
                const int mi = lane >> 3, r = kb * 16 + (mi & 1) * 8 + (lane & 7), c = dn * 2 + (mi >> 1);
                uint32_t b0, b1, b2, b3;
                ldsm_x4_t(b0, b1, b2, b3, vs + swz<DH>(r, c));
                Mma<T>::run(o[2 * dn], pf[kb], b0, b1);
                Mma<T>::run(o[2 * dn + 1], pf[kb], b2, b3);
            }
        }
        __syncthreads(); /* this stage is refilled by the next iteration's prefetch */
    }
    cp_async_wait<0>();

#pragma unroll
    for (int h = 0; h < 2; h++) {
        lrow[h] += __shfl_xor_sync(0xffffffffu, lrow[h], 1);
        lrow[h] += __shfl_xor_sync(0xffffffffu, lrow[h], 2);
    }
    const int64_t b = bh / H, hd = bh - b * H;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int64_t row = q0 + warp * 16 + g + 8 * h;
        if (row >= S) continue;
        O *dst = out + ((b * S + row) * H + hd) * dh;
#pragma unroll
        for (int t = 0; t < ON; t++) {
            const int64_t d = t * 8 + 2 * qd;
            if (d < dh) stv(dst, d, rnd_to(__fdiv_rn(o[t][2 * h], lrow[h]), rnd));
            if (d + 1 < dh) stv(dst, d + 1, rnd_to(__fdiv_rn(o[t][2 * h + 1], lrow[h]), rnd));
        }
    }
}


/* ---- head dim 128: two query m-tiles per warp ---------------------------------------------------
 *
 * The same flash attention for DH = 128 with 4 warps of 32 query rows each
 * (BM = 128): every K/V fragment read from shared memory feeds two m-tiles,
 * halving the shared-memory traffic per MMA, which bounds the one-m-tile
 * kernel above; Q stays in shared memory and is re-read per k-step. Every
 * row sees the same operations in the same order as in k_attn_mma, so the
 * results are the same bits. Two CTAs per SM (96 KB of shared memory each). */
constexpr int kM2Warps = 4, kM2Rows = 128, kM2DH = 128;
constexpr size_t kM2Smem = (size_t)(kM2Rows * kM2DH + 4 * kBN * kM2DH) * 2;

template <typename T, typename O>
__global__ void __launch_bounds__(kM2Warps * 32, 2)
    k_attn_mma2(const T *__restrict__ qp, const T *__restrict__ kp, const T *__restrict__ vp, O *__restrict__ out,
                int64_t S, int64_t ld, int64_t bstride, int64_t hstride, int64_t H, int64_t dh, float scale_log2,
                int rnd) {
    constexpr int DH = kM2DH, BM = kM2Rows, CH = DH / 8, NT = kM2Warps * 32, MT = 2;
    constexpr int KS = DH / 16, SN = kBN / 8, ON = DH / 8;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T *sQ = reinterpret_cast<T *>(smem_raw);
    T *sK = sQ + BM * DH;      /* [2][kBN][DH] */
    T *sV = sK + 2 * kBN * DH; /* [2][kBN][DH] */

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int64_t bh = blockIdx.y, q0 = (int64_t)blockIdx.x * BM;
    const int64_t base = (bh / H) * bstride + (bh % H) * hstride;
    const T *gQ = qp + base + q0 * ld;
    const T *gK = kp + base;
    const T *gV = vp + base;

    for (int i = tid; i < BM * CH; i += NT) {
        const int r = i / CH, c = i % CH;
        cp_async16(sQ + swz<DH>(r, c), gQ + (int64_t)r * ld + c * 8);
    }
    auto load_kv = [&](int64_t tile, int stage) {
        const T *k = gK + tile * kBN * ld, *v = gV + tile * kBN * ld;
        T *dk = sK + stage * kBN * DH, *dv = sV + stage * kBN * DH;
        for (int i = tid; i < kBN * CH; i += NT) {
            const int r = i / CH, c = i % CH;
            cp_async16(dk + swz<DH>(r, c), k + (int64_t)r * ld + c * 8);
            cp_async16(dv + swz<DH>(r, c), v + (int64_t)r * ld + c * 8);
        }
    };
    load_kv(0, 0);
    cp_async_commit();

    const int64_t ntiles = (S + kBN - 1) / kBN;
    const int g = lane >> 2, qd = lane & 3;
    float o[MT][ON][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int t = 0; t < ON; t++) o[m][t][0] = o[m][t][1] = o[m][t][2] = o[m][t][3] = 0.0f;
    float mrow[MT][2], lrow[MT][2];
#pragma unroll
    for (int m = 0; m < MT; m++) mrow[m][0] = mrow[m][1] = -INFINITY, lrow[m][0] = lrow[m][1] = 0.0f;

    for (int64_t j = 0; j < ntiles; j++) {
        if (j + 1 < ntiles) load_kv(j + 1, (int)((j + 1) & 1));
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const T *ks = sK + (j & 1) * kBN * DH, *vs = sV + (j & 1) * kBN * DH;

        float s[MT][SN][4];
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int t = 0; t < SN; t++) s[m][t][0] = s[m][t][1] = s[m][t][2] = s[m][t][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
            uint32_t qf[MT][4];
#pragma unroll
            for (int m = 0; m < MT; m++) {
                const int mi = lane >> 3, r = warp * 32 + m * 16 + (mi & 1) * 8 + (lane & 7), c = kk * 2 + (mi >> 1);
                ldsm_x4(qf[m][0], qf[m][1], qf[m][2], qf[m][3], sQ + swz<DH>(r, c));
            }
#pragma unroll
            for (int nn = 0; nn < SN / 2; nn++) {
                const int mi = lane >> 3, r = nn * 16 + (mi >> 1) * 8 + (lane & 7), c = kk * 2 + (mi & 1);
                uint32_t b0, b1, b2, b3;
                ldsm_x4(b0, b1, b2, b3, ks + swz<DH>(r, c));
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    Mma<T>::run(s[m][2 * nn], qf[m], b0, b1);
                    Mma<T>::run(s[m][2 * nn + 1], qf[m], b2, b3);
                }
            }
        }
        if ((j + 1) * kBN > S) {
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int t = 0; t < SN; t++)
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        if (j * kBN + t * 8 + 2 * qd + (e & 1) >= S) s[m][t][e] = -INFINITY;
        }

        uint32_t pf[MT][kBN / 16][4];
#pragma unroll
        for (int m = 0; m < MT; m++) {
            float mnew[2], alpha[2];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                float mx = -INFINITY;
#pragma unroll
                for (int t = 0; t < SN; t++) mx = fmaxf(mx, fmaxf(s[m][t][2 * h], s[m][t][2 * h + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                mnew[h] = fmaxf(mrow[m][h], mx * scale_log2);
                alpha[h] = exp2f(mrow[m][h] - mnew[h]);
                mrow[m][h] = mnew[h];
                lrow[m][h] *= alpha[h];
            }
#pragma unroll
            for (int t = 0; t < SN; t++) {
                float p[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    p[e] = exp2f(fmaf(s[m][t][e], scale_log2, -mnew[e >> 1]));
                    lrow[m][e >> 1] += p[e];
                }
                pf[m][t >> 1][(t & 1) * 2 + 0] = Mma<T>::pack(p[0], p[1]);
                pf[m][t >> 1][(t & 1) * 2 + 1] = Mma<T>::pack(p[2], p[3]);
            }
#pragma unroll
            for (int t = 0; t < ON; t++) {
                o[m][t][0] *= alpha[0];
                o[m][t][1] *= alpha[0];
                o[m][t][2] *= alpha[1];
                o[m][t][3] *= alpha[1];
            }
        }
#pragma unroll
        for (int kb = 0; kb < kBN / 16; kb++) {
#pragma unroll
            for (int dn = 0; dn < DH / 16; dn++) {
                const int mi = lane >> 3, r = kb * 16 + (mi & 1) * 8 + (lane & 7), c = dn * 2 + (mi >> 1);
                uint32_t b0, b1, b2, b3;
                ldsm_x4_t(b0, b1, b2, b3, vs + swz<DH>(r, c));
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    Mma<T>::run(o[m][2 * dn], pf[m][kb], b0, b1);
                    Mma<T>::run(o[m][2 * dn + 1], pf[m][kb], b2, b3);
                }
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();

    const int64_t b = bh / H, hd = bh - b * H;
#pragma unroll
    for (int m = 0; m < MT; m++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            lrow[m][h] += __shfl_xor_sync(0xffffffffu, lrow[m][h], 1);
            lrow[m][h] += __shfl_xor_sync(0xffffffffu, lrow[m][h], 2);
        }
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int64_t row = q0 + warp * 32 + m * 16 + g + 8 * h;
            if (row >= S) continue;
            O *dst = out + ((b * S + row) * H + hd) * dh;
#pragma unroll
            for (int t = 0; t < ON; t++) {
                const int64_t d = t * 8 + 2 * qd;
                if (d < dh) stv(dst, d, rnd_to(__fdiv_rn(o[m][t][2 * h], lrow[m][h]), rnd));
                if (d + 1 < dh) stv(dst, d + 1, rnd_to(__fdiv_rn(o[m][t][2 * h + 1], lrow[m][h]), rnd));
            }
        }
    }
}

/* ---- the SIMT kernel ------------------------------------------------------------------------------ */

size_t simt_smem(int64_t dh) {
    /* q and o rows per warp, K tile (rows padded by one float), V tile, P per warp */
    return (size_t)(2 * kSimtWarps * dh + kSimtKeys * (dh + 1) + kSimtKeys * dh + kSimtWarps * kSimtKeys) * 4;
}

__global__ void __launch_bounds__(kSimtWarps * 32)
    k_attn_simt(const float *__restrict__ q, const float *__restrict__ k, const float *__restrict__ v,
                float *__restrict__ out, int64_t S, int64_t H, int64_t dh, float scale, int rnd) {
    extern __shared__ float sm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *sq = sm + warp * dh;
    float *so = sm + kSimtWarps * dh + warp * dh;
    float *sk = sm + 2 * kSimtWarps * dh;
    float *sv = sk + kSimtKeys * (dh + 1);
    float *sp = sv + kSimtKeys * dh + warp * kSimtKeys;
    const int64_t bh = blockIdx.y, b = bh / H, h = bh - b * H, ld = H * dh;
    const int64_t row = (int64_t)blockIdx.x * kSimtWarps + warp;
    const bool valid = row < S; /* uniform over the warp */
    const float *qb = q + b * S * ld + h * dh, *kb = k + b * S * ld + h * dh, *vb = v + b * S * ld + h * dh;
    if (valid)
        for (int64_t d = lane; d < dh; d += 32) {
            sq[d] = qb[row * ld + d];
            so[d] = 0.0f;
        }
    float m = -INFINITY, l = 0.0f;
    for (int64_t t0 = 0; t0 < S; t0 += kSimtKeys) {
        const int nk = (int)(S - t0 < kSimtKeys ? S - t0 : kSimtKeys);
        __syncthreads();
        for (int64_t i = threadIdx.x; i < (int64_t)nk * dh; i += blockDim.x) {
            const int64_t j = i / dh, d = i - j * dh;
            sk[j * (dh + 1) + d] = kb[(t0 + j) * ld + d];
            sv[j * dh + d] = vb[(t0 + j) * ld + d];
        }
        __syncthreads();
        if (!valid) continue;
        float sc = -INFINITY;
        if (lane < nk) {
            float acc = 0.0f;
            for (int64_t d = 0; d < dh; d++) acc = fmaf(sq[d], sk[lane * (dh + 1) + d], acc);
            sc = acc * scale;
        }
        const float mnew = fmaxf(m, warp_max(sc));
        const float alpha = expf(m - mnew);
        const float p = lane < nk ? expf(sc - mnew) : 0.0f;
        l = l * alpha + warp_sum(p);
        m = mnew;
        sp[lane] = rnd_to(p, rnd);
        __syncwarp();
        for (int64_t d = lane; d < dh; d += 32) {
            float acc = so[d] * alpha;
            for (int j = 0; j < nk; j++) acc = fmaf(sp[j], sv[j * dh + d], acc);
            so[d] = acc;
        }
        __syncwarp();
    }
    if (!valid) return;
    float *dst = out + (b * S + row) * ld + h * dh;
    for (int64_t d = lane; d < dh; d += 32) dst[d] = rnd_to(__fdiv_rn(so[d], l), rnd);
}

/* ---- launching ------------------------------------------------------------------------------------ */

template <typename T>
int prepare_mma2() {
    int e = (int)cudaFuncSetAttribute(k_attn_mma2<T, float>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kM2Smem);
    if (!e)
        e = (int)cudaFuncSetAttribute(k_attn_mma2<T, __nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      (int)kM2Smem);
    return e;
}

template <typename T, typename O>
int launch_mma2(const T *q, const T *k, const T *v, O *out, int64_t B, int64_t S, int64_t ld, int64_t bstride,
                int64_t hstride, int64_t H, int64_t dh, int rnd, cudaStream_t st) {
    const float scale_log2 = (float)(1.4426950408889634 / sqrt((double)dh));
    dim3 grid((unsigned)((S + kM2Rows - 1) / kM2Rows), (unsigned)(B * H));
    k_attn_mma2<T, O><<<grid, kM2Warps * 32, kM2Smem, st>>>(q, k, v, out, S, ld, bstride, hstride, H, dh, scale_log2,
                                                           rnd);
    return launch_status();
}

template <typename T, int DH, int NW>
int prepare_mma() {
    int e = (int)cudaFuncSetAttribute(k_attn_mma<T, DH, NW, float>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      (int)MmaCfg<DH, NW>::smem);
    if (!e)
        e = (int)cudaFuncSetAttribute(k_attn_mma<T, DH, NW, __nv_bfloat16>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)MmaCfg<DH, NW>::smem);
    return e;
}

template <typename T, int DH, int NW, typename O>
int launch_mma(const T *q, const T *k, const T *v, O *out, int64_t B, int64_t S, int64_t ld, int64_t bstride,
               int64_t hstride, int64_t H, int64_t dh, int rnd, cudaStream_t st) {
    const float scale_log2 = (float)(1.4426950408889634 / sqrt((double)dh));
    dim3 grid((unsigned)((S + MmaCfg<DH, NW>::BM - 1) / MmaCfg<DH, NW>::BM), (unsigned)(B * H));
    k_attn_mma<T, DH, NW, O><<<grid, NW * 32, MmaCfg<DH, NW>::smem, st>>>(q, k, v, out, S, ld, bstride, hstride, H, dh,
                                                                      scale_log2, rnd);
    return launch_status();
}

/* bf16 activations of the compute dtype with head dim 128 and S a multiple of
 * the query tile need no packing: the kernel reads them in place. */
template <typename T, typename I>
bool attn_direct(const I *q, const I *k, const I *v, int64_t S, int64_t dh) {
    if constexpr (!std::is_same<T, I>::value) return false;
    const uintptr_t a = (uintptr_t)q | (uintptr_t)k | (uintptr_t)v;
    return dh == 128 && S % MmaCfg<128, 8>::BM == 0 && (a & 15u) == 0;
}

template <typename T, typename I>
int run_mma(const I *q, const I *k, const I *v, I *out, int64_t B, int64_t S, int64_t H,
            int64_t dh, void *scratch, int rnd, int one, cudaStream_t st) {
    if constexpr (std::is_same<T, I>::value) {
        if (attn_direct<T, I>(q, k, v, S, dh))
            return one ? launch_mma<T, 128, 8>(q, k, v, out, B, S, H * dh, S * H * dh, dh, H, dh, rnd, st)
                       : launch_mma2<T>(q, k, v, out, B, S, H * dh, S * H * dh, dh, H, dh, rnd, st);
    }
    const int DP = padded_dh(dh);
    const int64_t Sp = round_up(S, kSeqAlign);
    T *packed = static_cast<T *>(scratch);
    const int64_t chunks = 3 * B * H * Sp * (DP / 8);
    k_attn_pack<T, I><<<grid_for(chunks), kThreads, 0, st>>>(q, k, v, packed, B, S, Sp, H, dh, DP);
    int e = launch_status();
    if (e) return e;
    const int64_t plane = B * H * Sp * DP;
    const T *pq = packed, *pk = packed + plane, *pv = packed + 2 * plane;
    switch (DP) {
    case 16: return launch_mma<T, 16, 4>(pq, pk, pv, out, B, S, 16, H * Sp * 16, Sp * 16, H, dh, rnd, st);
    case 32: return launch_mma<T, 32, 4>(pq, pk, pv, out, B, S, 32, H * Sp * 32, Sp * 32, H, dh, rnd, st);
    case 64: return launch_mma<T, 64, 4>(pq, pk, pv, out, B, S, 64, H * Sp * 64, Sp * 64, H, dh, rnd, st);
    default:
        return one ? launch_mma<T, 128, 8>(pq, pk, pv, out, B, S, 128, H * Sp * 128, Sp * 128, H, dh, rnd, st)
                   : launch_mma2<T>(pq, pk, pv, out, B, S, 128, H * Sp * 128, Sp * 128, H, dh, rnd, st);
    }
}

} // namespace

extern "C" int fq_cuda_nn_attention_supported(int64_t dh, fq_dtype rnd, fq_attn_impl impl) {
    if (dh < 1) return 0;
    switch (impl) {
    case FQ_ATTN_MMA:
    case FQ_ATTN_MMA1: return (rnd == FQ_BF16 || rnd == FQ_F16) && dh <= FQ_ATTN_MMA_MAX_DH;
    case FQ_ATTN_SIMT: return dh <= FQ_ATTN_SIMT_MAX_DH;
    case FQ_ATTN_AUTO:
        return fq_cuda_nn_attention_supported(dh, rnd, FQ_ATTN_MMA) ||
               fq_cuda_nn_attention_supported(dh, rnd, FQ_ATTN_SIMT);
    }
    return 0;
}

extern "C" fq_attn_impl fq_cuda_nn_attention_pick(int64_t dh, fq_dtype rnd, fq_attn_impl impl) {
    if (impl != FQ_ATTN_AUTO) return impl;
    return fq_cuda_nn_attention_supported(dh, rnd, FQ_ATTN_MMA) ? FQ_ATTN_MMA : FQ_ATTN_SIMT;
}

extern "C" size_t fq_cuda_nn_attention_scratch_bytes(int64_t batch, int64_t seq, int64_t heads, int64_t dh,
                                                     fq_dtype rnd, fq_attn_impl impl, fq_dtype xt) {
    if (fq_cuda_nn_attention_pick(dh, rnd, impl) == FQ_ATTN_SIMT) return 0;
    if (xt == rnd && dh == 128 && seq % MmaCfg<128, 8>::BM == 0) return 0; /* read in place */
    return (size_t)(3 * batch * heads * round_up(seq, kSeqAlign) * padded_dh(dh)) * 2;
}

extern "C" int fq_cuda_nn_attention_prepare(void) {
    int e = 0;
    if (!e) e = prepare_mma<__nv_bfloat16, 16, 4>();
    if (!e) e = prepare_mma<__nv_bfloat16, 32, 4>();
    if (!e) e = prepare_mma<__nv_bfloat16, 64, 4>();
    if (!e) e = prepare_mma<__nv_bfloat16, 128, 8>();
    if (!e) e = prepare_mma2<__nv_bfloat16>();
    if (!e) e = prepare_mma2<__half>();
    if (!e) e = prepare_mma<__half, 16, 4>();
    if (!e) e = prepare_mma<__half, 32, 4>();
    if (!e) e = prepare_mma<__half, 64, 4>();
    if (!e) e = prepare_mma<__half, 128, 8>();
    if (!e)
        e = (int)cudaFuncSetAttribute(k_attn_simt, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      (int)simt_smem(FQ_ATTN_SIMT_MAX_DH));
    return e;
}

extern "C" int fq_cuda_nn_attention(const void *q, const void *k, const void *v, void *out, fq_dtype xt,
                                    int64_t batch, int64_t seq, int64_t heads, int64_t dh, void *scratch,
                                    size_t scratch_bytes, fq_dtype rnd, fq_attn_impl impl, cudaStream_t st) {
    typedef __nv_bfloat16 bf;
    if (batch <= 0 || seq <= 0 || heads <= 0) return 0;
    if (!fq_cuda_nn_attention_supported(dh, rnd, impl) || batch * heads > 65535) return (int)cudaErrorInvalidValue;
    if (xt != FQ_F32 && xt != FQ_BF16) return (int)cudaErrorInvalidValue;
    impl = fq_cuda_nn_attention_pick(dh, rnd, impl);
    if (impl == FQ_ATTN_MMA || impl == FQ_ATTN_MMA1) {
        const int one = impl == FQ_ATTN_MMA1;
        const size_t need = fq_cuda_nn_attention_scratch_bytes(batch, seq, heads, dh, rnd, impl, xt);
        if (need && (!scratch || scratch_bytes < need || ((uintptr_t)scratch & 255u))) return (int)cudaErrorInvalidValue;
        if (xt == FQ_BF16) {
            const bf *qb = static_cast<const bf *>(q), *kb = static_cast<const bf *>(k), *vb = static_cast<const bf *>(v);
            bf *ob = static_cast<bf *>(out);
            return rnd == FQ_BF16 ? run_mma<bf>(qb, kb, vb, ob, batch, seq, heads, dh, scratch, (int)rnd, one, st)
                                  : run_mma<__half>(qb, kb, vb, ob, batch, seq, heads, dh, scratch, (int)rnd, one, st);
        }
        const float *qf = static_cast<const float *>(q), *kf = static_cast<const float *>(k),
                    *vf = static_cast<const float *>(v);
        float *of = static_cast<float *>(out);
        return rnd == FQ_BF16 ? run_mma<bf>(qf, kf, vf, of, batch, seq, heads, dh, scratch, (int)rnd, one, st)
                              : run_mma<__half>(qf, kf, vf, of, batch, seq, heads, dh, scratch, (int)rnd, one, st);
    }
    if (xt != FQ_F32) return (int)cudaErrorInvalidValue; /* the SIMT kernel runs on f32 storage */
    const float scale = (float)(1.0 / sqrt((double)dh));
    dim3 grid((unsigned)((seq + kSimtWarps - 1) / kSimtWarps), (unsigned)(batch * heads));
    k_attn_simt<<<grid, kSimtWarps * 32, simt_smem(dh), st>>>(static_cast<const float *>(q),
                                                              static_cast<const float *>(k),
                                                              static_cast<const float *>(v), static_cast<float *>(out),
                                                              seq, heads, dh, scale, (int)rnd);
    return launch_status();
}

/* 4-bit blockwise quantize / dequantize (NF4, FP4), byte-identical to
 * bitsandbytes' fast-math CUDA kernels (see docs/bnb-exactness.md), built to
 * run at memory speed:
 *  - every thread moves 16-byte vectors and keeps several in flight;
 *  - a warp's vector loads cover contiguous bytes (fully coalesced), and the
 *    absmax of a quant block is one shuffle reduction over the lanes that
 *    hold it (plus one shared-memory step when a block spans several warps);
 *  - the NF4/FP4 code of a scaled value p comes from a 64-bucket table in
 *    shared memory (bucket width 1/16 is below the smallest gap between two
 *    thresholds, so a bucket holds at most one threshold): one FFMA for the
 *    bucket, two conflict-free shared loads and one compare, instead of a
 *    branchy four-level tree;
 *  - a persistent grid sized to the SM count walks the tiles.
 * All indices are 64-bit; n may exceed 2^31. */
#include "kernels/cuda/quant_common.cuh"

#include <float.h>
#include <math.h>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCtasPerSm = 4; /* __launch_bounds__ below guarantees this many fit */

/* Per-bucket decision data, built on the host from formats.h and passed by value. */
struct BucketTable {
    float thr[64];    /* the threshold inside bucket k, +inf if none      */
    uint8_t base[64]; /* how many thresholds lie below bucket k's start   */
};

/* Bucket of a scaled value p (or |p| for FP4): k = round(16 p + 40), read
 * from the low bits of one FFMA against 1.5 * 2^23. Bucket k covers
 * [(k - 40.5)/16, (k - 39.5)/16]; p is in [-1 - 2^-21, 1 + 2^-21] or NaN,
 * and NaN is sent to -2 (bucket 8, below every threshold) so it gets code 0. */
__device__ __forceinline__ int bucket_of(float p) {
    float q = fmaxf(p, -2.0f); /* fmaxf(NaN, -2) = -2 */
    return __float_as_int(__fmaf_rn(q, 16.0f, 12582952.0f)) & 63;
}

/* bitsandbytes' dQuantizeNF4 / dQuantizeFP4 of p = ftz(ftz(x) * r). */
template <int QT>
__device__ __forceinline__ uint32_t code4(float x, float r, const float *s_thr, const uint8_t *s_base) {
    float p = fq_mul_ftz(x, r);
    if (QT == FQ_QUANT_NF4) {
        int k = bucket_of(p);
        return (uint32_t)s_base[k] + (p > s_thr[k] ? 1u : 0u); /* NaN > t is false */
    } else {
        float a = fabsf(p);
        int k = bucket_of(a);
        uint32_t rank = (uint32_t)s_base[k] + (a > s_thr[k] ? 1u : 0u);
        /* Rank among the sorted magnitude thresholds -> bnb's FP4 code: 0 1 6 7 4 5 2 3. */
        uint32_t c = rank ^ ((rank & 2u) << 1);
        return c | (p < 0.0f ? 8u : 0u);
    }
}

/* ---- quantize -------------------------------------------------------------- */

/* Tile layout: warp w, slot s (0..V-1), lane l holds the 16-byte vector
 * ((w * V + s) * 32 + l) of the CTA tile, i.e. EV consecutive elements. A
 * slot of a warp is 32 * EV contiguous elements (one coalesced access). */
template <typename T, int B, int QT>
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    k_quantize4(const T *__restrict__ x, int64_t n, uint8_t *__restrict__ packed,
                float *__restrict__ absmax, const BucketTable tab) {
    constexpr int EV = fq_vec<T>::EV;             /* elements per 16-byte vector   */
    constexpr int V = 4;                          /* vectors in flight per thread  */
    constexpr int WT = 32 * EV;                   /* elements per warp slot        */
    constexpr int WTILE = V * WT;                 /* elements per warp per tile    */
    constexpr int TILE = kWarps * WTILE;          /* elements per CTA tile         */
    constexpr int LG = B / EV < 32 ? B / EV : 32; /* lanes sharing a block in a slot */
    constexpr int SB = B <= WT ? 1 : B / WT;      /* slots a block spans           */
    constexpr int WB = B <= WTILE ? 1 : B / WTILE; /* warps a block spans          */
    static_assert(B % EV == 0 && TILE % B == 0, "block must tile the CTA tile");
    static_assert(SB <= V || WB > 1, "slot grouping");

    __shared__ float s_thr[64];
    __shared__ uint8_t s_base[64];
    __shared__ float s_red[2][kWarps];
    if (threadIdx.x < 64) {
        s_thr[threadIdx.x] = tab.thr[threadIdx.x];
        s_base[threadIdx.x] = tab.base[threadIdx.x];
    }
    __syncthreads();

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t ntiles = (n + TILE - 1) / TILE;
    const int64_t nbytes = (n + 1) / 2, nblocks = (n + B - 1) / B;
    int parity = 0;
    for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x, parity ^= 1) {
        const int64_t wbase = tile * TILE + (int64_t)warp * WTILE; /* this warp's first element */
        const bool full = tile * TILE + TILE <= n;
        uint4 raw[V];
        if (full) {
#pragma unroll
            for (int s = 0; s < V; s++)
                raw[s] = __ldcs(reinterpret_cast<const uint4 *>(x + wbase + s * WT + lane * EV));
        } else {
            /* Last tile: element by element, zero padding past the end (as bnb pads). */
#pragma unroll
            for (int s = 0; s < V; s++) {
                uint4 u = make_uint4(0, 0, 0, 0);
                T *tp = reinterpret_cast<T *>(&u);
#pragma unroll
                for (int j = 0; j < EV; j++) {
                    int64_t e = wbase + s * WT + lane * EV + j;
                    if (e < n) tp[j] = x[e];
                }
                raw[s] = u;
            }
        }

        /* absmax: fmaxf from -FLT_MAX over ftz(|x|) of the whole (padded) block. */
        float m[V];
#pragma unroll
        for (int s = 0; s < V; s++) {
            m[s] = -FLT_MAX;
#pragma unroll
            for (int j = 0; j < EV; j++) m[s] = fq_absmax_ftz(m[s], fq_vec<T>::get(raw[s], j));
        }
        if (SB == 1 && WB == 1) {
#pragma unroll
            for (int s = 0; s < V; s++)
#pragma unroll
                for (int off = LG / 2; off > 0; off >>= 1)
                    m[s] = fmaxf(m[s], __shfl_xor_sync(0xffffffffu, m[s], off));
        } else {
            constexpr int G = WB > 1 ? V : SB; /* slots combined in this thread */
#pragma unroll
            for (int g = 0; g < V; g += G) {
                float mm = m[g];
#pragma unroll
                for (int s = 1; s < G; s++) mm = fmaxf(mm, m[g + s]);
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, off));
                if (WB > 1) {
                    /* One double-buffered shared step per tile: a block spans WB warps. */
                    if (lane == 0) s_red[parity][warp] = mm;
                    __syncthreads();
                    const int w0 = warp / WB * WB;
                    mm = s_red[parity][w0];
#pragma unroll
                    for (int w = 1; w < WB; w++) mm = fmaxf(mm, s_red[parity][w0 + w]);
                }
#pragma unroll
                for (int s = 0; s < G; s++) m[g + s] = mm;
            }
        }

        /* One absmax store per block, by the first lane (and warp) holding it. */
#pragma unroll
        for (int s = 0; s < V; s++) {
            const int64_t e0 = wbase + s * WT + lane * EV;
            bool first;
            if (SB == 1 && WB == 1) first = (lane % LG) == 0;
            else if (WB == 1) first = lane == 0 && (s % SB) == 0;
            else first = lane == 0 && s == 0 && (warp % WB) == 0;
            if (first) {
                int64_t b = e0 / B;
                if (full || b < nblocks) absmax[b] = m[s];
            }
        }

        /* Codes: element 2i in the high nibble of byte i. */
#pragma unroll
        for (int s = 0; s < V; s++) {
            const float r = fq_rcp_ftz(m[s]);
            uint32_t word = 0;
#pragma unroll
            for (int j = 0; j < EV; j++) {
                uint32_t c = code4<QT>(fq_vec<T>::get(raw[s], j), r, s_thr, s_base);
                word |= c << (8 * (j >> 1) + ((j & 1) ? 0 : 4));
            }
            const int64_t byte0 = (wbase + s * WT + lane * EV) / 2;
            if (full) {
                if constexpr (EV == 8) *reinterpret_cast<uint32_t *>(packed + byte0) = word;
                else *reinterpret_cast<uint16_t *>(packed + byte0) = (uint16_t)word;
            } else {
#pragma unroll
                for (int j = 0; j < EV / 2; j++)
                    if (byte0 + j < nbytes) packed[byte0 + j] = (uint8_t)(word >> (8 * j));
            }
        }
    }
}

/* Host: the bucket table for NF4 (signed p) or FP4 (|p|), from formats.h. Returned by
 * value: Debian 12's gcc 12.2 at -O2/-O3 dropped the call of the earlier form, which
 * filled a table through a pointer, as if it stored nothing (an interprocedural
 * summary error: the kernel then got an uninitialized table and FP4 codes were wrong;
 * gcc 13.3 compiled it correctly). */
BucketTable build_table(fq_quant_type qt) {
    BucketTable tb;
    BucketTable *t = &tb;
    float th[15];
    int nt;
    if (qt == FQ_QUANT_NF4) {
        nt = 15;
        for (int i = 0; i < 15; i++) {
            uint32_t b = FQ_NF4_THRESH_BITS[i];
            memcpy(&th[i], &b, 4);
        }
    } else {
        const float f[7] = {FQ_FP4_T_LO_LO, FQ_FP4_T_LO, FQ_FP4_T_LO_HI, FQ_FP4_T_ROOT,
                            FQ_FP4_T_HI_LO, FQ_FP4_T_HI, FQ_FP4_T_HI_HI};
        nt = 7;
        for (int i = 0; i < 7; i++) th[i] = f[i];
    }
    for (int k = 0; k < 64; k++) {
        /* Bucket k = [(2k - 81)/32, (2k - 79)/32], both ends exact in float. */
        float lo = (float)(2 * k - 81) / 32.0f, hi = (float)(2 * k - 79) / 32.0f;
        int below = 0;
        float inside = HUGE_VALF;
        for (int i = 0; i < nt; i++) {
            if (th[i] < lo) below++;
            else if (th[i] <= hi) inside = th[i];
        }
        t->thr[k] = inside;
        t->base[k] = (uint8_t)below;
    }
    return tb;
}

template <typename T, int QT>
int launch_quantize(const T *x, int64_t n, int64_t bs, uint8_t *packed, float *absmax, cudaStream_t st) {
    constexpr int TILE = kWarps * 4 * 32 * fq_vec<T>::EV;
    const BucketTable tab = build_table((fq_quant_type)QT);
    int grid;
    cudaError_t e = fq_grid_for(st, (n + TILE - 1) / TILE, kCtasPerSm, &grid);
    if (e != cudaSuccess) return (int)e;
    switch (bs) {
    case 32: k_quantize4<T, 32, QT><<<grid, kThreads, 0, st>>>(x, n, packed, absmax, tab); break;
    case 64: k_quantize4<T, 64, QT><<<grid, kThreads, 0, st>>>(x, n, packed, absmax, tab); break;
    case 128: k_quantize4<T, 128, QT><<<grid, kThreads, 0, st>>>(x, n, packed, absmax, tab); break;
    case 256: k_quantize4<T, 256, QT><<<grid, kThreads, 0, st>>>(x, n, packed, absmax, tab); break;
    case 512: k_quantize4<T, 512, QT><<<grid, kThreads, 0, st>>>(x, n, packed, absmax, tab); break;
    case 1024: k_quantize4<T, 1024, QT><<<grid, kThreads, 0, st>>>(x, n, packed, absmax, tab); break;
    case 2048: k_quantize4<T, 2048, QT><<<grid, kThreads, 0, st>>>(x, n, packed, absmax, tab); break;
    case 4096: k_quantize4<T, 4096, QT><<<grid, kThreads, 0, st>>>(x, n, packed, absmax, tab); break;
    default: return (int)cudaErrorInvalidValue;
    }
    return fq_launch_status();
}

template <typename T>
int launch_quantize_t(const void *x, int64_t n, int64_t bs, fq_quant_type qt, uint8_t *packed, float *absmax,
                      cudaStream_t st) {
    const T *xt = static_cast<const T *>(x);
    return qt == FQ_QUANT_NF4 ? launch_quantize<T, FQ_QUANT_NF4>(xt, n, bs, packed, absmax, st)
                              : launch_quantize<T, FQ_QUANT_FP4>(xt, n, bs, packed, absmax, st);
}

/* ---- dequantize ------------------------------------------------------------ */

struct Lut16 {
    float v[16];
};

/* The kernel's value table: bnb's hard-coded LUTs (FP4 has -0.0 at index 8). */
Lut16 kernel_lut(fq_quant_type qt) {
    Lut16 l;
    const uint32_t *bits = qt == FQ_QUANT_FP4 ? FQ_FP4_BITS : FQ_NF4_BITS;
    for (int i = 0; i < 16; i++) memcpy(&l.v[i], &bits[i], 4);
    if (qt == FQ_QUANT_FP4) l.v[8] = -0.0f;
    return l;
}

template <typename To> struct OutVec;
template <> struct OutVec<float> {
    static constexpr int EPS = 4; /* elements per 16-byte store */
};
template <> struct OutVec<__half> {
    static constexpr int EPS = 8;
    static __device__ __forceinline__ uint32_t pack2(float a, float b) {
        __half2 h = __floats2half2_rn(a, b); /* .x = a: the lower address */
        return *reinterpret_cast<uint32_t *>(&h);
    }
};
template <> struct OutVec<__nv_bfloat16> {
    static constexpr int EPS = 8;
    static __device__ __forceinline__ uint32_t pack2(float a, float b) {
        __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<uint32_t *>(&h);
    }
};

/* Lane l of warp w, slot s handles EPS consecutive outputs: it reads EPS/2
 * packed bytes (a coalesced 128- or 64-byte warp access) and writes one
 * 16-byte vector (a coalesced 512-byte warp access). NESTED rebuilds absmax
 * from the double-quant state: ftz(code256[q] * nested[b / 256]) + offset. */
template <typename To, bool NESTED>
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    k_dequantize4(const uint8_t *__restrict__ packed, const float *__restrict__ absmax,
                  const uint8_t *__restrict__ qabsmax, const float *__restrict__ nested,
                  const float *__restrict__ code256, float offset, int64_t n, int log2bs, const Lut16 lut,
                  To *__restrict__ out) {
    constexpr int EPS = OutVec<To>::EPS;
    constexpr int V = 8;
    constexpr int WT = 32 * EPS;
    constexpr int WTILE = V * WT;
    constexpr int TILE = kWarps * WTILE;

    __shared__ float s_lut[16];
    __shared__ float s_code[NESTED ? 256 : 1];
    if (threadIdx.x < 16) s_lut[threadIdx.x] = lut.v[threadIdx.x];
    if (NESTED)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) s_code[i] = code256[i];
    __syncthreads();

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t ntiles = (n + TILE - 1) / TILE;
    const int64_t nbytes = (n + 1) / 2, nblocks = ((n - 1) >> log2bs) + 1;
    for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int64_t wbase = tile * TILE + (int64_t)warp * WTILE;
        const bool full = tile * TILE + TILE <= n;
        uint32_t q[V];
        float a[V];
#pragma unroll
        for (int s = 0; s < V; s++) {
            const int64_t e0 = wbase + s * WT + lane * EPS;
            const int64_t b = e0 >> log2bs;
            if (full) {
                if constexpr (EPS == 8) q[s] = *reinterpret_cast<const uint32_t *>(packed + e0 / 2);
                else q[s] = *reinterpret_cast<const uint16_t *>(packed + e0 / 2);
            } else {
                q[s] = 0;
#pragma unroll
                for (int j = 0; j < EPS / 2; j++)
                    if (e0 / 2 + j < nbytes) q[s] |= (uint32_t)packed[e0 / 2 + j] << (8 * j);
            }
            if (full || b < nblocks) {
                if (NESTED) a[s] = fq_add_rn(fq_mul_ftz(s_code[qabsmax[b]], nested[b >> 8]), offset);
                else a[s] = absmax[b];
            } else {
                a[s] = 0.0f;
            }
        }
#pragma unroll
        for (int s = 0; s < V; s++) {
            const int64_t e0 = wbase + s * WT + lane * EPS;
            float y[EPS];
#pragma unroll
            for (int j = 0; j < EPS; j++) {
                /* Element 2i is the high nibble of byte i. */
                uint32_t nib = (q[s] >> (8 * (j >> 1) + ((j & 1) ? 0 : 4))) & 15u;
                y[j] = fq_mul_ftz(s_lut[nib], a[s]);
            }
            uint4 v;
            if constexpr (EPS == 4) {
                v = make_uint4(__float_as_uint(y[0]), __float_as_uint(y[1]), __float_as_uint(y[2]),
                               __float_as_uint(y[3]));
            } else {
                v = make_uint4(OutVec<To>::pack2(y[0], y[1]), OutVec<To>::pack2(y[2], y[3]),
                               OutVec<To>::pack2(y[4], y[5]), OutVec<To>::pack2(y[6], y[7]));
            }
            if (full) {
                *reinterpret_cast<uint4 *>(out + e0) = v;
            } else {
                const To *tv = reinterpret_cast<const To *>(&v);
#pragma unroll
                for (int j = 0; j < EPS; j++)
                    if (e0 + j < n) out[e0 + j] = tv[j];
            }
        }
    }
}

template <typename To>
int launch_dequantize(const uint8_t *packed, const float *absmax, const uint8_t *qabsmax, const float *nested,
                      const float *code256, float offset, int64_t n, int64_t bs, fq_quant_type qt, To *out,
                      cudaStream_t st) {
    constexpr int TILE = kWarps * 8 * 32 * OutVec<To>::EPS;
    int log2bs = 0;
    while ((int64_t)1 << log2bs < bs) log2bs++;
    int grid;
    cudaError_t e = fq_grid_for(st, (n + TILE - 1) / TILE, kCtasPerSm, &grid);
    if (e != cudaSuccess) return (int)e;
    const Lut16 lut = kernel_lut(qt);
    if (qabsmax)
        k_dequantize4<To, true><<<grid, kThreads, 0, st>>>(packed, absmax, qabsmax, nested, code256, offset, n,
                                                           log2bs, lut, out);
    else
        k_dequantize4<To, false><<<grid, kThreads, 0, st>>>(packed, absmax, qabsmax, nested, code256, offset, n,
                                                            log2bs, lut, out);
    return fq_launch_status();
}

bool blocksize_ok(int64_t bs) { return bs >= 32 && bs <= 4096 && (bs & (bs - 1)) == 0; }

int dequantize_any(const uint8_t *packed, const float *absmax, const uint8_t *qabsmax, const float *nested,
                   const float *code256, float offset, int64_t n, int64_t bs, fq_quant_type qt, void *out,
                   fq_dtype dt, cudaStream_t st) {
    if (n < 0 || !blocksize_ok(bs) || (qt != FQ_QUANT_NF4 && qt != FQ_QUANT_FP4)) return (int)cudaErrorInvalidValue;
    if (n == 0) return 0;
    /* Vector accesses need natural alignment (device allocations are 256-byte aligned). */
    uintptr_t pk_align = dt == FQ_F32 ? 2 : 4;
    if (!fq_aligned(out, 16) || !fq_aligned(packed, pk_align) || (absmax && !fq_aligned(absmax, 4)) ||
        (nested && !fq_aligned(nested, 4)))
        return (int)cudaErrorInvalidValue;
    switch (dt) {
    case FQ_F32:
        return launch_dequantize<float>(packed, absmax, qabsmax, nested, code256, offset, n, bs, qt,
                                        static_cast<float *>(out), st);
    case FQ_F16:
        return launch_dequantize<__half>(packed, absmax, qabsmax, nested, code256, offset, n, bs, qt,
                                         static_cast<__half *>(out), st);
    case FQ_BF16:
        return launch_dequantize<__nv_bfloat16>(packed, absmax, qabsmax, nested, code256, offset, n, bs, qt,
                                                static_cast<__nv_bfloat16 *>(out), st);
    default: return (int)cudaErrorInvalidValue;
    }
}

} // namespace

extern "C" int fq_cuda_quantize4(const void *x, fq_dtype dtype, int64_t n, int64_t blocksize, fq_quant_type qt,
                                 uint8_t *packed, float *absmax, cudaStream_t stream) {
    if (n < 0 || !blocksize_ok(blocksize) || (qt != FQ_QUANT_NF4 && qt != FQ_QUANT_FP4))
        return (int)cudaErrorInvalidValue;
    if (n == 0) return 0;
    uintptr_t pk_align = dtype == FQ_F32 ? 2 : 4;
    if (!fq_aligned(x, 16) || !fq_aligned(packed, pk_align) || !fq_aligned(absmax, 4))
        return (int)cudaErrorInvalidValue;
    switch (dtype) {
    case FQ_F32: return launch_quantize_t<float>(x, n, blocksize, qt, packed, absmax, stream);
    case FQ_F16: return launch_quantize_t<__half>(x, n, blocksize, qt, packed, absmax, stream);
    case FQ_BF16: return launch_quantize_t<__nv_bfloat16>(x, n, blocksize, qt, packed, absmax, stream);
    default: return (int)cudaErrorInvalidValue;
    }
}

extern "C" void fq_cuda_quant4_bucket_table(fq_quant_type qt, float thr[64], uint8_t base[64]) {
    const BucketTable t = build_table(qt);
    memcpy(thr, t.thr, sizeof t.thr);
    memcpy(base, t.base, sizeof t.base);
}

extern "C" int fq_cuda_dequantize4(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                                   fq_quant_type qt, void *out, fq_dtype out_dtype, cudaStream_t stream) {
    return dequantize_any(packed, absmax, NULL, NULL, NULL, 0.0f, n, blocksize, qt, out, out_dtype, stream);
}

extern "C" int fq_cuda_dequantize4_nested(const uint8_t *packed, const uint8_t *qabsmax, const float *nested_absmax,
                                          const float *code256, float offset, int64_t n, int64_t blocksize,
                                          fq_quant_type qt, void *out, fq_dtype out_dtype, cudaStream_t stream) {
    if (!qabsmax || !nested_absmax || !code256) return (int)cudaErrorInvalidValue;
    return dequantize_any(packed, NULL, qabsmax, nested_absmax, code256, offset, n, blocksize, qt, out, out_dtype,
                          stream);
}

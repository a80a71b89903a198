/* CPU 8-bit dynamic blockwise quantization (bitsandbytes' quantize_blockwise with
 * the signed dynamic map), byte-identical to its CUDA kernel. Used for the
 * double-quant absmax: q = dQuantize(code, (x - offset) * rcp(amax)).
 *
 * The subtraction of the offset is torch's (IEEE, subnormals kept); everything
 * after it is the fast-math kernel's (ftz, rcp.approx). Pass offset = +0.0f for
 * plain quantization (x - +0 == x bit for bit) and -0.0f to dequantize without
 * an offset (y + -0 == y bit for bit). */
#include "kernels/kernels.h"

#include <float.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && !defined(__STRICT_ANSI__)
#error "build in ISO C mode (-std=c11): GCC then keeps float expressions unfused (-ffp-contract=off)"
#endif
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline float ftz(float f) {
    uint32_t u = f2u(f);
    return (u & 0x7f800000u) ? f : u2f(u & 0x80000000u);
}

/* bitsandbytes' dQuantize<0>: a 7-step binary search over the sorted 256-entry
 * code, then the nearer neighbour by midpoint (ties stay on the pivot). Every
 * comparison and midpoint is the fast-math one (operands flushed). */
static unsigned dquantize(const float *code, float x) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f, val = code[pivot];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > ftz(val)) { lower_pivot = pivot; lower = val; pivot += i; }
        else { upper_pivot = pivot; upper = val; pivot -= i; }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[upper_pivot];
    if (lower_pivot == 0) lower = code[lower_pivot];
    if (x > ftz(val)) {
        float mid = ftz(ftz(ftz(upper) + ftz(val)) * 0.5f);
        return x > mid ? (unsigned)upper_pivot : (unsigned)pivot;
    }
    float mid = ftz(ftz(ftz(lower) + ftz(val)) * 0.5f);
    return x < mid ? (unsigned)lower_pivot : (unsigned)pivot;
}

void fq_cpu_quantize8(const float *x, float offset, int64_t n, int64_t blocksize, const float *code,
                      uint8_t *q, float *absmax) {
    for (int64_t start = 0, b = 0; start < n; start += blocksize, b++) {
        int64_t len = n - start < blocksize ? n - start : blocksize;
        /* fmaxf from -FLT_MAX (NaN ignored); a partial block also sees the zero padding. */
        float amax = len == blocksize ? -FLT_MAX : 0.0f;
        for (int64_t i = 0; i < len; i++) {
            float a = u2f(f2u(ftz(x[start + i] - offset)) & 0x7fffffffu);
            if (a > amax) amax = a;
        }
        absmax[b] = amax;
        float r = fq_rcp_approx(amax);
        for (int64_t i = 0; i < len; i++)
            q[start + i] = (uint8_t)dquantize(code, ftz(ftz(x[start + i] - offset) * r));
    }
}

void fq_cpu_dequantize8(const uint8_t *q, const float *absmax, const float *code, float offset,
                        int64_t n, int64_t blocksize, float *out) {
    /* block by block: no 64-bit division per element */
    for (int64_t b0 = 0; b0 < n; b0 += blocksize) {
        const float a = ftz(absmax[b0 / blocksize]);
        const int64_t end = n - b0 < blocksize ? n : b0 + blocksize;
        for (int64_t i = b0; i < end; i++) out[i] = ftz(ftz(code[q[i]]) * a) + offset;
    }
}

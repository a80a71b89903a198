/* CPU kernels of the transformer building blocks; see nn_cpu.h for the contract.
 * Everything is plain f32 code plus OpenBLAS sgemm for the two matrix products
 * (linear, attention). Where a bf16/f16 model is emulated, fq_round_to is applied
 * at the exact points where PyTorch materializes a bf16/f16 tensor. */
#include "kernels/cpu/nn_cpu.h"

#include <cblas.h>
#include <math.h>

/* ---- f16 conversions (IEEE binary16, round to nearest even) ---------------- */

float fq_f16_bits_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalize */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400u));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t fq_f32_to_f16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);      /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);     /* rounds to inf */
    if (a < 0x38800000u) {                                        /* f16 subnormal or zero */
        if (a < 0x33000000u) return sign;                         /* below half the smallest */
        uint32_t e = a >> 23, man = (a & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e; /* 14..24: value = man * 2^(e-150), unit 2^-24 */
        uint32_t q = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u); /* round mantissa to 10 bits */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

/* ---- elementwise ------------------------------------------------------------ */

void fq_cpu_to_f32(const void *src, fq_dtype dtype, int64_t n, float *dst) {
    if (dtype == FQ_F32) {
        if ((const void *)dst != src) memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    const uint16_t *h = src;
    if (dtype == FQ_BF16)
        for (int64_t i = 0; i < n; i++) dst[i] = fq_bf16_bits_to_f32(h[i]);
    else
        for (int64_t i = 0; i < n; i++) dst[i] = fq_f16_bits_to_f32(h[i]);
}

void fq_cpu_round(float *x, int64_t n, fq_dtype rnd) {
    if (rnd == FQ_F32) return;
    for (int64_t i = 0; i < n; i++) x[i] = fq_round_to(x[i], rnd);
}

void fq_cpu_scale(const float *x, float alpha, float *y, int64_t n, fq_dtype rnd) {
    for (int64_t i = 0; i < n; i++) y[i] = fq_round_to(x[i] * alpha, rnd);
}

void fq_cpu_add(const float *a, const float *b, float *y, int64_t n, fq_dtype rnd) {
    for (int64_t i = 0; i < n; i++) y[i] = fq_round_to(a[i] + b[i], rnd);
}

void fq_cpu_clamp(float *x, int64_t n, float lo, float hi) {
    for (int64_t i = 0; i < n; i++) x[i] = x[i] < lo ? lo : x[i] > hi ? hi : x[i];
}

void fq_cpu_silu(const float *x, float *y, int64_t n, fq_dtype rnd) {
    for (int64_t i = 0; i < n; i++) y[i] = fq_round_to(x[i] / (1.0f + expf(-x[i])), rnd);
}

void fq_cpu_gelu_tanh(const float *x, float *y, int64_t n, fq_dtype rnd) {
    /* PyTorch's formula and evaluation order for approximate='tanh'. */
    const float beta = (float)(M_SQRT2 * M_2_SQRTPI * 0.5), kappa = 0.044715f;
    for (int64_t i = 0; i < n; i++) {
        float v = x[i], cube = v * v * v, inner = beta * (v + kappa * cube);
        y[i] = fq_round_to(0.5f * v * (1.0f + tanhf(inner)), rnd);
    }
}

/* ---- linear ------------------------------------------------------------------ */

void fq_cpu_linear(int64_t m, int64_t n, int64_t k, const float *x, const float *w, const float *b,
                   float *y, fq_dtype rnd) {
    if (m == 0 || n == 0) return;
    /* The bias goes into C and the GEMM runs with beta = 1, so it is added to the
     * f32 accumulator before the single output rounding (as a cuBLAS epilogue). */
    if (b)
        for (int64_t i = 0; i < m; i++) memcpy(y + i * n, b, (size_t)n * sizeof(float));
    if (k > 0)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)m, (blasint)n, (blasint)k, 1.0f, x,
                    (blasint)k, w, (blasint)k, b ? 1.0f : 0.0f, y, (blasint)n);
    else if (!b)
        memset(y, 0, (size_t)(m * n) * sizeof(float));
    fq_cpu_round(y, m * n, rnd);
}

/* ---- normalization and modulation ------------------------------------------ */

void fq_cpu_adaln(const float *x, float *y, int64_t batch, int64_t rows, int64_t d, const float *shift,
                  const float *scale, int64_t mod_stride, float eps, fq_dtype rnd) {
    for (int64_t b = 0; b < batch; b++) {
        const float *sh = shift + b * mod_stride, *sc = scale + b * mod_stride;
        for (int64_t r = 0; r < rows; r++) {
            const float *xr = x + (b * rows + r) * d;
            float *yr = y + (b * rows + r) * d;
            double sum = 0, sq = 0;
            for (int64_t i = 0; i < d; i++) sum += xr[i];
            double mean = sum / (double)d;
            for (int64_t i = 0; i < d; i++) sq += ((double)xr[i] - mean) * ((double)xr[i] - mean);
            double rstd = 1.0 / sqrt(sq / (double)d + (double)eps);
            for (int64_t i = 0; i < d; i++) {
                float nrm = fq_round_to((float)(((double)xr[i] - mean) * rstd), rnd);
                float t = fq_round_to(nrm * fq_round_to(1.0f + sc[i], rnd), rnd);
                yr[i] = fq_round_to(t + sh[i], rnd);
            }
        }
    }
}

void fq_cpu_rmsnorm(const float *x, const float *w, float *y, int64_t groups, int64_t d, float eps,
                    fq_dtype rnd) {
    for (int64_t g = 0; g < groups; g++) {
        const float *xr = x + g * d;
        float *yr = y + g * d;
        double sq = 0;
        for (int64_t i = 0; i < d; i++) sq += (double)xr[i] * xr[i];
        double r = 1.0 / sqrt(sq / (double)d + (double)eps);
        for (int64_t i = 0; i < d; i++) yr[i] = fq_round_to((float)((double)xr[i] * r * w[i]), rnd);
    }
}

void fq_cpu_gated_add(float *h, const float *gate, int64_t mod_stride, const float *a, int64_t batch,
                      int64_t rows, int64_t d, fq_dtype rnd) {
    for (int64_t b = 0; b < batch; b++) {
        const float *g = gate + b * mod_stride;
        for (int64_t r = 0; r < rows; r++) {
            float *hr = h + (b * rows + r) * d;
            const float *ar = a + (b * rows + r) * d;
            for (int64_t i = 0; i < d; i++) hr[i] = fq_round_to(hr[i] + fq_round_to(g[i] * ar[i], rnd), rnd);
        }
    }
}

/* ---- positional embedding --------------------------------------------------- */

void fq_cpu_rope_table(const float *ids, int64_t seq, const int64_t axes[3], double theta, float *cos_t,
                       float *sin_t, int64_t dh) {
    for (int64_t s = 0; s < seq; s++) {
        int64_t col = 0;
        for (int a = 0; a < 3; a++) {
            double p = (double)ids[s * 3 + a];
            for (int64_t j = 0; j < axes[a] / 2; j++) {
                double freq = 1.0 / pow(theta, (double)(2 * j) / (double)axes[a]);
                double ang = p * freq;
                float c = (float)cos(ang), sn = (float)sin(ang);
                cos_t[s * dh + col] = cos_t[s * dh + col + 1] = c;
                sin_t[s * dh + col] = sin_t[s * dh + col + 1] = sn;
                col += 2;
            }
        }
    }
}

void fq_cpu_rope(float *x, const float *cos_t, const float *sin_t, int64_t batch, int64_t seq,
                 int64_t heads, int64_t dh, fq_dtype rnd) {
    for (int64_t b = 0; b < batch; b++)
        for (int64_t s = 0; s < seq; s++) {
            const float *c = cos_t + s * dh, *sn = sin_t + s * dh;
            for (int64_t h = 0; h < heads; h++) {
                float *v = x + ((b * seq + s) * heads + h) * dh;
                for (int64_t i = 0; i < dh; i += 2) {
                    float re = v[i], im = v[i + 1];
                    /* x·cos + rotate(x)·sin, two f32 products and one sum, like PyTorch. */
                    float p0 = re * c[i], q0 = -im * sn[i];
                    float p1 = im * c[i + 1], q1 = re * sn[i + 1];
                    v[i] = fq_round_to(p0 + q0, rnd);
                    v[i + 1] = fq_round_to(p1 + q1, rnd);
                }
            }
        }
}

void fq_cpu_timestep_proj(const float *t, int64_t batch, int64_t half, float *out) {
    /* exponent = (-ln(10000) as f32) * j, / half, exp, times t: each step an f32
     * operation, in PyTorch's order, because the guidance arguments reach ~3500 rad
     * and any extra rounding moves the phase. */
    const float neg_log = (float)(-log(10000.0));
    for (int64_t b = 0; b < batch; b++) {
        float *o = out + b * 2 * half;
        for (int64_t j = 0; j < half; j++) {
            float e = (neg_log * (float)j) / (float)half;
            float arg = t[b] * expf(e);
            o[j] = cosf(arg);
            o[half + j] = sinf(arg);
        }
    }
}

/* ---- attention --------------------------------------------------------------- */

int64_t fq_cpu_attention_scratch(int64_t seq) {
    int64_t qb = seq < FQ_CPU_ATTN_QBLOCK ? seq : FQ_CPU_ATTN_QBLOCK;
    return qb * seq + qb;
}

void fq_cpu_attention(const float *q, const float *k, const float *v, float *out, int64_t batch,
                      int64_t seq, int64_t heads, int64_t dh, float *scratch, fq_dtype rnd) {
    const int64_t ld = heads * dh;
    const float scale = (float)(1.0 / sqrt((double)dh));
    for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < heads; h++) {
            const float *qh = q + b * seq * ld + h * dh, *kh = k + b * seq * ld + h * dh,
                        *vh = v + b * seq * ld + h * dh;
            float *oh = out + b * seq * ld + h * dh;
            for (int64_t q0 = 0; q0 < seq; q0 += FQ_CPU_ATTN_QBLOCK) {
                int64_t qb = seq - q0 < FQ_CPU_ATTN_QBLOCK ? seq - q0 : FQ_CPU_ATTN_QBLOCK;
                float *sc = scratch, *rowsum = scratch + qb * seq;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)qb, (blasint)seq, (blasint)dh,
                            scale, qh + q0 * ld, (blasint)ld, kh, (blasint)ld, 0.0f, sc, (blasint)seq);
                for (int64_t i = 0; i < qb; i++) {
                    float *r = sc + i * seq, mx = r[0];
                    for (int64_t j = 1; j < seq; j++) mx = r[j] > mx ? r[j] : mx;
                    double sum = 0;
                    for (int64_t j = 0; j < seq; j++) {
                        float e = expf(r[j] - mx);
                        sum += e;
                        r[j] = fq_round_to(e, rnd); /* fused kernels round P before P·V */
                    }
                    rowsum[i] = (float)sum;
                }
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)qb, (blasint)dh, (blasint)seq,
                            1.0f, sc, (blasint)seq, vh, (blasint)ld, 0.0f, oh + q0 * ld, (blasint)ld);
                for (int64_t i = 0; i < qb; i++) {
                    float *o = oh + (q0 + i) * ld;
                    for (int64_t j = 0; j < dh; j++) o[j] = fq_round_to(o[j] / rowsum[i], rnd);
                }
            }
        }
}

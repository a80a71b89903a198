/* rcp.approx.ftz.f32 as the H100 computes it, in portable C.
 *
 * bitsandbytes is built with --use_fast_math, so its `1.0f / absmax` is the
 * hardware reciprocal approximation, not IEEE division. On sm_90 the result for
 * a normal x = 2^e * 1.m depends only on m: it is the correctly rounded 1/1.m
 * plus -1, 0 or +1 ulp, scaled by 2^-e. The per-mantissa correction was
 * measured on an H100 and is linked in from data/rcp_approx_sm90.bin.xz
 * (2 bits per mantissa, stored value = correction + 1). */
#include "kernels/kernels.h"

#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && !defined(__STRICT_ANSI__)
#error "build in ISO C mode (-std=c11): GCC then keeps float expressions unfused (-ffp-contract=off)"
#endif

extern const unsigned char fq_rcp_sm90_delta[]; /* 2^23 / 4 bytes, rcp_table.S */

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

float fq_rcp_approx(float x) {
    uint32_t u = f2u(x), sign = u & 0x80000000u, ex = (u >> 23) & 0xff, m = u & 0x7fffffu;
    if (ex == 0xff) return m ? u2f(0x7fffffffu) : u2f(sign);       /* NaN -> canonical, inf -> 0 */
    if (ex == 0) return u2f(sign | 0x7f800000u);                     /* 0 and subnormals (ftz) -> inf */
    /* Correctly rounded 1/1.m (IEEE division is exact-rounded in C), then the measured delta. */
    uint32_t rn = f2u(1.0f / u2f(0x3f800000u | m));
    int delta = ((fq_rcp_sm90_delta[m >> 2] >> (2 * (m & 3))) & 3) - 1;
    uint32_t t = rn + (uint32_t)delta; /* exponent field 126 or 127: 1/1.m is in (0.5, 1] */
    /* Scale by 2^-(ex-127); below the normal range the ftz result is a signed zero. */
    int32_t rex = (int32_t)((t >> 23) & 0xff) - ((int32_t)ex - 127);
    if (rex <= 0) return u2f(sign);
    return u2f(sign | ((uint32_t)rex << 23) | (t & 0x7fffffu));
}

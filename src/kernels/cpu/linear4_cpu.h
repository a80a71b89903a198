/* CPU kernels of the 4-bit linear layer y = x · Wᵀ (+ bias), f32 accumulation.
 *
 * Three kernels, chosen by the ops layer (forced with fq_ctx_set_linear_kernel):
 *  - GEMV: streams the packed weight once per group of up to 8 rows of x;
 *    bandwidth-bound, for small M.
 *  - GEMM: a blocked kernel (x packed once, weight tiles dequantized into L1
 *    and multiplied by a register-blocked micro-kernel), for larger M.
 *  - DEQUANT_BLAS: dequantizes panels of the weight to f32 and calls OpenBLAS
 *    sgemm; the reference the GEMM kernel is measured against.
 * Each has AVX-512 and AVX2 versions picked at run time and a scalar
 * fallback that works on any x86-64 (or any other) CPU.
 *
 * The caller (src/ops/linear_ops.c) has checked placement, dtypes and shapes;
 * these functions never fail, never allocate and never print. The scratch they
 * need is sized by fq_cpu_linear4_scratch_bytes and owned by the caller. */
#ifndef FQ_LINEAR4_CPU_H
#define FQ_LINEAR4_CPU_H

#include "ops/linear_internal.h"

typedef enum {
    FQ_CPU_ISA_SCALAR = 0, /* plain C: the reference path, any CPU            */
    FQ_CPU_ISA_AVX2 = 1,   /* AVX2 + FMA + F16C                              */
    FQ_CPU_ISA_AVX512 = 2  /* AVX-512 F/BW/VL/DQ                             */
} fq_cpu_isa;

/* The best ISA this CPU supports (decided once per call, no cache: cheap). */
fq_cpu_isa fq_cpu_isa_best(void);
const char *fq_cpu_isa_name(fq_cpu_isa isa);

typedef struct {
    const void *x;      /* [m, k] row-major, x_dtype (f32/f16/bf16)        */
    fq_dtype x_dtype;
    const void *bias;   /* [n] or NULL, bias_dtype (f32/f16/bf16/f64)      */
    fq_dtype bias_dtype;
    void *y;            /* [m, n] row-major, y_dtype (f32/f16/bf16)        */
    fq_dtype y_dtype;
    int64_t m;          /* rows of x and y                                 */
    fq_w4_view w;       /* [n, k] host pointers                            */
    int always_threads; /* tests: use the threads even for small problems  */
} fq_cpu_linear4_args;

/* The kernel FQ_LINEAR_AUTO means for this problem on this ISA. */
fq_linear_kernel fq_cpu_linear4_pick(int64_t m, int64_t n, int64_t k, fq_cpu_isa isa);

/* Bytes of host scratch fq_cpu_linear4 needs for kernel `kern` (not AUTO);
 * 0 means none (scratch may then be NULL). */
size_t fq_cpu_linear4_scratch_bytes(fq_linear_kernel kern, fq_cpu_isa isa, const fq_cpu_linear4_args *a);

/* Runs kernel `kern` (not AUTO) with the ISA `isa` (at most fq_cpu_isa_best())
 * over the context's threads. scratch: at least fq_cpu_linear4_scratch_bytes,
 * 64-byte aligned, owned by the caller. Results do not depend on the number
 * of threads: every output element is summed by one thread in a fixed order. */
void fq_cpu_linear4(fq_ctx *ctx, fq_linear_kernel kern, fq_cpu_isa isa, const fq_cpu_linear4_args *a,
                    void *scratch);

#endif

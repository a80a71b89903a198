/* Split of fq_linear_4bit between the ops layer and the CUDA backend.
 * src/ops/linear_ops.c checks every operand (placement of x, bias, y and of
 * every member of w's state; dtypes; shapes) and runs the CPU path itself;
 * for a CUDA device it calls fq_linear4_cuda with everything already checked. */
#ifndef FQ_LINEAR_INTERNAL_H
#define FQ_LINEAR_INTERNAL_H

#include "core/qtensor.h"

/* A read-only view of a quantized weight [N, K] for the kernels. */
typedef struct {
    const uint8_t *packed;        /* (N*K+1)/2 bytes, row-major, element 2i in the high nibble */
    const float *absmax;          /* f32 [nblocks], NULL when nested                         */
    const uint8_t *qabsmax;       /* u8 [nblocks] when nested                                */
    const float *nested_absmax;   /* f32 [ceil(nblocks/256)] when nested                     */
    const float *nested_code;     /* f32 [256] when nested                                   */
    float offset;                 /* nested offset                                            */
    int nested;
    int64_t blocksize;
    fq_quant_type type;
    int64_t n, k;                 /* out_features, in_features                               */
} fq_w4_view;

fq_w4_view fq_w4_view_of(const fq_qtensor *w);

#ifdef FQ_HAVE_CUDA
/* Runs on w's device (caller has checked placement of all operands). M = rows of x. */
fq_status fq_linear4_cuda(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *w, const fq_tensor *bias,
                          fq_tensor *y, int64_t m);
/* The same under FQ_LIN4_AUTO_EXACT whatever ctx->linear_kernel says: the weights
 * enter the products exactly as dequantize_4bit writes them (the FLUX forward's
 * M <= 2 linears, which must compute what dequantize + GEMM computes). */
fq_status fq_linear4_cuda_exact(fq_ctx *ctx, const fq_tensor *x, const fq_qtensor *w, const fq_tensor *bias,
                                fq_tensor *y, int64_t m);
#endif

#endif

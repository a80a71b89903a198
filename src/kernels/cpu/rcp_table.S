/* The H100's rcp.approx.ftz.f32 as a 2-bit delta per 23-bit mantissa (see data/README.md).
 * Linked in as read-only data; fq_rcp_approx() in rcp_approx.c reads it. */
#ifndef FQ_RCP_TABLE_FILE
#error "FQ_RCP_TABLE_FILE must name the decompressed table (the Makefile sets it)"
#endif

    .section .rodata
    .balign 64
    .globl fq_rcp_sm90_delta
    .type fq_rcp_sm90_delta, @object
fq_rcp_sm90_delta:
    .incbin FQ_RCP_TABLE_FILE
fq_rcp_sm90_delta_end:
    .size fq_rcp_sm90_delta, fq_rcp_sm90_delta_end - fq_rcp_sm90_delta

    .section .note.GNU-stack,"",@progbits

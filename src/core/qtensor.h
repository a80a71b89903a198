/* Internal layout of a quantized 4-bit tensor: one allocation, members carved out of it. */
#ifndef FQ_QTENSOR_H
#define FQ_QTENSOR_H

#include "core/core.h"

/* Where one member of the state lives. Normally `dev` is the qtensor's device
 * and `ptr` points into its one buffer; only the test hook below can make
 * them differ (to prove that the placement check catches it). */
typedef struct {
    fq_device dev;
    void *ptr;
    size_t offset; /* within buf */
    size_t bytes;  /* 0: the state has no such member */
} fq_qmember_loc;

struct fq_qtensor {
    fq_qtensor_info info;
    fq_buffer buf;                       /* the one allocation on info.device */
    fq_qmember_loc m[FQ_QMEMBER_COUNT];  /* members, all inside buf          */
    fq_buffer stray;                     /* test hook only: a misplaced member */
    char *name;
    /* 1: every byte of the state has been written and the host has synchronized
     * with those writes (every path that fills a qtensor ends with a stream
     * synchronize). Kernels may then read the weight before their programmatic-
     * launch wait: nothing still running can be writing it. 0 while being filled. */
    int ready;
};

/* Fills info.numel/nblocks/nested_nblocks and member sizes/offsets; info.bytes. */
fq_status fq_qtensor_layout(fq_ctx *ctx, fq_qtensor_info *info, fq_qmember_loc m[FQ_QMEMBER_COUNT]);
/* Allocates a qtensor on dev with the given info (members uninitialized except
 * the code tables, which are written). Caller frees. */
fq_status fq_qtensor_alloc(fq_ctx *ctx, fq_device dev, const fq_qtensor_info *info, fq_qtensor **out);

/* Invariant 3: every member of q is on `exec`. Names tensor, member and devices. */
fq_status fq_check_qtensor(fq_ctx *ctx, const char *op, const fq_qtensor *q, fq_device exec);

int fq_blocksize_valid(int64_t bs);

/* ---- test hooks (not in the public header) ---- */
/* Re-creates the diffusers#10798 scenario: member m of q is left on `dev`.
 * If dev can hold memory, the member's bytes are copied there for real;
 * otherwise only its recorded device changes. */
fq_status fq_test_misplace_member(fq_ctx *ctx, fq_qtensor *q, fq_qmember m, fq_device dev);
/* Makes the n-th allocation from now on this context fail (0: never). */
void fq_test_fail_alloc_in(fq_ctx *ctx, int64_t n);

#endif

/* The one allocator and byte copies between devices. */
#include "core/core.h"
#include "core/cuda_device.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

enum { HUGE_ALIGN = 2 << 20, HUGE_MIN = 8 << 20 };

/* Allocation counters per device: [0] the CPU, [1 + i] cuda:i. */
static struct {
    int64_t current, peak, count;
} g_mem[1 + FQ_MAX_CUDA_DEVICES];

static int mem_slot(fq_device d) {
    if (d.type == FQ_DEVICE_CPU) return 0;
    return d.index >= 0 && d.index < FQ_MAX_CUDA_DEVICES ? 1 + d.index : -1;
}

static void mem_count(fq_device d, int64_t bytes, int64_t buffers) {
    int i = mem_slot(d);
    if (i < 0) return;
    int64_t now = __atomic_add_fetch(&g_mem[i].current, bytes, __ATOMIC_RELAXED);
    __atomic_add_fetch(&g_mem[i].count, buffers, __ATOMIC_RELAXED);
    int64_t peak = __atomic_load_n(&g_mem[i].peak, __ATOMIC_RELAXED);
    while (now > peak &&
           !__atomic_compare_exchange_n(&g_mem[i].peak, &peak, now, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

void fq_mem_get(fq_device dev, fq_mem_stats *out) {
    int i = mem_slot(dev);
    out->current = i < 0 ? 0 : __atomic_load_n(&g_mem[i].current, __ATOMIC_RELAXED);
    out->peak = i < 0 ? 0 : __atomic_load_n(&g_mem[i].peak, __ATOMIC_RELAXED);
    out->count = i < 0 ? 0 : __atomic_load_n(&g_mem[i].count, __ATOMIC_RELAXED);
}

void fq_mem_reset_peak(fq_device dev) {
    int i = mem_slot(dev);
    if (i >= 0) __atomic_store_n(&g_mem[i].peak, __atomic_load_n(&g_mem[i].current, __ATOMIC_RELAXED), __ATOMIC_RELAXED);
}

static bool injected_failure(fq_ctx *ctx) {
    if (!ctx || ctx->test_fail_alloc_in <= 0) return false;
    return --ctx->test_fail_alloc_in == 0;
}

fq_status fq_buf_alloc(fq_ctx *ctx, fq_device dev, size_t bytes, fq_buffer *out) {
    char dn[16];
    fq_buffer b = {dev, NULL, bytes};
    if (injected_failure(ctx))
        return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of memory allocating %zu bytes on %s (injected)",
                      bytes, fq_device_name(dev, dn, sizeof dn));
    if (dev.type == FQ_DEVICE_CPU) {
        /* Large buffers (weights, activations) on 2 MiB boundaries with transparent
         * huge pages: streaming kernels then miss the TLB far less. */
        size_t n = bytes ? bytes : 1, align = n >= HUGE_MIN ? HUGE_ALIGN : 64;
        if (posix_memalign(&b.ptr, align, n) != 0)
            return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of memory allocating %zu bytes on cpu", bytes);
        if (align == HUGE_ALIGN) (void)madvise(b.ptr, n, MADV_HUGEPAGE); /* a hint; failure is harmless */
    } else {
#ifdef FQ_HAVE_CUDA
        FQ_TRY(fq_cuda_alloc(ctx, dev.index, bytes, &b.ptr));
#else
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "cannot allocate on %s: built without CUDA",
                      fq_device_name(dev, dn, sizeof dn));
#endif
    }
    mem_count(dev, (int64_t)bytes, 1);
    *out = b;
    return FQ_OK;
}

void fq_buf_free(fq_buffer *b) {
    if (!b || !b->ptr) return;
    mem_count(b->dev, -(int64_t)b->bytes, -1);
    if (b->dev.type == FQ_DEVICE_CPU) free(b->ptr);
#ifdef FQ_HAVE_CUDA
    else fq_cuda_free(b->dev.index, b->ptr);
#endif
    b->ptr = NULL;
    b->bytes = 0;
}

static fq_status range_check(fq_ctx *ctx, const fq_buffer *b, size_t off, size_t bytes) {
    if (off > b->bytes || bytes > b->bytes - off)
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "copy of %zu bytes at %zu is outside a %zu-byte buffer",
                      bytes, off, b->bytes);
    return FQ_OK;
}

fq_status fq_buf_copy(fq_ctx *ctx, const fq_buffer *dst, size_t dst_off, const fq_buffer *src,
                      size_t src_off, size_t bytes) {
    FQ_TRY(range_check(ctx, dst, dst_off, bytes));
    FQ_TRY(range_check(ctx, src, src_off, bytes));
    if (bytes == 0) return FQ_OK;
    if (dst->dev.type == FQ_DEVICE_CPU && src->dev.type == FQ_DEVICE_CPU) {
        memmove((char *)dst->ptr + dst_off, (const char *)src->ptr + src_off, bytes);
        return FQ_OK;
    }
#ifdef FQ_HAVE_CUDA
    return fq_cuda_copy(ctx, dst, dst_off, src, src_off, bytes);
#else
    return fq_err(ctx, FQ_ERR_UNSUPPORTED, "device copy in a build without CUDA");
#endif
}

fq_status fq_buf_write(fq_ctx *ctx, const fq_buffer *dst, size_t off, const void *src, size_t bytes) {
    fq_buffer h = {FQ_CPU, (void *)src, bytes};
    return fq_buf_copy(ctx, dst, off, &h, 0, bytes);
}

fq_status fq_buf_read(fq_ctx *ctx, const fq_buffer *src, size_t off, void *dst, size_t bytes) {
    fq_buffer h = {FQ_CPU, dst, bytes};
    return fq_buf_copy(ctx, &h, 0, src, off, bytes);
}

fq_status fq_buf_zero(fq_ctx *ctx, const fq_buffer *dst, size_t off, size_t bytes) {
    FQ_TRY(range_check(ctx, dst, off, bytes));
    if (dst->dev.type == FQ_DEVICE_CPU) {
        memset((char *)dst->ptr + off, 0, bytes);
        return FQ_OK;
    }
#ifdef FQ_HAVE_CUDA
    return fq_cuda_zero(ctx, dst, off, bytes);
#else
    return fq_err(ctx, FQ_ERR_UNSUPPORTED, "device memset in a build without CUDA");
#endif
}

/* The only file that touches the CUDA current device or allocates device memory.
 * Invariant 1 of DESIGN.md lives here: every CUDA call elsewhere runs inside a
 * guard entered for the device of the buffer it touches. */
#ifdef FQ_HAVE_CUDA
#include "core/cuda_device.h"

#include <cublasLt.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* cuDevicePrimaryCtxGetState, fetched from the driver at run time so that the
 * library links against the static runtime only (CI machines have no driver). */
typedef int (*primary_state_fn)(int dev, unsigned int *flags, int *active);
static primary_state_fn g_primary_state;
static pthread_once_t g_primary_once = PTHREAD_ONCE_INIT;

static void load_primary_state(void) {
    void *fn = NULL;
    enum cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuDevicePrimaryCtxGetState", &fn, 12000, cudaEnableDefault,
                                         &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
        g_primary_state = (primary_state_fn)fn;
    else
        (void)cudaGetLastError();
}

static bool primary_ctx_active(int dev) {
    pthread_once(&g_primary_once, load_primary_state);
    int active = 0;
    unsigned flags = 0;
    if (!g_primary_state || g_primary_state(dev, &flags, &active) != 0) return false;
    return active != 0;
}

fq_status fq_cuda_status(fq_ctx *ctx, cudaError_t e, const char *what, int device) {
    (void)cudaGetLastError(); /* clear sticky-free errors so the next call starts clean */
    fq_status s = (e == cudaErrorMemoryAllocation) ? FQ_ERR_OUT_OF_MEMORY
                  : (e == cudaErrorInvalidDevice || e == cudaErrorNoDevice) ? FQ_ERR_NO_DEVICE
                                                                             : FQ_ERR_CUDA;
    return fq_err(ctx, s, "cuda:%d: %s failed: %s (%s)", device, what, cudaGetErrorString(e),
                  cudaGetErrorName(e));
}

fq_status fq_cuda_guard_enter(fq_ctx *ctx, int device, fq_cuda_guard *g) {
    int prev = -1;
    g->target = device;
    g->restore = false;
    if (cudaGetDevice(&prev) != cudaSuccess) { (void)cudaGetLastError(); prev = -1; }
    g->prev = prev;
    if (prev == device) return FQ_OK;
    /* Decide before switching: restoring is only harmless if prev already has a context. */
    g->restore = prev >= 0 && primary_ctx_active(prev);
    FQ_CUDA_TRY(ctx, cudaSetDevice(device), device);
    return FQ_OK;
}

void fq_cuda_guard_exit(fq_cuda_guard *g) {
    if (g->restore && g->prev != g->target) (void)cudaSetDevice(g->prev);
}

fq_status fq_cuda_dev_get(fq_ctx *ctx, int device, fq_cuda_dev **out) {
    if (device < 0 || device >= FQ_MAX_CUDA_DEVICES)
        return fq_err(ctx, FQ_ERR_NO_DEVICE, "cuda:%d is out of range", device);
    if (ctx->cuda[device]) { *out = ctx->cuda[device]; return FQ_OK; }
    FQ_TRY(fq_device_check(ctx, FQ_CUDA(device)));
    fq_cuda_dev *d = calloc(1, sizeof *d);
    if (!d) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    d->index = device;
    fq_cuda_guard g;
    fq_status s = fq_cuda_guard_enter(ctx, device, &g);
    if (s != FQ_OK) { free(d); return s; }
    struct cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, device);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&d->stream, cudaStreamNonBlocking);
    fq_cuda_guard_exit(&g);
    if (e != cudaSuccess) { free(d); return fq_cuda_status(ctx, e, "device setup", device); }
    d->sm_count = p.multiProcessorCount;
    d->cc_major = p.major;
    d->cc_minor = p.minor;
    d->smem_optin = p.sharedMemPerBlockOptin;
    ctx->cuda[device] = d;
    *out = d;
    return FQ_OK;
}

void fq_cuda_dev_release_all(fq_ctx *ctx) {
    for (int i = 0; i < FQ_MAX_CUDA_DEVICES; i++) {
        fq_cuda_dev *d = ctx->cuda[i];
        if (!d) continue;
        fq_cuda_guard g;
        if (fq_cuda_guard_enter(NULL, i, &g) == FQ_OK) {
            (void)cudaStreamSynchronize(d->stream);
            if (d->cudnn_release) d->cudnn_release(d);
            fq_buf_free(&d->lin_scratch);
            fq_buf_free(&d->lin_workspace);
            fq_buf_free(&d->lin_flags);
            if (d->blaslt) (void)cublasLtDestroy(d->blaslt);
            (void)cudaStreamDestroy(d->stream);
            fq_cuda_guard_exit(&g);
        }
        free(d);
        ctx->cuda[i] = NULL;
    }
}

fq_status fq_cuda_dev_blaslt(fq_ctx *ctx, fq_cuda_dev *d, struct cublasLtContext **out) {
    if (!d->blaslt) {
        fq_cuda_guard g;
        FQ_TRY(fq_cuda_guard_enter(ctx, d->index, &g));
        cublasLtHandle_t h = NULL;
        cublasStatus_t st = cublasLtCreate(&h);
        fq_cuda_guard_exit(&g);
        if (st != CUBLAS_STATUS_SUCCESS)
            return fq_err(ctx, st == CUBLAS_STATUS_ALLOC_FAILED ? FQ_ERR_OUT_OF_MEMORY : FQ_ERR_CUDA,
                          "cuda:%d: cublasLtCreate failed: %s", d->index, cublasLtGetStatusString(st));
        d->blaslt = h;
    }
    *out = d->blaslt;
    return FQ_OK;
}

fq_status fq_cuda_alloc(fq_ctx *ctx, int device, size_t bytes, void **out) {
    FQ_TRY(fq_device_check(ctx, FQ_CUDA(device)));
    fq_cuda_guard g;
    FQ_TRY(fq_cuda_guard_enter(ctx, device, &g));
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    fq_cuda_guard_exit(&g);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return fq_err(ctx, e == cudaErrorMemoryAllocation ? FQ_ERR_OUT_OF_MEMORY : FQ_ERR_CUDA,
                      "out of memory allocating %zu bytes on cuda:%d (%s)", bytes, device,
                      cudaGetErrorString(e));
    }
    *out = p;
    return FQ_OK;
}

void fq_cuda_free(int device, void *p) {
    fq_cuda_guard g;
    if (fq_cuda_guard_enter(NULL, device, &g) != FQ_OK) return;
    (void)cudaFree(p);
    fq_cuda_guard_exit(&g);
}

fq_status fq_cuda_copy(fq_ctx *ctx, const fq_buffer *dst, size_t dst_off, const fq_buffer *src,
                       size_t src_off, size_t bytes) {
    char *d = (char *)dst->ptr + dst_off;
    const char *s = (const char *)src->ptr + src_off;
    bool dc = dst->dev.type == FQ_DEVICE_CUDA, sc = src->dev.type == FQ_DEVICE_CUDA;
    if (dc && sc && dst->dev.index != src->dev.index) {
        /* Peer copy: runs on the destination's stream; no current-device reliance. */
        fq_cuda_dev *dd;
        FQ_TRY(fq_cuda_dev_get(ctx, dst->dev.index, &dd));
        fq_cuda_guard g;
        FQ_TRY(fq_cuda_guard_enter(ctx, dst->dev.index, &g));
        cudaError_t e = cudaMemcpyPeerAsync(d, dst->dev.index, s, src->dev.index, bytes, dd->stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(dd->stream);
        fq_cuda_guard_exit(&g);
        if (e != cudaSuccess) return fq_cuda_status(ctx, e, "cudaMemcpyPeerAsync", dst->dev.index);
        return FQ_OK;
    }
    int dev = dc ? dst->dev.index : src->dev.index;
    fq_cuda_dev *cd;
    FQ_TRY(fq_cuda_dev_get(ctx, dev, &cd));
    fq_cuda_guard g;
    FQ_TRY(fq_cuda_guard_enter(ctx, dev, &g));
    cudaError_t e = cudaMemcpyAsync(d, s, bytes, cudaMemcpyDefault, cd->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(cd->stream);
    fq_cuda_guard_exit(&g);
    if (e != cudaSuccess) return fq_cuda_status(ctx, e, "cudaMemcpyAsync", dev);
    return FQ_OK;
}

fq_status fq_cuda_zero(fq_ctx *ctx, const fq_buffer *dst, size_t off, size_t bytes) {
    fq_cuda_dev *cd;
    FQ_TRY(fq_cuda_dev_get(ctx, dst->dev.index, &cd));
    fq_cuda_guard g;
    FQ_TRY(fq_cuda_guard_enter(ctx, dst->dev.index, &g));
    cudaError_t e = cudaMemsetAsync((char *)dst->ptr + off, 0, bytes, cd->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(cd->stream);
    fq_cuda_guard_exit(&g);
    if (e != cudaSuccess) return fq_cuda_status(ctx, e, "cudaMemsetAsync", dst->dev.index);
    return FQ_OK;
}
#else
typedef int fq_cuda_device_unused; /* ISO C forbids an empty translation unit */
#endif

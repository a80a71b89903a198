/* Device names and discovery. */
#include "core/core.h"
#include "core/cuda_device.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

fq_status fq_device_parse(fq_ctx *ctx, const char *s, fq_device *out) {
    if (!s || !out) return fq_err(ctx, FQ_ERR_INVALID_ARG, "device: no device name given");
    if (strcmp(s, "cpu") == 0) { *out = FQ_CPU; return FQ_OK; }
    if (strcmp(s, "cuda") == 0 || strcmp(s, "gpu") == 0) { *out = FQ_CUDA(0); return FQ_OK; }
    if (strncmp(s, "cuda:", 5) == 0 && isdigit((unsigned char)s[5])) {
        char *end;
        errno = 0;
        long v = strtol(s + 5, &end, 10);
        if (*end == '\0' && errno == 0 && v >= 0 && v < FQ_MAX_CUDA_DEVICES) {
            *out = FQ_CUDA((int)v);
            return FQ_OK;
        }
    }
    return fq_err(ctx, FQ_ERR_INVALID_ARG,
                  "device: cannot parse '%s' (expected cpu, cuda or cuda:N)", s);
}

char *fq_device_name(fq_device d, char *buf, size_t n) {
    if (d.type == FQ_DEVICE_CPU) snprintf(buf, n, "cpu");
    else snprintf(buf, n, "cuda:%d", d.index);
    return buf;
}

int fq_device_equal(fq_device a, fq_device b) {
    return a.type == b.type && (a.type == FQ_DEVICE_CPU || a.index == b.index);
}

int fq_has_cuda(void) {
#ifdef FQ_HAVE_CUDA
    return 1;
#else
    return 0;
#endif
}

int fq_cuda_device_count(void) {
#ifdef FQ_HAVE_CUDA
    int n = 0;
    /* cudaGetDeviceCount initializes the driver only; it creates no context. */
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
#else
    return 0;
#endif
}

fq_status fq_device_check(fq_ctx *ctx, fq_device d) {
    if (d.type == FQ_DEVICE_CPU) return FQ_OK;
    if (!fq_has_cuda())
        return fq_err(ctx, FQ_ERR_UNSUPPORTED,
                      "device cuda:%d: this fluxq was built without CUDA", d.index);
    int n = fq_cuda_device_count();
    if (d.index < 0 || d.index >= n)
        return fq_err(ctx, FQ_ERR_NO_DEVICE, "device cuda:%d does not exist (%d CUDA device%s visible)",
                      d.index, n, n == 1 ? "" : "s");
    return FQ_OK;
}

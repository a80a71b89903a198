/* The device a stream belongs to, as launchers need it for grid sizing.
 * cudaStreamGetDevice is not allowed while the stream is being captured into a
 * CUDA graph (it invalidates the capture), so the answers for the last few
 * streams of this host thread are kept: a capture of the FLUX forward follows
 * an eager run of the same ops on the same stream. A stream first seen during
 * a capture gets cudaErrorStreamCaptureUnsupported (the capture stays valid).
 * No process-wide cache: another thread asks the driver itself. */
#ifndef FQ_STREAM_DEVICE_CUH
#define FQ_STREAM_DEVICE_CUH

#include <cuda_runtime.h>

static inline cudaError_t fq_stream_device(cudaStream_t st, int *dev) {
    constexpr int kSlots = 8;
    thread_local cudaStream_t seen[kSlots];
    thread_local int seen_dev[kSlots], next = 0;
    for (int i = 0; i < kSlots; i++)
        if (seen[i] == st && st != nullptr) {
            *dev = seen_dev[i];
            return cudaSuccess;
        }
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    cudaError_t e = cudaStreamIsCapturing(st, &cap);
    if (e != cudaSuccess) return e;
    if (cap != cudaStreamCaptureStatusNone) return cudaErrorStreamCaptureUnsupported;
    e = cudaStreamGetDevice(st, dev);
    if (e == cudaSuccess && st != nullptr) {
        seen[next] = st;
        seen_dev[next] = *dev;
        next = (next + 1) % kSlots;
    }
    return e;
}

#endif

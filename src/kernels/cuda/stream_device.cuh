/* The device a stream belongs to, as launchers need it for grid sizing.
 * cudaStreamGetDevice is not allowed while the stream is being captured into a
 * CUDA graph (it invalidates the capture), so outside a capture the driver is
 * asked and its answer kept for the last few streams of this host thread, and
 * during a capture the kept answer is used: a capture of the FLUX forward
 * follows an eager run of the same ops on the same stream. A stream first seen
 * during a capture gets cudaErrorStreamCaptureUnsupported (the capture stays
 * valid). No process-wide cache; a kept answer is only read during a capture,
 * so a destroyed stream's handle reused later cannot mislead an eager launch. */
#ifndef FQ_STREAM_DEVICE_CUH
#define FQ_STREAM_DEVICE_CUH

#include <cuda_runtime.h>

static inline cudaError_t fq_stream_device(cudaStream_t st, int *dev) {
    constexpr int kSlots = 8;
    thread_local cudaStream_t seen[kSlots];
    thread_local int seen_dev[kSlots], next = 0;
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    cudaError_t e = cudaStreamIsCapturing(st, &cap);
    if (e != cudaSuccess) return e;
    if (cap != cudaStreamCaptureStatusNone) {
        for (int i = 0; i < kSlots; i++)
            if (seen[i] == st && st != nullptr) {
                *dev = seen_dev[i];
                return cudaSuccess;
            }
        return cudaErrorStreamCaptureUnsupported;
    }
    e = cudaStreamGetDevice(st, dev);
    if (e != cudaSuccess || st == nullptr) return e;
    for (int i = 0; i < kSlots; i++)
        if (seen[i] == st) {
            seen_dev[i] = *dev;
            return e;
        }
    seen[next] = st;
    seen_dev[next] = *dev;
    next = (next + 1) % kSlots;
    return e;
}

#endif

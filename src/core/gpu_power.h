/* A GPU's energy counter, power draw and SM clock, read through NVML.
 *
 * NVML (libnvidia-ml.so.1) ships with the NVIDIA driver, not with the CUDA toolkit,
 * so it is loaded at run time: nothing links against it, and a machine without the
 * driver gets FQ_ERR_UNSUPPORTED with a message instead of a failed start. Used by
 * the benchmarks to put energy per call next to time per call (an H100 at its power
 * limit runs slower the more energy each call takes). */
#ifndef FQ_GPU_POWER_H
#define FQ_GPU_POWER_H

#include "core/core.h"

typedef struct fq_gpu_power fq_gpu_power;

typedef struct {
    unsigned long long energy_mj; /* energy used since the driver loaded, mJ       */
    unsigned power_mw;            /* power draw as NVML reports it                  */
    unsigned sm_mhz;              /* current SM clock                               */
    unsigned long long reasons;   /* clock event reasons (FQ_GPU_SLOW_*), 0 if unknown */
} fq_gpu_power_sample;

/* Bits of fq_gpu_power_sample.reasons (NVML's clock event reason values). */
#define FQ_GPU_SLOW_SW_POWER_CAP 0x4ull /* the clock is lowered to hold the power limit */
#define FQ_GPU_SLOW_HW 0x8ull           /* hardware slowdown (thermal or power brake)   */
#define FQ_GPU_SLOW_SW_THERMAL 0x20ull  /* software thermal slowdown                    */

/* Opens the GPU with this PCI bus id ("0000:1B:00.0", as cudaDeviceGetPCIBusId gives
 * it). On success *out is owned by the caller: release it with fq_gpu_power_close. */
fq_status fq_gpu_power_open(fq_ctx *ctx, const char *pci_bus_id, fq_gpu_power **out);
/* One reading. A field NVML cannot give is 0 (energy: an error, since the
 * benchmarks need it). */
fq_status fq_gpu_power_read(fq_ctx *ctx, fq_gpu_power *p, fq_gpu_power_sample *s);
/* The enforced power limit in mW (0 if unknown). */
unsigned fq_gpu_power_limit_mw(fq_gpu_power *p);
/* Releases p (NULL is fine). */
void fq_gpu_power_close(fq_gpu_power *p);

#endif

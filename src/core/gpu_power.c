/* NVML readings for the benchmarks (see gpu_power.h). The few entry points used are
 * declared here with NVML's stable C ABI (int status, opaque device handle), so the
 * build needs neither nvml.h nor the driver. */
#include "core/gpu_power.h"

#include <dlfcn.h>
#include <stdlib.h>

typedef int nv_ret; /* nvmlReturn_t: 0 = success */
typedef void *nv_dev; /* nvmlDevice_t */
#define NV_CLOCK_SM 1  /* nvmlClockType_t NVML_CLOCK_SM */

struct fq_gpu_power {
    void *lib;
    nv_dev dev;
    nv_ret (*shutdown)(void);
    const char *(*error_string)(nv_ret);
    nv_ret (*energy)(nv_dev, unsigned long long *);
    nv_ret (*power)(nv_dev, unsigned *);
    nv_ret (*clock)(nv_dev, int, unsigned *);
    nv_ret (*reasons)(nv_dev, unsigned long long *);
    nv_ret (*limit)(nv_dev, unsigned *);
};

static const char *nv_error(const fq_gpu_power *p, nv_ret r) {
    const char *s = p->error_string ? p->error_string(r) : NULL;
    return s ? s : "unknown NVML error";
}

fq_status fq_gpu_power_open(fq_ctx *ctx, const char *pci_bus_id, fq_gpu_power **out) {
    if (!out || !pci_bus_id) return fq_err(ctx, FQ_ERR_INVALID_ARG, "gpu power: NULL argument");
    *out = NULL;
    fq_gpu_power *p = calloc(1, sizeof *p);
    if (!p) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "gpu power: out of host memory");
    p->lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!p->lib) {
        free(p);
        return fq_err(ctx, FQ_ERR_UNSUPPORTED,
                      "gpu power: NVML (libnvidia-ml.so.1, part of the NVIDIA driver) not found");
    }
    nv_ret (*init)(void) = (nv_ret(*)(void))dlsym(p->lib, "nvmlInit_v2");
    nv_ret (*by_bus)(const char *, nv_dev *) =
        (nv_ret(*)(const char *, nv_dev *))dlsym(p->lib, "nvmlDeviceGetHandleByPciBusId_v2");
    p->shutdown = (nv_ret(*)(void))dlsym(p->lib, "nvmlShutdown");
    p->error_string = (const char *(*)(nv_ret))dlsym(p->lib, "nvmlErrorString");
    p->energy = (nv_ret(*)(nv_dev, unsigned long long *))dlsym(p->lib, "nvmlDeviceGetTotalEnergyConsumption");
    p->power = (nv_ret(*)(nv_dev, unsigned *))dlsym(p->lib, "nvmlDeviceGetPowerUsage");
    p->clock = (nv_ret(*)(nv_dev, int, unsigned *))dlsym(p->lib, "nvmlDeviceGetClockInfo");
    p->reasons = (nv_ret(*)(nv_dev, unsigned long long *))dlsym(p->lib, "nvmlDeviceGetCurrentClocksEventReasons");
    if (!p->reasons) /* drivers before 535 name it by its older name */
        p->reasons =
            (nv_ret(*)(nv_dev, unsigned long long *))dlsym(p->lib, "nvmlDeviceGetCurrentClocksThrottleReasons");
    p->limit = (nv_ret(*)(nv_dev, unsigned *))dlsym(p->lib, "nvmlDeviceGetEnforcedPowerLimit");
    if (!init || !by_bus || !p->shutdown || !p->energy) {
        dlclose(p->lib);
        free(p);
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "gpu power: this NVML lacks the entry points used (driver too old?)");
    }
    nv_ret r = init();
    if (r != 0) {
        fq_status s = fq_err(ctx, FQ_ERR_UNSUPPORTED, "gpu power: nvmlInit: %s", nv_error(p, r));
        dlclose(p->lib);
        free(p);
        return s;
    }
    r = by_bus(pci_bus_id, &p->dev);
    if (r != 0) {
        fq_status s = fq_err(ctx, FQ_ERR_NO_DEVICE, "gpu power: no NVML device at PCI bus id %s: %s", pci_bus_id,
                             nv_error(p, r));
        p->shutdown();
        dlclose(p->lib);
        free(p);
        return s;
    }
    *out = p;
    return FQ_OK;
}

fq_status fq_gpu_power_read(fq_ctx *ctx, fq_gpu_power *p, fq_gpu_power_sample *s) {
    if (!p || !s) return fq_err(ctx, FQ_ERR_INVALID_ARG, "gpu power: NULL argument");
    s->power_mw = 0;
    s->sm_mhz = 0;
    s->reasons = 0;
    const nv_ret r = p->energy(p->dev, &s->energy_mj);
    if (r != 0) return fq_err(ctx, FQ_ERR_UNSUPPORTED, "gpu power: energy counter: %s", nv_error(p, r));
    if (p->power && p->power(p->dev, &s->power_mw) != 0) s->power_mw = 0;
    if (p->clock && p->clock(p->dev, NV_CLOCK_SM, &s->sm_mhz) != 0) s->sm_mhz = 0;
    if (p->reasons && p->reasons(p->dev, &s->reasons) != 0) s->reasons = 0;
    return FQ_OK;
}

unsigned fq_gpu_power_limit_mw(fq_gpu_power *p) {
    unsigned mw = 0;
    if (p && p->limit && p->limit(p->dev, &mw) != 0) mw = 0;
    return mw;
}

void fq_gpu_power_close(fq_gpu_power *p) {
    if (!p) return;
    p->shutdown();
    dlclose(p->lib);
    free(p);
}

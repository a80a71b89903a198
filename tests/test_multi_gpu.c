/* Two GPUs (skips with fewer):
 *  - quantize on cuda:0, fq_qtensor_move to cuda:1, dequantize there: the same
 *    bytes as dequantizing on cuda:0 (and as quantizing on cuda:1 directly);
 *  - `test_multi_gpu --only-cuda1` (run by the default mode as a child process
 *    before it touches any GPU): quantize and dequantize on cuda:1 only, then
 *    show that the process holds nothing on GPU 0, DESIGN.md invariant 1:
 *      1. the driver says cuda:0's primary context is inactive
 *         (cuDevicePrimaryCtxGetState, libcuda loaded at run time);
 *      2. NVML lists no compute process with our pid on GPU 0 (matched to
 *         cuda:0 by PCI bus id), while it does list us on GPU 1 (which shows
 *         that pid matching works here; in a container with its own pid
 *         namespace it may not, and the test says so and relies on 1).
 *    libnvidia-ml.so.1 is opened with dlopen, never linked. */
#include "check.h"
#include "fluxq.h"

#include <dlfcn.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#ifdef FQ_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

extern char **environ;

static uint64_t g_rng = 0x2545f4914f6cdd1dull;
static uint16_t rnd_bf16(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    uint32_t h = (uint32_t)(g_rng >> 20);
    return (uint16_t)((h & 0x8000u) | (0x3a00u + (h & 0x7ffu))); /* about 2^-11 .. 2^4 */
}

static void *dequant_bytes(fq_ctx *ctx, const fq_qtensor *q, size_t *n) {
    fq_tensor *y = NULL;
    if (fq_dequantize_4bit(ctx, q, -1, &y) != FQ_OK) return NULL;
    void *h = malloc(fq_tensor_nbytes(y) + 1);
    *n = fq_tensor_nbytes(y);
    if (h && fq_tensor_to_host(ctx, y, h) != FQ_OK) { free(h); h = NULL; }
    fq_tensor_free(y);
    return h;
}

static int members_equal(fq_ctx *ctx, const fq_qtensor *a, const fq_qtensor *b) {
    int same = 1;
    for (int m = 0; m < FQ_QMEMBER_COUNT; m++) {
        size_t n = fq_qtensor_member_bytes(a, (fq_qmember)m);
        if (n != fq_qtensor_member_bytes(b, (fq_qmember)m)) return 0;
        if (!n) continue;
        void *x = malloc(n), *y = malloc(n);
        same &= x && y && fq_qtensor_member_to_host(ctx, a, (fq_qmember)m, x) == FQ_OK &&
                fq_qtensor_member_to_host(ctx, b, (fq_qmember)m, y) == FQ_OK && memcmp(x, y, n) == 0;
        free(x);
        free(y);
    }
    return same;
}

/* ---- cuda:0 -> cuda:1 ------------------------------------------------------------ */

static void move_between_gpus(fq_ctx *ctx) {
    int64_t shape[2] = {3072, 515};
    int64_t n = shape[0] * shape[1];
    uint16_t *x = malloc((size_t)n * 2);
    if (!x) { CHECK(0, "host memory"); return; }
    for (int64_t i = 0; i < n; i++) x[i] = rnd_bf16();
    for (int64_t i = 515; i < 2 * 515; i++) x[i] = 0; /* a zero row: blocks with absmax 0 */
    const fq_quant_params ps[3] = {{FQ_QUANT_NF4, 64, 1}, {FQ_QUANT_FP4, 128, 0}, {FQ_QUANT_NF4, 32, 0}};
    for (int k = 0; k < 3; k++) {
        fq_tensor *x0 = NULL, *x1 = NULL;
        fq_qtensor *q = NULL, *q1 = NULL, *c1 = NULL;
        CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CUDA(0), FQ_BF16, 2, shape, x, &x0));
        CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CUDA(1), FQ_BF16, 2, shape, x, &x1));
        CHECK_OK(ctx, fq_quantize_4bit(ctx, x0, &ps[k], &q));
        CHECK_OK(ctx, fq_quantize_4bit(ctx, x1, &ps[k], &q1));
        if (!q || !q1) goto next;
        CHECK(members_equal(ctx, q, q1), "case %d: quantizing on cuda:1 gives cuda:0's bytes", k);
        size_t n0 = 0, n1 = 0, n2 = 0;
        void *y0 = dequant_bytes(ctx, q, &n0);
        CHECK_OK(ctx, fq_qtensor_copy_to(ctx, q, FQ_CUDA(1), &c1));
        CHECK_OK(ctx, fq_qtensor_move(ctx, q, FQ_CUDA(1)));
        fq_qtensor_info info;
        fq_qtensor_get_info(q, &info);
        CHECK(fq_device_equal(info.device, FQ_CUDA(1)), "case %d: moved to cuda:1", k);
        void *y1 = dequant_bytes(ctx, q, &n1);
        void *y2 = c1 ? dequant_bytes(ctx, c1, &n2) : NULL;
        CHECK(y0 && y1 && n0 == n1 && memcmp(y0, y1, n0) == 0,
              "case %d: dequantize on cuda:1 after the move == dequantize on cuda:0: %s", k, fq_ctx_error(ctx));
        CHECK(y0 && y2 && n0 == n2 && memcmp(y0, y2, n0) == 0, "case %d: a copy on cuda:1 dequantizes the same", k);
        printf("multi-gpu case %d (%s bs=%lld%s): quantize cuda:0 -> move cuda:1 -> dequantize: %s\n", k,
               fq_quant_type_name(ps[k].type), (long long)ps[k].blocksize, ps[k].double_quant ? " dq" : "",
               y0 && y1 && n0 == n1 && memcmp(y0, y1, n0) == 0 ? "identical to cuda:0" : "DIFFERS");
        free(y0);
        free(y1);
        free(y2);
    next:
        fq_qtensor_free(q);
        fq_qtensor_free(q1);
        fq_qtensor_free(c1);
        fq_tensor_free(x0);
        fq_tensor_free(x1);
    }
    free(x);
}

/* ---- --only-cuda1: nothing on GPU 0 ------------------------------------------------ */

#ifdef FQ_HAVE_CUDA
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvml_proc; /* nvmlProcessInfo_t of the _v2/_v3 calls */

typedef int (*nvml_init_fn)(void);
typedef int (*nvml_by_bus_fn)(const char *, void **);
typedef int (*nvml_procs_fn)(void *, unsigned int *, nvml_proc *);

/* Our memory on the GPU with PCI bus id `bus`: 1 listed (*mib set), 0 not listed, -1 unknown. */
static int nvml_our_memory(void *lib, const char *bus, unsigned long long *mib, unsigned *nprocs) {
    nvml_by_bus_fn by_bus = (nvml_by_bus_fn)dlsym(lib, "nvmlDeviceGetHandleByPciBusId_v2");
    nvml_procs_fn procs = (nvml_procs_fn)dlsym(lib, "nvmlDeviceGetComputeRunningProcesses_v3");
    if (!procs) procs = (nvml_procs_fn)dlsym(lib, "nvmlDeviceGetComputeRunningProcesses_v2");
    void *dev = NULL;
    if (!by_bus || !procs || by_bus(bus, &dev) != 0) return -1;
    nvml_proc list[256];
    unsigned int count = 256;
    if (procs(dev, &count, list) != 0) return -1;
    *nprocs = count;
    for (unsigned i = 0; i < count; i++)
        if (list[i].pid == (unsigned)getpid()) {
            *mib = list[i].usedGpuMemory >> 20;
            return 1;
        }
    return 0;
}

static int pci_bus_id(int dev, char *buf, size_t n) {
    int dom = 0, bus = 0, slot = 0; /* attribute queries create no context */
    if (cudaDeviceGetAttribute(&dom, cudaDevAttrPciDomainId, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&bus, cudaDevAttrPciBusId, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&slot, cudaDevAttrPciDeviceId, dev) != cudaSuccess)
        return 0;
    snprintf(buf, n, "%08X:%02X:%02X.0", dom, bus, slot); /* NVML's own spelling */
    return 1;
}

/* 1 active, 0 inactive, -1 unknown. */
static int primary_ctx_active(int dev) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return -1;
    int (*init)(unsigned) = (int (*)(unsigned))dlsym(lib, "cuInit");
    int (*get)(int *, int) = (int (*)(int *, int))dlsym(lib, "cuDeviceGet");
    int (*state)(int, unsigned *, int *) = (int (*)(int, unsigned *, int *))dlsym(lib, "cuDevicePrimaryCtxGetState");
    int d = 0, active = 0;
    unsigned flags = 0;
    int r = -1;
    if (init && get && state && init(0) == 0 && get(&d, dev) == 0 && state(d, &flags, &active) == 0) r = active != 0;
    dlclose(lib);
    return r;
}
#endif

static int only_cuda1(void) {
    int ndev = fq_cuda_device_count();
    if (ndev < 2) {
        printf("only-cuda1: skipped, %d CUDA device%s visible\n", ndev, ndev == 1 ? "" : "s");
        return 0;
    }
#ifdef FQ_HAVE_CUDA
    fq_ctx *ctx;
    CHECK(fq_ctx_create(&ctx) == FQ_OK, "ctx");
    /* Quantize and dequantize on cuda:1, and check the result against the CPU. */
    int64_t shape[2] = {1024, 777}, n = shape[0] * shape[1];
    uint16_t *x = malloc((size_t)n * 2);
    for (int64_t i = 0; x && i < n; i++) x[i] = rnd_bf16();
    fq_tensor *xg = NULL, *xc = NULL;
    fq_qtensor *qg = NULL, *qc = NULL;
    fq_quant_params p = {FQ_QUANT_NF4, 64, 1};
    CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CUDA(1), FQ_BF16, 2, shape, x, &xg));
    CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CPU, FQ_BF16, 2, shape, x, &xc));
    CHECK_OK(ctx, fq_quantize_4bit(ctx, xg, &p, &qg));
    CHECK_OK(ctx, fq_quantize_4bit(ctx, xc, &p, &qc));
    size_t ng = 0, nc = 0;
    void *yg = qg ? dequant_bytes(ctx, qg, &ng) : NULL, *yc = qc ? dequant_bytes(ctx, qc, &nc) : NULL;
    CHECK(qg && qc && members_equal(ctx, qg, qc), "cuda:1 quantizes like the CPU");
    CHECK(yg && yc && ng == nc && memcmp(yg, yc, ng) == 0, "cuda:1 dequantizes like the CPU");
    free(yg);
    free(yc);

    /* While this process still holds its work on cuda:1: what is on GPU 0? */
    int active0 = primary_ctx_active(0), active1 = primary_ctx_active(1);
    printf("only-cuda1: cuda:0 primary context: %s; cuda:1 primary context: %s\n",
           active0 < 0 ? "unknown" : active0 ? "ACTIVE" : "inactive",
           active1 < 0 ? "unknown" : active1 ? "active" : "inactive");
    CHECK(active0 == 0, "a process working on cuda:1 created no context on cuda:0 (state %d)", active0);
    char bus0[32] = "", bus1[32] = "";
    void *nvml = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    nvml_init_fn init = nvml ? (nvml_init_fn)dlsym(nvml, "nvmlInit_v2") : NULL;
    if (!nvml || !init || init() != 0 || !pci_bus_id(0, bus0, sizeof bus0) || !pci_bus_id(1, bus1, sizeof bus1)) {
        printf("only-cuda1: NVML not available (%s); relying on the driver's context state\n",
               nvml ? "init failed" : "libnvidia-ml.so.1 not found");
        SKIP("NVML process list");
    } else {
        unsigned long long mib0 = 0, mib1 = 0;
        unsigned np0 = 0, np1 = 0;
        int on0 = nvml_our_memory(nvml, bus0, &mib0, &np0), on1 = nvml_our_memory(nvml, bus1, &mib1, &np1);
        printf("only-cuda1: pid %d: GPU0 (%s): %s (%u compute processes listed); GPU1 (%s): %s\n", (int)getpid(),
               bus0, on0 < 0 ? "query failed" : on0 ? "LISTED" : "not listed", np0, bus1,
               on1 < 0 ? "query failed" : on1 ? "listed" : "not listed");
        if (on0 == 1) printf("only-cuda1: GPU0 memory held by this process: %llu MiB\n", mib0);
        if (on1 == 1) printf("only-cuda1: GPU1 memory held by this process: %llu MiB\n", mib1);
        CHECK(on0 == 0 || (on0 < 0 && active0 == 0), "NVML lists this process on GPU 0");
        if (on1 != 1)
            printf("only-cuda1: NVML does not list our pid on GPU 1 either (pid namespace?): the driver's "
                   "context state above is the evidence\n");
    }
    if (nvml) {
        int (*shutdown)(void) = (int (*)(void))dlsym(nvml, "nvmlShutdown");
        if (init && shutdown) (void)shutdown();
        dlclose(nvml);
    }
    fq_qtensor_free(qg);
    fq_qtensor_free(qc);
    fq_tensor_free(xg);
    fq_tensor_free(xc);
    free(x);
    fq_ctx_free(ctx);
#endif
    printf("only-cuda1: %d checks passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}

/* Runs this program again with --only-cuda1 (a fresh process: no context yet). */
static int run_child(const char *self) {
    pid_t pid;
    char *args[] = {(char *)self, (char *)"--only-cuda1", NULL};
    fflush(stdout);
    fflush(stderr);
    if (posix_spawn(&pid, "/proc/self/exe", NULL, NULL, args, environ) != 0) return -1;
    int st = 0;
    if (waitpid(pid, &st, 0) != pid) return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--only-cuda1") == 0) return only_cuda1();
    /* The child runs first, before this process touches any GPU. */
    int ndev = fq_cuda_device_count();
    if (ndev < 2) {
        SKIP("%d CUDA device%s: the multi-GPU tests need 2", ndev, ndev == 1 ? "" : "s");
        return check_summary("test_multi_gpu");
    }
    int rc = run_child(argv[0]);
    CHECK(rc == 0, "--only-cuda1 child: exit %d (see its lines above)", rc);
    fq_ctx *ctx;
    CHECK(fq_ctx_create(&ctx) == FQ_OK, "ctx");
    move_between_gpus(ctx);
    fq_ctx_free(ctx);
    return check_summary("test_multi_gpu");
}

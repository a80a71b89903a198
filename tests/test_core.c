/* Core: devices, dtypes, tensors, errors, the allocator's failure injection. */
#include "check.h"
#include "core/core.h"
#include "core/gpu_power.h"
#include "core/qtensor.h"

#include <string.h>

int main(void) {
    fq_ctx *ctx;
    CHECK(fq_ctx_create(&ctx) == FQ_OK, "ctx");

    fq_device d;
    char buf[16];
    CHECK_OK(ctx, fq_device_parse(ctx, "cpu", &d));
    CHECK(d.type == FQ_DEVICE_CPU, "cpu type");
    CHECK_OK(ctx, fq_device_parse(ctx, "cuda:1", &d));
    CHECK(d.type == FQ_DEVICE_CUDA && d.index == 1, "cuda:1");
    CHECK(strcmp(fq_device_name(d, buf, sizeof buf), "cuda:1") == 0, "name %s", buf);
    CHECK_OK(ctx, fq_device_parse(ctx, "cuda", &d));
    CHECK(d.type == FQ_DEVICE_CUDA && d.index == 0, "cuda means cuda:0");
    const char *bad[] = {"", "cuda:", "cuda:-1", "cuda:x", "gpu:0", "cuda:1a", "cuda:99999999999"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK(fq_device_parse(ctx, bad[i], &d) == FQ_ERR_INVALID_ARG, "'%s' must not parse", bad[i]);
        CHECK(strstr(fq_ctx_error(ctx), bad[i]) != NULL, "message names input: %s", fq_ctx_error(ctx));
    }

    /* A device that does not exist is refused with its name. */
    fq_tensor *t = NULL;
    int64_t shape[2] = {3, 5};
    fq_status s = fq_tensor_create(ctx, FQ_CUDA(fq_cuda_device_count() + 7), FQ_F32, 2, shape, &t);
    CHECK(s == FQ_ERR_NO_DEVICE || s == FQ_ERR_UNSUPPORTED, "missing device -> %s", fq_status_str(s));
    CHECK(strstr(fq_ctx_error(ctx), "cuda:") != NULL, "names the device: %s", fq_ctx_error(ctx));
    CHECK(t == NULL, "no tensor on failure");

    fq_dtype dt;
    CHECK_OK(ctx, fq_dtype_parse(ctx, "bfloat16", &dt));
    CHECK(dt == FQ_BF16 && fq_dtype_size(dt) == 2, "bf16");
    CHECK(fq_dtype_parse(ctx, "float8", &dt) == FQ_ERR_INVALID_ARG, "unknown dtype");

    /* 64-bit shapes: the element count of a 2^31+ tensor is computed exactly. */
    int64_t big[2] = {65536, 65537};
    CHECK(fq_shape_numel(2, big) == 4295032832LL, "numel 64-bit");

    float host[15];
    for (int i = 0; i < 15; i++) host[i] = (float)i * 0.5f;
    CHECK_OK(ctx, fq_tensor_from_host(ctx, FQ_CPU, FQ_F32, 2, shape, host, &t));
    if (t) {
        CHECK(fq_tensor_numel(t) == 15 && fq_tensor_nbytes(t) == 60, "sizes");
        float back[15];
        CHECK_OK(ctx, fq_tensor_to_host(ctx, t, back));
        CHECK(memcmp(back, host, sizeof host) == 0, "round trip");
        /* Placement check names tensor, role and both devices. */
        CHECK_OK(ctx, fq_tensor_set_name(ctx, t, "blocks.0.x"));
        s = fq_check_tensor(ctx, "op", "x", t, FQ_CUDA(1));
        CHECK(s == FQ_ERR_DEVICE_MISMATCH, "mismatch");
        CHECK(strstr(fq_ctx_error(ctx), "blocks.0.x") && strstr(fq_ctx_error(ctx), "cpu") &&
                  strstr(fq_ctx_error(ctx), "cuda:1"),
              "message: %s", fq_ctx_error(ctx));
        fq_tensor_free(t);
    }

    /* Injected allocation failure: a clean error, nothing returned. */
    t = NULL;
    fq_test_fail_alloc_in(ctx, 1);
    s = fq_tensor_create(ctx, FQ_CPU, FQ_F32, 2, shape, &t);
    CHECK(s == FQ_ERR_OUT_OF_MEMORY && t == NULL, "injected OOM -> %s", fq_status_str(s));
    CHECK(strstr(fq_ctx_error(ctx), "out of memory") != NULL, "message: %s", fq_ctx_error(ctx));

    /* The benchmarks' power readings: a bus id no GPU has is refused with a message (no
     * driver: NVML itself is missing, also an error), never a handle. */
    fq_gpu_power *pw = (fq_gpu_power *)&s; /* must be cleared */
    s = fq_gpu_power_open(ctx, "ffff:ff:1f.7", &pw);
    CHECK((s == FQ_ERR_NO_DEVICE || s == FQ_ERR_UNSUPPORTED) && pw == NULL, "gpu power, bogus bus id -> %s",
          fq_status_str(s));
    CHECK(strstr(fq_ctx_error(ctx), "gpu power") != NULL, "message: %s", fq_ctx_error(ctx));
    CHECK(fq_gpu_power_open(ctx, NULL, &pw) == FQ_ERR_INVALID_ARG, "gpu power, NULL bus id");
    fq_gpu_power_close(NULL);

    fq_ctx_free(ctx);
    return check_summary("test_core");
}

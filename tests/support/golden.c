#include "golden.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static double elem(const fq_st_tensor *t, int64_t i) {
    const unsigned char *p = t->data;
    if (t->dtype == FQ_F32) { float f; memcpy(&f, p + 4 * i, 4); return f; }
    if (t->dtype == FQ_F64) { double d; memcpy(&d, p + 8 * i, 8); return d; }
    if (t->dtype == FQ_BF16) {
        uint16_t h; memcpy(&h, p + 2 * i, 2);
        uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
    }
    return NAN;
}

double *gold_values(const fq_st_file *f, const char *name, int64_t *n) {
    const fq_st_tensor *t = fq_st_find(f, name);
    if (!t) return NULL;
    double *v = malloc(sizeof(double) * (size_t)(t->numel ? t->numel : 1));
    if (!v) return NULL;
    for (int64_t i = 0; i < t->numel; i++) v[i] = elem(t, i);
    *n = t->numel;
    return v;
}

fq_tensor *gold_input(fq_ctx *ctx, const fq_st_file *f, const char *name) {
    const fq_st_tensor *t = fq_st_find(f, name);
    fq_tensor *r = NULL;
    if (!t) return NULL;
    if (t->dtype == FQ_F64) {
        float *tmp = malloc(sizeof(float) * (size_t)(t->numel ? t->numel : 1));
        if (!tmp) return NULL;
        for (int64_t i = 0; i < t->numel; i++) tmp[i] = (float)elem(t, i);
        fq_tensor_from_host(ctx, FQ_CPU, FQ_F32, t->ndim, t->shape, tmp, &r);
        free(tmp);
    } else {
        fq_tensor_from_host(ctx, FQ_CPU, t->dtype, t->ndim, t->shape, t->data, &r);
    }
    return r;
}

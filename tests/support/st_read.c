/* Test-only safetensors reader (see st_read.h). */
#include "st_read.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int stf_open(const char *path, stf_file *f) {
    memset(f, 0, sizeof *f);
    FILE *fp = fopen(path, "rb");
    if (!fp) return 0;
    long n = -1;
    if (fseek(fp, 0, SEEK_END) == 0) n = ftell(fp);
    if (n < 8 || fseek(fp, 0, SEEK_SET) != 0) { fclose(fp); return 0; }
    f->buf = malloc((size_t)n);
    if (!f->buf || fread(f->buf, 1, (size_t)n, fp) != (size_t)n) {
        fclose(fp);
        free(f->buf);
        f->buf = NULL;
        return 0;
    }
    fclose(fp);
    f->len = (size_t)n;
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | f->buf[i];
    if (hl > f->len - 8) { stf_close(f); return 0; }
    f->hdr = cJSON_ParseWithLength((const char *)f->buf + 8, (size_t)hl);
    f->data_off = 8 + (size_t)hl;
    if (!f->hdr) { stf_close(f); return 0; }
    return 1;
}

void stf_close(stf_file *f) {
    cJSON_Delete(f->hdr);
    free(f->buf);
    memset(f, 0, sizeof *f);
}

int stf_get(const stf_file *f, const char *name, stf_tensor *t) {
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(f->hdr, name);
    if (!e) return 0;
    const char *dt = cJSON_GetStringValue(cJSON_GetObjectItem(e, "dtype"));
    const cJSON *sh = cJSON_GetObjectItem(e, "shape"), *off = cJSON_GetObjectItem(e, "data_offsets");
    static const struct { const char *n; fq_dtype t; } map[] = {
        {"F32", FQ_F32}, {"F16", FQ_F16}, {"BF16", FQ_BF16}, {"F64", FQ_F64}, {"U8", FQ_U8}, {"I64", FQ_I64}};
    memset(t, 0, sizeof *t);
    t->dtype = FQ_DTYPE_COUNT;
    for (size_t i = 0; dt && i < sizeof map / sizeof map[0]; i++)
        if (strcmp(dt, map[i].n) == 0) t->dtype = map[i].t;
    if (!cJSON_IsArray(sh) || !cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2) return 0;
    t->ndim = cJSON_GetArraySize(sh);
    if (t->ndim > FQ_MAX_DIMS) return 0;
    for (int i = 0; i < t->ndim; i++) t->shape[i] = (int64_t)cJSON_GetArrayItem(sh, i)->valuedouble;
    size_t a = (size_t)cJSON_GetArrayItem(off, 0)->valuedouble, b = (size_t)cJSON_GetArrayItem(off, 1)->valuedouble;
    if (b < a || f->data_off + b > f->len) return 0;
    t->data = f->buf + f->data_off + a;
    t->bytes = b - a;
    return t->dtype != FQ_DTYPE_COUNT;
}

const char *stf_meta(const stf_file *f, const char *key) {
    return cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(f->hdr, "__metadata__"), key));
}

uint64_t stf_fnv1a64(const void *p, size_t n) {
    const unsigned char *c = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ c[i]) * 0x100000001b3ull;
    return h;
}

int stf_match(const stf_file *f, const char *name, const void *ours, size_t n, size_t elem, const char *what) {
    stf_tensor ref;
    if (stf_get(f, name, &ref)) {
        if (ref.bytes != n) {
            fprintf(stderr, "  %s %s: %zu bytes, golden has %zu\n", what, name, n, ref.bytes);
            return 0;
        }
        if (memcmp(ours, ref.data, n) == 0) return 1;
        const unsigned char *a = ours, *b = ref.data;
        size_t i = 0, diffs = 0;
        while (a[i] == b[i]) i++;
        i -= i % elem;
        for (size_t j = i; j + elem <= n; j += elem) diffs += memcmp(a + j, b + j, elem) != 0;
        uint64_t va = 0, vb = 0;
        memcpy(&va, a + i, elem);
        memcpy(&vb, b + i, elem);
        fprintf(stderr, "  %s %s: %zu of %zu elements differ; first at %zu: ours 0x%llx, golden 0x%llx\n", what,
                name, diffs, n / elem, i / elem, (unsigned long long)va, (unsigned long long)vb);
        return 0;
    }
    char hn[160];
    snprintf(hn, sizeof hn, "%s.fnv1a64", name);
    if (!stf_get(f, hn, &ref) || ref.bytes != 8) {
        fprintf(stderr, "  %s: golden tensor %s missing\n", what, name);
        return 0;
    }
    uint64_t h = stf_fnv1a64(ours, n), g;
    memcpy(&g, ref.data, 8);
    if (h != g)
        fprintf(stderr, "  %s %s: hash differs (ours %016llx, golden %016llx)\n", what, name, (unsigned long long)h,
                (unsigned long long)g);
    return h == g;
}

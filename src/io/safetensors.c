/* safetensors reader: mmap the file, validate every header rule, index the tensors.
 *
 * Rules checked (each error names the file and the tensor key):
 *  - the file holds the 8-byte header length; length <= 100 MB and <= file size - 8;
 *  - the header is UTF-8 JSON (strict, see json_util.h), an object, no repeated key;
 *  - "__metadata__", if present, maps strings to strings;
 *  - every other entry is {"dtype", "shape", "data_offsets"} and nothing else,
 *    dtype known, shape of non-negative integers (rank <= FQ_MAX_DIMS),
 *    data_offsets [begin, end] with begin <= end <= data section size and
 *    end - begin == numel * itemsize (computed with overflow checks);
 *  - no two tensors share a byte.
 * Gaps between tensors and trailing bytes are accepted (they are harmless). */
#include "io/safetensors.h"
#include "io/json_util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

struct fq_st_file {
    char *path;
    void *map;
    size_t map_len;
    const unsigned char *data; /* start of the data section */
    uint64_t data_len;
    fq_st_tensor *t;
    int64_t n;
    const fq_st_tensor **by_name; /* sorted by name for fq_st_find */
    char **meta_kv;               /* key0, value0, key1, value1, ... */
    int64_t nmeta;
};

static const struct {
    const char *s;
    int t; /* fq_dtype, or -1: a valid safetensors dtype fluxq does not handle */
} g_st_dtypes[] = {
    {"F64", FQ_F64},     {"F32", FQ_F32},         {"F16", FQ_F16},         {"BF16", FQ_BF16},
    {"I64", FQ_I64},     {"I32", FQ_I32},         {"I16", FQ_I16},         {"I8", FQ_I8},
    {"U8", FQ_U8},       {"BOOL", FQ_BOOL},       {"U16", -1},             {"U32", -1},
    {"U64", -1},         {"C64", -1},             {"F8_E5M2", -1},         {"F8_E4M3", -1},
    {"F8_E8M0", -1},     {"F6_E2M3", -1},         {"F6_E3M2", -1},         {"F4", -1},
};
#define N_ST_DTYPES (sizeof g_st_dtypes / sizeof g_st_dtypes[0])

const char *fq_st_dtype_str(fq_dtype t) {
    for (size_t i = 0; i < N_ST_DTYPES; i++)
        if (g_st_dtypes[i].t == (int)t) return g_st_dtypes[i].s;
    return "?";
}

int fq_st_dtype_from_str(const char *s, fq_dtype *out) {
    for (size_t i = 0; i < N_ST_DTYPES; i++)
        if (strcmp(g_st_dtypes[i].s, s) == 0 && g_st_dtypes[i].t >= 0) {
            *out = (fq_dtype)g_st_dtypes[i].t;
            return 1;
        }
    return 0;
}

static int st_dtype_known(const char *s) {
    for (size_t i = 0; i < N_ST_DTYPES; i++)
        if (strcmp(g_st_dtypes[i].s, s) == 0) return 1;
    return 0;
}

void fq_st_close(fq_st_file *f) {
    if (!f) return;
    if (f->map) munmap(f->map, f->map_len);
    for (int64_t i = 0; i < f->n; i++) free((char *)f->t[i].name);
    for (int64_t i = 0; i < 2 * f->nmeta; i++) free(f->meta_kv[i]);
    free(f->meta_kv);
    free(f->t);
    free(f->by_name);
    free(f->path);
    free(f);
}

const char *fq_st_path(const fq_st_file *f) { return f->path; }
int64_t fq_st_count(const fq_st_file *f) { return f->n; }
const fq_st_tensor *fq_st_get(const fq_st_file *f, int64_t i) {
    return i >= 0 && i < f->n ? &f->t[i] : NULL;
}
int64_t fq_st_metadata_count(const fq_st_file *f) { return f->nmeta; }
void fq_st_metadata_get(const fq_st_file *f, int64_t i, const char **key, const char **value) {
    *key = f->meta_kv[2 * i];
    *value = f->meta_kv[2 * i + 1];
}
const char *fq_st_metadata(const fq_st_file *f, const char *key) {
    for (int64_t i = 0; i < f->nmeta; i++)
        if (strcmp(f->meta_kv[2 * i], key) == 0) return f->meta_kv[2 * i + 1];
    return NULL;
}

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp((*(const fq_st_tensor *const *)a)->name, (*(const fq_st_tensor *const *)b)->name);
}

const fq_st_tensor *fq_st_find(const fq_st_file *f, const char *name) {
    fq_st_tensor key = {.name = name};
    const fq_st_tensor *kp = &key;
    const fq_st_tensor **hit = bsearch(&kp, f->by_name, (size_t)f->n, sizeof *f->by_name, cmp_tensor_name);
    return hit ? *hit : NULL;
}

/* ---- header validation ---------------------------------------------------------- */

static fq_status parse_metadata(fq_ctx *ctx, fq_st_file *f, const cJSON *m) {
    if (!cJSON_IsObject(m))
        return fq_err(ctx, FQ_ERR_FORMAT, "%s: '__metadata__' is not an object", f->path);
    int64_t n = cJSON_GetArraySize(m);
    f->meta_kv = calloc((size_t)(2 * n + 1), sizeof *f->meta_kv);
    if (!f->meta_kv) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    for (const cJSON *c = m->child; c; c = c->next) {
        if (!cJSON_IsString(c))
            return fq_err(ctx, FQ_ERR_FORMAT, "%s: '__metadata__' entry '%s' is not a string", f->path,
                          c->string);
        char *k = fq_strdup(c->string), *v = fq_strdup(c->valuestring);
        f->meta_kv[2 * f->nmeta] = k;
        f->meta_kv[2 * f->nmeta + 1] = v;
        f->nmeta++;
        if (!k || !v) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    }
    return FQ_OK;
}

/* Fills t from one header entry (everything but overlap, checked later). */
static fq_status parse_entry(fq_ctx *ctx, const fq_st_file *f, const cJSON *e, fq_st_tensor *t) {
    const char *p = f->path, *key = e->string;
    if (!cJSON_IsObject(e)) return fq_err(ctx, FQ_ERR_FORMAT, "%s: tensor '%s': entry is not an object", p, key);
    const cJSON *jd = NULL, *js = NULL, *jo = NULL;
    for (const cJSON *c = e->child; c; c = c->next) {
        if (strcmp(c->string, "dtype") == 0) jd = c;
        else if (strcmp(c->string, "shape") == 0) js = c;
        else if (strcmp(c->string, "data_offsets") == 0) jo = c;
        else return fq_err(ctx, FQ_ERR_FORMAT, "%s: tensor '%s': unexpected field '%s'", p, key, c->string);
    }
    if (!jd || !js || !jo)
        return fq_err(ctx, FQ_ERR_FORMAT, "%s: tensor '%s': missing field '%s'", p, key,
                      !jd ? "dtype" : !js ? "shape" : "data_offsets");
    if (!cJSON_IsString(jd)) return fq_err(ctx, FQ_ERR_FORMAT, "%s: tensor '%s': dtype is not a string", p, key);
    if (!fq_st_dtype_from_str(jd->valuestring, &t->dtype)) {
        if (st_dtype_known(jd->valuestring))
            return fq_err(ctx, FQ_ERR_UNSUPPORTED, "%s: tensor '%s': dtype '%s' is not supported", p, key,
                          jd->valuestring);
        return fq_err(ctx, FQ_ERR_FORMAT, "%s: tensor '%s': unknown dtype '%s'", p, key, jd->valuestring);
    }
    if (!cJSON_IsArray(js)) return fq_err(ctx, FQ_ERR_FORMAT, "%s: tensor '%s': shape is not an array", p, key);
    int nd = cJSON_GetArraySize(js);
    if (nd > FQ_MAX_DIMS)
        return fq_err(ctx, FQ_ERR_UNSUPPORTED, "%s: tensor '%s': rank %d exceeds %d", p, key, nd, FQ_MAX_DIMS);
    t->ndim = nd;
    uint64_t numel = 1;
    int i = 0, overflow = 0;
    for (const cJSON *c = js->child; c; c = c->next, i++) {
        int64_t d;
        if (!fq_json_get_int64(c, &d) || d < 0)
            return fq_err(ctx, FQ_ERR_FORMAT, "%s: tensor '%s': shape[%d] is not a non-negative integer", p,
                          key, i);
        t->shape[i] = d;
        if (d && numel > (uint64_t)INT64_MAX / (uint64_t)d) overflow = 1;
        else numel *= (uint64_t)d;
    }
    for (int k = 0; k < nd; k++)
        if (t->shape[k] == 0) overflow = 0, numel = 0; /* an empty tensor never overflows */
    size_t isz = fq_dtype_size(t->dtype);
    if (overflow || numel > (uint64_t)INT64_MAX / isz || numel * isz > (uint64_t)SIZE_MAX)
        return fq_err(ctx, FQ_ERR_FORMAT, "%s: tensor '%s': shape overflows 64-bit sizes", p, key);
    t->numel = (int64_t)numel;
    t->nbytes = (size_t)(numel * isz);
    int64_t off[2];
    if (!cJSON_IsArray(jo) || cJSON_GetArraySize(jo) != 2 || !fq_json_get_int64(jo->child, &off[0]) ||
        !fq_json_get_int64(jo->child->next, &off[1]) || off[0] < 0 || off[1] < 0)
        return fq_err(ctx, FQ_ERR_FORMAT, "%s: tensor '%s': data_offsets is not [begin, end] of non-negative integers",
                      p, key);
    if (off[0] > off[1])
        return fq_err(ctx, FQ_ERR_FORMAT, "%s: tensor '%s': data_offsets [%lld, %lld] has begin > end", p, key,
                      (long long)off[0], (long long)off[1]);
    if ((uint64_t)off[1] > f->data_len)
        return fq_err(ctx, FQ_ERR_FORMAT,
                      "%s: tensor '%s': data_offsets [%lld, %lld] out of range (data section is %llu bytes; "
                      "file truncated?)",
                      p, key, (long long)off[0], (long long)off[1], (unsigned long long)f->data_len);
    if ((uint64_t)(off[1] - off[0]) != (uint64_t)t->nbytes)
        return fq_err(ctx, FQ_ERR_FORMAT,
                      "%s: tensor '%s': data_offsets span %lld bytes but dtype %s and shape need %zu", p, key,
                      (long long)(off[1] - off[0]), jd->valuestring, t->nbytes);
    t->begin = (uint64_t)off[0];
    t->data = f->data + off[0];
    t->file = f;
    t->name = fq_strdup(key);
    if (!t->name) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    return FQ_OK;
}

static int cmp_tensor_begin(const void *a, const void *b) {
    const fq_st_tensor *x = *(const fq_st_tensor *const *)a, *y = *(const fq_st_tensor *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

/* No two tensors may share a byte (empty tensors share none). */
static fq_status check_overlap(fq_ctx *ctx, fq_st_file *f) {
    const fq_st_tensor **v = f->by_name; /* reused as scratch, sorted by name afterwards */
    qsort(v, (size_t)f->n, sizeof *v, cmp_tensor_begin);
    const fq_st_tensor *far = NULL; /* the tensor reaching furthest so far */
    for (int64_t i = 0; i < f->n; i++) {
        if (!v[i]->nbytes) continue;
        if (far && v[i]->begin < far->begin + far->nbytes)
            return fq_err(ctx, FQ_ERR_FORMAT, "%s: tensor '%s' overlaps tensor '%s' in the data section", f->path,
                          v[i]->name, far->name);
        if (!far || v[i]->begin + v[i]->nbytes > far->begin + far->nbytes) far = v[i];
    }
    return FQ_OK;
}

static fq_status parse_header(fq_ctx *ctx, fq_st_file *f, const char *hdr, size_t hlen) {
    cJSON *root;
    FQ_TRY(fq_json_parse(ctx, f->path, hdr, hlen, &root));
    fq_status s = FQ_OK;
    if (!cJSON_IsObject(root)) s = fq_err(ctx, FQ_ERR_FORMAT, "%s: header is not a JSON object", f->path);
    int64_t n = s == FQ_OK ? cJSON_GetArraySize(root) : 0;
    if (s == FQ_OK) {
        f->t = calloc((size_t)n + 1, sizeof *f->t);
        f->by_name = calloc((size_t)n + 1, sizeof *f->by_name);
        if (!f->t || !f->by_name) s = fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    }
    for (const cJSON *c = s == FQ_OK ? root->child : NULL; c && s == FQ_OK; c = c->next) {
        if (strcmp(c->string, "__metadata__") == 0) {
            s = parse_metadata(ctx, f, c);
            continue;
        }
        s = parse_entry(ctx, f, c, &f->t[f->n]);
        if (s == FQ_OK) f->n++;
    }
    cJSON_Delete(root);
    if (s != FQ_OK) return s;
    for (int64_t i = 0; i < f->n; i++) f->by_name[i] = &f->t[i];
    FQ_TRY(check_overlap(ctx, f));
    qsort(f->by_name, (size_t)f->n, sizeof *f->by_name, cmp_tensor_name);
    return FQ_OK;
}

fq_status fq_st_open(fq_ctx *ctx, const char *path, fq_st_file **out) {
    fq_st_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = fq_strdup(path))) {
        free(f);
        return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    }
    fq_status s = FQ_OK;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0) s = fq_err(ctx, FQ_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    else if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        s = fq_err(ctx, FQ_ERR_IO, "%s: not a regular file", path);
    else if (st.st_size < 8)
        s = fq_err(ctx, FQ_ERR_FORMAT, "%s: file is %lld bytes, too short for the 8-byte header length", path,
                   (long long)st.st_size);
    if (s == FQ_OK) {
        f->map_len = (size_t)st.st_size;
        f->map = mmap(NULL, f->map_len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (f->map == MAP_FAILED) {
            f->map = NULL;
            s = fq_err(ctx, FQ_ERR_IO, "%s: mmap failed: %s", path, strerror(errno));
        }
    }
    if (fd >= 0) close(fd); /* the mapping stays valid without the descriptor */
    if (s == FQ_OK) {
        const unsigned char *b = f->map;
        uint64_t hlen = 0;
        for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | b[i]; /* little-endian */
        if (hlen > FQ_ST_MAX_HEADER)
            s = fq_err(ctx, FQ_ERR_FORMAT, "%s: header length %llu exceeds the limit of %llu bytes", path,
                       (unsigned long long)hlen, (unsigned long long)FQ_ST_MAX_HEADER);
        else if (hlen > (uint64_t)f->map_len - 8)
            s = fq_err(ctx, FQ_ERR_FORMAT, "%s: header length %llu is larger than the file (%zu bytes)", path,
                       (unsigned long long)hlen, f->map_len);
        else if (hlen < 2)
            s = fq_err(ctx, FQ_ERR_FORMAT, "%s: header length %llu is too short for a JSON object", path,
                       (unsigned long long)hlen);
        if (s == FQ_OK) {
            f->data = b + 8 + hlen;
            f->data_len = (uint64_t)f->map_len - 8 - hlen;
            s = parse_header(ctx, f, (const char *)b + 8, (size_t)hlen);
        }
    }
    if (s != FQ_OK) {
        fq_st_close(f);
        return s;
    }
    *out = f;
    return FQ_OK;
}

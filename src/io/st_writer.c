/* safetensors writer: the same bytes the reference (Rust) writer produces. */
#include "io/atomic_file.h"
#include "io/json_util.h"
#include "io/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    char *name;
    fq_dtype dtype;
    int ndim;
    int64_t shape[FQ_MAX_DIMS];
    const void *data;
    size_t nbytes;
    int own;
    int64_t spool_off; /* >= 0: the bytes are in the spool file from here (data is NULL) */
} wentry;

struct fq_st_writer {
    wentry *e;
    int64_t n, cap;
    char **meta_kv; /* key0, value0, ... in order of first setting */
    int64_t nmeta, meta_cap;
    int fail_stage;
    int spool_fd;       /* -1: owned buffers stay in memory until commit */
    uint64_t spool_end; /* bytes of the spool file in use */
    char *spool_dir;
};

/* The reference writer orders tensors by its Dtype enum, widest first; these are
 * the positions of our dtypes in that enum (BOOL < U8 < I8 < I16 < F16 < BF16 <
 * I32 < F32 < F64 < I64), which the golden files confirm. */
static int dtype_rank(fq_dtype t) {
    switch (t) {
    case FQ_BOOL: return 0;
    case FQ_U8: return 4;
    case FQ_I8: return 5;
    case FQ_I16: return 9;
    case FQ_F16: return 11;
    case FQ_BF16: return 12;
    case FQ_I32: return 13;
    case FQ_F32: return 15;
    case FQ_F64: return 17;
    case FQ_I64: return 18;
    default: return -1;
    }
}

fq_status fq_st_writer_create(fq_ctx *ctx, fq_st_writer **out) {
    fq_st_writer *w = calloc(1, sizeof *w);
    if (!w) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    w->spool_fd = -1;
    *out = w;
    return FQ_OK;
}

fq_status fq_st_writer_spool(fq_ctx *ctx, fq_st_writer *w, const char *dir) {
    if (w->spool_fd >= 0) return fq_err(ctx, FQ_ERR_INVALID_ARG, "safetensors writer: already spooling");
    char *d = fq_strdup(dir && *dir ? dir : ".");
    if (!d) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    /* An unlinked file: it never shows in the folder and vanishes with the process. */
    int fd = -1;
#ifdef O_TMPFILE
    fd = open(d, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
#endif
    if (fd < 0) {
        size_t n = strlen(d) + 32;
        char *tmpl = malloc(n);
        if (!tmpl) {
            free(d);
            return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
        }
        snprintf(tmpl, n, "%s/.fluxq-spool-XXXXXX", d);
        fd = mkostemp(tmpl, O_CLOEXEC);
        if (fd >= 0) unlink(tmpl);
        free(tmpl);
    }
    if (fd < 0) {
        fq_status s = fq_err(ctx, FQ_ERR_IO, "cannot create a spool file in '%s': %s", d, strerror(errno));
        free(d);
        return s;
    }
    w->spool_fd = fd;
    w->spool_end = 0;
    w->spool_dir = d;
    return FQ_OK;
}

/* Appends e's owned bytes to the spool file and frees them. */
static fq_status spool_entry(fq_ctx *ctx, fq_st_writer *w, wentry *e) {
    const unsigned char *p = e->data;
    size_t done = 0;
    while (done < e->nbytes) {
        size_t chunk = e->nbytes - done < ((size_t)1 << 30) ? e->nbytes - done : (size_t)1 << 30;
        ssize_t r = pwrite(w->spool_fd, p + done, chunk, (off_t)(w->spool_end + done));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0)
            return fq_err(ctx, FQ_ERR_IO, "safetensors writer: tensor '%s': cannot spool %zu bytes to '%s': %s",
                          e->name, e->nbytes, w->spool_dir, r < 0 ? strerror(errno) : "no space written");
        done += (size_t)r;
    }
    free((void *)e->data);
    e->data = NULL;
    e->own = 0;
    e->spool_off = (int64_t)w->spool_end;
    w->spool_end += e->nbytes;
    return FQ_OK;
}

void fq_st_writer_truncate(fq_st_writer *w, int64_t count) {
    if (count < 0) count = 0;
    while (w->n > count) {
        wentry *e = &w->e[--w->n];
        if (e->own) free((void *)e->data);
        if (e->spool_off >= 0) w->spool_end = (uint64_t)e->spool_off; /* the tail was its bytes */
        free(e->name);
    }
}

void fq_st_writer_free(fq_st_writer *w) {
    if (!w) return;
    fq_st_writer_truncate(w, 0);
    for (int64_t i = 0; i < 2 * w->nmeta; i++) free(w->meta_kv[i]);
    free(w->meta_kv);
    free(w->e);
    if (w->spool_fd >= 0) close(w->spool_fd);
    free(w->spool_dir);
    free(w);
}

int64_t fq_st_writer_count(const fq_st_writer *w) { return w->n; }
void fq_st_writer_test_fail(fq_st_writer *w, int stage) { w->fail_stage = stage; }

fq_status fq_st_writer_add(fq_ctx *ctx, fq_st_writer *w, const char *name, fq_dtype dtype, int ndim,
                           const int64_t *shape, const void *data, size_t nbytes, int own) {
    fq_status s = FQ_OK;
    int64_t numel = 1;
    if (!name || !strcmp(name, "__metadata__"))
        s = fq_err(ctx, FQ_ERR_INVALID_ARG, "safetensors writer: bad tensor name '%s'", name ? name : "(null)");
    else if (dtype_rank(dtype) < 0)
        s = fq_err(ctx, FQ_ERR_INVALID_ARG, "safetensors writer: tensor '%s': bad dtype %d", name, (int)dtype);
    else if (ndim < 0 || ndim > FQ_MAX_DIMS || (ndim && !shape))
        s = fq_err(ctx, FQ_ERR_INVALID_ARG, "safetensors writer: tensor '%s': bad rank %d", name, ndim);
    for (int i = 0; s == FQ_OK && i < ndim; i++) {
        if (shape[i] < 0 || (shape[i] && numel > INT64_MAX / (int64_t)fq_dtype_size(dtype) / shape[i]))
            s = fq_err(ctx, FQ_ERR_SHAPE, "safetensors writer: tensor '%s': bad dimension %lld", name,
                       (long long)shape[i]);
        else numel *= shape[i];
    }
    if (s == FQ_OK && (uint64_t)numel * fq_dtype_size(dtype) != (uint64_t)nbytes)
        s = fq_err(ctx, FQ_ERR_SHAPE, "safetensors writer: tensor '%s': %zu bytes given, shape needs %llu", name,
                   nbytes, (unsigned long long)((uint64_t)numel * fq_dtype_size(dtype)));
    if (s == FQ_OK && nbytes && !data)
        s = fq_err(ctx, FQ_ERR_INVALID_ARG, "safetensors writer: tensor '%s': no data", name);
    if (s == FQ_OK && w->n == w->cap) {
        int64_t cap = w->cap ? 2 * w->cap : 64;
        wentry *v = realloc(w->e, (size_t)cap * sizeof *v);
        if (!v) s = fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
        else w->e = v, w->cap = cap;
    }
    char *nm = s == FQ_OK ? fq_strdup(name) : NULL;
    if (s == FQ_OK && !nm) s = fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    if (s != FQ_OK) {
        if (own) free((void *)data);
        return s;
    }
    wentry *e = &w->e[w->n];
    *e = (wentry){.name = nm, .dtype = dtype, .ndim = ndim, .data = data, .nbytes = nbytes, .own = own,
                  .spool_off = -1};
    if (ndim) memcpy(e->shape, shape, (size_t)ndim * sizeof *shape);
    if (own && w->spool_fd >= 0 && nbytes) {
        s = spool_entry(ctx, w, e);
        if (s != FQ_OK) {
            free((void *)data);
            free(nm);
            return s;
        }
    }
    w->n++;
    return FQ_OK;
}

fq_status fq_st_writer_add_copy(fq_ctx *ctx, fq_st_writer *w, const char *name, fq_dtype dtype, int ndim,
                                const int64_t *shape, const void *data, size_t nbytes) {
    void *c = malloc(nbytes ? nbytes : 1);
    if (!c) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    if (nbytes) memcpy(c, data, nbytes);
    return fq_st_writer_add(ctx, w, name, dtype, ndim, shape, c, nbytes, 1);
}

fq_status fq_st_writer_set_metadata(fq_ctx *ctx, fq_st_writer *w, const char *key, const char *value) {
    char *v = fq_strdup(value);
    if (!v) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    for (int64_t i = 0; i < w->nmeta; i++) {
        if (strcmp(w->meta_kv[2 * i], key) == 0) {
            free(w->meta_kv[2 * i + 1]);
            w->meta_kv[2 * i + 1] = v;
            return FQ_OK;
        }
    }
    if (w->nmeta == w->meta_cap) {
        int64_t cap = w->meta_cap ? 2 * w->meta_cap : 8;
        char **p = realloc(w->meta_kv, (size_t)(2 * cap) * sizeof *p);
        if (!p) { free(v); return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory"); }
        w->meta_kv = p;
        w->meta_cap = cap;
    }
    char *k = fq_strdup(key);
    if (!k) { free(v); return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory"); }
    w->meta_kv[2 * w->nmeta] = k;
    w->meta_kv[2 * w->nmeta + 1] = v;
    w->nmeta++;
    return FQ_OK;
}

/* A JSON string as serde_json writes it: only '"', '\\' and control
 * characters are escaped; UTF-8 passes through. */
static void put_serde_string(fq_sbuf *b, const char *s) {
    fq_sb_put(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        switch (*p) {
        case '"': fq_sb_puts(b, "\\\""); break;
        case '\\': fq_sb_puts(b, "\\\\"); break;
        case '\b': fq_sb_puts(b, "\\b"); break;
        case '\f': fq_sb_puts(b, "\\f"); break;
        case '\n': fq_sb_puts(b, "\\n"); break;
        case '\r': fq_sb_puts(b, "\\r"); break;
        case '\t': fq_sb_puts(b, "\\t"); break;
        default:
            if (*p < 0x20) fq_sb_printf(b, "\\u%04x", *p);
            else fq_sb_put(b, p, 1);
        }
    }
    fq_sb_put(b, "\"", 1);
}

static int cmp_write_order(const void *a, const void *b) {
    const wentry *x = *(const wentry *const *)a, *y = *(const wentry *const *)b;
    int rx = dtype_rank(x->dtype), ry = dtype_rank(y->dtype);
    if (rx != ry) return ry - rx;
    return strcmp(x->name, y->name);
}

static int cmp_entry_name(const void *a, const void *b) {
    return strcmp((*(const wentry *const *)a)->name, (*(const wentry *const *)b)->name);
}

/* Orders the entries and builds the padded header. *order: caller frees. */
static fq_status build_header(fq_ctx *ctx, const fq_st_writer *w, const char *path, wentry ***order,
                              fq_sbuf *hdr) {
    wentry **v = malloc(((size_t)w->n + 1) * sizeof *v);
    if (!v) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    for (int64_t i = 0; i < w->n; i++) v[i] = &w->e[i];
    qsort(v, (size_t)w->n, sizeof *v, cmp_entry_name);
    for (int64_t i = 0; i < w->n; i++) {
        fq_status s = FQ_OK;
        if (i && strcmp(v[i - 1]->name, v[i]->name) == 0)
            s = fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: tensor '%s' added twice", path, v[i]->name);
        else if (!fq_utf8_valid((const unsigned char *)v[i]->name, strlen(v[i]->name)))
            s = fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: tensor name '%s' is not UTF-8", path, v[i]->name);
        if (s != FQ_OK) {
            free(v);
            return s;
        }
    }
    qsort(v, (size_t)w->n, sizeof *v, cmp_write_order);
    fq_sb_put(hdr, "{", 1);
    if (w->nmeta) {
        fq_sb_puts(hdr, "\"__metadata__\":{");
        for (int64_t i = 0; i < w->nmeta; i++) {
            if (i) fq_sb_put(hdr, ",", 1);
            put_serde_string(hdr, w->meta_kv[2 * i]);
            fq_sb_put(hdr, ":", 1);
            put_serde_string(hdr, w->meta_kv[2 * i + 1]);
        }
        fq_sb_put(hdr, "}", 1);
    }
    uint64_t off = 0;
    for (int64_t i = 0; i < w->n; i++) {
        const wentry *e = v[i];
        if (i || w->nmeta) fq_sb_put(hdr, ",", 1);
        put_serde_string(hdr, e->name);
        fq_sb_printf(hdr, ":{\"dtype\":\"%s\",\"shape\":[", fq_st_dtype_str(e->dtype));
        for (int d = 0; d < e->ndim; d++) fq_sb_printf(hdr, d ? ",%lld" : "%lld", (long long)e->shape[d]);
        fq_sb_printf(hdr, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                     (unsigned long long)(off + e->nbytes));
        off += e->nbytes;
    }
    fq_sb_put(hdr, "}", 1);
    while (hdr->len % 8) fq_sb_put(hdr, " ", 1); /* data starts 8-aligned */
    if (hdr->oom) {
        free(v);
        return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    }
    if (hdr->len > FQ_ST_MAX_HEADER) {
        free(v);
        return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: header of %zu bytes exceeds the safetensors limit", path,
                      hdr->len);
    }
    *order = v;
    return FQ_OK;
}

/* Copies a spooled entry's bytes into f, a bounded buffer at a time. */
static fq_status copy_spooled(fq_ctx *ctx, const fq_st_writer *w, const wentry *e, fq_afile *f) {
    const size_t cap = (size_t)16 << 20;
    size_t bufsz = e->nbytes < cap ? e->nbytes : cap;
    unsigned char *buf = malloc(bufsz);
    if (!buf) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    fq_status s = FQ_OK;
    for (size_t done = 0; done < e->nbytes && s == FQ_OK;) {
        size_t want = e->nbytes - done < bufsz ? e->nbytes - done : bufsz;
        ssize_t r = pread(w->spool_fd, buf, want, (off_t)((uint64_t)e->spool_off + done));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            s = fq_err(ctx, FQ_ERR_IO, "safetensors writer: tensor '%s': cannot read back its spooled bytes: %s",
                       e->name, r < 0 ? strerror(errno) : "short file");
            break;
        }
        s = fq_afile_write(ctx, f, buf, (size_t)r);
        done += (size_t)r;
    }
    free(buf);
    return s;
}

fq_status fq_st_writer_commit(fq_ctx *ctx, fq_st_writer *w, const char *path) {
    for (int64_t i = 0; i < 2 * w->nmeta; i++)
        if (!fq_utf8_valid((const unsigned char *)w->meta_kv[i], strlen(w->meta_kv[i])))
            return fq_err(ctx, FQ_ERR_INVALID_ARG, "%s: metadata string '%s' is not UTF-8", path, w->meta_kv[i]);
    fq_sbuf hdr = {0};
    wentry **order = NULL;
    fq_status s = build_header(ctx, w, path, &order, &hdr);
    if (s != FQ_OK) {
        free(hdr.p);
        return s;
    }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)hdr.len >> (8 * i));
    fq_afile f;
    s = fq_afile_open(ctx, &f, path, w->fail_stage);
    if (s == FQ_OK) {
        s = fq_afile_write(ctx, &f, len8, 8);
        if (s == FQ_OK) s = fq_afile_write(ctx, &f, hdr.p, hdr.len);
        for (int64_t i = 0; i < w->n && s == FQ_OK; i++) {
            if (!order[i]->nbytes) continue;
            if (order[i]->spool_off >= 0) s = copy_spooled(ctx, w, order[i], &f);
            else s = fq_afile_write(ctx, &f, order[i]->data, order[i]->nbytes);
        }
        if (s == FQ_OK) s = fq_afile_commit(ctx, &f);
        else fq_afile_abort(&f);
    }
    free(order);
    free(hdr.p);
    return s;
}

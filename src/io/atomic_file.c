/* Atomic file writes (temp + fsync + rename) and whole-file reads. */
#include "io/atomic_file.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void release(fq_afile *f) {
    if (f->fd >= 0) close(f->fd);
    f->fd = -1;
    free(f->path);
    free(f->tmp);
    f->path = f->tmp = NULL;
}

fq_status fq_afile_open(fq_ctx *ctx, fq_afile *f, const char *path, int fail_stage) {
    *f = (fq_afile){.fd = -1, .fail_stage = fail_stage};
    size_t n = strlen(path) + 32;
    f->path = fq_strdup(path);
    f->tmp = malloc(n);
    if (!f->path || !f->tmp) {
        release(f);
        return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    }
    snprintf(f->tmp, n, "%s.tmp.%ld", path, (long)getpid());
    /* O_EXCL: never write through a planted link. A leftover temp of a crashed
     * run with the same pid is removed once and the create retried. */
    for (int attempt = 0; attempt < 2; attempt++) {
        f->fd = open(f->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (f->fd >= 0 || errno != EEXIST || attempt) break;
        unlink(f->tmp);
    }
    if (f->fd < 0) {
        int e = errno;
        fq_status s = fq_err(ctx, FQ_ERR_IO, "%s: cannot create temp file '%s': %s", path, f->tmp,
                             strerror(e));
        release(f);
        return s;
    }
    return FQ_OK;
}

fq_status fq_afile_write(fq_ctx *ctx, fq_afile *f, const void *p, size_t n) {
    if (f->fail_stage == 1) return fq_err(ctx, FQ_ERR_IO, "%s: write failed (injected)", f->path);
    const char *c = p;
    while (n) {
        size_t chunk = n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n;
        ssize_t k = write(f->fd, c, chunk);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0)
            return fq_err(ctx, FQ_ERR_IO, "%s: write failed: %s", f->path,
                          k < 0 ? strerror(errno) : "no progress");
        c += k;
        n -= (size_t)k;
    }
    return FQ_OK;
}

void fq_afile_abort(fq_afile *f) {
    if (f->fd >= 0) close(f->fd);
    f->fd = -1;
    if (f->tmp) unlink(f->tmp);
    release(f);
}

/* Best effort: makes the rename durable. Its failure cannot undo the rename,
 * so it is not reported. */
static void sync_dir(const char *path) {
    char *d = fq_strdup(path);
    if (!d) return;
    int fd = open(dirname(d), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    free(d);
}

fq_status fq_afile_commit(fq_ctx *ctx, fq_afile *f) {
    fq_status s = FQ_OK;
    if (f->fail_stage == 2 || fsync(f->fd) != 0)
        s = fq_err(ctx, FQ_ERR_IO, "%s: fsync failed: %s", f->path,
                   f->fail_stage == 2 ? "injected" : strerror(errno));
    if (s == FQ_OK) {
        int rc = close(f->fd);
        f->fd = -1;
        if (rc != 0) s = fq_err(ctx, FQ_ERR_IO, "%s: close failed: %s", f->path, strerror(errno));
    }
    if (s == FQ_OK && (f->fail_stage == 3 || rename(f->tmp, f->path) != 0))
        s = fq_err(ctx, FQ_ERR_IO, "%s: rename from '%s' failed: %s", f->path, f->tmp,
                   f->fail_stage == 3 ? "injected" : strerror(errno));
    if (s != FQ_OK) {
        fq_afile_abort(f);
        return s;
    }
    sync_dir(f->path);
    release(f);
    return FQ_OK;
}

fq_status fq_write_file_atomic(fq_ctx *ctx, const char *path, const void *p, size_t n, int fail_stage) {
    fq_afile f;
    FQ_TRY(fq_afile_open(ctx, &f, path, fail_stage));
    fq_status s = fq_afile_write(ctx, &f, p, n);
    if (s != FQ_OK) {
        fq_afile_abort(&f);
        return s;
    }
    return fq_afile_commit(ctx, &f);
}

fq_status fq_read_file(fq_ctx *ctx, const char *path, size_t max_bytes, char **out, size_t *len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fq_err(ctx, FQ_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return fq_err(ctx, FQ_ERR_IO, "%s: not a regular file", path);
    }
    if ((uint64_t)st.st_size > max_bytes) {
        close(fd);
        return fq_err(ctx, FQ_ERR_FORMAT, "%s: file too large (%lld bytes, limit %zu)", path,
                      (long long)st.st_size, max_bytes);
    }
    size_t n = (size_t)st.st_size, got = 0;
    char *buf = malloc(n + 1);
    if (!buf) {
        close(fd);
        return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    }
    while (got < n) {
        ssize_t k = read(fd, buf + got, n - got);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) {
            int e = errno;
            free(buf);
            close(fd);
            return fq_err(ctx, FQ_ERR_IO, "%s: read failed: %s", path, k < 0 ? strerror(e) : "short file");
        }
        got += (size_t)k;
    }
    close(fd);
    buf[n] = '\0';
    *out = buf;
    *len = n;
    return FQ_OK;
}

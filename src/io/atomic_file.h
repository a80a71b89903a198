/* Write-to-temp-then-rename, so a failed or interrupted write leaves no file. */
#ifndef FQ_IO_ATOMIC_FILE_H
#define FQ_IO_ATOMIC_FILE_H

#include "core/core.h"

typedef struct {
    int fd;          /* -1 when closed */
    char *path;      /* target; owned */
    char *tmp;       /* "<path>.tmp.<pid>"; owned */
    int fail_stage;  /* test hook: 1 first write, 2 fsync, 3 rename */
} fq_afile;

/* Creates the temp file next to path. On failure nothing exists and *f needs
 * no cleanup; on success finish with fq_afile_commit or fq_afile_abort. */
fq_status fq_afile_open(fq_ctx *ctx, fq_afile *f, const char *path, int fail_stage);
/* Writes all n bytes (any size); on failure the caller aborts. */
fq_status fq_afile_write(fq_ctx *ctx, fq_afile *f, const void *p, size_t n);
/* fsync, close, rename over the target. Always releases f; on failure the temp
 * file is removed and the target is untouched. */
fq_status fq_afile_commit(fq_ctx *ctx, fq_afile *f);
/* Closes and removes the temp file; releases f. */
void fq_afile_abort(fq_afile *f);

/* Writes a whole file atomically from one buffer. */
fq_status fq_write_file_atomic(fq_ctx *ctx, const char *path, const void *p, size_t n, int fail_stage);
/* Reads a whole file into a NUL-terminated buffer (limit: max_bytes).
 * *out: caller frees; *len excludes the NUL. */
fq_status fq_read_file(fq_ctx *ctx, const char *path, size_t max_bytes, char **out, size_t *len);

#endif

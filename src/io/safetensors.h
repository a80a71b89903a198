/* safetensors files: a validating mmap reader, sharded sets, and an atomic writer.
 *
 * Layout: 8-byte little-endian header length N, N bytes of JSON
 * {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}, ...},
 * then the data section; data_offsets are relative to its start. */
#ifndef FQ_IO_SAFETENSORS_H
#define FQ_IO_SAFETENSORS_H

#include "core/core.h"

/* Limit on the header, as in the reference implementation. */
#define FQ_ST_MAX_HEADER ((uint64_t)100000000)

typedef struct fq_st_file fq_st_file;

typedef struct {
    const char *name;             /* owned by the file */
    fq_dtype dtype;
    int ndim;
    int64_t shape[FQ_MAX_DIMS];
    int64_t numel;
    const void *data;             /* read-only, inside the file's mapping; valid until
                                     fq_st_close; NOT necessarily aligned to the dtype */
    size_t nbytes;
    uint64_t begin;               /* data_offsets[0] within the data section */
    const fq_st_file *file;       /* the file holding it */
} fq_st_tensor;

/* The safetensors dtype string ("F32", "BF16", "U8", ...) of t. */
const char *fq_st_dtype_str(fq_dtype t);
/* Maps a safetensors dtype string; 0 if it is not one fluxq handles. */
int fq_st_dtype_from_str(const char *s, fq_dtype *out);

/* ---- one file ---------------------------------------------------------------- */

/* Opens, maps and validates path (every header rule; see safetensors.c).
 * *out: caller closes with fq_st_close. Errors name the file and the tensor:
 * FQ_ERR_IO (cannot open/read/map), FQ_ERR_FORMAT (corrupt, truncated or lying
 * header), FQ_ERR_UNSUPPORTED (a valid dtype fluxq lacks, rank > FQ_MAX_DIMS). */
fq_status fq_st_open(fq_ctx *ctx, const char *path, fq_st_file **out);
void fq_st_close(fq_st_file *f);
/* The path as given to fq_st_open (owned by f). */
const char *fq_st_path(const fq_st_file *f);
/* Tensors in header order (for files safetensors wrote: data order). */
int64_t fq_st_count(const fq_st_file *f);
const fq_st_tensor *fq_st_get(const fq_st_file *f, int64_t i);
/* NULL if the file has no tensor of that name. */
const fq_st_tensor *fq_st_find(const fq_st_file *f, const char *name);
/* __metadata__ entries in header order; strings owned by f. */
int64_t fq_st_metadata_count(const fq_st_file *f);
void fq_st_metadata_get(const fq_st_file *f, int64_t i, const char **key, const char **value);
/* The value of one metadata key, or NULL. Owned by f. */
const char *fq_st_metadata(const fq_st_file *f, const char *key);

/* ---- a checkpoint: one file or a sharded set ------------------------------------ */

typedef struct fq_st_set fq_st_set;

/* Opens path, which is one of:
 *  - a .safetensors file;
 *  - a *.safetensors.index.json ({"weight_map": {name: shard file}}; shards are
 *    plain file names next to it): every shard must exist and hold every name
 *    mapped to it;
 *  - a folder: diffusion_pytorch_model.safetensors(.index.json), then
 *    model.safetensors(.index.json), else its only *.safetensors.index.json,
 *    else its only *.safetensors.
 * No name may appear in two shards. *out: caller closes with fq_st_set_close. */
fq_status fq_st_set_open(fq_ctx *ctx, const char *path, fq_st_set **out);
void fq_st_set_close(fq_st_set *s);
/* All tensors of all shards, shard by shard in header order. */
int64_t fq_st_set_count(const fq_st_set *s);
const fq_st_tensor *fq_st_set_get(const fq_st_set *s, int64_t i);
const fq_st_tensor *fq_st_set_find(const fq_st_set *s, const char *name);
int fq_st_set_nfiles(const fq_st_set *s);
const fq_st_file *fq_st_set_file(const fq_st_set *s, int i);

/* ---- writer --------------------------------------------------------------------- */

/* Collects tensors, then writes a file exactly as the reference writer does:
 * tensors ordered by dtype (widest first, as safetensors ranks them) then by
 * name, data packed in that order, compact header JSON padded with spaces to a
 * multiple of 8, "__metadata__" first when there is any. */
typedef struct fq_st_writer fq_st_writer;

/* *out: caller frees with fq_st_writer_free. */
fq_status fq_st_writer_create(fq_ctx *ctx, fq_st_writer **out);
/* Frees the writer and every buffer it owns. */
void fq_st_writer_free(fq_st_writer *w);
/* Adds a tensor (name is copied). data holds nbytes == numel * itemsize bytes
 * of host memory. own = 1: data came from malloc and the writer frees it, also
 * when this call fails. own = 0: the caller keeps data valid until commit
 * returns. Duplicate names are reported by commit. */
fq_status fq_st_writer_add(fq_ctx *ctx, fq_st_writer *w, const char *name, fq_dtype dtype, int ndim,
                           const int64_t *shape, const void *data, size_t nbytes, int own);
/* As fq_st_writer_add with a private copy of data. */
fq_status fq_st_writer_add_copy(fq_ctx *ctx, fq_st_writer *w, const char *name, fq_dtype dtype,
                                int ndim, const int64_t *shape, const void *data, size_t nbytes);
/* From now on, buffers the writer owns (own = 1, fq_st_writer_add_copy) go to an
 * unlinked spool file in dir as they are added and are freed at once, so a
 * conversion holds one tensor in memory instead of all of them; commit copies
 * them back from there. Call before the adds; dir needs room for those bytes
 * (the output's folder is a good choice: /tmp may be in memory). */
fq_status fq_st_writer_spool(fq_ctx *ctx, fq_st_writer *w, const char *dir);
/* Sets a __metadata__ entry (both strings copied); a key set again keeps its place. */
fq_status fq_st_writer_set_metadata(fq_ctx *ctx, fq_st_writer *w, const char *key, const char *value);
int64_t fq_st_writer_count(const fq_st_writer *w);
/* Drops the entries added after the first `count` (freeing those it owns); used
 * to undo a partly failed group of adds. */
void fq_st_writer_truncate(fq_st_writer *w, int64_t count);
/* Writes everything to path: to "<path>.tmp.<pid>" in the same folder, fsync,
 * rename over path. On any failure the temp file is removed and path is left
 * as it was. The writer keeps its entries (commit may be retried). */
fq_status fq_st_writer_commit(fq_ctx *ctx, fq_st_writer *w, const char *path);

/* Test hook: make commit fail at a stage (0 none, 1 first write, 2 fsync, 3 rename). */
void fq_st_writer_test_fail(fq_st_writer *w, int stage);

#endif

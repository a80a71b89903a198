/* Test-only safetensors reader: the whole file in memory, tensors by name, and
 * a byte comparison against a golden tensor (or its ".fnv1a64" hash, which the
 * fixtures store instead of large outputs). Not part of the library. */
#ifndef FQ_TEST_ST_READ_H
#define FQ_TEST_ST_READ_H

#include "fluxq.h"

#include <stddef.h>
#include <stdint.h>

typedef struct {
    unsigned char *buf;
    size_t len, data_off;
    void *hdr; /* cJSON * */
} stf_file;

typedef struct {
    const void *data; /* points into the file's buffer */
    size_t bytes;
    fq_dtype dtype;
    int ndim;
    int64_t shape[FQ_MAX_DIMS];
} stf_tensor;

/* 1 on success; free with stf_close. */
int stf_open(const char *path, stf_file *f);
void stf_close(stf_file *f);
/* 1 if the tensor exists and lies inside the file. */
int stf_get(const stf_file *f, const char *name, stf_tensor *t);
/* A string of __metadata__, or NULL. Owned by f. */
const char *stf_meta(const stf_file *f, const char *key);

uint64_t stf_fnv1a64(const void *p, size_t n);
/* 1 if `ours` (n bytes, elements of `elem` bytes) equals golden tensor `name`
 * (or its "<name>.fnv1a64"); otherwise prints the first difference to stderr,
 * prefixed with `what`, and returns 0. */
int stf_match(const stf_file *f, const char *name, const void *ours, size_t n, size_t elem, const char *what);

#endif

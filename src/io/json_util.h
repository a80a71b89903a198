/* JSON on top of cJSON: strict parsing, and output that matches Python's json
 * module byte for byte (config.json, bitsandbytes quant_state). */
#ifndef FQ_IO_JSON_UTIL_H
#define FQ_IO_JSON_UTIL_H

#include "core/core.h"

#include <cjson/cJSON.h>

/* Parses len bytes as one JSON value, stricter than cJSON alone: valid UTF-8,
 * RFC 8259 number syntax, no raw control characters inside strings, nothing
 * but whitespace after the value, and no object repeats a key. `what` names
 * the source in messages. Every number node keeps its source text (see
 * fq_json_number_text), so 6.0 and 6 stay apart. *out: caller frees with
 * cJSON_Delete. Errors: FQ_ERR_FORMAT (FQ_ERR_OUT_OF_MEMORY). */
fq_status fq_json_parse(fq_ctx *ctx, const char *what, const char *text, size_t len, cJSON **out);

/* The text of a number node as parsed or as made by fq_json_new_*; NULL for
 * a plain cJSON number (then integral values up to 2^53 count as integers).
 * Only change numbers by replacing the node, never with cJSON_SetNumberValue. */
const char *fq_json_number_text(const cJSON *n);
/* 1 if n is a number written as an integer (no '.', no exponent). */
int fq_json_is_int(const cJSON *n);
/* Reads an integer node exactly into *v; 0 if n is not an integer in int64 range. */
int fq_json_get_int64(const cJSON *n, int64_t *v);
/* Number nodes that print as Python would print a float (6.0) or an int (6).
 * NULL on OOM; the caller owns the node until it is added to a tree. */
cJSON *fq_json_new_float(double v);
cJSON *fq_json_new_int(int64_t v);

/* Python's repr(float): the shortest digits that round-trip, in fixed
 * notation for 1e-4 <= |v| < 1e16 ("0.1", "123456789.0"), else exponent form
 * ("1e-05", "1.5e-05", "1e+16"); "NaN", "Infinity", "-Infinity". Writes a NUL-
 * terminated string into buf (n >= 32 always suffices); returns its length. */
int fq_py_float_repr(double v, char *buf, size_t n);

/* Serializes v like Python's json.dumps(v, indent=indent, sort_keys=sort_keys)
 * (ensure_ascii on; indent < 0 means none, with ", " and ": " separators).
 * *out: NUL-terminated, caller frees; *len (may be NULL) its length. */
fq_status fq_json_dump_py(fq_ctx *ctx, const cJSON *v, int indent, int sort_keys, char **out,
                          size_t *len);

/* A growing byte string used by the writers. Errors only on OOM. */
typedef struct {
    char *p;
    size_t len, cap;
    int oom;
} fq_sbuf;
void fq_sb_put(fq_sbuf *b, const void *s, size_t n);
void fq_sb_puts(fq_sbuf *b, const char *s);
void fq_sb_printf(fq_sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* 1 if s[0..n) is well-formed UTF-8 (no overlongs, surrogates or > U+10FFFF). */
int fq_utf8_valid(const unsigned char *s, size_t n);

#endif

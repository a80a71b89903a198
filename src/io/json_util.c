/* Strict JSON parsing over cJSON and Python-compatible JSON output. */
#include "io/json_util.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- growing byte strings ----------------------------------------------- */

void fq_sb_put(fq_sbuf *b, const void *s, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) { b->oom = 1; return; }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void fq_sb_puts(fq_sbuf *b, const char *s) { fq_sb_put(b, s, strlen(s)); }

void fq_sb_printf(fq_sbuf *b, const char *fmt, ...) {
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (k < 0 || (size_t)k >= sizeof tmp) { b->oom = 1; return; } /* only short items go here */
    fq_sb_put(b, tmp, (size_t)k);
}

/* ---- UTF-8 ------------------------------------------------------------------ */

/* Decodes one code point at s (n bytes left); returns its length, 0 if malformed. */
static size_t utf8_next(const unsigned char *s, size_t n, unsigned *cp) {
    unsigned c = s[0];
    if (c < 0x80) { *cp = c; return 1; }
    size_t len;
    unsigned min;
    if ((c & 0xE0) == 0xC0) { len = 2; min = 0x80; c &= 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; min = 0x800; c &= 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; min = 0x10000; c &= 0x07; }
    else return 0;
    if (len > n) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        c = (c << 6) | (s[i] & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return 0;
    *cp = c;
    return len;
}

int fq_utf8_valid(const unsigned char *s, size_t n) {
    size_t i = 0;
    unsigned cp;
    while (i < n) {
        if (s[i] < 0x80) { i++; continue; }
        size_t k = utf8_next(s + i, n - i, &cp);
        if (!k) return 0;
        i += k;
    }
    return 1;
}

/* ---- strict parsing ---------------------------------------------------------- */

typedef struct {
    const char *s;
    size_t n;
} numtok;

/* RFC 8259: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
static int number_syntax_ok(const char *s, size_t n) {
    size_t i = 0;
    if (i < n && s[i] == '-') i++;
    if (i >= n) return 0;
    if (s[i] == '0') i++;
    else if (s[i] >= '1' && s[i] <= '9') while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    else return 0;
    if (i < n && s[i] == '.') {
        size_t d = ++i;
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
        if (i == d) return 0;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-')) i++;
        size_t d = i;
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
        if (i == d) return 0;
    }
    return i == n;
}

static int is_num_char(char c) {
    return (c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E';
}

/* Checks what cJSON does not (control characters, \u0000, number syntax) and
 * collects the number tokens in document order. */
static fq_status scan_text(fq_ctx *ctx, const char *what, const char *t, size_t n, numtok **out,
                           size_t *nout) {
    numtok *toks = NULL;
    size_t nt = 0, cap = 0;
    int in_str = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)t[i];
        if (in_str) {
            if (c < 0x20) goto ctrl;
            if (c == '"') in_str = 0;
            else if (c == '\\') {
                if (i + 5 < n && t[i + 1] == 'u' && memcmp(t + i + 2, "0000", 4) == 0) {
                    free(toks);
                    return fq_err(ctx, FQ_ERR_FORMAT, "%s: JSON string contains \\u0000 at byte %zu", what,
                                  i);
                }
                i++; /* skip the escaped character; cJSON checks the escape itself */
            }
            continue;
        }
        if (c == '"') { in_str = 1; continue; }
        if (c < 0x20 && c != ' ' && c != '\t' && c != '\n' && c != '\r') goto ctrl;
        if (c == '-' || (c >= '0' && c <= '9')) {
            size_t j = i;
            while (j < n && is_num_char(t[j])) j++;
            if (!number_syntax_ok(t + i, j - i)) {
                free(toks);
                return fq_err(ctx, FQ_ERR_FORMAT, "%s: bad JSON number '%.*s' at byte %zu", what,
                              (int)(j - i > 40 ? 40 : j - i), t + i, i);
            }
            if (nt == cap) {
                cap = cap ? cap * 2 : 64;
                numtok *p = realloc(toks, cap * sizeof *p);
                if (!p) { free(toks); return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory"); }
                toks = p;
            }
            toks[nt++] = (numtok){t + i, j - i};
            i = j - 1;
        }
    }
    *out = toks;
    *nout = nt;
    return FQ_OK;
ctrl:
    free(toks);
    return fq_err(ctx, FQ_ERR_FORMAT, "%s: control character in JSON text", what);
}

/* Gives every number node its source text (valuestring; cJSON_Delete frees it). */
static int annotate(cJSON *v, const numtok *t, size_t nt, size_t *k) {
    if (cJSON_IsNumber(v)) {
        if (*k >= nt) return 0;
        char *s = malloc(t[*k].n + 1);
        if (!s) return -1;
        memcpy(s, t[*k].s, t[*k].n);
        s[t[*k].n] = '\0';
        v->valuestring = s;
        (*k)++;
    }
    for (cJSON *c = v->child; c; c = c->next) {
        int r = annotate(c, t, nt, k);
        if (r <= 0) return r;
    }
    return 1;
}

static int cmp_str_ptr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Rejects an object that repeats a key (cJSON keeps both; Python keeps the last). */
static fq_status check_dups(fq_ctx *ctx, const char *what, const cJSON *v) {
    if (cJSON_IsObject(v)) {
        size_t n = 0;
        for (const cJSON *c = v->child; c; c = c->next) n++;
        if (n > 1) {
            const char **keys = malloc(n * sizeof *keys);
            if (!keys) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
            size_t i = 0;
            for (const cJSON *c = v->child; c; c = c->next) keys[i++] = c->string ? c->string : "";
            qsort(keys, n, sizeof *keys, cmp_str_ptr);
            for (i = 1; i < n; i++) {
                if (strcmp(keys[i - 1], keys[i]) == 0) {
                    fq_status s = fq_err(ctx, FQ_ERR_FORMAT, "%s: duplicate key '%s'", what, keys[i]);
                    free(keys);
                    return s;
                }
            }
            free(keys);
        }
    }
    for (const cJSON *c = v->child; c; c = c->next) FQ_TRY(check_dups(ctx, what, c));
    return FQ_OK;
}

fq_status fq_json_parse(fq_ctx *ctx, const char *what, const char *text, size_t len, cJSON **out) {
    if (!fq_utf8_valid((const unsigned char *)text, len))
        return fq_err(ctx, FQ_ERR_FORMAT, "%s: JSON text is not valid UTF-8", what);
    numtok *toks = NULL;
    size_t nt = 0;
    FQ_TRY(scan_text(ctx, what, text, len, &toks, &nt));
    /* A NUL-terminated copy, so cJSON never depends on the length checks alone. */
    char *copy = malloc(len + 1);
    if (!copy) { free(toks); return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory"); }
    memcpy(copy, text, len);
    copy[len] = '\0';
    const char *end = NULL;
    /* cJSON records every parse's error position in one global (even when the
     * caller asks for it directly), so concurrent parses from two contexts would
     * race on it: one parse at a time. */
    static pthread_mutex_t parse_lock = PTHREAD_MUTEX_INITIALIZER;
    pthread_mutex_lock(&parse_lock);
    cJSON *root = cJSON_ParseWithLengthOpts(copy, len, &end, 0);
    pthread_mutex_unlock(&parse_lock);
    fq_status s = FQ_OK;
    if (!root) {
        s = fq_err(ctx, FQ_ERR_FORMAT, "%s: invalid JSON near byte %zu", what,
                   end ? (size_t)(end - copy) : (size_t)0);
    } else {
        for (const char *p = end; p < copy + len && s == FQ_OK; p++)
            if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r')
                s = fq_err(ctx, FQ_ERR_FORMAT, "%s: data after the JSON value at byte %zu", what,
                           (size_t)(p - copy));
    }
    if (s == FQ_OK) {
        size_t k = 0;
        int r = annotate(root, toks, nt, &k);
        if (r < 0) s = fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
        else if (r == 0 || k != nt)
            s = fq_err(ctx, FQ_ERR_FORMAT, "%s: JSON numbers could not be matched to the text", what);
    }
    if (s == FQ_OK) s = check_dups(ctx, what, root);
    free(toks);
    free(copy);
    if (s != FQ_OK) { cJSON_Delete(root); return s; }
    *out = root;
    return FQ_OK;
}

/* ---- numbers ---------------------------------------------------------------- */

const char *fq_json_number_text(const cJSON *n) { return cJSON_IsNumber(n) ? n->valuestring : NULL; }

static int text_is_int(const char *t) { return !strpbrk(t, ".eE"); }

int fq_json_is_int(const cJSON *n) {
    if (!cJSON_IsNumber(n)) return 0;
    const char *t = fq_json_number_text(n);
    if (t) return text_is_int(t);
    double v = n->valuedouble;
    return isfinite(v) && v == floor(v) && fabs(v) <= 9007199254740992.0;
}

int fq_json_get_int64(const cJSON *n, int64_t *v) {
    if (!fq_json_is_int(n)) return 0;
    const char *t = fq_json_number_text(n);
    if (!t) { *v = (int64_t)n->valuedouble; return 1; }
    int neg = *t == '-';
    if (neg) t++;
    if (!*t) return 0;
    uint64_t acc = 0, lim = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    for (; *t; t++) {
        if (*t < '0' || *t > '9') return 0;
        unsigned d = (unsigned)(*t - '0');
        if (acc > (lim - d) / 10) return 0;
        acc = acc * 10 + d;
    }
    *v = neg ? (acc == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)acc) : (int64_t)acc;
    return 1;
}

static cJSON *number_with_text(double v, const char *text) {
    cJSON *n = cJSON_CreateNumber(v);
    if (!n) return NULL;
    n->valuestring = fq_strdup(text);
    if (!n->valuestring) { cJSON_Delete(n); return NULL; }
    return n;
}

cJSON *fq_json_new_float(double v) {
    char buf[32];
    fq_py_float_repr(v, buf, sizeof buf);
    return number_with_text(v, buf);
}

cJSON *fq_json_new_int(int64_t v) {
    char buf[32];
    snprintf(buf, sizeof buf, "%lld", (long long)v);
    return number_with_text((double)v, buf);
}

/* ---- Python float repr ------------------------------------------------------- */

/* Builds "<m>e<e10>" (no decimal point, so no locale is involved) and checks it
 * reads back as v. */
static int roundtrips(uint64_t m, int e10, double v) {
    char s[48];
    snprintf(s, sizeof s, "%llue%d", (unsigned long long)m, e10);
    return strtod(s, NULL) == v;
}

/* Shortest digits d1..dk with v = 0.d1..dk * 10^decpt, like Python's dtoa mode 0.
 * For each length p, the correctly rounded p-digit value is tried first, then
 * its neighbours (needed where the rounding interval is lopsided, at powers of 2). */
static void shortest_digits(double v, char digits[20], int *decpt) {
    for (int p = 1; p <= 17; p++) {
        char s[64];
        snprintf(s, sizeof s, "%.*e", p - 1, v);
        uint64_t m = 0;
        const char *q = s;
        for (; *q && *q != 'e'; q++)
            if (*q >= '0' && *q <= '9') m = m * 10 + (uint64_t)(*q - '0');
        int e = atoi(q + 1);         /* v ~ d.ddd * 10^e */
        int e10 = e - (p - 1);       /* v ~ m * 10^e10   */
        uint64_t lo = 1;
        for (int i = 1; i < p; i++) lo *= 10;
        uint64_t cand[3] = {m, m - 1, m + 1}, pick = 0;
        for (int c = 0; c < 3 && !pick; c++)
            if (cand[c] >= lo && cand[c] < lo * 10 && roundtrips(cand[c], e10, v)) pick = cand[c];
        if (!pick && p == 17) pick = m; /* 17 digits always round-trip */
        if (pick) {
            int k = snprintf(digits, 20, "%llu", (unsigned long long)pick);
            while (k > 1 && digits[k - 1] == '0') digits[--k] = '\0';
            *decpt = e + 1;
            return;
        }
    }
}

int fq_py_float_repr(double v, char *buf, size_t n) {
    if (isnan(v)) return snprintf(buf, n, "NaN");
    if (isinf(v)) return snprintf(buf, n, v < 0 ? "-Infinity" : "Infinity");
    if (v == 0) return snprintf(buf, n, signbit(v) ? "-0.0" : "0.0");
    char d[20], out[48];
    int decpt = 0, o = 0;
    if (v < 0) out[o++] = '-';
    shortest_digits(fabs(v), d, &decpt);
    int nd = (int)strlen(d);
    if (decpt <= -4 || decpt > 16) { /* Python's repr switches to exponent form here */
        out[o++] = d[0];
        if (nd > 1) {
            out[o++] = '.';
            memcpy(out + o, d + 1, (size_t)nd - 1);
            o += nd - 1;
        }
        o += snprintf(out + o, sizeof out - (size_t)o, "e%c%02d", decpt - 1 < 0 ? '-' : '+',
                      abs(decpt - 1));
    } else if (decpt <= 0) {
        out[o++] = '0';
        out[o++] = '.';
        for (int i = 0; i < -decpt; i++) out[o++] = '0';
        memcpy(out + o, d, (size_t)nd);
        o += nd;
    } else if (decpt < nd) {
        memcpy(out + o, d, (size_t)decpt);
        o += decpt;
        out[o++] = '.';
        memcpy(out + o, d + decpt, (size_t)(nd - decpt));
        o += nd - decpt;
    } else {
        memcpy(out + o, d, (size_t)nd);
        o += nd;
        for (int i = nd; i < decpt; i++) out[o++] = '0';
        out[o++] = '.';
        out[o++] = '0';
    }
    out[o] = '\0';
    return snprintf(buf, n, "%s", out);
}

/* ---- Python json.dumps ------------------------------------------------------- */

/* ensure_ascii: everything outside ' '..'~' is escaped, \uXXXX in lowercase hex. */
static int put_py_string(fq_sbuf *b, const char *s) {
    const unsigned char *u = (const unsigned char *)s;
    size_t n = strlen(s), i = 0;
    fq_sb_put(b, "\"", 1);
    while (i < n) {
        unsigned cp;
        size_t k = utf8_next(u + i, n - i, &cp);
        if (!k) return 0;
        i += k;
        switch (cp) {
        case '"': fq_sb_puts(b, "\\\""); break;
        case '\\': fq_sb_puts(b, "\\\\"); break;
        case '\b': fq_sb_puts(b, "\\b"); break;
        case '\f': fq_sb_puts(b, "\\f"); break;
        case '\n': fq_sb_puts(b, "\\n"); break;
        case '\r': fq_sb_puts(b, "\\r"); break;
        case '\t': fq_sb_puts(b, "\\t"); break;
        default:
            if (cp >= 0x20 && cp <= 0x7E) {
                char c = (char)cp;
                fq_sb_put(b, &c, 1);
            } else if (cp < 0x10000) {
                fq_sb_printf(b, "\\u%04x", cp);
            } else {
                cp -= 0x10000;
                fq_sb_printf(b, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
            }
        }
    }
    fq_sb_put(b, "\"", 1);
    return 1;
}

static void put_number(fq_sbuf *b, const cJSON *v) {
    const char *t = fq_json_number_text(v);
    char buf[32];
    if (t && text_is_int(t)) {
        fq_sb_puts(b, strcmp(t, "-0") == 0 ? "0" : t); /* Python prints int(-0) as 0 */
    } else if (!t && fq_json_is_int(v)) {
        fq_sb_printf(b, "%lld", (long long)v->valuedouble);
    } else {
        fq_py_float_repr(v->valuedouble, buf, sizeof buf);
        fq_sb_puts(b, buf);
    }
}

static void newline_indent(fq_sbuf *b, int indent, int level) {
    fq_sb_put(b, "\n", 1);
    for (int i = 0; i < indent * level; i++) fq_sb_put(b, " ", 1);
}

static int cmp_item_key(const void *a, const void *b) {
    const cJSON *x = *(const cJSON *const *)a, *y = *(const cJSON *const *)b;
    return strcmp(x->string ? x->string : "", y->string ? y->string : "");
}

/* Returns 0 on a string that is not UTF-8 or on a non-JSON node type. */
static int dump(fq_sbuf *b, const cJSON *v, int indent, int sort, int level) {
    if (cJSON_IsNull(v)) { fq_sb_puts(b, "null"); return 1; }
    if (cJSON_IsTrue(v)) { fq_sb_puts(b, "true"); return 1; }
    if (cJSON_IsFalse(v)) { fq_sb_puts(b, "false"); return 1; }
    if (cJSON_IsNumber(v)) { put_number(b, v); return 1; }
    if (cJSON_IsString(v)) return put_py_string(b, v->valuestring ? v->valuestring : "");
    int obj = cJSON_IsObject(v);
    if (!obj && !cJSON_IsArray(v)) return 0;
    size_t n = 0;
    for (const cJSON *c = v->child; c; c = c->next) n++;
    if (!n) { fq_sb_puts(b, obj ? "{}" : "[]"); return 1; }
    const cJSON **items = malloc(n * sizeof *items);
    if (!items) { b->oom = 1; return 1; }
    size_t i = 0;
    for (const cJSON *c = v->child; c; c = c->next) items[i++] = c;
    if (obj && sort) qsort(items, n, sizeof *items, cmp_item_key);
    fq_sb_put(b, obj ? "{" : "[", 1);
    int ok = 1;
    for (i = 0; i < n && ok; i++) {
        if (i) fq_sb_puts(b, indent >= 0 ? "," : ", ");
        if (indent >= 0) newline_indent(b, indent, level + 1);
        if (obj) {
            ok = put_py_string(b, items[i]->string ? items[i]->string : "");
            fq_sb_puts(b, ": ");
        }
        if (ok) ok = dump(b, items[i], indent, sort, level + 1);
    }
    if (indent >= 0) newline_indent(b, indent, level);
    fq_sb_put(b, obj ? "}" : "]", 1);
    free(items);
    return ok;
}

fq_status fq_json_dump_py(fq_ctx *ctx, const cJSON *v, int indent, int sort_keys, char **out,
                          size_t *len) {
    fq_sbuf b = {0};
    int ok = dump(&b, v, indent, sort_keys, 0);
    if (b.oom || !ok || !b.p) {
        free(b.p);
        if (!ok) return fq_err(ctx, FQ_ERR_INVALID_ARG, "JSON value holds a string that is not UTF-8");
        return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    }
    *out = b.p;
    if (len) *len = b.len;
    return FQ_OK;
}

/* Small file helpers shared by the tests. */
#include "files.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

unsigned char *tf_read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    unsigned char *b = NULL;
    long sz = -1;
    if (fseek(f, 0, SEEK_END) == 0) sz = ftell(f);
    if (sz >= 0 && fseek(f, 0, SEEK_SET) == 0 && (b = malloc((size_t)sz + 1))) {
        size_t got = fread(b, 1, (size_t)sz, f);
        b[got] = 0;
        if (n) *n = got;
    }
    fclose(f);
    return b;
}

int tf_same_bytes(const char *a, const char *b) {
    size_t na = 0, nb = 0;
    unsigned char *da = tf_read_all(a, &na), *db = tf_read_all(b, &nb);
    int same = da && db && na == nb && memcmp(da, db, na) == 0;
    free(da);
    free(db);
    return same;
}

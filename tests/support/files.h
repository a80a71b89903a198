/* Small file helpers shared by the tests. */
#ifndef FQ_TEST_FILES_H
#define FQ_TEST_FILES_H

#include <stddef.h>

/* The whole file, NUL-terminated (so text can be used as a string); *n gets
 * its size. NULL if it cannot be read. Caller frees. */
unsigned char *tf_read_all(const char *path, size_t *n);
/* 1 if both files can be read and hold the same bytes. */
int tf_same_bytes(const char *a, const char *b);

#endif

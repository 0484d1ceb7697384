/* What the artifact reader's files share (itl_artifact.c, itl_layout.c, itl_codecs.c): the
 * artifact object and the reading context with its one-line errors and owned allocations.
 * Internal to the reader: not part of itl_artifact.h. */
#ifndef ITL_READER_H
#define ITL_READER_H

#include <stddef.h>
#include <stdint.h>

#include "itl_artifact.h"

struct itl_artifact {
    itl_model model;
    void **blocks; /* every allocation the model points into, freed with the artifact */
    size_t nblocks, cap;
    int64_t resident;
    char tok_sha[72];
};

/* one load: where its error line goes and the artifact being filled */
typedef struct {
    char *err;
    size_t err_len;
    itl_artifact *a;
} itl_rd;

/* Format the error line (newlines become spaces) and return code. */
int itl_rd_fail(itl_rd *r, int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
/* n zeroed bytes owned by the artifact (freed by itl_artifact_free); NULL when out of memory. */
void *itl_rd_alloc(itl_rd *r, size_t n);

#endif

/* The standalone artifact reader: a compact mixed-precision checkpoint (safetensors, layout
 * compact-v3, quant format iteralite-mixed version 2) parsed, verified and decoded in C into the
 * native step's itl_model, byte for byte what layout.py builds from the Python loader's model.
 * C99, libc/libm only; every read is bounds-checked and every failure is one line in `err`. */
#ifndef ITL_ARTIFACT_H
#define ITL_ARTIFACT_H

#include <stddef.h>
#include <stdint.h>

#include "itl_step.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define ITL_ARTIFACT_API __declspec(dllexport)
#else
#define ITL_ARTIFACT_API __attribute__((visibility("default")))
#endif

/* error codes (negative) */
enum {
    ITL_ART_OK = 0,
    ITL_ART_E_ARG = -1,         /* a null argument */
    ITL_ART_E_IO = -2,          /* the file cannot be opened or read */
    ITL_ART_E_FORMAT = -3,      /* not an iteralite artifact (not safetensors, another format) */
    ITL_ART_E_VERSION = -4,     /* another checkpoint format version */
    ITL_ART_E_TRUNCATED = -5,   /* truncated or padded */
    ITL_ART_E_CHECKSUM = -6,    /* header or tensors changed */
    ITL_ART_E_CORRUPT = -7,     /* checksum right but the content inconsistent */
    ITL_ART_E_UNSUPPORTED = -8, /* a valid artifact of a kind this reader does not run */
    ITL_ART_E_NOMEM = -9,
    ITL_ART_E_MODEL = -10       /* itl_check_model refused the decoded model */
};

typedef struct itl_artifact itl_artifact;

/* Parse + decode a whole artifact file in memory (buf not kept). 0 or a negative code; err gets one line. */
ITL_ARTIFACT_API int itl_artifact_load(const uint8_t *buf, size_t len, itl_artifact **out, char *err, size_t err_len);
/* The same from a path (a regular file); the message starts with the path. */
ITL_ARTIFACT_API int itl_artifact_load_file(const char *path, itl_artifact **out, char *err, size_t err_len);
ITL_ARTIFACT_API const itl_model *itl_artifact_model(const itl_artifact *a);
ITL_ARTIFACT_API void itl_artifact_free(itl_artifact *a);
/* The header's tokenizer_sha256 (of the tokenizer.json it was trained with; "" when none). */
ITL_ARTIFACT_API const char *itl_artifact_tokenizer_sha256(const itl_artifact *a);
/* Every byte the model holds (layout.py's NativeWeights.resident_bytes). */
ITL_ARTIFACT_API int64_t itl_artifact_resident_bytes(const itl_artifact *a);

#ifdef __cplusplus
}
#endif
#endif

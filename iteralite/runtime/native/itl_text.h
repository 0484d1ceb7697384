/* The text side of the standalone runtime: the binary tokenizer (iteralite/data/tokbin.py's
 * format), byte-level BPE encode/decode giving the ids of Hugging Face `tokenizers`, and a seeded,
 * platform-independent sampler. C99 and libc only; every function is exported for ctypes. */
#ifndef ITL_TEXT_H
#define ITL_TEXT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define ITL_TEXT_API __declspec(dllexport)
#else
#define ITL_TEXT_API __attribute__((visibility("default")))
#endif

/* error codes (negative); itl_text_strerror names them */
enum {
    ITL_TEXT_OK = 0,
    ITL_TEXT_E_NOMEM = -1,     /* out of memory */
    ITL_TEXT_E_MAGIC = -2,     /* not a binary tokenizer */
    ITL_TEXT_E_VERSION = -3,   /* another format version */
    ITL_TEXT_E_TRUNCATED = -4, /* shorter than its header says */
    ITL_TEXT_E_CHECKSUM = -5,  /* CRC-32 mismatch */
    ITL_TEXT_E_CORRUPT = -6,   /* checksum right but content inconsistent */
    ITL_TEXT_E_UTF8 = -7,      /* text is not valid UTF-8 */
    ITL_TEXT_E_ID = -8,        /* token id out of range */
    ITL_TEXT_E_ARG = -9,       /* bad argument (NULL, n <= 0, non-finite parameter) */
    ITL_TEXT_E_LOGITS = -10    /* no finite logit */
};

/* The pre-tokenizer's class of code points first..first+n-1 into out: 0 other, 1 letter (\p{L}),
 * 2 number (\p{N}), 3 space (\s). For tests against Oniguruma; returns n, or an error. */
ITL_TEXT_API int64_t itl_text_char_classes(uint32_t first, uint32_t n, uint8_t *out);

typedef struct itl_tok itl_tok;
typedef struct itl_sampler itl_sampler;

ITL_TEXT_API const char *itl_text_strerror(int code);

/* Parse a binary tokenizer from buf[0..len) (copied; buf may be freed after). 0 or an error. */
ITL_TEXT_API int itl_tok_load(const uint8_t *buf, size_t len, itl_tok **out);
ITL_TEXT_API void itl_tok_free(itl_tok *t);
ITL_TEXT_API int32_t itl_tok_vocab_size(const itl_tok *t);
ITL_TEXT_API int32_t itl_tok_eot_id(const itl_tok *t); /* -1 when none */

/* Encode UTF-8 text[0..len) into ids. Returns the number of ids (never more than len), writing at
 * most cap of them; a negative error code otherwise. */
ITL_TEXT_API int64_t itl_tok_encode(const itl_tok *t, const uint8_t *text, size_t len, int32_t *ids, size_t cap);

/* The bytes of ids[0..n) concatenated. Returns the byte count (writes at most cap), or an error. */
ITL_TEXT_API int64_t itl_tok_decode(const itl_tok *t, const int32_t *ids, size_t n, uint8_t *out, size_t cap);

/* Sampler: temperature <= 0 or top_k == 1 is greedy (argmax, lowest id on ties); top_k <= 0 and
 * top_p >= 1 disable those filters. NULL on a bad parameter or no memory. */
ITL_TEXT_API itl_sampler *itl_sampler_new(uint64_t seed, double temperature, int32_t top_k, double top_p);
ITL_TEXT_API void itl_sampler_free(itl_sampler *s);
/* The sampled id of logits[0..n), or an error code. */
ITL_TEXT_API int32_t itl_sampler_sample(itl_sampler *s, const float *logits, int32_t n);
/* The next raw 32-bit output of the sampler's PCG32 (for tests of the generator). */
ITL_TEXT_API uint32_t itl_sampler_next_u32(itl_sampler *s);

#ifdef __cplusplus
}
#endif
#endif

/* A generation session of the standalone runtime: the prompt encoded (itl_text.c's tokenizer),
 * prefilled through the native step (itl_step.c) in chunks (itl_prefill), then one sampled token per
 * call (itl_sample.c's sampler), each with the text bytes it adds, cut only at whole UTF-8 characters.
 * C99, libc/libm only. */
#ifndef ITL_GEN_H
#define ITL_GEN_H

#include <stddef.h>
#include <stdint.h>

#include "itl_step.h"
#include "itl_text.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
    ITL_GEN_E_ARG = -1,    /* null argument, bad sampling parameter, or next before start */
    ITL_GEN_E_NOMEM = -2,
    ITL_GEN_E_PROMPT = -3, /* the prompt is not UTF-8 or encodes to no tokens */
    ITL_GEN_E_STEP = -4,   /* the native step refused (itl_strerror) */
    ITL_GEN_E_SAMPLE = -5  /* the sampler refused the logits (no finite logit) */
};

typedef struct itl_gen itl_gen;

/* A session over model m and tokenizer tok (both must outlive it); NULL with a line in err. */
itl_gen *itl_gen_new(const itl_model *m, const itl_tok *tok, char *err, size_t err_len);
void itl_gen_free(itl_gen *g);
/* The native step's activation mode: ITL_ACT_INT8 (default) or ITL_ACT_F32 (exact float activations);
   the mode in use or ITL_GEN_E_ARG (an unknown mode; itl_gen_error says why). */
int itl_gen_set_act(itl_gen *g, int mode);
/* encode prompt (UTF-8), reset state, prefill; sampling as itl_sampler_new (temperature 0 = greedy). 0 or error */
int itl_gen_start(itl_gen *g, const char *prompt, size_t len, double temperature, int top_k, double top_p, uint64_t seed);
/* generate one token: its id (>= 0) or a negative error; *piece and *piece_len: the bytes it adds to the text
   (valid until the next call; may be 0 bytes while a UTF-8 sequence is incomplete) */
int32_t itl_gen_next(itl_gen *g, const char **piece, size_t *piece_len);
int32_t itl_gen_prompt_tokens(const itl_gen *g);
/* The bytes still held back (an incomplete UTF-8 sequence at the end); the session keeps none after. */
void itl_gen_flush(itl_gen *g, const char **piece, size_t *piece_len);
/* The last error's message (one line; "" when none). */
const char *itl_gen_error(const itl_gen *g);

#ifdef __cplusplus
}
#endif
#endif

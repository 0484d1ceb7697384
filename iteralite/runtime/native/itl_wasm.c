/* The WebAssembly build's exported calls (`make wasm` -> web/itl.wasm; web/itl.js wraps them for
   JavaScript). One model, one tokenizer and one generation session per instance, held in statics:
   JavaScript copies the artifact and tokenizer bytes into memory from itl_wasm_alloc, loads them,
   then calls start and next. Every call returns 0 / a token id, or a negative code with one line in
   itl_wasm_error(). Nothing here reads files or the network. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "itl_artifact.h"
#include "itl_gen.h"
#include "itl_step.h"
#include "itl_text.h"

#define EXPORT __attribute__((visibility("default"), used))

static char err[512];
static itl_artifact *art;
static itl_tok *tok;
static itl_gen *gen;
static const char *piece;
static size_t piece_len;
static int started;
static int act_mode = ITL_ACT_INT8; /* the step's activations for every session (itl_wasm_set_exact) */

static int fail(int code, const char *what) {
    snprintf(err, sizeof err, "%s", what);
    return code;
}

static void drop_gen(void) {
    if (gen) itl_gen_free(gen);
    gen = NULL;
    started = 0;
    piece = NULL;
    piece_len = 0;
}

EXPORT void *itl_wasm_alloc(size_t n) { return malloc(n ? n : 1); }
EXPORT void itl_wasm_free(void *p) { free(p); }
EXPORT const char *itl_wasm_error(void) { return err; }

/* Parse and decode an artifact (buf is not kept): 0, or -1 with the reader's line. */
EXPORT int itl_wasm_load_artifact(const uint8_t *buf, size_t len) {
    itl_artifact *a = NULL;
    char why[400] = "";
    drop_gen();
    if (itl_artifact_load(buf, len, &a, why, sizeof why) != 0 || !a) {
        snprintf(err, sizeof err, "%s", why[0] ? why : "not a readable artifact");
        return -1;
    }
    if (art) itl_artifact_free(art);
    art = a;
    return 0;
}

/* Parse a binary tokenizer (buf is copied by itl_tok_load): 0, or -1. */
EXPORT int itl_wasm_load_tokenizer(const uint8_t *buf, size_t len) {
    itl_tok *t = NULL;
    drop_gen();
    int rc = itl_tok_load(buf, len, &t);
    if (rc != 0 || !t) {
        snprintf(err, sizeof err, "not a usable binary tokenizer: %s", itl_text_strerror(rc ? rc : ITL_TEXT_E_CORRUPT));
        return -1;
    }
    if (tok) itl_tok_free(tok);
    tok = t;
    return 0;
}

EXPORT int32_t itl_wasm_vocab(void) { return art ? itl_artifact_model(art)->vocab : -1; }
/* The tokenizer's <|endoftext|> id, or -1 (none, or no tokenizer loaded). */
EXPORT int32_t itl_wasm_eot(void) { return tok ? itl_tok_eot_id(tok) : -1; }

/* The generation session over the loaded model and tokenizer (made once per pair): 0, or -1 when
   they do not fit together (vocabulary sizes) or the step refuses the model. */
EXPORT int itl_wasm_session(void) {
    if (!art) return fail(-1, "no artifact loaded");
    if (!tok) return fail(-1, "no tokenizer loaded");
    if (gen) return 0;
    char why[400] = "";
    gen = itl_gen_new(itl_artifact_model(art), tok, why, sizeof why);
    if (!gen) {
        snprintf(err, sizeof err, "%s", why[0] ? why : "cannot start a generation session");
        return -1;
    }
    itl_gen_set_act(gen, act_mode);
    return 0;
}

/* on != 0: float activations (the step's ITL_ACT_F32, the eager model's arithmetic up to float
   rounding); 0: int8 activations (the default). For this session and the later ones; the next start
   uses it. Returns the mode now set (1 or 0). */
EXPORT int itl_wasm_set_exact(int32_t on) {
    act_mode = on ? ITL_ACT_F32 : ITL_ACT_INT8;
    if (gen) itl_gen_set_act(gen, act_mode);
    return act_mode == ITL_ACT_F32;
}

/* Encode and prefill prompt[0..len) (UTF-8) and set the sampler: temperature 0 is greedy, top_k <= 0
   and top_p >= 1 are off; the 64-bit seed comes in two halves (no BigInt needed in JavaScript). */
EXPORT int itl_wasm_start(const char *prompt, size_t len, double temperature, double top_p, int32_t top_k,
                          uint32_t seed_lo, uint32_t seed_hi) {
    int rc = itl_wasm_session();
    if (rc) return rc;
    started = 0;
    uint64_t seed = ((uint64_t)seed_hi << 32) | seed_lo;
    rc = itl_gen_start(gen, prompt, len, temperature, top_k, top_p, seed);
    if (rc != 0) {
        snprintf(err, sizeof err, "%s", itl_gen_error(gen));
        return rc < 0 ? rc : -rc;
    }
    started = 1;
    return 0;
}

EXPORT int32_t itl_wasm_prompt_tokens(void) { return gen && started ? itl_gen_prompt_tokens(gen) : -1; }

/* One more token: its id, its text bytes at itl_wasm_piece() (itl_wasm_piece_len() of them, maybe 0
   while a UTF-8 sequence is incomplete), or a negative code. */
EXPORT int32_t itl_wasm_next(void) {
    if (!started) return fail(-1, "call start before next");
    piece = NULL;
    piece_len = 0;
    int32_t id = itl_gen_next(gen, &piece, &piece_len);
    if (id < 0) {
        snprintf(err, sizeof err, "%s", itl_gen_error(gen));
        started = 0;
        piece = NULL;
        piece_len = 0;
    }
    return id;
}

/* The bytes still held back at the end of the story (an incomplete UTF-8 sequence): their count, the
   bytes at itl_wasm_piece(). */
EXPORT int32_t itl_wasm_flush(void) {
    piece = NULL;
    piece_len = 0;
    if (gen) itl_gen_flush(gen, &piece, &piece_len);
    return (int32_t)piece_len;
}

EXPORT const char *itl_wasm_piece(void) { return piece; }
EXPORT int32_t itl_wasm_piece_len(void) { return (int32_t)piece_len; }

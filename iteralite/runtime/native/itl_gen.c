/* Generation session (itl_gen.h): prompt -> ids -> one chunked itl_prefill, then sample / step. The
 * token sampled last is stepped at the start of the next call, so the final call does no wasted
 * step. Text pieces hold back the bytes of a UTF-8 sequence until it is complete (or proves
 * invalid: invalid bytes pass through as they are). */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "itl_gen.h"

struct itl_gen {
    const itl_model *m;
    const itl_tok *tok;
    itl_ctx *ctx;
    itl_sampler *sampler;
    float *conv, *ssm, *logits;
    int64_t conv_n, ssm_n;
    int32_t n_prompt, pending; /* pending: the sampled token not yet stepped (-1: none) */
    int ready, greedy; /* greedy: temperature 0 or top-k 1, the argmax taken here */
    uint8_t held[8];
    size_t n_held;
    uint8_t *piece;
    size_t piece_cap;
    char err[256];
};

static int gen_fail(itl_gen *g, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g->err, sizeof g->err, fmt, ap);
    va_end(ap);
    return code;
}

itl_gen *itl_gen_new(const itl_model *m, const itl_tok *tok, char *err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    if (!m || !tok) {
        if (err && err_len) snprintf(err, err_len, "null model or tokenizer");
        return NULL;
    }
    if (itl_tok_vocab_size(tok) != m->vocab) {
        if (err && err_len)
            snprintf(err, err_len, "the model's vocab_size is %d but the tokenizer has %d tokens; pass the tokenizer "
                     "the model was trained with", (int)m->vocab, (int)itl_tok_vocab_size(tok));
        return NULL;
    }
    char why[256];
    if (itl_check_model(m, why, (int)sizeof why)) {
        if (err && err_len) snprintf(err, err_len, "the native step refuses the model: %s", why);
        return NULL;
    }
    itl_gen *g = calloc(1, sizeof *g);
    if (!g) goto nomem;
    g->m = m;
    g->tok = tok;
    g->pending = -1;
    g->ctx = itl_create(m);
    if (!g->ctx || itl_state_sizes(g->ctx, &g->conv_n, &g->ssm_n)) goto nomem;
    g->conv = calloc((size_t)g->conv_n + 1, sizeof *g->conv);
    g->ssm = calloc((size_t)g->ssm_n + 1, sizeof *g->ssm);
    g->logits = calloc((size_t)m->vocab, sizeof *g->logits);
    if (!g->conv || !g->ssm || !g->logits) goto nomem;
    return g;
nomem:
    itl_gen_free(g);
    if (err && err_len) snprintf(err, err_len, "out of memory");
    return NULL;
}

int itl_gen_set_act(itl_gen *g, int mode) {
    if (!g || !g->ctx) return ITL_GEN_E_ARG;
    int rc = itl_set_act(g->ctx, mode);
    return rc < 0 ? gen_fail(g, ITL_GEN_E_ARG, "%s", itl_strerror(-rc)) : rc;
}

void itl_gen_free(itl_gen *g) {
    if (!g) return;
    if (g->ctx) itl_free(g->ctx);
    itl_sampler_free(g->sampler);
    free(g->conv);
    free(g->ssm);
    free(g->logits);
    free(g->piece);
    free(g);
}

static int step(itl_gen *g, int32_t id) {
    int rc = itl_step(g->ctx, id, g->conv, g->conv_n, g->ssm, g->ssm_n, g->logits, g->m->vocab);
    return rc ? gen_fail(g, ITL_GEN_E_STEP, "the native step refused token %d: %s", (int)id, itl_strerror(rc)) : 0;
}

int itl_gen_start(itl_gen *g, const char *prompt, size_t len, double temperature, int top_k, double top_p,
                  uint64_t seed) {
    if (!g) return ITL_GEN_E_ARG;
    g->ready = 0;
    g->err[0] = 0;
    if (!prompt && len) return gen_fail(g, ITL_GEN_E_ARG, "null prompt");
    itl_sampler_free(g->sampler);
    g->sampler = itl_sampler_new(seed, temperature, top_k, top_p);
    if (!g->sampler)
        return gen_fail(g, ITL_GEN_E_ARG, "bad sampling parameters (temperature %g, top-k %d, top-p %g)", temperature,
                        top_k, top_p);
    int32_t *ids = malloc((len + 1) * sizeof *ids);
    if (!ids) return gen_fail(g, ITL_GEN_E_NOMEM, "out of memory");
    int64_t n = itl_tok_encode(g->tok, (const uint8_t *)prompt, len, ids, len + 1);
    if (n < 0) {
        free(ids);
        return gen_fail(g, n == ITL_TEXT_E_UTF8 ? ITL_GEN_E_PROMPT : ITL_GEN_E_ARG, "cannot encode the prompt: %s",
                        itl_text_strerror((int)n));
    }
    if (n == 0) {
        free(ids);
        return gen_fail(g, ITL_GEN_E_PROMPT, "the prompt encodes to no tokens");
    }
    memset(g->conv, 0, (size_t)g->conv_n * sizeof *g->conv);
    memset(g->ssm, 0, (size_t)g->ssm_n * sizeof *g->ssm);
    int rc = n > INT32_MAX ? ITL_ERR_COUNT
                           : itl_prefill(g->ctx, ids, (int)n, g->conv, g->conv_n, g->ssm, g->ssm_n, g->logits,
                                         g->m->vocab, 0); /* the last token's logits */
    free(ids);
    if (rc) return gen_fail(g, ITL_GEN_E_STEP, "the native step refused the prompt: %s", itl_strerror(rc));
    g->n_prompt = (int32_t)n;
    g->greedy = !(temperature > 0.0) || top_k == 1;
    g->pending = -1;
    g->n_held = 0;
    g->ready = 1;
    return 0;
}

/* how many bytes a UTF-8 lead byte announces (0: not a lead byte) */
static size_t utf8_len(uint8_t c) {
    if (c >= 0xC2 && c <= 0xDF) return 2;
    if (c >= 0xE0 && c <= 0xEF) return 3;
    if (c >= 0xF0 && c <= 0xF4) return 4;
    return 0;
}

/* bytes at the end of buf[0..n) that start a UTF-8 sequence still missing bytes */
static size_t incomplete_tail(const uint8_t *buf, size_t n) {
    for (size_t back = 1; back <= 3 && back <= n; back++) {
        uint8_t c = buf[n - back];
        if ((c & 0xC0) == 0x80) continue; /* a continuation byte: look further back */
        size_t want = utf8_len(c);
        return want > back ? back : 0;
    }
    return 0;
}

/* The sampler's greedy choice (the first largest finite logit; ITL_TEXT_E_LOGITS when none), with the
   running maximum in a register rather than re-read through its index each step. */
static int32_t argmax(const float *l, int32_t n) {
    int32_t best = -1;
    float bv = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        float v = l[i];
        if ((best < 0 || v > bv) && v - v == 0.0f) { /* v - v == 0: finite */
            best = i;
            bv = v;
        }
    }
    return best < 0 ? ITL_TEXT_E_LOGITS : best;
}

int32_t itl_gen_next(itl_gen *g, const char **piece, size_t *piece_len) {
    if (!g) return ITL_GEN_E_ARG;
    if (piece) *piece = "";
    if (piece_len) *piece_len = 0;
    if (!g->ready) return gen_fail(g, ITL_GEN_E_ARG, "itl_gen_next before a successful itl_gen_start");
    if (g->pending >= 0) {
        int rc = step(g, g->pending);
        if (rc) {
            g->ready = 0;
            return rc;
        }
        g->pending = -1;
    }
    int32_t id = g->greedy ? argmax(g->logits, g->m->vocab) : itl_sampler_sample(g->sampler, g->logits, g->m->vocab);
    if (id < 0) {
        g->ready = 0;
        return gen_fail(g, ITL_GEN_E_SAMPLE, "the sampler refused the logits: %s", itl_text_strerror(id));
    }
    g->pending = id;
    int64_t nb = itl_tok_decode(g->tok, &id, 1, NULL, 0);
    if (nb < 0) return gen_fail(g, ITL_GEN_E_ARG, "cannot decode token %d: %s", (int)id, itl_text_strerror((int)nb));
    size_t need = g->n_held + (size_t)nb + 1;
    if (need > g->piece_cap) {
        uint8_t *p = realloc(g->piece, need * 2);
        if (!p) return gen_fail(g, ITL_GEN_E_NOMEM, "out of memory");
        g->piece = p;
        g->piece_cap = need * 2;
    }
    memcpy(g->piece, g->held, g->n_held);
    itl_tok_decode(g->tok, &id, 1, g->piece + g->n_held, (size_t)nb);
    size_t total = g->n_held + (size_t)nb, tail = incomplete_tail(g->piece, total);
    memcpy(g->held, g->piece + total - tail, tail);
    g->n_held = tail;
    if (piece) *piece = (const char *)g->piece;
    if (piece_len) *piece_len = total - tail;
    return id;
}

void itl_gen_flush(itl_gen *g, const char **piece, size_t *piece_len) {
    if (piece) *piece = "";
    if (piece_len) *piece_len = 0;
    if (!g || !g->n_held) return;
    if (g->piece_cap < g->n_held) { /* never: the held bytes came out of the piece buffer */
        return;
    }
    memcpy(g->piece, g->held, g->n_held);
    if (piece) *piece = (const char *)g->piece;
    if (piece_len) *piece_len = g->n_held;
    g->n_held = 0;
}

int32_t itl_gen_prompt_tokens(const itl_gen *g) { return g ? g->n_prompt : 0; }

const char *itl_gen_error(const itl_gen *g) { return g ? g->err : "null session"; }

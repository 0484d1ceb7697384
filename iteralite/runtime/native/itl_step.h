/* The native step's public interface: the model layout (mirrored by layout.py for ctypes, filled in C by
   itl_artifact.c) and the exported calls of itl_step.c. */
#ifndef ITL_STEP_H
#define ITL_STEP_H
#include <stdint.h>

enum { ITL_INT = 0, ITL_F16 = 1 };
#define ITL_MAX_EXPERTS 64 /* experts per layer; layout.py refuses more (MAX_EXPERTS) */
enum { ITL_SCALAR = 0, ITL_AVX2 = 1, ITL_AVX512 = 2 }; /* ITL_AVX512: AVX-512 F/BW/VL + VNNI */
enum { ITL_OK = 0, ITL_ERR_NULL = 1, ITL_ERR_CTX = 2, ITL_ERR_TOKEN = 3, ITL_ERR_STATE = 4, ITL_ERR_LOGITS = 5,
       ITL_ERR_COUNT = 6, ITL_ERR_MODEL = 7 };
enum { ITL_ERR_MODE = 8 };                  /* itl_set_act: an unknown activation mode */
enum { ITL_ACT_INT8 = 0, ITL_ACT_F32 = 1 }; /* activations: int8 per block (default) or float (exact) */
#define ITL_MAGIC 0x49544C31u /* "ITL1": a live context */

typedef struct {
    int32_t kind;      /* ITL_INT: codes; ITL_F16: fp16 weights */
    int32_t bits;      /* resident code width: 2, 4 or 8 (ITL_INT) */
    int32_t out, in;   /* weight (out, in) */
    int32_t group;     /* weight group and activation block along `in` (divides in) */
    int32_t rowbytes;  /* bytes of one row of codes: ceil(in * bits / 8) */
    const uint8_t *codes;    /* (out, rowbytes), LSB-first within each byte */
    const uint16_t *scales;  /* fp16 (in / group, out): group-major, 8 rows' scales in a row */
    const uint8_t *zeros;    /* (in / group, out) */
    const uint16_t *w16;     /* fp16 (out, in), ITL_F16 */
} itl_mat;

typedef struct {
    int32_t d_inner, d_conv, h, p, n, r, e, k, f;
    float eps1, eps2;
    const float *norm1, *norm2;
    const float *conv_w, *conv_b; /* (d_inner, d_conv), (d_inner) */
    const float *dt_b, *A, *D;    /* (h) each; A = -exp(A_log) */
    itl_mat in_proj, x_proj, dt_proj, out_proj, router;
    const itl_mat *w1, *w2;       /* e each: (f, d), (d, f) */
} itl_layer;

typedef struct {
    int32_t vocab, d, n_layers, max_in;
    float eps_f;
    const float *norm_f;
    itl_mat emb;  /* (vocab, d), tied head; (vocab, rank) when rank > 0 */
    const itl_layer *layers;
    int32_t rank;               /* 0: dense embedding; r > 0: factorised, the two matrices below */
    itl_mat embed_in, head_proj; /* (d, rank), (rank, d); unread when rank == 0 */
} itl_model;

typedef struct itl_ctx itl_ctx;

int itl_avx2_supported(void);
int itl_avx512_supported(void);
const char *itl_strerror(int code);
int itl_check_model(const itl_model *m, char *why, int why_len);
itl_ctx *itl_create(const itl_model *m);
void itl_free(itl_ctx *c);
int itl_set_isa(itl_ctx *c, int isa);
int itl_get_isa(const itl_ctx *c);
/* Activation mode ITL_ACT_INT8 / ITL_ACT_F32: the mode in use, or -ITL_ERR_MODE / -ITL_ERR_CTX. */
int itl_set_act(itl_ctx *c, int mode);
int itl_get_act(const itl_ctx *c);
int itl_state_sizes(const itl_ctx *c, int64_t *conv_n, int64_t *ssm_n);
int itl_step(itl_ctx *c, int token, float *conv, int64_t conv_n, float *ssm, int64_t ssm_n, float *logits,
             int64_t logits_n);
int itl_greedy(itl_ctx *c, int token, int n, float *conv, int64_t conv_n, float *ssm, int64_t ssm_n, float *logits,
               int64_t logits_n, int32_t *out);
/* n prompt tokens in chunks (each matrix applied to a chunk of tokens at a time): the state as after
   n itl_step calls; logits: the last token's (all == 0, logits_n >= vocab) or every token's
   (all != 0, (n, vocab) row-major, logits_n >= n * vocab). */
int itl_prefill(itl_ctx *c, const int32_t *tokens, int n, float *conv, int64_t conv_n, float *ssm, int64_t ssm_n,
                float *logits, int64_t logits_n, int all);

#endif

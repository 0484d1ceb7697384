/* The model an artifact describes: its stored config (the loader's limits and validation), the
 * tensor list the Python model's state_dict rebuilds from it (the plan), and the itl_model those
 * tensors fill, laid out as layout.py does. Internal to the artifact reader. */
#ifndef ITL_LAYOUT_H
#define ITL_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#include "itl_reader.h"

/* the header's model config (ModelConfig) */
typedef struct {
    int64_t vocab, d, n_layers, d_state, d_conv, headdim, n_heads, dt_rank, n_experts, top_k, d_ff, chunk, rank;
    int64_t *lh, *le, *lf; /* per layer (NULL: uniform) */
} itl_cfg;

typedef struct {
    itl_mat *m;
    int spec_bits, symmetric, groups; /* integer mats: the stored code width, groups per row */
} itl_matinfo;

/* one tensor of the rebuilt state_dict and where its values go */
typedef struct {
    char name[160];
    int dtype, ndim;
    int64_t shape[3], numel;
    uint64_t raw_bytes; /* numel * the dtype's size: its length when stored raw */
    int role;
    itl_matinfo *mi;
    int bits;      /* code views: bits, count */
    int64_t count;
    float *vec;    /* vector destination */
    int vkind;
} itl_tdesc;

typedef struct {
    itl_tdesc *t; /* in state_dict order */
    size_t n, cap;
    itl_matinfo *mis;
    size_t nmi, capmi;
} itl_plan;

/* The config JSON (n bytes) -> *c (per-layer lists owned by the artifact). 0 or a negative code. */
int itl_parse_config(itl_rd *r, const uint8_t *text, size_t n, itl_cfg *c);
/* the weights the config's model holds (the weights-per-byte bound) */
int64_t itl_cfg_weights(const itl_cfg *c);
/* the precision units (embedding [, embed_in, head_proj], per layer 5 + its experts) */
size_t itl_cfg_units(const itl_cfg *c);

/* The plan of the config's model at precisions prec (one character per unit, "t2348h") and group
   size gs; allocates and shapes every matrix and vector of r->a->model. 0 or a negative code. */
int itl_build_plan(itl_rd *r, itl_plan *p, const itl_cfg *c, const char *prec, int64_t gs);
void itl_plan_free(itl_plan *p);
/* the compact layout's identity: the first 8 bytes of sha256 over "name|dtype|shape\n" per tensor,
   as 16 hex digits and a NUL */
void itl_plan_identity(const itl_plan *p, char hex16[17]);
/* Decode one tensor's stored bytes (codec cid) into the model where the plan says. 0 or a negative code. */
int itl_fill_tensor(itl_rd *r, const itl_tdesc *t, int cid, const uint8_t *data, size_t len);

#endif

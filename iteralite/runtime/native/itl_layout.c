/* The model an artifact describes (itl_layout.h): the stored config, checked as the Python loader
 * checks it; the plan, the rebuilt model's state_dict in order (names, dtypes, shapes) with where
 * each tensor goes; and the tensors decoded into the itl_model as layout.py lays them out (codes
 * re-packed per row at 2/4/8 bits, scales and zero-points group-major, fp16 matrices as they are,
 * A = -exp(A_log)). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "itl_codecs.h"
#include "itl_json.h"
#include "itl_layout.h"
#include "itl_sha256.h"

#define F16_BLOCK 64

enum { DT_U8, DT_F16, DT_F32 };
static const char *DT_NAME[] = {"uint8", "float16", "float32"};
static const int DT_SIZE[] = {1, 2, 4};
enum { R_CODES, R_SCALES, R_ZEROS, R_HALF, R_VEC };
enum { V_PLAIN, V_A };

static int64_t cfg_heads(const itl_cfg *c, int i) { return c->lh ? c->lh[i] : c->n_heads; }
static int64_t cfg_experts(const itl_cfg *c, int i) { return c->le ? c->le[i] : c->n_experts; }
static int64_t cfg_ff(const itl_cfg *c, int i) { return c->lf ? c->lf[i] : c->d_ff; }

/* ------------------------------------------------------------------------- the config */

/* the config's integer field: 0 ok / default; negative error */
static int cfg_int(itl_rd *r, const itl_json *j, int32_t obj, const char *key, int64_t limit, int64_t *dst) {
    int32_t v = itl_json_get(j, obj, key);
    if (v < 0) return 0;
    if (!itl_json_isint(j, v))
        return itl_rd_fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.%s' must be an integer", key);
    if (j->nodes[v].big || (limit && j->nodes[v].ival > limit))
        return itl_rd_fail(r, ITL_ART_E_CORRUPT, "config %s = %s is beyond any iteralite model (at most %lld): the file is corrupt or crafted",
                           key, j->nodes[v].big ? "a number of 19+ digits" : "too large", (long long)limit);
    *dst = j->nodes[v].ival;
    return 0;
}

static int cfg_list(itl_rd *r, const itl_json *j, int32_t obj, const char *key, int64_t limit, int64_t n_layers,
                    int64_t **dst) {
    int32_t v = itl_json_get(j, obj, key);
    if (v < 0 || j->nodes[v].type == ITL_J_NULL) return 0;
    if (j->nodes[v].type != ITL_J_ARR)
        return itl_rd_fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.%s' must be a list of integers", key);
    if (j->nodes[v].count > 512)
        return itl_rd_fail(r, ITL_ART_E_CORRUPT, "config %s has %d entries, more than the 512 layers a model may have: the file is corrupt",
                           key, (int)j->nodes[v].count);
    if (j->nodes[v].count != n_layers)
        return itl_rd_fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.%s' needs %lld entries, got %d", key,
                           (long long)n_layers, (int)j->nodes[v].count);
    int64_t *a = itl_rd_alloc(r, (size_t)(n_layers ? n_layers : 1) * sizeof *a);
    if (!a) return itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory");
    int k = 0;
    for (int32_t c = j->nodes[v].first; c >= 0; c = j->nodes[c].next, k++) {
        if (!itl_json_isint(j, c))
            return itl_rd_fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.%s' must be a list of integers", key);
        if (j->nodes[c].big || j->nodes[c].ival > limit)
            return itl_rd_fail(r, ITL_ART_E_CORRUPT, "config %s holds a value beyond any iteralite model (at most %lld): the file is corrupt or crafted",
                               key, (long long)limit);
        if (j->nodes[c].ival < 1)
            return itl_rd_fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.%s' entries must be >= 1", key);
        a[k] = j->nodes[c].ival;
    }
    *dst = a;
    return 0;
}

static const char *CFG_KEYS[] = {"vocab_size", "d_model", "n_layers", "d_state", "d_conv", "headdim", "n_heads",
                                 "dt_rank", "n_experts", "top_k", "d_ff", "chunk_size", "embed_rank",
                                 "layer_n_heads", "layer_n_experts", "layer_d_ff"};

int itl_parse_config(itl_rd *r, const uint8_t *text, size_t n, itl_cfg *c) {
    itl_json j;
    int32_t root = itl_json_parse(&j, text, n);
    int rc = 0;
    if (root < 0) {
        rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "config in header is not valid JSON (%s): the file is corrupt", j.err);
        goto out;
    }
    if (j.nodes[root].type != ITL_J_OBJ) {
        rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: section 'model' must be a mapping");
        goto out;
    }
    for (int32_t m = j.nodes[root].first; m >= 0; m = j.nodes[m].next) {
        int known = 0;
        for (size_t k = 0; k < sizeof CFG_KEYS / sizeof *CFG_KEYS; k++)
            if (j.nodes[m].k_len == strlen(CFG_KEYS[k]) && !memcmp(j.pool + j.nodes[m].k_off, CFG_KEYS[k], j.nodes[m].k_len))
                known = 1;
        if (!known) {
            rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: unknown key 'model.%.*s'",
                             (int)(j.nodes[m].k_len > 60 ? 60 : j.nodes[m].k_len), j.pool + j.nodes[m].k_off);
            goto out;
        }
    }
    *c = (itl_cfg){2000, 128, 4, 16, 4, 32, 8, 8, 4, 2, 256, 32, 0, NULL, NULL, NULL};
    if ((rc = cfg_int(r, &j, root, "vocab_size", 1 << 20, &c->vocab)) || (rc = cfg_int(r, &j, root, "d_model", 1 << 16, &c->d)) ||
        (rc = cfg_int(r, &j, root, "n_layers", 512, &c->n_layers)) || (rc = cfg_int(r, &j, root, "d_state", 1 << 12, &c->d_state)) ||
        (rc = cfg_int(r, &j, root, "d_conv", 1 << 10, &c->d_conv)) || (rc = cfg_int(r, &j, root, "headdim", 1 << 12, &c->headdim)) ||
        (rc = cfg_int(r, &j, root, "n_heads", 1 << 12, &c->n_heads)) || (rc = cfg_int(r, &j, root, "dt_rank", 1 << 16, &c->dt_rank)) ||
        (rc = cfg_int(r, &j, root, "n_experts", 1 << 12, &c->n_experts)) || (rc = cfg_int(r, &j, root, "top_k", 1 << 12, &c->top_k)) ||
        (rc = cfg_int(r, &j, root, "d_ff", 1 << 20, &c->d_ff)) || (rc = cfg_int(r, &j, root, "chunk_size", 1 << 16, &c->chunk)) ||
        (rc = cfg_int(r, &j, root, "embed_rank", 1 << 16, &c->rank)))
        goto out;
    const int64_t *vals[] = {&c->vocab, &c->d, &c->n_layers, &c->d_state, &c->d_conv, &c->headdim, &c->n_heads,
                             &c->dt_rank, &c->n_experts, &c->top_k, &c->d_ff, &c->chunk};
    for (int k = 0; k < 12; k++)
        if (*vals[k] < 1) {
            rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.%s' must be >= 1", CFG_KEYS[k]);
            goto out;
        }
    if ((rc = cfg_list(r, &j, root, "layer_n_heads", 1 << 12, c->n_layers, &c->lh)) ||
        (rc = cfg_list(r, &j, root, "layer_n_experts", 1 << 12, c->n_layers, &c->le)) ||
        (rc = cfg_list(r, &j, root, "layer_d_ff", 1 << 20, c->n_layers, &c->lf)))
        goto out;
    if (c->rank < 0 || c->rank >= c->d) {
        rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.embed_rank' must be 0 (a dense embedding) or in [1, d_model=%lld); got %lld",
                         (long long)c->d, (long long)c->rank);
        goto out;
    }
    if (c->top_k > c->n_experts) {
        rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.top_k' must be <= n_experts (%lld)", (long long)c->n_experts);
        goto out;
    }
    for (int i = 0; i < c->n_layers; i++)
        if (cfg_experts(c, i) < c->top_k) {
            rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.layer_n_experts' layer %d has %lld experts, fewer than top_k=%lld",
                             i, (long long)cfg_experts(c, i), (long long)c->top_k);
            goto out;
        }
out:
    itl_json_free(&j);
    return rc;
}

int64_t itl_cfg_weights(const itl_cfg *c) {
    int64_t d = c->d, W = c->rank ? c->rank : d;
    int64_t total = c->vocab * W + 2 * d * c->rank + d;
    for (int i = 0; i < c->n_layers; i++) {
        int64_t h = cfg_heads(c, i), e = cfg_experts(c, i), f = cfg_ff(c, i), di = h * c->headdim;
        total += 2 * d + d * 2 * di + di * (c->d_conv + 1) + di * (c->dt_rank + 2 * c->d_state) + c->dt_rank * h + h +
                 2 * h + di * d + d * e + 2 * e * f * d;
    }
    return total;
}

size_t itl_cfg_units(const itl_cfg *c) {
    size_t n_units = 1 + (c->rank ? 2 : 0);
    for (int i = 0; i < c->n_layers; i++) n_units += 5 + (size_t)cfg_experts(c, i);
    return n_units;
}

/* ------------------------------------------------------------------------- the plan */

static itl_tdesc *plan_add(itl_plan *p, const char *name, int dtype, int ndim, int64_t s0, int64_t s1, int64_t s2,
                           int role) {
    if (p->n == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 128;
        itl_tdesc *t = realloc(p->t, cap * sizeof *t);
        if (!t) return NULL;
        p->t = t;
        p->cap = cap;
    }
    itl_tdesc *t = &p->t[p->n++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->dtype = dtype;
    t->ndim = ndim;
    t->shape[0] = s0;
    t->shape[1] = s1;
    t->shape[2] = s2;
    t->numel = 1;
    for (int i = 0; i < ndim; i++) t->numel *= t->shape[i];
    t->raw_bytes = (uint64_t)t->numel * (uint64_t)DT_SIZE[dtype];
    t->role = role;
    return t;
}

static int64_t fit_group(int64_t in, int64_t g) {
    if (g < 1) g = 1;
    for (int64_t k = g < in ? g : in; k >= 1; k--)
        if (in % k == 0) return k;
    return 1;
}

static int64_t packed_bytes(int64_t count, int bits) { return (count * bits + 7) / 8; }

/* one stored matrix (out, in) at precision char c: its tensors and its itl_mat */
static int add_mat(itl_rd *r, itl_plan *p, itl_mat *m, const char *prefix, int64_t out, int64_t in, char c, int64_t gs,
                   const char *bias_name, float *bias_dst) {
    char name[160];
    if (bias_name) {
        itl_tdesc *t = plan_add(p, bias_name, DT_F32, 1, out, 0, 0, R_VEC);
        if (!t) return itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory");
        t->vec = bias_dst;
    }
    if (p->nmi == p->capmi) return itl_rd_fail(r, ITL_ART_E_CORRUPT, "internal: matrix table full");
    itl_matinfo *mi = &p->mis[p->nmi++];
    mi->m = m;
    m->out = (int32_t)out;
    m->in = (int32_t)in;
    if (c == 'h') {
        m->kind = ITL_F16;
        m->bits = 16;
        m->group = (int32_t)fit_group(in, F16_BLOCK);
        m->rowbytes = 0;
        snprintf(name, sizeof name, "%s.weight_half", prefix);
        itl_tdesc *t = plan_add(p, name, DT_F16, 2, out, in, 0, R_HALF);
        if (!t) return itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory");
        t->mi = mi;
        m->w16 = itl_rd_alloc(r, (size_t)(out * in) * 2);
        if (!m->w16) return itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory");
        r->a->resident += out * in * 2;
        return 0;
    }
    int bits = c == 't' ? 2 : c - '0';
    int rb = bits == 3 ? 4 : bits;
    int64_t g = fit_group(in, gs), G = in / g;
    mi->spec_bits = bits;
    mi->symmetric = c == 't';
    mi->groups = (int)G;
    m->kind = ITL_INT;
    m->bits = rb;
    m->group = (int32_t)g;
    m->rowbytes = (int32_t)((in * rb + 7) / 8);
    snprintf(name, sizeof name, "%s.weight_codes", prefix);
    itl_tdesc *t = plan_add(p, name, DT_U8, 1, packed_bytes(out * in, bits), 0, 0, R_CODES);
    if (!t) return itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory");
    t->mi = mi;
    t->bits = bits;
    t->count = out * in;
    snprintf(name, sizeof name, "%s.weight_scales", prefix);
    if (!(t = plan_add(p, name, DT_F16, 2, out, G, 0, R_SCALES))) return itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory");
    t->mi = mi;
    if (!mi->symmetric) {
        snprintf(name, sizeof name, "%s.weight_zeros", prefix);
        if (!(t = plan_add(p, name, DT_U8, 1, packed_bytes(out * G, bits), 0, 0, R_ZEROS)))
            return itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory");
        t->mi = mi;
        t->bits = bits;
        t->count = out * G;
    }
    uint8_t *codes = itl_rd_alloc(r, (size_t)(out * m->rowbytes));
    uint16_t *scales = itl_rd_alloc(r, (size_t)(G * out) * 2);
    uint8_t *zeros = itl_rd_alloc(r, (size_t)(G * out));
    if (!codes || !scales || !zeros) return itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory");
    if (mi->symmetric) memset(zeros, 1 << (bits - 1), (size_t)(G * out));
    m->codes = codes;
    m->scales = scales;
    m->zeros = zeros;
    r->a->resident += out * m->rowbytes + G * out * 3;
    return 0;
}

static float *add_vec(itl_rd *r, itl_plan *p, const char *name, int ndim, int64_t s0, int64_t s1, int64_t s2, int vkind) {
    itl_tdesc *t = plan_add(p, name, DT_F32, ndim, s0, s1, s2, R_VEC);
    if (!t) return NULL;
    t->vec = itl_rd_alloc(r, (size_t)t->numel * 4);
    t->vkind = vkind;
    r->a->resident += t->numel * 4;
    return t->vec;
}

#define NOMEM_IF(x) do { if (!(x)) return itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory"); } while (0)

/* The rebuilt model's state_dict, in order (names, dtypes, shapes), with where each tensor goes. */
int itl_build_plan(itl_rd *r, itl_plan *p, const itl_cfg *c, const char *prec, int64_t gs) {
    itl_model *M = &r->a->model;
    char name[160], pre[128];
    int rc;
    size_t u = 0; /* index into the precisions string (units order) */
    int64_t d = c->d, W = c->rank ? c->rank : c->d;
    size_t nmats = 3;
    for (int i = 0; i < c->n_layers; i++) nmats += 5 + 2 * (size_t)cfg_experts(c, i);
    p->mis = calloc(nmats, sizeof *p->mis);
    NOMEM_IF(p->mis);
    p->capmi = nmats;
    M->vocab = (int32_t)c->vocab;
    M->d = (int32_t)d;
    M->n_layers = (int32_t)c->n_layers;
    M->eps_f = 1e-5f;
    M->rank = (int32_t)c->rank;
    if ((rc = add_mat(r, p, &M->emb, "embedding", c->vocab, W, prec[u++], gs, NULL, NULL))) return rc;
    if (c->rank) {
        if ((rc = add_mat(r, p, &M->embed_in, "embed_in", d, c->rank, prec[u++], gs, NULL, NULL))) return rc;
        if ((rc = add_mat(r, p, &M->head_proj, "head_proj", c->rank, d, prec[u++], gs, NULL, NULL))) return rc;
    }
    itl_layer *layers = itl_rd_alloc(r, (size_t)c->n_layers * sizeof *layers);
    NOMEM_IF(layers || !c->n_layers);
    M->layers = layers;
    for (int i = 0; i < c->n_layers; i++) {
        itl_layer *L = &layers[i];
        int64_t h = cfg_heads(c, i), e = cfg_experts(c, i), f = cfg_ff(c, i), di = h * c->headdim;
        L->d_inner = (int32_t)di;
        L->d_conv = (int32_t)c->d_conv;
        L->h = (int32_t)h;
        L->p = (int32_t)c->headdim;
        L->n = (int32_t)c->d_state;
        L->r = (int32_t)c->dt_rank;
        L->e = (int32_t)e;
        L->k = (int32_t)c->top_k;
        L->f = (int32_t)f;
        L->eps1 = L->eps2 = 1e-5f;
        char up_prec = prec[u], xp = prec[u + 1], dtp = prec[u + 2], op = prec[u + 3], rp = prec[u + 4];
        const char *ep = prec + u + 5;
        u += 5 + (size_t)e;
        snprintf(name, sizeof name, "layers.%d.norm1.weight", i);
        NOMEM_IF(L->norm1 = add_vec(r, p, name, 1, d, 0, 0, V_PLAIN));
        snprintf(name, sizeof name, "layers.%d.mixer.A_log", i);
        NOMEM_IF(L->A = add_vec(r, p, name, 1, h, 0, 0, V_A));
        snprintf(name, sizeof name, "layers.%d.mixer.D", i);
        NOMEM_IF(L->D = add_vec(r, p, name, 1, h, 0, 0, V_PLAIN));
        snprintf(pre, sizeof pre, "layers.%d.mixer.in_proj", i);
        if ((rc = add_mat(r, p, &L->in_proj, pre, 2 * di, d, up_prec, gs, NULL, NULL))) return rc;
        snprintf(name, sizeof name, "layers.%d.mixer.conv1d.weight", i);
        NOMEM_IF(L->conv_w = add_vec(r, p, name, 3, di, 1, c->d_conv, V_PLAIN));
        snprintf(name, sizeof name, "layers.%d.mixer.conv1d.bias", i);
        NOMEM_IF(L->conv_b = add_vec(r, p, name, 1, di, 0, 0, V_PLAIN));
        snprintf(pre, sizeof pre, "layers.%d.mixer.x_proj", i);
        if ((rc = add_mat(r, p, &L->x_proj, pre, c->dt_rank + 2 * c->d_state, di, xp, gs, NULL, NULL))) return rc;
        float *dtb = itl_rd_alloc(r, (size_t)h * 4);
        NOMEM_IF(dtb);
        r->a->resident += h * 4;
        L->dt_b = dtb;
        snprintf(pre, sizeof pre, "layers.%d.mixer.dt_proj", i);
        snprintf(name, sizeof name, "layers.%d.mixer.dt_proj.bias", i);
        if ((rc = add_mat(r, p, &L->dt_proj, pre, h, c->dt_rank, dtp, gs, name, dtb))) return rc;
        snprintf(pre, sizeof pre, "layers.%d.mixer.out_proj", i);
        if ((rc = add_mat(r, p, &L->out_proj, pre, d, di, op, gs, NULL, NULL))) return rc;
        snprintf(name, sizeof name, "layers.%d.norm2.weight", i);
        NOMEM_IF(L->norm2 = add_vec(r, p, name, 1, d, 0, 0, V_PLAIN));
        snprintf(pre, sizeof pre, "layers.%d.moe.router", i);
        if ((rc = add_mat(r, p, &L->router, pre, e, d, rp, gs, NULL, NULL))) return rc;
        itl_mat *w1 = itl_rd_alloc(r, (size_t)e * sizeof *w1), *w2 = itl_rd_alloc(r, (size_t)e * sizeof *w2);
        NOMEM_IF(w1 && w2);
        L->w1 = w1;
        L->w2 = w2;
        for (int x = 0; x < e; x++) {
            snprintf(pre, sizeof pre, "layers.%d.moe.experts.w1.%d", i, x);
            if ((rc = add_mat(r, p, &w1[x], pre, f, d, ep[x], gs, NULL, NULL))) return rc;
        }
        for (int x = 0; x < e; x++) {
            snprintf(pre, sizeof pre, "layers.%d.moe.experts.w2.%d", i, x);
            if ((rc = add_mat(r, p, &w2[x], pre, d, f, ep[x], gs, NULL, NULL))) return rc;
        }
    }
    float *nf = add_vec(r, p, "norm_f.weight", 1, d, 0, 0, V_PLAIN);
    NOMEM_IF(nf);
    M->norm_f = nf;
    /* max_in: the widest matrix side and 2 * d_inner (layout.py) */
    int64_t mx = 0;
    for (size_t k = 0; k < p->nmi; k++) {
        const itl_mat *m = p->mis[k].m;
        if (m->in > mx) mx = m->in;
        if (m->out > mx) mx = m->out;
    }
    for (int i = 0; i < c->n_layers; i++)
        if (2 * (int64_t)layers[i].d_inner > mx) mx = 2 * (int64_t)layers[i].d_inner;
    M->max_in = (int32_t)mx;
    return 0;
}

static void shape_text(const itl_tdesc *t, char *out, size_t n, int python_tuple) {
    size_t o = 0;
    if (python_tuple) o += (size_t)snprintf(out + o, n - o, "(");
    for (int i = 0; i < t->ndim && o < n; i++)
        o += (size_t)snprintf(out + o, n - o, python_tuple ? (i ? ", %lld" : "%lld") : (i ? ",%lld" : "%lld"),
                              (long long)t->shape[i]);
    if (python_tuple && o < n) snprintf(out + o, n - o, t->ndim == 1 ? ",)" : ")");
}

void itl_plan_free(itl_plan *p) {
    free(p->t);
    free(p->mis);
    p->t = NULL;
    p->mis = NULL;
}

void itl_plan_identity(const itl_plan *p, char hex16[17]) {
    itl_sha256 s;
    uint8_t dg[32];
    char shp[96];
    itl_sha256_init(&s);
    for (size_t q = 0; q < p->n; q++) {
        const itl_tdesc *t = &p->t[q];
        shape_text(t, shp, sizeof shp, 0);
        itl_sha256_update(&s, t->name, strlen(t->name));
        itl_sha256_update(&s, "|", 1);
        itl_sha256_update(&s, DT_NAME[t->dtype], strlen(DT_NAME[t->dtype]));
        itl_sha256_update(&s, "|", 1);
        itl_sha256_update(&s, shp, strlen(shp));
        itl_sha256_update(&s, "\n", 1);
    }
    itl_sha256_final(&s, dg);
    itl_hex(dg, 8, hex16);
}

/* ------------------------------------------------------------------------- filling the model */

int itl_fill_tensor(itl_rd *r, const itl_tdesc *t, int cid, const uint8_t *data, size_t len) {
    const char *name = t->name;
    int rc = 0;
    if (t->role == R_CODES || t->role == R_ZEROS) {
        uint8_t *codes;
        if ((rc = itl_decode_codes(r, name, cid, data, len, t->bits, t->count, &codes))) return rc;
        const itl_matinfo *mi = t->mi;
        itl_mat *m = mi->m;
        if (t->role == R_CODES) { /* (out, in) codes -> rows of rowbytes at the resident width */
            uint8_t *dst = (uint8_t *)m->codes;
            int rb = m->bits;
            for (int64_t o = 0; o < m->out; o++)
                for (int64_t i = 0; i < m->in; i++) {
                    int64_t bit = i * rb;
                    dst[o * m->rowbytes + bit / 8] |= (uint8_t)(codes[o * m->in + i] << (bit % 8));
                }
        } else { /* zero-points (out, G) -> (G, out) */
            uint8_t *dst = (uint8_t *)m->zeros;
            for (int64_t o = 0; o < m->out; o++)
                for (int64_t g = 0; g < mi->groups; g++) dst[g * m->out + o] = codes[o * mi->groups + g];
        }
        free(codes);
        return 0;
    }
    if (cid == ITL_CODEC_RANS || cid == ITL_CODEC_PREV || cid == ITL_CODEC_ROWS)
        return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' is stored %s but is not an integer code tensor", name,
                           cid == ITL_CODEC_RANS ? "entropy-coded" : itl_codec_name(cid));
    if (cid == ITL_CODEC_F16 && t->dtype != DT_F32)
        return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' is stored as f16 but the model holds a torch.%s tensor", name,
                           DT_NAME[t->dtype]);
    int64_t n = t->numel;
    if (t->dtype == DT_F32 && cid == ITL_CODEC_RAW) {
        if ((rc = itl_decode_f32(r, name, data, n, t->vec))) return rc;
    } else {
        uint16_t *h;
        if ((rc = itl_decode_half(r, name, cid, data, len, n, &h))) return rc;
        if (t->role == R_VEC)
            for (int64_t i = 0; i < n; i++) t->vec[i] = itl_half_to_float(h[i]);
        else if (t->role == R_HALF)
            memcpy((void *)t->mi->m->w16, h, (size_t)n * 2);
        else { /* scales (out, G) -> (G, out) */
            itl_mat *m = t->mi->m;
            uint16_t *dst = (uint16_t *)m->scales;
            int64_t G = t->mi->groups;
            for (int64_t o = 0; o < m->out; o++)
                for (int64_t g = 0; g < G; g++) dst[g * m->out + o] = h[o * G + g];
        }
        free(h);
    }
    if (t->role == R_VEC && t->vkind == V_A) /* A = -exp(A_log), the exp rounded once to float */
        for (int64_t i = 0; i < n; i++) t->vec[i] = -(float)exp((double)t->vec[i]);
    return 0;
}

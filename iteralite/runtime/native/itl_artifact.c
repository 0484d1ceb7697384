/* The artifact reader of the standalone runtime (itl_artifact.h): a compact mixed-precision
 * checkpoint -> itl_model, with the Python loader's checks (iteralite/io/checkpoint.py,
 * io/compact.py) and layout.py's resident layout.
 *
 * Steps, each refusing with one line: the safetensors header (itl_json.c, a bounds-checked JSON
 * parser), format and version, the tensor table, the sha256 checksum over the header fields and
 * tensors (itl_sha256.c), the model config (itl_layout.c: the loader's limits and validation), the
 * quant config ("iteralite-mixed" version 2), the weights-per-byte bound, the compact layout's
 * identity (sha256 of the rebuilt tensor list) and index (base64 varints, itl_codecs.c), then every
 * tensor decoded by its codec (itl_codecs.c: raw, rans, f16, grid, rans-prev, rans-rows; float
 * tensors must be finite) into the model as layout.py lays it out (itl_layout.c), and
 * itl_check_model validates the result. This file: the container, its checks and the API. */
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "itl_artifact.h"
#include "itl_codecs.h"
#include "itl_json.h"
#include "itl_layout.h"
#include "itl_reader.h"
#include "itl_sha256.h"

#define MAX_HEADER (16u * 1024u * 1024u)
#define MAX_FILE ((size_t)1 << 31)
#define WEIGHTS_PER_BYTE 32
#define SMALL_MODEL_WEIGHTS ((int64_t)1 << 20)

/* ------------------------------------------------------------------------- the reading context */

int itl_rd_fail(itl_rd *r, int code, const char *fmt, ...) {
    if (r->err && r->err_len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->err, r->err_len, fmt, ap);
        va_end(ap);
        for (char *p = r->err; *p; p++)
            if (*p == '\n' || *p == '\r') *p = ' '; /* one line */
    }
    return code;
}

void *itl_rd_alloc(itl_rd *r, size_t n) {
    itl_artifact *a = r->a;
    if (a->nblocks == a->cap) {
        size_t cap = a->cap ? 2 * a->cap : 64;
        void **b = realloc(a->blocks, cap * sizeof *b);
        if (!b) return NULL;
        a->blocks = b;
        a->cap = cap;
    }
    void *p = calloc(n ? n : 1, 1);
    if (p) a->blocks[a->nblocks++] = p;
    return p;
}

/* ------------------------------------------------------------------------- the container */

typedef struct {
    const char *name;
    size_t name_len;
    const char *torch;
    int size;
    int64_t shape[8];
    int ndim;
    uint64_t start, end;
} entry_t;

static const struct { const char *st, *torch; int size; } DTYPES[] = {
    {"BOOL", "torch.bool", 1}, {"U8", "torch.uint8", 1}, {"I8", "torch.int8", 1}, {"I16", "torch.int16", 2},
    {"U16", "torch.uint16", 2}, {"F16", "torch.float16", 2}, {"BF16", "torch.bfloat16", 2}, {"I32", "torch.int32", 4},
    {"U32", "torch.uint32", 4}, {"F32", "torch.float32", 4}, {"I64", "torch.int64", 8}, {"U64", "torch.uint64", 8},
    {"F64", "torch.float64", 8}};

static int cmp_bytes(const char *a, size_t an, const char *b, size_t bn) {
    int c = memcmp(a, b, an < bn ? an : bn);
    return c ? c : (an < bn ? -1 : an > bn);
}

typedef struct { const char *k, *v; size_t kn, vn; } field_t;

static int cmp_field(const void *x, const void *y) {
    const field_t *a = x, *b = y;
    return cmp_bytes(a->k, a->kn, b->k, b->kn);
}

static int cmp_entry_name(const void *x, const void *y) {
    const entry_t *a = x, *b = y;
    return cmp_bytes(a->name, a->name_len, b->name, b->name_len);
}

static int cmp_entry_start(const void *x, const void *y) {
    const entry_t *a = x, *b = y;
    return a->start < b->start ? -1 : a->start > b->start;
}

/* the checksum: sha256 over the header fields (sorted, length-prefixed, sha256 excluded) and a digest
   of the tensors (sorted by name: name, dtype, shape, bytes); sorts ents and fields */
static int check_sum(itl_rd *r, const itl_json *hj, int32_t meta, entry_t *ents, size_t ne, field_t *fields, size_t nf,
                     const uint8_t *data) {
    qsort(ents, ne, sizeof *ents, cmp_entry_name);
    itl_sha256 s;
    uint8_t dig[32], sum[32];
    char line[512], sumhex[65];
    itl_sha256_init(&s);
    for (size_t q = 0; q < ne; q++) {
        const entry_t *e = &ents[q];
        size_t o = 0;
        o += (size_t)snprintf(line + o, sizeof line - o, "|%s|(", e->torch);
        for (int i = 0; i < e->ndim && o < sizeof line; i++)
            o += (size_t)snprintf(line + o, sizeof line - o, i ? ", %lld" : "%lld", (long long)e->shape[i]);
        if (o < sizeof line) o += (size_t)snprintf(line + o, sizeof line - o, e->ndim == 1 ? ",)|" : ")|");
        itl_sha256_update(&s, e->name, e->name_len);
        itl_sha256_update(&s, line, o < sizeof line ? o : sizeof line - 1);
        itl_sha256_update(&s, data + e->start, (size_t)(e->end - e->start));
    }
    itl_sha256_final(&s, dig);
    qsort(fields, nf, sizeof *fields, cmp_field);
    static const char TAG[] = "iteralite-checksum-v2";
    size_t nkeep = 0;
    for (size_t q = 0; q < nf; q++) nkeep += !(fields[q].kn == 6 && !memcmp(fields[q].k, "sha256", 6));
    itl_sha256_init(&s);
    itl_sha256_update(&s, TAG, sizeof TAG); /* with its NUL */
    itl_sha256_u64(&s, nkeep);
    for (size_t q = 0; q < nf; q++) {
        if (fields[q].kn == 6 && !memcmp(fields[q].k, "sha256", 6)) continue;
        itl_sha256_u64(&s, fields[q].kn);
        itl_sha256_update(&s, fields[q].k, fields[q].kn);
        itl_sha256_u64(&s, fields[q].vn);
        itl_sha256_update(&s, fields[q].v, fields[q].vn);
    }
    itl_sha256_update(&s, dig, 32);
    itl_sha256_final(&s, sum);
    itl_hex(sum, 32, sumhex);
    int32_t want = itl_json_get(hj, meta, "sha256");
    if (want < 0 || hj->nodes[want].s_len != 64 || memcmp(hj->pool + hj->nodes[want].s_off, sumhex, 64))
        return itl_rd_fail(r, ITL_ART_E_CHECKSUM, "checksum mismatch: header or tensors were changed: the file is corrupt (re-create or re-pull it)");
    return 0;
}

/* the quant config (JSON in the header's "quant" field, node qj; -1: none) for n_units precision units
   -> *prec_out (owned by the artifact), *gs_out */
static int parse_quant(itl_rd *r, const itl_json *hj, int32_t qj, size_t n_units, char **prec_out, int64_t *gs_out) {
    int rc = 0;
    itl_json qp = {0};
    char *prec = NULL;
    int64_t gs = 0;
    int32_t q = qj < 0 ? -1 : itl_json_parse(&qp, (const uint8_t *)hj->pool + hj->nodes[qj].s_off, hj->nodes[qj].s_len);
    if (qj >= 0 && q < 0) rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "quant config in header is not valid JSON (%s): the file is corrupt", qp.err);
    else if (q < 0 || qp.nodes[q].type != ITL_J_OBJ || !qp.nodes[q].count)
        rc = itl_rd_fail(r, ITL_ART_E_UNSUPPORTED, "holds a float model (no quant config); the standalone runtime runs packed mixed-precision artifacts");
    else if (!itl_json_streq(&qp, itl_json_get(&qp, q, "format"), "iteralite-mixed"))
        rc = itl_rd_fail(r, ITL_ART_E_UNSUPPORTED, "its quant config is not of format 'iteralite-mixed'; the standalone runtime runs the mixed-precision artifacts (checkpoints/mixed*.safetensors)");
    else {
        int32_t v = itl_json_get(&qp, q, "version"), g = itl_json_get(&qp, q, "group_size"), p = itl_json_get(&qp, q, "precisions");
        if (!itl_json_isint(&qp, v) || qp.nodes[v].big || qp.nodes[v].ival != 2)
            rc = itl_rd_fail(r, ITL_ART_E_UNSUPPORTED, "mixed quant config version is not 2; the standalone runtime reads version 2");
        else if (!itl_json_isint(&qp, g) || qp.nodes[g].big || qp.nodes[g].ival < 1)
            rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "mixed quant config: group_size is not a positive integer");
        else if (p < 0 || qp.nodes[p].type != ITL_J_STR || qp.nodes[p].s_len != n_units)
            rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "mixed quant config: 'precisions' must be a string of %zu characters (one per unit)", n_units);
        else {
            gs = qp.nodes[g].ival;
            if (!(prec = itl_rd_alloc(r, n_units + 1))) {
                itl_json_free(&qp);
                return itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory");
            }
            memcpy(prec, qp.pool + qp.nodes[p].s_off, n_units);
            prec[n_units] = 0;
            for (size_t u = 0; u < n_units && !rc; u++)
                if (!strchr("t2348h", prec[u]) || !prec[u])
                    rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "mixed quant config: unknown precision character '%c' (known: t2348h)", prec[u]);
        }
    }
    itl_json_free(&qp);
    if (rc) return rc;
    *prec_out = prec;
    *gs_out = gs;
    return 0;
}

/* the compact index (the header's "index" field, node ix) cutting the blob into the plan's tensors,
   each decoded into the model */
static int decode_blob(itl_rd *r, const itl_json *hj, int32_t ix, const itl_plan *plan, const uint8_t *blob,
                       size_t blob_n) {
    if (ix < 0) return itl_rd_fail(r, ITL_ART_E_CORRUPT, "compact layout has no index");
    uint64_t *lens = calloc(plan->n + 1, sizeof *lens);
    int *cids = calloc(plan->n + 1, sizeof *cids);
    int rc = 0;
    if (!lens || !cids) {
        rc = itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory");
        goto out;
    }
    if ((rc = itl_read_index(r, hj->pool + hj->nodes[ix].s_off, hj->nodes[ix].s_len, plan->n, cids, lens))) goto out;
    uint64_t total = 0;
    for (size_t q = 0; q < plan->n; q++) {
        const itl_tdesc *t = &plan->t[q];
        if (cids[q] >= ITL_N_CODECS) {
            rc = itl_rd_fail(r, ITL_ART_E_UNSUPPORTED, "compact index: tensor '%s' has codec id %d; this reader knows 0 (raw), 1 (rans), 2 (f16), 3 (grid), 4 (rans-prev), 5 (rans-rows)",
                             t->name, cids[q]);
            goto out;
        }
        int implied = cids[q] == ITL_CODEC_RAW || cids[q] == ITL_CODEC_F16;
        if (implied && lens[q]) {
            rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "compact index: tensor '%s' is stored %s but its entry carries a length (%llu); the stored config implies it",
                             t->name, itl_codec_name(cids[q]), (unsigned long long)lens[q]);
            goto out;
        }
        if (cids[q] == ITL_CODEC_RAW) lens[q] = t->raw_bytes;
        if (cids[q] == ITL_CODEC_F16) lens[q] = 2 * (uint64_t)t->numel;
        if (lens[q] > blob_n) total = UINT64_MAX / 2; /* covers more than the blob: refused below */
        else if (total < UINT64_MAX / 4) total += lens[q];
    }
    if (total != blob_n) {
        rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "compact index covers %llu bytes; the blob holds %zu", (unsigned long long)total, blob_n);
        goto out;
    }
    for (size_t q = 0, at = 0; q < plan->n; q++) {
        if ((rc = itl_fill_tensor(r, &plan->t[q], cids[q], blob + at, (size_t)lens[q]))) goto out;
        at += (size_t)lens[q];
    }
out:
    free(lens);
    free(cids);
    return rc;
}

/* the whole file in memory -> r->a (the container, its checksum, then the model) */
static int load(itl_rd *r, const uint8_t *buf, size_t size) {
    int rc = 0;
    itl_json hj = {0};
    entry_t *ents = NULL;
    field_t *fields = NULL;
    itl_plan plan = {0};

    if (size < 8) return itl_rd_fail(r, ITL_ART_E_TRUNCATED, "file is empty or truncated (%zu bytes): not an iteralite checkpoint", size);
    uint64_t n = 0;
    for (int i = 0; i < 8; i++) n |= (uint64_t)buf[i] << (8 * i);
    if (n > size - 8 || n > MAX_HEADER)
        return itl_rd_fail(r, ITL_ART_E_FORMAT, "not a safetensors file or truncated (header claims %llu bytes, file has %zu); iteralite checkpoints are safetensors files written by its stages",
                           (unsigned long long)n, size);
    int32_t root = itl_json_parse(&hj, buf + 8, (size_t)n);
    if (root < 0) { rc = itl_rd_fail(r, ITL_ART_E_FORMAT, "header is not valid JSON (%s): the file is corrupt", hj.err); goto out; }
    if (hj.nodes[root].type != ITL_J_OBJ) { rc = itl_rd_fail(r, ITL_ART_E_FORMAT, "header is not a JSON object: the file is corrupt"); goto out; }
    /* tensor entries and metadata */
    int32_t meta = -1;
    size_t ne = 0;
    ents = calloc((size_t)hj.nodes[root].count + 1, sizeof *ents);
    if (!ents) { rc = itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory"); goto out; }
    uint64_t end = 0;
    for (int32_t m = hj.nodes[root].first; m >= 0; m = hj.nodes[m].next) {
        const char *key = hj.pool + hj.nodes[m].k_off;
        size_t kl = hj.nodes[m].k_len;
        if (kl == 12 && !memcmp(key, "__metadata__", 12)) { meta = m; continue; }
        int32_t off = itl_json_get(&hj, m, "data_offsets");
        int32_t a = off >= 0 && hj.nodes[off].type == ITL_J_ARR && hj.nodes[off].count == 2 ? hj.nodes[off].first : -1;
        if (a < 0 || !itl_json_isint(&hj, a) || !itl_json_isint(&hj, hj.nodes[a].next) || hj.nodes[a].big ||
            hj.nodes[hj.nodes[a].next].big || hj.nodes[a].ival < 0 || hj.nodes[hj.nodes[a].next].ival < 0) {
            rc = itl_rd_fail(r, ITL_ART_E_FORMAT, "header entry '%.*s' is malformed: the file is corrupt", (int)(kl > 60 ? 60 : kl), key);
            goto out;
        }
        entry_t *e = &ents[ne++];
        e->name = key;
        e->name_len = kl;
        e->start = (uint64_t)hj.nodes[a].ival;
        e->end = (uint64_t)hj.nodes[hj.nodes[a].next].ival;
        if (e->end > end) end = e->end;
    }
    if (8 + n + end != size) {
        rc = itl_rd_fail(r, ITL_ART_E_TRUNCATED, "truncated or padded: expected %llu bytes, found %zu",
                         (unsigned long long)(8 + n + end), size);
        goto out;
    }
    if (meta >= 0 && hj.nodes[meta].type != ITL_J_OBJ) { rc = itl_rd_fail(r, ITL_ART_E_FORMAT, "header metadata is malformed: the file is corrupt"); goto out; }
    size_t nf = 0;
    fields = calloc(meta >= 0 ? (size_t)hj.nodes[meta].count + 1 : 1, sizeof *fields);
    if (!fields) { rc = itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory"); goto out; }
    if (meta >= 0)
        for (int32_t m = hj.nodes[meta].first; m >= 0; m = hj.nodes[m].next) {
            if (hj.nodes[m].type != ITL_J_STR) { rc = itl_rd_fail(r, ITL_ART_E_FORMAT, "header metadata is malformed: the file is corrupt"); goto out; }
            fields[nf++] = (field_t){hj.pool + hj.nodes[m].k_off, hj.pool + hj.nodes[m].s_off, hj.nodes[m].k_len, hj.nodes[m].s_len};
        }
#define META(name) itl_json_get(&hj, meta, name)
    int32_t fmt = META("format");
    if (!itl_json_streq(&hj, fmt, "iteralite")) {
        rc = itl_rd_fail(r, ITL_ART_E_FORMAT, "format is %s%.*s%s, expected 'iteralite': not an iteralite checkpoint", fmt < 0 ? "None" : "'",
                         fmt < 0 ? 0 : (int)(hj.nodes[fmt].s_len > 40 ? 40 : hj.nodes[fmt].s_len), fmt < 0 ? "" : hj.pool + hj.nodes[fmt].s_off,
                         fmt < 0 ? "" : "'");
        goto out;
    }
    int32_t ver = META("version");
    if (!itl_json_streq(&hj, ver, "2")) {
        rc = itl_rd_fail(r, ITL_ART_E_VERSION, "checkpoint format version %s%.*s%s; this iteralite reads version 2. Re-create it with `dvc repro` using this version of the code",
                         ver < 0 ? "None" : "'", ver < 0 ? 0 : (int)(hj.nodes[ver].s_len > 20 ? 20 : hj.nodes[ver].s_len),
                         ver < 0 ? "" : hj.pool + hj.nodes[ver].s_off, ver < 0 ? "" : "'");
        goto out;
    }
    /* the tensor table, as safetensors validates it */
    size_t k = 0;
    for (int32_t m = hj.nodes[root].first; m >= 0; m = hj.nodes[m].next) {
        if (m == meta) continue;
        entry_t *e = &ents[k++];
        int32_t dt = itl_json_get(&hj, m, "dtype"), sh = itl_json_get(&hj, m, "shape");
        e->torch = NULL;
        for (size_t q = 0; dt >= 0 && q < sizeof DTYPES / sizeof *DTYPES; q++)
            if (itl_json_streq(&hj, dt, DTYPES[q].st)) { e->torch = DTYPES[q].torch; e->size = DTYPES[q].size; }
        if (!e->torch || sh < 0 || hj.nodes[sh].type != ITL_J_ARR || hj.nodes[sh].count > 8) {
            rc = itl_rd_fail(r, ITL_ART_E_FORMAT, "cannot read tensors (entry '%.*s' has an unknown dtype or a bad shape): the file is corrupt",
                             (int)(e->name_len > 60 ? 60 : e->name_len), e->name);
            goto out;
        }
        uint64_t numel = 1, cap_numel = (uint64_t)1 << 60; /* saturating: bytes = numel * size never wraps */
        int zero = 0;
        for (int32_t c = hj.nodes[sh].first; c >= 0; c = hj.nodes[c].next) {
            if (!itl_json_isint(&hj, c) || hj.nodes[c].big || hj.nodes[c].ival < 0) {
                rc = itl_rd_fail(r, ITL_ART_E_FORMAT, "cannot read tensors (entry '%.*s' has a bad shape): the file is corrupt",
                                 (int)(e->name_len > 60 ? 60 : e->name_len), e->name);
                goto out;
            }
            uint64_t dim = (uint64_t)hj.nodes[c].ival;
            e->shape[e->ndim++] = hj.nodes[c].ival;
            zero |= dim == 0;
            numel = dim && numel > cap_numel / dim ? cap_numel : numel * dim;
        }
        if (zero) numel = 0;
        if (e->end < e->start || e->end - e->start != numel * (uint64_t)e->size) {
            rc = itl_rd_fail(r, ITL_ART_E_FORMAT, "cannot read tensors (entry '%.*s': its offsets do not fit its dtype and shape): the file is corrupt",
                             (int)(e->name_len > 60 ? 60 : e->name_len), e->name);
            goto out;
        }
    }
    qsort(ents, ne, sizeof *ents, cmp_entry_start);
    for (size_t q = 0, at = 0; q < ne; q++) {
        if (ents[q].start != at) {
            rc = itl_rd_fail(r, ITL_ART_E_FORMAT, "cannot read tensors (their data is not contiguous): the file is corrupt");
            goto out;
        }
        at = ents[q].end;
    }
    const uint8_t *data = buf + 8 + n;
    if ((rc = check_sum(r, &hj, meta, ents, ne, fields, nf, data))) goto out;
    /* config, quant config, layout */
    int32_t cj = META("config");
    if (cj < 0) { rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: the header has no config field"); goto out; }
    itl_cfg cfg;
    if ((rc = itl_parse_config(r, (const uint8_t *)hj.pool + hj.nodes[cj].s_off, hj.nodes[cj].s_len, &cfg))) goto out;
    int32_t tsha = META("tokenizer_sha256");
    if (tsha >= 0 && hj.nodes[tsha].s_len < sizeof r->a->tok_sha)
        snprintf(r->a->tok_sha, sizeof r->a->tok_sha, "%.*s", (int)hj.nodes[tsha].s_len, hj.pool + hj.nodes[tsha].s_off);
    char *prec = NULL;
    int64_t gs = 0;
    if ((rc = parse_quant(r, &hj, META("quant"), itl_cfg_units(&cfg), &prec, &gs))) goto out;
    int32_t lay = META("layout");
    if (!itl_json_streq(&hj, lay, "compact-v3")) {
        rc = itl_rd_fail(r, ITL_ART_E_UNSUPPORTED, "tensor layout is not 'compact-v3'; the standalone runtime reads compact artifacts (the mixed-precision stage writes them)");
        goto out;
    }
    if (ne != 1 || ents[0].name_len != 4 || memcmp(ents[0].name, "blob", 4)) {
        rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "compact layout holds %zu tensors, expected only 'blob'", ne);
        goto out;
    }
    if (strcmp(ents[0].torch, "torch.uint8") || ents[0].ndim != 1) {
        rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "compact blob is %s of %d dimensions, expected 1-D uint8", ents[0].torch, ents[0].ndim);
        goto out;
    }
    const uint8_t *blob = data + ents[0].start;
    size_t blob_n = (size_t)(ents[0].end - ents[0].start);
    int64_t weights = itl_cfg_weights(&cfg);
    int64_t cap = (int64_t)blob_n * WEIGHTS_PER_BYTE;
    if (weights > (cap > SMALL_MODEL_WEIGHTS ? cap : SMALL_MODEL_WEIGHTS)) {
        rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "tensors disagree with the stored config: it describes a model of %lld weights but the file holds %zu values (%zu bytes); the file is corrupt or was altered (re-create it with `dvc repro`)",
                         (long long)weights, blob_n, blob_n);
        goto out;
    }
    /* the rebuilt tensor list: identity */
    if ((rc = itl_build_plan(r, &plan, &cfg, prec, gs))) goto out;
    {
        int32_t id = META("identity");
        if (id < 0) {
            rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "compact layout has no 'identity' field: the file was not written by iteralite; re-create it with `dvc repro`");
            goto out;
        }
        char hx[17];
        itl_plan_identity(&plan, hx);
        if (hj.nodes[id].s_len != 16 || memcmp(hj.pool + hj.nodes[id].s_off, hx, 16)) {
            rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "compact layout: the file's tensor list (names, dtypes, shapes in order) does not match this code's model; rebuild it with `dvc repro`");
            goto out;
        }
    }
    if ((rc = decode_blob(r, &hj, META("index"), &plan, blob, blob_n))) goto out;
    char why[256];
    if (itl_check_model(&r->a->model, why, (int)sizeof why)) {
        rc = itl_rd_fail(r, ITL_ART_E_MODEL, "the native step refuses the decoded model: %s", why);
        goto out;
    }
out:
    itl_json_free(&hj);
    free(ents);
    free(fields);
    itl_plan_free(&plan);
    return rc;
}

/* ------------------------------------------------------------------------- API */

void itl_artifact_free(itl_artifact *a) {
    if (!a) return;
    for (size_t i = 0; i < a->nblocks; i++) free(a->blocks[i]);
    free(a->blocks);
    free(a);
}

int itl_artifact_load(const uint8_t *buf, size_t len, itl_artifact **out, char *err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    if (out) *out = NULL;
    itl_rd r = {err, err_len, NULL};
    if (!buf || !out) return itl_rd_fail(&r, ITL_ART_E_ARG, "null argument");
    r.a = calloc(1, sizeof *r.a);
    if (!r.a) return itl_rd_fail(&r, ITL_ART_E_NOMEM, "out of memory");
    int rc = load(&r, buf, len);
    if (rc) {
        itl_artifact_free(r.a);
        return rc;
    }
    *out = r.a;
    return 0;
}

int itl_artifact_load_file(const char *path, itl_artifact **out, char *err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    if (out) *out = NULL;
    itl_rd r = {err, err_len, NULL};
    if (!path || !out) return itl_rd_fail(&r, ITL_ART_E_ARG, "null argument");
    struct stat st;
    if (stat(path, &st)) return itl_rd_fail(&r, ITL_ART_E_IO, "%s: cannot open the artifact: %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) return itl_rd_fail(&r, ITL_ART_E_IO, "%s: is a directory, not an artifact file", path);
    if (!S_ISREG(st.st_mode)) return itl_rd_fail(&r, ITL_ART_E_IO, "%s: is not a regular file", path);
    if ((uint64_t)st.st_size > MAX_FILE) return itl_rd_fail(&r, ITL_ART_E_FORMAT, "%s: is %lld bytes, too large to be an artifact", path, (long long)st.st_size);
    FILE *f = fopen(path, "rb");
    if (!f) return itl_rd_fail(&r, ITL_ART_E_IO, "%s: cannot open the artifact: %s", path, strerror(errno));
    size_t cap = (size_t)st.st_size + 1, n = 0;
    uint8_t *buf = malloc(cap);
    if (!buf) { fclose(f); return itl_rd_fail(&r, ITL_ART_E_NOMEM, "%s: out of memory", path); }
    n = fread(buf, 1, cap, f);
    int bad = ferror(f);
    fclose(f);
    if (bad) { free(buf); return itl_rd_fail(&r, ITL_ART_E_IO, "%s: cannot read the artifact", path); }
    char why[1024];
    int rc = itl_artifact_load(buf, n, out, why, sizeof why);
    free(buf);
    if (rc) return itl_rd_fail(&r, rc, "%s: %s", path, why);
    return 0;
}

const itl_model *itl_artifact_model(const itl_artifact *a) { return a ? &a->model : NULL; }

const char *itl_artifact_tokenizer_sha256(const itl_artifact *a) { return a ? a->tok_sha : ""; }

int64_t itl_artifact_resident_bytes(const itl_artifact *a) { return a ? a->resident : 0; }

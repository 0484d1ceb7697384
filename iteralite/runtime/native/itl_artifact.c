/* The artifact reader of the standalone runtime (itl_artifact.h): a compact mixed-precision
 * checkpoint -> itl_model, with the Python loader's checks (iteralite/io/checkpoint.py,
 * io/compact.py) and layout.py's resident layout.
 *
 * Steps, each refusing with one line: the safetensors header (our own bounds-checked JSON parser),
 * format and version, the tensor table, the sha256 checksum over the header fields and tensors,
 * the model config (the loader's limits and validation), the quant config ("iteralite-mixed"
 * version 2), the weights-per-byte bound, the compact layout's identity (sha256 of the rebuilt
 * tensor list) and index (base64 varints), then every tensor decoded by its codec: raw, rans
 * (itl_rans.c), f16, grid (io/grid.py), rans-prev and rans-rows (quant/context.py); float tensors
 * must be finite. The decoded tensors are laid out as layout.py does (codes re-packed per row at
 * 2/4/8 bits, scales and zero-points group-major, fp16 matrices as they are, A = -exp(A_log)),
 * and itl_check_model validates the result. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "itl_artifact.h"

/* itl_rans.c */
int itl_rans_decode(const uint8_t *blob, size_t len, uint8_t *out, uint64_t cap, uint64_t *n_out);

#define MAX_HEADER (16u * 1024u * 1024u)
#define MAX_FILE ((size_t)1 << 31)
#define JSON_MAX_DEPTH 64
#define JSON_MAX_MEMBERS 4096
#define JSON_MAX_NODES (1 << 20) /* real headers hold a few hundred values */
#define N_CODECS 6
#define MAX_COUNT ((int64_t)1 << 26)
#define MAX_GROUPS (1 << 16)
#define F16_BLOCK 64
#define WEIGHTS_PER_BYTE 32
#define SMALL_MODEL_WEIGHTS ((int64_t)1 << 20)

static const char *CODEC_NAMES[N_CODECS] = {"raw", "rans", "f16", "grid", "rans-prev", "rans-rows"};
enum { C_RAW = 0, C_RANS = 1, C_F16 = 2, C_GRID = 3, C_PREV = 4, C_ROWS = 5 };

struct itl_artifact {
    itl_model model;
    void **blocks;
    size_t nblocks, cap;
    int64_t resident;
    char tok_sha[72];
};

typedef struct {
    char *err;
    size_t err_len;
    itl_artifact *a;
} rd_t;

static int fail(rd_t *r, int code, const char *fmt, ...) {
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

static void *xalloc(rd_t *r, size_t n) {
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

/* ------------------------------------------------------------------------- sha256 */

typedef struct {
    uint32_t h[8];
    uint64_t n;
    uint8_t buf[64];
    size_t fill;
} sha256_t;

static const uint32_t SHA_K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
    0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
    0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
    0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

#define ROR(x, k) (((x) >> (k)) | ((x) << (32 - (k))))

static void sha_block(sha256_t *s, const uint8_t *p) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3], e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + SHA_K[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d;
    s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}

static void sha_init(sha256_t *s) {
    static const uint32_t H0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, H0, sizeof H0);
    s->n = 0;
    s->fill = 0;
}

static void sha_update(sha256_t *s, const void *data, size_t len) {
    const uint8_t *p = data;
    s->n += len;
    while (len) {
        if (s->fill == 0 && len >= 64) {
            sha_block(s, p);
            p += 64;
            len -= 64;
            continue;
        }
        size_t k = 64 - s->fill < len ? 64 - s->fill : len;
        memcpy(s->buf + s->fill, p, k);
        s->fill += k;
        p += k;
        len -= k;
        if (s->fill == 64) {
            sha_block(s, s->buf);
            s->fill = 0;
        }
    }
}

static void sha_final(sha256_t *s, uint8_t out[32]) {
    uint64_t bits = s->n * 8;
    uint8_t pad = 0x80, zero = 0, len[8];
    sha_update(s, &pad, 1);
    while (s->fill != 56) sha_update(s, &zero, 1);
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha_update(s, len, 8);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(s->h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(s->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(s->h[i] >> 8);
        out[4 * i + 3] = (uint8_t)s->h[i];
    }
}

static void hex(const uint8_t *d, size_t n, char *out) {
    static const char *H = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = H[d[i] >> 4];
        out[2 * i + 1] = H[d[i] & 15];
    }
    out[2 * n] = 0;
}

static void sha_u64(sha256_t *s, uint64_t v) { /* struct.pack("<Q") */
    uint8_t b[8];
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)(v >> (8 * i));
    sha_update(s, b, 8);
}

/* ------------------------------------------------------------------------- JSON */

enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ };

typedef struct {
    int type;
    int is_int, big, bval; /* numbers: an integer literal (big: beyond int64) */
    int64_t ival;
    size_t s_off, s_len;   /* strings: the decoded bytes in the pool */
    size_t k_off, k_len;   /* object members: the key */
    int32_t first, next, count; /* containers: first child; siblings */
} jnode;

typedef struct {
    const uint8_t *p;
    size_t n, pos;
    jnode *nodes;
    size_t nn, cap;
    char *pool;
    size_t pn;
    const char *err;
} json_t;

static void json_free(json_t *j) {
    free(j->nodes);
    free(j->pool);
    j->nodes = NULL;
    j->pool = NULL;
}

static int utf8_valid(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) { i++; continue; }
        int k;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) { k = 1; cp = c & 0x1F; }
        else if (c >= 0xE0 && c <= 0xEF) { k = 2; cp = c & 0x0F; }
        else if (c >= 0xF0 && c <= 0xF4) { k = 3; cp = c & 0x07; }
        else return 0;
        if (n - i <= (size_t)k) return 0;
        for (int t = 1; t <= k; t++) {
            if ((s[i + t] & 0xC0) != 0x80) return 0;
            cp = cp << 6 | (s[i + t] & 0x3F);
        }
        if ((k == 2 && cp < 0x800) || (k == 3 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += (size_t)k + 1;
    }
    return 1;
}

static int32_t j_new(json_t *j, int type) {
    if (j->nn == j->cap) {
        size_t cap = j->cap ? 2 * j->cap : 64;
        jnode *n = realloc(j->nodes, cap * sizeof *n);
        if (!n) { j->err = "out of memory"; return -1; }
        j->nodes = n;
        j->cap = cap;
    }
    if (j->nn >= JSON_MAX_NODES) { j->err = "too many values"; return -1; }
    jnode *x = &j->nodes[j->nn];
    memset(x, 0, sizeof *x);
    x->type = type;
    x->first = x->next = -1;
    return (int32_t)j->nn++;
}

static void j_ws(json_t *j) {
    while (j->pos < j->n && (j->p[j->pos] == ' ' || j->p[j->pos] == '\t' || j->p[j->pos] == '\n' || j->p[j->pos] == '\r'))
        j->pos++;
}

static int hex4(const uint8_t *p, uint32_t *v) {
    uint32_t x = 0;
    for (int i = 0; i < 4; i++) {
        uint8_t c = p[i];
        x <<= 4;
        if (c >= '0' && c <= '9') x |= c - '0';
        else if (c >= 'a' && c <= 'f') x |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') x |= c - 'A' + 10;
        else return 0;
    }
    *v = x;
    return 1;
}

static void put_utf8(json_t *j, uint32_t cp) {
    char *o = j->pool + j->pn;
    if (cp < 0x80) { o[0] = (char)cp; j->pn += 1; }
    else if (cp < 0x800) { o[0] = (char)(0xC0 | cp >> 6); o[1] = (char)(0x80 | (cp & 0x3F)); j->pn += 2; }
    else if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12); o[1] = (char)(0x80 | (cp >> 6 & 0x3F)); o[2] = (char)(0x80 | (cp & 0x3F));
        j->pn += 3;
    } else {
        o[0] = (char)(0xF0 | cp >> 18); o[1] = (char)(0x80 | (cp >> 12 & 0x3F));
        o[2] = (char)(0x80 | (cp >> 6 & 0x3F)); o[3] = (char)(0x80 | (cp & 0x3F));
        j->pn += 4;
    }
}

/* a string at j->pos (the opening quote) -> its decoded bytes in the pool (never longer than the source) */
static int j_string(json_t *j, size_t *off, size_t *len) {
    j->pos++;
    *off = j->pn;
    for (;;) {
        if (j->pos >= j->n) { j->err = "unterminated string"; return 0; }
        uint8_t c = j->p[j->pos];
        if (c == '"') { j->pos++; break; }
        if (c < 0x20) { j->err = "control character in a string"; return 0; }
        if (c != '\\') { j->pool[j->pn++] = (char)c; j->pos++; continue; }
        if (j->pos + 1 >= j->n) { j->err = "unterminated string"; return 0; }
        uint8_t e = j->p[j->pos + 1];
        j->pos += 2;
        switch (e) {
        case '"': j->pool[j->pn++] = '"'; break;
        case '\\': j->pool[j->pn++] = '\\'; break;
        case '/': j->pool[j->pn++] = '/'; break;
        case 'b': j->pool[j->pn++] = '\b'; break;
        case 'f': j->pool[j->pn++] = '\f'; break;
        case 'n': j->pool[j->pn++] = '\n'; break;
        case 'r': j->pool[j->pn++] = '\r'; break;
        case 't': j->pool[j->pn++] = '\t'; break;
        case 'u': {
            uint32_t cp, lo;
            if (j->pos + 4 > j->n || !hex4(j->p + j->pos, &cp)) { j->err = "bad \\u escape"; return 0; }
            j->pos += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (j->pos + 6 > j->n || j->p[j->pos] != '\\' || j->p[j->pos + 1] != 'u' ||
                    !hex4(j->p + j->pos + 2, &lo) || lo < 0xDC00 || lo > 0xDFFF) {
                    j->err = "lone surrogate in a \\u escape";
                    return 0;
                }
                j->pos += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                j->err = "lone surrogate in a \\u escape";
                return 0;
            }
            put_utf8(j, cp);
            break;
        }
        default: j->err = "bad escape in a string"; return 0;
        }
    }
    *len = j->pn - *off;
    return 1;
}

static int32_t j_value(json_t *j, int depth);

static int32_t j_number(json_t *j) {
    int neg = 0, is_int = 1, big = 0;
    int64_t v = 0;
    if (j->p[j->pos] == '-') { neg = 1; j->pos++; }
    if (j->pos >= j->n || j->p[j->pos] < '0' || j->p[j->pos] > '9') { j->err = "bad number"; return -1; }
    if (j->p[j->pos] == '0') j->pos++;
    else
        while (j->pos < j->n && j->p[j->pos] >= '0' && j->p[j->pos] <= '9') {
            int d = j->p[j->pos++] - '0';
            if (v > (INT64_MAX - d) / 10) big = 1;
            else v = v * 10 + d;
        }
    if (j->pos < j->n && j->p[j->pos] == '.') {
        is_int = 0;
        j->pos++;
        if (j->pos >= j->n || j->p[j->pos] < '0' || j->p[j->pos] > '9') { j->err = "bad number"; return -1; }
        while (j->pos < j->n && j->p[j->pos] >= '0' && j->p[j->pos] <= '9') j->pos++;
    }
    if (j->pos < j->n && (j->p[j->pos] == 'e' || j->p[j->pos] == 'E')) {
        is_int = 0;
        j->pos++;
        if (j->pos < j->n && (j->p[j->pos] == '+' || j->p[j->pos] == '-')) j->pos++;
        if (j->pos >= j->n || j->p[j->pos] < '0' || j->p[j->pos] > '9') { j->err = "bad number"; return -1; }
        while (j->pos < j->n && j->p[j->pos] >= '0' && j->p[j->pos] <= '9') j->pos++;
    }
    int32_t id = j_new(j, J_NUM);
    if (id < 0) return -1;
    j->nodes[id].is_int = is_int;
    j->nodes[id].big = big;
    j->nodes[id].ival = neg ? -v : v;
    return id;
}

static int j_lit(json_t *j, const char *w) {
    size_t k = strlen(w);
    if (j->n - j->pos < k || memcmp(j->p + j->pos, w, k)) return 0;
    j->pos += k;
    return 1;
}

static int32_t j_value(json_t *j, int depth) {
    if (depth > JSON_MAX_DEPTH) { j->err = "nested too deeply"; return -1; }
    j_ws(j);
    if (j->pos >= j->n) { j->err = "unexpected end"; return -1; }
    uint8_t c = j->p[j->pos];
    if (c == '{' || c == '[') {
        int obj = c == '{';
        int32_t id = j_new(j, obj ? J_OBJ : J_ARR), last = -1;
        if (id < 0) return -1;
        j->pos++;
        j_ws(j);
        if (j->pos < j->n && j->p[j->pos] == (obj ? '}' : ']')) { j->pos++; return id; }
        for (;;) {
            size_t ko = 0, kl = 0;
            if (obj) {
                j_ws(j);
                if (j->pos >= j->n || j->p[j->pos] != '"') { j->err = "expected a key"; return -1; }
                if (!j_string(j, &ko, &kl)) return -1;
                j_ws(j);
                if (j->pos >= j->n || j->p[j->pos] != ':') { j->err = "expected ':'"; return -1; }
                j->pos++;
            }
            int32_t child = j_value(j, depth + 1);
            if (child < 0) return -1;
            j->nodes[child].k_off = ko;
            j->nodes[child].k_len = kl;
            if (last < 0) j->nodes[id].first = child; else j->nodes[last].next = child;
            last = child;
            if (++j->nodes[id].count > JSON_MAX_MEMBERS && obj) { j->err = "too many members in an object"; return -1; }
            j_ws(j);
            if (j->pos >= j->n) { j->err = "unexpected end"; return -1; }
            if (j->p[j->pos] == ',') { j->pos++; continue; }
            if (j->p[j->pos] == (obj ? '}' : ']')) { j->pos++; break; }
            j->err = obj ? "expected ',' or '}'" : "expected ',' or ']'";
            return -1;
        }
        if (obj) { /* duplicate keys: refused (Python and serde would disagree on which wins) */
            for (int32_t a = j->nodes[id].first; a >= 0; a = j->nodes[a].next)
                for (int32_t b = j->nodes[a].next; b >= 0; b = j->nodes[b].next)
                    if (j->nodes[a].k_len == j->nodes[b].k_len &&
                        !memcmp(j->pool + j->nodes[a].k_off, j->pool + j->nodes[b].k_off, j->nodes[a].k_len)) {
                        j->err = "duplicate key";
                        return -1;
                    }
        }
        return id;
    }
    if (c == '"') {
        int32_t id = j_new(j, J_STR);
        if (id < 0) return -1;
        size_t o, l;
        if (!j_string(j, &o, &l)) return -1;
        j->nodes[id].s_off = o;
        j->nodes[id].s_len = l;
        return id;
    }
    if (c == '-' || (c >= '0' && c <= '9')) return j_number(j);
    if (j_lit(j, "true") || j_lit(j, "false")) {
        int32_t id = j_new(j, J_BOOL);
        if (id >= 0) j->nodes[id].bval = j->p[j->pos - 1] == 'e' && j->p[j->pos - 2] == 'u';
        return id;
    }
    if (j_lit(j, "null")) return j_new(j, J_NULL);
    j->err = "unexpected character";
    return -1;
}

/* Parse text[0..n) as one JSON value; the root node index, or -1 with j->err set. */
static int32_t json_parse(json_t *j, const uint8_t *text, size_t n) {
    memset(j, 0, sizeof *j);
    j->p = text;
    j->n = n;
    if (!utf8_valid(text, n)) { j->err = "not valid UTF-8"; return -1; }
    j->pool = malloc(n + 1);
    if (!j->pool) { j->err = "out of memory"; return -1; }
    int32_t root = j_value(j, 0);
    if (root < 0) return -1;
    j_ws(j);
    if (j->pos != n) { j->err = "extra data after the value"; return -1; }
    return root;
}

static int32_t j_get(const json_t *j, int32_t obj, const char *key) {
    if (obj < 0 || j->nodes[obj].type != J_OBJ) return -1;
    size_t k = strlen(key);
    for (int32_t c = j->nodes[obj].first; c >= 0; c = j->nodes[c].next)
        if (j->nodes[c].k_len == k && !memcmp(j->pool + j->nodes[c].k_off, key, k)) return c;
    return -1;
}

static int j_streq(const json_t *j, int32_t id, const char *s) {
    return id >= 0 && j->nodes[id].type == J_STR && j->nodes[id].s_len == strlen(s) &&
           !memcmp(j->pool + j->nodes[id].s_off, s, j->nodes[id].s_len);
}

static int j_isint(const json_t *j, int32_t id) {
    return id >= 0 && j->nodes[id].type == J_NUM && j->nodes[id].is_int;
}

/* ------------------------------------------------------------------------- fp16 */

static float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF, bits;
    if (e == 0) {
        if (m == 0) bits = sign;
        else {
            int k = -1;
            do { k++; m <<= 1; } while (!(m & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - k) << 23) | ((m & 0x3FF) << 13);
        }
    } else if (e == 31) bits = sign | 0x7F800000u | (m << 13);
    else bits = sign | ((e + 127 - 15) << 23) | (m << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float -> fp16, round to nearest even (as torch's .half()) */
static uint16_t f2h(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) return (uint16_t)(sign | 0x7C00 | (ax > 0x7F800000u ? 0x200 : 0));
    if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00);
    if (ax < 0x38800000u) {
        if (ax < 0x33000000u) return (uint16_t)sign;
        uint32_t e = ax >> 23, m = (ax & 0x7FFFFF) | 0x800000;
        int shift = 126 - (int)e;
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t h = (ax >> 13) - (112u << 10), rem = ax & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

static uint16_t d2h(double v) { return f2h((float)v); } /* torch: double -> float -> half */

static uint16_t h_next_up(uint16_t h) {
    if (h == 0 || h == 0x8000) return 1;
    return (uint16_t)((h & 0x8000) ? h - 1 : h + 1);
}

static int h_finite(uint16_t h) { return ((h >> 10) & 0x1F) != 31; }

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* ------------------------------------------------------------------------- varints, base64 */

/* 0, or -1 truncated, -2 over-long, -3 longer than max bytes / beyond 64 bits */
static int varint(const uint8_t *b, size_t len, size_t *pos, int max_bytes, uint64_t *v) {
    uint64_t x = 0;
    for (int i = 0; i < max_bytes; i++) {
        if (*pos + (size_t)i >= len) return -1;
        uint8_t c = b[*pos + (size_t)i];
        if (i == 9 && (c & 0x7F) > 1) return -3;
        x |= (uint64_t)(c & 0x7F) << (7 * i);
        if (!(c & 0x80)) {
            if (c == 0 && i > 0) return -2;
            *pos += (size_t)i + 1;
            *v = x;
            return 0;
        }
    }
    return -3;
}

static const char *varint_why(int rc) {
    return rc == -1 ? "is truncated inside" : rc == -2 ? "has an over-long encoding of" : "has an over-wide";
}

static int b64val(uint8_t c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* canonical base64 (what Python's b64encode writes) -> bytes; 0, -1 not base64, -2 not canonical */
static int b64decode(const char *s, size_t n, uint8_t *out, size_t *out_n) {
    if (n % 4) return -1;
    size_t o = 0;
    for (size_t i = 0; i < n; i += 4) {
        int v[4], pad = 0;
        for (int k = 0; k < 4; k++) {
            uint8_t c = (uint8_t)s[i + k];
            if (c == '=' && i + 4 == n && k >= 2) { v[k] = 0; pad++; continue; }
            if (pad) return -1;
            v[k] = b64val(c);
            if (v[k] < 0) return -1;
        }
        if (pad == 2 && s[i + 2] != '=') return -1;
        uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
        out[o++] = (uint8_t)(w >> 16);
        if (pad < 2) out[o++] = (uint8_t)(w >> 8);
        if (pad < 1) out[o++] = (uint8_t)w;
        if ((pad == 1 && (w & 0xFF)) || (pad == 2 && (w & 0xFFFF))) return -2;
    }
    *out_n = o;
    return 0;
}

/* ------------------------------------------------------------------------- the model description */

typedef struct {
    int64_t vocab, d, n_layers, d_state, d_conv, headdim, n_heads, dt_rank, n_experts, top_k, d_ff, chunk, rank;
    int64_t *lh, *le, *lf; /* per layer (NULL: uniform) */
} cfg_t;

static int64_t cfg_heads(const cfg_t *c, int i) { return c->lh ? c->lh[i] : c->n_heads; }
static int64_t cfg_experts(const cfg_t *c, int i) { return c->le ? c->le[i] : c->n_experts; }
static int64_t cfg_ff(const cfg_t *c, int i) { return c->lf ? c->lf[i] : c->d_ff; }

enum { DT_U8, DT_F16, DT_F32 };
static const char *DT_NAME[] = {"uint8", "float16", "float32"};
static const int DT_SIZE[] = {1, 2, 4};
enum { R_CODES, R_SCALES, R_ZEROS, R_HALF, R_VEC };
enum { V_PLAIN, V_A };

typedef struct {
    itl_mat *m;
    int spec_bits, symmetric, groups; /* integer mats: the stored code width, groups per row */
} matinfo;

typedef struct {
    char name[160];
    int dtype, ndim;
    int64_t shape[3], numel;
    int role;
    matinfo *mi;
    int bits;      /* code views: bits, count */
    int64_t count;
    float *vec;    /* R_VEC destination */
    int vkind;
} tdesc;

typedef struct {
    tdesc *t;
    size_t n, cap;
    matinfo *mis;
    size_t nmi, capmi;
} plan_t;

static tdesc *plan_add(plan_t *p, const char *name, int dtype, int ndim, int64_t s0, int64_t s1, int64_t s2,
                       int role) {
    if (p->n == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 128;
        tdesc *t = realloc(p->t, cap * sizeof *t);
        if (!t) return NULL;
        p->t = t;
        p->cap = cap;
    }
    tdesc *t = &p->t[p->n++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->dtype = dtype;
    t->ndim = ndim;
    t->shape[0] = s0;
    t->shape[1] = s1;
    t->shape[2] = s2;
    t->numel = 1;
    for (int i = 0; i < ndim; i++) t->numel *= t->shape[i];
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
static int add_mat(rd_t *r, plan_t *p, itl_mat *m, const char *prefix, int64_t out, int64_t in, char c, int64_t gs,
                   const char *bias_name, float *bias_dst) {
    char name[160];
    if (bias_name) {
        tdesc *t = plan_add(p, bias_name, DT_F32, 1, out, 0, 0, R_VEC);
        if (!t) return fail(r, ITL_ART_E_NOMEM, "out of memory");
        t->vec = bias_dst;
    }
    if (p->nmi == p->capmi) return fail(r, ITL_ART_E_CORRUPT, "internal: matrix table full");
    matinfo *mi = &p->mis[p->nmi++];
    mi->m = m;
    m->out = (int32_t)out;
    m->in = (int32_t)in;
    if (c == 'h') {
        m->kind = ITL_F16;
        m->bits = 16;
        m->group = (int32_t)fit_group(in, F16_BLOCK);
        m->rowbytes = 0;
        snprintf(name, sizeof name, "%s.weight_half", prefix);
        tdesc *t = plan_add(p, name, DT_F16, 2, out, in, 0, R_HALF);
        if (!t) return fail(r, ITL_ART_E_NOMEM, "out of memory");
        t->mi = mi;
        m->w16 = xalloc(r, (size_t)(out * in) * 2);
        if (!m->w16) return fail(r, ITL_ART_E_NOMEM, "out of memory");
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
    tdesc *t = plan_add(p, name, DT_U8, 1, packed_bytes(out * in, bits), 0, 0, R_CODES);
    if (!t) return fail(r, ITL_ART_E_NOMEM, "out of memory");
    t->mi = mi;
    t->bits = bits;
    t->count = out * in;
    snprintf(name, sizeof name, "%s.weight_scales", prefix);
    if (!(t = plan_add(p, name, DT_F16, 2, out, G, 0, R_SCALES))) return fail(r, ITL_ART_E_NOMEM, "out of memory");
    t->mi = mi;
    if (!mi->symmetric) {
        snprintf(name, sizeof name, "%s.weight_zeros", prefix);
        if (!(t = plan_add(p, name, DT_U8, 1, packed_bytes(out * G, bits), 0, 0, R_ZEROS)))
            return fail(r, ITL_ART_E_NOMEM, "out of memory");
        t->mi = mi;
        t->bits = bits;
        t->count = out * G;
    }
    uint8_t *codes = xalloc(r, (size_t)(out * m->rowbytes));
    uint16_t *scales = xalloc(r, (size_t)(G * out) * 2);
    uint8_t *zeros = xalloc(r, (size_t)(G * out));
    if (!codes || !scales || !zeros) return fail(r, ITL_ART_E_NOMEM, "out of memory");
    if (mi->symmetric) memset(zeros, 1 << (bits - 1), (size_t)(G * out));
    m->codes = codes;
    m->scales = scales;
    m->zeros = zeros;
    r->a->resident += out * m->rowbytes + G * out * 3;
    return 0;
}

static float *add_vec(rd_t *r, plan_t *p, const char *name, int ndim, int64_t s0, int64_t s1, int64_t s2, int vkind) {
    tdesc *t = plan_add(p, name, DT_F32, ndim, s0, s1, s2, R_VEC);
    if (!t) return NULL;
    t->vec = xalloc(r, (size_t)t->numel * 4);
    t->vkind = vkind;
    r->a->resident += t->numel * 4;
    return t->vec;
}

#define NOMEM_IF(x) do { if (!(x)) return fail(r, ITL_ART_E_NOMEM, "out of memory"); } while (0)

/* The rebuilt model's state_dict, in order (names, dtypes, shapes), with where each tensor goes. */
static int build_plan(rd_t *r, plan_t *p, const cfg_t *c, const char *prec, int64_t gs) {
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
    itl_layer *layers = xalloc(r, (size_t)c->n_layers * sizeof *layers);
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
        float *dtb = xalloc(r, (size_t)h * 4);
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
        itl_mat *w1 = xalloc(r, (size_t)e * sizeof *w1), *w2 = xalloc(r, (size_t)e * sizeof *w2);
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

static void shape_text(const tdesc *t, char *out, size_t n, int python_tuple) {
    size_t o = 0;
    if (python_tuple) o += (size_t)snprintf(out + o, n - o, "(");
    for (int i = 0; i < t->ndim && o < n; i++)
        o += (size_t)snprintf(out + o, n - o, python_tuple ? (i ? ", %lld" : "%lld") : (i ? ",%lld" : "%lld"),
                              (long long)t->shape[i]);
    if (python_tuple && o < n) snprintf(out + o, n - o, t->ndim == 1 ? ",)" : ")");
}

/* ------------------------------------------------------------------------- decoding */

static const char *rans_why(int rc) {
    switch (rc) {
    case -2: return "truncated header";
    case -3: return "version";
    case -4: return "precision";
    case -5: return "over-long varint";
    case -6: return "count";
    case -7: return "bitmap";
    case -8: return "symbol count";
    case -9: return "frequency table";
    case -10: return "word count";
    case -11: return "payload";
    default: return "argument";
    }
}

/* an entropy blob (whole) -> exactly `count` codes < n_symbols */
static int rans_exact(rd_t *r, const char *name, const char *what, const uint8_t *blob, size_t len, uint8_t *out,
                      int64_t count, int n_symbols) {
    uint64_t got = 0;
    int rc = itl_rans_decode(blob, len, out, (uint64_t)count, &got);
    if (rc == -6 || (rc == 0 && got != (uint64_t)count))
        return fail(r, ITL_ART_E_CORRUPT, "'%s' %sentropy blob holds %llu codes, expected %lld", name, what,
                    (unsigned long long)got, (long long)count);
    if (rc) return fail(r, ITL_ART_E_CORRUPT, "'%s' %sentropy blob is corrupt (%s)", name, what, rans_why(rc));
    for (int64_t i = 0; i < count; i++)
        if (out[i] >= n_symbols)
            return fail(r, ITL_ART_E_CORRUPT, "'%s' %sentropy blob holds a code %d, but the tensor stores %d-symbol codes",
                        name, what, out[i], n_symbols);
    return 0;
}

/* k streams from pos (k - 1 length varints, the last takes the rest) */
static int split_streams(rd_t *r, const char *name, const char *what, const uint8_t *b, size_t len, size_t pos,
                         int64_t k, size_t *off, size_t *sl) {
    uint64_t total = 0, v;
    for (int64_t s = 0; s + 1 < k; s++) {
        int vr = varint(b, len, &pos, 5, &v);
        if (vr) return fail(r, ITL_ART_E_CORRUPT, "'%s' %s blob %s a stream length", name, what, varint_why(vr));
        sl[s] = (size_t)v;
        total += v;
    }
    if (total > len - pos)
        return fail(r, ITL_ART_E_CORRUPT, "'%s' %s blob is truncated: its stream lengths cover %llu bytes, %llu remain",
                    name, what, (unsigned long long)total, (unsigned long long)(len - pos));
    sl[k - 1] = (size_t)(len - pos - total);
    for (int64_t s = 0; s < k; s++) {
        off[s] = pos;
        pos += sl[s];
    }
    return 0;
}

static int dec_prev(rd_t *r, const char *name, const uint8_t *b, size_t len, int nsym, int64_t count, uint8_t *out) {
    size_t off[256], sl[256];
    int64_t cnt[256], start[257], at[256];
    int rc = split_streams(r, name, "rans-prev", b, len, 0, nsym, off, sl);
    if (rc) return rc;
    int64_t sum = 0;
    for (int c = 0; c < nsym; c++) {
        cnt[c] = 0;
        if (!sl[c]) continue;
        size_t pos = 1;
        uint64_t m;
        int vr = varint(b + off[c], sl[c], &pos, 5, &m);
        if (vr) return fail(r, ITL_ART_E_CORRUPT, "'%s' rans-prev blob %s context %d's count", name, varint_why(vr), c);
        if (m == 0) return fail(r, ITL_ART_E_CORRUPT, "'%s' rans-prev blob stores an empty stream for context %d", name, c);
        cnt[c] = (int64_t)m;
        sum += (int64_t)m;
        if (sum > count) break;
    }
    if (sum != count)
        return fail(r, ITL_ART_E_CORRUPT, "'%s' rans-prev blob's streams hold %lld codes, expected %lld", name,
                    (long long)sum, (long long)count);
    uint8_t *dec = malloc((size_t)count + 1);
    if (!dec) return fail(r, ITL_ART_E_NOMEM, "out of memory");
    start[0] = 0;
    for (int c = 0; c < nsym; c++) start[c + 1] = start[c] + cnt[c];
    for (int c = 0; c < nsym && !rc; c++) {
        at[c] = start[c];
        if (!sl[c]) continue;
        uint8_t *tmp = malloc(sl[c] + 2);
        if (!tmp) { rc = fail(r, ITL_ART_E_NOMEM, "out of memory"); break; }
        tmp[0] = 1;
        tmp[1] = (uint8_t)(nsym - 1);
        memcpy(tmp + 2, b + off[c], sl[c]);
        char what[48];
        snprintf(what, sizeof what, "rans-prev context %d: ", c);
        rc = rans_exact(r, name, what, tmp, sl[c] + 2, dec + start[c], cnt[c], nsym);
        free(tmp);
    }
    int prev = 0;
    for (int64_t i = 0; i < count && !rc; i++) {
        if (at[prev] >= start[prev + 1]) {
            rc = fail(r, ITL_ART_E_CORRUPT, "'%s' rans-prev blob's stream for context %d runs out at code %lld: it is corrupt",
                      name, prev, (long long)i);
            break;
        }
        out[i] = dec[at[prev]++];
        prev = out[i];
    }
    free(dec);
    return rc;
}

static int dec_rows(rd_t *r, const char *name, const uint8_t *b, size_t len, int nsym, int64_t count, uint8_t *out) {
    size_t pos = 0;
    uint64_t G;
    int vr = varint(b, len, &pos, 5, &G);
    if (vr) return fail(r, ITL_ART_E_CORRUPT, "'%s' rans-rows blob %s the group count", name, varint_why(vr));
    int64_t limit = count > 1 ? count : 1;
    if (limit > MAX_GROUPS) limit = MAX_GROUPS;
    if (G < 1 || (int64_t)G > limit)
        return fail(r, ITL_ART_E_CORRUPT, "'%s' rans-rows blob has %llu groups; %lld codes allow 1 to %lld", name,
                    (unsigned long long)G, (long long)count, (long long)limit);
    size_t *off = malloc(G * sizeof *off), *sl = malloc(G * sizeof *sl);
    if (!off || !sl) { free(off); free(sl); return fail(r, ITL_ART_E_NOMEM, "out of memory"); }
    int rc = split_streams(r, name, "rans-rows", b, len, pos, (int64_t)G, off, sl);
    for (uint64_t g = 0; g < G && !rc; g++) {
        int64_t lo = (int64_t)g * count / (int64_t)G, hi = (int64_t)(g + 1) * count / (int64_t)G;
        if ((sl[g] > 0) != (hi > lo)) {
            rc = fail(r, ITL_ART_E_CORRUPT, "'%s' rans-rows blob's stream for group %llu is %llu bytes for %lld codes",
                      name, (unsigned long long)g, (unsigned long long)sl[g], (long long)(hi - lo));
            break;
        }
        if (!sl[g]) continue;
        uint8_t *tmp = malloc(sl[g] + 16);
        if (!tmp) { rc = fail(r, ITL_ART_E_NOMEM, "out of memory"); break; }
        size_t n = 0;
        tmp[n++] = 1;
        tmp[n++] = (uint8_t)(nsym - 1);
        tmp[n++] = b[off[g]];
        uint64_t v = (uint64_t)(hi - lo);
        do { /* the implied count, a minimal varint */
            uint8_t byte = v & 0x7F;
            v >>= 7;
            tmp[n++] = (uint8_t)(byte | (v ? 0x80 : 0));
        } while (v);
        memcpy(tmp + n, b + off[g] + 1, sl[g] - 1);
        n += sl[g] - 1;
        char what[48];
        snprintf(what, sizeof what, "rans-rows group %llu: ", (unsigned long long)g);
        rc = rans_exact(r, name, what, tmp, n, out + lo, hi - lo, nsym);
        free(tmp);
    }
    free(off);
    free(sl);
    return rc;
}

static void unpack_codes(const uint8_t *p, size_t nbytes, int bits, int64_t count, uint8_t *out) {
    uint32_t mask = (1u << bits) - 1;
    for (int64_t i = 0; i < count; i++) {
        uint64_t bit = (uint64_t)i * (uint64_t)bits;
        size_t b = (size_t)(bit >> 3);
        uint32_t w = p[b] | (b + 1 < nbytes ? (uint32_t)p[b + 1] << 8 : 0);
        out[i] = (uint8_t)((w >> (bit & 7)) & mask);
    }
}

/* grid blob -> numel fp16 values (io/grid.py's decode) */
static int dec_grid(rd_t *r, const char *name, const uint8_t *b, size_t len, int64_t n, uint16_t *out) {
    if (len < 5) return fail(r, ITL_ART_E_CORRUPT, "'%s' grid blob is %zu bytes, shorter than its 5-byte head", name, len);
    int kind = b[0] >> 4, bits = b[0] & 15;
    if (kind > 1 || bits < 1 || bits > 8)
        return fail(r, ITL_ART_E_CORRUPT, "'%s' grid blob has kind %d / %d bits; known kinds [0, 1] with 1..8 bits", name,
                    kind, bits);
    uint16_t hlo = rd16(b + 1), hhi = rd16(b + 3);
    double lo = h2f(hlo), hi = h2f(hhi);
    if (!(h_finite(hlo) && h_finite(hhi) && lo <= hi && (kind != 1 || lo > 0)))
        return fail(r, ITL_ART_E_CORRUPT, "'%s' grid blob has range [%g, %g], not a valid %s grid", name, lo, hi,
                    kind ? "log" : "linear");
    int64_t want = 5 + (n * bits + 7) / 8;
    if ((int64_t)len != want)
        return fail(r, ITL_ART_E_CORRUPT, "'%s' grid blob is %zu bytes; %lld values at %d bits take %lld", name, len,
                    (long long)n, bits, (long long)want);
    int K = (1 << bits) - 1;
    uint16_t g[256];
    for (int i = 0; i <= K; i++) {
        volatile double k = (double)i / (double)K; /* volatile: no contraction into an FMA */
        if (kind == 1) {
            volatile double v = lo * pow(hi / lo, k);
            uint16_t h = d2h(v);
            if ((double)h2f(h) < v) h = h_next_up(h);
            g[i] = h;
        } else {
            volatile double t = (hi - lo) * k;
            volatile double v = lo + t;
            g[i] = d2h(v);
        }
    }
    g[0] = hlo;
    g[K] = hhi;
    uint16_t mb = g[0];
    for (int i = 1; i <= K; i++) { /* cummax (a later equal value wins, as torch's) */
        if (h2f(g[i]) >= h2f(mb)) mb = g[i];
        else g[i] = mb;
    }
    uint8_t *idx = malloc((size_t)n + 1);
    if (!idx) return fail(r, ITL_ART_E_NOMEM, "out of memory");
    unpack_codes(b + 5, len - 5, bits, n, idx);
    for (int64_t i = 0; i < n; i++) out[i] = g[idx[i]];
    free(idx);
    return 0;
}

/* decode one tensor's stored bytes and put it where the plan says */
static int decode_tensor(rd_t *r, const tdesc *t, int cid, const uint8_t *data, size_t len) {
    const char *name = t->name;
    int rc = 0;
    if (t->role == R_CODES || t->role == R_ZEROS) {
        if (cid == C_F16) return fail(r, ITL_ART_E_CORRUPT, "'%s' is stored as f16 but the model holds a torch.uint8 tensor", name);
        if (cid == C_GRID) return fail(r, ITL_ART_E_CORRUPT, "'%s' is stored on a grid but the model holds a torch.uint8 tensor", name);
        if (t->count > MAX_COUNT && cid != C_RAW)
            return fail(r, ITL_ART_E_UNSUPPORTED, "'%s' holds %lld codes, more than an entropy blob may", name, (long long)t->count);
        uint8_t *codes = malloc((size_t)t->count + 1);
        if (!codes) return fail(r, ITL_ART_E_NOMEM, "out of memory");
        int nsym = 1 << t->bits;
        if (cid == C_RAW) unpack_codes(data, len, t->bits, t->count, codes);
        else if (cid == C_RANS) rc = rans_exact(r, name, "", data, len, codes, t->count, nsym);
        else if (cid == C_PREV) rc = dec_prev(r, name, data, len, nsym, t->count, codes);
        else rc = dec_rows(r, name, data, len, nsym, t->count, codes);
        if (!rc) {
            const matinfo *mi = t->mi;
            itl_mat *m = mi->m;
            if (t->role == R_CODES) {
                uint8_t *dst = (uint8_t *)m->codes;
                int rb = m->bits;
                for (int64_t o = 0; o < m->out; o++)
                    for (int64_t i = 0; i < m->in; i++) {
                        int64_t bit = i * rb;
                        dst[o * m->rowbytes + bit / 8] |= (uint8_t)(codes[o * m->in + i] << (bit % 8));
                    }
            } else {
                uint8_t *dst = (uint8_t *)m->zeros;
                for (int64_t o = 0; o < m->out; o++)
                    for (int64_t g = 0; g < mi->groups; g++) dst[g * m->out + o] = codes[o * mi->groups + g];
            }
        }
        free(codes);
        return rc;
    }
    if (cid == C_RANS || cid == C_PREV || cid == C_ROWS)
        return fail(r, ITL_ART_E_CORRUPT, "'%s' is stored %s but is not an integer code tensor", name,
                    cid == C_RANS ? "entropy-coded" : CODEC_NAMES[cid]);
    if (cid == C_F16 && t->dtype != DT_F32)
        return fail(r, ITL_ART_E_CORRUPT, "'%s' is stored as f16 but the model holds a torch.%s tensor", name, DT_NAME[t->dtype]);
    int64_t n = t->numel;
    if (t->dtype == DT_F32 && cid == C_RAW) { /* float32 little-endian */
        for (int64_t i = 0; i < n; i++) {
            uint32_t bits = (uint32_t)data[4 * i] | (uint32_t)data[4 * i + 1] << 8 | (uint32_t)data[4 * i + 2] << 16 |
                            (uint32_t)data[4 * i + 3] << 24;
            float f;
            memcpy(&f, &bits, 4);
            if (!isfinite(f))
                return fail(r, ITL_ART_E_CORRUPT, "tensor '%s' holds NaN/inf values: the model is unusable (a diverged run or a damaged file); re-create it with `dvc repro`", name);
            t->vec[i] = f;
        }
    } else {
        uint16_t *h = malloc((size_t)n * 2 + 2);
        if (!h) return fail(r, ITL_ART_E_NOMEM, "out of memory");
        if (cid == C_GRID) rc = dec_grid(r, name, data, len, n, h);
        else
            for (int64_t i = 0; i < n; i++) h[i] = rd16(data + 2 * i); /* raw fp16 or the f16 codec */
        for (int64_t i = 0; i < n && !rc; i++)
            if (!h_finite(h[i]))
                rc = fail(r, ITL_ART_E_CORRUPT, "tensor '%s' holds NaN/inf values: the model is unusable (a diverged run or a damaged file); re-create it with `dvc repro`", name);
        if (!rc) {
            if (t->role == R_VEC)
                for (int64_t i = 0; i < n; i++) t->vec[i] = h2f(h[i]);
            else if (t->role == R_HALF)
                memcpy((void *)t->mi->m->w16, h, (size_t)n * 2);
            else { /* scales (out, G) -> (G, out) */
                itl_mat *m = t->mi->m;
                uint16_t *dst = (uint16_t *)m->scales;
                int64_t G = t->mi->groups;
                for (int64_t o = 0; o < m->out; o++)
                    for (int64_t g = 0; g < G; g++) dst[g * m->out + o] = h[o * G + g];
            }
        }
        free(h);
    }
    if (!rc && t->role == R_VEC && t->vkind == V_A) /* A = -exp(A_log), the exp rounded once to float */
        for (int64_t i = 0; i < n; i++) t->vec[i] = -(float)exp((double)t->vec[i]);
    return rc;
}

/* ------------------------------------------------------------------------- header */

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

/* the config's integer field: 0 ok / default; negative error */
static int cfg_int(rd_t *r, const json_t *j, int32_t obj, const char *key, int64_t limit, int64_t *dst) {
    int32_t v = j_get(j, obj, key);
    if (v < 0) return 0;
    if (!j_isint(j, v))
        return fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.%s' must be an integer", key);
    if (j->nodes[v].big || (limit && j->nodes[v].ival > limit))
        return fail(r, ITL_ART_E_CORRUPT, "config %s = %s is beyond any iteralite model (at most %lld): the file is corrupt or crafted",
                    key, j->nodes[v].big ? "a number of 19+ digits" : "too large", (long long)limit);
    *dst = j->nodes[v].ival;
    return 0;
}

static int cfg_list(rd_t *r, const json_t *j, int32_t obj, const char *key, int64_t limit, int64_t n_layers,
                    int64_t **dst) {
    int32_t v = j_get(j, obj, key);
    if (v < 0 || j->nodes[v].type == J_NULL) return 0;
    if (j->nodes[v].type != J_ARR)
        return fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.%s' must be a list of integers", key);
    if (j->nodes[v].count > 512)
        return fail(r, ITL_ART_E_CORRUPT, "config %s has %d entries, more than the 512 layers a model may have: the file is corrupt",
                    key, (int)j->nodes[v].count);
    if (j->nodes[v].count != n_layers)
        return fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.%s' needs %lld entries, got %d", key,
                    (long long)n_layers, (int)j->nodes[v].count);
    int64_t *a = xalloc(r, (size_t)(n_layers ? n_layers : 1) * sizeof *a);
    if (!a) return fail(r, ITL_ART_E_NOMEM, "out of memory");
    int k = 0;
    for (int32_t c = j->nodes[v].first; c >= 0; c = j->nodes[c].next, k++) {
        if (!j_isint(j, c))
            return fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.%s' must be a list of integers", key);
        if (j->nodes[c].big || j->nodes[c].ival > limit)
            return fail(r, ITL_ART_E_CORRUPT, "config %s holds a value beyond any iteralite model (at most %lld): the file is corrupt or crafted",
                        key, (long long)limit);
        if (j->nodes[c].ival < 1)
            return fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.%s' entries must be >= 1", key);
        a[k] = j->nodes[c].ival;
    }
    *dst = a;
    return 0;
}

static const char *CFG_KEYS[] = {"vocab_size", "d_model", "n_layers", "d_state", "d_conv", "headdim", "n_heads",
                                 "dt_rank", "n_experts", "top_k", "d_ff", "chunk_size", "embed_rank",
                                 "layer_n_heads", "layer_n_experts", "layer_d_ff"};

static int parse_config(rd_t *r, const uint8_t *text, size_t n, cfg_t *c) {
    json_t j;
    int32_t root = json_parse(&j, text, n);
    int rc = 0;
    if (root < 0) {
        rc = fail(r, ITL_ART_E_CORRUPT, "config in header is not valid JSON (%s): the file is corrupt", j.err);
        goto out;
    }
    if (j.nodes[root].type != J_OBJ) {
        rc = fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: section 'model' must be a mapping");
        goto out;
    }
    for (int32_t m = j.nodes[root].first; m >= 0; m = j.nodes[m].next) {
        int known = 0;
        for (size_t k = 0; k < sizeof CFG_KEYS / sizeof *CFG_KEYS; k++)
            if (j.nodes[m].k_len == strlen(CFG_KEYS[k]) && !memcmp(j.pool + j.nodes[m].k_off, CFG_KEYS[k], j.nodes[m].k_len))
                known = 1;
        if (!known) {
            rc = fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: unknown key 'model.%.*s'",
                      (int)(j.nodes[m].k_len > 60 ? 60 : j.nodes[m].k_len), j.pool + j.nodes[m].k_off);
            goto out;
        }
    }
    *c = (cfg_t){2000, 128, 4, 16, 4, 32, 8, 8, 4, 2, 256, 32, 0, NULL, NULL, NULL};
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
            rc = fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.%s' must be >= 1", CFG_KEYS[k]);
            goto out;
        }
    if ((rc = cfg_list(r, &j, root, "layer_n_heads", 1 << 12, c->n_layers, &c->lh)) ||
        (rc = cfg_list(r, &j, root, "layer_n_experts", 1 << 12, c->n_layers, &c->le)) ||
        (rc = cfg_list(r, &j, root, "layer_d_ff", 1 << 20, c->n_layers, &c->lf)))
        goto out;
    if (c->rank < 0 || c->rank >= c->d) {
        rc = fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.embed_rank' must be 0 (a dense embedding) or in [1, d_model=%lld); got %lld",
                  (long long)c->d, (long long)c->rank);
        goto out;
    }
    if (c->top_k > c->n_experts) {
        rc = fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.top_k' must be <= n_experts (%lld)", (long long)c->n_experts);
        goto out;
    }
    for (int i = 0; i < c->n_layers; i++)
        if (cfg_experts(c, i) < c->top_k) {
            rc = fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: params: 'model.layer_n_experts' layer %d has %lld experts, fewer than top_k=%lld",
                      i, (long long)cfg_experts(c, i), (long long)c->top_k);
            goto out;
        }
out:
    json_free(&j);
    return rc;
}

static int64_t num_weights(const cfg_t *c) {
    int64_t d = c->d, W = c->rank ? c->rank : d;
    int64_t total = c->vocab * W + 2 * d * c->rank + d;
    for (int i = 0; i < c->n_layers; i++) {
        int64_t h = cfg_heads(c, i), e = cfg_experts(c, i), f = cfg_ff(c, i), di = h * c->headdim;
        total += 2 * d + d * 2 * di + di * (c->d_conv + 1) + di * (c->dt_rank + 2 * c->d_state) + c->dt_rank * h + h +
                 2 * h + di * d + d * e + 2 * e * f * d;
    }
    return total;
}

static int load(rd_t *r, const uint8_t *buf, size_t size) {
    int rc = 0;
    json_t hj = {0};
    entry_t *ents = NULL;
    field_t *fields = NULL;
    plan_t plan = {0};
    uint8_t *index = NULL;
    uint64_t *lens = NULL;
    int *cids = NULL;

    if (size < 8) return fail(r, ITL_ART_E_TRUNCATED, "file is empty or truncated (%zu bytes): not an iteralite checkpoint", size);
    uint64_t n = 0;
    for (int i = 0; i < 8; i++) n |= (uint64_t)buf[i] << (8 * i);
    if (n > size - 8 || n > MAX_HEADER)
        return fail(r, ITL_ART_E_FORMAT, "not a safetensors file or truncated (header claims %llu bytes, file has %zu); iteralite checkpoints are safetensors files written by its stages",
                    (unsigned long long)n, size);
    int32_t root = json_parse(&hj, buf + 8, (size_t)n);
    if (root < 0) { rc = fail(r, ITL_ART_E_FORMAT, "header is not valid JSON (%s): the file is corrupt", hj.err); goto out; }
    if (hj.nodes[root].type != J_OBJ) { rc = fail(r, ITL_ART_E_FORMAT, "header is not a JSON object: the file is corrupt"); goto out; }
    /* tensor entries and metadata */
    int32_t meta = -1;
    size_t ne = 0;
    ents = calloc((size_t)hj.nodes[root].count + 1, sizeof *ents);
    if (!ents) { rc = fail(r, ITL_ART_E_NOMEM, "out of memory"); goto out; }
    uint64_t end = 0;
    for (int32_t m = hj.nodes[root].first; m >= 0; m = hj.nodes[m].next) {
        const char *key = hj.pool + hj.nodes[m].k_off;
        size_t kl = hj.nodes[m].k_len;
        if (kl == 12 && !memcmp(key, "__metadata__", 12)) { meta = m; continue; }
        int32_t off = j_get(&hj, m, "data_offsets");
        int32_t a = off >= 0 && hj.nodes[off].type == J_ARR && hj.nodes[off].count == 2 ? hj.nodes[off].first : -1;
        if (a < 0 || !j_isint(&hj, a) || !j_isint(&hj, hj.nodes[a].next) || hj.nodes[a].big ||
            hj.nodes[hj.nodes[a].next].big || hj.nodes[a].ival < 0 || hj.nodes[hj.nodes[a].next].ival < 0) {
            rc = fail(r, ITL_ART_E_FORMAT, "header entry '%.*s' is malformed: the file is corrupt", (int)(kl > 60 ? 60 : kl), key);
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
        rc = fail(r, ITL_ART_E_TRUNCATED, "truncated or padded: expected %llu bytes, found %zu",
                  (unsigned long long)(8 + n + end), size);
        goto out;
    }
    if (meta >= 0 && hj.nodes[meta].type != J_OBJ) { rc = fail(r, ITL_ART_E_FORMAT, "header metadata is malformed: the file is corrupt"); goto out; }
    size_t nf = 0;
    fields = calloc(meta >= 0 ? (size_t)hj.nodes[meta].count + 1 : 1, sizeof *fields);
    if (!fields) { rc = fail(r, ITL_ART_E_NOMEM, "out of memory"); goto out; }
    if (meta >= 0)
        for (int32_t m = hj.nodes[meta].first; m >= 0; m = hj.nodes[m].next) {
            if (hj.nodes[m].type != J_STR) { rc = fail(r, ITL_ART_E_FORMAT, "header metadata is malformed: the file is corrupt"); goto out; }
            fields[nf++] = (field_t){hj.pool + hj.nodes[m].k_off, hj.pool + hj.nodes[m].s_off, hj.nodes[m].k_len, hj.nodes[m].s_len};
        }
#define META(name) j_get(&hj, meta, name)
    int32_t fmt = META("format");
    if (!j_streq(&hj, fmt, "iteralite")) {
        rc = fail(r, ITL_ART_E_FORMAT, "format is %s%.*s%s, expected 'iteralite': not an iteralite checkpoint", fmt < 0 ? "None" : "'",
                  fmt < 0 ? 0 : (int)(hj.nodes[fmt].s_len > 40 ? 40 : hj.nodes[fmt].s_len), fmt < 0 ? "" : hj.pool + hj.nodes[fmt].s_off,
                  fmt < 0 ? "" : "'");
        goto out;
    }
    int32_t ver = META("version");
    if (!j_streq(&hj, ver, "2")) {
        rc = fail(r, ITL_ART_E_VERSION, "checkpoint format version %s%.*s%s; this iteralite reads version 2. Re-create it with `dvc repro` using this version of the code",
                  ver < 0 ? "None" : "'", ver < 0 ? 0 : (int)(hj.nodes[ver].s_len > 20 ? 20 : hj.nodes[ver].s_len),
                  ver < 0 ? "" : hj.pool + hj.nodes[ver].s_off, ver < 0 ? "" : "'");
        goto out;
    }
    /* the tensor table, as safetensors validates it */
    size_t k = 0;
    for (int32_t m = hj.nodes[root].first; m >= 0; m = hj.nodes[m].next) {
        if (m == meta) continue;
        entry_t *e = &ents[k++];
        int32_t dt = j_get(&hj, m, "dtype"), sh = j_get(&hj, m, "shape");
        e->torch = NULL;
        for (size_t q = 0; dt >= 0 && q < sizeof DTYPES / sizeof *DTYPES; q++)
            if (j_streq(&hj, dt, DTYPES[q].st)) { e->torch = DTYPES[q].torch; e->size = DTYPES[q].size; }
        if (!e->torch || sh < 0 || hj.nodes[sh].type != J_ARR || hj.nodes[sh].count > 8) {
            rc = fail(r, ITL_ART_E_FORMAT, "cannot read tensors (entry '%.*s' has an unknown dtype or a bad shape): the file is corrupt",
                      (int)(e->name_len > 60 ? 60 : e->name_len), e->name);
            goto out;
        }
        uint64_t numel = 1, cap_numel = (uint64_t)1 << 60; /* saturating: bytes = numel * size never wraps */
        int zero = 0;
        for (int32_t c = hj.nodes[sh].first; c >= 0; c = hj.nodes[c].next) {
            if (!j_isint(&hj, c) || hj.nodes[c].big || hj.nodes[c].ival < 0) {
                rc = fail(r, ITL_ART_E_FORMAT, "cannot read tensors (entry '%.*s' has a bad shape): the file is corrupt",
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
            rc = fail(r, ITL_ART_E_FORMAT, "cannot read tensors (entry '%.*s': its offsets do not fit its dtype and shape): the file is corrupt",
                      (int)(e->name_len > 60 ? 60 : e->name_len), e->name);
            goto out;
        }
    }
    qsort(ents, ne, sizeof *ents, cmp_entry_start);
    for (size_t q = 0, at = 0; q < ne; q++) {
        if (ents[q].start != at) {
            rc = fail(r, ITL_ART_E_FORMAT, "cannot read tensors (their data is not contiguous): the file is corrupt");
            goto out;
        }
        at = ents[q].end;
    }
    /* checksum: header fields (sorted, length-prefixed, sha256 excluded) and the tensor digest */
    const uint8_t *data = buf + 8 + n;
    {
        qsort(ents, ne, sizeof *ents, cmp_entry_name);
        sha256_t s;
        uint8_t dig[32], sum[32];
        char line[512], sumhex[65];
        sha_init(&s);
        for (size_t q = 0; q < ne; q++) {
            const entry_t *e = &ents[q];
            size_t o = 0;
            o += (size_t)snprintf(line + o, sizeof line - o, "|%s|(", e->torch);
            for (int i = 0; i < e->ndim && o < sizeof line; i++)
                o += (size_t)snprintf(line + o, sizeof line - o, i ? ", %lld" : "%lld", (long long)e->shape[i]);
            if (o < sizeof line) o += (size_t)snprintf(line + o, sizeof line - o, e->ndim == 1 ? ",)|" : ")|");
            sha_update(&s, e->name, e->name_len);
            sha_update(&s, line, o < sizeof line ? o : sizeof line - 1);
            sha_update(&s, data + e->start, (size_t)(e->end - e->start));
        }
        sha_final(&s, dig);
        qsort(fields, nf, sizeof *fields, cmp_field);
        static const char TAG[] = "iteralite-checksum-v2";
        size_t nkeep = 0;
        for (size_t q = 0; q < nf; q++) nkeep += !(fields[q].kn == 6 && !memcmp(fields[q].k, "sha256", 6));
        sha_init(&s);
        sha_update(&s, TAG, sizeof TAG); /* with its NUL */
        sha_u64(&s, nkeep);
        for (size_t q = 0; q < nf; q++) {
            if (fields[q].kn == 6 && !memcmp(fields[q].k, "sha256", 6)) continue;
            sha_u64(&s, fields[q].kn);
            sha_update(&s, fields[q].k, fields[q].kn);
            sha_u64(&s, fields[q].vn);
            sha_update(&s, fields[q].v, fields[q].vn);
        }
        sha_update(&s, dig, 32);
        sha_final(&s, sum);
        hex(sum, 32, sumhex);
        int32_t want = META("sha256");
        if (want < 0 || hj.nodes[want].s_len != 64 || memcmp(hj.pool + hj.nodes[want].s_off, sumhex, 64)) {
            rc = fail(r, ITL_ART_E_CHECKSUM, "checksum mismatch: header or tensors were changed: the file is corrupt (re-create or re-pull it)");
            goto out;
        }
    }
    /* config, quant config, layout */
    int32_t cj = META("config");
    if (cj < 0) { rc = fail(r, ITL_ART_E_CORRUPT, "config in header is unusable: the header has no config field"); goto out; }
    cfg_t cfg;
    if ((rc = parse_config(r, (const uint8_t *)hj.pool + hj.nodes[cj].s_off, hj.nodes[cj].s_len, &cfg))) goto out;
    int32_t tsha = META("tokenizer_sha256");
    if (tsha >= 0 && hj.nodes[tsha].s_len < sizeof r->a->tok_sha)
        snprintf(r->a->tok_sha, sizeof r->a->tok_sha, "%.*s", (int)hj.nodes[tsha].s_len, hj.pool + hj.nodes[tsha].s_off);
    int32_t qj = META("quant");
    json_t qp = {0};
    char *prec = NULL;
    int64_t gs = 0;
    size_t n_units = 1 + (cfg.rank ? 2 : 0);
    for (int i = 0; i < cfg.n_layers; i++) n_units += 5 + (size_t)cfg_experts(&cfg, i);
    {
        int32_t q = qj < 0 ? -1 : json_parse(&qp, (const uint8_t *)hj.pool + hj.nodes[qj].s_off, hj.nodes[qj].s_len);
        if (qj >= 0 && q < 0) rc = fail(r, ITL_ART_E_CORRUPT, "quant config in header is not valid JSON (%s): the file is corrupt", qp.err);
        else if (q < 0 || qp.nodes[q].type != J_OBJ || !qp.nodes[q].count)
            rc = fail(r, ITL_ART_E_UNSUPPORTED, "holds a float model (no quant config); the standalone runtime runs packed mixed-precision artifacts");
        else if (!j_streq(&qp, j_get(&qp, q, "format"), "iteralite-mixed"))
            rc = fail(r, ITL_ART_E_UNSUPPORTED, "its quant config is not of format 'iteralite-mixed'; the standalone runtime runs the mixed-precision artifacts (checkpoints/mixed*.safetensors)");
        else {
            int32_t v = j_get(&qp, q, "version"), g = j_get(&qp, q, "group_size"), p = j_get(&qp, q, "precisions");
            if (!j_isint(&qp, v) || qp.nodes[v].big || qp.nodes[v].ival != 2)
                rc = fail(r, ITL_ART_E_UNSUPPORTED, "mixed quant config version is not 2; the standalone runtime reads version 2");
            else if (!j_isint(&qp, g) || qp.nodes[g].big || qp.nodes[g].ival < 1)
                rc = fail(r, ITL_ART_E_CORRUPT, "mixed quant config: group_size is not a positive integer");
            else if (p < 0 || qp.nodes[p].type != J_STR || qp.nodes[p].s_len != n_units)
                rc = fail(r, ITL_ART_E_CORRUPT, "mixed quant config: 'precisions' must be a string of %zu characters (one per unit)", n_units);
            else {
                gs = qp.nodes[g].ival;
                if (!(prec = xalloc(r, n_units + 1))) {
                    json_free(&qp);
                    rc = fail(r, ITL_ART_E_NOMEM, "out of memory");
                    goto out;
                }
                memcpy(prec, qp.pool + qp.nodes[p].s_off, n_units);
                prec[n_units] = 0;
                for (size_t u = 0; u < n_units && !rc; u++)
                    if (!strchr("t2348h", prec[u]) || !prec[u])
                        rc = fail(r, ITL_ART_E_CORRUPT, "mixed quant config: unknown precision character '%c' (known: t2348h)", prec[u]);
            }
        }
        json_free(&qp);
        if (rc) goto out;
    }
    int32_t lay = META("layout");
    if (!j_streq(&hj, lay, "compact-v3")) {
        rc = fail(r, ITL_ART_E_UNSUPPORTED, "tensor layout is not 'compact-v3'; the standalone runtime reads compact artifacts (the mixed-precision stage writes them)");
        goto out;
    }
    if (ne != 1 || ents[0].name_len != 4 || memcmp(ents[0].name, "blob", 4)) {
        rc = fail(r, ITL_ART_E_CORRUPT, "compact layout holds %zu tensors, expected only 'blob'", ne);
        goto out;
    }
    if (strcmp(ents[0].torch, "torch.uint8") || ents[0].ndim != 1) {
        rc = fail(r, ITL_ART_E_CORRUPT, "compact blob is %s of %d dimensions, expected 1-D uint8", ents[0].torch, ents[0].ndim);
        goto out;
    }
    const uint8_t *blob = data + ents[0].start;
    size_t blob_n = (size_t)(ents[0].end - ents[0].start);
    int64_t weights = num_weights(&cfg);
    int64_t cap = (int64_t)blob_n * WEIGHTS_PER_BYTE;
    if (weights > (cap > SMALL_MODEL_WEIGHTS ? cap : SMALL_MODEL_WEIGHTS)) {
        rc = fail(r, ITL_ART_E_CORRUPT, "tensors disagree with the stored config: it describes a model of %lld weights but the file holds %zu values (%zu bytes); the file is corrupt or was altered (re-create it with `dvc repro`)",
                  (long long)weights, blob_n, blob_n);
        goto out;
    }
    /* the rebuilt tensor list: identity */
    if ((rc = build_plan(r, &plan, &cfg, prec, gs))) goto out;
    {
        int32_t id = META("identity");
        if (id < 0) {
            rc = fail(r, ITL_ART_E_CORRUPT, "compact layout has no 'identity' field: the file was not written by iteralite; re-create it with `dvc repro`");
            goto out;
        }
        sha256_t s;
        uint8_t dg[32];
        char hx[65], shp[96];
        sha_init(&s);
        for (size_t q = 0; q < plan.n; q++) {
            const tdesc *t = &plan.t[q];
            shape_text(t, shp, sizeof shp, 0);
            sha_update(&s, t->name, strlen(t->name));
            sha_update(&s, "|", 1);
            sha_update(&s, DT_NAME[t->dtype], strlen(DT_NAME[t->dtype]));
            sha_update(&s, "|", 1);
            sha_update(&s, shp, strlen(shp));
            sha_update(&s, "\n", 1);
        }
        sha_final(&s, dg);
        hex(dg, 8, hx);
        if (hj.nodes[id].s_len != 16 || memcmp(hj.pool + hj.nodes[id].s_off, hx, 16)) {
            rc = fail(r, ITL_ART_E_CORRUPT, "compact layout: the file's tensor list (names, dtypes, shapes in order) does not match this code's model; rebuild it with `dvc repro`");
            goto out;
        }
    }
    /* the index */
    int32_t ix = META("index");
    if (ix < 0) { rc = fail(r, ITL_ART_E_CORRUPT, "compact layout has no index"); goto out; }
    size_t ilen = hj.nodes[ix].s_len, nraw = 0;
    index = malloc(ilen / 4 * 3 + 4);
    lens = calloc(plan.n + 1, sizeof *lens);
    cids = calloc(plan.n + 1, sizeof *cids);
    if (!index || !lens || !cids) { rc = fail(r, ITL_ART_E_NOMEM, "out of memory"); goto out; }
    int br = b64decode(hj.pool + hj.nodes[ix].s_off, ilen, index, &nraw);
    if (br) {
        rc = fail(r, ITL_ART_E_CORRUPT, br == -1 ? "compact index is not base64" : "compact index is not in canonical base64");
        goto out;
    }
    size_t pos = 0, count = 0;
    while (pos < nraw) {
        uint64_t v;
        int vr = varint(index, nraw, &pos, 10, &v);
        if (vr) { rc = fail(r, ITL_ART_E_CORRUPT, "compact index %s an entry", varint_why(vr)); goto out; }
        if (count < plan.n) {
            cids[count] = (int)(v & 7);
            lens[count] = v >> 3;
        }
        count++;
    }
    if (count != plan.n) {
        rc = fail(r, ITL_ART_E_CORRUPT, "compact index lists %zu tensors; the stored config builds %zu", count, plan.n);
        goto out;
    }
    uint64_t total = 0;
    for (size_t q = 0; q < plan.n; q++) {
        const tdesc *t = &plan.t[q];
        if (cids[q] >= N_CODECS) {
            rc = fail(r, ITL_ART_E_UNSUPPORTED, "compact index: tensor '%s' has codec id %d; this reader knows 0 (raw), 1 (rans), 2 (f16), 3 (grid), 4 (rans-prev), 5 (rans-rows)",
                      t->name, cids[q]);
            goto out;
        }
        int implied = cids[q] == C_RAW || cids[q] == C_F16;
        if (implied && lens[q]) {
            rc = fail(r, ITL_ART_E_CORRUPT, "compact index: tensor '%s' is stored %s but its entry carries a length (%llu); the stored config implies it",
                      t->name, CODEC_NAMES[cids[q]], (unsigned long long)lens[q]);
            goto out;
        }
        if (cids[q] == C_RAW) lens[q] = (uint64_t)t->numel * (uint64_t)DT_SIZE[t->dtype];
        if (cids[q] == C_F16) lens[q] = 2 * (uint64_t)t->numel;
        if (lens[q] > blob_n) total = UINT64_MAX / 2; /* covers more than the blob: refused below */
        else if (total < UINT64_MAX / 4) total += lens[q];
    }
    if (total != blob_n) {
        rc = fail(r, ITL_ART_E_CORRUPT, "compact index covers %llu bytes; the blob holds %zu", (unsigned long long)total, blob_n);
        goto out;
    }
    for (size_t q = 0, at = 0; q < plan.n; q++) {
        if ((rc = decode_tensor(r, &plan.t[q], cids[q], blob + at, (size_t)lens[q]))) goto out;
        at += (size_t)lens[q];
    }
    char why[256];
    if (itl_check_model(&r->a->model, why, (int)sizeof why)) {
        rc = fail(r, ITL_ART_E_MODEL, "the native step refuses the decoded model: %s", why);
        goto out;
    }
out:
    json_free(&hj);
    free(ents);
    free(fields);
    free(plan.t);
    free(plan.mis);
    free(index);
    free(lens);
    free(cids);
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
    rd_t r = {err, err_len, NULL};
    if (!buf || !out) return fail(&r, ITL_ART_E_ARG, "null argument");
    r.a = calloc(1, sizeof *r.a);
    if (!r.a) return fail(&r, ITL_ART_E_NOMEM, "out of memory");
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
    rd_t r = {err, err_len, NULL};
    if (!path || !out) return fail(&r, ITL_ART_E_ARG, "null argument");
    struct stat st;
    if (stat(path, &st)) return fail(&r, ITL_ART_E_IO, "%s: cannot open the artifact: %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) return fail(&r, ITL_ART_E_IO, "%s: is a directory, not an artifact file", path);
    if (!S_ISREG(st.st_mode)) return fail(&r, ITL_ART_E_IO, "%s: is not a regular file", path);
    if ((uint64_t)st.st_size > MAX_FILE) return fail(&r, ITL_ART_E_FORMAT, "%s: is %lld bytes, too large to be an artifact", path, (long long)st.st_size);
    FILE *f = fopen(path, "rb");
    if (!f) return fail(&r, ITL_ART_E_IO, "%s: cannot open the artifact: %s", path, strerror(errno));
    size_t cap = (size_t)st.st_size + 1, n = 0;
    uint8_t *buf = malloc(cap);
    if (!buf) { fclose(f); return fail(&r, ITL_ART_E_NOMEM, "%s: out of memory", path); }
    n = fread(buf, 1, cap, f);
    int bad = ferror(f);
    fclose(f);
    if (bad) { free(buf); return fail(&r, ITL_ART_E_IO, "%s: cannot read the artifact", path); }
    char why[1024];
    int rc = itl_artifact_load(buf, n, out, why, sizeof why);
    free(buf);
    if (rc) return fail(&r, rc, "%s: %s", path, why);
    return 0;
}

const itl_model *itl_artifact_model(const itl_artifact *a) { return a ? &a->model : NULL; }

const char *itl_artifact_tokenizer_sha256(const itl_artifact *a) { return a ? a->tok_sha : ""; }

int64_t itl_artifact_resident_bytes(const itl_artifact *a) { return a ? a->resident : 0; }

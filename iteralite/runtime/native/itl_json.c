/* The artifact reader's bounded JSON parser (itl_json.h): recursive descent over a byte buffer
 * into a flat node array. Numbers keep only what the reader needs: whether the literal is an
 * integer and, if so, its value (or that it is beyond int64). */
#include <stdlib.h>
#include <string.h>

#include "itl_json.h"

#define JSON_MAX_DEPTH 64
#define JSON_MAX_MEMBERS 4096
#define JSON_MAX_NODES (1 << 20) /* real headers hold a few hundred values */

void itl_json_free(itl_json *j) {
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

static int32_t j_new(itl_json *j, int type) {
    if (j->nn == j->cap) {
        size_t cap = j->cap ? 2 * j->cap : 64;
        itl_jnode *n = realloc(j->nodes, cap * sizeof *n);
        if (!n) { j->err = "out of memory"; return -1; }
        j->nodes = n;
        j->cap = cap;
    }
    if (j->nn >= JSON_MAX_NODES) { j->err = "too many values"; return -1; }
    itl_jnode *x = &j->nodes[j->nn];
    memset(x, 0, sizeof *x);
    x->type = type;
    x->first = x->next = -1;
    return (int32_t)j->nn++;
}

static void j_ws(itl_json *j) {
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

static void put_utf8(itl_json *j, uint32_t cp) {
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
static int j_string(itl_json *j, size_t *off, size_t *len) {
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

static int32_t j_value(itl_json *j, int depth);

static int32_t j_number(itl_json *j) {
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
    int32_t id = j_new(j, ITL_J_NUM);
    if (id < 0) return -1;
    j->nodes[id].is_int = is_int;
    j->nodes[id].big = big;
    j->nodes[id].ival = neg ? -v : v;
    return id;
}

static int j_lit(itl_json *j, const char *w) {
    size_t k = strlen(w);
    if (j->n - j->pos < k || memcmp(j->p + j->pos, w, k)) return 0;
    j->pos += k;
    return 1;
}

static int32_t j_value(itl_json *j, int depth) {
    if (depth > JSON_MAX_DEPTH) { j->err = "nested too deeply"; return -1; }
    j_ws(j);
    if (j->pos >= j->n) { j->err = "unexpected end"; return -1; }
    uint8_t c = j->p[j->pos];
    if (c == '{' || c == '[') {
        int obj = c == '{';
        int32_t id = j_new(j, obj ? ITL_J_OBJ : ITL_J_ARR), last = -1;
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
        int32_t id = j_new(j, ITL_J_STR);
        if (id < 0) return -1;
        size_t o, l;
        if (!j_string(j, &o, &l)) return -1;
        j->nodes[id].s_off = o;
        j->nodes[id].s_len = l;
        return id;
    }
    if (c == '-' || (c >= '0' && c <= '9')) return j_number(j);
    if (j_lit(j, "true") || j_lit(j, "false")) {
        int32_t id = j_new(j, ITL_J_BOOL);
        if (id >= 0) j->nodes[id].bval = j->p[j->pos - 1] == 'e' && j->p[j->pos - 2] == 'u';
        return id;
    }
    if (j_lit(j, "null")) return j_new(j, ITL_J_NULL);
    j->err = "unexpected character";
    return -1;
}

/* Parse text[0..n) as one JSON value; the root node index, or -1 with j->err set. */
int32_t itl_json_parse(itl_json *j, const uint8_t *text, size_t n) {
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

int32_t itl_json_get(const itl_json *j, int32_t obj, const char *key) {
    if (obj < 0 || j->nodes[obj].type != ITL_J_OBJ) return -1;
    size_t k = strlen(key);
    for (int32_t c = j->nodes[obj].first; c >= 0; c = j->nodes[c].next)
        if (j->nodes[c].k_len == k && !memcmp(j->pool + j->nodes[c].k_off, key, k)) return c;
    return -1;
}

int itl_json_streq(const itl_json *j, int32_t id, const char *s) {
    return id >= 0 && j->nodes[id].type == ITL_J_STR && j->nodes[id].s_len == strlen(s) &&
           !memcmp(j->pool + j->nodes[id].s_off, s, j->nodes[id].s_len);
}

int itl_json_isint(const itl_json *j, int32_t id) {
    return id >= 0 && j->nodes[id].type == ITL_J_NUM && j->nodes[id].is_int;
}

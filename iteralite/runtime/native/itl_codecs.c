/* The compact layout's codecs (itl_codecs.h): fp16 conversion, varints and base64 (the index),
 * and the decoders of raw, rans (itl_rans.c), f16, grid (io/grid.py), rans-prev and rans-rows
 * (quant/context.py), each the exact inverse of its Python encoder. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "itl_codecs.h"

/* itl_rans.c */
int itl_rans_decode(const uint8_t *blob, size_t len, uint8_t *out, uint64_t cap, uint64_t *n_out);

#define MAX_COUNT ((int64_t)1 << 26)
#define MAX_GROUPS (1 << 16)

static const char *CODEC_NAMES[ITL_N_CODECS] = {"raw", "rans", "f16", "grid", "rans-prev", "rans-rows"};

const char *itl_codec_name(int cid) { return CODEC_NAMES[cid]; }

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

float itl_half_to_float(uint16_t h) { return h2f(h); }

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
static int rans_exact(itl_rd *r, const char *name, const char *what, const uint8_t *blob, size_t len, uint8_t *out,
                      int64_t count, int n_symbols) {
    uint64_t got = 0;
    int rc = itl_rans_decode(blob, len, out, (uint64_t)count, &got);
    if (rc == -6 || (rc == 0 && got != (uint64_t)count))
        return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' %sentropy blob holds %llu codes, expected %lld", name, what,
                           (unsigned long long)got, (long long)count);
    if (rc) return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' %sentropy blob is corrupt (%s)", name, what, rans_why(rc));
    for (int64_t i = 0; i < count; i++)
        if (out[i] >= n_symbols)
            return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' %sentropy blob holds a code %d, but the tensor stores %d-symbol codes",
                               name, what, out[i], n_symbols);
    return 0;
}

/* k streams from pos (k - 1 length varints, the last takes the rest) */
static int split_streams(itl_rd *r, const char *name, const char *what, const uint8_t *b, size_t len, size_t pos,
                         int64_t k, size_t *off, size_t *sl) {
    uint64_t total = 0, v;
    for (int64_t s = 0; s + 1 < k; s++) {
        int vr = varint(b, len, &pos, 5, &v);
        if (vr) return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' %s blob %s a stream length", name, what, varint_why(vr));
        sl[s] = (size_t)v;
        total += v;
    }
    if (total > len - pos)
        return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' %s blob is truncated: its stream lengths cover %llu bytes, %llu remain",
                           name, what, (unsigned long long)total, (unsigned long long)(len - pos));
    sl[k - 1] = (size_t)(len - pos - total);
    for (int64_t s = 0; s < k; s++) {
        off[s] = pos;
        pos += sl[s];
    }
    return 0;
}

static int dec_prev(itl_rd *r, const char *name, const uint8_t *b, size_t len, int nsym, int64_t count, uint8_t *out) {
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
        if (vr) return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' rans-prev blob %s context %d's count", name, varint_why(vr), c);
        if (m == 0) return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' rans-prev blob stores an empty stream for context %d", name, c);
        cnt[c] = (int64_t)m;
        sum += (int64_t)m;
        if (sum > count) break;
    }
    if (sum != count)
        return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' rans-prev blob's streams hold %lld codes, expected %lld", name,
                           (long long)sum, (long long)count);
    uint8_t *dec = malloc((size_t)count + 1);
    if (!dec) return itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory");
    start[0] = 0;
    for (int c = 0; c < nsym; c++) start[c + 1] = start[c] + cnt[c];
    for (int c = 0; c < nsym && !rc; c++) {
        at[c] = start[c];
        if (!sl[c]) continue;
        uint8_t *tmp = malloc(sl[c] + 2);
        if (!tmp) { rc = itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory"); break; }
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
            rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' rans-prev blob's stream for context %d runs out at code %lld: it is corrupt",
                             name, prev, (long long)i);
            break;
        }
        out[i] = dec[at[prev]++];
        prev = out[i];
    }
    free(dec);
    return rc;
}

static int dec_rows(itl_rd *r, const char *name, const uint8_t *b, size_t len, int nsym, int64_t count, uint8_t *out) {
    size_t pos = 0;
    uint64_t G;
    int vr = varint(b, len, &pos, 5, &G);
    if (vr) return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' rans-rows blob %s the group count", name, varint_why(vr));
    int64_t limit = count > 1 ? count : 1;
    if (limit > MAX_GROUPS) limit = MAX_GROUPS;
    if (G < 1 || (int64_t)G > limit)
        return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' rans-rows blob has %llu groups; %lld codes allow 1 to %lld", name,
                           (unsigned long long)G, (long long)count, (long long)limit);
    size_t *off = malloc(G * sizeof *off), *sl = malloc(G * sizeof *sl);
    if (!off || !sl) { free(off); free(sl); return itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory"); }
    int rc = split_streams(r, name, "rans-rows", b, len, pos, (int64_t)G, off, sl);
    for (uint64_t g = 0; g < G && !rc; g++) {
        int64_t lo = (int64_t)g * count / (int64_t)G, hi = (int64_t)(g + 1) * count / (int64_t)G;
        if ((sl[g] > 0) != (hi > lo)) {
            rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' rans-rows blob's stream for group %llu is %llu bytes for %lld codes",
                             name, (unsigned long long)g, (unsigned long long)sl[g], (long long)(hi - lo));
            break;
        }
        if (!sl[g]) continue;
        uint8_t *tmp = malloc(sl[g] + 16);
        if (!tmp) { rc = itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory"); break; }
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
static int dec_grid(itl_rd *r, const char *name, const uint8_t *b, size_t len, int64_t n, uint16_t *out) {
    if (len < 5) return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' grid blob is %zu bytes, shorter than its 5-byte head", name, len);
    int kind = b[0] >> 4, bits = b[0] & 15;
    if (kind > 1 || bits < 1 || bits > 8)
        return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' grid blob has kind %d / %d bits; known kinds [0, 1] with 1..8 bits", name,
                           kind, bits);
    uint16_t hlo = rd16(b + 1), hhi = rd16(b + 3);
    double lo = h2f(hlo), hi = h2f(hhi);
    if (!(h_finite(hlo) && h_finite(hhi) && lo <= hi && (kind != 1 || lo > 0)))
        return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' grid blob has range [%g, %g], not a valid %s grid", name, lo, hi,
                           kind ? "log" : "linear");
    int64_t want = 5 + (n * bits + 7) / 8;
    if ((int64_t)len != want)
        return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' grid blob is %zu bytes; %lld values at %d bits take %lld", name, len,
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
    if (!idx) return itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory");
    unpack_codes(b + 5, len - 5, bits, n, idx);
    for (int64_t i = 0; i < n; i++) out[i] = g[idx[i]];
    free(idx);
    return 0;
}

/* ------------------------------------------------------------------------- one tensor */

int itl_decode_codes(itl_rd *r, const char *name, int cid, const uint8_t *data, size_t len, int bits, int64_t count,
                     uint8_t **codes_out) {
    *codes_out = NULL;
    if (cid == ITL_CODEC_F16)
        return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' is stored as f16 but the model holds a torch.uint8 tensor", name);
    if (cid == ITL_CODEC_GRID)
        return itl_rd_fail(r, ITL_ART_E_CORRUPT, "'%s' is stored on a grid but the model holds a torch.uint8 tensor", name);
    if (count > MAX_COUNT && cid != ITL_CODEC_RAW)
        return itl_rd_fail(r, ITL_ART_E_UNSUPPORTED, "'%s' holds %lld codes, more than an entropy blob may", name,
                           (long long)count);
    uint8_t *codes = malloc((size_t)count + 1);
    if (!codes) return itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory");
    int nsym = 1 << bits, rc = 0;
    if (cid == ITL_CODEC_RAW) unpack_codes(data, len, bits, count, codes);
    else if (cid == ITL_CODEC_RANS) rc = rans_exact(r, name, "", data, len, codes, count, nsym);
    else if (cid == ITL_CODEC_PREV) rc = dec_prev(r, name, data, len, nsym, count, codes);
    else rc = dec_rows(r, name, data, len, nsym, count, codes);
    if (rc) {
        free(codes);
        return rc;
    }
    *codes_out = codes;
    return 0;
}

int itl_decode_half(itl_rd *r, const char *name, int cid, const uint8_t *data, size_t len, int64_t n, uint16_t **out) {
    *out = NULL;
    int rc = 0;
    uint16_t *h = malloc((size_t)n * 2 + 2);
    if (!h) return itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory");
    if (cid == ITL_CODEC_GRID) rc = dec_grid(r, name, data, len, n, h);
    else
        for (int64_t i = 0; i < n; i++) h[i] = rd16(data + 2 * i); /* raw fp16 or the f16 codec */
    for (int64_t i = 0; i < n && !rc; i++)
        if (!h_finite(h[i]))
            rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "tensor '%s' holds NaN/inf values: the model is unusable (a diverged run or a damaged file); re-create it with `dvc repro`", name);
    if (rc) {
        free(h);
        return rc;
    }
    *out = h;
    return 0;
}

int itl_decode_f32(itl_rd *r, const char *name, const uint8_t *data, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)data[4 * i] | (uint32_t)data[4 * i + 1] << 8 | (uint32_t)data[4 * i + 2] << 16 |
                        (uint32_t)data[4 * i + 3] << 24;
        float f;
        memcpy(&f, &bits, 4);
        if (!isfinite(f))
            return itl_rd_fail(r, ITL_ART_E_CORRUPT, "tensor '%s' holds NaN/inf values: the model is unusable (a diverged run or a damaged file); re-create it with `dvc repro`", name);
        out[i] = f;
    }
    return 0;
}

/* ------------------------------------------------------------------------- the index */

int itl_read_index(itl_rd *r, const char *b64, size_t b64_len, size_t n, int *cids, uint64_t *lens) {
    size_t nraw = 0;
    uint8_t *index = malloc(b64_len / 4 * 3 + 4);
    if (!index) return itl_rd_fail(r, ITL_ART_E_NOMEM, "out of memory");
    int rc = 0, br = b64decode(b64, b64_len, index, &nraw);
    if (br) {
        rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, br == -1 ? "compact index is not base64" : "compact index is not in canonical base64");
        goto out;
    }
    size_t pos = 0, count = 0;
    while (pos < nraw) {
        uint64_t v;
        int vr = varint(index, nraw, &pos, 10, &v);
        if (vr) { rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "compact index %s an entry", varint_why(vr)); goto out; }
        if (count < n) {
            cids[count] = (int)(v & 7);
            lens[count] = v >> 3;
        }
        count++;
    }
    if (count != n)
        rc = itl_rd_fail(r, ITL_ART_E_CORRUPT, "compact index lists %zu tensors; the stored config builds %zu", count, n);
out:
    free(index);
    return rc;
}

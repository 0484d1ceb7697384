/* rANS coder of entropy-coded weight codes (iteralite/quant/entropy.py documents the blob format).
 * C99, no dependencies, no allocation: the caller owns every buffer. Every read of the blob is
 * bounds-checked; a malformed blob returns a negative ITL_RANS_E_* code, never reads outside
 * [blob, blob + len) and never writes past out[cap - 1].
 *
 * Coder: 64-bit state, 32-bit words, 24-bit weights w_i = q_i << (24 - precision). The encoder
 * starts at the sentinel 2**24 and pushes words in order; the decoder pops them from the end and
 * must land exactly on the sentinel with every word consumed. */
#include <stddef.h>
#include <stdint.h>

#define ITL_RANS_OK 0
#define ITL_RANS_E_ARG (-1)       /* null pointer or bad argument */
#define ITL_RANS_E_TRUNCATED (-2) /* the blob ends inside the header */
#define ITL_RANS_E_VERSION (-3)
#define ITL_RANS_E_PRECISION (-4)
#define ITL_RANS_E_VARINT (-5)    /* over-long or longer than 5 bytes */
#define ITL_RANS_E_COUNT (-6)     /* count > MAX_COUNT or > cap */
#define ITL_RANS_E_BITMAP (-7)    /* a symbol >= n_symbols is marked */
#define ITL_RANS_E_SYMBOLS (-8)   /* distinct symbols do not fit the count */
#define ITL_RANS_E_TABLE (-9)     /* a frequency < 1 or a sum != 2**precision */
#define ITL_RANS_E_WORDS (-10)    /* word count does not fit the table or the blob's size */
#define ITL_RANS_E_PAYLOAD (-11)  /* the payload does not decode to exactly `count` codes */

#define VERSION 1
#define CODER_PRECISION 24
#define SENTINEL ((uint64_t)1 << CODER_PRECISION)
#define MIN_PRECISION 8
#define MAX_PRECISION 24
#define MAX_COUNT ((uint64_t)1 << 26)
#define MAX_VARINT 5
#define LUT_MAX_PRECISION 16 /* slot -> symbol table on the stack up to 2**16 bytes */

static int read_varint(const uint8_t *b, size_t len, size_t *pos, uint64_t *v) {
    uint64_t x = 0;
    for (int i = 0; i < MAX_VARINT; i++) {
        if (*pos + (size_t)i >= len) return ITL_RANS_E_TRUNCATED;
        uint8_t c = b[*pos + (size_t)i];
        x |= (uint64_t)(c & 0x7F) << (7 * i);
        if (!(c & 0x80)) {
            if (c == 0 && i > 0) return ITL_RANS_E_VARINT;
            *pos += (size_t)i + 1;
            *v = x;
            return ITL_RANS_OK;
        }
    }
    return ITL_RANS_E_VARINT;
}

static uint32_t load_word(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Decode the blob (len bytes) into out (cap bytes). *n_out: the header's count on success and on
 * ITL_RANS_E_COUNT; the number of codes decoded before the payload ran out on ITL_RANS_E_PAYLOAD.
 * out == NULL: validate the header only and report its count in *n_out. */
int itl_rans_decode(const uint8_t *blob, size_t len, uint8_t *out, uint64_t cap, uint64_t *n_out) {
    if (!blob || !n_out) return ITL_RANS_E_ARG;
    *n_out = 0;
    if (len < 3) return ITL_RANS_E_TRUNCATED;
    if (blob[0] != VERSION) return ITL_RANS_E_VERSION;
    unsigned n_symbols = (unsigned)blob[1] + 1, precision = blob[2];
    if (precision < MIN_PRECISION || precision > MAX_PRECISION) return ITL_RANS_E_PRECISION;
    size_t pos = 3;
    uint64_t count, v;
    int rc = read_varint(blob, len, &pos, &count);
    if (rc) return rc;
    if (count > MAX_COUNT) return ITL_RANS_E_COUNT;
    size_t nmap = (n_symbols + 7) / 8;
    if (len - pos < nmap) return ITL_RANS_E_TRUNCATED;
    uint8_t symbols[256];
    unsigned k = 0;
    for (unsigned s = 0; s < nmap * 8; s++) {
        if (blob[pos + s / 8] >> (s % 8) & 1) {
            if (s >= n_symbols) return ITL_RANS_E_BITMAP;
            symbols[k++] = (uint8_t)s;
        }
    }
    pos += nmap;
    if ((count == 0) != (k == 0) || k > count) return ITL_RANS_E_SYMBOLS;
    uint64_t total = (uint64_t)1 << precision, sum = 0;
    uint32_t freq[256], cum[257];
    if (k >= 2) {
        for (unsigned i = 0; i + 1 < k; i++) {
            if ((rc = read_varint(blob, len, &pos, &v))) return rc;
            if (v < 1 || v >= total) return ITL_RANS_E_TABLE;
            freq[i] = (uint32_t)v;
            sum += v; /* < 256 * 2**24: no overflow */
        }
        if (sum >= total) return ITL_RANS_E_TABLE;
        freq[k - 1] = (uint32_t)(total - sum);
    }
    uint64_t n_words;
    if ((rc = read_varint(blob, len, &pos, &n_words))) return rc;
    if ((k >= 2) != (n_words >= 1)) return ITL_RANS_E_WORDS;
    if ((uint64_t)(len - pos) / 4 != n_words || (len - pos) % 4) return ITL_RANS_E_WORDS;
    const uint8_t *words = blob + pos;
    if (n_words && load_word(words + 4 * (n_words - 1)) == 0) return ITL_RANS_E_PAYLOAD;
    if (!out) {
        *n_out = count;
        return ITL_RANS_OK;
    }
    if (count > cap) {
        *n_out = count;
        return ITL_RANS_E_COUNT;
    }
    if (k <= 1) {
        for (uint64_t j = 0; j < count; j++) out[j] = symbols[0];
        *n_out = count;
        return ITL_RANS_OK;
    }

    const unsigned shift = CODER_PRECISION - precision;
    cum[0] = 0;
    for (unsigned i = 0; i < k; i++) cum[i + 1] = cum[i] + (freq[i] << shift);
    uint8_t lut[1u << LUT_MAX_PRECISION]; /* slot (quantile >> shift) -> dense symbol index */
    const int use_lut = precision <= LUT_MAX_PRECISION;
    if (use_lut)
        for (unsigned i = 0; i < k; i++)
            for (uint32_t s = cum[i] >> shift; s < cum[i + 1] >> shift; s++) lut[s] = (uint8_t)i;

    uint64_t wpos = n_words;
    uint64_t state = load_word(words + 4 * --wpos);
    while (wpos && state < ((uint64_t)1 << 32)) state = state << 32 | load_word(words + 4 * --wpos);
    const uint64_t mask = SENTINEL - 1;
    uint64_t done = 0;
    for (; done < count; done++) {
        if (!wpos && state <= SENTINEL) break; /* exhausted: the count lies */
        uint32_t quantile = (uint32_t)(state & mask), i;
        if (use_lut) {
            i = lut[quantile >> shift];
        } else { /* largest i with cum[i] <= quantile */
            uint32_t lo = 0, hi = k;
            while (hi - lo > 1) {
                uint32_t mid = (lo + hi) / 2;
                if (cum[mid] <= quantile) lo = mid; else hi = mid;
            }
            i = lo;
        }
        /* < ((state >> 24) + 1) * w <= 2**40 * 2**24: never overflows */
        state = (state >> CODER_PRECISION) * (uint64_t)(freq[i] << shift) + quantile - cum[i];
        if (state < ((uint64_t)1 << 32) && wpos) state = state << 32 | load_word(words + 4 * --wpos);
        out[done] = symbols[i];
    }
    *n_out = done;
    if (done != count || wpos || state != SENTINEL) return ITL_RANS_E_PAYLOAD;
    return ITL_RANS_OK;
}

/* Encode n dense symbol indices idx[j] < k with frequencies freq (k of them, each >= 1, summing to
 * 2**precision) into words (cap of them; n + 2 always suffice). Returns the number of words
 * written, or a negative ITL_RANS_E_* code (ITL_RANS_E_TABLE for a bad table or index). */
int64_t itl_rans_encode(const uint8_t *idx, uint64_t n, const uint32_t *freq, uint32_t k,
                        int precision, uint32_t *words, uint64_t cap) {
    if (!freq || !words || (n && !idx) || k < 2 || k > 256) return ITL_RANS_E_ARG;
    if (precision < MIN_PRECISION || precision > MAX_PRECISION) return ITL_RANS_E_PRECISION;
    if (n > MAX_COUNT) return ITL_RANS_E_COUNT;
    const unsigned shift = CODER_PRECISION - (unsigned)precision;
    uint32_t cum[257];
    uint64_t sum = 0;
    cum[0] = 0;
    for (uint32_t i = 0; i < k; i++) {
        if (freq[i] < 1) return ITL_RANS_E_TABLE;
        sum += freq[i];
        if (sum > ((uint64_t)1 << precision)) return ITL_RANS_E_TABLE;
        cum[i + 1] = (uint32_t)(sum << shift);
    }
    if (sum != ((uint64_t)1 << precision)) return ITL_RANS_E_TABLE;
    uint64_t state = SENTINEL, nw = 0;
    for (uint64_t j = n; j-- > 0;) {
        uint32_t i = idx[j];
        if (i >= k) return ITL_RANS_E_TABLE;
        uint64_t w = (uint64_t)freq[i] << shift;
        if ((state >> (64 - CODER_PRECISION)) >= w) { /* keep the next state below 2**64 */
            if (nw >= cap) return ITL_RANS_E_WORDS;
            words[nw++] = (uint32_t)state;
            state >>= 32;
        }
        state = (state / w) << CODER_PRECISION | (state % w + cum[i]);
    }
    while (state) { /* flush: least significant word first, so the last word is nonzero */
        if (nw >= cap) return ITL_RANS_E_WORDS;
        words[nw++] = (uint32_t)state;
        state >>= 32;
    }
    return (int64_t)nw;
}

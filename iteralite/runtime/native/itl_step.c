/* The native single-token decode step of IteraLite, straight from packed integer codes.

   One call runs the whole step of every layer: RMSNorm, in_proj, the conv-state shift and taps,
   dt/B/C, the state update, the gate, out_proj, the router and only the top-k experts (sparse
   MoE), then the final norm and the tied head. A factorised embedding (rank r > 0: a (vocab, r)
   table) adds two matrices: x = embed_in . E[tok] after the lookup and logits = E . (head_proj . xn)
   at the head; rank 0 is the dense (vocab, d) table, with embed_in / head_proj unread. Weights stay packed (see itl_mat); every matmul
   first quantizes its input vector to int8 per block (block = the weight's group size), then
   computes integer dot products per group and applies one float scale per group:

       y[o] = sum_g  s_w[o,g] * s_x[g] * ( sum_{i in g} q[o,i] * x8[i]  -  z[o,g] * sum_{i in g} x8[i] )

   fp16 weight matrices use the same int8 activations, dequantized, in float.

   Two code paths, chosen at run time: AVX2+FMA+F16C (`__attribute__((target))`, so the file
   builds with portable flags) and plain scalar C. itl_set_isa forces one (the tests run both;
   ITERALITE_NATIVE_ISA=scalar forces scalar from the environment).

   Loaded with ctypes (no Python C API); the structs mirror iteralite/runtime/native/layout.py.

   Every exported function checks its own inputs (null pointers, the model's sizes and pointers at
   itl_create via itl_check_model, the token range and the caller's buffer sizes at each step) and
   returns an ITL_ERR_* code (itl_strerror names it) instead of reading out of bounds; the checks
   run once per call, never inside the loops. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ITL_X86 1
#else
#define ITL_X86 0
#endif

#include "itl_step.h"

struct itl_ctx {
    uint32_t magic;  /* ITL_MAGIC while live, 0 once freed: catches a pointer that is not a context;
                        a freed one cannot be checked here (the caller must not pass it: Python's
                        wrapper clears its pointer before it frees) */
    const itl_model *m;
    size_t conv_n, ssm_n; /* state sizes the model needs */
    int isa;
    float *x, *xn, *xz, *xc, *dbc, *dt, *y, *up, *hid, *mo;
    int8_t *x8;     /* the quantized activation */
    int16_t *x16;   /* the same, widened to int16 (8-bit codes) */
    float *xs;      /* per block: its scale */
    int32_t *xsum;  /* per block: sum of its int8 values */
    float *xf;      /* dequantized activation (fp16 matrices) */
    uint8_t *row;   /* one row of unpacked codes */
};

/* ------------------------------------------------------------------------- fp16 */

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalize */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ------------------------------------------------------------------------- activations */

/* x (in) -> int8 per block of `block` (as int16), scale and sum per block. Rounds half to even
   (nearbyintf in the default mode), as torch.round does; the _ref twin divides the same way. */
static void quantize_act(itl_ctx *c, const float *x, int in, int block) {
    for (int b = 0; b < in / block; b++) {
        const float *xb = x + b * block;
        float amax = 0.f;
        for (int i = 0; i < block; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float s = amax / 127.f;
        if (s < 1e-12f) s = 1e-12f;
        int32_t sum = 0;
        for (int i = 0; i < block; i++) {
            float q = nearbyintf(xb[i] / s);
            q = q > 127.f ? 127.f : (q < -127.f ? -127.f : q);
            c->x16[b * block + i] = (int16_t)q;
            c->x8[b * block + i] = (int8_t)q;
            sum += (int32_t)q;
        }
        c->xs[b] = s;
        c->xsum[b] = sum;
    }
}

#if ITL_X86
/* The same quantization, 8 lanes at a time (blocks of a multiple of 8): the same IEEE division
   and round-half-to-even, so the same int8 values. */
__attribute__((target("avx2,fma,f16c")))
static void quantize_act_avx2(itl_ctx *c, const float *x, int in, int block) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 lim = _mm256_set1_ps(127.f), nlim = _mm256_set1_ps(-127.f);
    int32_t q[8];
    for (int b = 0; b < in / block; b++) {
        const float *xb = x + b * block;
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < block; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(xb + i), absmask));
        __m128 t = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        t = _mm_max_ps(t, _mm_movehl_ps(t, t));
        t = _mm_max_ss(t, _mm_shuffle_ps(t, t, 0x55));
        float s = _mm_cvtss_f32(t) / 127.f;
        if (s < 1e-12f) s = 1e-12f;
        __m256 vs = _mm256_set1_ps(s);
        int32_t sum = 0;
        for (int i = 0; i < block; i += 8) {
            __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xb + i), vs),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v = _mm256_min_ps(_mm256_max_ps(v, nlim), lim);
            _mm256_storeu_si256((__m256i *)q, _mm256_cvtps_epi32(v));
            for (int k = 0; k < 8; k++) {
                c->x16[b * block + i + k] = (int16_t)q[k];
                c->x8[b * block + i + k] = (int8_t)q[k];
                sum += q[k];
            }
        }
        c->xs[b] = s;
        c->xsum[b] = sum;
    }
}
#endif

/* ------------------------------------------------------------------------- scalar path */

static void unpack_row_scalar(const uint8_t *src, int bits, int in, uint8_t *dst) {
    if (bits == 8) { memcpy(dst, src, (size_t)in); return; }
    int per = 8 / bits, mask = (1 << bits) - 1;
    for (int i = 0; i < in; i++) dst[i] = (src[i / per] >> ((i % per) * bits)) & mask;
}

static void matvec_int_scalar(itl_ctx *c, const itl_mat *w, float *y) {
    int ng = w->in / w->group, g = w->group;
    for (int o = 0; o < w->out; o++) {
        unpack_row_scalar(w->codes + (size_t)o * w->rowbytes, w->bits, w->in, c->row);
        float acc = 0.f;
        for (int b = 0; b < ng; b++) {
            const uint8_t *q = c->row + b * g;
            const int16_t *xq = c->x16 + b * g;
            int32_t dot = 0;
            for (int i = 0; i < g; i++) dot += (int32_t)q[i] * (int32_t)xq[i];
            int32_t z = w->zeros[(size_t)b * w->out + o];
            acc += half_to_float(w->scales[(size_t)b * w->out + o]) * c->xs[b] * (float)(dot - z * c->xsum[b]);
        }
        y[o] = acc;
    }
}

static void matvec_f16_scalar(itl_ctx *c, const itl_mat *w, float *y) {
    for (int o = 0; o < w->out; o++) {
        const uint16_t *row = w->w16 + (size_t)o * w->in;
        float acc = 0.f;
        for (int i = 0; i < w->in; i++) acc += half_to_float(row[i]) * c->xf[i];
        y[o] = acc;
    }
}

/* ------------------------------------------------------------------------- AVX2 path */

#if ITL_X86
__attribute__((target("avx2,fma,f16c")))
static void unpack_row_avx2(const uint8_t *src, int bits, int in, uint8_t *dst) {
    int i = 0;
    if (bits == 4) {
        const __m128i lo = _mm_set1_epi8(0x0F);
        for (; i + 32 <= in; i += 32) {
            __m128i b = _mm_loadu_si128((const __m128i *)(src + i / 2));
            __m128i l = _mm_and_si128(b, lo), h = _mm_and_si128(_mm_srli_epi16(b, 4), lo);
            _mm_storeu_si128((__m128i *)(dst + i), _mm_unpacklo_epi8(l, h));
            _mm_storeu_si128((__m128i *)(dst + i + 16), _mm_unpackhi_epi8(l, h));
        }
        if (i + 16 <= in) {
            __m128i b = _mm_loadl_epi64((const __m128i *)(src + i / 2));
            __m128i l = _mm_and_si128(b, lo), h = _mm_and_si128(_mm_srli_epi16(b, 4), lo);
            _mm_storeu_si128((__m128i *)(dst + i), _mm_unpacklo_epi8(l, h));
            i += 16;
        }
    } else if (bits == 2) {
        const __m128i m = _mm_set1_epi8(0x03);
        for (; i + 32 <= in; i += 32) {
            __m128i b = _mm_loadl_epi64((const __m128i *)(src + i / 4));
            __m128i c0 = _mm_and_si128(b, m), c1 = _mm_and_si128(_mm_srli_epi16(b, 2), m);
            __m128i c2 = _mm_and_si128(_mm_srli_epi16(b, 4), m), c3 = _mm_and_si128(_mm_srli_epi16(b, 6), m);
            __m128i p01 = _mm_unpacklo_epi8(c0, c1), p23 = _mm_unpacklo_epi8(c2, c3);
            _mm_storeu_si128((__m128i *)(dst + i), _mm_unpacklo_epi16(p01, p23));
            _mm_storeu_si128((__m128i *)(dst + i + 16), _mm_unpackhi_epi16(p01, p23));
        }
        if (i + 16 <= in) {
            int32_t word;
            memcpy(&word, src + i / 4, 4);
            __m128i b = _mm_cvtsi32_si128(word);
            __m128i c0 = _mm_and_si128(b, m), c1 = _mm_and_si128(_mm_srli_epi16(b, 2), m);
            __m128i c2 = _mm_and_si128(_mm_srli_epi16(b, 4), m), c3 = _mm_and_si128(_mm_srli_epi16(b, 6), m);
            _mm_storeu_si128((__m128i *)(dst + i),
                             _mm_unpacklo_epi16(_mm_unpacklo_epi8(c0, c1), _mm_unpacklo_epi8(c2, c3)));
            i += 16;
        }
    } else {
        memcpy(dst, src, (size_t)in);
        return;
    }
    if (i < in) { /* the tail: whole bytes from i on (i is a multiple of 32) */
        int per = 8 / bits, mask = (1 << bits) - 1;
        for (; i < in; i++) dst[i] = (src[i / per] >> ((i % per) * bits)) & mask;
    }
}

__attribute__((target("avx2,fma,f16c")))
static inline int32_t hsum_epi32(__m128i s) {
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2,fma,f16c")))
static inline int32_t dot_u8_i16_avx2(const uint8_t *q, const int16_t *x, int n) {
    __m256i acc = _mm256_setzero_si256();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i qw = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q + i)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(qw, _mm256_loadu_si256((const __m256i *)(x + i))));
    }
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    if (i + 8 <= n) {
        __m128i qw = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(q + i)));
        s = _mm_add_epi32(s, _mm_madd_epi16(qw, _mm_loadu_si128((const __m128i *)(x + i))));
        i += 8;
    }
    int32_t dot = hsum_epi32(s);
    for (; i < n; i++) dot += (int32_t)q[i] * (int32_t)x[i];
    return dot;
}

/* Codes of at most 4 bits (<= 15): u8 x s8 pairs summed to int16 by maddubs cannot saturate
   (2 * 15 * 127 < 32767), so 32 products take one instruction. */
__attribute__((target("avx2,fma,f16c")))
static inline int32_t dot_u4_s8_avx2(const uint8_t *q, const int8_t *x, int n) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i p = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(q + i)),
                                         _mm256_loadu_si256((const __m256i *)(x + i)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
    }
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    const __m128i ones4 = _mm_set1_epi16(1);
    if (i + 16 <= n) {
        __m128i p = _mm_maddubs_epi16(_mm_loadu_si128((const __m128i *)(q + i)),
                                      _mm_loadu_si128((const __m128i *)(x + i)));
        s = _mm_add_epi32(s, _mm_madd_epi16(p, ones4));
        i += 16;
    }
    if (i + 8 <= n) { /* the upper 8 lanes load as zeros */
        __m128i p = _mm_maddubs_epi16(_mm_loadl_epi64((const __m128i *)(q + i)),
                                      _mm_loadl_epi64((const __m128i *)(x + i)));
        s = _mm_add_epi32(s, _mm_madd_epi16(p, ones4));
        i += 8;
    }
    int32_t dot = hsum_epi32(s);
    for (; i < n; i++) dot += (int32_t)q[i] * (int32_t)x[i];
    return dot;
}

/* Codes of one row's group, read straight from the packed row (no unpacked copy), dotted with
   the int8 activation: 8 int32 partial sums. Needs g % 8 == 0 (so a group starts on a byte). */
__attribute__((target("avx2,fma,f16c")))
static inline __m256i dot_group_avx2(const uint8_t *row, int bits, int start, int g, const int8_t *x8,
                                     const int16_t *x16) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m128i ones4 = _mm_set1_epi16(1), m4 = _mm_set1_epi8(0x0F), m2 = _mm_set1_epi8(0x03);
    __m256i acc = _mm256_setzero_si256();
    __m128i acc4 = _mm_setzero_si128();
    int i = 0;
    if (bits == 8) {
        for (; i + 16 <= g; i += 16) {
            __m256i q = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(row + start + i)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(q, _mm256_loadu_si256((const __m256i *)(x16 + start + i))));
        }
        if (i < g) { /* 8 left */
            __m128i q = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(row + start + i)));
            acc4 = _mm_madd_epi16(q, _mm_loadu_si128((const __m128i *)(x16 + start + i)));
        }
    } else if (bits == 4) {
        const uint8_t *src = row + start / 2;
        for (; i + 32 <= g; i += 32) {
            __m128i b = _mm_loadu_si128((const __m128i *)(src + i / 2));
            __m128i l = _mm_and_si128(b, m4), h = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
            __m256i q = _mm256_set_m128i(_mm_unpackhi_epi8(l, h), _mm_unpacklo_epi8(l, h));
            __m256i p = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)(x8 + start + i)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
        }
        for (; i + 8 <= g; i += 16) { /* 16 codes, or the last 8 (the upper lanes then meet zeros) */
            int n = g - i >= 16 ? 16 : 8;
            __m128i b;
            if (n == 16) {
                b = _mm_loadl_epi64((const __m128i *)(src + i / 2));
            } else {
                int32_t word;
                memcpy(&word, src + i / 2, 4);
                b = _mm_cvtsi32_si128(word);
            }
            __m128i l = _mm_and_si128(b, m4), h = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
            __m128i xv = n == 16 ? _mm_loadu_si128((const __m128i *)(x8 + start + i))
                                 : _mm_loadl_epi64((const __m128i *)(x8 + start + i));
            acc4 = _mm_add_epi32(acc4, _mm_madd_epi16(_mm_maddubs_epi16(_mm_unpacklo_epi8(l, h), xv), ones4));
        }
    } else { /* 2-bit */
        const uint8_t *src = row + start / 4;
        for (; i + 32 <= g; i += 32) {
            __m128i b = _mm_loadl_epi64((const __m128i *)(src + i / 4));
            __m128i c0 = _mm_and_si128(b, m2), c1 = _mm_and_si128(_mm_srli_epi16(b, 2), m2);
            __m128i c2 = _mm_and_si128(_mm_srli_epi16(b, 4), m2), c3 = _mm_and_si128(_mm_srli_epi16(b, 6), m2);
            __m128i p01 = _mm_unpacklo_epi8(c0, c1), p23 = _mm_unpacklo_epi8(c2, c3);
            __m256i q = _mm256_set_m128i(_mm_unpackhi_epi16(p01, p23), _mm_unpacklo_epi16(p01, p23));
            __m256i p = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)(x8 + start + i)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
        }
        for (; i + 8 <= g; i += 16) {
            int n = g - i >= 16 ? 16 : 8;
            int32_t word = 0;
            memcpy(&word, src + i / 4, (size_t)n / 4);
            __m128i b = _mm_cvtsi32_si128(word);
            __m128i c0 = _mm_and_si128(b, m2), c1 = _mm_and_si128(_mm_srli_epi16(b, 2), m2);
            __m128i c2 = _mm_and_si128(_mm_srli_epi16(b, 4), m2), c3 = _mm_and_si128(_mm_srli_epi16(b, 6), m2);
            __m128i q = _mm_unpacklo_epi16(_mm_unpacklo_epi8(c0, c1), _mm_unpacklo_epi8(c2, c3));
            __m128i xv = n == 16 ? _mm_loadu_si128((const __m128i *)(x8 + start + i))
                                 : _mm_loadl_epi64((const __m128i *)(x8 + start + i));
            acc4 = _mm_add_epi32(acc4, _mm_madd_epi16(_mm_maddubs_epi16(q, xv), ones4));
        }
    }
    return _mm256_add_epi32(acc, _mm256_zextsi128_si256(acc4));
}

/* 2- and 4-bit codes of a group of at most 64 (g % 8 == 0), activation vectors loaded once for
   all eight rows: the common shapes, with no per-chunk branching inside the row loop. */
__attribute__((target("avx2,fma,f16c")))
static inline __m128i unpack16_avx2(const uint8_t *src, int bits) {
    const __m128i m4 = _mm_set1_epi8(0x0F), m2 = _mm_set1_epi8(0x03);
    if (bits == 4) {
        __m128i b = _mm_loadl_epi64((const __m128i *)src);
        return _mm_unpacklo_epi8(_mm_and_si128(b, m4), _mm_and_si128(_mm_srli_epi16(b, 4), m4));
    }
    int32_t word;
    memcpy(&word, src, 4);
    __m128i b = _mm_cvtsi32_si128(word);
    __m128i c0 = _mm_and_si128(b, m2), c1 = _mm_and_si128(_mm_srli_epi16(b, 2), m2);
    __m128i c2 = _mm_and_si128(_mm_srli_epi16(b, 4), m2), c3 = _mm_and_si128(_mm_srli_epi16(b, 6), m2);
    return _mm_unpacklo_epi16(_mm_unpacklo_epi8(c0, c1), _mm_unpacklo_epi8(c2, c3));
}

/* 8 codes held in the low bytes of a word -> 8 bytes (the upper 8 lanes are zero or don't-care). */
__attribute__((target("avx2,fma,f16c")))
static inline __m128i unpack16_word(uint32_t word, int bits) {
    const __m128i m4 = _mm_set1_epi8(0x0F), m2 = _mm_set1_epi8(0x03);
    __m128i b = _mm_cvtsi32_si128((int32_t)word);
    if (bits == 4) return _mm_unpacklo_epi8(_mm_and_si128(b, m4), _mm_and_si128(_mm_srli_epi16(b, 4), m4));
    __m128i c0 = _mm_and_si128(b, m2), c1 = _mm_and_si128(_mm_srli_epi16(b, 2), m2);
    __m128i c2 = _mm_and_si128(_mm_srli_epi16(b, 4), m2), c3 = _mm_and_si128(_mm_srli_epi16(b, 6), m2);
    return _mm_unpacklo_epi16(_mm_unpacklo_epi8(c0, c1), _mm_unpacklo_epi8(c2, c3));
}

__attribute__((target("avx2,fma,f16c")))
static inline __m256i unpack32_avx2(const uint8_t *src, int bits) {
    const __m128i m4 = _mm_set1_epi8(0x0F), m2 = _mm_set1_epi8(0x03);
    if (bits == 4) {
        __m128i b = _mm_loadu_si128((const __m128i *)src);
        __m128i l = _mm_and_si128(b, m4), h = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
        return _mm256_set_m128i(_mm_unpackhi_epi8(l, h), _mm_unpacklo_epi8(l, h));
    }
    __m128i b = _mm_loadl_epi64((const __m128i *)src);
    __m128i c0 = _mm_and_si128(b, m2), c1 = _mm_and_si128(_mm_srli_epi16(b, 2), m2);
    __m128i c2 = _mm_and_si128(_mm_srli_epi16(b, 4), m2), c3 = _mm_and_si128(_mm_srli_epi16(b, 6), m2);
    __m128i p01 = _mm_unpacklo_epi8(c0, c1), p23 = _mm_unpacklo_epi8(c2, c3);
    return _mm256_set_m128i(_mm_unpackhi_epi16(p01, p23), _mm_unpacklo_epi16(p01, p23));
}

__attribute__((target("avx2,fma,f16c")))
static inline __m256i dot_small_group(const uint8_t *row, int bits, int start, int n32, int n16, int n8,
                                      const __m256i *x32, __m128i x16v, __m128i x8v) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m128i ones4 = _mm_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    __m128i acc4 = _mm_setzero_si128();
    int i = 0;
    for (int k = 0; k < n32; k++, i += 32)
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(
            _mm256_maddubs_epi16(unpack32_avx2(row + (start + i) * bits / 8, bits), x32[k]), ones));
    if (n16) {
        acc4 = _mm_madd_epi16(_mm_maddubs_epi16(unpack16_avx2(row + (start + i) * bits / 8, bits), x16v), ones4);
        i += 16;
    }
    if (n8) { /* 8 codes: 4 (4-bit) or 2 (2-bit) bytes, read as one word (a byte-wise copy into a
                 stack buffer stalls the wide load that follows); the upper activation lanes are zero */
        const uint8_t *src = row + (start + i) * bits / 8;
        uint32_t word;
        if (bits == 4) {
            memcpy(&word, src, 4);
        } else {
            uint16_t half;
            memcpy(&half, src, 2);
            word = half;
        }
        acc4 = _mm_add_epi32(acc4, _mm_madd_epi16(_mm_maddubs_epi16(unpack16_word(word, bits), x8v), ones4));
    }
    return _mm256_add_epi32(acc, _mm256_zextsi128_si256(acc4));
}

/* Eight rows at once: their group dots reduced to one vector of 8 sums, then the zero-point,
   scale and activation-scale arithmetic for all 8 in float lanes. `rows8_body` is inlined with
   constant (bits, n32, n16, n8) for the common small groups, so each shape gets a straight-line
   kernel with the eight rows' sums kept in registers. */
__attribute__((target("avx2,fma,f16c"), always_inline))
static inline void rows8_body(itl_ctx *c, const itl_mat *w, float *y, int o, const int fast, const int bits,
                              const int n32, const int n16, const int n8) {
    int ng = w->in / w->group, g = w->group;
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < ng; b++) {
        __m256i d[8];
        if (fast) {
            const int8_t *xa = c->x8 + b * g;
            __m256i x32[2];
            for (int k = 0; k < n32; k++) x32[k] = _mm256_loadu_si256((const __m256i *)(xa + 32 * k));
            __m128i x16v = n16 ? _mm_loadu_si128((const __m128i *)(xa + 32 * n32)) : _mm_setzero_si128();
            __m128i x8v = n8 ? _mm_loadl_epi64((const __m128i *)(xa + 32 * n32 + 16 * n16)) : _mm_setzero_si128();
            for (int r = 0; r < 8; r++)
                d[r] = dot_small_group(w->codes + (size_t)(o + r) * w->rowbytes, bits, b * g, n32, n16, n8,
                                       x32, x16v, x8v);
        } else {
            for (int r = 0; r < 8; r++)
                d[r] = dot_group_avx2(w->codes + (size_t)(o + r) * w->rowbytes, w->bits, b * g, g, c->x8, c->x16);
        }
        __m256i t0 = _mm256_hadd_epi32(d[0], d[1]), t1 = _mm256_hadd_epi32(d[2], d[3]);
        __m256i t2 = _mm256_hadd_epi32(d[4], d[5]), t3 = _mm256_hadd_epi32(d[6], d[7]);
        __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
        __m256i dots = _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20),
                                        _mm256_permute2x128_si256(u0, u1, 0x31));
        __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w->zeros + (size_t)b * w->out + o)));
        dots = _mm256_sub_epi32(dots, _mm256_mullo_epi32(z, _mm256_set1_epi32(c->xsum[b])));
        __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->scales + (size_t)b * w->out + o)));
        acc = _mm256_fmadd_ps(_mm256_mul_ps(s, _mm256_set1_ps(c->xs[b])), _mm256_cvtepi32_ps(dots), acc);
    }
    _mm256_storeu_ps(y + o, acc);
}

/* One specialised kernel per (bits, group) of the fast path: group = 8 * (4 * n32 + 2 * n16 + n8). */
#define ITL_ROWS8_FN(B, G)                                                                              \
    __attribute__((target("avx2,fma,f16c"))) static void rows8_b##B##_g##G(itl_ctx *c, const itl_mat *w, \
                                                                            float *y, int o) {          \
        rows8_body(c, w, y, o, 1, B, (G) / 32, ((G) % 32) / 16, ((G) % 16) / 8);                        \
    }
#define ITL_ROWS8_BITS(B) \
    ITL_ROWS8_FN(B, 8) ITL_ROWS8_FN(B, 16) ITL_ROWS8_FN(B, 24) ITL_ROWS8_FN(B, 32) \
    ITL_ROWS8_FN(B, 40) ITL_ROWS8_FN(B, 48) ITL_ROWS8_FN(B, 56) ITL_ROWS8_FN(B, 64)
ITL_ROWS8_BITS(2)
ITL_ROWS8_BITS(4)

typedef void (*itl_rows8_fn)(itl_ctx *, const itl_mat *, float *, int);
static const itl_rows8_fn ROWS8_FAST[2][8] = {
    {rows8_b2_g8, rows8_b2_g16, rows8_b2_g24, rows8_b2_g32, rows8_b2_g40, rows8_b2_g48, rows8_b2_g56, rows8_b2_g64},
    {rows8_b4_g8, rows8_b4_g16, rows8_b4_g24, rows8_b4_g32, rows8_b4_g40, rows8_b4_g48, rows8_b4_g56, rows8_b4_g64},
};

__attribute__((target("avx2,fma,f16c")))
static void rows8_generic(itl_ctx *c, const itl_mat *w, float *y, int o) {
    rows8_body(c, w, y, o, 0, w->bits, 0, 0, 0);
}

/* The 8-row kernel for a matrix (needs group % 8 == 0). */
static itl_rows8_fn rows8_kernel(const itl_mat *w) {
    if ((w->bits == 2 || w->bits == 4) && w->group <= 64) return ROWS8_FAST[w->bits == 4][w->group / 8 - 1];
    return rows8_generic;
}

__attribute__((target("avx2,fma,f16c")))
static void matvec_int_avx2(itl_ctx *c, const itl_mat *w, float *y) {
    int ng = w->in / w->group, g = w->group, small = w->bits <= 4;
    int o = 0;
    if (g % 8 == 0) {
        itl_rows8_fn kernel = rows8_kernel(w);
        for (; o + 8 <= w->out; o += 8) kernel(c, w, y, o);
    }
    for (; o < w->out; o++) {
        unpack_row_avx2(w->codes + (size_t)o * w->rowbytes, w->bits, w->in, c->row);
        float acc = 0.f;
        for (int b = 0; b < ng; b++) {
            int32_t dot = small ? dot_u4_s8_avx2(c->row + b * g, c->x8 + b * g, g)
                                : dot_u8_i16_avx2(c->row + b * g, c->x16 + b * g, g);
            int32_t z = w->zeros[(size_t)b * w->out + o];
            float s = _cvtsh_ss(w->scales[(size_t)b * w->out + o]);
            acc += s * c->xs[b] * (float)(dot - z * c->xsum[b]);
        }
        y[o] = acc;
    }
}

__attribute__((target("avx2,fma,f16c")))
static void matvec_f16_avx2(itl_ctx *c, const itl_mat *w, float *y) {
    for (int o = 0; o < w->out; o++) {
        const uint16_t *row = w->w16 + (size_t)o * w->in;
        __m256 acc = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= w->in; i += 8)
            acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + i))),
                                  _mm256_loadu_ps(c->xf + i), acc);
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
        float total = _mm_cvtss_f32(s);
        for (; i < w->in; i++) total += _cvtsh_ss(row[i]) * c->xf[i];
        y[o] = total;
    }
}

/* One (head, channel) row of the state: s = s * decay + xdt * B, returns s . C. */
__attribute__((target("avx2,fma,f16c")))
static float state_row_avx2(float *s, const float *B, const float *C, float decay, float xdt, int n) {
    __m256 vd = _mm256_set1_ps(decay), vx = _mm256_set1_ps(xdt), acc = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 sv = _mm256_fmadd_ps(_mm256_loadu_ps(s + j), vd, _mm256_mul_ps(vx, _mm256_loadu_ps(B + j)));
        _mm256_storeu_ps(s + j, sv);
        acc = _mm256_fmadd_ps(sv, _mm256_loadu_ps(C + j), acc);
    }
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_shuffle_ps(t, t, 0x55));
    float total = _mm_cvtss_f32(t);
    for (; j < n; j++) {
        s[j] = s[j] * decay + xdt * B[j];
        total += s[j] * C[j];
    }
    return total;
}
#endif

static float state_row_scalar(float *s, const float *B, const float *C, float decay, float xdt, int n) {
    float total = 0.f;
    for (int j = 0; j < n; j++) {
        s[j] = s[j] * decay + xdt * B[j];
        total += s[j] * C[j];
    }
    return total;
}

/* ------------------------------------------------------------------------- the step */

/* y = W x with x quantized to int8 per block. */
static void matvec(itl_ctx *c, const itl_mat *w, const float *x, float *y) {
#if ITL_X86
    if (c->isa == ITL_AVX2 && w->group % 8 == 0)
        quantize_act_avx2(c, x, w->in, w->group);
    else
#endif
        quantize_act(c, x, w->in, w->group);
    if (w->kind == ITL_F16) {
        for (int i = 0; i < w->in; i++) c->xf[i] = (float)c->x16[i] * c->xs[i / w->group];
#if ITL_X86
        if (c->isa == ITL_AVX2) { matvec_f16_avx2(c, w, y); return; }
#endif
        matvec_f16_scalar(c, w, y);
        return;
    }
#if ITL_X86
    if (c->isa == ITL_AVX2) { matvec_int_avx2(c, w, y); return; }
#endif
    matvec_int_scalar(c, w, y);
}

static void rms(const float *x, const float *w, float eps, int d, float *out) {
    float ss = 0.f;
    for (int i = 0; i < d; i++) ss += x[i] * x[i];
    float inv = 1.f / sqrtf(ss / (float)d + eps);
    for (int i = 0; i < d; i++) out[i] = x[i] * inv * w[i];
}

static inline float silu(float v) { return v / (1.f + expf(-v)); }

#if ITL_X86
/* exp for 8 lanes: exp(x) = 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two
   parts so r is exact), e^r from its degree-6 Taylor-like minimax polynomial; within a few
   float ulps of expf over [-87, 88]. */
__attribute__((target("avx2,fma,f16c")))
static inline __m256 exp8_avx2(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma,f16c")))
static void silu_avx2(float *v, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(v + i);
        __m256 den = _mm256_add_ps(_mm256_set1_ps(1.f), exp8_avx2(_mm256_sub_ps(_mm256_setzero_ps(), x)));
        _mm256_storeu_ps(v + i, _mm256_div_ps(x, den));
    }
    for (; i < n; i++) v[i] = silu(v[i]);
}
#endif

/* v[i] = silu(v[i]) */
static void silu_inplace(itl_ctx *c, float *v, int n) {
#if ITL_X86
    if (c->isa == ITL_AVX2) { silu_avx2(v, n); return; }
#endif
    for (int i = 0; i < n; i++) v[i] = silu(v[i]);
}
static inline float softplus(float v) { return v > 20.f ? v : log1pf(expf(v)); }

/* Row `tok` of the embedding table, dequantized (emb.in floats). */
static void embed_row(itl_ctx *c, int tok, float *x) {
    const itl_mat *w = &c->m->emb;
    if (w->kind == ITL_F16) {
        for (int i = 0; i < w->in; i++) x[i] = half_to_float(w->w16[(size_t)tok * w->in + i]);
        return;
    }
    unpack_row_scalar(w->codes + (size_t)tok * w->rowbytes, w->bits, w->in, c->row);
    for (int i = 0; i < w->in; i++) {
        size_t gi = (size_t)(i / w->group) * w->out + tok;
        x[i] = ((float)c->row[i] - (float)w->zeros[gi]) * half_to_float(w->scales[gi]);
    }
}

/* The residual stream of token `tok` (d floats): its row, through embed_in when factorised (the
   row is staged in xn, which the first layer overwrites only after this). */
static void embed(itl_ctx *c, int tok, float *x) {
    if (c->m->rank > 0) {
        embed_row(c, tok, c->xn);
        matvec(c, &c->m->embed_in, c->xn, x);
    } else {
        embed_row(c, tok, x);
    }
}

static void mixer(itl_ctx *c, const itl_layer *L, float *conv, float *S) {
    const itl_model *m = c->m;
    int di = L->d_inner, dc = L->d_conv;
    rms(c->x, L->norm1, L->eps1, m->d, c->xn);
    matvec(c, &L->in_proj, c->xn, c->xz); /* xs = xz[:di], z = xz[di:] */
    for (int ch = 0; ch < di; ch++) {
        float *cw = conv + (size_t)ch * dc, acc = L->conv_b[ch];
        memmove(cw, cw + 1, (size_t)(dc - 1) * sizeof(float));
        cw[dc - 1] = c->xz[ch];
        for (int t = 0; t < dc; t++) acc += cw[t] * L->conv_w[ch * dc + t];
        c->xc[ch] = acc;
    }
    silu_inplace(c, c->xc, di);
    silu_inplace(c, c->xz + di, di); /* the gate */
    matvec(c, &L->x_proj, c->xc, c->dbc); /* dt rank r, then B (n), C (n) */
    matvec(c, &L->dt_proj, c->dbc, c->dt);
    const float *B = c->dbc + L->r, *C = c->dbc + L->r + L->n;
    for (int h = 0; h < L->h; h++) {
        float dt = softplus(c->dt[h] + L->dt_b[h]), decay = expf(dt * L->A[h]);
        for (int p = 0; p < L->p; p++) {
            int ch = h * L->p + p;
            float xv = c->xc[ch], xdt = xv * dt, acc;
            float *s = S + (size_t)ch * L->n;
#if ITL_X86
            if (c->isa == ITL_AVX2)
                acc = state_row_avx2(s, B, C, decay, xdt, L->n);
            else
#endif
                acc = state_row_scalar(s, B, C, decay, xdt, L->n);
            c->y[ch] = (acc + xv * L->D[h]) * c->xz[di + ch];
        }
    }
    matvec(c, &L->out_proj, c->y, c->mo);
    for (int i = 0; i < m->d; i++) c->x[i] += c->mo[i];
}

static void moe(itl_ctx *c, const itl_layer *L) {
    const itl_model *m = c->m;
    int d = m->d, e = L->e, k = L->k;
    float probs[ITL_MAX_EXPERTS], mx = -INFINITY, tot = 0.f, gsum = 0.f;
    int top[ITL_MAX_EXPERTS];
    rms(c->x, L->norm2, L->eps2, d, c->xn);
    matvec(c, &L->router, c->xn, c->up);
    for (int j = 0; j < e; j++) mx = fmaxf(mx, c->up[j]);
    for (int j = 0; j < e; j++) tot += (probs[j] = expf(c->up[j] - mx));
    for (int j = 0; j < e; j++) probs[j] /= tot;
    for (int t = 0; t < k; t++) { /* top-k, the largest first; ties go to the lower index */
        int best = -1;
        for (int j = 0; j < e; j++) {
            int used = 0;
            for (int u = 0; u < t; u++) used |= top[u] == j;
            if (!used && (best < 0 || probs[j] > probs[best])) best = j;
        }
        top[t] = best;
        gsum += probs[best];
    }
    float *acc = c->mo;
    memset(acc, 0, (size_t)d * sizeof(float));
    for (int t = 0; t < k; t++) {
        const itl_mat *w1 = &L->w1[top[t]], *w2 = &L->w2[top[t]];
        matvec(c, w1, c->xn, c->hid);
        silu_inplace(c, c->hid, w1->out);
        matvec(c, w2, c->hid, c->up);
        float g = probs[top[t]] / gsum;
        for (int i = 0; i < d; i++) acc[i] += g * c->up[i];
    }
    for (int i = 0; i < d; i++) c->x[i] += acc[i];
}

/* ------------------------------------------------------------------------- API */

int itl_avx2_supported(void) {
#if ITL_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

static int ctx_ok(const itl_ctx *c) { return c && c->magic == ITL_MAGIC && c->m; }

/* What an ITL_ERR_* code means. */
const char *itl_strerror(int code) {
    switch (code) {
    case ITL_OK: return "ok";
    case ITL_ERR_NULL: return "a null pointer was passed";
    case ITL_ERR_CTX: return "the context is null or not a live itl context";
    case ITL_ERR_TOKEN: return "the token id is outside the vocabulary";
    case ITL_ERR_STATE: return "a state buffer is smaller than the model needs";
    case ITL_ERR_LOGITS: return "the logits buffer is smaller than the vocabulary";
    case ITL_ERR_COUNT: return "the token count is negative";
    case ITL_ERR_MODEL: return "the model structs are inconsistent";
    default: return "unknown error code";
    }
}

static int mat_bad(const itl_mat *w, int out, int in, int cap, const char *name, int layer, char *why, int n) {
    const char *bad = NULL;
    if (w->out != out || w->in != in) bad = "has the wrong shape";
    else if (out <= 0 || in <= 0 || out > cap || in > cap) bad = "has a size outside the scratch buffers";
    else if (w->group <= 0 || in % w->group) bad = "has a group that does not divide its inputs";
    else if (w->kind == ITL_F16) { if (!w->w16) bad = "has no fp16 weights"; }
    else if (w->kind != ITL_INT) bad = "has an unknown kind";
    else if (w->bits != 2 && w->bits != 4 && w->bits != 8) bad = "has a code width other than 2, 4 or 8";
    else if ((int64_t)w->rowbytes * 8 < (int64_t)in * w->bits) bad = "has rows shorter than its codes";
    else if (!w->codes || !w->scales || !w->zeros) bad = "has a null codes/scales/zeros pointer";
    if (!bad) return 0;
    if (why && n > 0) snprintf(why, (size_t)n, "layer %d %s %s (out %d, in %d)", layer, name, bad, (int)w->out, (int)w->in);
    return 1;
}

/* ITL_OK when every size, range and pointer of the model is one the step can run; otherwise
   ITL_ERR_MODEL (or ITL_ERR_NULL) with what is wrong written to `why` (may be NULL). */
int itl_check_model(const itl_model *m, char *why, int why_len) {
#define ITL_BAD(...) do { if (why && why_len > 0) snprintf(why, (size_t)why_len, __VA_ARGS__); return ITL_ERR_MODEL; } while (0)
    if (why && why_len > 0) why[0] = 0;
    if (!m) { if (why && why_len > 0) snprintf(why, (size_t)why_len, "null model"); return ITL_ERR_NULL; }
    if (m->vocab <= 0 || m->d <= 0 || m->n_layers < 0 || m->max_in <= 0)
        ITL_BAD("model sizes out of range (vocab %d, d %d, layers %d, max_in %d)", (int)m->vocab, (int)m->d,
                (int)m->n_layers, (int)m->max_in);
    if (!m->norm_f || (m->n_layers > 0 && !m->layers)) ITL_BAD("model has a null norm_f or layers pointer");
    int cap = m->max_in > m->vocab ? m->max_in : m->vocab;
    if (m->d > cap) ITL_BAD("d %d exceeds max_in %d", (int)m->d, cap);
    if (m->rank < 0 || m->rank > cap) ITL_BAD("embedding rank %d out of range (0..%d)", (int)m->rank, cap);
    if (mat_bad(&m->emb, m->vocab, m->rank > 0 ? m->rank : m->d, cap, "emb", -1, why, why_len)) return ITL_ERR_MODEL;
    if (m->rank > 0 && (mat_bad(&m->embed_in, m->d, m->rank, cap, "embed_in", -1, why, why_len) ||
                        mat_bad(&m->head_proj, m->rank, m->d, cap, "head_proj", -1, why, why_len)))
        return ITL_ERR_MODEL;
    for (int l = 0; l < m->n_layers; l++) {
        const itl_layer *L = &m->layers[l];
        if (L->d_inner <= 0 || L->d_conv <= 0 || L->h <= 0 || L->p <= 0 || L->n <= 0 || L->r <= 0 || L->f <= 0 ||
            (int64_t)L->h * L->p != L->d_inner || 2 * (int64_t)L->d_inner > cap || (int64_t)L->r + 2 * L->n > cap ||
            (int64_t)L->d_inner * L->d_conv > INT32_MAX || (int64_t)L->h * L->p * L->n > INT32_MAX)
            ITL_BAD("layer %d sizes out of range (d_inner %d, d_conv %d, h %d, p %d, n %d, r %d, f %d)", l,
                    (int)L->d_inner, (int)L->d_conv, (int)L->h, (int)L->p, (int)L->n, (int)L->r, (int)L->f);
        if (L->e < 1 || L->e > ITL_MAX_EXPERTS)
            ITL_BAD("layer %d has %d experts; the step routes 1..%d (ITL_MAX_EXPERTS)", l, (int)L->e, ITL_MAX_EXPERTS);
        if (L->k < 1 || L->k > L->e) ITL_BAD("layer %d routes top-%d of %d experts; k must be 1..%d", l, (int)L->k,
                                             (int)L->e, (int)L->e);
        if (!L->norm1 || !L->norm2 || !L->conv_w || !L->conv_b || !L->dt_b || !L->A || !L->D || !L->w1 || !L->w2)
            ITL_BAD("layer %d has a null vector or expert pointer", l);
        if (mat_bad(&L->in_proj, 2 * L->d_inner, m->d, cap, "in_proj", l, why, why_len) ||
            mat_bad(&L->x_proj, L->r + 2 * L->n, L->d_inner, cap, "x_proj", l, why, why_len) ||
            mat_bad(&L->dt_proj, L->h, L->r, cap, "dt_proj", l, why, why_len) ||
            mat_bad(&L->out_proj, m->d, L->d_inner, cap, "out_proj", l, why, why_len) ||
            mat_bad(&L->router, L->e, m->d, cap, "router", l, why, why_len))
            return ITL_ERR_MODEL;
        for (int j = 0; j < L->e; j++)
            if (mat_bad(&L->w1[j], L->f, m->d, cap, "w1", l, why, why_len) ||
                mat_bad(&L->w2[j], m->d, L->f, cap, "w2", l, why, why_len))
                return ITL_ERR_MODEL;
    }
    return ITL_OK;
#undef ITL_BAD
}

/* 0 scalar, 1 AVX2 (only where supported); returns the path now in use (-ITL_ERR_CTX for a bad context). */
int itl_set_isa(itl_ctx *c, int isa) {
    if (!ctx_ok(c)) return -ITL_ERR_CTX;
    c->isa = (isa == ITL_AVX2 && itl_avx2_supported()) ? ITL_AVX2 : ITL_SCALAR;
    return c->isa;
}

int itl_get_isa(const itl_ctx *c) { return ctx_ok(c) ? c->isa : -ITL_ERR_CTX; }

/* The state sizes (floats) a context's model needs; ITL_ERR_CTX / ITL_ERR_NULL. */
int itl_state_sizes(const itl_ctx *c, int64_t *conv_n, int64_t *ssm_n) {
    if (!ctx_ok(c)) return ITL_ERR_CTX;
    if (!conv_n || !ssm_n) return ITL_ERR_NULL;
    *conv_n = (int64_t)c->conv_n;
    *ssm_n = (int64_t)c->ssm_n;
    return ITL_OK;
}

void itl_free(itl_ctx *c) {
    if (!c || c->magic != ITL_MAGIC) return;
    c->magic = 0;
    void *bufs[] = {c->x, c->xn, c->xz, c->xc, c->dbc, c->dt, c->y, c->up, c->hid, c->mo, c->x8, c->x16, c->xs,
                    c->xsum, c->xf, c->row};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    free(c);
}

/* A context over `m` (which must outlive it and stay unchanged), with its scratch buffers; NULL
   when out of memory or when itl_check_model refuses `m` (call it for the reason). */
itl_ctx *itl_create(const itl_model *m) {
    if (itl_check_model(m, NULL, 0) != ITL_OK) return NULL;
    itl_ctx *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->magic = ITL_MAGIC;
    c->m = m;
    for (int l = 0; l < m->n_layers; l++) {
        const itl_layer *L = &m->layers[l];
        c->conv_n += (size_t)L->d_inner * L->d_conv;
        c->ssm_n += (size_t)L->h * L->p * L->n;
    }
    size_t big = (size_t)(m->max_in > m->vocab ? m->max_in : m->vocab) + 64;
    c->x = malloc(big * 4); c->xn = malloc(big * 4); c->xz = malloc(big * 4); c->xc = malloc(big * 4);
    c->dbc = malloc(big * 4); c->dt = malloc(big * 4); c->y = malloc(big * 4); c->up = malloc(big * 4);
    c->hid = malloc(big * 4); c->mo = malloc(big * 4); c->x8 = malloc(big); c->x16 = malloc(big * 2); c->xs = malloc(big * 4);
    c->xsum = malloc(big * 4); c->xf = malloc(big * 4); c->row = malloc(big);
    if (!c->x || !c->xn || !c->xz || !c->xc || !c->dbc || !c->dt || !c->y || !c->up || !c->hid || !c->mo || !c->x8 ||
        !c->x16 || !c->xs || !c->xsum || !c->xf || !c->row) {
        itl_free(c);
        return NULL;
    }
    const char *env = getenv("ITERALITE_NATIVE_ISA");
    itl_set_isa(c, env && strcmp(env, "scalar") == 0 ? ITL_SCALAR : ITL_AVX2);
    return c;
}

static int check_call(const itl_ctx *c, int token, const float *conv, int64_t conv_n, const float *ssm,
                      int64_t ssm_n, const float *logits, int64_t logits_n) {
    if (!ctx_ok(c)) return ITL_ERR_CTX;
    if (!conv || !ssm || !logits) return ITL_ERR_NULL;
    if (token < 0 || token >= c->m->vocab) return ITL_ERR_TOKEN;
    if (conv_n < (int64_t)c->conv_n || ssm_n < (int64_t)c->ssm_n) return ITL_ERR_STATE;
    if (logits_n < c->m->vocab) return ITL_ERR_LOGITS;
    return ITL_OK;
}

static void step(itl_ctx *c, int token, float *conv, float *ssm, float *logits) {
    const itl_model *m = c->m;
    embed(c, token, c->x);
    for (int l = 0; l < m->n_layers; l++) {
        const itl_layer *L = &m->layers[l];
        mixer(c, L, conv, ssm);
        moe(c, L);
        conv += (size_t)L->d_inner * L->d_conv;
        ssm += (size_t)L->h * L->p * L->n;
    }
    rms(c->x, m->norm_f, m->eps_f, m->d, c->xn);
    if (m->rank > 0) {
        matvec(c, &m->head_proj, c->xn, c->y);
        matvec(c, &m->emb, c->y, logits);
    } else {
        matvec(c, &m->emb, c->xn, logits);
    }
}

/* One token: conv (conv_n floats, at least the sum over layers of d_inner * d_conv), ssm (ssm_n,
   at least the sum of h * p * n) updated in place; logits (logits_n >= vocab) written. Returns
   ITL_OK or an ITL_ERR_* code (nothing read or written then). */
int itl_step(itl_ctx *c, int token, float *conv, int64_t conv_n, float *ssm, int64_t ssm_n, float *logits,
             int64_t logits_n) {
    int err = check_call(c, token, conv, conv_n, ssm, ssm_n, logits, logits_n);
    if (err) return err;
    step(c, token, conv, ssm, logits);
    return ITL_OK;
}

/* n greedy tokens after `token` (the first one predicted from it), written to out (n int32);
   the state and logits (of the last step) as in itl_step. */
int itl_greedy(itl_ctx *c, int token, int n, float *conv, int64_t conv_n, float *ssm, int64_t ssm_n, float *logits,
               int64_t logits_n, int32_t *out) {
    int err = check_call(c, token, conv, conv_n, ssm, ssm_n, logits, logits_n);
    if (err) return err;
    if (n < 0) return ITL_ERR_COUNT;
    if (n > 0 && !out) return ITL_ERR_NULL;
    for (int t = 0; t < n; t++) {
        step(c, token, conv, ssm, logits);
        int best = 0;
        for (int v = 1; v < c->m->vocab; v++)
            if (logits[v] > logits[best]) best = v;
        out[t] = token = best;
    }
    return ITL_OK;
}

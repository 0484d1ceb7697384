/* The native decode step of IteraLite, straight from packed integer codes, and its chunked prefill.

   One call runs the whole step of every layer: RMSNorm, in_proj, the conv-state shift and taps,
   dt/B/C, the state update, the gate, out_proj, the router and only the top-k experts (sparse
   MoE), then the final norm and the tied head. A factorised embedding (rank r > 0: a (vocab, r)
   table) adds two matrices: x = embed_in . E[tok] after the lookup and logits = E . (head_proj . xn)
   at the head; rank 0 is the dense (vocab, d) table, with embed_in / head_proj unread. Weights
   stay packed (see itl_mat); every matmul first quantizes its input vector to int8 per block
   (block = the weight's group size), then computes integer dot products per group and applies
   one float scale per group:

       y[o] = sum_g  s_w[o,g] * s_x[g] * ( sum_{i in g} q[o,i] * x8[i]  -  z[o,g] * sum_{i in g} x8[i] )

   fp16 weight matrices use the same int8 activations, dequantized, in float.

   The step runs on a chunk of T tokens (run_chunk): T = 1 for itl_step / itl_greedy, up to
   ITL_CHUNK for itl_prefill, where each matrix is applied to the chunk's tokens together (the
   conv and the state still go token by token), so a token's arithmetic is the same either way.

   Three code paths, chosen at run time (`__attribute__((target))`, so the file builds with
   portable flags): AVX-512 F/BW/VL + VNNI (vpdpbusd on the context's own copy of the integer
   codes, laid out at itl_create for it: itl_pmat), AVX2+FMA+F16C (its nibble-coded matrices on
   the same copy, by maddubs + madd; the rest on the resident rows), and plain scalar C. The best
   the CPU has is the default; itl_set_isa forces one (the tests run all three);
   ITERALITE_NATIVE_ISA=scalar or avx2 starts a context there.

   Exact mode (itl_set_act(c, ITL_ACT_F32), or ITERALITE_NATIVE_ACT=f32 at itl_create): no
   activation quantization; every matmul is the dequantized weights times the float input,
   y[o] = sum_g s[o,g] * sum_{i in g} (q[o,i] - z[o,g]) * x[i], equal to the eager model's matmul up
   to float rounding. Its AVX-512 / AVX2 kernels read a copy of the integer codes made when the mode
   is first chosen (code - zero-point, an int8 a weight, int16 for 8-bit codes: itl_pmat.e8 / e16);
   the scalar path reads the resident rows. The int8 mode (ITL_ACT_INT8) is the default.

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

#define ITL_CHUNK 16 /* tokens a prefill chunk runs through each matrix at once */

/* A matrix of integer codes re-laid for the AVX-512 VNNI kernel (built by itl_create, owned by the
   context): rows in blocks of 16, each group's inputs padded with zero codes to a multiple of 8 and
   cut in chunks of 8 inputs. One chunk of a block is 64 bytes, row r's 4 bytes at 4r: byte j holds
   input j in its low nibble and input 4 + j in its high nibble (codes of up to 4 bits), or two 64-byte
   halves of one code a byte (8-bit codes: inputs 0..3, then 4..7). Scales as float and zero-points
   as int32, 16 rows a group; rows past `out` have zero codes, scales and zeros. */
typedef struct {
    int32_t out, in, group, ng, gp, nblk, wide; /* gp: group padded to a multiple of 8; wide: 8-bit */
    size_t gbytes;  /* bytes of one group of one block: (gp / 8) * (wide ? 128 : 64) */
    uint8_t *w;     /* (nblk, ng, gp / 8, 64 or 128) */
    float *s;       /* (nblk, ng, 16) */
    int32_t *z;     /* (nblk, ng, 16) */
    /* The exact mode's copy (ITL_ACT_F32; NULL until it is first chosen): code - zero-point for 16 rows
       an input, (nblk, ng, group, 16), as int8 (codes of up to 4 bits) or int16 (e16: 8-bit codes, or a
       zero-point above 112). */
    int8_t *e8;
    int16_t *e16;
} itl_pmat;

typedef struct {
    itl_pmat in_proj, x_proj, dt_proj, out_proj, router;
    itl_pmat *w1, *w2; /* e each */
} itl_player;

/* Quantized activation rows for the VNNI kernel: row t's int8 codes at x8 + t * ld (each group
   padded to gp with zeros), its per-group scales and sums at s / sum + t * ldg. */
typedef struct {
    int8_t *x8;
    float *s;
    int32_t *sum;
    int ld, ldg;
} itl_qbuf;

struct itl_ctx {
    uint32_t magic;  /* ITL_MAGIC while live, 0 once freed: catches a pointer that is not a context;
                        a freed one cannot be checked here (the caller must not pass it: Python's
                        wrapper clears its pointer before it frees) */
    const itl_model *m;
    size_t conv_n, ssm_n; /* state sizes the model needs */
    int isa;
    int act;        /* ITL_ACT_INT8 (int8 activations per block) or ITL_ACT_F32 (float, exact) */
    int8_t *x8;     /* the quantized activation */
    int16_t *x16;   /* the same, widened to int16 (8-bit codes) */
    float *xs;      /* per block: its scale */
    int32_t *xsum;  /* per block: sum of its int8 values */
    float *xf;      /* dequantized activation (fp16 matrices) */
    uint8_t *row;   /* one row of unpacked codes */
    /* a chunk of up to ITL_CHUNK tokens, one row of ld floats per token (ld >= every width but the
       vocabulary); the experts' rows (hid, up, ups) one per token and routed slot */
    int ld, kmax;
    float *x, *xn, *xz, *xc, *dbc, *dt, *y, *mo, *hid, *up, *ups, *gate;
    int32_t *sel, *rows;  /* (token, slot) -> expert; the rows an expert runs */
    int has512;           /* the CPU runs the AVX-512 path (the packed matrices below are built
                             wherever AVX2 is) */
    itl_pmat emb, embed_in, head_proj;
    itl_player *pl;
    itl_qbuf qa, qb;      /* qa: the norm2 rows (router and w1 share them); qb: every other input */
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

/* Codes of a row (2, 4 or 8 bits, LSB-first) one a byte: shifts and masks, no division. */
static void unpack_row_scalar(const uint8_t *src, int bits, int in, uint8_t *dst) {
    if (bits == 8) { memcpy(dst, src, (size_t)in); return; }
    if (bits == 4) {
        for (int i = 0; i < in; i++) dst[i] = (uint8_t)((src[i >> 1] >> ((i & 1) * 4)) & 0x0F);
        return;
    }
    for (int i = 0; i < in; i++) dst[i] = (uint8_t)((src[i >> 2] >> ((i & 3) * 2)) & 0x03);
}

/* Exact activations (ITL_ACT_F32), scalar: y = W x in float over the dequantized weights,
   y[o] = sum_g s[o,g] * sum_{i in g} (q[o,i] - z[o,g]) * x[i]; fp16 rows times x. */
static void matvec_f32_scalar(itl_ctx *c, const itl_mat *w, const float *x, float *y) {
    if (w->kind == ITL_F16) {
        for (int o = 0; o < w->out; o++) {
            const uint16_t *row = w->w16 + (size_t)o * w->in;
            float a[4] = {0.f, 0.f, 0.f, 0.f};
            int i = 0;
            for (; i + 4 <= w->in; i += 4)
                for (int u = 0; u < 4; u++) a[u] += half_to_float(row[i + u]) * x[i + u];
            for (; i < w->in; i++) a[0] += half_to_float(row[i]) * x[i];
            y[o] = (a[0] + a[1]) + (a[2] + a[3]);
        }
        return;
    }
    /* four partial sums a group (independent adds; the order is float rounding either way); codes of up
       to 4 bits through a table of (code - zero-point) as float */
    int ng = w->in / w->group, g = w->group, small = w->bits <= 4;
    /* straight from the packed bytes when every group starts on a byte (no unpacked row) */
    int direct = (w->bits == 4 && g % 2 == 0) || (w->bits == 2 && g % 4 == 0);
    float lut[16];
    for (int o = 0; o < w->out; o++) {
        const uint8_t *src = w->codes + (size_t)o * w->rowbytes;
        if (!direct) unpack_row_scalar(src, w->bits, w->in, c->row);
        float acc = 0.f;
        for (int b = 0; b < ng; b++) {
            const uint8_t *q = c->row + b * g;
            const float *xb = x + b * g;
            int z = w->zeros[(size_t)b * w->out + o];
            float a[4] = {0.f, 0.f, 0.f, 0.f};
            int i = 0;
            if (direct) {
                for (int v = 0; v < 16; v++) lut[v] = (float)(v - z);
                if (w->bits == 4) {
                    const uint8_t *pb = src + (b * g >> 1);
                    for (; i + 4 <= g; i += 4) {
                        uint8_t b0 = pb[i >> 1], b1 = pb[(i >> 1) + 1];
                        a[0] += lut[b0 & 15] * xb[i];
                        a[1] += lut[b0 >> 4] * xb[i + 1];
                        a[2] += lut[b1 & 15] * xb[i + 2];
                        a[3] += lut[b1 >> 4] * xb[i + 3];
                    }
                    for (; i < g; i++) a[0] += lut[(pb[i >> 1] >> ((i & 1) * 4)) & 15] * xb[i];
                } else {
                    const uint8_t *pb = src + (b * g >> 2);
                    for (; i < g; i += 4) {
                        uint8_t b0 = pb[i >> 2];
                        a[0] += lut[b0 & 3] * xb[i];
                        a[1] += lut[(b0 >> 2) & 3] * xb[i + 1];
                        a[2] += lut[(b0 >> 4) & 3] * xb[i + 2];
                        a[3] += lut[b0 >> 6] * xb[i + 3];
                    }
                }
            } else if (small) {
                for (int v = 0; v < 16; v++) lut[v] = (float)(v - z);
                for (; i + 4 <= g; i += 4)
                    for (int u = 0; u < 4; u++) a[u] += lut[q[i + u] & 15] * xb[i + u];
            } else {
                for (; i + 4 <= g; i += 4)
                    for (int u = 0; u < 4; u++) a[u] += (float)((int)q[i + u] - z) * xb[i + u];
            }
            for (; i < g; i++) a[0] += (float)((int)q[i] - z) * xb[i];
            acc += half_to_float(w->scales[(size_t)b * w->out + o]) * ((a[0] + a[1]) + (a[2] + a[3]));
        }
        y[o] = acc;
    }
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

/* Eight rows at once: their group dots reduced to one vector of 8 sums, then the zero-point,
   scale and activation-scale arithmetic for all 8 in float lanes. (The AVX2 path reaches these
   resident-row kernels only for 8-bit codes: nibble-coded matrices run on the packed copy.) */
__attribute__((target("avx2,fma,f16c")))
static void rows8_avx2(itl_ctx *c, const itl_mat *w, float *y, int o) {
    int ng = w->in / w->group, g = w->group;
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < ng; b++) {
        __m256i d[8];
        for (int r = 0; r < 8; r++)
            d[r] = dot_group_avx2(w->codes + (size_t)(o + r) * w->rowbytes, w->bits, b * g, g, c->x8, c->x16);
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

__attribute__((target("avx2,fma,f16c")))
static void matvec_int_avx2(itl_ctx *c, const itl_mat *w, float *y) {
    int ng = w->in / w->group, g = w->group, small = w->bits <= 4;
    int o = 0;
    if (g % 8 == 0)
        for (; o + 8 <= w->out; o += 8) rows8_avx2(c, w, y, o);
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

/* ------------------------------------------------------------------------- AVX-512 VNNI path */

/* Code `i` of row `o` of an integer matrix (its resident packed row). */
static inline int code_at(const itl_mat *w, int o, int i) {
    const uint8_t *row = w->codes + (size_t)o * w->rowbytes;
    int per = 8 / w->bits;
    return w->bits == 8 ? row[i] : (row[i / per] >> ((i % per) * w->bits)) & ((1 << w->bits) - 1);
}

/* n zeroed bytes on a 64-byte boundary (every vector load of the kernel is then one cache line). */
static void *zalloc64(size_t n) {
    n = (n + 63) / 64 * 64;
    void *ptr = aligned_alloc(64, n ? n : 64);
    if (ptr) memset(ptr, 0, n ? n : 64);
    return ptr;
}

static void pmat_free(itl_pmat *p) {
    free(p->w); free(p->s); free(p->z); free(p->e8); free(p->e16);
    p->w = NULL; p->s = NULL; p->z = NULL; p->e8 = NULL; p->e16 = NULL;
}

/* The VNNI layout of `w` (see itl_pmat); 0, or -1 when out of memory. An fp16 matrix gets none
   (p->w stays NULL: the step runs it on the AVX2 path). */
static int pmat_build(itl_pmat *p, const itl_mat *w) {
    memset(p, 0, sizeof *p);
    if (w->kind != ITL_INT) return 0;
    p->out = w->out; p->in = w->in; p->group = w->group;
    p->ng = w->in / w->group;
    p->gp = (w->group + 7) / 8 * 8;
    p->nblk = (w->out + 15) / 16;
    p->wide = w->bits == 8;
    p->gbytes = (size_t)(p->gp / 8) * (p->wide ? 128 : 64);
    size_t nsg = (size_t)p->nblk * p->ng * 16;
    p->w = zalloc64((size_t)p->nblk * p->ng * p->gbytes);
    p->s = zalloc64(nsg * sizeof(float));
    p->z = zalloc64(nsg * sizeof(int32_t));
    if (!p->w || !p->s || !p->z) { pmat_free(p); return -1; }
    for (int k = 0; k < p->nblk; k++)
        for (int b = 0; b < p->ng; b++) {
            uint8_t *g = p->w + ((size_t)k * p->ng + b) * p->gbytes;
            for (int r = 0; r < 16 && 16 * k + r < w->out; r++) {
                int o = 16 * k + r;
                size_t si = ((size_t)k * p->ng + b) * 16 + r;
                p->s[si] = half_to_float(w->scales[(size_t)b * w->out + o]);
                p->z[si] = w->zeros[(size_t)b * w->out + o];
                for (int i = 0; i < w->group; i++) {
                    int code = code_at(w, o, b * w->group + i), ch = i / 8, j = i % 8;
                    uint8_t *chunk = g + (size_t)ch * (p->wide ? 128 : 64);
                    if (p->wide) chunk[(j / 4) * 64 + 4 * r + j % 4] = (uint8_t)code;
                    else chunk[4 * r + j % 4] |= (uint8_t)(code << (4 * (j / 4)));
                }
            }
        }
    return 0;
}

/* The exact mode's copy of `w` (see itl_pmat: e8 / e16) beside its packed copy p; 0, or -1 when out
   of memory (the exact mode then runs the matrix on the scalar path). None for an fp16 matrix. */
static int pmat_build_exact(itl_pmat *p, const itl_mat *w) {
    if (!p->w || p->e8 || p->e16) return 0;
    size_t n = (size_t)p->nblk * p->ng * p->group * 16;
    int wide = p->wide; /* int16 also when a zero-point puts code - zero outside int8 */
    for (size_t i = 0; i < (size_t)p->ng * w->out && !wide; i++) wide = w->zeros[i] > 112;
    if (wide) p->e16 = zalloc64(n * sizeof(int16_t));
    else p->e8 = zalloc64(n);
    if (!p->e8 && !p->e16) return -1;
    for (int k = 0; k < p->nblk; k++)
        for (int b = 0; b < p->ng; b++)
            for (int r = 0; r < 16 && 16 * k + r < w->out; r++) {
                int o = 16 * k + r, z = w->zeros[(size_t)b * w->out + o];
                size_t at = (((size_t)k * p->ng + b) * p->group) * 16 + r;
                for (int i = 0; i < w->group; i++) {
                    int v = code_at(w, o, b * w->group + i) - z;
                    if (p->e16) p->e16[at + 16 * (size_t)i] = (int16_t)v;
                    else p->e8[at + 16 * (size_t)i] = (int8_t)v; /* codes < 16, zeros <= 112 */
                }
            }
    return 0;
}

#if ITL_X86
#define ITL_T512 "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"

/* Row x (w->in floats) -> int8 per group into q's row t: the same IEEE division and
   round-half-to-even as quantize_act, so the same int8 values; each group's padding zeroed. */
__attribute__((target(ITL_T512)))
static void quant_row_512(const itl_pmat *p, const float *x, const itl_qbuf *q, int t) {
    const __m512 lim = _mm512_set1_ps(127.f), nlim = _mm512_set1_ps(-127.f);
    int8_t *x8 = q->x8 + (size_t)t * q->ld;
    for (int b = 0; b < p->ng; b++) {
        const float *xb = x + b * p->group;
        __m512 m = _mm512_setzero_ps();
        for (int i = 0; i < p->group; i += 16) {
            __mmask16 k = p->group - i >= 16 ? 0xFFFF : (__mmask16)((1u << (p->group - i)) - 1);
            m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(k, xb + i)));
        }
        float s = _mm512_reduce_max_ps(m) / 127.f;
        if (s < 1e-12f) s = 1e-12f;
        __m512 vs = _mm512_set1_ps(s);
        __m512i sum = _mm512_setzero_si512();
        int8_t *qb = x8 + b * p->gp;
        for (int i = 0; i < p->gp; i += 16) {
            int left = p->group - i;
            __mmask16 k = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
            __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(k, xb + i), vs);
            v = _mm512_min_ps(_mm512_max_ps(v, nlim), lim);
            __m512i qi = _mm512_cvtps_epi32(v); /* nearest, ties to even (the default rounding) */
            sum = _mm512_add_epi32(sum, qi);
            __mmask16 st = p->gp - i >= 16 ? 0xFFFF : (__mmask16)((1u << (p->gp - i)) - 1);
            _mm_mask_storeu_epi8(qb + i, st, _mm512_cvtsepi32_epi8(qi));
        }
        q->s[(size_t)t * q->ldg + b] = s;
        q->sum[(size_t)t * q->ldg + b] = _mm512_reduce_add_epi32(sum);
    }
}

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* NB consecutive 16-row blocks from `k` for NT activation rows of q (rows[t]); NB * NT <= 4. Per
   group, the integer dots by vpdpbusd (u8 codes x s8 activations, summed in int32: no saturation;
   a high nibble is used in place, as 16 x its code, and its sum divided by 16 at the group's end),
   then acc += (s_w * s_x) * (dot - z * sum_x), group after group, as the other paths. Several blocks
   or tokens at once keep independent dot chains in flight; several tokens also read a block's codes
   once for all of them. */
__attribute__((target(ITL_T512), always_inline))
static inline void block_512(const itl_pmat *p, int k, const itl_qbuf *q, const int *rows, float *y, int ldy,
                             const int NT, const int NB) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), m4h = _mm512_set1_epi8((char)0xF0);
    __m512 acc[4];
    const int8_t *xr[4];
    for (int t = 0; t < NT; t++) xr[t] = q->x8 + (size_t)rows[t] * q->ld;
    for (int a = 0; a < NT * NB; a++) acc[a] = _mm512_setzero_ps();
    const size_t bstride = (size_t)p->ng * p->gbytes;
    const uint8_t *w0 = p->w + (size_t)k * bstride;
    int nc = p->gp / 8;
    for (int b = 0; b < p->ng; b++) {
        __m512i dl[4], dh[4];
        for (int a = 0; a < NT * NB; a++) dl[a] = dh[a] = _mm512_setzero_si512();
        const uint8_t *wg = w0 + (size_t)b * p->gbytes;
        for (int ch = 0; ch < nc; ch++) {
            __m512i xl[4], xh[4];
            for (int t = 0; t < NT; t++) {
                const int8_t *xa = xr[t] + b * p->gp + 8 * ch;
                xl[t] = _mm512_set1_epi32(load_i32(xa));
                xh[t] = _mm512_set1_epi32(load_i32(xa + 4));
            }
            for (int j = 0; j < NB; j++) {
                __m512i lo, hi;
                if (p->wide) {
                    const uint8_t *wc = wg + j * bstride + (size_t)ch * 128;
                    lo = _mm512_loadu_si512(wc);
                    hi = _mm512_loadu_si512(wc + 64);
                } else {
                    __m512i v = _mm512_loadu_si512(wg + j * bstride + (size_t)ch * 64);
                    lo = _mm512_and_si512(v, m4);
                    hi = _mm512_and_si512(v, m4h); /* 16 x the high code: no shift, dh / 16 below */
                }
                for (int t = 0; t < NT; t++) {
                    dl[j * NT + t] = _mm512_dpbusd_epi32(dl[j * NT + t], lo, xl[t]);
                    dh[j * NT + t] = _mm512_dpbusd_epi32(dh[j * NT + t], hi, xh[t]);
                }
            }
        }
        for (int j = 0; j < NB; j++) {
            size_t si = ((size_t)(k + j) * p->ng + b) * 16;
            __m512i z = _mm512_loadu_si512(p->z + si);
            __m512 s = _mm512_loadu_ps(p->s + si);
            for (int t = 0; t < NT; t++) {
                size_t gi = (size_t)rows[t] * q->ldg + b;
                int a = j * NT + t;
                __m512i dha = p->wide ? dh[a] : _mm512_srai_epi32(dh[a], 4); /* exact: a multiple of 16 */
                __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(dl[a], dha),
                                               _mm512_mullo_epi32(z, _mm512_set1_epi32(q->sum[gi])));
                acc[a] = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(q->s[gi])), _mm512_cvtepi32_ps(dot), acc[a]);
            }
        }
    }
    for (int j = 0; j < NB; j++) {
        int left = p->out - 16 * (k + j);
        __mmask16 st = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
        for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(y + (size_t)t * ldy + 16 * (k + j), st, acc[j * NT + t]);
    }
}

#define ITL_BLOCK_FN(NT, NB)                                                                                    \
    __attribute__((target(ITL_T512))) static void block_512_##NT##x##NB(const itl_pmat *p, int k,              \
                                                                         const itl_qbuf *q, const int *rows,    \
                                                                         float *y, int ldy) {                   \
        block_512(p, k, q, rows, y, ldy, NT, NB);                                                               \
    }
ITL_BLOCK_FN(1, 1) ITL_BLOCK_FN(2, 1) ITL_BLOCK_FN(3, 1) ITL_BLOCK_FN(4, 1)
ITL_BLOCK_FN(1, 2) ITL_BLOCK_FN(1, 3) ITL_BLOCK_FN(1, 4)

/* Y[t] = W x_t for the T quantized rows rows[t] of q (rows NULL: 0..T-1); Y rows ldy apart. One
   token: up to four blocks at a time; more: block by block, four tokens at a time (a block's codes read
   once for four tokens). */
__attribute__((target(ITL_T512)))
static void matmat_512(const itl_pmat *p, const itl_qbuf *q, const int *rows, int T, float *Y, int ldy) {
    int ident[ITL_CHUNK];
    if (!rows) {
        for (int t = 0; t < T && t < ITL_CHUNK; t++) ident[t] = t;
        rows = ident;
    }
    if (T == 1) {
        int k = 0;
        for (; k + 4 <= p->nblk; k += 4) block_512_1x4(p, k, q, rows, Y, ldy);
        switch (p->nblk - k) {
        case 3: block_512_1x3(p, k, q, rows, Y, ldy); break;
        case 2: block_512_1x2(p, k, q, rows, Y, ldy); break;
        case 1: block_512_1x1(p, k, q, rows, Y, ldy); break;
        default: break;
        }
        return;
    }
    for (int k = 0; k < p->nblk; k++)
        for (int t = 0; t < T; t += 4) {
            float *yt = Y + (size_t)t * ldy;
            switch (T - t >= 4 ? 4 : T - t) {
            case 4: block_512_4x1(p, k, q, rows + t, yt, ldy); break;
            case 3: block_512_3x1(p, k, q, rows + t, yt, ldy); break;
            case 2: block_512_2x1(p, k, q, rows + t, yt, ldy); break;
            default: block_512_1x1(p, k, q, rows + t, yt, ldy); break;
            }
        }
}

/* The same quantization into q's row t for the AVX2 path: 8 lanes at a time and the group's tail
   in scalar code, with the same division and rounding (so the same int8 values). */
__attribute__((target("avx2,fma,f16c")))
static void quant_row_avx2(const itl_pmat *p, const float *x, const itl_qbuf *q, int t) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 lim = _mm256_set1_ps(127.f), nlim = _mm256_set1_ps(-127.f);
    int8_t *x8 = q->x8 + (size_t)t * q->ld;
    for (int b = 0; b < p->ng; b++) {
        const float *xb = x + b * p->group;
        int g8 = p->group / 8 * 8, i;
        __m256 m = _mm256_setzero_ps();
        for (i = 0; i < g8; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(xb + i), absmask));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 0x55)));
        for (; i < p->group; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float s = amax / 127.f;
        if (s < 1e-12f) s = 1e-12f;
        __m256 vs = _mm256_set1_ps(s);
        __m256i vsum = _mm256_setzero_si256();
        int8_t *qb = x8 + b * p->gp;
        for (i = 0; i < g8; i += 8) {
            __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xb + i), vs),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m256i qi = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, nlim), lim));
            vsum = _mm256_add_epi32(vsum, qi);
            __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
            _mm_storel_epi64((__m128i *)(qb + i), _mm_packs_epi16(w16, w16));
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(vsum), _mm256_extracti128_si256(vsum, 1));
        int32_t sum = hsum_epi32(s4);
        for (; i < p->group; i++) {
            float v = nearbyintf(xb[i] / s);
            v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
            qb[i] = (int8_t)v;
            sum += (int32_t)v;
        }
        for (; i < p->gp; i++) qb[i] = 0;
        q->s[(size_t)t * q->ldg + b] = s;
        q->sum[(size_t)t * q->ldg + b] = sum;
    }
}

/* u8 codes (<= 15) x s8 activations, 4 bytes a lane summed into int32: vpdpbusd's result, by
   maddubs (pairs into int16: 2 * 15 * 127 cannot saturate) and madd with ones. */
__attribute__((target("avx2,fma,f16c")))
static inline __m256i dot4_avx2(__m256i acc, __m256i codes, __m256i x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), _mm256_set1_epi16(1)));
}

/* One 16-row block `k` of a nibble-coded (codes <= 15) packed matrix for NT (1..4) activation rows
   of q: the VNNI kernel's arithmetic, rows 0..7 and 8..15 as two 8-lane halves. */
__attribute__((target("avx2,fma,f16c"), always_inline))
static inline void block_avx2(const itl_pmat *p, int k, const itl_qbuf *q, const int *rows, float *y, int ldy,
                              const int NT) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[4][2];
    const int8_t *xr[4];
    for (int t = 0; t < NT; t++) {
        xr[t] = q->x8 + (size_t)rows[t] * q->ld;
        acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    }
    const uint8_t *wp = p->w + (size_t)k * p->ng * p->gbytes;
    int nc = p->gp / 8;
    for (int b = 0; b < p->ng; b++) {
        __m256i d[4][2];
        for (int t = 0; t < NT; t++) d[t][0] = d[t][1] = _mm256_setzero_si256();
        for (int ch = 0; ch < nc; ch++, wp += 64) {
            __m256i v0 = _mm256_load_si256((const __m256i *)wp), v1 = _mm256_load_si256((const __m256i *)(wp + 32));
            __m256i l0 = _mm256_and_si256(v0, m4), h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
            __m256i l1 = _mm256_and_si256(v1, m4), h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
            for (int t = 0; t < NT; t++) {
                const int8_t *xa = xr[t] + b * p->gp + 8 * ch;
                __m256i xl = _mm256_set1_epi32(load_i32(xa)), xh = _mm256_set1_epi32(load_i32(xa + 4));
                d[t][0] = dot4_avx2(dot4_avx2(d[t][0], l0, xl), h0, xh);
                d[t][1] = dot4_avx2(dot4_avx2(d[t][1], l1, xl), h1, xh);
            }
        }
        size_t si = ((size_t)k * p->ng + b) * 16;
        for (int half = 0; half < 2; half++) {
            __m256i z = _mm256_load_si256((const __m256i *)(p->z + si + 8 * half));
            __m256 sc = _mm256_load_ps(p->s + si + 8 * half);
            for (int t = 0; t < NT; t++) {
                size_t gi = (size_t)rows[t] * q->ldg + b;
                __m256i dot = _mm256_sub_epi32(d[t][half], _mm256_mullo_epi32(z, _mm256_set1_epi32(q->sum[gi])));
                acc[t][half] = _mm256_fmadd_ps(_mm256_mul_ps(sc, _mm256_set1_ps(q->s[gi])), _mm256_cvtepi32_ps(dot),
                                               acc[t][half]);
            }
        }
    }
    int left = p->out - 16 * k;
    for (int t = 0; t < NT; t++) {
        float *yt = y + (size_t)t * ldy + 16 * k;
        if (left >= 16) {
            _mm256_storeu_ps(yt, acc[t][0]);
            _mm256_storeu_ps(yt + 8, acc[t][1]);
        } else {
            float tmp[16];
            _mm256_storeu_ps(tmp, acc[t][0]);
            _mm256_storeu_ps(tmp + 8, acc[t][1]);
            memcpy(yt, tmp, (size_t)left * sizeof(float));
        }
    }
}

#define ITL_BLOCK_AVX2_FN(NT)                                                                                   \
    __attribute__((target("avx2,fma,f16c"))) static void block_avx2_##NT(const itl_pmat *p, int k,             \
                                                                          const itl_qbuf *q, const int *rows,   \
                                                                          float *y, int ldy) {                  \
        block_avx2(p, k, q, rows, y, ldy, NT);                                                                  \
    }
ITL_BLOCK_AVX2_FN(1) ITL_BLOCK_AVX2_FN(2) ITL_BLOCK_AVX2_FN(3) ITL_BLOCK_AVX2_FN(4)

/* matmat_512's loop (block by block, four tokens at a time) on the AVX2 kernel (nibble-coded
   matrices only). */
__attribute__((target("avx2,fma,f16c")))
static void matmat_avx2(const itl_pmat *p, const itl_qbuf *q, int T, float *Y, int ldy) {
    int rows[ITL_CHUNK];
    for (int t = 0; t < T && t < ITL_CHUNK; t++) rows[t] = t;
    for (int k = 0; k < p->nblk; k++)
        for (int t = 0; t < T; t += 4) {
            float *yt = Y + (size_t)t * ldy;
            switch (T - t >= 4 ? 4 : T - t) {
            case 4: block_avx2_4(p, k, q, rows + t, yt, ldy); break;
            case 3: block_avx2_3(p, k, q, rows + t, yt, ldy); break;
            case 2: block_avx2_2(p, k, q, rows + t, yt, ldy); break;
            default: block_avx2_1(p, k, q, rows + t, yt, ldy); break;
            }
        }
}

/* exp for 16 lanes: the same range reduction and polynomial as exp8_avx2. */
__attribute__((target(ITL_T512)))
static inline __m512 exp16_512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 e = _mm512_set1_ps(1.9875691500e-4f);
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.3981999507e-3f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(8.3334519073e-3f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(4.1665795894e-2f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.6666665459e-1f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(5.0000001201e-1f));
    e = _mm512_fmadd_ps(e, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(e, n);
}

__attribute__((target(ITL_T512)))
static void silu_512(float *v, int n) {
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 x = _mm512_maskz_loadu_ps(k, v + i);
        __m512 den = _mm512_add_ps(_mm512_set1_ps(1.f), exp16_512(_mm512_sub_ps(_mm512_setzero_ps(), x)));
        __m512 r = _mm512_rcp14_ps(den); /* 1 / den to 14 bits, then one Newton step */
        r = _mm512_mul_ps(r, _mm512_fnmadd_ps(den, r, _mm512_set1_ps(2.f)));
        _mm512_mask_storeu_ps(v + i, k, _mm512_mul_ps(x, r));
    }
}

/* The sums of 16 vectors, one lane each (lane i = the sum of v[i]'s lanes), by a tree of shuffles:
   pairs within 128-bit lanes, then the four 128-bit lanes. */
__attribute__((target(ITL_T512)))
static inline __m512 sum16_512(const __m512 *v) {
    __m512 u[4];
    for (int q = 0; q < 4; q++) {
        const __m512 *a = v + 4 * q;
        __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
        __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
        u[q] = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
    }
    __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
    __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

/* The state rows of one head (p channels, n states each): s = s * decay + (x dt) B, then
   y = (s . C + x D) * gate, 16 states a vector; with n == 16, sixteen channels' dots reduced
   together (sum16_512). */
__attribute__((target(ITL_T512)))
static void state_head_512(float *S, const float *B, const float *C, float decay, float dt, const float *xv,
                           float D, const float *gate, float *y, int p, int n) {
    __m512 vd = _mm512_set1_ps(decay);
    int ch = 0;
    if (n == 16) {
        __m512 vb = _mm512_loadu_ps(B), vc = _mm512_loadu_ps(C);
        for (; ch + 16 <= p; ch += 16) {
            __m512 prod[16], xdt = _mm512_mul_ps(_mm512_loadu_ps(xv + ch), _mm512_set1_ps(dt));
            for (int i = 0; i < 16; i++) {
                float *s = S + (size_t)(ch + i) * 16;
                __m512 xi = _mm512_permutexvar_ps(_mm512_set1_epi32(i), xdt);
                __m512 sv = _mm512_fmadd_ps(_mm512_loadu_ps(s), vd, _mm512_mul_ps(xi, vb));
                _mm512_storeu_ps(s, sv);
                prod[i] = _mm512_mul_ps(sv, vc);
            }
            __m512 yv = _mm512_add_ps(sum16_512(prod), _mm512_mul_ps(_mm512_loadu_ps(xv + ch), _mm512_set1_ps(D)));
            _mm512_storeu_ps(y + ch, _mm512_mul_ps(yv, _mm512_loadu_ps(gate + ch)));
        }
    }
    for (; ch < p; ch++) {
        float *s = S + (size_t)ch * n;
        __m512 vx = _mm512_set1_ps(xv[ch] * dt), acc = _mm512_setzero_ps();
        for (int j = 0; j < n; j += 16) {
            __mmask16 k = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
            __m512 sv = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, s + j), vd,
                                        _mm512_mul_ps(vx, _mm512_maskz_loadu_ps(k, B + j)));
            _mm512_mask_storeu_ps(s + j, k, sv);
            acc = _mm512_fmadd_ps(sv, _mm512_maskz_loadu_ps(k, C + j), acc);
        }
        y[ch] = (_mm512_reduce_add_ps(acc) + xv[ch] * D) * gate[ch];
    }
}

/* The causal conv of 4 taps over channels [0, di - di % 4), four channels a vector: each channel's
   window shifted by one with the new input, then bias + taps summed in order (as the scalar loop,
   no fused multiply-add). Returns the first channel left to the caller. */
__attribute__((target(ITL_T512)))
static int conv4_512(float *conv, const float *xs, const float *w, const float *bias, float *out, int di) {
    const __m512i shift = _mm512_set_epi32(19, 15, 14, 13, 18, 11, 10, 9, 17, 7, 6, 5, 16, 3, 2, 1);
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i first = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
    int ch = 0;
    for (; ch + 4 <= di; ch += 4) {
        float *cw = conv + (size_t)ch * 4;
        __m512 win = _mm512_permutex2var_ps(_mm512_loadu_ps(cw), shift, _mm512_castps128_ps512(_mm_loadu_ps(xs + ch)));
        _mm512_storeu_ps(cw, win);
        __m512 p = _mm512_mul_ps(win, _mm512_loadu_ps(w + (size_t)ch * 4));
        __m512 acc = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(bias + ch)));
        acc = _mm512_add_ps(acc, _mm512_permute_ps(p, 0x00));
        acc = _mm512_add_ps(acc, _mm512_permute_ps(p, 0x55));
        acc = _mm512_add_ps(acc, _mm512_permute_ps(p, 0xAA));
        acc = _mm512_add_ps(acc, _mm512_permute_ps(p, 0xFF));
        _mm_storeu_ps(out + ch, _mm512_castps512_ps128(_mm512_permutexvar_ps(first, acc)));
    }
    return ch;
}

/* The first index of the largest of v[0..n) (as the scalar loop: ties to the lower index); -1 when
   a NaN is present (the caller's scalar loop then decides). */
__attribute__((target(ITL_T512)))
static int argmax_512(const float *v, int n) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, v + i);
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        m = _mm512_max_ps(m, x);
    }
    if (nan) return -1;
    __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __mmask16 hit = _mm512_mask_cmp_ps_mask(k, _mm512_maskz_loadu_ps(k, v + i), best, _CMP_EQ_OQ);
        if (hit) return i + __builtin_ctz(hit);
    }
    return 0;
}

/* ------------------------------------------------------------------------- exact activations */

/* ITL_ACT_F32 on the exact copy of an integer matrix (itl_pmat.e8 / e16, built when the mode is
   first chosen): for 16 rows a block, each input's 16 (code - zero-point) values, widened to int32,
   converted and multiplied by the broadcast input with an FMA; per group the rows' scales then.
   One token: four partial sums per group (the FMA latency hidden); more: up to four tokens share
   each widened column. */
__attribute__((target(ITL_T512)))
static inline __m512 ecol_512(const itl_pmat *p, size_t i) {
    return p->e16 ? _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)(p->e16 + 16 * i))))
                  : _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p->e8 + 16 * i))));
}

__attribute__((target(ITL_T512)))
static void matmat_f32_512(const itl_pmat *p, const float *X, int ldx, const int *rows, int T, float *Y, int ldy) {
    int g = p->group;
    for (int t0 = 0; t0 < T; t0 += 4) {
        int nt = T - t0 < 4 ? T - t0 : 4;
        const float *xr[4];
        for (int u = 0; u < 4; u++) {
            int t = t0 + (u < nt ? u : 0);
            xr[u] = X + (size_t)(rows ? rows[t] : t) * ldx;
        }
        for (int k = 0; k < p->nblk; k++) {
            __m512 acc[4];
            for (int u = 0; u < 4; u++) acc[u] = _mm512_setzero_ps();
            for (int b = 0; b < p->ng; b++) {
                size_t c0 = ((size_t)k * p->ng + b) * g; /* the group's first column */
                const float *x0 = xr[0] + b * g;
                __m512 ga[4];
                if (nt == 1) {
                    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                    int i = 0;
                    for (; i + 4 <= g; i += 4) {
                        a0 = _mm512_fmadd_ps(ecol_512(p, c0 + i), _mm512_set1_ps(x0[i]), a0);
                        a1 = _mm512_fmadd_ps(ecol_512(p, c0 + i + 1), _mm512_set1_ps(x0[i + 1]), a1);
                        a2 = _mm512_fmadd_ps(ecol_512(p, c0 + i + 2), _mm512_set1_ps(x0[i + 2]), a2);
                        a3 = _mm512_fmadd_ps(ecol_512(p, c0 + i + 3), _mm512_set1_ps(x0[i + 3]), a3);
                    }
                    for (; i < g; i++) a0 = _mm512_fmadd_ps(ecol_512(p, c0 + i), _mm512_set1_ps(x0[i]), a0);
                    ga[0] = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
                } else {
                    for (int u = 0; u < 4; u++) ga[u] = _mm512_setzero_ps();
                    for (int i = 0; i < g; i++) {
                        __m512 wv = ecol_512(p, c0 + i);
                        for (int u = 0; u < nt; u++)
                            ga[u] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xr[u][b * g + i]), ga[u]);
                    }
                }
                __m512 sv = _mm512_loadu_ps(p->s + ((size_t)k * p->ng + b) * 16);
                for (int u = 0; u < nt; u++) acc[u] = _mm512_fmadd_ps(sv, ga[u], acc[u]);
            }
            int left = p->out - 16 * k;
            __mmask16 st = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
            for (int u = 0; u < nt; u++) _mm512_mask_storeu_ps(Y + (size_t)(t0 + u) * ldy + 16 * k, st, acc[u]);
        }
    }
}

/* The same on AVX2: a block's 16 rows as two halves of 8 lanes. */
__attribute__((target("avx2,fma,f16c")))
static inline __m256 ecol_avx2(const itl_pmat *p, size_t i, int h) {
    return p->e16 ? _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(p->e16 + 16 * i + 8 * h))))
                  : _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p->e8 + 16 * i + 8 * h))));
}

__attribute__((target("avx2,fma,f16c")))
static void matmat_f32_avx2(const itl_pmat *p, const float *X, int ldx, const int *rows, int T, float *Y, int ldy) {
    int g = p->group;
    float tmp[8];
    for (int t0 = 0; t0 < T; t0 += 4) {
        int nt = T - t0 < 4 ? T - t0 : 4;
        const float *xr[4];
        for (int u = 0; u < 4; u++) {
            int t = t0 + (u < nt ? u : 0);
            xr[u] = X + (size_t)(rows ? rows[t] : t) * ldx;
        }
        for (int k = 0; k < p->nblk; k++)
            for (int h = 0; h < 2; h++) {
                int r0 = 16 * k + 8 * h;
                if (r0 >= p->out) break;
                __m256 acc[4];
                for (int u = 0; u < 4; u++) acc[u] = _mm256_setzero_ps();
                for (int b = 0; b < p->ng; b++) {
                    size_t c0 = ((size_t)k * p->ng + b) * g;
                    const float *x0 = xr[0] + b * g;
                    __m256 ga[4];
                    if (nt == 1) {
                        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                        int i = 0;
                        for (; i + 4 <= g; i += 4) {
                            a0 = _mm256_fmadd_ps(ecol_avx2(p, c0 + i, h), _mm256_set1_ps(x0[i]), a0);
                            a1 = _mm256_fmadd_ps(ecol_avx2(p, c0 + i + 1, h), _mm256_set1_ps(x0[i + 1]), a1);
                            a2 = _mm256_fmadd_ps(ecol_avx2(p, c0 + i + 2, h), _mm256_set1_ps(x0[i + 2]), a2);
                            a3 = _mm256_fmadd_ps(ecol_avx2(p, c0 + i + 3, h), _mm256_set1_ps(x0[i + 3]), a3);
                        }
                        for (; i < g; i++) a0 = _mm256_fmadd_ps(ecol_avx2(p, c0 + i, h), _mm256_set1_ps(x0[i]), a0);
                        ga[0] = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
                    } else {
                        for (int u = 0; u < 4; u++) ga[u] = _mm256_setzero_ps();
                        for (int i = 0; i < g; i++) {
                            __m256 wv = ecol_avx2(p, c0 + i, h);
                            for (int u = 0; u < nt; u++)
                                ga[u] = _mm256_fmadd_ps(wv, _mm256_set1_ps(xr[u][b * g + i]), ga[u]);
                        }
                    }
                    __m256 sv = _mm256_loadu_ps(p->s + ((size_t)k * p->ng + b) * 16 + 8 * h);
                    for (int u = 0; u < nt; u++) acc[u] = _mm256_fmadd_ps(sv, ga[u], acc[u]);
                }
                int left = p->out - r0 < 8 ? p->out - r0 : 8;
                for (int u = 0; u < nt; u++) {
                    float *yo = Y + (size_t)(t0 + u) * ldy + r0;
                    if (left == 8) {
                        _mm256_storeu_ps(yo, acc[u]);
                    } else {
                        _mm256_storeu_ps(tmp, acc[u]);
                        memcpy(yo, tmp, (size_t)left * sizeof(float));
                    }
                }
            }
    }
}

/* An fp16 matrix times a float row (F16C conversion, FMA); the tail in scalar code. */
__attribute__((target("avx2,fma,f16c")))
static void matvec_f16_f32_avx2(const itl_mat *w, const float *x, float *y) {
    for (int o = 0; o < w->out; o++) {
        const uint16_t *row = w->w16 + (size_t)o * w->in;
        __m256 a = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= w->in; i += 8)
            a = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + i))), _mm256_loadu_ps(x + i), a);
        __m128 t = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        t = _mm_add_ps(t, _mm_movehl_ps(t, t));
        t = _mm_add_ss(t, _mm_shuffle_ps(t, t, 0x55));
        float acc = _mm_cvtss_f32(t);
        for (; i < w->in; i++) acc += half_to_float(row[i]) * x[i];
        y[o] = acc;
    }
}
#endif

/* ------------------------------------------------------------------------- the step */

/* y = W x with x quantized to int8 per block (the scalar and AVX2 paths, one row). */
static void matvec(itl_ctx *c, const itl_mat *w, const float *x, float *y) {
#if ITL_X86
    if (c->isa >= ITL_AVX2 && w->group % 8 == 0)
        quantize_act_avx2(c, x, w->in, w->group);
    else
#endif
        quantize_act(c, x, w->in, w->group);
    if (w->kind == ITL_F16) {
        for (int i = 0; i < w->in; i++) c->xf[i] = (float)c->x16[i] * c->xs[i / w->group];
#if ITL_X86
        if (c->isa >= ITL_AVX2) { matvec_f16_avx2(c, w, y); return; }
#endif
        matvec_f16_scalar(c, w, y);
        return;
    }
#if ITL_X86
    if (c->isa >= ITL_AVX2) { matvec_int_avx2(c, w, y); return; }
#endif
    matvec_int_scalar(c, w, y);
}

/* Y[t] = W X[rows[t]] for t < T (rows NULL: 0..T-1; X rows ldx floats apart, Y rows ldy). The
   AVX-512 path quantizes the rows into `q` and runs the VNNI kernel over all of them; the AVX2 path
   does the same with its own kernel for a nibble-coded matrix (8-bit codes would saturate its
   maddubs); otherwise one row at a time. */
static void matmat(itl_ctx *c, const itl_mat *w, const itl_pmat *p, itl_qbuf *q, const float *X, int ldx,
                   const int *rows, int T, float *Y, int ldy) {
    if (c->act == ITL_ACT_F32) { /* exact: float activations */
#if ITL_X86
        if (c->isa == ITL_AVX512 && (p->e8 || p->e16)) { matmat_f32_512(p, X, ldx, rows, T, Y, ldy); return; }
        if (c->isa == ITL_AVX2 && (p->e8 || p->e16)) { matmat_f32_avx2(p, X, ldx, rows, T, Y, ldy); return; }
        if (c->isa >= ITL_AVX2 && w->kind == ITL_F16) {
            for (int t = 0; t < T; t++)
                matvec_f16_f32_avx2(w, X + (size_t)(rows ? rows[t] : t) * ldx, Y + (size_t)t * ldy);
            return;
        }
#endif
        for (int t = 0; t < T; t++)
            matvec_f32_scalar(c, w, X + (size_t)(rows ? rows[t] : t) * ldx, Y + (size_t)t * ldy);
        return;
    }
#if ITL_X86
    if (c->isa == ITL_AVX512 && p->w) {
        for (int t = 0; t < T; t++) quant_row_512(p, X + (size_t)(rows ? rows[t] : t) * ldx, q, t);
        matmat_512(p, q, NULL, T, Y, ldy);
        return;
    }
    if (c->isa == ITL_AVX2 && p->w && !p->wide) {
        for (int t = 0; t < T; t++) quant_row_avx2(p, X + (size_t)(rows ? rows[t] : t) * ldx, q, t);
        matmat_avx2(p, q, T, Y, ldy);
        return;
    }
#else
    (void)p; (void)q;
#endif
    for (int t = 0; t < T; t++) matvec(c, w, X + (size_t)(rows ? rows[t] : t) * ldx, Y + (size_t)t * ldy);
}

#if ITL_X86
__attribute__((target(ITL_T512)))
static void rms_512(const float *x, const float *w, float eps, int d, float *out) {
    __m512 ss = _mm512_setzero_ps();
    for (int i = 0; i < d; i += 16) {
        __mmask16 k = d - i >= 16 ? 0xFFFF : (__mmask16)((1u << (d - i)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(k, x + i);
        ss = _mm512_fmadd_ps(v, v, ss);
    }
    __m512 inv = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(ss) / (float)d + eps));
    for (int i = 0; i < d; i += 16) {
        __mmask16 k = d - i >= 16 ? 0xFFFF : (__mmask16)((1u << (d - i)) - 1);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), inv);
        _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, w + i)));
    }
}
#endif

/* out = x / rms(x) * w (d floats) */
static void rms(const itl_ctx *c, const float *x, const float *w, float eps, int d, float *out) {
#if ITL_X86
    if (c->isa == ITL_AVX512) { rms_512(x, w, eps, d, out); return; }
#else
    (void)c;
#endif
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
    if (c->isa == ITL_AVX512) { silu_512(v, n); return; }
    if (c->isa == ITL_AVX2) { silu_avx2(v, n); return; }
#else
    (void)c;
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
    for (int b = 0; b < w->in / w->group; b++) { /* one scale and zero-point a group */
        size_t gi = (size_t)b * w->out + tok;
        float s = half_to_float(w->scales[gi]), z = (float)w->zeros[gi];
        for (int i = b * w->group; i < (b + 1) * w->group; i++) x[i] = ((float)c->row[i] - z) * s;
    }
}

/* The residual streams of the T tokens (d floats each, rows c->ld apart in c->x): their rows,
   through embed_in when factorised (the rows staged in xn). */
static void embed(itl_ctx *c, const int32_t *toks, int T) {
    const itl_model *m = c->m;
    float *dst = m->rank > 0 ? c->xn : c->x;
    for (int t = 0; t < T; t++) embed_row(c, toks[t], dst + (size_t)t * c->ld);
    if (m->rank > 0) matmat(c, &m->embed_in, &c->embed_in, &c->qb, c->xn, c->ld, NULL, T, c->x, c->ld);
}

/* The mixer of layer l over T tokens, one after another through the conv and the state. */
static void mixer(itl_ctx *c, int l, float *conv, float *S, int T) {
    const itl_model *m = c->m;
    const itl_layer *L = &m->layers[l];
    const itl_player *P = &c->pl[l];
    int di = L->d_inner, dc = L->d_conv, ld = c->ld;
    for (int t = 0; t < T; t++) rms(c, c->x + (size_t)t * ld, L->norm1, L->eps1, m->d, c->xn + (size_t)t * ld);
    matmat(c, &L->in_proj, &P->in_proj, &c->qb, c->xn, ld, NULL, T, c->xz, ld); /* xs = xz[:di], z = xz[di:] */
    for (int t = 0; t < T; t++) {
        const float *xz = c->xz + (size_t)t * ld;
        float *xc = c->xc + (size_t)t * ld;
        int ch = 0;
#if ITL_X86
        if (c->isa == ITL_AVX512 && dc == 4) ch = conv4_512(conv, xz, L->conv_w, L->conv_b, xc, di);
#endif
        for (; ch < di; ch++) { /* shift in the new input, then the taps (each value read once) */
            float *cw = conv + (size_t)ch * dc, acc = L->conv_b[ch];
            const float *wc = L->conv_w + (size_t)ch * dc;
            for (int u = 0; u + 1 < dc; u++) {
                float v = cw[u + 1];
                cw[u] = v;
                acc += v * wc[u];
            }
            cw[dc - 1] = xz[ch];
            xc[ch] = acc + xz[ch] * wc[dc - 1];
        }
        silu_inplace(c, xc, di);
        silu_inplace(c, c->xz + (size_t)t * ld + di, di); /* the gate */
    }
    matmat(c, &L->x_proj, &P->x_proj, &c->qb, c->xc, ld, NULL, T, c->dbc, ld); /* dt rank r, then B (n), C (n) */
    matmat(c, &L->dt_proj, &P->dt_proj, &c->qb, c->dbc, ld, NULL, T, c->dt, ld);
    for (int t = 0; t < T; t++) {
        const float *dbc = c->dbc + (size_t)t * ld, *B = dbc + L->r, *C = dbc + L->r + L->n;
        const float *xc = c->xc + (size_t)t * ld, *gate = c->xz + (size_t)t * ld + di;
        float *y = c->y + (size_t)t * ld;
        for (int h = 0; h < L->h; h++) {
            float dt = softplus(c->dt[(size_t)t * ld + h] + L->dt_b[h]), decay = expf(dt * L->A[h]);
            const float *xh = xc + h * L->p;
            float *yh = y + h * L->p, *Sh = S + (size_t)h * L->p * L->n;
#if ITL_X86
            if (c->isa == ITL_AVX512) {
                state_head_512(Sh, B, C, decay, dt, xh, L->D[h], gate + h * L->p, yh, L->p, L->n);
                continue;
            }
#endif
            for (int p = 0; p < L->p; p++) {
                float xdt = xh[p] * dt, acc;
#if ITL_X86
                if (c->isa == ITL_AVX2)
                    acc = state_row_avx2(Sh + (size_t)p * L->n, B, C, decay, xdt, L->n);
                else
#endif
                    acc = state_row_scalar(Sh + (size_t)p * L->n, B, C, decay, xdt, L->n);
                yh[p] = (acc + xh[p] * L->D[h]) * gate[h * L->p + p];
            }
        }
    }
    matmat(c, &L->out_proj, &P->out_proj, &c->qb, c->y, ld, NULL, T, c->mo, ld);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < m->d; i++) c->x[(size_t)t * ld + i] += c->mo[(size_t)t * ld + i];
}

/* The sparse MoE of layer l over T tokens: the router, each token's top-k experts, then each
   expert once over the tokens routed to it; a token's expert outputs summed in its top-k order. */
static void moe(itl_ctx *c, int l, int T) {
    const itl_model *m = c->m;
    const itl_layer *L = &m->layers[l];
    const itl_player *P = &c->pl[l];
    int d = m->d, e = L->e, k = L->k, ld = c->ld;
    for (int t = 0; t < T; t++) rms(c, c->x + (size_t)t * ld, L->norm2, L->eps2, d, c->xn + (size_t)t * ld);
    matmat(c, &L->router, &P->router, &c->qa, c->xn, ld, NULL, T, c->up, ld);
    for (int t = 0; t < T; t++) {
        const float *logit = c->up + (size_t)t * ld;
        float probs[ITL_MAX_EXPERTS], mx = -INFINITY, tot = 0.f, gsum = 0.f;
        int top[ITL_MAX_EXPERTS];
        for (int j = 0; j < e; j++) mx = fmaxf(mx, logit[j]);
        for (int j = 0; j < e; j++) tot += (probs[j] = expf(logit[j] - mx));
        for (int j = 0; j < e; j++) probs[j] /= tot;
        for (int u = 0; u < k; u++) { /* top-k, the largest first; ties go to the lower index */
            int best = -1;
            for (int j = 0; j < e; j++) {
                int used = 0;
                for (int v = 0; v < u; v++) used |= top[v] == j;
                if (!used && (best < 0 || probs[j] > probs[best])) best = j;
            }
            top[u] = best;
            gsum += probs[best];
        }
        for (int u = 0; u < k; u++) {
            c->sel[t * k + u] = top[u];
            c->gate[t * k + u] = probs[top[u]] / gsum;
        }
    }
    for (int x = 0; x < e; x++) {
        int n = 0;
        for (int s = 0; s < T * k; s++)
            if (c->sel[s] == x) c->rows[n++] = s;
        if (!n) continue;
        const itl_mat *w1 = &L->w1[x], *w2 = &L->w2[x];
        const itl_pmat *p1 = &P->w1[x], *p2 = &P->w2[x];
        int toks[ITL_CHUNK * ITL_MAX_EXPERTS];
        for (int i = 0; i < n; i++) toks[i] = c->rows[i] / k;
#if ITL_X86
        if (c->isa == ITL_AVX512 && c->act == ITL_ACT_INT8 && p1->w && P->router.w && p1->group == P->router.group)
            matmat_512(p1, &c->qa, toks, n, c->hid, ld); /* the router's quantized rows */
        else
#endif
            matmat(c, w1, p1, &c->qb, c->xn, ld, toks, n, c->hid, ld);
        for (int i = 0; i < n; i++) silu_inplace(c, c->hid + (size_t)i * ld, w1->out);
        matmat(c, w2, p2, &c->qb, c->hid, ld, NULL, n, c->up, ld);
        for (int i = 0; i < n; i++) memcpy(c->ups + (size_t)c->rows[i] * ld, c->up + (size_t)i * ld, (size_t)d * 4);
    }
    for (int t = 0; t < T; t++) {
        float *x = c->x + (size_t)t * ld, *acc = c->mo;
        memset(acc, 0, (size_t)d * sizeof(float));
        for (int u = 0; u < k; u++) {
            const float *up = c->ups + (size_t)(t * k + u) * ld;
            float g = c->gate[t * k + u];
            for (int i = 0; i < d; i++) acc[i] += g * up[i];
        }
        for (int i = 0; i < d; i++) x[i] += acc[i];
    }
}

/* T tokens (T <= ITL_CHUNK) through every layer; logits of every token (all: rows vocab apart) or of
   the last one only. */
static void run_chunk(itl_ctx *c, const int32_t *toks, int T, float *conv, float *ssm, float *logits, int all) {
    const itl_model *m = c->m;
    int ld = c->ld;
    embed(c, toks, T);
    for (int l = 0; l < m->n_layers; l++) {
        const itl_layer *L = &m->layers[l];
        mixer(c, l, conv, ssm, T);
        moe(c, l, T);
        conv += (size_t)L->d_inner * L->d_conv;
        ssm += (size_t)L->h * L->p * L->n;
    }
    int first = all ? 0 : T - 1, nh = T - first;
    for (int t = 0; t < nh; t++) rms(c, c->x + (size_t)(first + t) * ld, m->norm_f, m->eps_f, m->d, c->xn + (size_t)t * ld);
    if (m->rank > 0) {
        matmat(c, &m->head_proj, &c->head_proj, &c->qb, c->xn, ld, NULL, nh, c->y, ld);
        matmat(c, &m->emb, &c->emb, &c->qb, c->y, ld, NULL, nh, logits, m->vocab);
    } else {
        matmat(c, &m->emb, &c->emb, &c->qb, c->xn, ld, NULL, nh, logits, m->vocab);
    }
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

/* AVX-512 F/BW/VL with VNNI (and the AVX2 path's features, which its fp16 matrices use). */
int itl_avx512_supported(void) {
#if ITL_X86
    __builtin_cpu_init();
    return itl_avx2_supported() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
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
    case ITL_ERR_MODE: return "unknown activation mode (ITL_ACT_INT8 or ITL_ACT_F32)";
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

/* 0 scalar, 1 AVX2, 2 AVX-512 VNNI; a path the CPU lacks falls back to the best one below it.
   Returns the path now in use (-ITL_ERR_CTX for a bad context). */
int itl_set_isa(itl_ctx *c, int isa) {
    if (!ctx_ok(c)) return -ITL_ERR_CTX;
    if (isa == ITL_AVX512 && !c->has512) isa = ITL_AVX2;
    if (isa == ITL_AVX2 && !itl_avx2_supported()) isa = ITL_SCALAR;
    c->isa = isa == ITL_AVX512 || isa == ITL_AVX2 ? isa : ITL_SCALAR;
    return c->isa;
}

int itl_get_isa(const itl_ctx *c) { return ctx_ok(c) ? c->isa : -ITL_ERR_CTX; }

/* ITL_ACT_INT8 (default) or ITL_ACT_F32; returns the mode now in use, -ITL_ERR_MODE for another
   value (the mode unchanged), -ITL_ERR_CTX for a bad context. */
static void build_exact(itl_ctx *c);

int itl_set_act(itl_ctx *c, int mode) {
    if (!ctx_ok(c)) return -ITL_ERR_CTX;
    if (mode != ITL_ACT_INT8 && mode != ITL_ACT_F32) return -ITL_ERR_MODE;
    if (mode == ITL_ACT_F32) build_exact(c);
    c->act = mode;
    return c->act;
}

int itl_get_act(const itl_ctx *c) { return ctx_ok(c) ? c->act : -ITL_ERR_CTX; }

/* The state sizes (floats) a context's model needs; ITL_ERR_CTX / ITL_ERR_NULL. */
int itl_state_sizes(const itl_ctx *c, int64_t *conv_n, int64_t *ssm_n) {
    if (!ctx_ok(c)) return ITL_ERR_CTX;
    if (!conv_n || !ssm_n) return ITL_ERR_NULL;
    *conv_n = (int64_t)c->conv_n;
    *ssm_n = (int64_t)c->ssm_n;
    return ITL_OK;
}

/* Every packed matrix of the context, by index (NULL past the last). */
static itl_pmat *pmat_at(itl_ctx *c, int i) {
    if (i < 3) return i == 0 ? &c->emb : i == 1 ? &c->embed_in : &c->head_proj;
    i -= 3;
    for (int l = 0; l < c->m->n_layers; l++) {
        itl_player *P = &c->pl[l];
        int e = c->m->layers[l].e;
        if (i < 5) return i == 0 ? &P->in_proj : i == 1 ? &P->x_proj : i == 2 ? &P->dt_proj : i == 3 ? &P->out_proj
                                                                                                : &P->router;
        i -= 5;
        if (i < 2 * e) return i < e ? (P->w1 ? &P->w1[i] : NULL) : (P->w2 ? &P->w2[i - e] : NULL);
        i -= 2 * e;
    }
    return NULL;
}

void itl_free(itl_ctx *c) {
    if (!c || c->magic != ITL_MAGIC) return;
    c->magic = 0;
    if (c->pl) {
        itl_pmat *p;
        for (int i = 0; (p = pmat_at(c, i)) != NULL || i < 3; i++)
            if (p) pmat_free(p);
        for (int l = 0; l < c->m->n_layers; l++) { free(c->pl[l].w1); free(c->pl[l].w2); }
        free(c->pl);
    }
    void *bufs[] = {c->x, c->xn, c->xz, c->xc, c->dbc, c->dt, c->y, c->up, c->hid, c->mo, c->ups, c->gate, c->sel,
                    c->rows, c->x8, c->x16, c->xs, c->xsum, c->xf, c->row, c->qa.x8, c->qa.s, c->qa.sum, c->qb.x8,
                    c->qb.s, c->qb.sum};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    free(c);
}

static int imax(int a, int b) { return a > b ? a : b; }

/* The model's matrix behind pmat_at(c, i) (NULL: a factorised slot of a dense model). */
static const itl_mat *mat_at(const itl_ctx *c, int i) {
    const itl_model *m = c->m;
    if (i < 3) return i == 0 ? &m->emb : m->rank == 0 ? NULL : i == 1 ? &m->embed_in : &m->head_proj;
    int j = i - 3;
    for (int l = 0; l < m->n_layers; l++) {
        const itl_layer *L = &m->layers[l];
        if (j < 5) return j == 0 ? &L->in_proj : j == 1 ? &L->x_proj : j == 2 ? &L->dt_proj : j == 3 ? &L->out_proj
                                                                                             : &L->router;
        if (j < 5 + 2 * L->e) return j < 5 + L->e ? &L->w1[j - 5] : &L->w2[j - 5 - L->e];
        j -= 5 + 2 * L->e;
    }
    return NULL;
}

/* The exact mode's copies of every packed matrix (once; a matrix whose copy cannot be allocated
   runs on the scalar path). */
static void build_exact(itl_ctx *c) {
    itl_pmat *p;
    for (int i = 0; (p = pmat_at(c, i)) != NULL; i++) {
        const itl_mat *w = mat_at(c, i);
        if (w) pmat_build_exact(p, w);
    }
}

/* The per-matrix slots, with (pack) the VNNI copies of every integer matrix, and the quantized-row
   buffers; 0 or -1. */
static int build_packed(itl_ctx *c, int pack) {
    const itl_model *m = c->m;
    c->pl = calloc((size_t)(m->n_layers > 0 ? m->n_layers : 1), sizeof *c->pl);
    if (!c->pl) return -1;
    for (int l = 0; l < m->n_layers; l++) {
        c->pl[l].w1 = calloc((size_t)m->layers[l].e, sizeof(itl_pmat));
        c->pl[l].w2 = calloc((size_t)m->layers[l].e, sizeof(itl_pmat));
        if (!c->pl[l].w1 || !c->pl[l].w2) return -1;
    }
    int qld = 64, qldg = 1;
    itl_pmat *p;
    for (int i = 0; (p = pmat_at(c, i)) != NULL; i++) {
        const itl_mat *w = mat_at(c, i);
        if (!w) continue;
        if (pack && pmat_build(p, w)) return -1;
        if (p->w) {
            qld = imax(qld, (p->ng * p->gp + 63) / 64 * 64);
            qldg = imax(qldg, p->ng);
        }
    }
    itl_qbuf *qs[2] = {&c->qa, &c->qb};
    for (int i = 0; i < 2; i++) {
        qs[i]->ld = qld;
        qs[i]->ldg = qldg;
        qs[i]->x8 = zalloc64((size_t)ITL_CHUNK * qld);
        qs[i]->s = calloc((size_t)ITL_CHUNK * qldg, sizeof(float));
        qs[i]->sum = calloc((size_t)ITL_CHUNK * qldg, sizeof(int32_t));
        if (!qs[i]->x8 || !qs[i]->s || !qs[i]->sum) return -1;
    }
    return 0;
}

/* A context over `m` (which must outlive it and stay unchanged), with its scratch buffers (and, on
   a CPU with AVX2, its own packed copy of the integer matrices: itl_pmat); NULL when out of memory or
   when itl_check_model refuses `m` (call it for the reason). ITERALITE_NATIVE_ISA=scalar / avx2
   starts it on that path instead of the best one. */
itl_ctx *itl_create(const itl_model *m) {
    if (itl_check_model(m, NULL, 0) != ITL_OK) return NULL;
    itl_ctx *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->magic = ITL_MAGIC;
    c->m = m;
    int ld = imax(m->d, m->rank), kmax = 1;
    for (int l = 0; l < m->n_layers; l++) {
        const itl_layer *L = &m->layers[l];
        c->conv_n += (size_t)L->d_inner * L->d_conv;
        c->ssm_n += (size_t)L->h * L->p * L->n;
        ld = imax(ld, imax(2 * L->d_inner, imax(L->r + 2 * L->n, imax(L->h, imax(L->e, L->f)))));
        kmax = imax(kmax, L->k);
    }
    c->ld = ld = (ld + 15) / 16 * 16;
    c->kmax = kmax;
    size_t rowf = (size_t)ITL_CHUNK * ld * sizeof(float);
    size_t big = (size_t)(m->max_in > m->vocab ? m->max_in : m->vocab) + 64;
    c->x = malloc(rowf); c->xn = malloc(rowf); c->xz = malloc(rowf); c->xc = malloc(rowf);
    c->dbc = malloc(rowf); c->dt = malloc(rowf); c->y = malloc(rowf); c->up = malloc(rowf);
    c->hid = malloc(rowf); c->mo = malloc(rowf); c->ups = malloc(rowf * (size_t)kmax);
    c->gate = malloc((size_t)ITL_CHUNK * kmax * sizeof(float));
    c->sel = malloc((size_t)ITL_CHUNK * kmax * sizeof(int32_t));
    c->rows = malloc((size_t)ITL_CHUNK * kmax * sizeof(int32_t));
    c->x8 = malloc(big); c->x16 = malloc(big * 2); c->xs = malloc(big * 4);
    c->xsum = malloc(big * 4); c->xf = malloc(big * 4); c->row = malloc(big);
    if (!c->x || !c->xn || !c->xz || !c->xc || !c->dbc || !c->dt || !c->y || !c->up || !c->hid || !c->mo || !c->ups ||
        !c->gate || !c->sel || !c->rows || !c->x8 || !c->x16 || !c->xs || !c->xsum || !c->xf || !c->row) {
        itl_free(c);
        return NULL;
    }
    int pack = itl_avx2_supported(); /* the packed copy serves the AVX-512 and the AVX2 kernels */
    if (build_packed(c, pack)) {
        itl_free(c);
        return NULL;
    }
    c->has512 = pack && itl_avx512_supported();
    const char *env = getenv("ITERALITE_NATIVE_ISA");
    int isa = ITL_AVX512;
    if (env && strcmp(env, "scalar") == 0) isa = ITL_SCALAR;
    else if (env && strcmp(env, "avx2") == 0) isa = ITL_AVX2;
    itl_set_isa(c, isa);
    const char *act = getenv("ITERALITE_NATIVE_ACT");
    itl_set_act(c, act && strcmp(act, "f32") == 0 ? ITL_ACT_F32 : ITL_ACT_INT8);
    return c;
}

static int check_state(const itl_ctx *c, const float *conv, int64_t conv_n, const float *ssm, int64_t ssm_n,
                       const float *logits) {
    if (!ctx_ok(c)) return ITL_ERR_CTX;
    if (!conv || !ssm || !logits) return ITL_ERR_NULL;
    if (conv_n < (int64_t)c->conv_n || ssm_n < (int64_t)c->ssm_n) return ITL_ERR_STATE;
    return ITL_OK;
}

static int check_call(const itl_ctx *c, int token, const float *conv, int64_t conv_n, const float *ssm,
                      int64_t ssm_n, const float *logits, int64_t logits_n) {
    int err = check_state(c, conv, conv_n, ssm, ssm_n, logits);
    if (err) return err;
    if (token < 0 || token >= c->m->vocab) return ITL_ERR_TOKEN;
    if (logits_n < c->m->vocab) return ITL_ERR_LOGITS;
    return ITL_OK;
}

/* One token: conv (conv_n floats, at least the sum over layers of d_inner * d_conv), ssm (ssm_n,
   at least the sum of h * p * n) updated in place; logits (logits_n >= vocab) written. Returns
   ITL_OK or an ITL_ERR_* code (nothing read or written then). */
int itl_step(itl_ctx *c, int token, float *conv, int64_t conv_n, float *ssm, int64_t ssm_n, float *logits,
             int64_t logits_n) {
    int err = check_call(c, token, conv, conv_n, ssm, ssm_n, logits, logits_n);
    if (err) return err;
    int32_t tok = token;
    run_chunk(c, &tok, 1, conv, ssm, logits, 1);
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
    int vocab = c->m->vocab;
    for (int t = 0; t < n; t++) {
        int32_t tok = token;
        run_chunk(c, &tok, 1, conv, ssm, logits, 1);
        int best = -1;
#if ITL_X86
        if (c->isa == ITL_AVX512) best = argmax_512(logits, vocab);
#endif
        if (best < 0) {
            best = 0;
            for (int v = 1; v < vocab; v++)
                if (logits[v] > logits[best]) best = v;
        }
        out[t] = token = best;
    }
    return ITL_OK;
}

/* See itl_step.h. Every token is checked before any is run (nothing is written on an error). */
int itl_prefill(itl_ctx *c, const int32_t *tokens, int n, float *conv, int64_t conv_n, float *ssm, int64_t ssm_n,
                float *logits, int64_t logits_n, int all) {
    int err = check_state(c, conv, conv_n, ssm, ssm_n, logits);
    if (err) return err;
    if (n < 0) return ITL_ERR_COUNT;
    if (n > 0 && !tokens) return ITL_ERR_NULL;
    int vocab = c->m->vocab;
    if (logits_n < (int64_t)vocab * (all ? (n > 0 ? n : 1) : 1)) return ITL_ERR_LOGITS;
    for (int t = 0; t < n; t++)
        if (tokens[t] < 0 || tokens[t] >= vocab) return ITL_ERR_TOKEN;
    for (int t = 0; t < n; t += ITL_CHUNK) {
        int T = n - t < ITL_CHUNK ? n - t : ITL_CHUNK;
        run_chunk(c, tokens + t, T, conv, ssm, all ? logits + (size_t)t * vocab : logits, all);
    }
    return ITL_OK;
}

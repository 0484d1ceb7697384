/* The seeded sampler of itl_text.h (C99, libc only; the tokenizer is in itl_text.c).
 *
 * The sampler is deterministic across platforms: its PRNG is PCG32, its exp is computed here with
 * only IEEE-754 double additions and multiplications (build with -ffp-contract=off so no FMA
 * changes a rounding), and candidates are ordered by (logit descending, id ascending). */
#include "itl_text.h"

#include <stdlib.h>
#include <string.h>

/* The draw is defined by the straightforward algorithm (sample_full below): the finite logits
 * sorted by (logit descending, id ascending), cut to top_k, weights det_exp((l - max) / T) summed in
 * that order, the smallest prefix whose running sum reaches top_p of the total, then the first id
 * whose running sum exceeds uniform * (the prefix's sum). Sorting and weighing every id is slow, so
 * itl_sampler_sample mostly takes a shorter path with the same result: it bounds the total from
 * cheap approximate weights (with a proven error bound), sorts and weighs exactly only the few
 * largest logits, and returns early only when every total inside the bounds leads to the same id;
 * otherwise it runs sample_full. */

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(ITL_TEXT_NO_AVX2)
#define ITL_TEXT_AVX2 1 /* AVX2 copies of the vectorized loops, chosen at run time */
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#define ITL_INLINE static inline __attribute__((always_inline)) /* into each target's copy of a loop */
#define ITL_CTZ(x) __builtin_ctz(x)
#else
#define ITL_INLINE static inline
static int itl_ctz(unsigned x) {
    int q = 0;
    while (!(x & 1u)) x >>= 1, q++;
    return q;
}
#define ITL_CTZ(x) itl_ctz(x)
#endif

#if defined(__GNUC__) && !defined(__clang__)
/* lets GCC vectorize the loops' selects; changes no value */
#define ITL_VECTORIZE __attribute__((optimize("no-trapping-math")))
#else
#define ITL_VECTORIZE
#endif

struct itl_sampler {
    uint64_t state, inc;
    double temperature, top_p;
    int32_t top_k, cap;
    int avx2; /* the CPU has AVX2 */
    uint64_t *key, *tmp; /* sort keys (sort_key) */
    double *w;           /* exact weights of the sorted prefix */
    float *aw;           /* approximate weights of all ids (n), then weight * -x (n) */
};

static uint32_t pcg32(itl_sampler *s) {
    uint64_t old = s->state;
    s->state = old * 6364136223846793005ULL + s->inc;
    uint32_t xs = (uint32_t)(((old >> 18) ^ old) >> 27), rot = (uint32_t)(old >> 59);
    return (xs >> rot) | (xs << ((32u - rot) & 31u));
}

uint32_t itl_sampler_next_u32(itl_sampler *s) { return s ? pcg32(s) : 0; }

/* Uniform in [0, 1) with 53 random bits. */
static double uniform(itl_sampler *s) {
    uint64_t a = pcg32(s) >> 5, b = pcg32(s) >> 6;
    return (double)((a << 26) | b) * (1.0 / 9007199254740992.0);
}

static int finite_f(float v) { return v == v && v - v == 0.0f; }

/* exp(x) for x <= 0 from additions and multiplications only (bit-identical on IEEE-754
 * platforms): x = k ln2 + r, |r| <= ln2/2, exp(r) by its Taylor series to degree 13. */
static double det_exp(double x) {
    if (!(x > -745.0)) return 0.0;
    if (x > 0.0) x = 0.0;
    const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
    double kd = x * 1.44269504088896338700 - 0.5; /* round to nearest, x <= 0 */
    int k = (int)kd;                               /* truncates toward zero */
    double r = (x - k * ln2_hi) - k * ln2_lo;
    double p = 1.0 / 6227020800.0;                 /* 1/13! */
    static const double inv_fact[13] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
                                        1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
                                        1.0 / 6.0, 0.5, 1.0, 1.0};
    for (int i = 0; i < 13; i++) p = p * r + inv_fact[i];
    /* multiply by 2^k in steps that stay normal until the last */
    while (k < -1000) {
        p *= 9.33263618503218878990e-302; /* 2^-1000 */
        k += 1000;
    }
    union { uint64_t u; double d; } two_k;
    two_k.u = (uint64_t)(k + 1023) << 52;
    return p * two_k.d;
}

itl_sampler *itl_sampler_new(uint64_t seed, double temperature, int32_t top_k, double top_p) {
    if (temperature != temperature || top_p != top_p || !(top_p > 0.0)) return NULL;
    itl_sampler *s = calloc(1, sizeof(itl_sampler));
    if (!s) return NULL;
    s->temperature = temperature;
    s->top_k = top_k;
    s->top_p = top_p;
#ifdef ITL_TEXT_AVX2
    s->avx2 = __builtin_cpu_supports("avx2") != 0;
#endif
    s->inc = (0x5851F42D4C957F2DULL << 1) | 1u; /* one fixed stream; the seed picks the start */
    s->state = 0;
    pcg32(s);
    s->state += seed;
    pcg32(s);
    return s;
}

void itl_sampler_free(itl_sampler *s) {
    if (!s) return;
    free(s->key);
    free(s->tmp);
    free(s->w);
    free(s->aw);
    free(s);
}

/* Ascending keys order finite logits by (logit descending, id ascending); -0 and +0 are one value. */
static uint64_t sort_key(float v, int32_t id) {
    float z = v + 0.0f; /* -0 -> +0 */
    uint32_t b;
    memcpy(&b, &z, sizeof b);
    uint32_t down = (b & 0x80000000u) ? b : ~b & 0x7FFFFFFFu; /* decreasing in v */
    return (uint64_t)down << 32 | (uint32_t)id;
}

static int32_t key_id(uint64_t k) { return (int32_t)(uint32_t)k; }

/* Sort keys[0..n) ascending (the order is total: any sort gives it). Few keys: insertion sort; up
 * to 512: a bucket pass then insertion sort; more: they arrive in increasing id order, so a stable
 * sort of the high 32 bits suffices (LSD radix, bytes shared by all keys skipped). */
static void sort_keys(uint64_t *a, uint64_t *tmp, int32_t n) {
    if (n <= 48) {
        for (int32_t i = 1; i < n; i++) {
            uint64_t x = a[i];
            int32_t j = i;
            for (; j > 0 && a[j - 1] > x; j--) a[j] = a[j - 1];
            a[j] = x;
        }
        return;
    }
    if (n <= 512) { /* buckets by linear position in the key range (monotone), then insertion sort */
        uint32_t lo = UINT32_MAX, hi = 0;
        for (int32_t i = 0; i < n; i++) {
            uint32_t h = (uint32_t)(a[i] >> 32);
            lo = h < lo ? h : lo;
            hi = h > hi ? h : hi;
        }
        uint64_t mul = ((uint64_t)n << 32) / ((uint64_t)(hi - lo) + 1); /* bucket = (h - lo) * n / span */
        int32_t start[513];
        memset(start, 0, sizeof(int32_t) * (size_t)(n + 1));
        for (int32_t i = 0; i < n; i++) start[(((uint64_t)((uint32_t)(a[i] >> 32) - lo) * mul) >> 32) + 1]++;
        for (int32_t b = 0; b < n; b++) start[b + 1] += start[b];
        for (int32_t i = 0; i < n; i++) tmp[start[((uint64_t)((uint32_t)(a[i] >> 32) - lo) * mul) >> 32]++] = a[i];
        for (int32_t i = 0; i < n; i++) { /* only keys within a bucket are out of order */
            uint64_t x = tmp[i];
            int32_t j = i;
            for (; j > 0 && a[j - 1] > x; j--) a[j] = a[j - 1];
            a[j] = x;
        }
        return;
    }
    int32_t cnt[4][256];
    memset(cnt, 0, sizeof cnt);
    for (int32_t i = 0; i < n; i++) {
        uint32_t h = (uint32_t)(a[i] >> 32);
        cnt[0][h & 255]++;
        cnt[1][(h >> 8) & 255]++;
        cnt[2][(h >> 16) & 255]++;
        cnt[3][h >> 24]++;
    }
    uint64_t *src = a, *dst = tmp;
    for (int d = 0; d < 4; d++) {
        int shift = 32 + 8 * d;
        if (cnt[d][(src[0] >> shift) & 255] == n) continue; /* one value of this byte: nothing to do */
        int32_t pos = 0;
        for (int b = 0; b < 256; b++) {
            int32_t c = cnt[d][b];
            cnt[d][b] = pos;
            pos += c;
        }
        for (int32_t i = 0; i < n; i++) dst[cnt[d][(src[i] >> shift) & 255]++] = src[i];
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != a) memcpy(a, src, sizeof(uint64_t) * (size_t)n);
}

/* The draw over the first m sorted keys, exactly as defined: weights, total, top-p cut, draw. */
static int32_t draw_sorted(itl_sampler *s, const float *logits, const uint64_t *key, int32_t m, double top) {
    double *w = s->w, total = 0.0;
    for (int32_t i = 0; i < m; i++) {
        w[i] = det_exp(((double)logits[key_id(key[i])] - top) / s->temperature);
        total += w[i];
    }
    if (s->top_p < 1.0) { /* the smallest prefix whose mass reaches top_p of the total */
        double cum = 0.0, want = s->top_p * total;
        for (int32_t i = 0; i < m; i++) {
            cum += w[i];
            if (cum >= want) {
                m = i + 1;
                total = cum;
                break;
            }
        }
    }
    double u = uniform(s) * total, acc = 0.0;
    for (int32_t i = 0; i < m; i++) {
        acc += w[i];
        if (u < acc) return key_id(key[i]);
    }
    return key_id(key[m - 1]);
}

/* The defining algorithm: every finite id sorted and weighed. */
static int32_t sample_full(itl_sampler *s, const float *logits, int32_t n, double top) {
    int32_t m = 0;
    for (int32_t i = 0; i < n; i++)
        if (finite_f(logits[i])) s->key[m++] = sort_key(logits[i], i);
    sort_keys(s->key, s->tmp, m);
    if (s->top_k > 0 && s->top_k < m) m = s->top_k;
    return draw_sorted(s, logits, s->key, m, top);
}

/* Keys of the finite logits >= floor (in id order), sorted; their count. */
ITL_INLINE int32_t gather_body(const float *logits, int32_t n, float floor, uint64_t *key) {
    int32_t m = 0, i = 0;
    for (; i + 8 <= n; i += 8) { /* a mask per 8 logits (vectorized compares), then its set bits */
        unsigned mask = 0;
        for (int q = 0; q < 8; q++) mask |= (unsigned)(logits[i + q] >= floor && logits[i + q] <= 3.40282347e38f) << q;
        while (mask) {
            int q = ITL_CTZ(mask);
            mask &= mask - 1;
            key[m++] = sort_key(logits[i + q], i + q);
        }
    }
    for (; i < n; i++)
        if (logits[i] >= floor && logits[i] <= 3.40282347e38f) key[m++] = sort_key(logits[i], i);
    return m;
}

ITL_VECTORIZE static int32_t gather_plain(const float *logits, int32_t n, float floor, uint64_t *key) {
    return gather_body(logits, n, floor, key);
}

#ifdef ITL_TEXT_AVX2
/* gather_body with AVX2 compares: a mask per 8 logits, then its set bits */
__attribute__((target("avx2"))) static int32_t gather_avx2(const float *logits, int32_t n, float floor, uint64_t *key) {
    const __m256 lo = _mm256_set1_ps(floor), hi = _mm256_set1_ps(3.40282347e38f);
    int32_t m = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(logits + i);
        unsigned mask = (unsigned)_mm256_movemask_ps(
            _mm256_and_ps(_mm256_cmp_ps(v, lo, _CMP_GE_OQ), _mm256_cmp_ps(v, hi, _CMP_LE_OQ)));
        while (mask) {
            int q = ITL_CTZ(mask);
            mask &= mask - 1;
            key[m++] = sort_key(logits[i + q], i + q);
        }
    }
    for (; i < n; i++)
        if (logits[i] >= floor && logits[i] <= 3.40282347e38f) key[m++] = sort_key(logits[i], i);
    return m;
}
#endif

/* Keys of the finite logits >= floor (a finite float), sorted; their count. */
static int32_t gather_sorted(itl_sampler *s, const float *logits, int32_t n, float floor) {
#ifdef ITL_TEXT_AVX2
    int32_t m = s->avx2 ? gather_avx2(logits, n, floor, s->key) : gather_plain(logits, n, floor, s->key);
#else
    int32_t m = gather_plain(logits, n, floor, s->key);
#endif
    sort_keys(s->key, s->tmp, m);
    return m;
}

/* top - c * temperature as a float, at least -FLT_MAX (a floor for gather_sorted). */
static float floor_below(double top, double c, double temperature) {
    double f = top - c * temperature;
    return f > -3.4028234663852886e38 ? (float)f : -3.4028234663852886e38f;
}

/* Gather floors, in units of the temperature below the largest logit. */
#define ITL_NFLOOR 6
#define ITL_NMASS 3 /* the first floors get a mass estimate; the deeper ones are simply tried */
static const double floor_nats[ITL_NFLOOR] = {2.0, 4.5, 8.0, 14.0, 24.0, 40.0};
/* the same for top-k, where a count decides (finer: what is gathered is sorted) */
#define ITL_NKFLOOR 8
static const double kfloor_nats[ITL_NKFLOOR] = {1.0, 1.5, 2.25, 3.25, 4.5, 6.0, 8.0, 11.0};

/* Order-preserving int32 of a float's bits (-0 and +0 alike: both 0); INT32_MIN for NaN and
 * infinities. Branch-free, so the maximum below vectorizes. */
static inline int32_t ord_bits(uint32_t b) {
    uint32_t neg = b >> 31, mag = b & 0x7FFFFFFFu;
    uint32_t o = (mag ^ (0u - neg)) + neg;      /* two's complement negation when negative */
    uint32_t bad = 0u - (uint32_t)(mag >= 0x7F800000u); /* all ones: not finite */
    return (int32_t)((o & ~bad) | (0x80000000u & bad));
}

ITL_INLINE int32_t max_ord_body(const float *logits, int32_t n) {
    int32_t mx = INT32_MIN;
    for (int32_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, logits + i, sizeof b);
        int32_t o = ord_bits(b);
        mx = o > mx ? o : mx;
    }
    return mx;
}

static int32_t max_ord_plain(const float *logits, int32_t n) { return max_ord_body(logits, n); }

#ifdef ITL_TEXT_AVX2
/* max_ord_body by AVX2 float maxima (NaN and infinities replaced by -inf first) */
__attribute__((target("avx2"))) static int32_t max_ord_avx2(const float *logits, int32_t n) {
    const __m256 big = _mm256_set1_ps(3.40282347e38f), ninf = _mm256_set1_ps(-__builtin_inff());
    __m256 mx = ninf;
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(logits + i);
        __m256 ok = _mm256_and_ps(_mm256_cmp_ps(v, big, _CMP_LE_OQ), _mm256_cmp_ps(v, ninf, _CMP_GT_OQ));
        mx = _mm256_max_ps(mx, _mm256_blendv_ps(ninf, v, ok));
    }
    float a[8];
    _mm256_storeu_ps(a, mx);
    int32_t best = INT32_MIN;
    for (int q = 0; q < 8; q++) {
        uint32_t b;
        memcpy(&b, a + q, sizeof b);
        int32_t o = ord_bits(b);
        best = o > best ? o : best;
    }
    int32_t rest = max_ord_body(logits + i, n - i);
    return rest > best ? rest : best;
}

/* count_floors with AVX2: one pass, a count vector per floor */
__attribute__((target("avx2"))) static void count_floors_avx2(const float *logits, int32_t n, const float *floors,
                                                              int32_t *counts) {
    __m256 f[ITL_NKFLOOR];
    __m256i c[ITL_NKFLOOR];
    for (int j = 0; j < ITL_NKFLOOR; j++) {
        f[j] = _mm256_set1_ps(floors[j]);
        c[j] = _mm256_setzero_si256();
    }
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(logits + i);
        for (int j = 0; j < ITL_NKFLOOR; j++) /* a true compare is -1 in each lane */
            c[j] = _mm256_sub_epi32(c[j], _mm256_castps_si256(_mm256_cmp_ps(v, f[j], _CMP_GE_OQ)));
    }
    for (int j = 0; j < ITL_NKFLOOR; j++) {
        int32_t a[8], t = 0;
        _mm256_storeu_si256((__m256i *)(void *)a, c[j]);
        for (int q = 0; q < 8; q++) t += a[q];
        for (int32_t k = i; k < n; k++) t += logits[k] >= floors[j];
        counts[j] = t;
    }
}
#endif

/* The first index of the largest finite logit, or -1 when none: a vectorized maximum of ord_bits,
 * then a scan for its first occurrence (== also finds -0 for +0). */
static int32_t first_max(const itl_sampler *s, const float *logits, int32_t n) {
#ifdef ITL_TEXT_AVX2
    int32_t mx = s->avx2 ? max_ord_avx2(logits, n) : max_ord_plain(logits, n);
#else
    (void)s;
    int32_t mx = max_ord_plain(logits, n);
#endif
    if (mx == INT32_MIN) return -1;
    uint32_t b = mx >= 0 ? (uint32_t)mx : 0x80000000u | (0u - (uint32_t)mx);
    float mv;
    memcpy(&mv, &b, sizeof mv);
    int32_t i = 0;
    while (!(logits[i] == mv)) i++;
    return i;
}

/* w[i] ~ exp(x), x = (logits[i] - top) * inv_t in float (0 where the logit is not finite; x below
 * -80 taken as -80), and wx[i] = w[i] * -x. Error (only bounds use these): x is within 1.81e-7 |x|
 * of the defined (logits[i] - top) / temperature (three float roundings), and w[i] within 7e-7
 * (relative) of exp(x): Cody-Waite reduction to |r| <= ln2/2, the degree-6 Taylor polynomial
 * (truncation 2.4e-7) by Estrin's scheme (a short dependency chain), float rounding (< 4e-7).
 * Straight-line code the compiler vectorizes; approx_weights_avx2 does the same operations. */
ITL_INLINE void approx_body(const float *logits, int32_t n, float top, float inv_t, float *w, float *wx) {
    for (int32_t i = 0; i < n; i++) {
        float d = logits[i] - top;
        float x = d * inv_t;
        x = x > -80.0f ? x : -80.0f; /* also NaN */
        float t = x * 1.44269504f + 12582912.0f; /* round(x / ln2) + 1.5 * 2^23 */
        float kf = t - 12582912.0f;
        float r = (x - kf * 0.693359375f) - kf * -2.12194440e-4f;
        float r2 = r * r;
        float p = ((1.0f + r) + r2 * (0.5f + r * (1.0f / 6.0f))) +
                  (r2 * r2) * ((1.0f / 24.0f + r * (1.0f / 120.0f)) + r2 * (1.0f / 720.0f));
        uint32_t tb, sb;
        memcpy(&tb, &t, sizeof tb);
        sb = (tb - 0x4B400000u + 127u) << 23; /* 2^k, k >= -116 */
        float sc;
        memcpy(&sc, &sb, sizeof sc);
        float e = p * sc;
        e = d - d == 0.0f ? e : 0.0f; /* finite logits only */
        w[i] = e;
        wx[i] = e * -x;
    }
}

/* out[0] = sum of w, out[1] = sum of w * -x (in double, any order: only bounds use them), and
 * out[2 + j] ~ the sum of the w >= lims[j], j < ITL_NMASS (rough: it only picks a gather floor) */
ITL_VECTORIZE static void approx_weights(const float *logits, int32_t n, float top, float inv_t, float *w, float *wx,
                                         const float *lims, double *out) {
    approx_body(logits, n, top, inv_t, w, wx);
    double a[4] = {0.0, 0.0, 0.0, 0.0}, b[4] = {0.0, 0.0, 0.0, 0.0};
    int32_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int q = 0; q < 4; q++) {
            a[q] += (double)w[i + q];
            b[q] += (double)wx[i + q];
        }
    for (; i < n; i++) {
        a[0] += (double)w[i];
        b[0] += (double)wx[i];
    }
    out[0] = (a[0] + a[1]) + (a[2] + a[3]);
    out[1] = (b[0] + b[1]) + (b[2] + b[3]);
    for (int j = 0; j < ITL_NMASS; j++) {
        float m[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (i = 0; i + 8 <= n; i += 8)
            for (int q = 0; q < 8; q++) m[q] += w[i + q] >= lims[j] ? w[i + q] : 0.0f;
        double t = ((double)m[0] + m[1] + m[2] + m[3]) + ((double)m[4] + m[5] + m[6] + m[7]);
        for (; i < n; i++) t += w[i] >= lims[j] ? w[i] : 0.0f;
        out[2 + j] = t;
    }
}

#ifdef ITL_TEXT_AVX2
/* approx_weights in one AVX2 pass: the same float operations as approx_body, 8 logits at a time */
__attribute__((target("avx2"))) static void approx_weights_avx2(const float *logits, int32_t n, float top, float inv_t,
                                                                float *w, const float *lims, double *out) {
    const __m256 vtop = _mm256_set1_ps(top), vinv = _mm256_set1_ps(inv_t), lowest = _mm256_set1_ps(-80.0f);
    const __m256 log2e = _mm256_set1_ps(1.44269504f), magic = _mm256_set1_ps(12582912.0f);
    const __m256 ln2hi = _mm256_set1_ps(0.693359375f), ln2lo = _mm256_set1_ps(-2.12194440e-4f);
    const __m256 c6 = _mm256_set1_ps(1.0f / 720.0f), c5 = _mm256_set1_ps(1.0f / 120.0f);
    const __m256 c4 = _mm256_set1_ps(1.0f / 24.0f), c3 = _mm256_set1_ps(1.0f / 6.0f);
    const __m256 c2 = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    const __m256i bias = _mm256_set1_epi32((int)(127u - 0x4B400000u));
    __m256 lim[ITL_NMASS], mass[ITL_NMASS];
    for (int j = 0; j < ITL_NMASS; j++) {
        lim[j] = _mm256_set1_ps(lims[j]);
        mass[j] = _mm256_setzero_ps();
    }
    __m256d sw0 = _mm256_setzero_pd(), sw1 = sw0, sx0 = sw0, sx1 = sw0;
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(logits + i), vtop);
        __m256 x = _mm256_max_ps(_mm256_mul_ps(d, vinv), lowest); /* NaN -> -80 */
        __m256 t = _mm256_add_ps(_mm256_mul_ps(x, log2e), magic);
        __m256 kf = _mm256_sub_ps(t, magic);
        __m256 r = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(kf, ln2hi)), _mm256_mul_ps(kf, ln2lo));
        __m256 r2 = _mm256_mul_ps(r, r);
        __m256 lo2 = _mm256_add_ps(_mm256_add_ps(one, r), _mm256_mul_ps(r2, _mm256_add_ps(c2, _mm256_mul_ps(r, c3))));
        __m256 hi4 = _mm256_add_ps(_mm256_add_ps(c4, _mm256_mul_ps(r, c5)), _mm256_mul_ps(r2, c6));
        __m256 p = _mm256_add_ps(lo2, _mm256_mul_ps(_mm256_mul_ps(r2, r2), hi4));
        __m256 sc = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), bias), 23));
        __m256 fin = _mm256_cmp_ps(_mm256_sub_ps(d, d), _mm256_setzero_ps(), _CMP_EQ_OQ);
        __m256 e = _mm256_and_ps(_mm256_mul_ps(p, sc), fin);
        _mm256_storeu_ps(w + i, e);
        __m256 ex = _mm256_mul_ps(e, x); /* w * x <= 0 */
        sw0 = _mm256_add_pd(sw0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        sw1 = _mm256_add_pd(sw1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
        sx0 = _mm256_add_pd(sx0, _mm256_cvtps_pd(_mm256_castps256_ps128(ex)));
        sx1 = _mm256_add_pd(sx1, _mm256_cvtps_pd(_mm256_extractf128_ps(ex, 1)));
        for (int j = 0; j < ITL_NMASS; j++)
            mass[j] = _mm256_add_ps(mass[j], _mm256_and_ps(e, _mm256_cmp_ps(e, lim[j], _CMP_GE_OQ)));
    }
    double a[4], b[4];
    _mm256_storeu_pd(a, _mm256_add_pd(sw0, sw1));
    _mm256_storeu_pd(b, _mm256_add_pd(sx0, sx1));
    double sw = (a[0] + a[1]) + (a[2] + a[3]), sx = -((b[0] + b[1]) + (b[2] + b[3]));
    double ms[ITL_NMASS];
    for (int j = 0; j < ITL_NMASS; j++) {
        float m[8];
        _mm256_storeu_ps(m, mass[j]);
        ms[j] = ((double)m[0] + m[1] + m[2] + m[3]) + ((double)m[4] + m[5] + m[6] + m[7]);
    }
    if (i < n) { /* the last n % 8 logits */
        float tw[8], twx[8];
        approx_body(logits + i, n - i, top, inv_t, tw, twx);
        for (int32_t k = 0; k < n - i; k++) {
            w[i + k] = tw[k];
            sw += (double)tw[k];
            sx += (double)twx[k];
            for (int j = 0; j < ITL_NMASS; j++) ms[j] += tw[k] >= lims[j] ? tw[k] : 0.0f;
        }
    }
    out[0] = sw;
    out[1] = sx;
    for (int j = 0; j < ITL_NMASS; j++) out[2 + j] = ms[j];
}
#endif

/* counts[j] = the number of logits >= floors[j] */
ITL_VECTORIZE static void count_floors(const float *logits, int32_t n, const float *floors, int32_t *counts) {
    for (int j = 0; j < ITL_NKFLOOR; j++) {
        int32_t c = 0;
        for (int32_t i = 0; i < n; i++) c += logits[i] >= floors[j];
        counts[j] = c;
    }
}

/* The sum of the weights in double (any order): each within 2e-12 (relative) of its exact
 * det_exp((logits[i] - top) / temperature): x = (logits[i] - top) * inv_t within 3 roundings
 * (2.5e-13 absolute for |x| <= 745; below -700 taken as -700, under 1e-304 either way), reduction
 * to |r| <= ln2/2 (+1e-13), the degree-11 Taylor polynomial (truncation 1.3e-14). For the rare calls
 * the float weights leave undecided. */
static double approx_sum_double(const float *logits, int32_t n, double top, double inv_t) {
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    for (int32_t i = 0; i < n; i++) {
        double d = (double)logits[i] - top;
        if (!(d - d == 0.0)) continue; /* not finite */
        double x = d * inv_t;
        x = x > -700.0 ? x : -700.0;
        double t = x * 1.4426950408889634 + 6755399441055744.0; /* round(x / ln2) + 1.5 * 2^52 */
        double kf = t - 6755399441055744.0;
        double r = (x - kf * 6.93147180369123816490e-01) - kf * 1.90821492927058770002e-10;
        double p = 1.0 / 39916800.0;
        static const double c[11] = {1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0,
                                     1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};
        for (int q = 0; q < 11; q++) p = p * r + c[q];
        uint64_t tb, sb;
        memcpy(&tb, &t, sizeof tb);
        sb = (tb - 0x4338000000000000ULL + 1023u) << 52; /* 2^k, k >= -1011 */
        double sc;
        memcpy(&sc, &sb, sizeof sc);
        acc[i & 3] += p * sc;
    }
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

/* The id when every total in [lo, hi] gives the same one, else -1. The running sum that settles
 * the id, want (the top-p cut: top_p * total) or u * total (the draw, drawn), lies in [tlo, thi];
 * the logits above a floor, sorted and weighed exactly, are the defined order's first ones, with
 * its running sums. mass[j] (rough) skips the first floors that hold too little. */
static int32_t decide(itl_sampler *s, const float *logits, int32_t n, double top, int drawn, double u, double lo,
                      double hi, const double *mass) {
    double tlo = drawn ? u * lo : s->top_p * lo, thi = drawn ? u * hi : s->top_p * hi, temp = s->temperature;
    double *ew = s->w;
    for (int j = 0; j < ITL_NFLOOR; j++) {
        if (j < ITL_NMASS && mass[j] < thi * 1.001) continue; /* too little mass above this floor */
        int32_t m = gather_sorted(s, logits, n, floor_below(top, floor_nats[j], temp));
        double cum = 0.0, prev = 0.0;
        int32_t at = -1;
        for (int32_t k = 0; k < m; k++) {
            ew[k] = det_exp(((double)logits[key_id(s->key[k])] - top) / temp);
            prev = cum;
            cum += ew[k];
            if (drawn ? cum > thi : cum >= thi) {
                at = k;
                break;
            }
        }
        if (at < 0) continue; /* not enough mass gathered: a lower floor */
        if (at > 0 && (drawn ? prev > tlo : prev >= tlo)) return -1; /* the bounds straddle a running sum */
        if (drawn) return key_id(s->key[at]);
        /* top-p: the prefix is s->key[0..at], its sum cum exact; the draw as defined */
        double uu = uniform(s) * cum, a = 0.0;
        for (int32_t k = 0; k <= at; k++) {
            a += ew[k];
            if (uu < a) return key_id(s->key[k]);
        }
        return key_id(s->key[at]);
    }
    return -1;
}

int32_t itl_sampler_sample(itl_sampler *s, const float *logits, int32_t n) {
    if (!s || !logits || n <= 0) return ITL_TEXT_E_ARG;
    int32_t best = first_max(s, logits, n);
    if (best < 0) return ITL_TEXT_E_LOGITS;
    if (!(s->temperature > 0.0) || s->top_k == 1) return best;
    if (n > s->cap) {
        uint64_t *key = realloc(s->key, sizeof(uint64_t) * (size_t)n);
        if (key) s->key = key;
        uint64_t *tmp = realloc(s->tmp, sizeof(uint64_t) * (size_t)n);
        if (tmp) s->tmp = tmp;
        double *w = realloc(s->w, sizeof(double) * (size_t)n);
        if (w) s->w = w;
        float *aw = realloc(s->aw, sizeof(float) * 2 * (size_t)n);
        if (aw) s->aw = aw;
        if (!key || !tmp || !w || !aw) return ITL_TEXT_E_NOMEM;
        s->cap = n;
    }
    double top = (double)logits[best], temp = s->temperature;
    if (s->top_k > 0 && s->top_k < n) { /* only the top_k largest can matter: sort a few more than them */
        float floors[ITL_NKFLOOR];
        int32_t counts[ITL_NKFLOOR];
        for (int widen = 0; widen < 3; widen++) { /* floors 16x lower each time none holds top_k logits */
            for (int j = 0; j < ITL_NKFLOOR; j++)
                floors[j] = floor_below(top, kfloor_nats[j] * (1 << (4 * widen)), temp);
#ifdef ITL_TEXT_AVX2
            if (s->avx2)
                count_floors_avx2(logits, n, floors, counts);
            else
#endif
                count_floors(logits, n, floors, counts);
            for (int j = 0; j < ITL_NKFLOOR; j++) {
                if (counts[j] < s->top_k) continue;
                int32_t m = gather_sorted(s, logits, n, floors[j]);
                if (m < s->top_k) return sample_full(s, logits, n, top); /* +inf logits were counted */
                return draw_sorted(s, logits, s->key, s->top_k, top);
            }
        }
        return sample_full(s, logits, n, top);
    }
    float inv_t = (float)(1.0 / temp);
    if (!(inv_t > 0.0f && inv_t < 3.0e38f) || temp > 1e30) /* 1 / temp not a normal float */
        return sample_full(s, logits, n, top);
    float *w = s->aw, *wx = w + n, lims[ITL_NMASS];
    for (int j = 0; j < ITL_NMASS; j++) lims[j] = (float)det_exp(-floor_nats[j]);
    double sums[2 + ITL_NMASS];
#ifdef ITL_TEXT_AVX2
    if (s->avx2)
        approx_weights_avx2(logits, n, (float)top, inv_t, w, lims, sums);
    else
#endif
        approx_weights(logits, n, (float)top, inv_t, w, wx, lims, sums);
    double approx = sums[0], spread = sums[1];
    /* The defined total is the sorted running sum of the exact weights: within n * 2^-53 (relative)
     * of their exact sum, which is within the error bound above of sum(w), itself within n * 2^-53
     * of approx. The largest logit's approximate weight is 1, so approx >= 1 and covers what the
     * -80 floor adds (< 2e-35 each). */
    double g = 2.0 * ((double)n + 2.0) * (1.0 / 9007199254740992.0);
    double err = 2.0e-7 * spread + 2.0e-6 * approx + 1e-30;
    double lo = (approx - err) * (1.0 - 2.0 * g), hi = (approx + err) * (1.0 + 2.0 * g);
    int drawn = s->top_p >= 1.0;
    uint64_t saved = s->state;
    double u = drawn ? uniform(s) : 0.0;
    int32_t id = decide(s, logits, n, top, drawn, u, lo, hi, sums + 2);
    if (id < 0) { /* undecided: once more with bounds a million times tighter */
        approx = approx_sum_double(logits, n, top, 1.0 / temp);
        err = 2.0e-12 * approx;
        lo = (approx - err) * (1.0 - 2.0 * g);
        hi = (approx + err) * (1.0 + 2.0 * g);
        id = decide(s, logits, n, top, drawn, u, lo, hi, sums + 2);
    }
    if (id >= 0) return id;
    s->state = saved;
    return sample_full(s, logits, n, top);
}

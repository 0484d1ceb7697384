"""The C text runtime (iteralite/runtime/native/itl_text.c) against its references: the encoder
gives exactly the ids of Hugging Face `tokenizers` (every validation story, odd text, random text,
the Unicode classes of every code point against Oniguruma's), decode inverts encode, the binary
file is checked as in Python, and the sampler is argmax when greedy, follows softmax(logits / T)
otherwise, keeps the top-k / top-p sets, is reproducible from its seed, and (fast path and all)
gives exactly the ids of the defining algorithm, kept here as C source."""
import ctypes
import random
import shutil
import subprocess

import numpy as np
import pytest
from tokenizers import Tokenizer

from iteralite.data import gen_unicode_table
from iteralite.data.corpus import EOT, join_stories, read_utf8, split_stories
from iteralite.data.tokbin import from_tokenizer, to_bytes, write_tokbin
from iteralite.data.tokenizer import TokenizerConfig, train_tokenizer
from iteralite.io.errors import CheckpointError
from iteralite.runtime.native import text
from iteralite.runtime.native.text import CTokenizer, Sampler, TextInputError
from tests.conftest import REPO, fake_stories

REAL = REPO / "data" / "tokenizer" / "tokenizer.json"
VALID = REPO / "data" / "prepared" / "valid.txt"
# a fresh clone has only the pulled raw data (`make test` pulls it): the same validation stories
# (the data stage drops none of them), and the training text to train a full-size tokenizer on
RAW_VALID = REPO / "data" / "raw" / "tinystories" / "valid.txt"
RAW_TRAIN = REPO / "data" / "raw" / "tinystories" / "train.txt"
RAW_TRAIN_BYTES = 4_000_000  # enough text for the 2,000-token vocabulary, in a few seconds

ODD = [
    "", " ", "a", "  ", "\n", "\n\n\n", "   \t\n  ", "hello world", " leading space", "trailing space ",
    "two  spaces   three    four", "tabs\tand\nnewlines\r\n\r\nend", "line\n  indented\n\tx",
    "Émile ate crème brûlée", "naïve café résumé", "e\u0301 a\u0308 o\u0302\u0323 combining",
    "日本語のテキスト 中文 한국어", "emoji 😀👍🏽 👨‍👩‍👧 🏳️‍🌈!", "ｆｕｌｌｗｉｄｔｈ　ｓｐａｃｅ",
    "a" * 3000, "ab" * 2000 + " " + "x" * 1500, "supercalifragilisticexpialidocious" * 20,
    " " * 500 + "x", "\n" * 300, " \n" * 100, "0123456789 42 3.14 1,000,000 ١٢٣ ²³ Ⅻ",
    "!!! ??? ... --- ((())) [[]] {{}} <<>> ***", "\"quoted\" 'single' `back`", "it's they're we've I'm you'll he'd",
    "IT'S THEY'RE 'S 'T 're've'll'd'm", "rock'n'roll ''s '''t", "x's 1's !'s  's\n's",
    f"before {EOT} after", f"{EOT}", f"{EOT}{EOT}", f"a{EOT}b", f" {EOT} ", f"<|endoftext{EOT}|>",
    "<|endoftext", "endoftext|>", "<| endoftext |>", f"story one.\n{EOT}\nstory two.",
    "nbsp\u00a0here\u00a0 x", "ideographic\u3000space", "line\u2028sep\u2029para", "nel\x85x", "\x1c\x1d\x1e\x1f us",
    "\x00\x01\x7f control", "zero\u200bwidth\u200dj", "rtl עברית العربية", "math ∑∫√∞ ≤≥", "\ufeffbom",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛", "\U0010fffd\U000e0001", "Once upon a time, there was a little girl named Lily.",
]


def test_the_text_library_is_built():
    """The setup command builds it (a missing compiler would leave it out)."""
    assert text.available(), "the _itl_text library was not built by `setup.py build_ext`"


@pytest.fixture(scope="module")
def small_tok() -> Tokenizer:
    corpus = fake_stories(200) + ["Émile ate crème brûlée — 日本 😀 it's 123 they're", "  spaced\n\n  out  "]
    return train_tokenizer(TokenizerConfig(vocab_size=330), join_stories(corpus))


@pytest.fixture(scope="module")
def real_tok(small_tok) -> Tokenizer:
    """The pipeline's tokenizer; on a fresh clone one of the same size trained here on the pulled
    raw training stories (the first RAW_TRAIN_BYTES of them)."""
    if REAL.exists():
        return Tokenizer.from_file(str(REAL))
    if RAW_TRAIN.exists():
        with open(RAW_TRAIN, "rb") as f:
            head = f.read(RAW_TRAIN_BYTES).decode("utf-8", "ignore")
        return train_tokenizer(TokenizerConfig(vocab_size=2000, min_frequency=2), head)
    return small_tok


def _c(tok: Tokenizer) -> CTokenizer:
    return CTokenizer(data=to_bytes(from_tokenizer(tok)))


def _ref(tok: Tokenizer, s: str) -> list[int]:
    return tok.encode(s, add_special_tokens=False).ids


@pytest.mark.parametrize("which", ["small", "real"])
def test_odd_text_matches_tokenizers(which, small_tok, real_tok):
    tok = small_tok if which == "small" else real_tok
    c = _c(tok)
    for s in ODD:
        assert c.encode(s) == _ref(tok, s), repr(s[:60])
        assert c.decode(c.encode(s)) == s.encode("utf-8"), repr(s[:60])


def test_end_of_text_inside_text_is_the_special_token(real_tok):
    """`tokenizers` cuts added special tokens out of the text before pre-tokenizing, even with
    add_special_tokens=False; the C encoder does the same."""
    c = _c(real_tok)
    ids = c.encode(f"hi {EOT}there")
    assert ids.count(c.eot_id) == 1 and c.eot_id == real_tok.token_to_id(EOT)
    assert ids == _ref(real_tok, f"hi {EOT}there")


def test_every_validation_story_matches_tokenizers(real_tok):
    valid = VALID if VALID.exists() else RAW_VALID
    if not valid.exists() or real_tok.get_vocab_size() < 2000:
        pytest.skip("no validation stories and no real training text here (`make test` pulls data/raw)")
    stories = split_stories(read_utf8(valid))
    c = _c(real_tok)
    want = [e.ids for e in real_tok.encode_batch_fast(stories, add_special_tokens=False)]
    got = [c.encode(s) for s in stories]
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not bad, f"{len(bad)} of {len(stories)} stories differ, first {bad[:5]}"
    whole = read_utf8(valid)  # the file as one text, <|endoftext|> markers included
    assert c.encode(whole) == _ref(real_tok, whole)


def test_random_text_matches_tokenizers(small_tok, real_tok):
    pool = (list("abcXYZ ' s t re ve ll d m  \n\t\r 019 .,!?-_\"") + ["\u00a0", "\u3000", "\u2028", "\x85", "é", "e\u0301",
            "日", "本", "😀", "🏽", "\u200d", "١", "Ⅻ", "²", "ß", "İ", "\x1c", "\x00", EOT, "'s", "'re", " '"])
    rng = random.Random(1234)
    cs, cr = _c(small_tok), _c(real_tok)
    for _ in range(400):
        s = "".join(rng.choice(pool) for _ in range(rng.randint(0, 40)))
        assert cs.encode(s) == _ref(small_tok, s), repr(s)
        assert cr.encode(s) == _ref(real_tok, s), repr(s)
        assert cr.decode(cr.encode(s)) == s.encode()


@pytest.fixture(scope="module")
def onig() -> np.ndarray:
    return gen_unicode_table.oniguruma_classes()


def test_unicode_classes_equal_oniguruma(onig):
    """The C table's class of every code point (surrogates aside) equals what the Oniguruma of
    `tokenizers` matches with \\p{L}, \\p{N} and \\s."""
    import ctypes

    lib = text.load_library()
    out = (ctypes.c_uint8 * 0x110000)()
    assert lib.itl_text_char_classes(0, 0x110000, out) == 0x110000
    got = np.frombuffer(out, dtype=np.uint8)
    want = onig
    assert (want == gen_unicode_table.SPACE).sum() == 25  # \s: U+0009..U+000D, U+0085, Zs, Zl, Zp
    diff = np.nonzero(got != want)[0]
    assert diff.size == 0, f"{diff.size} code points differ, first {[hex(c) for c in diff[:8]]}"
    assert [lib.itl_text_char_classes(cp, 1, out) for cp in (0x10FFFF, 0x110000)] == [1, -9]


def test_the_generated_table_is_current(onig):
    src = gen_unicode_table.C_FILE.read_text(encoding="utf-8")
    assert gen_unicode_table.table_source(onig) in src, "rerun python -m iteralite.data.gen_unicode_table"


def test_invalid_utf8_and_bad_ids_are_refused(small_tok):
    c = _c(small_tok)
    for raw in (b"\xff", b"a\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"):
        with pytest.raises(TextInputError, match="not valid UTF-8"):
            c.encode(raw)
    with pytest.raises(TextInputError, match="not valid UTF-8"):
        c.encode("lone \ud800 surrogate")
    with pytest.raises(TextInputError, match=r"ids must be in \[0, 330\)"):
        c.decode([5, 330])
    assert c.decode([]) == b""


def test_file_errors_are_one_line(small_tok, tmp_path):
    good = to_bytes(from_tokenizer(small_tok))
    cases = {b"{}" + good: "bad magic", good[:-1]: "truncated", good[:3]: "bad magic", good[:12]: "truncated",
             good[:4] + b"\x02\x00" + good[6:]: "version",
             good[:40] + bytes([good[40] ^ 1]) + good[41:]: "CRC-32 mismatch", good + b"x": "inconsistent"}
    for data, msg in cases.items():
        with pytest.raises(CheckpointError, match=msg) as e:
            CTokenizer(data=data)
        assert "\n" not in str(e.value)
    path = tmp_path / "tok.bin"
    write_tokbin(small_tok, path)
    c = CTokenizer(path)
    assert c.vocab_size == 330 and c.encode("the cat") == _ref(small_tok, "the cat")


# ------------------------------------------------------------------ sampler

def _pcg32(seed: int, n: int) -> list[int]:
    """PCG32 (XSH RR, one fixed stream) as itl_text.c seeds it, written out in Python."""
    mask, mul, inc = 2 ** 64 - 1, 6364136223846793005, ((0x5851F42D4C957F2D << 1) | 1) & (2 ** 64 - 1)
    state, out = 0, []

    def step():
        nonlocal state
        old = state
        state = (old * mul + inc) & mask
        xs = (((old >> 18) ^ old) >> 27) & 0xFFFFFFFF
        rot = old >> 59
        return ((xs >> rot) | (xs << ((32 - rot) & 31))) & 0xFFFFFFFF

    step()
    state = (state + seed) & mask
    step()
    return [step() for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2 ** 63 + 5])
def test_the_generator_is_pcg32(seed):
    s = Sampler(seed)
    assert [s.next_u32() for _ in range(50)] == _pcg32(seed, 50)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_and_top_k_1_are_argmax():
    rng = np.random.default_rng(0)
    for trial in range(50):
        logits = rng.normal(size=257).astype(np.float32)
        if trial % 5 == 0:
            logits[[3, 100]] = logits.max() + 1  # a tie: the lowest id wins
        want = int(np.argmax(logits))
        assert Sampler(trial, temperature=0.0).sample(logits) == want
        assert Sampler(trial, temperature=1.3, top_k=1).sample(logits) == want
    logits = np.array([np.nan, -np.inf, 2.0, np.inf], dtype=np.float32)
    assert Sampler(0, temperature=0).sample(logits) == 2  # non-finite logits are never chosen
    assert {Sampler(i, temperature=1).sample(logits) for i in range(20)} == {2}
    with pytest.raises(TextInputError, match="no finite logit"):
        Sampler(0).sample(np.array([np.nan, np.nan], dtype=np.float32))


def test_same_seed_same_sequence():
    logits = np.random.default_rng(3).normal(size=300).astype(np.float32)

    def draws(seed, **kw):
        s = Sampler(seed, **kw)
        return [s.sample(logits) for _ in range(200)]

    for kw in ({"temperature": 1.0}, {"temperature": 0.8, "top_k": 40}, {"temperature": 1.2, "top_p": 0.9}):
        assert draws(7, **kw) == draws(7, **kw)
        assert draws(7, **kw) != draws(8, **kw)


def test_draws_are_pinned():
    """The same draws on every platform and build: PCG32, an exp from + and * only, integer-exact
    logits. A change here changes every seeded generation."""
    logits = (((np.arange(300) * 37) % 101) / 16.0 - 3.0).astype(np.float32)
    got = {}
    for name, kw in (("plain", {"temperature": 1.0}), ("top_k", {"temperature": 0.7, "top_k": 20}),
                     ("top_p", {"temperature": 1.3, "top_p": 0.8})):
        s = Sampler(2026, **kw)
        got[name] = [s.sample(logits) for _ in range(12)]
    assert got == PINNED


PINNED = {"plain": [210, 264, 259, 59, 204, 150, 147, 122, 147, 221, 128, 30],
          "top_k": [262, 79, 292, 281, 79, 60, 120, 180, 120, 60, 292, 30],
          "top_p": [210, 286, 158, 204, 256, 150, 117, 215, 117, 221, 27, 30]}


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square critical values at p = 0.001 (df = categories - 1); the draws use fixed seeds, so a
# passing test cannot flake, and a wrong distribution lands orders of magnitude above these
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32}


def test_temperature_follows_softmax():
    logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, 1.5, -1.0, 0.2], dtype=np.float32)
    n = 40000
    for t in (0.5, 1.0, 2.0):
        s = Sampler(11, temperature=t)
        counts = np.bincount([s.sample(logits) for _ in range(n)], minlength=8)
        assert _chi2(counts, _softmax(logits / t)) < CHI2_999[7], t
        wrong = _softmax(logits / (t * 1.25))
        assert _chi2(counts, wrong) > 10 * CHI2_999[7]  # the test can tell temperatures apart


def test_top_k_keeps_the_k_best():
    logits = np.array([0.1, 3.0, 2.5, -1.0, 2.9, 0.0, 1.0, 2.0], dtype=np.float32)
    s = Sampler(5, temperature=1.0, top_k=4)
    counts = np.bincount([s.sample(logits) for _ in range(20000)], minlength=8)
    top = [1, 4, 2, 7]
    assert set(np.nonzero(counts)[0]) == set(top)
    assert _chi2(counts[top], _softmax(logits[top])) < CHI2_999[3]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = np.log(probs).astype(np.float32)
    for p, keep in ((0.35, [1]), (0.65, [1, 3]), (0.8, [1, 3, 4]), (0.9, [1, 3, 4, 2]), (0.99, [1, 3, 4, 2, 0])):
        s = Sampler(9, temperature=1.0, top_p=p)
        counts = np.bincount([s.sample(logits) for _ in range(20000)], minlength=5)
        assert set(np.nonzero(counts)[0]) == set(keep), p
        if len(keep) > 1:
            assert _chi2(counts[keep], probs[keep] / probs[keep].sum()) < CHI2_999[len(keep) - 1], p
    # top-k first, then top-p over what is left
    s = Sampler(9, temperature=1.0, top_k=2, top_p=0.6)
    assert {s.sample(logits) for _ in range(2000)} == {1, 3}  # 0.4/0.7 < 0.6 <= 1.0


def test_bad_sampler_parameters():
    for kw in ({"top_p": 0.0}, {"top_p": float("nan")}, {"temperature": float("nan")}, {"seed": -1}):
        with pytest.raises(TextInputError):
            Sampler(**kw)
    with pytest.raises(TextInputError, match="1-D"):
        Sampler(0).sample(np.zeros((2, 2), dtype=np.float32))


# ------------------------------------------------------------------ the fast sampler = the defining one

# The sampler as first written (itl_text.c before its fast path), kept verbatim as the definition of
# the draw: every finite id sorted by (logit descending, id ascending), cut to top_k, weighed with
# det_exp, summed in that order, cut to top_p, drawn. The fast sampler must return the same ids.
REF_SAMPLER_C = r"""#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct ref_sampler ref_sampler;

struct ref_sampler {
    uint64_t state, inc;
    double temperature, top_p;
    int32_t top_k, cap;
    int32_t *idx, *tmp;
    double *w;
};

static uint32_t pcg32(ref_sampler *s) {
    uint64_t old = s->state;
    s->state = old * 6364136223846793005ULL + s->inc;
    uint32_t xs = (uint32_t)(((old >> 18) ^ old) >> 27), rot = (uint32_t)(old >> 59);
    return (xs >> rot) | (xs << ((32u - rot) & 31u));
}

uint32_t ref_next_u32(ref_sampler *s) { return s ? pcg32(s) : 0; }

/* Uniform in [0, 1) with 53 random bits. */
static double uniform(ref_sampler *s) {
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

ref_sampler *ref_sampler_new(uint64_t seed, double temperature, int32_t top_k, double top_p) {
    if (temperature != temperature || top_p != top_p || !(top_p > 0.0)) return NULL;
    ref_sampler *s = calloc(1, sizeof(ref_sampler));
    if (!s) return NULL;
    s->temperature = temperature;
    s->top_k = top_k;
    s->top_p = top_p;
    s->inc = (0x5851F42D4C957F2DULL << 1) | 1u; /* one fixed stream; the seed picks the start */
    s->state = 0;
    pcg32(s);
    s->state += seed;
    pcg32(s);
    return s;
}

void ref_sampler_free(ref_sampler *s) {
    if (!s) return;
    free(s->idx);
    free(s->tmp);
    free(s->w);
    free(s);
}

/* idx[0..n) sorted by (logit descending, id ascending): a strict total order, so the result does
 * not depend on the sort; a merge sort keeps it O(n log n). */
static int before(const float *l, int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); }

static void sort_ids(const float *l, int32_t *idx, int32_t *tmp, int32_t n) {
    for (int32_t width = 1; width < n; width *= 2) {
        for (int32_t lo = 0; lo < n; lo += 2 * width) {
            int32_t mid = lo + width < n ? lo + width : n, hi = lo + 2 * width < n ? lo + 2 * width : n;
            int32_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi) tmp[k++] = before(l, idx[j], idx[i]) ? idx[j++] : idx[i++];
            while (i < mid) tmp[k++] = idx[i++];
            while (j < hi) tmp[k++] = idx[j++];
        }
        memcpy(idx, tmp, sizeof(int32_t) * (size_t)n);
    }
}

int32_t ref_sampler_sample(ref_sampler *s, const float *logits, int32_t n) {
    if (!s || !logits || n <= 0) return (-9);
    int32_t best = -1;
    for (int32_t i = 0; i < n; i++)
        if (finite_f(logits[i]) && (best < 0 || logits[i] > logits[best])) best = i;
    if (best < 0) return (-10);
    if (!(s->temperature > 0.0) || s->top_k == 1) return best;
    if (n > s->cap) {
        int32_t *idx = realloc(s->idx, sizeof(int32_t) * (size_t)n);
        if (idx) s->idx = idx;
        int32_t *tmp = realloc(s->tmp, sizeof(int32_t) * (size_t)n);
        if (tmp) s->tmp = tmp;
        double *w = realloc(s->w, sizeof(double) * (size_t)n);
        if (w) s->w = w;
        if (!idx || !tmp || !w) return (-1);
        s->cap = n;
    }
    int32_t m = 0;
    for (int32_t i = 0; i < n; i++)
        if (finite_f(logits[i])) s->idx[m++] = i;
    sort_ids(logits, s->idx, s->tmp, m);
    if (s->top_k > 0 && s->top_k < m) m = s->top_k;
    double top = (double)logits[s->idx[0]], total = 0.0;
    for (int32_t i = 0; i < m; i++) {
        s->w[i] = det_exp(((double)logits[s->idx[i]] - top) / s->temperature);
        total += s->w[i];
    }
    if (s->top_p < 1.0) { /* the smallest prefix whose mass reaches top_p of the total */
        double cum = 0.0, want = s->top_p * total;
        for (int32_t i = 0; i < m; i++) {
            cum += s->w[i];
            if (cum >= want) {
                m = i + 1;
                total = cum;
                break;
            }
        }
    }
    double u = uniform(s) * total, acc = 0.0;
    for (int32_t i = 0; i < m; i++) {
        acc += s->w[i];
        if (u < acc) return s->idx[i];
    }
    return s->idx[m - 1];
}
"""


@pytest.fixture(scope="module")
def ref_sampler(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler for the reference sampler")
    d = tmp_path_factory.mktemp("ref_sampler")
    (d / "ref.c").write_text(REF_SAMPLER_C)
    so = d / "libref.so"
    subprocess.run([cc, "-O2", "-std=gnu11", "-ffp-contract=off", "-shared", "-fPIC", str(d / "ref.c"), "-o", str(so)],
                   check=True)
    lib = ctypes.CDLL(str(so))
    lib.ref_sampler_new.restype = ctypes.c_void_p
    lib.ref_sampler_new.argtypes = [ctypes.c_uint64, ctypes.c_double, ctypes.c_int32, ctypes.c_double]
    lib.ref_sampler_sample.restype = ctypes.c_int32
    lib.ref_sampler_sample.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
    lib.ref_sampler_free.argtypes = [ctypes.c_void_p]
    return lib


def _ref_draws(lib, seed, t, k, p, rows) -> list[int]:
    h = lib.ref_sampler_new(seed, t, k, p)
    try:
        return [lib.ref_sampler_sample(h, r.ctypes.data, r.size) for r in rows]
    finally:
        lib.ref_sampler_free(h)


def _new_draws(seed, t, k, p, rows) -> list[int]:
    s = Sampler(seed, temperature=t, top_k=k, top_p=p)
    out = []
    for r in rows:
        try:
            out.append(s.sample(r))
        except TextInputError:
            out.append(-10)  # no finite logit: the reference's ITL_TEXT_E_LOGITS
    return out


def _random_logits(rng, v: int, kind: int) -> np.ndarray:
    scale = 10 ** rng.uniform(-2.5, 1.7)
    x = rng.normal(size=v) * scale
    if kind == 1:
        x = np.round(x * rng.choice([1, 4, 16])) / 4  # many ties
    elif kind == 2:
        x = np.full(v, rng.normal() * scale)  # all equal
    elif kind == 3:  # non-finite entries (sometimes all of them)
        for bad in (np.nan, -np.inf, np.inf):
            x[rng.random(v) < rng.uniform(0, 0.5)] = bad
    elif kind == 4:
        x = rng.uniform(-3.4e38, 3.4e38, size=v)  # the whole float range
    elif kind == 5:
        x = x * 1e-42  # subnormal floats
    elif kind == 6:
        x = rng.choice([-0.0, 0.0, -1.0, 1e-3], size=v)  # signed zeros tie
    elif kind == 7:
        x = rng.gumbel(size=v) * rng.uniform(1, 6)  # a language model's long tail
    return x.astype(np.float32)


def test_sampler_matches_the_defining_algorithm(ref_sampler):
    """Thousands of random logits and parameters (V from 1 to 5000, ties, signed zeros, NaN and
    infinities, the float range, subnormals): the same ids as the reference, call after call."""
    rng = np.random.default_rng(2026)
    temps = [1e-3, 0.05, 0.3, 0.8, 1.0, 1.7, 10.0, 100.0, 1e6, 1e35, 0.0, -1.0]
    for case in range(3000):
        v = int(rng.integers(1, 5001)) if case % 4 == 0 else int(rng.choice([1, 2, 3, 8, 40, 257, 1000, 2000]))
        kind = case % 8
        rows = [_random_logits(rng, v, kind) for _ in range(3)]
        t = float(rng.choice(temps))
        k = int(rng.choice([0, 0, 0, 1, 2, 5, 40, v - 1, v, v + 3, -2]))
        p = float(rng.choice([1.0, 1.0, 0.9, 0.95, 0.5, 0.1, 1e-12, 0.999999, 1.5]))
        seed = int(rng.integers(0, 2 ** 63)) * 2 + case % 2
        want = _ref_draws(ref_sampler, seed, t, k, p, rows)
        assert _new_draws(seed, t, k, p, rows) == want, (case, v, kind, t, k, p, seed)


def test_sampler_matches_at_the_edges_of_top_p(ref_sampler):
    """Equal logits with top_p = j / V put the cut exactly on a running sum (where bounds on the total
    cannot decide it), and a few large weights among many tiny ones put it between close sums."""
    rng = np.random.default_rng(7)
    for v in (2, 3, 5, 10, 64, 100, 999):
        rows = [np.full(v, 0.25, dtype=np.float32)]
        for j in range(1, v + 1, max(1, v // 7)):
            for seed in range(4):
                for p in (j / v, np.nextafter(j / v, 0), np.nextafter(j / v, 1)):
                    assert _new_draws(seed, 1.0, 0, p, rows) == _ref_draws(ref_sampler, seed, 1.0, 0, p, rows)
    for a, b in ((1, 1), (3, 40), (10, 1990), (200, 800)):  # cuts within 1e-13..1e-8 of a running sum
        rows = [np.array([0.0] * a + [-1.0] * b, dtype=np.float32)[rng.permutation(a + b)]]
        for t in (1.0, 0.7):
            w = np.exp(-1.0 / t)
            cum = np.cumsum([1.0] * a + [w] * b)
            for j in sorted({a - 1, a, a + b // 3, a + b - 2}):
                for d in (-1e-8, -1e-10, -1e-13, 0.0, 1e-13, 1e-10, 1e-8):
                    p = float(cum[j] / cum[-1] * (1 + d))
                    if 0 < p:
                        for seed in range(3):
                            assert _new_draws(seed, t, 0, p, rows) == _ref_draws(ref_sampler, seed, t, 0, p, rows)
    for case in range(300):
        v = int(rng.integers(2, 3000))
        x = np.full(v, -30.0) + rng.normal(size=v) * 0.01
        x[rng.integers(0, v, size=rng.integers(1, 6))] = rng.normal(size=1) * 0.001
        rows = [x.astype(np.float32)]
        for p in (0.5, 0.9, 1.0):
            for t in (0.5, 1.0, 3.0):
                assert _new_draws(case, t, 0, p, rows) == _ref_draws(ref_sampler, case, t, 0, p, rows), (case, p, t)


def test_sampler_matches_on_model_like_logits(ref_sampler):
    """Long runs on logits shaped like a trained model's (V = 2000, a few clear favourites, a long
    tail), with the parameters the runtimes use."""
    rng = np.random.default_rng(11)
    rows = []
    for _ in range(150):
        x = rng.normal(size=2000) * 2.5 - 8.0
        top = rng.integers(0, 2000, size=rng.integers(1, 60))
        x[top] = rng.normal(size=top.size) * 1.5 + rng.uniform(0, 6)
        rows.append(x.astype(np.float32))
    for t, k, p in ((0.8, 0, 0.9), (1.0, 40, 1.0), (1.0, 0, 1.0), (0.7, 20, 0.95), (1.3, 0, 0.8), (0.5, 0, 1.0)):
        for seed in (0, 1, 123456789):
            assert _new_draws(seed, t, k, p, rows) == _ref_draws(ref_sampler, seed, t, k, p, rows), (t, k, p, seed)

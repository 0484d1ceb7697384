"""The C text runtime (iteralite/runtime/native/itl_text.c) against its references: the encoder
gives exactly the ids of Hugging Face `tokenizers` (every validation story, odd text, random text,
the Unicode classes of every code point against Oniguruma's), decode inverts encode, the binary
file is checked as in Python, and the sampler is argmax when greedy, follows softmax(logits / T)
otherwise, keeps the top-k / top-p sets, and is reproducible from its seed."""
import random

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
    return Tokenizer.from_file(str(REAL)) if REAL.exists() else small_tok


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
    if not VALID.exists() or not REAL.exists():
        pytest.skip("data/prepared/valid.txt or data/tokenizer/tokenizer.json not here (run `dvc repro`)")
    stories = split_stories(read_utf8(VALID))
    c = _c(real_tok)
    want = [e.ids for e in real_tok.encode_batch_fast(stories, add_special_tokens=False)]
    got = [c.encode(s) for s in stories]
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not bad, f"{len(bad)} of {len(stories)} stories differ, first {bad[:5]}"
    whole = read_utf8(VALID)  # the file as one text, <|endoftext|> markers included
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

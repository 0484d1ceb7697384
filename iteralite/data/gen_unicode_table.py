"""Generate the Unicode class table of the C text runtime (`iteralite/runtime/native/itl_text.c`).

The byte-level pre-tokenizer of `tokenizers` splits text with the GPT-2 regex, whose classes are
Oniguruma's: \\p{L} (general categories L*), \\p{N} (N*) and \\s (U+0009..U+000D, U+0085, Zs, Zl, Zp).
The classes are read from that very engine, through `tokenizers.Regex` (the version pinned in
requirements.lock), not from Python's `unicodedata`: Python 3.11's Unicode 14.0 is older than the
Oniguruma inside `tokenizers` 0.23, and 9,392 code points (newer letters and digits) would
differ. The table goes, as sorted ranges of one class each, between the GENERATED markers of
the C file; tests/runtime/test_text_c.py compares the C lookup with Oniguruma on every code point.

    python -m iteralite.data.gen_unicode_table          # rewrite the table in place
    python -m iteralite.data.gen_unicode_table --check  # exit 1 if the file's table is stale
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tokenizers import Regex, pre_tokenizers

C_FILE = Path(__file__).resolve().parents[1] / "runtime" / "native" / "itl_text.c"
BEGIN = "/* BEGIN GENERATED UNICODE TABLE (iteralite/data/gen_unicode_table.py) */"
END = "/* END GENERATED UNICODE TABLE */"
# the class numbers of itl_text.c: 0 is everything else ([^\s\p{L}\p{N}])
LETTER, NUMBER, SPACE = 1, 2, 3
PATTERNS = ((LETTER, r"\p{L}"), (NUMBER, r"\p{N}"), (SPACE, r"\s"))
N_CP = 0x110000


def oniguruma_classes() -> np.ndarray:
    """The class of every code point (N_CP,) as Oniguruma matches it; surrogates, which no text
    `tokenizers` receives can hold, are 0."""
    cps = np.array([cp for cp in range(N_CP) if not 0xD800 <= cp <= 0xDFFF])
    everything = "".join(map(chr, cps.tolist()))
    out = np.zeros(N_CP, dtype=np.uint8)
    for cls, pattern in PATTERNS:
        # what is left when the class is removed: the code points outside it (offsets in chars)
        outside = np.zeros(len(cps), dtype=bool)
        for _, (a, b) in pre_tokenizers.Split(Regex(pattern), behavior="removed").pre_tokenize_str(everything):
            outside[a:b] = True
        inside = cps[~outside]
        if out[inside].any():
            raise RuntimeError(f"Oniguruma's {pattern} overlaps another class")
        out[inside] = cls
    return out


def ranges(classes: np.ndarray) -> list[tuple[int, int, int]]:
    """(first, last, class) of every maximal run of one non-zero class, in code point order."""
    edges = np.nonzero(np.diff(classes.astype(np.int16)))[0] + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(classes)]]) - 1
    return [(int(a), int(b), int(classes[a])) for a, b in zip(starts, ends) if classes[a]]


def table_source(classes: np.ndarray | None = None) -> str:
    """The C block, from `classes` (N_CP,) or from Oniguruma when None."""
    import tokenizers

    rs = ranges(oniguruma_classes() if classes is None else classes)
    lines = [BEGIN, f"/* Oniguruma of tokenizers {tokenizers.__version__}: {len(rs)} ranges; entry = "
                    "{first code point, last code point << 2 | class} */",
             f"#define ITL_UNI_N {len(rs)}",
             "static const uint32_t itl_uni[ITL_UNI_N][2] = {"]
    row = []
    for lo, hi, cls in rs:
        row.append(f"{{0x{lo:X},0x{(hi << 2) | cls:X}}}")
        if len(row) == 6:
            lines.append("  " + ",".join(row) + ",")
            row = []
    if row:
        lines.append("  " + ",".join(row) + ",")
    lines += ["};", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the C file's table differs")
    args = ap.parse_args(argv)
    src = C_FILE.read_text(encoding="utf-8")
    a, b = src.find(BEGIN), src.find(END)
    if a < 0 or b < a:
        print(f"{C_FILE}: the GENERATED markers are missing", file=sys.stderr)
        return 1
    new = src[:a] + table_source() + src[b + len(END):]
    if args.check:
        if new != src:
            print(f"{C_FILE}: the Unicode table is stale; rerun python -m iteralite.data.gen_unicode_table",
                  file=sys.stderr)
            return 1
        return 0
    if new != src:
        C_FILE.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

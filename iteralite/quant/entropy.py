"""Lossless entropy coding of integer weight codes: static rANS with a per-tensor frequency table.

Quantized weights are far from uniform (a Gaussian weight at 4 bits mostly lands on the middle
codes), so a tensor's codes can be stored in fewer bits than `packing.pack_bits` uses, and decoded
back bit-exactly. This module codes one flat array of symbols in [0, n_symbols) (n_symbols =
2**bits for bits 1..8, or 3 for ternary codes) into one self-contained blob.

Coder: static rANS with a 64-bit state, 32-bit words and 24-bit weights (the layout of
`constriction` 0.5.0's stack coder, which wrote the first artifacts; the coder is now ours: C in
`iteralite/runtime/native/itl_rans.c`, loaded with ctypes from the native library, and the plain
Python twin `encode_ref` / `decode_ref`, used when that library is not built; both write the same
bytes). Why rANS:
  - the model is static and the whole tensor is coded at once, so the stack order costs nothing
    (encode in reverse, decode forward), and decoding is one multiply-add per symbol with no
    carry handling;
  - the coder's starting state can be chosen. We start at the sentinel state S = 2**24 (>= every
    symbol's weight), from which every encode strictly grows the coder's content; so a decoder
    that has read `count` symbols must land exactly on S with every word consumed. That one
    comparison checks the count in the header and catches almost every payload corruption, for
    about 3 bytes per tensor.

Model: the symbols' counts are quantized to integer frequencies q_i >= 1 that sum to 2**precision
(only the symbols that occur get one) by integer arithmetic only (`quantize_freqs`), so the bytes
do not depend on the numpy build or the platform. The coder uses the weights
w_i = q_i << (24 - precision) and cumulative weights c_i = w_0 + ... + w_{i-1}, i in the order of
the present symbols.

Coding (all integers, state x < 2**64):
    encode, symbols taken last to first, x = S at the start:
        if x >> 40 >= w_i: push the word x & (2**32 - 1); x >>= 32
        x = ((x // w_i) << 24) | (x % w_i + c_i)
    then push x's words, least significant first, until x is 0 (so the last word is nonzero).
    decode, words popped from the end: x = the last word, then while words remain and x < 2**32,
    x = (x << 32) | next word. For each symbol: r = x & (2**24 - 1), i such that
    c_i <= r < c_i + w_i, x = (x >> 24) * w_i + r - c_i, and if x < 2**32 and words remain,
    x = (x << 32) | next word. At the end no word may remain and x must equal S.

Blob layout, version 1 (varints are unsigned LEB128, minimal length; words little-endian):
    u8      version (1)
    u8      n_symbols - 1
    u8      precision (8..24): the table sums to 2**precision
    varint  count: number of codes (<= MAX_COUNT)
    bytes   presence bitmap, ceil(n_symbols / 8) bytes: bit s (LSB first) set iff symbol s occurs
    varint  q_i for each present symbol but the last (the last is 2**precision - sum); none when
            fewer than 2 symbols occur
    varint  W: number of 32-bit payload words (0 when fewer than 2 symbols occur: the header alone
            says everything)
    W * u32 the rANS words in the order the encoder pushed them, each little-endian, exactly to
            the end of the blob (the decoder starts from the last one)

Corrupt input: `decode` validates every header field before it allocates or decodes (sizes, table
sums, bitmap padding, trailing bytes), caps the count at MAX_COUNT (and at `expected_count` when
the caller knows the shape), stops as soon as the payload is exhausted (a lying count costs no
decoding), and checks the final state. The C decoder validates the same fields itself (it must be
safe on its own: a negative error code for any malformed blob, never a read out of bounds). Anything malformed raises CheckpointError with one line. A payload
corruption that still lands on the sentinel (very unlikely, never observed in the tests) returns
an array of the header's count, dtype uint8, holding only symbols from the table; the enclosing
checkpoint's sha256 is what guarantees integrity end to end.
"""
from __future__ import annotations

import bisect
import ctypes
import heapq
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from iteralite.io import varint
from iteralite.io.errors import CheckpointError

VERSION = 1
DEFAULT_PRECISION = 14  # frequencies fit 2-byte varints; 2**16 coded 2-4 bit weights no smaller
MIN_PRECISION, MAX_PRECISION = 8, 24  # 2**8 >= 256 symbols; 24 = the coder's weight precision
MAX_COUNT = 1 << 26  # codes per blob (64M; the largest tensor here is ~256k): bounds what a header
# can make `decode` allocate when the caller passes no expected_count
_CODER_PRECISION = 24
_SENTINEL = 1 << _CODER_PRECISION  # initial (and final) coder state, see the module docstring
_WORD_MASK = (1 << 32) - 1
_NATIVE_ERRORS = {-1: "bad argument", -2: "truncated header", -3: "version", -4: "precision",
                  -5: "over-long varint", -6: "count", -7: "bitmap", -8: "symbol count",
                  -9: "frequency table", -10: "word count", -11: "payload"}  # itl_rans.c's codes
_E_PAYLOAD = -11
_native_lib = None  # the ctypes library once looked up; False when it is not built (see _native)
_MAX_VARINT_BYTES = 5


@dataclass
class _Blob:
    """A parsed, validated header plus a view of the payload words."""

    n_symbols: int
    precision: int
    count: int
    symbols: np.ndarray  # uint8 (k,): the symbols that occur, ascending
    freqs: list[int]  # (k,) quantized frequencies, sum 2**precision (empty when k <= 1)
    words: np.ndarray  # uint32 (W,)
    raw: bytes  # the whole blob

    def weights(self) -> list[int]:
        """The coder's 24-bit weights w_i = q_i << (24 - precision)."""
        return [q << (_CODER_PRECISION - self.precision) for q in self.freqs]


# ---------------------------------------------------------------------------------------------
# Frequency table


def quantize_freqs(counts, precision: int) -> np.ndarray:
    """counts int (k,) all >= 1 -> int64 (k,) frequencies >= 1 that sum to 2**precision.

    Integers only, so every platform gets the same table. Start from the rounded-down share c*T//N
    (at least 1), then move one unit at a time where it buys the most: add to the symbol with the
    largest gain 2c / (2q + 1), or take from the one (q > 1) with the smallest loss 2c / (2q - 1)
    (both approximate c * ln of the ratio of the new to the old q, to O(1/q**3)), compared exactly
    as fractions, ties to the lowest index. At most k steps: flooring is off by fewer than k units.
    """
    counts = [int(c) for c in np.asarray(counts).reshape(-1).tolist()]
    total = 1 << precision
    if len(counts) > total:
        raise ValueError(f"{len(counts)} symbols do not fit a table of precision {precision}")
    n = sum(counts)
    q = [max(c * total // n, 1) for c in counts]
    diff = total - sum(q)
    if diff > 0:
        heap = [(Fraction(-2 * c, 2 * qi + 1), i) for i, (c, qi) in enumerate(zip(counts, q))]
        heapq.heapify(heap)
        for _ in range(diff):
            _, i = heapq.heappop(heap)
            q[i] += 1
            heapq.heappush(heap, (Fraction(-2 * counts[i], 2 * q[i] + 1), i))
    elif diff < 0:
        heap = [(Fraction(2 * c, 2 * qi - 1), i) for i, (c, qi) in enumerate(zip(counts, q)) if qi > 1]
        heapq.heapify(heap)
        for _ in range(-diff):
            _, i = heapq.heappop(heap)
            q[i] -= 1
            if q[i] > 1:
                heapq.heappush(heap, (Fraction(2 * counts[i], 2 * q[i] - 1), i))
    return np.array(q, dtype=np.int64)


def empirical_entropy_bits(codes, n_symbols: int) -> float:
    """Shannon entropy of the codes' own histogram times their count: the size in bits that any
    coder using one static per-tensor table cannot beat (before the table itself)."""
    flat = _check_codes(codes, n_symbols)
    if flat.size == 0:
        return 0.0
    c = np.bincount(flat, minlength=n_symbols)
    c = c[c > 0].astype(np.float64)
    return float(-(c * np.log2(c / flat.size)).sum())


# ---------------------------------------------------------------------------------------------
# Header


def _read_varint(blob: bytes, pos: int, what: str) -> tuple[int, int]:
    return varint.read(blob, pos, "entropy blob", f"{what} field", _MAX_VARINT_BYTES)


def _check_codes(codes, n_symbols: int) -> np.ndarray:
    """-> the codes as a flat uint8 array; ValueError on a bad dtype, alphabet or code."""
    if isinstance(n_symbols, bool) or not isinstance(n_symbols, int) or not 1 <= n_symbols <= 256:
        raise ValueError(f"n_symbols must be an int in [1, 256]; got {n_symbols!r}")
    arr = np.asarray(codes)
    if arr.dtype != np.uint8:
        raise ValueError(f"codes must be a uint8 array; got dtype {arr.dtype}")
    flat = arr.reshape(-1)
    if flat.size and int(flat.max()) >= n_symbols:
        raise ValueError(f"codes must be < n_symbols = {n_symbols}; got a code {int(flat.max())}")
    if flat.size > MAX_COUNT:
        raise ValueError(f"at most {MAX_COUNT} codes per blob; got {flat.size}")
    return flat


def _prepare(codes, n_symbols: int, precision: int):
    """Validate, count and quantize: -> (flat codes, header bytes up to W, present symbols, freqs)."""
    flat = _check_codes(codes, n_symbols)
    if isinstance(precision, bool) or not isinstance(precision, int) \
            or not MIN_PRECISION <= precision <= MAX_PRECISION:
        raise ValueError(f"precision must be an int in [{MIN_PRECISION}, {MAX_PRECISION}]; got {precision!r}")
    counts = np.bincount(flat, minlength=n_symbols)
    present = np.flatnonzero(counts).astype(np.uint8)  # (k,)
    bitmap = np.zeros(-(-n_symbols // 8) * 8, dtype=np.uint8)
    bitmap[present] = 1
    head = bytearray([VERSION, n_symbols - 1, precision])
    head += varint.encode(flat.size) + np.packbits(bitmap, bitorder="little").tobytes()
    freqs = quantize_freqs(counts[present], precision) if present.size >= 2 else np.zeros(0, np.int64)
    for q in freqs[:-1].tolist():
        head += varint.encode(q)
    return flat, bytes(head), present, freqs.tolist()


def _parse(blob, expected_count: int | None) -> _Blob:
    """Validate every header field and the payload size; -> _Blob. Raises CheckpointError."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CheckpointError(f"entropy blob must be bytes; got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < 3:
        raise CheckpointError(f"entropy blob is truncated: {len(blob)} bytes, the header needs at least 3")
    if blob[0] != VERSION:
        raise CheckpointError(f"entropy blob has version {blob[0]}; this reader knows version {VERSION}")
    n_symbols, precision = blob[1] + 1, blob[2]
    if not MIN_PRECISION <= precision <= MAX_PRECISION:
        raise CheckpointError(f"entropy blob's table precision {precision} is outside "
                              f"[{MIN_PRECISION}, {MAX_PRECISION}]")
    count, pos = _read_varint(blob, 3, "count")
    if count > MAX_COUNT:
        raise CheckpointError(f"entropy blob claims {count} codes, more than the limit {MAX_COUNT}")
    if expected_count is not None and count != expected_count:
        raise CheckpointError(f"entropy blob holds {count} codes, expected {expected_count}")
    nmap = -(-n_symbols // 8)
    if pos + nmap > len(blob):
        raise CheckpointError("entropy blob is truncated inside the symbol bitmap")
    bits = np.unpackbits(np.frombuffer(blob, np.uint8, nmap, pos), bitorder="little")
    pos += nmap
    if bits[n_symbols:].any():
        raise CheckpointError(f"entropy blob's symbol bitmap marks a symbol >= n_symbols = {n_symbols}")
    symbols = np.flatnonzero(bits).astype(np.uint8)
    k = symbols.size
    if (count == 0) != (k == 0) or k > count:
        raise CheckpointError(f"entropy blob's bitmap lists {k} symbols for {count} codes")
    total, freqs = 1 << precision, []
    if k >= 2:
        for _ in range(k - 1):
            q, pos = _read_varint(blob, pos, "frequency")
            freqs.append(q)
        last = total - sum(freqs)
        if min(freqs) < 1 or last < 1:
            raise CheckpointError(f"entropy blob's frequency table is invalid: each of {k} "
                                  f"frequencies must be >= 1 and they must sum to 2**{precision}")
        freqs.append(last)
    n_words, pos = _read_varint(blob, pos, "word count")
    if (k >= 2) != (n_words >= 1):
        raise CheckpointError(f"entropy blob has {n_words} payload words for {k} distinct symbols")
    if len(blob) - pos != 4 * n_words:
        raise CheckpointError(f"entropy blob's payload is {len(blob) - pos} bytes; "
                              f"its header says {n_words} words ({4 * n_words} bytes)")
    words = np.frombuffer(blob, dtype="<u4", count=n_words, offset=pos).astype(np.uint32)
    if n_words and words[-1] == 0:  # a coder's flushed state never ends in a zero word
        raise CheckpointError("entropy blob's payload ends in a zero word: it is corrupt")
    return _Blob(n_symbols, precision, count, symbols, freqs, words, blob)


def _trivial(b: _Blob) -> np.ndarray:
    """Decode a blob with at most one distinct symbol: no payload, the header says it all."""
    return np.full(b.count, b.symbols[0] if b.count else 0, dtype=np.uint8)


def _check_end(final_words: list[int], decoded: int, count: int) -> None:
    """The decoder must have read `count` symbols and landed exactly on the sentinel."""
    if decoded != count or final_words != [_SENTINEL]:
        raise CheckpointError(f"entropy blob's payload does not decode to exactly {count} codes "
                              f"(stopped at {decoded}): it is corrupt")


# ---------------------------------------------------------------------------------------------
# Fast path: the C coder (itl_rans.c in the native library)


def _native():
    """The native library with the rANS functions declared, or None when it is not built here (or
    predates itl_rans.c); then `encode` and `decode` use the Python twin."""
    global _native_lib
    if _native_lib is None:
        try:
            from iteralite.runtime.native.library import NativeUnavailable, load_library
        except ImportError:
            _native_lib = False
            return None
        try:
            lib = load_library()
            u8p, u32p, u64 = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64
            lib.itl_rans_decode.argtypes = [u8p, ctypes.c_size_t, u8p, u64, ctypes.POINTER(u64)]
            lib.itl_rans_decode.restype = ctypes.c_int
            lib.itl_rans_encode.argtypes = [u8p, u64, u32p, ctypes.c_uint32, ctypes.c_int, u32p, u64]
            lib.itl_rans_encode.restype = ctypes.c_int64
            _native_lib = lib
        except (NativeUnavailable, OSError, AttributeError):
            _native_lib = False
    return _native_lib or None


def _words_native(lib, idx: np.ndarray, freqs: list[int], precision: int) -> np.ndarray:
    """Dense indices uint8 (n,) -> the payload words, uint32 (W,), by the C encoder."""
    idx = np.ascontiguousarray(idx, dtype=np.uint8)
    f = np.array(freqs, dtype=np.uint32)
    out = np.empty(idx.size + 2, dtype=np.uint32)  # at most one word per symbol plus the flush
    n = lib.itl_rans_encode(idx.ctypes.data, idx.size, f.ctypes.data, f.size, precision,
                            out.ctypes.data, out.size)
    if n < 0:  # _prepare validated everything the C encoder checks
        raise RuntimeError(f"itl_rans_encode failed ({_NATIVE_ERRORS.get(n, n)})")
    return out[:n]


def _decode_native(lib, b: _Blob) -> np.ndarray:
    out = np.empty(b.count, dtype=np.uint8)
    done = ctypes.c_uint64(0)
    rc = lib.itl_rans_decode(b.raw, len(b.raw), out.ctypes.data, out.size, ctypes.byref(done))
    if rc == _E_PAYLOAD:
        _check_end([], done.value, b.count)  # always raises: done < count or not at the sentinel
    if rc != 0:  # _parse accepted what the C decoder refused: they disagree
        raise CheckpointError(f"entropy blob is corrupt: the native decoder refused its "
                              f"{_NATIVE_ERRORS.get(rc, rc)}")
    return out


def encode(codes, n_symbols: int, precision: int = DEFAULT_PRECISION) -> bytes:
    """codes uint8 (any shape, flattened row-major, each < n_symbols) -> self-contained blob.

    n_symbols: 2**bits for b-bit codes, 3 for ternary. precision: the table sums to 2**precision.
    C when the native library is built, else the Python twin (the same bytes).
    """
    flat, head, present, freqs = _prepare(codes, n_symbols, precision)
    if len(freqs) < 2:
        return head + varint.encode(0)
    lut = np.zeros(n_symbols, dtype=np.uint8)
    lut[present] = np.arange(present.size, dtype=np.uint8)
    idx = lut[flat]
    lib = _native()
    words = _words_native(lib, idx, freqs, precision) if lib is not None \
        else _words_ref(idx, freqs, precision)
    return head + varint.encode(words.size) + words.astype("<u4").tobytes()


def decode(blob, expected_count: int | None = None) -> np.ndarray:
    """blob from `encode` -> codes uint8 (count,). expected_count: the caller's numel, if known;
    a blob of another size is refused before anything is allocated. Raises CheckpointError.
    C when the native library is built, else the Python twin."""
    b = _parse(blob, expected_count)
    if len(b.freqs) < 2:
        return _trivial(b)
    lib = _native()
    return _decode_native(lib, b) if lib is not None else _decode_py(b)


# ---------------------------------------------------------------------------------------------
# Reference twin: the same rANS in plain Python (same header, same words)


def _words_ref(idx: np.ndarray, freqs: list[int], precision: int) -> np.ndarray:
    """Dense indices (n,) -> the payload words, uint32 (W,): rANS one symbol at a time."""
    shift = _CODER_PRECISION - precision
    weights = [q << shift for q in freqs]
    cum = [0]
    for w in weights:
        cum.append(cum[-1] + w)
    state, words = _SENTINEL, []
    for i in reversed(np.asarray(idx).tolist()):
        w = weights[i]
        if state >> (64 - _CODER_PRECISION) >= w:  # keep the next state below 2**64
            words.append(state & _WORD_MASK)
            state >>= 32
        state = ((state // w) << _CODER_PRECISION) | (state % w + cum[i])
    while state:  # flush: least significant word first, so the last word is nonzero
        words.append(state & _WORD_MASK)
        state >>= 32
    return np.array(words, dtype=np.uint32)


def encode_ref(codes, n_symbols: int, precision: int = DEFAULT_PRECISION) -> bytes:
    """Reference twin of `encode`: rANS in plain Python; writes the same bytes."""
    flat, head, present, freqs = _prepare(codes, n_symbols, precision)
    if len(freqs) < 2:
        return head + varint.encode(0)
    dense = {int(s): i for i, s in enumerate(present.tolist())}
    words = _words_ref([dense[s] for s in flat.tolist()], freqs, precision)
    return head + varint.encode(words.size) + words.astype("<u4").tobytes()


def decode_ref(blob, expected_count: int | None = None) -> np.ndarray:
    """Reference twin of `decode`: pops words off the end, one symbol at a time."""
    b = _parse(blob, expected_count)
    return _trivial(b) if len(b.freqs) < 2 else _decode_py(b)


def _decode_py(b: _Blob) -> np.ndarray:
    weights = b.weights()
    cum = [0]
    for w in weights:
        cum.append(cum[-1] + w)
    words = b.words.tolist()
    state = words.pop()
    while words and state < 1 << 32:  # the initial state: the top words, up to >= 2**32
        state = (state << 32) | words.pop()
    mask = (1 << _CODER_PRECISION) - 1
    out = []
    for _ in range(b.count):
        if not words and state <= _SENTINEL:  # exhausted: the count lies; stop before decoding it
            break
        quantile = state & mask
        i = bisect.bisect_right(cum, quantile) - 1
        out.append(i)
        state = (state >> _CODER_PRECISION) * weights[i] + quantile - cum[i]
        if state < 1 << 32 and words:
            state = (state << 32) | words.pop()
    final = []
    while state:
        final.append(state & _WORD_MASK)
        state >>= 32
    _check_end(words + final, len(out), b.count)
    return b.symbols[np.array(out, dtype=np.int64)]


# ---------------------------------------------------------------------------------------------
# Baseline


def zstd_bytes(packed: bytes, level: int = 19) -> int:
    """Size of `packed` compressed by zstandard at `level`: a generic-compressor baseline for
    reports, never used to store anything."""
    import zstandard  # comparison only: coding and decoding blobs never need it

    return len(zstandard.ZstdCompressor(level=level).compress(bytes(packed)))


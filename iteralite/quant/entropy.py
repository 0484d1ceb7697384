"""Lossless entropy coding of integer weight codes: static rANS with a per-tensor frequency table.

Quantized weights are far from uniform (a Gaussian weight at 4 bits mostly lands on the middle
codes), so a tensor's codes can be stored in fewer bits than `packing.pack_bits` uses, and decoded
back bit-exactly. This module codes one flat array of symbols in [0, n_symbols) (n_symbols =
2**bits for bits 1..8, or 3 for ternary codes) into one self-contained blob.

Coder: `constriction`'s stack coder (rANS, `stream.stack.AnsCoder`: 32-bit words, 64-bit state,
24-bit probabilities), not its range coder. Why rANS:
  - the model is static and the whole tensor is coded at once, so the stack order costs nothing
    (encode in reverse, decode forward), and decoding is one multiply-add per symbol with no
    carry handling;
  - the coder's starting state can be chosen. We start at the sentinel state S = 2**24 (>= every
    symbol's weight), from which every encode strictly grows the coder's content; so a decoder
    that has read `count` symbols must land exactly on S with every word consumed. That one
    comparison checks the count in the header and catches almost every payload corruption, for
    about 3 bytes per tensor;
  - the algorithm is short enough to restate in plain Python (`encode_ref` / `decode_ref`), and
    the twin writes the same words as constriction, so tests compare the bytes, not only the
    decoded codes.

Model: the table is quantized to integer frequencies q_i >= 1 that sum to 2**precision (only the
symbols that occur get one). The coder uses the weights w_i = q_i << (24 - precision); we hand
constriction the floats w_i - 1, which its fast (`perfect=False`) quantizer maps back to exactly
w_i (it gives every symbol weight 1 plus floor(cumulative * scale), and the scale is exactly 1).
The table stored in the blob is therefore the model the payload was coded with, bit for bit.

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
    W * u32 the rANS words, exactly to the end of the blob

Corrupt input: `decode` validates every header field before it allocates or decodes (sizes, table
sums, bitmap padding, trailing bytes), caps the count at MAX_COUNT (and at `expected_count` when
the caller knows the shape), decodes in chunks that stop as soon as the payload is exhausted, and
checks the final state. Anything malformed raises CheckpointError with one line. A payload
corruption that still lands on the sentinel (very unlikely, never observed in the tests) returns
an array of the header's count, dtype uint8, holding only symbols from the table; the enclosing
checkpoint's sha256 is what guarantees integrity end to end.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import constriction
import numpy as np

from iteralite.io import varint
from iteralite.io.errors import CheckpointError

VERSION = 1
DEFAULT_PRECISION = 14  # frequencies fit 2-byte varints; 2**16 coded 2-4 bit weights no smaller
MIN_PRECISION, MAX_PRECISION = 8, 24  # 2**8 >= 256 symbols; 24 = constriction's default precision
MAX_COUNT = 1 << 26  # codes per blob (64M; the largest tensor here is ~256k): bounds what a header
# can make `decode` allocate when the caller passes no expected_count
_CODER_PRECISION = 24
_SENTINEL = 1 << _CODER_PRECISION  # initial (and final) coder state, see the module docstring
_WORD_MASK = (1 << 32) - 1
_CHUNK = 1 << 20  # symbols decoded per constriction call
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

    def weights(self) -> list[int]:
        """The coder's 24-bit weights w_i = q_i << (24 - precision)."""
        return [q << (_CODER_PRECISION - self.precision) for q in self.freqs]


# ---------------------------------------------------------------------------------------------
# Frequency table


def quantize_freqs(counts: np.ndarray, precision: int) -> np.ndarray:
    """counts int (k,) all >= 1 -> int64 (k,) frequencies >= 1 that sum to 2**precision.

    Start from the rounded-down share (at least 1), then move one unit at a time where it buys the
    most: add to the symbol with the largest gain c * log2((q+1)/q), or take from the one with the
    smallest loss c * log2(q/(q-1)). At most k steps, since flooring is off by fewer than k units.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = 1 << precision
    if counts.size > total:
        raise ValueError(f"{counts.size} symbols do not fit a table of precision {precision}")
    q = np.maximum(counts * total // int(counts.sum()), 1)
    c = counts.astype(np.float64)
    while (diff := total - int(q.sum())) != 0:
        if diff > 0:
            q[int(np.argmax(c * np.log2((q + 1) / q)))] += 1
        else:
            with np.errstate(divide="ignore"):
                loss = np.where(q > 1, c * np.log2(q / np.maximum(q - 1, 1)), np.inf)
            q[int(np.argmin(loss))] -= 1
    return q


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
    return _Blob(n_symbols, precision, count, symbols, freqs, words)


def _trivial(b: _Blob) -> np.ndarray:
    """Decode a blob with at most one distinct symbol: no payload, the header says it all."""
    return np.full(b.count, b.symbols[0] if b.count else 0, dtype=np.uint8)


def _check_end(final_words: list[int], decoded: int, count: int) -> None:
    """The decoder must have read `count` symbols and landed exactly on the sentinel."""
    if decoded != count or final_words != [_SENTINEL]:
        raise CheckpointError(f"entropy blob's payload does not decode to exactly {count} codes "
                              f"(stopped at {decoded}): it is corrupt")


# ---------------------------------------------------------------------------------------------
# Fast path: constriction


def _model(weights: list[int]):
    w = np.asarray(weights, dtype=np.float64)
    # w - 1 sums to 2**24 - k, so constriction's scale is exactly 1 and it rebuilds exactly w.
    return constriction.stream.model.Categorical(w - 1.0, perfect=False)


def encode(codes, n_symbols: int, precision: int = DEFAULT_PRECISION) -> bytes:
    """codes uint8 (any shape, flattened row-major, each < n_symbols) -> self-contained blob.

    n_symbols: 2**bits for b-bit codes, 3 for ternary. precision: the table sums to 2**precision.
    """
    flat, head, present, freqs = _prepare(codes, n_symbols, precision)
    if len(freqs) < 2:
        return head + varint.encode(0)
    lut = np.zeros(n_symbols, dtype=np.int32)
    lut[present] = np.arange(present.size, dtype=np.int32)
    shift = _CODER_PRECISION - precision
    coder = constriction.stream.stack.AnsCoder(np.array([_SENTINEL], dtype=np.uint32))
    coder.encode_reverse(lut[flat], _model([q << shift for q in freqs]))
    words = coder.get_compressed().astype("<u4")
    return head + varint.encode(words.size) + words.tobytes()


def decode(blob, expected_count: int | None = None) -> np.ndarray:
    """blob from `encode` -> codes uint8 (count,). expected_count: the caller's numel, if known;
    a blob of another size is refused before anything is allocated. Raises CheckpointError."""
    b = _parse(blob, expected_count)
    if len(b.freqs) < 2:
        return _trivial(b)
    try:
        coder = constriction.stream.stack.AnsCoder(b.words)
    except ValueError as e:
        raise CheckpointError(f"entropy blob's payload is corrupt: {e}") from None
    model = _model(b.weights())
    parts, done = [], 0
    while done < b.count:
        n = min(_CHUNK, b.count - done)
        parts.append(b.symbols[coder.decode(model, n)])
        done += n
        # The coder's content shrinks with every symbol and ends at the sentinel: once it is at
        # or below the sentinel with symbols left, the payload cannot hold them. Stop early so a
        # lying count costs one chunk, not `count` bytes.
        if done < b.count and coder.num_words() <= 2 and _value(coder.get_compressed()) <= _SENTINEL:
            break
    _check_end(coder.get_compressed().tolist(), done, b.count)
    return np.concatenate(parts)


def _value(words) -> int:
    """Words as the coder's conceptual integer (the last word is the most significant)."""
    v = 0
    for w in reversed(np.asarray(words).tolist()):
        v = (v << 32) | w
    return v


# ---------------------------------------------------------------------------------------------
# Reference twin: the same rANS in plain Python (same header, same words)


def encode_ref(codes, n_symbols: int, precision: int = DEFAULT_PRECISION) -> bytes:
    """Reference twin of `encode`: rANS one symbol at a time; writes the same bytes."""
    flat, head, present, freqs = _prepare(codes, n_symbols, precision)
    if len(freqs) < 2:
        return head + varint.encode(0)
    shift = _CODER_PRECISION - precision
    weights = [q << shift for q in freqs]
    cum = [0]
    for w in weights:
        cum.append(cum[-1] + w)
    dense = {int(s): i for i, s in enumerate(present.tolist())}
    state, words = _SENTINEL, []
    for sym in reversed(flat.tolist()):
        i = dense[sym]
        w = weights[i]
        if state >> (64 - _CODER_PRECISION) >= w:  # keep the next state below 2**64
            words.append(state & _WORD_MASK)
            state >>= 32
        state = ((state // w) << _CODER_PRECISION) | (state % w + cum[i])
    while state:  # flush: least significant word first, so the last word is nonzero
        words.append(state & _WORD_MASK)
        state >>= 32
    payload = np.array(words, dtype="<u4").tobytes()
    return head + varint.encode(len(words)) + payload


def decode_ref(blob, expected_count: int | None = None) -> np.ndarray:
    """Reference twin of `decode`: pops words off the end, one symbol at a time."""
    b = _parse(blob, expected_count)
    if len(b.freqs) < 2:
        return _trivial(b)
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
    for done in range(b.count):
        if not words and state <= _SENTINEL:  # exhausted: see `decode`
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


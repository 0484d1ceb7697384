"""Context-modelled entropy coding of integer codes, built from the context-free coder.

`quant.entropy` codes one tensor's codes with ONE static table. A context model conditions each
code's table on something the decoder already knows. Here that is done without a new coder: the
code sequence is split into sub-streams, one per context value, each coded with its own static
table by `entropy.encode` (the C coder where built), and the decoder decodes every stream and
re-interleaves them. Two contexts:

    prev  the previous code in the tensor's code order (the first code's context is 0): stream c
          holds, in order, the codes whose predecessor is c. Decoding: decode every stream, then
          code i = the next unread code of stream[code i-1]. (Resetting the context to 0 at
          each row start was measured too: the conditional entropy of the mixed artifacts' codes
          is 19-30 bytes higher, so the context runs on across rows.)
    rows  the position: the codes are cut into G contiguous groups, group g = codes
          [g*n//G, (g+1)*n//G) (whole blocks of rows, or one expert, when G divides the rows);
          one stream per group. The encoder tries `ROW_GROUPS` and keeps the smallest blob; G is
          stored in the header.

A stream is an `entropy.encode` blob (blob layout version 1) at the precision (of the few
`_precisions` tries for its size) that gives the fewest bytes, minus what the context blob
already implies: its first two bytes (the entropy version, 1, and n_symbols - 1, which the caller
knows) and, for rows, its count varint (the group size). The decoder re-creates those fields
before handing each stream to `entropy.decode`, so every stream is validated by the entropy
decoder (table, payload, final state).

Blob layouts (varints: unsigned LEB128, minimal):
    prev  varint L_c for each context c = 0 .. n_symbols - 2: the byte length of stream c (0 = no
          code has context c); then the streams in context order, the last taking the rest.
          Stream c = u8 precision, varint count, rest of the entropy blob.
    rows  varint G (1 <= G <= max(1, n), G <= MAX_GROUPS); varint L_g for g = 0 .. G - 2; the
          streams in group order, the last taking the rest. Stream g = u8 precision, rest of the
          entropy blob after its count (0 bytes when the group is empty, only for n = 0).

Measured on the mixed-precision artifacts (`io.compact.codec_report`), the weights' codes are
nearly independent of both contexts: the conditional entropy is < 1% below the plain one, so the
extra tables rarely pay; the compact writer stores a context codec only for the tensors where it
is smaller, and `bound_prev` / `bound_rows` (entropy-based lower bounds) let it skip the coding
where it cannot be.

Every decode validates sizes, counts and the interleave before returning, and raises a one-line
CheckpointError on anything malformed. `encode_*_ref` / `decode_*_ref` are a plain-Python twin
(loops, `entropy.encode_ref` / `decode_ref`) that writes and reads the same bytes.
"""
from __future__ import annotations

import numpy as np

from iteralite.io import varint
from iteralite.io.errors import CheckpointError
from iteralite.quant import entropy

ROW_GROUPS = (2, 4, 8, 16, 32)  # the group counts `encode_rows` tries (those <= the code count)
MAX_GROUPS = 1 << 16  # bounds the work a rows header can ask for
_ENTROPY_VERSION = 1  # the entropy blob layout the streams embed (re-created on decode)
_MAX_VARINT_BYTES = 5


# --------------------------------------------------------------------------- shared


def _precisions(m: int) -> list[int]:
    """Table precisions tried for a stream of m codes: up to 2 bits below log2(m) (a finer table
    than the stream can fill only costs header bytes), within the coder's limits and at most the
    default. Measured on the mixed-precision artifacts, trying these beats any one fixed rule."""
    top = min(entropy.DEFAULT_PRECISION, max(entropy.MIN_PRECISION, int(m).bit_length()))
    return sorted({max(entropy.MIN_PRECISION, top - d) for d in (2, 1, 0)})


def _stream(part: np.ndarray, n_symbols: int, enc, drop_count: bool) -> bytes:
    """The smallest stream over `_precisions` (the lowest precision on a tie); b"" when empty."""
    if not part.size:
        return b""
    return min((_strip(enc(part, n_symbols, p), drop_count) for p in _precisions(part.size)), key=len)


def _flat(codes, n_symbols: int) -> np.ndarray:
    """Validated flat uint8 codes: ValueError on a bad alphabet, dtype, code or size (the checks
    `entropy.encode` makes, needed here before the codes are split by context)."""
    if isinstance(n_symbols, bool) or not isinstance(n_symbols, int) or not 1 <= n_symbols <= 256:
        raise ValueError(f"n_symbols must be an int in [1, 256]; got {n_symbols!r}")
    arr = np.asarray(codes)
    if arr.dtype != np.uint8:
        raise ValueError(f"codes must be a uint8 array; got dtype {arr.dtype}")
    flat = arr.reshape(-1)
    if flat.size and int(flat.max()) >= n_symbols:
        raise ValueError(f"codes must be < n_symbols = {n_symbols}; got a code {int(flat.max())}")
    if flat.size > entropy.MAX_COUNT:
        raise ValueError(f"at most {entropy.MAX_COUNT} codes per blob; got {flat.size}")
    return flat


def _strip(blob: bytes, drop_count: bool) -> bytes:
    """An entropy blob -> its stream bytes: without the version and n_symbols bytes (and the count
    varint when `drop_count`)."""
    if blob[0] != _ENTROPY_VERSION:  # the entropy coder moved on: this layout embeds version 1
        raise RuntimeError(f"entropy blob version {blob[0]}; context streams embed version 1")
    if not drop_count:
        return blob[2:]
    _, end = varint.read(blob, 3, "entropy blob", "count field", _MAX_VARINT_BYTES)
    return blob[2:3] + blob[end:]


def _unstrip(stream: bytes, n_symbols: int, count: int | None) -> bytes:
    """Inverse of `_strip`: count is the implied count (rows), None when the stream carries it."""
    head = bytes([_ENTROPY_VERSION, n_symbols - 1])
    if count is None:
        return head + stream
    return head + stream[:1] + varint.encode(count) + stream[1:]


def _join(streams: list[bytes]) -> bytes:
    """Length varints of all streams but the last, then the streams."""
    return b"".join(varint.encode(len(s)) for s in streams[:-1]) + b"".join(streams)


def _split(blob: bytes, pos: int, k: int, what: str) -> list[bytes]:
    """Inverse of `_join` for k streams starting at `pos`; CheckpointError when the lengths do
    not fit the blob."""
    lengths = []
    for _ in range(k - 1):
        n, pos = varint.read(blob, pos, f"{what} blob", "stream length", _MAX_VARINT_BYTES)
        lengths.append(n)
    rest = len(blob) - pos - sum(lengths)
    if rest < 0:
        raise CheckpointError(f"{what} blob is truncated: its stream lengths cover {sum(lengths)} bytes, "
                              f"{len(blob) - pos} remain")
    out = []
    for n in lengths + [rest]:
        out.append(blob[pos:pos + n])
        pos += n
    return out


def _as_bytes(blob, what: str) -> bytes:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CheckpointError(f"{what} blob must be bytes; got {type(blob).__name__}")
    return bytes(blob)


def _check_n(n_symbols: int, expected_count: int) -> None:
    if isinstance(n_symbols, bool) or not isinstance(n_symbols, int) or not 1 <= n_symbols <= 256:
        raise ValueError(f"n_symbols must be an int in [1, 256]; got {n_symbols!r}")
    if isinstance(expected_count, bool) or not isinstance(expected_count, int) \
            or not 0 <= expected_count <= entropy.MAX_COUNT:
        raise ValueError(f"expected_count must be an int in [0, {entropy.MAX_COUNT}]; got {expected_count!r}")


def _decode_stream(stream: bytes, n_symbols: int, count: int | None, what: str, ref: bool) -> np.ndarray:
    blob = _unstrip(stream, n_symbols, count)
    try:
        return (entropy.decode_ref if ref else entropy.decode)(blob, count)
    except CheckpointError as e:
        raise CheckpointError(f"{what}: {e}") from None


def _bound(counts: np.ndarray, n_symbols: int, fixed: int) -> float:
    """A lower bound on the bytes of the streams whose symbol histograms are the rows of `counts`
    (int (k, n_symbols)), plus their k - 1 length varints: per non-empty stream, its codes'
    empirical entropy (a static-table coder cannot beat it: the table's cross-entropy is at least
    that) less 0.006 bit a code and 4 bytes (the most rANS's integer rounding can gain: a state
    above 2**8 times the weight loses < 2**-8 of it a step, and the first steps a few bytes), plus
    the header fields every stream stores: `fixed` bytes (precision, count when stored, word
    count), the bitmap, and one byte at least per frequency but the last."""
    counts = counts[counts.sum(axis=1) > 0].astype(np.float64)
    m = counts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        bits = np.where(counts > 0, counts * np.log2(m[:, None] / counts), 0.0).sum(axis=1)
    payload = np.maximum(0.0, (bits - 0.006 * m) / 8 - 4)
    header = fixed + -(-n_symbols // 8) + (counts > 0).sum(axis=1) - 1
    return float((payload + header).sum()) + max(0, len(counts) - 1)


# --------------------------------------------------------------------------- prev


def _prev_contexts(flat: np.ndarray) -> np.ndarray:
    ctx = np.empty_like(flat)
    if flat.size:
        ctx[0] = 0
        ctx[1:] = flat[:-1]
    return ctx


def _prev_counts(blob: bytes, streams: list[bytes], n_symbols: int, expected_count: int) -> list[int]:
    """Each stream's count (read from its header, before anything is decoded), checked to sum to
    expected_count, so a lying header costs no allocation."""
    counts = []
    for c, s in enumerate(streams):
        if not s:
            counts.append(0)
            continue
        m, _ = varint.read(s, 1, "rans-prev blob", f"context {c} count field", _MAX_VARINT_BYTES)
        if m == 0:
            raise CheckpointError(f"rans-prev blob stores an empty stream for context {c}")
        counts.append(m)
    if sum(counts) != expected_count:
        raise CheckpointError(f"rans-prev blob's streams hold {sum(counts)} codes, expected {expected_count}")
    return counts


def bound_prev(codes, n_symbols: int) -> float:
    """A lower bound on len(encode_prev(codes, n_symbols)), computed without coding (`_bound`)."""
    flat = _flat(codes, n_symbols).astype(np.int64)
    hist = np.bincount(_prev_contexts(flat) * n_symbols + flat, minlength=n_symbols * n_symbols)
    return _bound(hist.reshape(n_symbols, n_symbols), n_symbols, 3)


def encode_prev(codes, n_symbols: int, beat: int | None = None) -> bytes | None:
    """codes uint8 (any shape, flattened row-major, each < n_symbols) -> rans-prev blob; None
    when `beat` is given and `bound_prev` shows the blob cannot be smaller than `beat` bytes."""
    flat = _flat(codes, n_symbols)
    if beat is not None and bound_prev(flat, n_symbols) >= beat:
        return None
    ctx = _prev_contexts(flat)
    order = np.argsort(ctx, kind="stable")
    grouped, ends = flat[order], np.cumsum(np.bincount(ctx, minlength=n_symbols))
    streams, start = [], 0
    for end in ends.tolist():
        part = grouped[start:end]
        streams.append(_stream(part, n_symbols, entropy.encode, False))
        start = end
    return _join(streams)


def decode_prev(blob, n_symbols: int, expected_count: int) -> np.ndarray:
    """rans-prev blob -> codes uint8 (expected_count,). Raises CheckpointError."""
    _check_n(n_symbols, expected_count)
    blob = _as_bytes(blob, "rans-prev")
    streams = _split(blob, 0, n_symbols, "rans-prev")
    counts = _prev_counts(blob, streams, n_symbols, expected_count)
    decoded = [_decode_stream(s, n_symbols, None, f"rans-prev context {c}", False).tolist() if m else []
               for c, (s, m) in enumerate(zip(streams, counts))]
    iters = [iter(d) for d in decoded]
    out, prev = [], 0
    try:
        for _ in range(expected_count):
            prev = next(iters[prev])
            out.append(prev)
    except StopIteration:
        raise CheckpointError(f"rans-prev blob's stream for context {prev} runs out at code {len(out)}: "
                              "it is corrupt") from None
    return np.array(out, dtype=np.uint8)


def encode_prev_ref(codes, n_symbols: int) -> bytes:
    """Reference twin of `encode_prev`: one list per context, filled by a loop."""
    flat = _flat(codes, n_symbols).tolist()
    per = [[] for _ in range(n_symbols)]
    prev = 0
    for c in flat:
        per[prev].append(c)
        prev = c
    streams = [_stream(np.array(p, np.uint8), n_symbols, entropy.encode_ref, False) for p in per]
    return _join(streams)


def decode_prev_ref(blob, n_symbols: int, expected_count: int) -> np.ndarray:
    """Reference twin of `decode_prev`: explicit read positions per stream."""
    _check_n(n_symbols, expected_count)
    blob = _as_bytes(blob, "rans-prev")
    streams = _split(blob, 0, n_symbols, "rans-prev")
    counts = _prev_counts(blob, streams, n_symbols, expected_count)
    decoded = [_decode_stream(s, n_symbols, None, f"rans-prev context {c}", True) if m else np.zeros(0, np.uint8)
               for c, (s, m) in enumerate(zip(streams, counts))]
    pos, out, prev = [0] * n_symbols, np.zeros(expected_count, np.uint8), 0
    for i in range(expected_count):
        if pos[prev] >= decoded[prev].size:
            raise CheckpointError(f"rans-prev blob's stream for context {prev} runs out at code {i}: "
                                  "it is corrupt")
        code = int(decoded[prev][pos[prev]])
        pos[prev] += 1
        out[i] = prev = code
    return out


# --------------------------------------------------------------------------- rows


def _bounds(n: int, groups: int) -> list[int]:
    return [g * n // groups for g in range(groups + 1)]


def _rows_with(flat: np.ndarray, n_symbols: int, groups: int, enc) -> bytes:
    b = _bounds(flat.size, groups)
    streams = []
    for lo, hi in zip(b[:-1], b[1:]):
        part = flat[lo:hi]
        streams.append(_stream(part, n_symbols, enc, True))
    return varint.encode(groups) + _join(streams)


def _check_groups(flat: np.ndarray, groups) -> None:
    limit = min(max(1, flat.size), MAX_GROUPS)
    if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= limit:
        raise ValueError(f"groups must be an int in [1, {limit}]; got {groups!r}")


def bound_rows(codes, n_symbols: int, groups: int) -> float:
    """A lower bound on len(encode_rows(codes, n_symbols, groups)) without coding (`_bound`)."""
    flat = _flat(codes, n_symbols).astype(np.int64)
    _check_groups(flat, groups)
    gid = np.repeat(np.arange(groups), np.diff(_bounds(flat.size, groups)))
    hist = np.bincount(gid * n_symbols + flat, minlength=groups * n_symbols)
    return _bound(hist.reshape(groups, n_symbols), n_symbols, 2) + len(varint.encode(groups))


def encode_rows(codes, n_symbols: int, groups: int | None = None, beat: int | None = None) -> bytes | None:
    """codes uint8 (any shape, flattened row-major) -> rans-rows blob with `groups` groups, or,
    when None, the smallest blob over the `ROW_GROUPS` that fit the code count (G = 1 for n < 2).
    With `beat`, group counts whose `bound_rows` is >= beat are skipped, and None is returned
    when no blob smaller than `beat` bytes is possible."""
    flat = _flat(codes, n_symbols)
    if groups is not None:
        _check_groups(flat, groups)
    tries = [groups] if groups is not None else [g for g in ROW_GROUPS if g <= flat.size] or [1]
    if beat is not None:
        tries = [g for g in tries if bound_rows(flat, n_symbols, g) < beat]
    if not tries:
        return None
    return min((_rows_with(flat, n_symbols, g, entropy.encode) for g in tries), key=len)


def _rows_parse(blob, n_symbols: int, expected_count: int) -> tuple[list[int], list[bytes]]:
    _check_n(n_symbols, expected_count)
    blob = _as_bytes(blob, "rans-rows")
    groups, pos = varint.read(blob, 0, "rans-rows blob", "group count", _MAX_VARINT_BYTES)
    limit = min(max(1, expected_count), MAX_GROUPS)
    if not 1 <= groups <= limit:
        raise CheckpointError(f"rans-rows blob has {groups} groups; {expected_count} codes allow 1 to {limit}")
    streams = _split(blob, pos, groups, "rans-rows")
    b = _bounds(expected_count, groups)
    for g, s in enumerate(streams):
        if bool(s) != (b[g + 1] > b[g]):
            raise CheckpointError(f"rans-rows blob's stream for group {g} is {len(s)} bytes for "
                                  f"{b[g + 1] - b[g]} codes")
    return b, streams


def decode_rows(blob, n_symbols: int, expected_count: int, *, _ref: bool = False) -> np.ndarray:
    """rans-rows blob -> codes uint8 (expected_count,). Raises CheckpointError."""
    b, streams = _rows_parse(blob, n_symbols, expected_count)
    out = np.zeros(expected_count, dtype=np.uint8)
    for g, s in enumerate(streams):
        if s:
            out[b[g]:b[g + 1]] = _decode_stream(s, n_symbols, b[g + 1] - b[g], f"rans-rows group {g}", _ref)
    return out


def encode_rows_ref(codes, n_symbols: int, groups: int) -> bytes:
    """Reference twin of `encode_rows` for a given group count (Python coder)."""
    flat = _flat(codes, n_symbols)
    _check_groups(flat, groups)
    return _rows_with(flat, n_symbols, groups, entropy.encode_ref)


def decode_rows_ref(blob, n_symbols: int, expected_count: int) -> np.ndarray:
    """Reference twin of `decode_rows` (Python decoder)."""
    return decode_rows(blob, n_symbols, expected_count, _ref=True)


def rows_groups(blob) -> int:
    """The group count a rans-rows blob stores (for reports)."""
    return varint.read(_as_bytes(blob, "rans-rows"), 0, "rans-rows blob", "group count", _MAX_VARINT_BYTES)[0]

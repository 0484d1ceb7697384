"""Context-modelled rANS (`quant.context`): each option round-trips bit-exactly on every alphabet,
the fast path writes the reference twin's bytes, the blobs have the documented layout, the lower
bounds hold, and every malformed blob is a one-line CheckpointError."""
from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iteralite.io import varint
from iteralite.io.errors import CheckpointError
from iteralite.quant import context as C
from iteralite.quant import entropy as E

ALPHABETS = [2 ** b for b in range(1, 9)] + [3]  # bit widths 1..8 and ternary


def skewed(n, n_symbols, seed=0, p=0.35):
    """Geometric-like codes centred in the alphabet, like quantized Gaussian weights."""
    rng = np.random.default_rng(seed)
    sign = rng.choice([-1, 1], n)
    return np.clip(n_symbols // 2 + sign * (rng.geometric(p, n) - 1), 0, n_symbols - 1).astype(np.uint8)


def uniform(n, n_symbols, seed=0):
    return np.random.default_rng(seed).integers(0, n_symbols, n).astype(np.uint8)


def edge_cases(n_symbols):
    """Empty, one code, all equal, two codes, a context never seen (only the top code occurs but
    for one: its successor stream is empty), the last code alone of its kind."""
    top = n_symbols - 1
    return [np.zeros(0, np.uint8), np.array([top], np.uint8), np.full(300, top, np.uint8),
            np.array([0, top], np.uint8), np.array([top] * 50 + [0] + [top] * 50, np.uint8),
            np.array([0] * 40 + [top], np.uint8)]


def all_inputs(n_symbols):
    return edge_cases(n_symbols) + [uniform(777, n_symbols, 1), skewed(2000, n_symbols, 2)]


def check_prev(x, n):
    blob = C.encode_prev(x, n)
    assert blob == C.encode_prev_ref(x, n)
    for dec in (C.decode_prev, C.decode_prev_ref):
        y = dec(blob, n, x.size)
        assert y.dtype == np.uint8 and np.array_equal(y, x)
    return blob


def check_rows(x, n, groups=None):
    blob = C.encode_rows(x, n, groups)
    g = C.rows_groups(blob)
    assert groups is None or g == groups
    assert blob == C.encode_rows_ref(x, n, g)
    for dec in (C.decode_rows, C.decode_rows_ref):
        y = dec(blob, n, x.size)
        assert y.dtype == np.uint8 and np.array_equal(y, x)
    return blob


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("n", ALPHABETS)
def test_prev_round_trips_and_equals_the_reference(n):
    for x in all_inputs(n):
        check_prev(x, n)


@pytest.mark.parametrize("n", ALPHABETS)
def test_rows_round_trips_and_equals_the_reference(n):
    for x in all_inputs(n):
        check_rows(x, n)
        for g in (1, 3, 7):
            if g <= max(1, x.size):
                check_rows(x, n, g)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(ALPHABETS), st.lists(st.integers(0, 255), max_size=300), st.integers(1, 9))
def test_any_sequence_round_trips(n, values, groups):
    x = (np.array(values, dtype=np.int64) % n).astype(np.uint8)
    check_prev(x, n)
    check_rows(x, n, min(groups, max(1, x.size)))


def test_multidimensional_codes_are_flattened_row_major():
    x = skewed(240, 16, 3).reshape(4, 6, 10)
    assert np.array_equal(C.decode_prev(C.encode_prev(x, 16), 16, 240), x.reshape(-1))
    assert np.array_equal(C.decode_rows(C.encode_rows(x, 16), 16, 240), x.reshape(-1))


def test_context_codecs_win_where_the_codes_depend_on_their_context():
    """A code that follows from its predecessor costs ~nothing under rans-prev; codes whose
    distribution changes from one block of rows to the next are cheaper under rans-rows."""
    cycle = np.tile(np.arange(16, dtype=np.uint8), 500)  # next code = prev + 1 mod 16
    plain = len(E.encode(cycle, 16))
    assert len(C.encode_prev(cycle, 16)) < plain / 10
    rng = np.random.default_rng(0)
    blocks = np.concatenate([rng.integers(0, 4, 4000), rng.integers(12, 16, 4000)]).astype(np.uint8)
    rows = C.encode_rows(blocks, 16)
    assert len(rows) < 0.75 * len(E.encode(blocks, 16)) and len(rows) < len(C.encode_prev(blocks, 16))


# --------------------------------------------------------------------------- layout


def _stream(codes, n, precision, drop_count=False):
    """A stream as the module docstring lays it out, built by hand from an entropy blob."""
    blob = E.encode(np.array(codes, np.uint8), n, precision)
    assert blob[:2] == bytes([1, n - 1])
    if not drop_count:
        return blob[2:]
    return blob[2:3] + blob[3 + len(varint.encode(len(codes))):]


def test_prev_blob_layout():
    """[1, 1, 1]: context 0 (the start) holds [1], context 1 holds [1, 1]; one-symbol streams
    cost the same at every precision, so the lowest (8) is kept."""
    blob = C.encode_prev(np.array([1, 1, 1], np.uint8), 2)
    s0, s1 = _stream([1], 2, 8), _stream([1, 1], 2, 8)
    assert blob == varint.encode(len(s0)) + s0 + s1
    empty = C.encode_prev(np.zeros(0, np.uint8), 4)
    assert empty == b"\0\0\0"  # three lengths of zero, the last stream takes the (empty) rest


def test_rows_blob_layout():
    """G = 3 over 10 codes: groups [0, 3), [3, 6), [6, 10); each stream without its count."""
    x = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2], np.uint8)
    blob = C.encode_rows(x, 4, 3)
    s = [_stream([0] * 3, 4, 8, True), _stream([1] * 3, 4, 8, True), _stream([2] * 4, 4, 8, True)]
    assert blob == varint.encode(3) + varint.encode(len(s[0])) + varint.encode(len(s[1])) + b"".join(s)
    assert C.encode_rows(np.zeros(0, np.uint8), 4) == varint.encode(1)  # n = 0: one empty group


def test_each_stream_takes_its_smallest_tried_precision():
    """Each stream is the smallest of its `_precisions` (the lowest on a tie); every precision
    reads back, and the tried ones beat the default precision overall on weight-like codes."""
    x = skewed(5000, 16, 4)
    ctx = np.concatenate([[0], x[:-1]])
    parts = [x[ctx == c] for c in range(16)]

    def layout(streams):
        return b"".join(varint.encode(len(s)) for s in streams[:-1]) + b"".join(streams)

    best = [min((_stream(p, 16, q) for q in C._precisions(p.size)), key=len) if p.size else b"" for p in parts]
    blob = C.encode_prev(x, 16)
    assert blob == layout(best)
    fixed = layout([_stream(p, 16, E.DEFAULT_PRECISION) if p.size else b"" for p in parts])
    assert len(blob) < len(fixed)
    assert np.array_equal(C.decode_prev(fixed, 16, x.size), x)


# --------------------------------------------------------------------------- bounds and beat


@pytest.mark.parametrize("n", [2, 3, 4, 16, 256])
def test_lower_bounds_hold(n):
    for x in all_inputs(n) + [skewed(20000, n, 5, p=0.7), uniform(5000, n, 6)]:
        assert C.bound_prev(x, n) <= len(C.encode_prev(x, n))
        for g in (1, 2, 8, 32):
            if g <= max(1, x.size):
                assert C.bound_rows(x, n, g) <= len(C.encode_rows(x, n, g))


def test_beat_skips_only_what_cannot_win():
    x = skewed(4000, 16, 7)
    full_prev, full_rows = C.encode_prev(x, 16), C.encode_rows(x, 16)
    assert C.encode_prev(x, 16, beat=10 ** 9) == full_prev
    assert C.encode_rows(x, 16, beat=10 ** 9) == full_rows
    assert C.encode_prev(x, 16, beat=10) is None and C.encode_rows(x, 16, beat=10) is None


# --------------------------------------------------------------------------- errors


def _one_line(e) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_bad_codes_are_value_errors():
    with pytest.raises(ValueError, match="uint8"):
        C.encode_prev(np.zeros(3, np.int32), 4)
    with pytest.raises(ValueError, match="< n_symbols = 4"):
        C.encode_rows(np.array([4], np.uint8), 4)
    with pytest.raises(ValueError, match="n_symbols"):
        C.encode_prev(np.zeros(3, np.uint8), 0)
    with pytest.raises(ValueError, match="groups"):
        C.encode_rows(np.zeros(3, np.uint8), 4, 4)


@pytest.mark.parametrize("kind", ["prev", "rows"])
@pytest.mark.parametrize("n", [3, 16])
def test_every_truncation_is_a_one_line_error(kind, n):
    x = skewed(600, n, 8)
    enc, dec = (C.encode_prev, C.decode_prev) if kind == "prev" else (C.encode_rows, C.decode_rows)
    blob = enc(x, n)
    for cut in range(len(blob)):
        with pytest.raises(CheckpointError) as e:
            dec(blob[:cut], n, x.size)
        _one_line(e)
    with pytest.raises(CheckpointError) as e:
        dec(blob + b"\0", n, x.size)  # trailing bytes land in the last stream
    _one_line(e)


@pytest.mark.parametrize("kind", ["prev", "rows"])
def test_corrupt_bytes_are_errors_or_decode_to_the_right_size(kind):
    """A flipped byte is refused with one line, or (payload corruption that still lands on the
    sentinel: the file's checksum is what catches it) decodes to codes of the right size."""
    x = skewed(400, 8, 9)
    enc, dec = (C.encode_prev, C.decode_prev) if kind == "prev" else (C.encode_rows, C.decode_rows)
    blob = bytearray(enc(x, 8))
    refused = 0
    for i in range(len(blob)):
        for flip in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= flip
            try:
                y = dec(bytes(bad), 8, x.size)
            except CheckpointError as e:
                assert "\n" not in str(e)
                refused += 1
            else:
                assert y.shape == (x.size,) and y.dtype == np.uint8 and int(y.max()) < 8
    assert refused > len(blob)  # most corruptions are caught


def test_wrong_expected_count():
    x = skewed(100, 4, 10)
    with pytest.raises(CheckpointError, match="streams hold 100 codes, expected 99") as e:
        C.decode_prev(C.encode_prev(x, 4), 4, 99)
    _one_line(e)
    with pytest.raises(CheckpointError):
        C.decode_rows(C.encode_rows(x, 4, 4), 4, 101)


def test_prev_stream_running_out_is_refused():
    """Counts that sum right but a walk that needs a code from an empty stream: [] for context 0,
    [1, 1] for context 1; the first code (context 0) has nowhere to come from."""
    blob = varint.encode(0) + _stream([1, 1], 2, 8)
    with pytest.raises(CheckpointError, match="stream for context 0 runs out at code 0") as e:
        C.decode_prev(blob, 2, 2)
    _one_line(e)
    with pytest.raises(CheckpointError, match="runs out at code 0"):
        C.decode_prev_ref(blob, 2, 2)


def test_prev_empty_stream_stored_is_refused():
    blob = varint.encode(len(_stream([], 2, 8))) + _stream([], 2, 8) + _stream([1, 1], 2, 8)
    with pytest.raises(CheckpointError, match="empty stream for context 0"):
        C.decode_prev(blob, 2, 2)


@pytest.mark.parametrize("groups, msg", [(0, "has 0 groups"), (11, "has 11 groups; 10 codes allow 1 to 10")])
def test_rows_bad_group_count(groups, msg):
    blob = varint.encode(groups) + b"\0" * 12
    with pytest.raises(CheckpointError, match=msg) as e:
        C.decode_rows(blob, 4, 10)
    _one_line(e)


def test_rows_group_with_a_wrong_length():
    x = np.array([0, 1, 2, 3] * 5, np.uint8)
    good = C.encode_rows(x, 4, 2)
    with pytest.raises(CheckpointError, match="group 0 is 0 bytes for 10 codes"):
        C.decode_rows(varint.encode(2) + varint.encode(0) + good[2:], 4, 20)


def test_non_bytes_blob_is_refused():
    with pytest.raises(CheckpointError, match="must be bytes"):
        C.decode_prev([1, 2], 4, 2)


# --------------------------------------------------------------------------- speed


def test_headline_sized_tensor_is_fast():
    """~300k codes (the headline artifact's code count) encode and decode in well under a few
    seconds each (numpy splitting, the C coder where built)."""
    x = skewed(300_000, 16, 11)
    t = time.process_time()  # CPU time: a loaded CI box stretches the wall clock, not the work
    for enc, dec in ((C.encode_prev, C.decode_prev), (C.encode_rows, C.decode_rows)):
        assert np.array_equal(dec(enc(x, 16), 16, x.size), x)
    limit = 10.0 if E._native() is not None else 120.0  # the Python coder is ~100x slower
    assert time.process_time() - t < limit

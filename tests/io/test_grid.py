"""io.grid: snapping to per-tensor grids and the compact layout's grid codec."""
import math

import numpy as np
import pytest
import torch

from iteralite.io import grid
from iteralite.io.errors import CheckpointError


def _scales(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) * 0.08 + 0.01).half()


@pytest.mark.parametrize("bits", range(2, 9))
def test_log_snap_rounds_up_to_at_most_2_pow_bits_values_and_codes_exactly(bits):
    s = _scales()
    snapped = grid.snap_log_up(s, bits)
    assert snapped.dtype == torch.float16 and snapped.shape == s.shape
    assert (snapped.float() >= s.float()).all()  # a stored scale never shrinks its range
    assert snapped.unique().numel() <= 2 ** bits
    assert snapped.min() == s.min() and snapped.max() == s.max()
    # one grid step at most: (hi / lo) ** (1 / K), plus fp16 rounding up
    step = (s.max().float() / s.min().float()) ** (1 / (2 ** bits - 1))
    assert (snapped.float() / s.float()).max() <= step * (1 + 2 ** -10) + 1e-6
    blob = grid.encode(snapped)
    assert blob is not None and len(blob) <= 5 + math.ceil(s.numel() * bits / 8)
    out = grid.decode(blob, snapped)
    assert out.dtype == torch.float16 and torch.equal(out, snapped)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_snap_is_nearest_on_its_grid_and_codes_exactly(bits, dtype):
    t = (torch.randn(5, 7, generator=torch.Generator().manual_seed(bits)) * 0.5).to(dtype)
    snapped = grid.snap_linear(t, bits)
    assert snapped.dtype == dtype and snapped.shape == t.shape
    assert torch.equal(snapped.half().to(dtype), snapped)  # every value an fp16 value
    assert snapped.unique().numel() <= 2 ** bits
    lo, hi = float(t.min()), float(t.max())
    step = (hi - lo) / (2 ** bits - 1)
    assert (snapped.double() - t.double()).abs().max() <= step / 2 + 2e-3 * max(abs(lo), abs(hi))
    blob = grid.encode(snapped)
    assert blob is not None and len(blob) == 5 + math.ceil(t.numel() * bits / 8)
    assert torch.equal(grid.decode(blob, snapped), snapped)


def test_an_all_zero_group_does_not_stretch_the_log_grid():
    s = _scales(64)
    s[3] = 2.0 ** -24  # the floor of an all-zero group's scale
    snapped = grid.snap_log_up(s, 6)
    others = torch.arange(64) != 3
    assert snapped[3] == s[others].min()  # rounded up to the smallest ordinary scale
    step = (s.max().float() / s[others].min().float()) ** (1 / 63)
    assert (snapped[others].float() / s[others].float()).max() <= step * (1 + 2 ** -10)
    assert torch.equal(grid.decode(grid.encode(snapped), snapped), snapped)


@pytest.mark.parametrize("values", [[0.5], [0.5, 0.5, 0.5], [-1.0, 2.0], [0.0] * 9])
def test_constant_and_two_valued_tensors_take_one_bit(values):
    t = torch.tensor(values)
    blob = grid.encode(t)
    assert blob is not None and len(blob) == 5 + math.ceil(len(values) / 8)
    assert torch.equal(grid.decode(blob, t), t)


@pytest.mark.parametrize("t", [
    torch.randn(50),  # float32 values off the fp16 grid
    torch.randn(50).half(),  # fp16, but no 8-bit grid holds 50 random values
    torch.tensor([1.0, float("nan")]),
    torch.tensor([1.0, float("inf")]),
    torch.zeros(4, dtype=torch.uint8),
    torch.zeros(0),
])
def test_tensors_on_no_grid_are_not_encoded(t):
    assert grid.encode(t) is None


def test_decoding_is_the_same_grid_the_encoder_used_for_every_bit_width():
    """A tensor built from grid values of each (kind, bits) encodes at no more than that width."""
    rng = np.random.default_rng(0)
    for kind, lo, hi in [(grid.LOG, 0.01, 0.09), (grid.LINEAR, -0.7, 0.4)]:
        for bits in range(1, 9):
            g = grid.grid_values(kind, bits, float(torch.tensor(lo).half()), float(torch.tensor(hi).half()))
            idx = rng.integers(0, len(g), 200)
            idx[:2] = [0, len(g) - 1]
            t = g[torch.from_numpy(idx)].half()
            blob = grid.encode(t)
            assert blob[0] & 0x0F <= bits and torch.equal(grid.decode(blob, t), t)


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b[:4], "shorter than its 5-byte head"),
    (lambda b: bytes([0x20 | (b[0] & 0x0F)]) + b[1:], "kind 2"),
    (lambda b: bytes([b[0] & 0xF0]) + b[1:], "0 bits"),
    (lambda b: bytes([b[0] & 0xF0 | 9]) + b[1:], "9 bits"),
    (lambda b: b[:1] + np.array([0.5, 0.25], dtype="<f2").tobytes() + b[5:], r"range \[0.5, 0.25\]"),
    (lambda b: b[:1] + np.array([-0.5, 0.25], dtype="<f2").tobytes() + b[5:], "not a valid log grid"),
    (lambda b: b[:1] + np.array([np.inf, np.inf], dtype="<f2").tobytes() + b[5:], "not a valid"),
    (lambda b: b + b"\0", "values at 6 bits take"),
    (lambda b: b[:-1], "values at 6 bits take"),
])
def test_a_malformed_grid_blob_is_a_checkpoint_error(mutate, match):
    s = grid.snap_log_up(_scales(), 6)
    blob = grid.encode(s)
    assert blob[0] == (grid.LOG << 4 | 6)
    with pytest.raises(CheckpointError, match=match):
        grid.decode(mutate(blob), s)


def test_a_grid_entry_for_an_integer_tensor_is_refused():
    with pytest.raises(CheckpointError, match="stored on a grid but the model holds a torch.uint8"):
        grid.decode(b"\x11\0\0\0\0\0", torch.zeros(3, dtype=torch.uint8))

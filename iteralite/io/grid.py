"""Per-tensor value grids: a small float tensor stored as b-bit indices into a grid that its own
min and max define (the compact layout's "grid" codec), and the snapping that puts a tensor on one.

A grid is 2**bits fp16 values from lo to hi (both fp16 values, lo <= hi), computed in float64:

    log     g_k = lo * (hi / lo) ** (k / K), rounded UP to fp16      (lo > 0; group scales)
    linear  g_k = lo + (hi - lo) * k / K,    rounded to nearest fp16  (norms, the conv, biases)

with K = 2**bits - 1 and the end points forced to exactly lo and hi, so the grid is a pure
function of (kind, bits, lo, hi) and a tensor whose min and max are lo and hi and whose every
value is a grid value is stored exactly as bits per value plus five bytes.

Scales are snapped UP (`snap_log_up`): a stored scale never shrinks the range it was computed for,
so every value inside a group's range still dequantizes within half a step. Very small scales
(an all-zero group's floor) would stretch the grid, so the grid starts at the smallest scale of
at least hi / 2**LOG_SPAN_OCTAVES and any smaller one rounds up to that.

Blob (codec "grid"): u8 kind << 4 | bits, fp16 lo, fp16 hi (little-endian), then the indices
packed LSB-first at `bits` bits each; exactly 5 + ceil(n * bits / 8) bytes.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from iteralite.io.errors import CheckpointError

LOG, LINEAR = 1, 0
KINDS = {LOG: "log", LINEAR: "linear"}
MAX_BITS = 8
LOG_SPAN_OCTAVES = 8  # a log grid spans at most hi / 2**8 .. hi
_HEAD = 5


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """float64 -> the smallest fp16 >= x (as float64)."""
    h = x.half()
    low = h.double() < x
    return torch.where(low, torch.nextafter(h, torch.full_like(h, math.inf)), h).double()


def grid_values(kind: int, bits: int, lo: float, hi: float) -> torch.Tensor:
    """The 2**bits grid values (float64, each an fp16 value, non-decreasing) of (kind, bits, lo, hi)."""
    k = torch.arange(2 ** bits, dtype=torch.float64) / (2 ** bits - 1)
    lo_t, hi_t = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
    if kind == LOG:
        g = _fp16_up(lo_t * torch.pow(hi_t / lo_t, k))
    else:
        g = (lo_t + (hi_t - lo_t) * k).half().double()
    g[0], g[-1] = lo, hi
    return torch.cummax(g, 0).values


def _lookup(values: torch.Tensor, g: torch.Tensor) -> torch.Tensor | None:
    """Index of each value in grid g (the first equal entry), or None if any value is off it."""
    idx = torch.searchsorted(g, values).clamp(max=len(g) - 1)
    return idx if torch.equal(g[idx], values) else None


@torch.no_grad()
def snap_log_up(s: torch.Tensor, bits: int) -> torch.Tensor:
    """Positive fp16 values (any shape) -> each rounded up to the tensor's `bits`-bit log grid (fp16)."""
    v = s.detach().double().reshape(-1)
    hi = float(v.max())
    lo = float(v[v >= hi / 2 ** LOG_SPAN_OCTAVES].min())  # smaller ones round up to lo
    g = grid_values(LOG, bits, lo, hi)
    idx = torch.searchsorted(g, v).clamp(max=len(g) - 1)  # the smallest grid value >= v
    return g[idx].reshape(s.shape).to(s.dtype)


@torch.no_grad()
def snap_linear(t: torch.Tensor, bits: int) -> torch.Tensor:
    """A float tensor -> each value rounded to the nearest value of its `bits`-bit linear grid,
    lo = fp16(min), hi = fp16(max) (same dtype; every value is then an fp16 value)."""
    v = t.detach().double().reshape(-1)
    lo, hi = float(v.min().half()), float(v.max().half())
    g = grid_values(LINEAR, bits, lo, hi)
    i = torch.searchsorted(g, v).clamp(1, len(g) - 1)
    nearest = torch.where((v - g[i - 1]).abs() <= (g[i] - v).abs(), i - 1, i)
    return g[nearest].reshape(t.shape).to(t.dtype)


# --------------------------------------------------------------------------- codec


def _pack(idx: np.ndarray, bits: int) -> bytes:
    bitmat = ((idx[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bitmat, bitorder="little").tobytes()


def _unpack(data: bytes, bits: int, n: int) -> np.ndarray:
    bitmat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:n * bits]
    return (bitmat.reshape(n, bits).astype(np.int64) << np.arange(bits)).sum(1)


def _values(t: torch.Tensor) -> torch.Tensor | None:
    """t's values as float64 when it is a finite float16/float32 tensor of fp16 values, else None."""
    if t.dtype not in (torch.float16, torch.float32) or not t.numel():
        return None
    v = t.detach().cpu().reshape(-1)
    if not torch.isfinite(v).all() or (t.dtype == torch.float32 and not torch.equal(v.half().float(), v)):
        return None
    return v.double()


def encode(t: torch.Tensor) -> bytes | None:
    """The shortest grid blob that stores `t` exactly, or None when no grid of <= MAX_BITS holds it."""
    v = _values(t)
    if v is None:
        return None
    lo, hi = float(v.min()), float(v.max())
    for bits in range(1, MAX_BITS + 1):
        for kind in (LOG, LINEAR):
            if kind == LOG and lo <= 0:
                continue
            idx = _lookup(v, grid_values(kind, bits, lo, hi))
            if idx is not None:
                head = bytes([kind << 4 | bits]) + np.array([lo, hi], dtype="<f2").tobytes()
                return head + _pack(idx.numpy(), bits)
    return None


def decode(data: bytes, like: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode`, shaped and typed like `like`; CheckpointError on a malformed blob."""
    if like.dtype not in (torch.float16, torch.float32):
        raise CheckpointError(f"is stored on a grid but the model holds a {like.dtype} tensor")
    if len(data) < _HEAD:
        raise CheckpointError(f"grid blob is {len(data)} bytes, shorter than its {_HEAD}-byte head")
    kind, bits = data[0] >> 4, data[0] & 0x0F
    if kind not in KINDS or not 1 <= bits <= MAX_BITS:
        raise CheckpointError(f"grid blob has kind {kind} / {bits} bits; known kinds "
                              f"{sorted(KINDS)} with 1..{MAX_BITS} bits")
    lo, hi = (float(x) for x in np.frombuffer(data[1:_HEAD], dtype="<f2"))
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi and (kind != LOG or lo > 0)):
        raise CheckpointError(f"grid blob has range [{lo}, {hi}], not a valid {KINDS[kind]} grid")
    n = like.numel()
    want = _HEAD + (n * bits + 7) // 8
    if len(data) != want:
        raise CheckpointError(f"grid blob is {len(data)} bytes; {n} values at {bits} bits take {want}")
    idx = torch.from_numpy(_unpack(data[_HEAD:], bits, n))
    return grid_values(kind, bits, lo, hi)[idx].to(like.dtype).reshape(like.shape)

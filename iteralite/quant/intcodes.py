"""Integer group quantization: the only place codes, scales and zero-points are computed.

A weight w (*lead, out, in) is cut into groups of `group_size` consecutive input columns; each
(row, group) has a scale s (fp16) and, when asymmetric, an integer zero point z in
[0, 2**bits - 1] (stored packed at the codes' bit width). Codes q are unsigned integers in
[0, 2**bits - 1] and

    w ~= (q - z) * s                 asymmetric: z per group, stored
    w ~= (q - 2**(bits-1)) * s       symmetric:  z = 2**(bits-1) implied, |q - z| <= 2**(bits-1) - 1

AWQ additionally folds a per-input-channel scale `in_scale` (fp16, (*lead, in)) into storage:
the codes quantize w * in_scale, so dequantization is ((q - z) * s) / in_scale.

Scales are rounded UP to fp16 before the codes are computed, and the codes are computed with
that stored scale, so every value inside the group's [min, max] range (which always includes
0, so pruned zeros stay exact) dequantizes within half a step s of its float value.
RTN, AWQ, GPTQ, the clipping search and fake quantization (QAT) all go through these functions,
so a QAT forward equals the exported weights exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from iteralite.io.errors import CheckpointError
from iteralite.io.grid import snap_log_up
from iteralite.quant.packing import pack_bits, packed_nbytes, unpack_bits
from iteralite.quant.spec import QuantSpec, check_group_size

CLIP_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
_FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal); floor for all-zero groups


def _fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Round a positive float tensor UP to the nearest fp16 value (so a stored scale never
    shrinks the range it was computed for)."""
    x = x.float().clamp(min=_FP16_TINY)
    h = x.half()
    low = h.float() < x
    h = torch.where(low, torch.nextafter(h, torch.full_like(h, math.inf)), h)
    if not torch.isfinite(h).all():
        raise ValueError("quantize: a scale exceeds the fp16 range (65504); the weights are not finite "
                         "or absurdly large")
    return h


def split_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(*lead, in) -> (*lead, in/g, g)."""
    return w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)


def _stored_scale(s: torch.Tensor, scale_bits: int) -> torch.Tensor:
    """Float step sizes -> the stored fp16 scales: rounded up to fp16, then (scale_bits > 0) up
    to the tensor's log grid (`io.grid`), over all of its groups."""
    s16 = _fp16_ceil(s)
    return snap_log_up(s16, scale_bits) if scale_bits else s16


def float_step(wg: torch.Tensor, bits: int, symmetric: bool, shrink=1.0) -> torch.Tensor:
    """The float step size (..., G) of groups wg (..., G, g) before it is stored: max |w| / qmax
    (symmetric) or the range [min (<= 0), max (>= 0)] / qmax, times shrink. Differentiable."""
    if symmetric:
        return wg.abs().amax(-1) * shrink / (2 ** (bits - 1) - 1)
    lo = wg.amin(-1).clamp(max=0) * shrink  # the range always contains 0: pruned zeros stay exact
    hi = wg.amax(-1).clamp(min=0) * shrink
    return (hi - lo) / (2 ** bits - 1)


def group_params(wg: torch.Tensor, bits: int, symmetric: bool, shrink=1.0, scale_bits: int = 0):
    """Scales and zeros for groups wg (..., G, g).

    shrink: float or (..., G) tensor, multiplies the range (clipping search; 1 = min/max).
    scale_bits: 0 = fp16 scales; b = scales rounded up to the tensor's b-bit log grid.
    Returns scale fp16 (..., G) and zero fp16 (..., G), or None when symmetric.
    """
    s16 = _stored_scale(float_step(wg, bits, symmetric, shrink), scale_bits)
    if symmetric:
        return s16, None
    lo = wg.amin(-1).clamp(max=0) * shrink
    z = torch.round(-lo / s16.float()).clamp(0, 2 ** bits - 1)
    return s16, z.half()


def group_codes(wg: torch.Tensor, s16: torch.Tensor, z16, bits: int, symmetric: bool, return_mask=False):
    """wg (..., G, g) with scale/zero (..., G) -> uint8 codes (..., G, g) [, inside-range mask]."""
    r = torch.round(wg / s16.float()[..., None])
    if symmetric:
        lo, hi, off = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1, 2 ** (bits - 1)
    else:
        lo, hi, off = 0, 2 ** bits - 1, 0
        r = r + z16.float()[..., None]
    q = (r.clamp(lo, hi) + off).to(torch.uint8)
    if return_mask:
        return q, (r >= lo) & (r <= hi)
    return q


def dequant_groups(q: torch.Tensor, s16: torch.Tensor, z16, bits: int, symmetric: bool):
    """codes (..., G, g) -> float32 (..., G, g) = (q - z) * s."""
    z = float(2 ** (bits - 1)) if symmetric else z16.float()[..., None]
    return (q.float() - z) * s16.float()[..., None]


def in_channel_view(t: torch.Tensor) -> torch.Tensor:
    """Per-input-channel tensor (*lead, in) -> float32 (*lead, 1, in), broadcastable against a
    weight (*lead, out, in)."""
    return t.float().unsqueeze(-2)


def _rtn_core(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, shrink=1.0, scale_bits: int = 0):
    """w (*lead, in) float32 -> codes uint8 (*lead, in), scales fp16 (*lead, G), zeros or None."""
    wg = split_groups(w, group_size)
    s16, z16 = group_params(wg, bits, symmetric, shrink, scale_bits)
    q = group_codes(wg, s16, z16, bits, symmetric)
    return q.reshape(w.shape), s16, z16


def clip_search(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, weight=None, scale_bits: int = 0):
    """Per-group range shrink minimizing sum(weight * (w - dq)^2) over CLIP_SHRINKS.

    w (*lead, out, in); weight (*lead, 1, in) per-input-channel error weights, or None.
    Returns shrink (*lead, G) float32. Groups are independent, so a per-group argmin is optimal
    over the grid.
    """
    wg = split_groups(w, group_size)
    wt = torch.ones_like(wg) if weight is None else split_groups(weight.expand(w.shape), group_size)
    best_err = torch.full(wg.shape[:-1], math.inf)
    best = torch.ones(wg.shape[:-1])
    for r in CLIP_SHRINKS:
        s16, z16 = group_params(wg, bits, symmetric, r, scale_bits)
        dq = dequant_groups(group_codes(wg, s16, z16, bits, symmetric), s16, z16, bits, symmetric)
        err = ((wg - dq) ** 2 * wt).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best



@dataclass
class QTensor:
    """A group-quantized weight in its unpacked working form.

    codes uint8 (*lead, out, in); scales fp16 (*lead, out, in/g); zeros fp16 like scales or None
    (symmetric); in_scale fp16 (*lead, in) or None (AWQ only). *lead is () or (e,) for experts.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    in_scale: torch.Tensor | None
    bits: int
    group_size: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """-> float32 (*lead, out, in)."""
        qg = split_groups(self.codes, self.group_size)
        w = dequant_groups(qg, self.scales, self.zeros, self.bits, self.symmetric).reshape(self.shape)
        if self.in_scale is not None:
            w = w / in_channel_view(self.in_scale)
        return w

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Storage form: {prefix+'codes': packed uint8 (nbytes,), prefix+'scales', prefix+'zeros',
        prefix+'in_scale'} (absent fields omitted). Safe for safetensors."""
        out = {prefix + "codes": pack_bits(self.codes, self.bits), prefix + "scales": self.scales}
        if self.zeros is not None:  # integers in [0, 2**bits - 1]: packed at the codes' width
            out[prefix + "zeros"] = pack_bits(self.zeros.to(torch.uint8), self.bits)
        if self.in_scale is not None:
            out[prefix + "in_scale"] = self.in_scale
        return out

    @staticmethod
    def layout(shape, spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Field -> (shape, dtype) of `to_tensors` output, from the weight shape and spec alone."""
        *lead, out_dim, in_dim = shape
        groups = (*lead, out_dim, in_dim // spec.group_size)
        d = {"codes": ((packed_nbytes(math.prod(shape), spec.bits),), torch.uint8),
             "scales": (groups, torch.float16)}
        if not spec.symmetric:
            d["zeros"] = ((packed_nbytes(math.prod(groups), spec.bits),), torch.uint8)
        if spec.method == "awq":
            d["in_scale"] = ((*lead, in_dim), torch.float16)
        return d

    @classmethod
    def from_tensors(cls, d: dict, prefix: str, shape, spec: QuantSpec) -> "QTensor":
        """Inverse of `to_tensors` given the weight shape and the spec it was stored with."""
        t = take_layout(d, prefix, cls.layout(shape, spec))
        codes = unpack_bits(t["codes"], spec.bits, math.prod(shape)).reshape(shape)
        zeros = None
        if "zeros" in t:
            groups = t["scales"].shape
            zeros = unpack_bits(t["zeros"], spec.bits, math.prod(groups)).reshape(groups).to(torch.float16)
        return cls(codes, t["scales"], zeros, t.get("in_scale"), spec.bits, spec.group_size, spec.symmetric)

    def storage_bits(self) -> int:
        """Bits of everything stored: packed codes + scales + zeros + in_scale."""
        n = packed_nbytes(self.codes.numel(), self.bits) * 8 + 16 * self.scales.numel()
        n += 0 if self.zeros is None else packed_nbytes(self.zeros.numel(), self.bits) * 8
        n += 0 if self.in_scale is None else 16 * self.in_scale.numel()
        return n


def take_layout(d: dict, prefix: str, layout: dict) -> dict[str, torch.Tensor]:
    """Pick and check the stored fields of one tensor; a CheckpointError names any mismatch."""
    out = {}
    for field, (shape, dtype) in layout.items():
        key = prefix + field
        if key not in d:
            raise CheckpointError(f"quantized tensor field '{key}' is missing")
        t = d[key]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"'{key}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
        out[field] = t.to(dtype)
    return out



def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, *,
                 in_scale: torch.Tensor | None = None, clip: bool = False,
                 clip_weight: torch.Tensor | None = None, name: str = "weight", scale_bits: int = 0) -> QTensor:
    """Round-to-nearest group quantization.

    w float (out, in) or (e, out, in). in_scale fp16 (*lead, in): quantize w * in_scale (AWQ).
    clip: search a per-group range shrink, weighting the error by clip_weight (*lead, in) if given.
    scale_bits: 0 = fp16 scales; b = scales on the tensor's b-bit log grid (one grid per call).
    """
    QuantSpec(bits, group_size, symmetric, "rtn", scale_bits=scale_bits).validate()
    check_group_size(name, w.shape[-1], group_size)
    w = w.detach().float()
    if in_scale is not None:
        in_scale = in_scale.to(torch.float16)
        w = w * in_channel_view(in_scale)
    shrink = 1.0
    if clip:
        weight = None if clip_weight is None else in_channel_view(clip_weight)
        if weight is not None and in_scale is not None:  # error in original units: (dw / s)^2 * act
            weight = weight / in_channel_view(in_scale) ** 2
        shrink = clip_search(w, bits, group_size, symmetric, weight, scale_bits)
    codes, s16, z16 = _rtn_core(w, bits, group_size, symmetric, shrink, scale_bits)
    return QTensor(codes, s16, z16, in_scale, bits, group_size, symmetric)



def stack_qtensors(parts: list[QTensor]) -> QTensor:
    """Per-expert QTensors (out, in) -> one QTensor (e, out, in)."""
    def stack(field):
        vals = [getattr(p, field) for p in parts]
        return None if vals[0] is None else torch.stack(vals)
    p0 = parts[0]
    return QTensor(stack("codes"), stack("scales"), stack("zeros"), stack("in_scale"),
                   p0.bits, p0.group_size, p0.symmetric)

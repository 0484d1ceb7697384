"""Group-wise weight quantization (RTN, AWQ, GPTQ, NF4) and quantization as a module swap.

Integer formats (methods "rtn", "awq", "gptq") share one storage format and one convention.
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

"nf4" is bitsandbytes' 4-bit NormalFloat (its own packed bytes + fp32 absmax per block).

The float model keeps conv1d, A_log, D, dt bias and the RMSNorm weights in float: they are a
tiny share of the parameters and the scan is sensitive to them.

Module swaps: `QuantLinear`, `QuantExperts`, `QuantEmbedding` hold only packed buffers (their
state_dict) and dequantize lazily into a non-persistent cache. `quant_config(model)` describes
the swaps as JSON; `apply_quant_config` rebuilds empty quantized modules in a freshly built
float model, so a loader can do: build -> apply_quant_config -> load_state_dict(strict=True).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ParamsError
from .model import TiedEmbedding
from .moe import Experts
from .packing import ALLOWED_BITS, pack_bits, packed_nbytes, unpack_bits

INT_METHODS = ("rtn", "awq", "gptq")
ALL_METHODS = INT_METHODS + ("nf4",)
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
AWQ_ALPHAS = tuple(i / 10 for i in range(11))
CLIP_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4 matmul accepts
CONFIG_FORMAT, CONFIG_VERSION = "iteralite-quant", 1
_FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal); floor for all-zero groups


class QuantSpecError(ParamsError, ValueError):
    """A quantization setting is invalid. Both a ParamsError (the CLI prints it plainly) and a
    ValueError (what a direct caller of the functions expects)."""


# --------------------------------------------------------------------------- spec


@dataclass
class QuantSpec:
    """How one tensor is quantized. JSON-able (`to_dict`), and with the tensor shape it fully
    determines the stored buffers."""

    bits: int = 4
    group_size: int = 32  # along the input dim (last dim); for nf4 the bitsandbytes blocksize
    symmetric: bool = False
    method: str = "rtn"  # rtn | awq | gptq | nf4
    clip: bool = False  # rtn/awq: search a per-group range shrink (no storage cost)
    act_int8: bool = False  # at run time, quantize the module's inputs per token to int8

    def validate(self, section: str = "quantize") -> None:
        def bad(key: str, msg: str):
            raise QuantSpecError(f"params: '{section}.{key}' {msg}")

        if self.method not in ALL_METHODS:
            bad("method", f"must be one of {', '.join(ALL_METHODS)}; got {self.method!r}")
        if self.method == "nf4":
            if self.bits != 4:
                bad("bits", f"must be 4 for method nf4; got {self.bits!r}")
            if self.group_size not in NF4_BLOCKSIZES:
                bad("group_size", f"for method nf4 is the bitsandbytes blocksize and must be one of "
                                  f"{', '.join(map(str, NF4_BLOCKSIZES))}; got {self.group_size!r}")
            return
        if isinstance(self.bits, bool) or self.bits not in ALLOWED_BITS:
            bad("bits", f"must be one of {', '.join(map(str, ALLOWED_BITS))}; got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            bad("group_size", f"must be an integer >= 1; got {self.group_size!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, section: str = "quantize") -> "QuantSpec":
        from .params import from_dict
        return from_dict(cls, d, section)  # unknown keys / wrong types -> ParamsError


def valid_group_sizes(in_dim: int) -> list[int]:
    """All group sizes that divide `in_dim`."""
    return [g for g in range(1, in_dim + 1) if in_dim % g == 0]


def fit_group_size(in_dim: int, group_size: int) -> int:
    """Largest divisor of `in_dim` that is <= `group_size` (for layers with small input dims)."""
    return max(g for g in valid_group_sizes(in_dim) if g <= max(1, group_size))


def check_group_size(name: str, in_dim: int, group_size: int) -> None:
    """Raise QuantSpecError naming the tensor unless `group_size` divides its input dim."""
    if in_dim % group_size:
        raise QuantSpecError(
            f"quantize: group_size={group_size} does not divide the input dim {in_dim} of '{name}'; "
            f"valid group sizes for it: {', '.join(map(str, valid_group_sizes(in_dim)))}"
        )


# --------------------------------------------------------------------------- integer core
# These few functions are the only place codes, scales and zeros are computed; quantize_rtn,
# AWQ, GPTQ, the clipping search and fake_quantize (QAT) all go through them, so QAT's forward
# equals the exported weights exactly.


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


def _group(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(*lead, in) -> (*lead, in/g, g)."""
    return w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)


def _group_params(wg: torch.Tensor, bits: int, symmetric: bool, shrink=1.0):
    """Scales and zeros for groups wg (..., G, g).

    shrink: float or (..., G) tensor, multiplies the range (clipping search; 1 = min/max).
    Returns scale fp16 (..., G) and zero fp16 (..., G), or None when symmetric.
    """
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return _fp16_ceil(wg.abs().amax(-1) * shrink / qmax), None
    qmax = 2 ** bits - 1
    lo = wg.amin(-1).clamp(max=0) * shrink  # the range always contains 0: pruned zeros stay exact
    hi = wg.amax(-1).clamp(min=0) * shrink
    s16 = _fp16_ceil((hi - lo) / qmax)
    z = torch.round(-lo / s16.float()).clamp(0, qmax)
    return s16, z.half()


def _codes(wg: torch.Tensor, s16: torch.Tensor, z16, bits: int, symmetric: bool, return_mask=False):
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


def _dequant_groups(q: torch.Tensor, s16: torch.Tensor, z16, bits: int, symmetric: bool):
    """codes (..., G, g) -> float32 (..., G, g) = (q - z) * s."""
    z = float(2 ** (bits - 1)) if symmetric else z16.float()[..., None]
    return (q.float() - z) * s16.float()[..., None]


def _in_view(t: torch.Tensor) -> torch.Tensor:
    """Per-input-channel tensor (*lead, in) -> float32 (*lead, 1, in), broadcastable against a
    weight (*lead, out, in)."""
    return t.float().unsqueeze(-2)


def _rtn_core(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, shrink=1.0):
    """w (*lead, in) float32 -> codes uint8 (*lead, in), scales fp16 (*lead, G), zeros or None."""
    wg = _group(w, group_size)
    s16, z16 = _group_params(wg, bits, symmetric, shrink)
    q = _codes(wg, s16, z16, bits, symmetric)
    return q.reshape(w.shape), s16, z16


def _clip_search(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, weight=None):
    """Per-group range shrink minimizing sum(weight * (w - dq)^2) over CLIP_SHRINKS.

    w (*lead, out, in); weight (*lead, 1, in) per-input-channel error weights, or None.
    Returns shrink (*lead, G) float32. Groups are independent, so a per-group argmin is optimal
    over the grid.
    """
    wg = _group(w, group_size)
    wt = torch.ones_like(wg) if weight is None else _group(weight.expand(w.shape), group_size)
    best_err = torch.full(wg.shape[:-1], math.inf)
    best = torch.ones(wg.shape[:-1])
    for r in CLIP_SHRINKS:
        s16, z16 = _group_params(wg, bits, symmetric, r)
        dq = _dequant_groups(_codes(wg, s16, z16, bits, symmetric), s16, z16, bits, symmetric)
        err = ((wg - dq) ** 2 * wt).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


# --------------------------------------------------------------------------- QTensor


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
        qg = _group(self.codes, self.group_size)
        w = _dequant_groups(qg, self.scales, self.zeros, self.bits, self.symmetric).reshape(self.shape)
        if self.in_scale is not None:
            w = w / _in_view(self.in_scale)
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
        t = _take_layout(d, prefix, cls.layout(shape, spec))
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


def _take_layout(d: dict, prefix: str, layout: dict) -> dict[str, torch.Tensor]:
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


def dequantize(qt) -> torch.Tensor:
    """QTensor or NF4Tensor -> float32 weight of its shape."""
    return qt.dequantize()


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, *,
                 in_scale: torch.Tensor | None = None, clip: bool = False,
                 clip_weight: torch.Tensor | None = None, name: str = "weight") -> QTensor:
    """Round-to-nearest group quantization.

    w float (out, in) or (e, out, in). in_scale fp16 (*lead, in): quantize w * in_scale (AWQ).
    clip: search a per-group range shrink, weighting the error by clip_weight (*lead, in) if given.
    """
    QuantSpec(bits, group_size, symmetric, "rtn").validate()
    check_group_size(name, w.shape[-1], group_size)
    w = w.detach().float()
    if in_scale is not None:
        in_scale = in_scale.to(torch.float16)
        w = w * _in_view(in_scale)
    shrink = 1.0
    if clip:
        weight = None if clip_weight is None else _in_view(clip_weight)
        if weight is not None and in_scale is not None:  # error in original units: (dw / s)^2 * act
            weight = weight / _in_view(in_scale) ** 2
        shrink = _clip_search(w, bits, group_size, symmetric, weight)
    codes, s16, z16 = _rtn_core(w, bits, group_size, symmetric, shrink)
    return QTensor(codes, s16, z16, in_scale, bits, group_size, symmetric)


# --------------------------------------------------------------------------- AWQ


def weighted_error(w: torch.Tensor, wq: torch.Tensor, act_sq_mean: torch.Tensor) -> torch.Tensor:
    """Diagonal approximation of E||x W^T - x Wq^T||^2: sum_in act_sq_mean[in] * (W - Wq)^2.

    w, wq (*lead, out, in); act_sq_mean (*lead, in). Returns a scalar."""
    return ((w - wq) ** 2 * act_sq_mean.unsqueeze(-2)).sum()


def awq_in_scale(act_sq_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel scale rms(x)^alpha, normalized to geometric mid-range 1, as fp16 (in,)."""
    a = act_sq_mean.float()
    a = a.clamp(min=a.max().clamp(min=1e-30) * 1e-8)  # dead channels: keep the scale finite and > 0
    s = a ** (alpha / 2)
    s = s / (s.max() * s.min()).sqrt()
    return s.half()


def _awq_2d(w, act_sq_mean, bits, group_size, symmetric, clip, alphas, name):
    """w (out, in), act_sq_mean (in,) -> best QTensor over the alpha grid."""
    best, best_err = None, math.inf
    for alpha in alphas:
        qt = quantize_rtn(w, bits, group_size, symmetric, in_scale=awq_in_scale(act_sq_mean, alpha),
                          clip=clip, clip_weight=act_sq_mean, name=name)
        err = float(weighted_error(w, qt.dequantize(), act_sq_mean))
        if err < best_err:  # strict: ties keep the smaller alpha (alpha=0 is plain RTN)
            best, best_err = qt, err
    return best


def quantize_awq(w: torch.Tensor, act_sq_mean: torch.Tensor, bits: int, group_size: int,
                 symmetric: bool, *, clip: bool = False, alphas=AWQ_ALPHAS, name: str = "weight") -> QTensor:
    """Activation-aware scaling: pick alpha so that quantizing w * s, s = act_sq_mean^(alpha/2),
    minimizes `weighted_error`. w (out, in) with act_sq_mean (in,), or (e, out, in) with (e, in)
    (each expert searched on its own). The chosen s is stored as in_scale."""
    QuantSpec(bits, group_size, symmetric, "awq").validate()
    check_group_size(name, w.shape[-1], group_size)
    w = w.detach().float()
    act_sq_mean = act_sq_mean.detach().float()
    if act_sq_mean.shape != (*w.shape[:-2], w.shape[-1]):
        raise ValueError(f"awq: act_sq_mean for '{name}' has shape {tuple(act_sq_mean.shape)}, "
                         f"expected {(*w.shape[:-2], w.shape[-1])}")
    if w.dim() == 2:
        return _awq_2d(w, act_sq_mean, bits, group_size, symmetric, clip, alphas, name)
    parts = [_awq_2d(w[e], act_sq_mean[e], bits, group_size, symmetric, clip, alphas, f"{name}[{e}]")
             for e in range(w.shape[0])]
    return _stack_qtensors(parts)


def _stack_qtensors(parts: list[QTensor]) -> QTensor:
    """Per-expert QTensors (out, in) -> one QTensor (e, out, in)."""
    def stack(field):
        vals = [getattr(p, field) for p in parts]
        return None if vals[0] is None else torch.stack(vals)
    p0 = parts[0]
    return QTensor(stack("codes"), stack("scales"), stack("zeros"), stack("in_scale"),
                   p0.bits, p0.group_size, p0.symmetric)


# --------------------------------------------------------------------------- GPTQ


def _gptq_2d(w, H, bits, group_size, symmetric, damp, block_size):
    """GPTQ on w (out, in) with Hessian H = X^T X (in, in): quantize column by column and
    spread each column's error over the not-yet-quantized columns via the inverse Hessian."""
    out_dim, in_dim = w.shape
    H = H.detach().double().clone()
    diag = H.diagonal()
    if not (diag > 0).any():  # no calibration data reached this weight
        return quantize_rtn(w, bits, group_size, symmetric)
    dead = diag <= 0
    diag[dead] = 1.0  # never-active inputs: keep H invertible; their weights are quantized plainly
    diag += damp * diag.mean()
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()  # upper factor of H^-1
    W = w.detach().float().clone()
    G = in_dim // group_size
    codes = torch.zeros(out_dim, in_dim, dtype=torch.uint8)
    scales = torch.zeros(out_dim, G, dtype=torch.float16)
    zeros = None if symmetric else torch.zeros(out_dim, G, dtype=torch.float16)
    block = group_size * max(1, block_size // group_size)  # blocks hold whole groups
    for i1 in range(0, in_dim, block):
        i2 = min(i1 + block, in_dim)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # group params from the error-updated weights of this group
                s16, z16 = _group_params(W1[:, i:i + group_size].unsqueeze(1), bits, symmetric)
                scales[:, col // group_size] = s16[:, 0]
                if zeros is not None:
                    zeros[:, col // group_size] = z16[:, 0]
            wc = W1[:, i].reshape(out_dim, 1, 1)
            q = _codes(wc, s16, z16, bits, symmetric)
            dq = _dequant_groups(q, s16, z16, bits, symmetric).reshape(out_dim)
            codes[:, col] = q.reshape(out_dim)
            e = (W1[:, i] - dq) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
    return QTensor(codes, scales, zeros, None, bits, group_size, symmetric)


def quantize_gptq(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                  *, damp: float = 0.01, block_size: int = 128, name: str = "weight") -> QTensor:
    """GPTQ. w (out, in) with H (in, in), or (e, out, in) with H (e, in, in); H = X^T X / n over
    calibration inputs of this weight. Same storage format as RTN."""
    QuantSpec(bits, group_size, symmetric, "gptq").validate()
    check_group_size(name, w.shape[-1], group_size)
    if H.shape != (*w.shape[:-2], w.shape[-1], w.shape[-1]):
        raise ValueError(f"gptq: Hessian for '{name}' has shape {tuple(H.shape)}, expected "
                         f"{(*w.shape[:-2], w.shape[-1], w.shape[-1])}")
    if w.dim() == 2:
        return _gptq_2d(w, H, bits, group_size, symmetric, damp, block_size)
    return _stack_qtensors([_gptq_2d(w[e], H[e], bits, group_size, symmetric, damp, block_size)
                            for e in range(w.shape[0])])


# --------------------------------------------------------------------------- NF4 (bitsandbytes)


def _bnb_functional():
    """Import bitsandbytes.functional lazily (only nf4 needs it). Its CPU backend logs a warning
    about an optional GEMV kernel package we do not use; silence just that logger."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    with warnings.catch_warnings():  # torch-internal deprecation noise triggered by its import
        warnings.simplefilter("ignore", DeprecationWarning)
        import bitsandbytes.functional as bnbf
    return bnbf


@dataclass
class NF4Tensor:
    """bitsandbytes NF4 in its own packed form, as plain tensors plus scalars.

    packed uint8 (ceil(numel/2),): bitsandbytes nibble order, FIRST code in the HIGH nibble
    (the opposite of packing.pack_bits). absmax float32 (ceil(numel/blocksize),).
    Blocks run over the row-major flattened weight: when the input dim is not a multiple of
    the blocksize a block spans two rows, and the last block may be partial. (bitsandbytes'
    native CPU dequantizer assumes row-aligned blocks for 2-D shapes and returns wrong values
    when in % blocksize != 0, so we always quantize and dequantize the flat 1-D view.)
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    blocksize: int = 64
    quant_type: str = "nf4"

    def meta(self) -> dict:
        """The scalars bitsandbytes' QuantState needs besides the tensors (JSON-able)."""
        return {"quant_type": self.quant_type, "blocksize": self.blocksize,
                "shape": list(self.shape), "dtype": "float32"}

    def dequantize(self) -> torch.Tensor:
        return dequantize_nf4(self)

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + "codes": self.packed, prefix + "absmax": self.absmax}

    @staticmethod
    def layout(shape, spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        n = math.prod(shape)
        return {"codes": (((n + 1) // 2,), torch.uint8),
                "absmax": ((-(-n // spec.group_size),), torch.float32)}

    @classmethod
    def from_tensors(cls, d: dict, prefix: str, shape, spec: QuantSpec) -> "NF4Tensor":
        t = _take_layout(d, prefix, cls.layout(shape, spec))
        return cls(t["codes"], t["absmax"], tuple(shape), spec.group_size)

    def storage_bits(self) -> int:
        return 8 * self.packed.numel() + 32 * self.absmax.numel()


def quantize_nf4(w: torch.Tensor, blocksize: int = 64) -> NF4Tensor:
    """w float (any shape) -> NF4Tensor via bitsandbytes.functional.quantize_4bit on CPU."""
    bnbf = _bnb_functional()
    flat = w.detach().float().contiguous().reshape(-1)
    packed, state = bnbf.quantize_4bit(flat, blocksize=blocksize, quant_type="nf4")
    return NF4Tensor(packed.reshape(-1), state.absmax.float(), tuple(w.shape), blocksize)


def dequantize_nf4(t: NF4Tensor) -> torch.Tensor:
    """NF4Tensor -> float32 of t.shape, through bitsandbytes.functional.dequantize_4bit."""
    bnbf = _bnb_functional()
    n = math.prod(t.shape)
    state = bnbf.QuantState(absmax=t.absmax.float(), shape=torch.Size([n]), blocksize=t.blocksize,
                            quant_type=t.quant_type, dtype=torch.float32,
                            code=bnbf.get_4bit_type(t.quant_type, device="cpu"))
    # bitsandbytes expects packed as (bytes, 1); for <= 2 codes it transposes its output, hence reshape.
    out = bnbf.dequantize_4bit(t.packed.reshape(-1, 1), state)
    return out.reshape(t.shape).float()


def dequantize_nf4_ref(t: NF4Tensor) -> torch.Tensor:
    """Plain-torch twin of `dequantize_nf4`: table lookup times the block absmax."""
    code = _bnb_functional().get_4bit_type(t.quant_type, device="cpu")
    n = math.prod(t.shape)
    idx = torch.stack([t.packed >> 4, t.packed & 0xF], dim=1).reshape(-1)[:n].long()
    block = torch.arange(n) // t.blocksize
    return (code[idx] * t.absmax[block]).reshape(t.shape)


# --------------------------------------------------------------------------- method dispatch


@dataclass(frozen=True)
class Method:
    """One quantization method: its storage class and how to quantize a weight with it.

    stat: which calibration statistic it needs ("act_sq_mean" (*lead, in), "hessian"
    (*lead, in, in)) or None."""

    tensor_cls: type
    quantize: Callable
    stat: str | None


def _q_rtn(w, spec, stat, name):
    return quantize_rtn(w, spec.bits, spec.group_size, spec.symmetric, clip=spec.clip,
                        clip_weight=stat, name=name)


def _q_awq(w, spec, stat, name):
    return quantize_awq(w, stat, spec.bits, spec.group_size, spec.symmetric, clip=spec.clip, name=name)


def _q_gptq(w, spec, stat, name):
    return quantize_gptq(w, stat, spec.bits, spec.group_size, spec.symmetric, name=name)


def _q_nf4(w, spec, stat, name):
    return quantize_nf4(w, spec.group_size)


METHODS: dict[str, Method] = {
    "rtn": Method(QTensor, _q_rtn, None),
    "awq": Method(QTensor, _q_awq, "act_sq_mean"),
    "gptq": Method(QTensor, _q_gptq, "hessian"),
    "nf4": Method(NF4Tensor, _q_nf4, None),
}


def quantize_tensor(w: torch.Tensor, spec: QuantSpec, stat: torch.Tensor | None = None,
                    name: str = "weight"):
    """Quantize w (out, in) or (e, out, in) with `spec`; stat is the calibration statistic the
    method needs (see Method.stat; rtn uses an optional act_sq_mean only to weight clipping)."""
    spec.validate()
    method = METHODS[spec.method]
    if spec.method in INT_METHODS:
        check_group_size(name, w.shape[-1], spec.group_size)
    if method.stat is not None and stat is None:
        raise ValueError(f"quantize: method '{spec.method}' needs calibration statistic "
                         f"'{method.stat}' for '{name}'; pass act_stats from collect_act_stats("
                         f"model, batches, hessian={method.stat == 'hessian'})")
    return method.quantize(w, spec, _adapt_stat(stat, w, method.stat, name), name)


def _adapt_stat(stat, w: torch.Tensor, want: str | None, name: str):
    """Let one collection serve every method: a Hessian (*lead, in, in) gives act_sq_mean as its
    diagonal (X^T X / n has mean x^2 on it). A per-channel statistic cannot stand in for a Hessian."""
    if stat is None:
        return None
    per_channel = (*w.shape[:-2], w.shape[-1])
    if tuple(stat.shape) == per_channel + (w.shape[-1],) and want != "hessian":
        return stat.diagonal(dim1=-2, dim2=-1)
    if want == "hessian" and tuple(stat.shape) != per_channel + (w.shape[-1],):
        raise ValueError(f"quantize: gptq needs a Hessian {per_channel + (w.shape[-1],)} for '{name}', "
                         f"got shape {tuple(stat.shape)}; use collect_act_stats(..., hessian=True)")
    return stat


# --------------------------------------------------------------------------- fake quant (QAT)


class _STE(torch.autograd.Function):
    """Forward returns the dequantized weight exactly; backward passes the gradient to w where
    the value fell inside the quantization range (zero where it was clamped)."""

    @staticmethod
    def forward(ctx, w, wq, mask):
        ctx.save_for_backward(mask)
        return wq

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  in_scale: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize(quantize_rtn(w)) with a straight-through gradient. w (*lead, out, in).
    Uses the export's code path, so the forward equals the exported weights bit for bit."""
    with torch.no_grad():
        qt = quantize_rtn(w, bits, group_size, symmetric, in_scale=in_scale)
        wq = qt.dequantize().to(w.dtype)
        ws = w.detach().float()
        if qt.in_scale is not None:
            ws = ws * _in_view(qt.in_scale)
        _, mask = _codes(_group(ws, group_size), qt.scales, qt.zeros, bits, symmetric, return_mask=True)
        mask = mask.reshape(w.shape).to(w.dtype)
    return _STE.apply(w, wq, mask)


# --------------------------------------------------------------------------- activations


def quantize_activations_int8(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token symmetric int8 fake quantization: x (..., d) -> dequantized (..., d)."""
    s = (x.abs().amax(-1, keepdim=True) / 127.0).clamp(min=1e-12)
    return torch.round(x / s).clamp(-127, 127) * s


# --------------------------------------------------------------------------- modules


class _QuantModule(nn.Module):
    """Shared machinery: buffers laid out from (shape, spec), and a lazy dequantization cache.

    The cache is a plain attribute (never in state_dict) keyed on the buffers' identity and
    version counters, so load_state_dict (in-place copy), .to() (new tensors) or any in-place
    edit invalidates it. The check is a few attribute reads, cheap next to a GEMV."""

    cache_weights = True

    def __init__(self, spec: QuantSpec):
        super().__init__()
        spec.validate()
        self.spec = spec
        self._shapes: dict[str, tuple[int, ...]] = {}  # prefix -> weight shape
        self._keys: dict[str, list[str]] = {}  # prefix -> its buffer names
        self._cache: dict[str, tuple] = {}  # slot -> (buffers, their versions, value)

    @property
    def _tensor_cls(self):
        return METHODS[self.spec.method].tensor_cls

    def _add_weight(self, prefix: str, shape) -> None:
        """Register empty buffers for one weight of `shape` under `prefix`."""
        self._shapes[prefix] = tuple(shape)
        self._keys[prefix] = []
        for field, (shp, dtype) in self._tensor_cls.layout(shape, self.spec).items():
            self.register_buffer(prefix + field, torch.zeros(shp, dtype=dtype))
            self._keys[prefix].append(prefix + field)

    def _set_weight(self, prefix: str, qt) -> None:
        tensors = qt.to_tensors(prefix)
        want = {prefix + f for f in self._tensor_cls.layout(self._shapes[prefix], self.spec)}
        if set(tensors) != want:  # e.g. an in_scale under a method whose layout has none
            raise ValueError(f"quantized tensor fields {sorted(tensors)} do not match the layout "
                             f"{sorted(want)} of method '{self.spec.method}'")
        for key, t in tensors.items():
            getattr(self, key).copy_(t)

    def _buffers_of(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k: self._buffers[k] for k in self._keys[prefix]}

    def qtensor(self, prefix: str):
        """The stored weight under `prefix` as a QTensor / NF4Tensor."""
        return self._tensor_cls.from_tensors(self._buffers_of(prefix), prefix, self._shapes[prefix], self.spec)

    def _cached(self, slot: str, prefix: str, build: Callable):
        """build() for the weight under `prefix`, reused until one of its buffers changes."""
        bufs = [self._buffers[k] for k in self._keys[prefix]]
        hit = self._cache.get(slot)
        if hit is not None and all(a is b and a._version == v for a, b, v in zip(hit[0], bufs, hit[1])):
            return hit[2]
        value = build()
        if self.cache_weights:
            self._cache[slot] = (bufs, [b._version for b in bufs], value)
        return value

    def dequantized(self, prefix: str) -> torch.Tensor:
        """float32 weight under `prefix` (cached)."""
        return self._cached(prefix, prefix, lambda: self.qtensor(prefix).dequantize())

    def storage_bits(self) -> int:
        """Bits of the quantized weights' storage (a float bias is not counted)."""
        return sum(self.qtensor(p).storage_bits() for p in self._shapes)

    def weight_numel(self) -> int:
        return sum(math.prod(s) for s in self._shapes.values())

    def _act(self, x):
        return quantize_activations_int8(x) if self.spec.act_int8 else x


class QuantLinear(_QuantModule):
    """Drop-in for nn.Linear: buffers weight_codes, weight_scales, ... (+ float bias)."""

    use_int4_kernel = False  # opt-in torch CPU int4 matmul when eligible (see int4_eligible)

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 name: str = "linear"):
        super().__init__(spec)
        self.in_features, self.out_features = in_features, out_features
        if spec.method in INT_METHODS:
            check_group_size(name, in_features, spec.group_size)
        self._add_weight("weight_", (out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, spec: QuantSpec, stat=None, name: str = "linear") -> "QuantLinear":
        m = cls(lin.in_features, lin.out_features, spec, lin.bias is not None, name)
        m._set_weight("weight_", quantize_tensor(lin.weight, spec, stat, name))
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach())
        return m

    def dequantized_weight(self) -> torch.Tensor:
        """float32 (out, in)."""
        return self.dequantized("weight_")

    def int4_eligible(self) -> bool:
        """torch's CPU int4 kernel needs 4-bit codes, out % 16 == 0 and groups of 32..256."""
        return (self.spec.method in INT_METHODS and self.spec.bits == 4
                and self.spec.group_size in INT4_KERNEL_GROUPS and self.out_features % 16 == 0)

    def forward(self, x):
        x = self._act(x)
        if self.use_int4_kernel and self.int4_eligible() and x.dtype == torch.float32:
            return int4_linear(x, self._int4_weight(), self.spec.group_size, self.bias)
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def _int4_weight(self):
        return self._cached("int4", "weight_", lambda: int4_pack(self.qtensor("weight_")))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, spec={self.spec}"


class QuantExperts(_QuantModule):
    """Drop-in for moe.Experts: buffers w1_* for (e, f, d) and w2_* for (e, d, f)."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, spec: QuantSpec, name: str = "experts"):
        super().__init__(spec)
        if spec.method in INT_METHODS:
            check_group_size(f"{name}.w1", d_model, spec.group_size)
            check_group_size(f"{name}.w2", d_ff, spec.group_size)
        self._add_weight("w1_", (n_experts, d_ff, d_model))
        self._add_weight("w2_", (n_experts, d_model, d_ff))

    @classmethod
    def from_experts(cls, ex: Experts, spec: QuantSpec, stats=(None, None), name: str = "experts"):
        e, f, d = ex.w1.shape
        m = cls(e, d, f, spec, name)
        m._set_weight("w1_", quantize_tensor(ex.w1, spec, stats[0], f"{name}.w1"))
        m._set_weight("w2_", quantize_tensor(ex.w2, spec, stats[1], f"{name}.w2"))
        return m

    @property
    def n_experts(self) -> int:
        return self._shapes["w1_"][0]

    def expert_weights(self, e: int):
        """-> w1 (f, d), w2 (d, f) float32."""
        return self.dequantized("w1_")[e], self.dequantized("w2_")[e]

    def run(self, e: int, x):
        """x (t, d) -> (t, d) through expert e."""
        w1, w2 = self.expert_weights(e)
        h = F.silu(F.linear(self._act(x), w1.to(x.dtype)))
        return F.linear(self._act(h), w2.to(x.dtype))


class QuantEmbedding(_QuantModule):
    """Drop-in for model.TiedEmbedding: one quantized (V, d) weight for lookup and LM head."""

    def __init__(self, vocab_size: int, d_model: int, spec: QuantSpec, name: str = "embedding"):
        super().__init__(spec)
        if spec.method in INT_METHODS:
            check_group_size(name, d_model, spec.group_size)
        self._add_weight("weight_", (vocab_size, d_model))

    @classmethod
    def from_embedding(cls, emb: TiedEmbedding, spec: QuantSpec, stat=None, name: str = "embedding"):
        v, d = emb.weight.shape
        m = cls(v, d, spec, name)
        m._set_weight("weight_", quantize_tensor(emb.weight, spec, stat, name))
        return m

    def forward(self, idx):
        return F.embedding(idx, self.dequantized("weight_"))

    def attend(self, h):
        return F.linear(self._act(h), self.dequantized("weight_").to(h.dtype))


# --------------------------------------------------------------------------- int4 kernel


def int4_pack(qt: QTensor):
    """QTensor 4-bit (N, K) -> (packed weight for torch's CPU int4 mm, scales_and_zeros (K/g, N, 2)).

    torch dequantizes (q - 8) * scale + zero; ours is (q - z) * s, so zero = (8 - z) * s (exact in
    fp32). An AWQ in_scale is not folded here; int4_linear divides the input by it instead."""
    q = qt.codes.to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    s = qt.scales.float()
    z = torch.full_like(s, 8.0) if qt.zeros is None else qt.zeros.float()
    sz = torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1).contiguous()
    in_scale = None if qt.in_scale is None else qt.in_scale.float()
    return packed, sz, in_scale


def int4_linear(x, weight, group_size: int, bias=None):
    """x (..., K) float32 through an `int4_pack`ed weight -> (..., N)."""
    packed, sz, in_scale = weight
    if in_scale is not None:
        x = x / in_scale
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, sz)
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


def set_int4_kernel(model: nn.Module, enabled: bool) -> int:
    """Turn the int4 kernel on/off for every eligible QuantLinear; returns how many use it."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.use_int4_kernel = enabled
            n += int(enabled and m.int4_eligible())
    return n


# --------------------------------------------------------------------------- model-level API

_KINDS = {"linear": nn.Linear, "experts": Experts, "embedding": TiedEmbedding}


def _kind_of(module: nn.Module) -> str | None:
    for kind, cls in _KINDS.items():
        if isinstance(module, cls):
            return kind
    return None


def _stat_for(act_stats: dict | None, key: str):
    return None if act_stats is None else act_stats.get(key)


def _quantize_module(name: str, module: nn.Module, spec: QuantSpec, act_stats):
    """Float module -> its quantized twin (stats keys: see collect_act_stats)."""
    kind = _kind_of(module)
    if kind == "linear":
        return QuantLinear.from_linear(module, spec, _stat_for(act_stats, name), name)
    if kind == "experts":
        stats = (_stat_for(act_stats, f"{name}.w1"), _stat_for(act_stats, f"{name}.w2"))
        return QuantExperts.from_experts(module, spec, stats, name)
    return QuantEmbedding.from_embedding(module, spec, _stat_for(act_stats, name), name)


def _empty_module(name: str, module: nn.Module, spec: QuantSpec):
    """Float module -> an empty quantized twin with the right buffer shapes."""
    kind = _kind_of(module)
    if kind == "linear":
        return QuantLinear(module.in_features, module.out_features, spec, module.bias is not None, name)
    if kind == "experts":
        e, f, d = module.w1.shape
        return QuantExperts(e, d, f, spec, name)
    if kind == "embedding":
        v, d = module.weight.shape
        return QuantEmbedding(v, d, spec, name)
    raise CheckpointError(f"quant config: module '{name}' is a {type(module).__name__}, "
                          f"which cannot be quantized (expected one of Linear, Experts, TiedEmbedding)")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, spec_for: Callable[[str, nn.Module], QuantSpec | None],
                   act_stats: dict | None = None) -> nn.Module:
    """Replace every Linear / Experts / TiedEmbedding for which spec_for(name, module) returns a
    spec with its quantized twin, in place. act_stats: see collect_act_stats. Returns model."""
    targets = [(n, m) for n, m in model.named_modules() if _kind_of(m) is not None]
    for name, module in targets:
        spec = spec_for(name, module)
        if spec is None:
            continue
        spec.validate()
        with torch.no_grad():
            _replace(model, name, _quantize_module(name, module, spec, act_stats))
    return model


def make_spec_for(spec: QuantSpec, keep_float: Iterable[str] = ("dt_proj",), fit_groups: bool = True):
    """A spec_for that uses `spec` everywhere except modules whose name ends in one of keep_float.
    With fit_groups, integer methods shrink group_size to the largest divisor of each input dim.

    dt_proj stays float by default: its input dim is dt_rank (4-8), so a group's fp16 scale and
    zero cost as much as the weights, and dt feeds exp(dt * A), the most error-sensitive spot."""
    keep = tuple(keep_float)

    def spec_for(name: str, module: nn.Module):
        if any(name == k or name.endswith("." + k) for k in keep):
            return None
        if not fit_groups or spec.method not in INT_METHODS:
            return spec
        kind = _kind_of(module)
        dims = {"linear": lambda m: [m.in_features], "embedding": lambda m: [m.weight.shape[1]],
                "experts": lambda m: [m.w1.shape[2], m.w2.shape[2]]}[kind](module)
        g = spec.group_size
        while any(d % g for d in dims):
            g = min(fit_group_size(d, g) for d in dims)
        return dataclasses.replace(spec, group_size=g)

    return spec_for


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized module with its float twin holding the dequantized weights, in
    place (the starting point for pruning or further training of a quantized artifact)."""
    from .model import TiedEmbedding as _Emb

    with torch.no_grad():
        for name, m in list(model.named_modules()):
            if isinstance(m, QuantLinear):
                lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
                lin.weight.copy_(m.dequantized_weight())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
                _replace(model, name, lin)
            elif isinstance(m, QuantExperts):
                e = m.n_experts
                w1, w2 = zip(*(m.expert_weights(i) for i in range(e)))
                ex = Experts(e, w1[0].shape[1], w1[0].shape[0])
                ex.w1.copy_(torch.stack(w1))
                ex.w2.copy_(torch.stack(w2))
                _replace(model, name, ex)
            elif isinstance(m, QuantEmbedding):
                w = m.dequantized("weight_")
                emb = _Emb(*w.shape)
                emb.weight.copy_(w)
                _replace(model, name, emb)
    return model


def quant_config(model: nn.Module) -> dict:
    """JSON-able description of the swaps: {"format", "version", "modules": {name: {kind, **spec}}}."""
    modules = {}
    for name, m in model.named_modules():
        kind = {QuantLinear: "linear", QuantExperts: "experts", QuantEmbedding: "embedding"}.get(type(m))
        if kind is not None:
            modules[name] = {"kind": kind, **m.spec.to_dict()}
    return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "modules": modules}


def apply_quant_config(model: nn.Module, cfg: dict) -> nn.Module:
    """Swap empty quantized modules (right buffer shapes, zero contents) into a freshly built float
    model as described by `cfg` (from quant_config), ready for load_state_dict(strict=True)."""
    fmt = cfg.get("format") if isinstance(cfg, dict) else cfg
    if fmt != CONFIG_FORMAT:
        raise CheckpointError(f"quant config: expected format '{CONFIG_FORMAT}', got {fmt!r}")
    if cfg.get("version") != CONFIG_VERSION:
        raise CheckpointError(f"quant config: version {cfg.get('version')!r} is not supported "
                              f"(this code reads version {CONFIG_VERSION})")
    for name, entry in cfg["modules"].items():
        entry = dict(entry)
        kind = entry.pop("kind", None)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"quant config names module '{name}', which the model does not have") from None
        if _kind_of(module) != kind:
            raise CheckpointError(f"quant config: '{name}' is a {type(module).__name__}, config says {kind}")
        spec = QuantSpec.from_dict(entry, f"quant_config.{name}")
        _replace(model, name, _empty_module(name, module, spec))
    return model


# --------------------------------------------------------------------------- calibration


class _Accum:
    """Running sum of x^2 per channel (or of x^T x) and the token count."""

    SAMPLE = 4096  # |x| values kept per batch for the percentile estimate

    def __init__(self, hessian: bool):
        self.hessian, self.total, self.count = hessian, None, 0
        self.absmax, self.samples = 0.0, []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        s = x.T @ x if self.hessian else (x * x).sum(0)
        self.total = s if self.total is None else self.total + s
        self.count += x.shape[0]
        a = x.abs().flatten().float()
        if a.numel():
            self.absmax = max(self.absmax, float(a.max()))
            step = max(1, a.numel() // self.SAMPLE)
            self.samples.append(a[::step].clone())  # a copy: a strided view would keep all of `a` alive

    def ranges(self, q: float = 0.999) -> tuple[float, float]:
        """(absmax, q-quantile of |x|) over what was added (from a strided sample)."""
        if not self.samples:
            return 0.0, 0.0
        return self.absmax, float(torch.quantile(torch.cat(self.samples)[:16_000_000], q))

    def mean(self, width: int) -> torch.Tensor:
        """-> (width,) mean x^2, or (width, width) X^T X / n; zeros if nothing was added."""
        if self.total is None:  # never reached (e.g. an expert no token was routed to)
            shape = (width, width) if self.hessian else (width,)
            return torch.zeros(shape)
        return (self.total / self.count).float()


@torch.no_grad()
def collect_act_stats(model: nn.Module, batches: Iterable[torch.Tensor], hessian: bool = False,
                      ranges: dict | None = None) -> dict:
    """Run the float model on token batches (b, l) and collect per-weight input statistics.

    Keys: a Linear's name -> (in,); '<experts>.w1' -> (e, d) and '<experts>.w2' -> (e, f) (per
    expert, over the tokens routed to it); the TiedEmbedding's name -> (d,) (inputs of `attend`).
    Values are mean x^2 (for awq/clipping), or with hessian=True X^T X / n with an extra in dim
    (for gptq). If `ranges` is a dict, it is filled with {key: (absmax, p99.9 of |x|)} per
    accumulator key (experts per expert: '<experts>.w1[e]')."""
    acc: dict[str, _Accum] = {}
    handles, patched = [], []

    def get(key):
        return acc.setdefault(key, _Accum(hessian))

    for name, m in model.named_modules():
        kind = _kind_of(m)
        if kind == "linear":
            handles.append(m.register_forward_pre_hook(lambda mod, args, key=name: get(key).add(args[0])))
        elif kind == "embedding":
            def attend(h, m=m, key=name):
                get(key).add(h)
                return type(m).attend(m, h)
            m.attend = attend
            patched.append((m, "attend"))
        elif kind == "experts":
            def run(e, x, m=m, key=name):
                get(f"{key}.w1[{e}]").add(x)
                get(f"{key}.w2[{e}]").add(F.silu(F.linear(x, m.w1[e])))
                return type(m).run(m, e, x)
            m.run = run
            patched.append((m, "run"))
    try:
        for idx in batches:
            model(idx)
    finally:
        for h in handles:
            h.remove()
        for m, attr in patched:
            delattr(m, attr)
    if ranges is not None:
        ranges.update({k: a.ranges() for k, a in acc.items()})
    return _finish_stats(model, acc, hessian)


def _finish_stats(model: nn.Module, acc: dict, hessian: bool) -> dict:
    """Accumulators -> mean statistics, stacking experts into (e, ...)."""
    out = {}
    for name, m in model.named_modules():
        kind = _kind_of(m)
        if kind in ("linear", "embedding") and name in acc:
            width = m.in_features if kind == "linear" else m.weight.shape[1]
            out[name] = acc[name].mean(width)
        elif kind == "experts":
            e, f, d = m.w1.shape
            for w, width in (("w1", d), ("w2", f)):
                out[f"{name}.{w}"] = torch.stack([acc.get(f"{name}.{w}[{i}]", _Accum(hessian)).mean(width)
                                                  for i in range(e)])
    return out

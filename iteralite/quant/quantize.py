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

The module swaps (QuantLinear, QuantExperts, QuantEmbedding), the model-level API and the
calibration statistics live in `qmodules.py`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from iteralite.io.errors import CheckpointError, ParamsError
from iteralite.quant.packing import ALLOWED_BITS, pack_bits, packed_nbytes, unpack_bits

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
        from iteralite.io.params import from_dict
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

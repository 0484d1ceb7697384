"""The quantization registry: one table from a stored format, and one from a precision, to
everything that knows about it. Every consumer (allocator, swap, checkpoint config, entropy
coder, native layout, fused path, peers) looks its format or precision up here.

A *format* (`FORMATS`, keyed by `QuantSpec.method`) is how one weight is stored:

    rtn, awq, gptq   integer codes + a scale (+ a zero-point) per group of input columns
                     (`intcodes.QTensor`), packed as a bitstream; they differ in how the codes
                     are chosen (round to nearest / activation-aware / Hessian-compensated)
    nf4              bitsandbytes' NormalFloat-4 nibbles + an absmax per block (`nf4.NF4Tensor`)
    fp16             IEEE half precision, no scales

A *precision* (`PRECISIONS`, keyed by its number) is what mixed precision allocates per unit:
ternary (number 1: levels -1, 0, +1 stored as 2-bit symmetric codes), int2, int3, int4, int8
(asymmetric round-to-nearest codes) and fp16 (number 16). `Precision.bits` is the stored code
width, `Precision.levels` the values a weight can take, `Precision.char` its character in a
mixed config. Adding a precision or a format is one entry here plus its tests.

Stored module classes live in `quant.modules`; they reach this table lazily (it imports them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from iteralite.io.errors import ParamsError
from iteralite.quant.awq import quantize_awq
from iteralite.quant.gptq import quantize_gptq
from iteralite.quant.intcodes import QTensor, quantize_rtn
from iteralite.quant.modules import (HalfEmbedding, HalfLinear, MixedExperts, QuantEmbedding, QuantExperts,
                                     QuantLinear)
from iteralite.quant.nf4 import NF4Tensor, pack_nibbles, quantize_nf4, unpack_nibbles
from iteralite.quant.packing import ALLOWED_BITS, pack_bits, packed_nbytes, unpack_bits
from iteralite.quant.spec import NF4_BLOCKSIZES, SCALE_BITS, QuantSpec, QuantSpecError, check_group_size, fit_group_size


# --------------------------------------------------------------------------- packings


@dataclass(frozen=True)
class Packing:
    """How a code buffer lays its codes out in bytes."""

    name: str
    unpack: Callable  # (packed uint8, bits, count) -> codes uint8 (count,)
    pack: Callable  # (codes uint8, bits) -> packed uint8
    nbytes: Callable  # (count, bits) -> packed bytes


BITSTREAM = Packing("bits", unpack_bits, pack_bits, packed_nbytes)
NIBBLES = Packing("nf4", lambda p, bits, count: unpack_nibbles(p), lambda c, bits: pack_nibbles(c),
                  lambda count, bits: count // 2)
PACKINGS = {p.name: p for p in (BITSTREAM, NIBBLES)}


# --------------------------------------------------------------------------- formats


def _qtensor_code_fields(shape, spec) -> list[tuple[str, int, int, str]]:
    *lead, out_dim, in_dim = shape
    out = [("codes", spec.bits, math.prod(shape), BITSTREAM.name)]
    if not spec.symmetric:
        out.append(("zeros", spec.bits, math.prod((*lead, out_dim, in_dim // spec.group_size)), BITSTREAM.name))
    return out


def _nf4_code_fields(shape, spec) -> list[tuple[str, int, int, str]]:
    return [("codes", 4, 2 * ((math.prod(shape) + 1) // 2), NIBBLES.name)]


def _check_int(spec: QuantSpec, bad: Callable) -> None:
    if isinstance(spec.bits, bool) or spec.bits not in ALLOWED_BITS:
        bad("bits", f"must be one of {', '.join(map(str, ALLOWED_BITS))}; got {spec.bits!r}")
    if isinstance(spec.group_size, bool) or not isinstance(spec.group_size, int) or spec.group_size < 1:
        bad("group_size", f"must be an integer >= 1; got {spec.group_size!r}")
    if isinstance(spec.scale_bits, bool) or spec.scale_bits not in SCALE_BITS:
        bad("scale_bits", f"must be 0 (fp16 scales) or 2..{SCALE_BITS[-1]} (a log grid); got {spec.scale_bits!r}")
    if spec.scale_bits and spec.method != "rtn":
        bad("scale_bits", f"(a scale grid) is supported by method rtn only; got method {spec.method!r}")


def _check_nf4(spec: QuantSpec, bad: Callable) -> None:
    if spec.bits != 4:
        bad("bits", f"must be 4 for method nf4; got {spec.bits!r}")
    if spec.group_size not in NF4_BLOCKSIZES:
        bad("group_size", f"for method nf4 is the bitsandbytes blocksize and must be one of "
                          f"{', '.join(map(str, NF4_BLOCKSIZES))}; got {spec.group_size!r}")


def _check_fp16(spec: QuantSpec, bad: Callable) -> None:
    if spec.bits != 16:
        bad("bits", f"must be 16 for method fp16; got {spec.bits!r}")


@dataclass(frozen=True)
class Format:
    """One stored format and everything that knows about it.

    quantize(w, spec, stat, name) -> tensor_cls instance; stat: the calibration statistic it
    needs ("act_sq_mean" (*lead, in), "hessian" (*lead, in, in)) or None. stored: float module
    kind -> stored module class. code_fields(shape, spec) -> [(field, bits, count, packing name)]:
    the buffers holding codes (what the entropy coder codes). native(module, slot) -> what the
    native layout reads (a QTensor of codes or an fp16 weight), None where it reads nothing.
    integer: codes with a scale and zero-point per group (fitted group sizes, scale grids).
    uniform_config: describable by the one-spec-per-module config ("iteralite-quant")."""

    name: str
    check: Callable  # (spec, bad(key, msg)) -> None: the format's own validation rules
    stored: Mapping[str, type]
    tensor_cls: type | None = None
    quantize: Callable | None = None
    stat: str | None = None
    code_fields: Callable | None = None
    native: Callable | None = None
    integer: bool = False
    uniform_config: bool = True


def _q_rtn(w, spec, stat, name):
    return quantize_rtn(w, spec.bits, spec.group_size, spec.symmetric, clip=spec.clip,
                        clip_weight=stat, name=name, scale_bits=spec.scale_bits)


def _q_awq(w, spec, stat, name):
    return quantize_awq(w, stat, spec.bits, spec.group_size, spec.symmetric, clip=spec.clip, name=name)


def _q_gptq(w, spec, stat, name):
    return quantize_gptq(w, stat, spec.bits, spec.group_size, spec.symmetric, name=name)


def _q_nf4(w, spec, stat, name):
    return quantize_nf4(w, spec.group_size)


_PACKED = {"linear": QuantLinear, "experts": QuantExperts, "embedding": QuantEmbedding}


def _integer(name: str, quantize: Callable, stat: str | None) -> Format:
    return Format(name, _check_int, _PACKED, QTensor, quantize, stat, _qtensor_code_fields,
                  native=lambda m, slot: m.qtensor(slot), integer=True)


FORMATS: dict[str, Format] = {f.name: f for f in (
    _integer("rtn", _q_rtn, None),
    _integer("awq", _q_awq, "act_sq_mean"),
    _integer("gptq", _q_gptq, "hessian"),
    Format("nf4", _check_nf4, _PACKED, NF4Tensor, _q_nf4, None, _nf4_code_fields),
    Format("fp16", _check_fp16, {"linear": HalfLinear, "embedding": HalfEmbedding},
           native=lambda m, slot: m.weight_half, uniform_config=False),
)}
INT_METHODS = tuple(n for n, f in FORMATS.items() if f.integer)
QUANT_METHODS = tuple(n for n, f in FORMATS.items() if f.quantize is not None)  # what a uniform stage picks
STORED_CLASSES = frozenset({c for f in FORMATS.values() for c in f.stored.values()} | {MixedExperts})


def format_of(method: str) -> Format:
    fmt = FORMATS.get(method)
    if fmt is None:
        raise QuantSpecError(f"quantize: unknown method {method!r}; known: {', '.join(FORMATS)}")
    return fmt


def is_stored(module: nn.Module) -> bool:
    """Whether `module` is a stored (quantized or fp16) module of this registry."""
    return type(module) in STORED_CLASSES


def module_format(module: nn.Module) -> Format | None:
    """The format a stored module holds (None for a float module and for MixedExperts, whose
    per-expert linears each have their own)."""
    if not is_stored(module) or isinstance(module, MixedExperts):
        return None
    return FORMATS[module.method]


def stored_kind(module: nn.Module) -> str | None:
    """'linear' | 'experts' | 'embedding' of a stored module with one format, else None."""
    fmt = module_format(module)
    if fmt is None:
        return None
    return next(k for k, c in fmt.stored.items() if c is type(module))


def stored_class(name: str, kind: str, spec) -> type:
    """The stored module class for a float module of `kind` under `spec` (a list of per-expert
    specs: MixedExperts)."""
    if isinstance(spec, (list, tuple)):
        if kind != "experts":
            raise QuantSpecError(f"'{name}': a list of per-expert specs only applies to experts, not a {kind}")
        return MixedExperts
    cls = format_of(spec.method).stored.get(kind)
    if cls is None:
        raise QuantSpecError(f"'{name}': method '{spec.method}' cannot store a {kind}")
    return cls


def quantize_tensor(w: torch.Tensor, spec: QuantSpec, stat: torch.Tensor | None = None,
                    name: str = "weight"):
    """Quantize w (out, in) or (e, out, in) with `spec`; stat is the calibration statistic the
    format needs (see Format.stat; rtn uses an optional act_sq_mean only to weight clipping)."""
    spec.validate()
    fmt = format_of(spec.method)
    if fmt.quantize is None:
        raise QuantSpecError(f"quantize: method '{spec.method}' stores weights as they are; it has no codes")
    if fmt.integer:
        check_group_size(name, w.shape[-1], spec.group_size)
    if fmt.stat is not None and stat is None:
        raise ValueError(f"quantize: method '{spec.method}' needs calibration statistic "
                         f"'{fmt.stat}' for '{name}'; pass act_stats from collect_act_stats("
                         f"model, batches, hessian={fmt.stat == 'hessian'})")
    return fmt.quantize(w, spec, _adapt_stat(stat, w, fmt.stat, name), name)


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


# --------------------------------------------------------------------------- precisions


@dataclass(frozen=True)
class Precision:
    """One mixed-precision choice: `number` is how params and allocations write it (the bit width;
    1 for ternary), `bits` the stored code width, `levels` the values a weight can take, `char`
    its character in a version-2 mixed config."""

    name: str
    number: int
    bits: int
    levels: int
    char: str
    method: str
    symmetric: bool = False

    def spec(self, in_dim: int | None, group_size: int, scale_bits: int = 0) -> QuantSpec:
        """The stored spec: the group size shrunk to the largest divisor of in_dim that is <=
        group_size (in_dim None: left to the module); scale_bits: an integer precision's scale
        grid (0: fp16 scales)."""
        if not format_of(self.method).integer:
            return QuantSpec(bits=self.bits, group_size=group_size, symmetric=False, method=self.method)
        g = group_size if in_dim is None else fit_group_size(in_dim, group_size)
        return QuantSpec(bits=self.bits, group_size=g, symmetric=self.symmetric, method=self.method,
                         scale_bits=scale_bits)


TERNARY = 1
PRECISIONS: dict[int, Precision] = {p.number: p for p in (
    Precision("ternary", TERNARY, 2, 3, "t", "rtn", symmetric=True),  # -1, 0, +1 x a scale per group
    *(Precision(f"int{b}", b, b, 2 ** b, str(b), "rtn") for b in (2, 3, 4, 8)),
    Precision("fp16", 16, 16, 2 ** 16, "h", "fp16"),
)}
INT_PRECISIONS = tuple(n for n, p in PRECISIONS.items() if n != TERNARY and format_of(p.method).integer)
_BY_NAME = {p.name: p.number for p in PRECISIONS.values()}
_BY_CHAR = {p.char: p.number for p in PRECISIONS.values()}


def parse_precision(value, where: str = "precision") -> int:
    """A precision's number (1 | 2 | 3 | 4 | 8 | 16, or as text, '8') or name (ternary | int2 |
    int3 | int4 | int8 | fp16) -> its number."""
    if isinstance(value, str) and value.strip().lower() in _BY_NAME:
        return _BY_NAME[value.strip().lower()]
    if isinstance(value, str) and value.strip().isdigit() and int(value) in PRECISIONS:
        return int(value)  # '8': a number written as text, accepted as params accept '3e-3' for a float
    if isinstance(value, int) and not isinstance(value, bool) and value in PRECISIONS:
        return value
    allowed = ", ".join([*map(str, PRECISIONS), *_BY_NAME])
    raise ParamsError(f"params: '{where}' has unknown precision {value!r}; allowed: {allowed}")


def precision_name(precision: int) -> str:
    """16 -> 'fp16', 4 -> 'int4', 1 -> 'ternary'."""
    return PRECISIONS[precision].name


def precision_spec(precision: int, in_dim: int | None, group_size: int, scale_bits: int = 0) -> QuantSpec:
    """The stored spec of a precision (see `Precision.spec`)."""
    return PRECISIONS[precision].spec(in_dim, group_size, scale_bits)


def precision_char(precision: int) -> str:
    return PRECISIONS[precision].char


def precision_of_char(char: str) -> int | None:
    """A mixed config character -> its precision's number, None when unknown."""
    return _BY_CHAR.get(char)


PRECISION_CHARS = "".join(_BY_CHAR)

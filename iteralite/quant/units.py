"""Mixed precision's allocation units, their exact stored bits, and the allocation -> per-unit
spec mapping that `quant.swap` and `quant.fake` consume.

A *precision* is an entry of `quant.registry.PRECISIONS`: ternary (1), int2, int3, int4, int8
(integer codes, round to nearest, groups of `group_size` input columns, packed as a bitstream by
`quant.packing`, plus a scale and a zero-point per group) or fp16 (16, no scales). Names such as
"int4" or "fp16" are accepted wherever a precision is read from params.

An *allocation* maps a unit name to a precision. Units are the weights a user thinks of:

    embedding                      the tied embedding / LM head (V, d), or (V, r) when factorised
    embed_in, head_proj            a factorised embedding's projections (r -> d after the lookup,
                                   d -> r before the head)
    layers.<i>.mixer.in_proj       SSM input projection      layers.<i>.mixer.x_proj   dt, B, C
    layers.<i>.mixer.dt_proj       dt projection (r -> h)    layers.<i>.mixer.out_proj SSM output
    layers.<i>.moe.router          the router (d -> e)       layers.<i>.moe.experts[<e>] expert e (w1, w2)

The depthwise conv, A_log, D, the dt bias and the norms stay FP32 (under 1% of the weights; the
scan's decay goes through exp, where errors grow).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from iteralite.io.errors import ParamsError
from iteralite.quant.intcodes import QTensor
from iteralite.quant.registry import parse_precision, precision_spec
from iteralite.quant.swap import quantize

GRID_HEAD_BITS = 40  # a scale grid's kind/bits byte and fp16 lo, hi (io.grid)


def weight_bits(shape, precision: int, group_size: int, scale_bits: int = 0) -> int:
    """Exact stored bits of one weight of `shape` (out, in) at `precision`, as laid out on disk
    (uncoded; with a scale grid, its scales as the compact layout's grid codec stores them)."""
    if precision == 16:
        return 16 * math.prod(shape)
    spec = precision_spec(precision, shape[-1], group_size)
    layout = QTensor.layout(shape, spec)
    bits = sum(8 * math.prod(s) * torch.empty((), dtype=dt).element_size() for s, dt in layout.values())
    if scale_bits:
        n = math.prod(layout["scales"][0])
        bits += 8 * math.ceil(n * scale_bits / 8) + GRID_HEAD_BITS - 16 * n
    return bits


def units(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Allocation units of a float IteraLite -> the shape of each unit's weight (experts: one
    matrix's shape; an expert holds two, (f, d) and (d, f))."""
    out = {"embedding": tuple(model.embedding.weight.shape)}
    if getattr(model.cfg, "embed_rank", 0):
        for part in ("embed_in", "head_proj"):
            out[part] = tuple(getattr(model, part).weight.shape)
    for i, layer in enumerate(model.layers):
        for part in ("in_proj", "x_proj", "dt_proj", "out_proj"):
            out[f"layers.{i}.mixer.{part}"] = tuple(getattr(layer.mixer, part).weight.shape)
        out[f"layers.{i}.moe.router"] = tuple(layer.moe.router.weight.shape)
        e, f, d = layer.moe.experts.w1.shape
        for j in range(e):
            out[f"layers.{i}.moe.experts[{j}]"] = (f, d)
    return out


def unit_numel(shape) -> int:
    """Weights in one unit (an expert's unit shape (f, d) stands for w1 and w2)."""
    return math.prod(shape)


def unit_bits(name: str, shape, precision: int, group_size: int, scale_bits: int = 0) -> int:
    """Exact stored bits of a unit at `precision`."""
    if "experts[" in name:
        f, d = shape
        return weight_bits((f, d), precision, group_size, scale_bits) + weight_bits((d, f), precision, group_size,
                                                                                   scale_bits)
    return weight_bits(shape, precision, group_size, scale_bits)


def unit_weight_count(name: str, shape) -> int:
    return 2 * math.prod(shape) if "experts[" in name else math.prod(shape)


def split_expert(name: str) -> tuple[str, int | None]:
    """'layers.0.moe.experts[3]' -> ('layers.0.moe.experts', 3); other names -> (name, None)."""
    if name.endswith("]") and "[" in name:
        base, idx = name[:-1].split("[")
        return base, int(idx)
    return name, None


def check_allocation(model: nn.Module, allocation: dict) -> dict[str, int]:
    """Every unit of `model` has exactly one known precision; returns the parsed allocation."""
    known = units(model)
    missing = sorted(set(known) - set(allocation))
    extra = sorted(set(allocation) - set(known))
    if missing or extra:
        raise ParamsError(f"allocation does not match the model: missing {missing[:5]}, unknown {extra[:5]}")
    return {k: parse_precision(v, f"allocation.{k}") for k, v in allocation.items()}



def allocation_spec_for(allocation: dict, group_size: int, scale_bits: int = 0):
    """A `quant.swap` spec_for that stores each unit at its allocated precision; experts get one
    spec per expert (fitted to each matrix's input dim by MixedExperts)."""
    by_module: dict[str, object] = {}
    experts: dict[str, dict[int, int]] = {}
    for name, p in allocation.items():
        base, e = split_expert(name)
        if e is None:
            by_module[name] = p
        else:
            experts.setdefault(base, {})[e] = p
    for base, by_e in experts.items():
        by_module[base] = [precision_spec(by_e[e], None, group_size, scale_bits) for e in sorted(by_e)]

    def spec_for(name: str, module: nn.Module):
        p = by_module.get(name)
        if p is None or isinstance(p, list):
            return p
        in_dim = module.weight.shape[1]  # Linear (out, in) and TiedEmbedding (V, d)
        return precision_spec(p, in_dim, group_size, scale_bits)

    return spec_for


def allocation_bits(model: nn.Module, allocation: dict, group_size: int) -> int:
    """Stored bits of every allocated unit (exactly what the packed buffers take)."""
    shapes = units(model)
    return sum(unit_bits(n, shapes[n], p, group_size) for n, p in check_allocation(model, allocation).items())


def quantize_allocation(model: nn.Module, allocation: dict, group_size: int, scale_bits: int = 0) -> nn.Module:
    """Store every unit of a float IteraLite at its allocated precision, in place (round to
    nearest: the same codes a fake-quantized forward of the allocation computes)."""
    return quantize(model, allocation_spec_for(check_allocation(model, allocation), group_size, scale_bits))

"""Mixed-precision storage: every quantizable weight at its own precision, really packed.

A *precision* is one of 2, 3, 4, 8 (integer codes, round to nearest, asymmetric, groups of
`group_size` input columns, packed as a bitstream by `packing.py`: four 2-bit codes per byte,
eight 3-bit codes in three bytes, two 4-bit codes per byte, one 8-bit code per byte, plus an fp16
scale and a zero-point at the code width per group) or 16 (IEEE fp16, no scales). Names such as
"int4" or "fp16" are accepted wherever a precision is read from params.

An *allocation* maps a unit name to a precision. Units are the weights a user thinks of:

    embedding                      the tied embedding / LM head (V, d)
    layers.<i>.mixer.in_proj       SSM input projection      layers.<i>.mixer.x_proj   dt, B, C
    layers.<i>.mixer.dt_proj       dt projection (r -> h)    layers.<i>.mixer.out_proj SSM output
    layers.<i>.moe.router          the router (d -> e)       layers.<i>.moe.experts[<e>] expert e (w1, w2)

The depthwise conv, A_log, D, the dt bias and the norms stay FP32 (under 1% of the weights; the
scan's decay goes through exp, where errors grow).

Integer units reuse `qmodules.QuantLinear` / `QuantEmbedding` (the int4 stage's format at another
code width); fp16 units are `HalfLinear` / `HalfEmbedding`; experts become `MixedExperts` (one
module per expert and matrix, so each expert has its own precision). The checkpoint's quant config
has format "iteralite-mixed"; `apply_mixed_config` rebuilds the empty modules before the strict
load; `checkpoint.build_model` picks it or the uniform loader from the stored format.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from iteralite.io.errors import CheckpointError, ParamsError
from iteralite.core.model import TiedEmbedding
from iteralite.core.moe import Experts
from iteralite.quant.quantize import QTensor, QuantSpec, fit_group_size, quantize_tensor
from iteralite.quant.qmodules import QuantEmbedding, QuantLinear

MIXED_FORMAT, MIXED_VERSION = "iteralite-mixed", 1
INT_PRECISIONS = (2, 3, 4, 8)
PRECISIONS = INT_PRECISIONS + (16,)
_NAMES = {**{f"int{b}": b for b in INT_PRECISIONS}, "fp16": 16}


def parse_precision(value, where: str = "precision") -> int:
    """2 | 3 | 4 | 8 | 16, or a name int2 | int3 | int4 | int8 | fp16 -> the bit width."""
    if isinstance(value, str) and value.strip().lower() in _NAMES:
        return _NAMES[value.strip().lower()]
    if isinstance(value, int) and not isinstance(value, bool) and value in PRECISIONS:
        return value
    allowed = ", ".join([*map(str, PRECISIONS), *_NAMES])
    raise ParamsError(f"params: '{where}' has unknown precision {value!r}; allowed: {allowed}")


def int_spec(bits: int, in_dim: int, group_size: int) -> QuantSpec:
    """The stored spec of an integer precision for a weight with input dim `in_dim` (the group size
    shrinks to the largest divisor of in_dim that is <= group_size)."""
    return QuantSpec(bits=bits, group_size=fit_group_size(in_dim, group_size), symmetric=False, method="rtn")


def weight_bits(shape, precision: int, group_size: int) -> int:
    """Exact stored bits of one weight of `shape` (out, in) at `precision`, as laid out on disk."""
    if precision == 16:
        return 16 * math.prod(shape)
    spec = int_spec(precision, shape[-1], group_size)
    return sum(8 * math.prod(s) * torch.empty((), dtype=dt).element_size()
               for s, dt in QTensor.layout(shape, spec).values())


# --------------------------------------------------------------------------- fp16 modules


class HalfLinear(nn.Module):
    """nn.Linear with its weight stored as fp16 (buffer `weight_half`), computed in float32."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_half", torch.zeros(out_features, in_features, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> "HalfLinear":
        m = cls(w.shape[1], w.shape[0], bias is not None)
        m.weight_half.copy_(half(w))
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_half.float()

    def forward(self, x):
        return F.linear(x, self.weight_half.to(x.dtype), self.bias)


class HalfEmbedding(nn.Module):
    """TiedEmbedding with an fp16 weight (lookup and LM head)."""

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__()
        self.register_buffer("weight_half", torch.zeros(vocab_size, d_model, dtype=torch.float16))

    def dequantized(self, prefix: str = "weight_") -> torch.Tensor:
        return self.weight_half.float()

    def forward(self, idx):
        return F.embedding(idx, self.weight_half.float())

    def attend(self, h):
        return F.linear(h, self.weight_half.to(h.dtype))


def half(w: torch.Tensor) -> torch.Tensor:
    """float -> fp16, refusing values fp16 cannot hold (they would become inf)."""
    w = w.detach().float()
    if not torch.isfinite(w).all() or w.abs().max() > 65504:
        raise ValueError("fp16 storage: the weight has values outside the fp16 range (|w| > 65504 or not finite)")
    return w.half()


# --------------------------------------------------------------------------- experts


def _linear_at(w: torch.Tensor, precision: int, group_size: int, name: str) -> nn.Module:
    """A weight (out, in) stored at `precision`: QuantLinear (integer) or HalfLinear (fp16)."""
    if precision == 16:
        return HalfLinear.from_weight(w)
    spec = int_spec(precision, w.shape[1], group_size)
    m = QuantLinear(w.shape[1], w.shape[0], spec, name=name)
    m._set_weight("weight_", quantize_tensor(w.detach().float(), spec, None, name))
    return m


def _empty_linear(in_dim: int, out_dim: int, precision: int, group_size: int, name: str) -> nn.Module:
    if precision == 16:
        return HalfLinear(in_dim, out_dim)
    return QuantLinear(in_dim, out_dim, int_spec(precision, in_dim, group_size), name=name)


class MixedExperts(nn.Module):
    """Drop-in for moe.Experts with a precision per expert: w1[e] (f, d) and w2[e] (d, f) are
    stored modules (QuantLinear or HalfLinear)."""

    def __init__(self, d_model: int, d_ff: int, precisions: list[int], group_size: int, name: str = "experts"):
        super().__init__()
        self.precisions, self.group_size = list(precisions), group_size
        self.w1 = nn.ModuleList(_empty_linear(d_model, d_ff, p, group_size, f"{name}[{e}].w1")
                                for e, p in enumerate(precisions))
        self.w2 = nn.ModuleList(_empty_linear(d_ff, d_model, p, group_size, f"{name}[{e}].w2")
                                for e, p in enumerate(precisions))

    @classmethod
    def from_experts(cls, ex: Experts, precisions: list[int], group_size: int, name: str = "experts"):
        e, f, d = ex.w1.shape
        m = cls(d, f, precisions, group_size, name)
        for i, p in enumerate(precisions):
            m.w1[i] = _linear_at(ex.w1[i], p, group_size, f"{name}[{i}].w1")
            m.w2[i] = _linear_at(ex.w2[i], p, group_size, f"{name}[{i}].w2")
        return m

    @property
    def n_experts(self) -> int:
        return len(self.w1)

    def expert_weights(self, e: int):
        """-> w1 (f, d), w2 (d, f) float32."""
        return self.w1[e].dequantized_weight(), self.w2[e].dequantized_weight()

    def run(self, e: int, x):
        """x (t, d) -> (t, d) through expert e."""
        return self.w2[e](F.silu(self.w1[e](x)))


# --------------------------------------------------------------------------- model level


def units(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Allocation units of a float IteraLite -> the shape of each unit's weight (experts: one
    matrix's shape; an expert holds two, (f, d) and (d, f))."""
    out = {"embedding": tuple(model.embedding.weight.shape)}
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


def unit_bits(name: str, shape, precision: int, group_size: int) -> int:
    """Exact stored bits of a unit at `precision`."""
    if "experts[" in name:
        f, d = shape
        return weight_bits((f, d), precision, group_size) + weight_bits((d, f), precision, group_size)
    return weight_bits(shape, precision, group_size)


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


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def quantize_mixed(model: nn.Module, allocation: dict, group_size: int) -> nn.Module:
    """Swap every unit of a float IteraLite for its stored module at the allocated precision, in
    place (round to nearest: the same codes a mixed fake-quantized QAT forward computes)."""
    alloc = check_allocation(model, allocation)
    experts: dict[str, list[int]] = {}
    for name, p in alloc.items():
        base, e = split_expert(name)
        if e is not None:
            experts.setdefault(base, []).append((e, p))
            continue
        m = model.get_submodule(name)
        if isinstance(m, TiedEmbedding):
            if p == 16:
                new = HalfEmbedding(*m.weight.shape)
                new.weight_half.copy_(half(m.weight))
            else:
                new = QuantEmbedding.from_embedding(m, int_spec(p, m.weight.shape[1], group_size), None, name)
        else:
            new = _linear_at(m.weight, p, group_size, name)
            if m.bias is not None:
                new.bias = nn.Parameter(m.bias.detach().clone())
        _replace(model, name, new)
    for base, pairs in experts.items():
        precs = [p for _, p in sorted(pairs)]
        _replace(model, base, MixedExperts.from_experts(model.get_submodule(base), precs, group_size, base))
    return model


def mixed_config(allocation: dict, group_size: int, model: nn.Module) -> dict:
    """The quant config stored in the checkpoint header (JSON)."""
    alloc = check_allocation(model, allocation)
    biases = {n: getattr(model.get_submodule(n), "bias", None) is not None
              for n in alloc if split_expert(n)[1] is None and n != "embedding"}
    return {"format": MIXED_FORMAT, "version": MIXED_VERSION, "group_size": group_size,
            "allocation": alloc, "bias": biases}


def is_mixed_config(quant: dict) -> bool:
    return isinstance(quant, dict) and quant.get("format") == MIXED_FORMAT


def apply_mixed_config(model: nn.Module, cfg: dict) -> nn.Module:
    """Swap empty stored modules into a freshly built float IteraLite as `cfg` describes."""
    if cfg.get("version") != MIXED_VERSION:
        raise CheckpointError(f"mixed quant config version {cfg.get('version')!r} is not supported "
                              f"(this code reads version {MIXED_VERSION})")
    g = cfg.get("group_size")
    if not isinstance(g, int) or g < 1:
        raise CheckpointError(f"mixed quant config: group_size {g!r} is not a positive integer")
    try:
        alloc = check_allocation(model, cfg.get("allocation") or {})
    except ParamsError as e:
        raise CheckpointError(f"mixed quant config: {e}") from None
    experts: dict[str, list] = {}
    for name, p in alloc.items():
        base, e = split_expert(name)
        if e is not None:
            experts.setdefault(base, []).append((e, p))
            continue
        m = model.get_submodule(name)
        if isinstance(m, TiedEmbedding):
            v, d = m.weight.shape
            new = HalfEmbedding(v, d) if p == 16 else QuantEmbedding(v, d, int_spec(p, d, g), name)
        else:
            new = _empty_linear(m.in_features, m.out_features, p, g, name)
            if cfg.get("bias", {}).get(name):
                new.bias = nn.Parameter(torch.zeros(m.out_features))
        _replace(model, name, new)
    for base, pairs in experts.items():
        ex = model.get_submodule(base)
        e, f, d = ex.w1.shape
        _replace(model, base, MixedExperts(d, f, [p for _, p in sorted(pairs)], g, base))
    return model


@torch.no_grad()
def to_float(model: nn.Module) -> nn.Module:
    """Replace every stored module (mixed or uniform) with its float twin, in place."""
    from iteralite.quant.qmodules import dequantize_model

    for name, m in list(model.named_modules()):  # experts first: their children are stored linears too
        if isinstance(m, MixedExperts):
            w1, w2 = zip(*(m.expert_weights(i) for i in range(m.n_experts)))
            ex = Experts(m.n_experts, w1[0].shape[1], w1[0].shape[0])
            ex.w1.copy_(torch.stack(w1))
            ex.w2.copy_(torch.stack(w2))
            _replace(model, name, ex)
    for name, m in list(model.named_modules()):
        if isinstance(m, HalfLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.copy_(m.dequantized_weight())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
            _replace(model, name, lin)
        elif isinstance(m, HalfEmbedding):
            emb = TiedEmbedding(*m.weight_half.shape)
            emb.weight.copy_(m.dequantized())
            _replace(model, name, emb)
    return dequantize_model(model)  # the uniform modules (QuantLinear, QuantEmbedding, QuantExperts)


def allocation_bits(model: nn.Module, allocation: dict, group_size: int) -> int:
    """Stored bits of every allocated unit (exactly what the packed buffers take)."""
    shapes = units(model)
    return sum(unit_bits(n, shapes[n], p, group_size) for n, p in check_allocation(model, allocation).items())


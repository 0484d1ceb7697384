"""Packed weight modules: drop-ins for nn.Linear, moe.Experts and model.TiedEmbedding that hold
only their stored form (their state_dict) and compute in float32.

- `QuantLinear`, `QuantExperts`, `QuantEmbedding`: integer codes or NF4 (a `QuantSpec` with an
  integer method or "nf4"), dequantized lazily into a non-persistent cache.
- `HalfLinear`, `HalfEmbedding`: fp16 storage (method "fp16").
- `MixedExperts`: one stored linear per expert and matrix, so each expert has its own spec.

Every class has `from_float(module, spec, stats, name)` (quantize a float module), `empty(module,
spec, name)` (the right buffers, zero contents, for a strict load) and `to_float()` (its float
twin); `quant.registry` maps each format to its classes.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from iteralite.core.model import TiedEmbedding
from iteralite.core.moe import Experts
from iteralite.quant.fake import quantize_activations_int8
from iteralite.quant.kernels import int4_eligible, int4_linear, int4_pack
from iteralite.quant.spec import QuantSpec, check_group_size, fitted


def _registry():
    """`quant.registry`, imported on use: it imports the classes below."""
    from iteralite.quant import registry
    return registry

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
    def method(self) -> str:
        """The registry format this module stores (`quant.registry.FORMATS`)."""
        return self.spec.method

    @property
    def _tensor_cls(self):
        return _registry().format_of(self.spec.method).tensor_cls

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
        if _registry().format_of(spec.method).integer:
            check_group_size(name, in_features, spec.group_size)
        self._add_weight("weight_", (out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def create(cls, in_dim: int, out_dim: int, bias: bool, spec: QuantSpec, name: str = "linear") -> "QuantLinear":
        return cls(in_dim, out_dim, spec, bias, name)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec, stat=None,
                    name: str = "linear") -> "QuantLinear":
        m = cls(w.shape[1], w.shape[0], spec, bias is not None, name)
        m._set_weight("weight_", _registry().quantize_tensor(w, spec, stat, name))
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m

    @classmethod
    def from_float(cls, lin: nn.Linear, spec: QuantSpec, stats=None, name: str = "linear") -> "QuantLinear":
        return cls.from_weight(lin.weight, lin.bias, spec, _stat(stats, name), name)

    @classmethod
    def empty(cls, lin: nn.Linear, spec: QuantSpec, name: str = "linear") -> "QuantLinear":
        return cls(lin.in_features, lin.out_features, spec, lin.bias is not None, name)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 (out, in)."""
        return self.dequantized("weight_")

    def int4_eligible(self) -> bool:
        return int4_eligible(self.spec, self.out_features)

    def forward(self, x):
        x = self._act(x)
        if self.use_int4_kernel and self.int4_eligible() and x.dtype == torch.float32:
            return int4_linear(x, self._int4_weight(), self.spec.group_size, self.bias)
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def _int4_weight(self):
        return self._cached("int4", "weight_", lambda: int4_pack(self.qtensor("weight_")))

    def to_float(self) -> nn.Linear:
        return _float_linear(self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, spec={self.spec}"


class QuantExperts(_QuantModule):
    """Drop-in for moe.Experts: buffers w1_* for (e, f, d) and w2_* for (e, d, f)."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, spec: QuantSpec, name: str = "experts"):
        super().__init__(spec)
        if _registry().format_of(spec.method).integer:
            check_group_size(f"{name}.w1", d_model, spec.group_size)
            check_group_size(f"{name}.w2", d_ff, spec.group_size)
        self._add_weight("w1_", (n_experts, d_ff, d_model))
        self._add_weight("w2_", (n_experts, d_model, d_ff))

    @classmethod
    def from_float(cls, ex: Experts, spec: QuantSpec, stats=None, name: str = "experts"):
        m = cls.empty(ex, spec, name)
        m._set_weight("w1_", _registry().quantize_tensor(ex.w1, spec, _stat(stats, f"{name}.w1"), f"{name}.w1"))
        m._set_weight("w2_", _registry().quantize_tensor(ex.w2, spec, _stat(stats, f"{name}.w2"), f"{name}.w2"))
        return m

    @classmethod
    def empty(cls, ex: Experts, spec: QuantSpec, name: str = "experts") -> "QuantExperts":
        e, f, d = ex.w1.shape
        return cls(e, d, f, spec, name)

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

    def to_float(self) -> Experts:
        return _float_experts(self)


class QuantEmbedding(_QuantModule):
    """Drop-in for model.TiedEmbedding: one quantized (V, d) weight for lookup and LM head."""

    def __init__(self, vocab_size: int, d_model: int, spec: QuantSpec, name: str = "embedding"):
        super().__init__(spec)
        if _registry().format_of(spec.method).integer:
            check_group_size(name, d_model, spec.group_size)
        self._add_weight("weight_", (vocab_size, d_model))

    @classmethod
    def from_float(cls, emb: TiedEmbedding, spec: QuantSpec, stats=None, name: str = "embedding"):
        m = cls.empty(emb, spec, name)
        m._set_weight("weight_", _registry().quantize_tensor(emb.weight, spec, _stat(stats, name), name))
        return m

    @classmethod
    def empty(cls, emb: TiedEmbedding, spec: QuantSpec, name: str = "embedding") -> "QuantEmbedding":
        return cls(*emb.weight.shape, spec, name)

    def forward(self, idx):
        return F.embedding(idx, self.dequantized("weight_"))

    def attend(self, h):
        return F.linear(self._act(h), self.dequantized("weight_").to(h.dtype))

    def to_float(self) -> TiedEmbedding:
        return _float_embedding(self.dequantized("weight_"))


# --------------------------------------------------------------------------- fp16


def half(w: torch.Tensor) -> torch.Tensor:
    """float -> fp16, refusing values fp16 cannot hold (they would become inf)."""
    w = w.detach().float()
    if not torch.isfinite(w).all() or w.abs().max() > 65504:
        raise ValueError("fp16 storage: the weight has values outside the fp16 range (|w| > 65504 or not finite)")
    return w.half()


class HalfLinear(nn.Module):
    """nn.Linear with its weight stored as fp16 (buffer `weight_half`), computed in float32."""

    method = "fp16"  # its registry format

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_half", torch.zeros(out_features, in_features, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def create(cls, in_dim: int, out_dim: int, bias: bool, spec=None, name: str = "linear") -> "HalfLinear":
        return cls(in_dim, out_dim, bias)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None = None, spec=None, stat=None,
                    name: str = "linear") -> "HalfLinear":
        m = cls(w.shape[1], w.shape[0], bias is not None)
        m.weight_half.copy_(half(w))
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m

    @classmethod
    def from_float(cls, lin: nn.Linear, spec=None, stats=None, name: str = "linear") -> "HalfLinear":
        return cls.from_weight(lin.weight, lin.bias)

    @classmethod
    def empty(cls, lin: nn.Linear, spec=None, name: str = "linear") -> "HalfLinear":
        return cls(lin.in_features, lin.out_features, lin.bias is not None)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_half.float()

    def forward(self, x):
        return F.linear(x, self.weight_half.to(x.dtype), self.bias)

    def to_float(self) -> nn.Linear:
        return _float_linear(self.dequantized_weight(), self.bias)


class HalfEmbedding(nn.Module):
    """TiedEmbedding with an fp16 weight (lookup and LM head)."""

    method = "fp16"  # its registry format

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__()
        self.register_buffer("weight_half", torch.zeros(vocab_size, d_model, dtype=torch.float16))

    @classmethod
    def from_float(cls, emb: TiedEmbedding, spec=None, stats=None, name: str = "embedding") -> "HalfEmbedding":
        m = cls.empty(emb)
        m.weight_half.copy_(half(emb.weight))
        return m

    @classmethod
    def empty(cls, emb: TiedEmbedding, spec=None, name: str = "embedding") -> "HalfEmbedding":
        return cls(*emb.weight.shape)

    def dequantized(self, prefix: str = "weight_") -> torch.Tensor:
        return self.weight_half.float()

    def forward(self, idx):
        return F.embedding(idx, self.weight_half.float())

    def attend(self, h):
        return F.linear(h, self.weight_half.to(h.dtype))

    def to_float(self) -> TiedEmbedding:
        return _float_embedding(self.dequantized())


# --------------------------------------------------------------------------- per-expert specs


class MixedExperts(nn.Module):
    """Drop-in for moe.Experts with a spec per expert: w1[e] (f, d) and w2[e] (d, f) are stored
    linears (QuantLinear or HalfLinear), each with its spec's group size fitted to its input dim."""

    def __init__(self, d_model: int, d_ff: int, specs: list[QuantSpec], name: str = "experts"):
        super().__init__()
        self.specs = list(specs)
        self.w1 = nn.ModuleList(self._empty(d_model, d_ff, s, f"{name}[{e}].w1") for e, s in enumerate(specs))
        self.w2 = nn.ModuleList(self._empty(d_ff, d_model, s, f"{name}[{e}].w2") for e, s in enumerate(specs))

    @staticmethod
    def _empty(in_dim: int, out_dim: int, spec: QuantSpec, name: str) -> nn.Module:
        return _linear_class(spec).create(in_dim, out_dim, False, fitted(spec, in_dim), name)

    @classmethod
    def from_float(cls, ex: Experts, specs: list[QuantSpec], stats=None, name: str = "experts"):
        m = cls.empty(ex, specs, name)
        for i, s in enumerate(specs):
            for slot in ("w1", "w2"):
                w = getattr(ex, slot)[i].detach().float()
                getattr(m, slot)[i] = _linear_class(s).from_weight(
                    w, None, fitted(s, w.shape[1]), None, f"{name}[{i}].{slot}")
        return m

    @classmethod
    def empty(cls, ex: Experts, specs: list[QuantSpec], name: str = "experts") -> "MixedExperts":
        e, f, d = ex.w1.shape
        return cls(d, f, specs, name)

    @property
    def n_experts(self) -> int:
        return len(self.w1)

    def expert_weights(self, e: int):
        """-> w1 (f, d), w2 (d, f) float32."""
        return self.w1[e].dequantized_weight(), self.w2[e].dequantized_weight()

    def run(self, e: int, x):
        """x (t, d) -> (t, d) through expert e."""
        return self.w2[e](F.silu(self.w1[e](x)))

    def to_float(self) -> Experts:
        return _float_experts(self)


def _linear_class(spec: QuantSpec) -> type:
    return _registry().stored_class("expert linear", "linear", spec)


# --------------------------------------------------------------------------- float twins


def _stat(stats, key: str):
    return None if stats is None else stats.get(key)


@torch.no_grad()
def _float_linear(w: torch.Tensor, bias) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    lin.weight.copy_(w)
    if bias is not None:
        lin.bias.copy_(bias)
    return lin


@torch.no_grad()
def _float_embedding(w: torch.Tensor) -> TiedEmbedding:
    emb = TiedEmbedding(*w.shape)
    emb.weight.copy_(w)
    return emb


@torch.no_grad()
def _float_experts(m) -> Experts:
    w1, w2 = zip(*(m.expert_weights(i) for i in range(m.n_experts)))
    ex = Experts(m.n_experts, w1[0].shape[1], w1[0].shape[0])
    ex.w1.copy_(torch.stack(w1))
    ex.w2.copy_(torch.stack(w2))
    return ex

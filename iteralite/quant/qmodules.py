"""Quantization as a module swap, the model-level API and calibration statistics.

`QuantLinear`, `QuantExperts` and `QuantEmbedding` are drop-ins for nn.Linear, moe.Experts and
model.TiedEmbedding that hold only packed buffers (their state_dict) and dequantize lazily into a
non-persistent cache. `quantize_model` swaps them in; `quant_config(model)` describes the swaps as
JSON and `apply_quant_config` rebuilds empty quantized modules in a freshly built float model, so
a loader can do: build -> apply_quant_config -> load_state_dict(strict=True).
`collect_act_stats` gathers the per-weight input statistics that awq, gptq and clipping use.
The tensor-level quantizers live in `quantize.py`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from iteralite.io.errors import CheckpointError
from iteralite.core.model import TiedEmbedding
from iteralite.core.moe import Experts
from iteralite.quant.quantize import (CONFIG_FORMAT, CONFIG_VERSION, INT4_KERNEL_GROUPS, INT_METHODS, METHODS, QTensor,
                       QuantSpec, check_group_size, fit_group_size, quantize_activations_int8, quantize_tensor)

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


def kind_of(module: nn.Module) -> str | None:
    """'linear' | 'experts' | 'embedding' for a float module quantization can swap, else None."""
    for kind, cls in _KINDS.items():
        if isinstance(module, cls):
            return kind
    return None


def quantizable_modules(model: nn.Module) -> list[str]:
    """Names of the float modules `quantize_model` can swap (its target set), in model order."""
    return [n for n, m in model.named_modules() if kind_of(m) is not None]


def _stat_for(act_stats: dict | None, key: str):
    return None if act_stats is None else act_stats.get(key)


def _quantize_module(name: str, module: nn.Module, spec: QuantSpec, act_stats):
    """Float module -> its quantized twin (stats keys: see collect_act_stats)."""
    kind = kind_of(module)
    if kind == "linear":
        return QuantLinear.from_linear(module, spec, _stat_for(act_stats, name), name)
    if kind == "experts":
        stats = (_stat_for(act_stats, f"{name}.w1"), _stat_for(act_stats, f"{name}.w2"))
        return QuantExperts.from_experts(module, spec, stats, name)
    return QuantEmbedding.from_embedding(module, spec, _stat_for(act_stats, name), name)


def _empty_module(name: str, module: nn.Module, spec: QuantSpec):
    """Float module -> an empty quantized twin with the right buffer shapes."""
    kind = kind_of(module)
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
    targets = [(n, m) for n, m in model.named_modules() if kind_of(m) is not None]
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
        kind = kind_of(module)
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
    from iteralite.core.model import TiedEmbedding as _Emb

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
        if kind_of(module) != kind:
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
        kind = kind_of(m)
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
        kind = kind_of(m)
        if kind in ("linear", "embedding") and name in acc:
            width = m.in_features if kind == "linear" else m.weight.shape[1]
            out[name] = acc[name].mean(width)
        elif kind == "experts":
            e, f, d = m.w1.shape
            for w, width in (("w1", d), ("w2", f)):
                out[f"{name}.{w}"] = torch.stack([acc.get(f"{name}.{w}[{i}]", _Accum(hessian)).mean(width)
                                                  for i in range(e)])
    return out

"""Quantization as a module swap: the one path from a float model to a stored one and back.

`quantize(model, spec_for)` replaces every quantizable float module (nn.Linear, moe.Experts,
model.TiedEmbedding) for which `spec_for(name, module)` returns a spec with its stored twin;
`build_empty(model, spec_for)` puts in the same modules with zero contents (what a loader fills
with a strict `load_state_dict`); `dequantize_model` turns every stored module back into its float
twin. A spec is a `QuantSpec`, or for experts a list of one spec per expert (mixed precision).

The stored class per module kind comes from `quant.registry` (integer methods and nf4: the packed
`Quant*` modules; fp16: the `Half*` modules; a per-expert list: `MixedExperts`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch
from torch import nn

from iteralite.core.model import TiedEmbedding
from iteralite.core.moe import Experts
from iteralite.quant import registry
from iteralite.quant.spec import QuantSpec, fit_group_size

KINDS = {"linear": nn.Linear, "experts": Experts, "embedding": TiedEmbedding}
SpecFor = Callable[[str, nn.Module], "QuantSpec | list[QuantSpec] | None"]


def kind_of(module: nn.Module) -> str | None:
    """'linear' | 'experts' | 'embedding' for a float module quantization can swap, else None."""
    for kind, cls in KINDS.items():
        if isinstance(module, cls):
            return kind
    return None


def quantizable_modules(model: nn.Module) -> list[str]:
    """Names of the float modules `quantize` can swap (its target set), in model order."""
    return [n for n, m in model.named_modules() if kind_of(m) is not None]


def _validate(spec) -> None:
    for s in spec if isinstance(spec, (list, tuple)) else [spec]:
        s.validate()


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` is (same place in its parent's order)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _swap(model: nn.Module, spec_for: SpecFor, make: Callable) -> nn.Module:
    targets = [(n, m) for n, m in model.named_modules() if kind_of(m) is not None]
    for name, module in targets:
        spec = spec_for(name, module)
        if spec is None:
            continue
        _validate(spec)
        with torch.no_grad():
            replace_module(model, name, make(registry.stored_class(name, kind_of(module), spec), name, module, spec))
    return model


def quantize(model: nn.Module, spec_for: SpecFor, act_stats: dict | None = None) -> nn.Module:
    """Quantize every module `spec_for` names, in place; act_stats: see `collect_act_stats`."""
    return _swap(model, spec_for, lambda cls, name, m, spec: cls.from_float(m, spec, act_stats, name))


def build_empty(model: nn.Module, spec_for: SpecFor) -> nn.Module:
    """Swap in empty stored modules (right buffer shapes, zero contents), ready for a strict load."""
    return _swap(model, spec_for, lambda cls, name, m, spec: cls.empty(m, spec, name))


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every stored module with its float twin holding the dequantized weights, in place
    (the starting point for pruning, fine-tuning or fused inference of any artifact)."""
    done: list[str] = []
    with torch.no_grad():
        for name, m in list(model.named_modules()):
            if registry.is_stored(m) and not any(name.startswith(d + ".") for d in done):
                replace_module(model, name, m.to_float())
                done.append(name)
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
        if not fit_groups or not registry.format_of(spec.method).integer:
            return spec
        g = spec.group_size
        dims = input_dims(module)
        while any(d % g for d in dims):
            g = min(fit_group_size(d, g) for d in dims)
        return dataclasses.replace(spec, group_size=g)

    return spec_for


_INPUT_DIMS = {"linear": lambda m: [m.in_features], "embedding": lambda m: [m.weight.shape[1]],
               "experts": lambda m: [m.w1.shape[2], m.w2.shape[2]]}


def input_dims(module: nn.Module) -> list[int]:
    """The input dims of a float module's weights (experts: d for w1, f for w2)."""
    return _INPUT_DIMS[kind_of(module)](module)

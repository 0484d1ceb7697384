"""The quant config stored in a checkpoint header, and the registry that rebuilds a model from it.

Two stored formats, one rebuild path (`quant.swap.build_empty`):
- "iteralite-quant": {"format", "version", "modules": {name: {"kind", **QuantSpec}}}, one spec per
  module (uniform int4 and its methods, QAT, pruned and fine-tuned artifacts);
- "iteralite-mixed": a precision per allocation unit (see `quant.units`). Version 2 (written now):
  {"format", "version", "group_size", "precisions": "322..."}, one character per unit in
  `units(model)` order (`registry.Precision.char`), so the header stays ~100 bytes however many units there
  are; version 1 (still read): {"allocation": {unit: precision}, "bias": {module: bool}}.
`CONFIG_FORMATS` maps the format name to its reader (stored config + float model -> spec_for);
`apply_config` is what the checkpoint loader calls.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from iteralite.io.errors import CheckpointError, ParamsError
from iteralite.quant import registry
from iteralite.quant.spec import CONFIG_FORMAT, CONFIG_VERSION, QuantSpec
from iteralite.quant.swap import build_empty, kind_of
from iteralite.quant.units import allocation_spec_for, check_allocation, units

MIXED_FORMAT, MIXED_VERSION = "iteralite-mixed", 2


def quant_config(model: nn.Module) -> dict:
    """The "iteralite-quant" description of a model's stored modules (one spec each)."""
    modules = {}
    for name, m in model.named_modules():
        if not registry.is_stored(m):
            continue
        fmt = registry.module_format(m)
        if fmt is not None and fmt.uniform_config:
            modules[name] = {"kind": registry.stored_kind(m), **m.spec.to_dict()}
        else:
            raise ValueError(f"'{name}' is a {type(m).__name__}: describe a mixed-precision model with mixed_config")
    return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "modules": modules}


def mixed_config(allocation: dict, group_size: int, model: nn.Module) -> dict:
    """The "iteralite-mixed" description of an allocation on float model `model`."""
    alloc = check_allocation(model, allocation)
    return {"format": MIXED_FORMAT, "version": MIXED_VERSION, "group_size": group_size,
            "precisions": "".join(registry.precision_char(alloc[u]) for u in units(model))}


def _mixed_allocation(cfg: dict, model: nn.Module) -> dict:
    """The {unit: precision} a stored mixed config describes (version 1 or 2)."""
    if cfg.get("version") == 1:
        alloc = cfg.get("allocation") or {}
        for name, has_bias in (cfg.get("bias") or {}).items():
            if name in alloc and bool(has_bias) != (getattr(model.get_submodule(name), "bias", None) is not None):
                raise CheckpointError(f"mixed quant config: bias of '{name}' disagrees with the model config")
        return alloc
    _check_version(cfg, MIXED_VERSION, "mixed quant config")
    text, names = cfg.get("precisions"), list(units(model))
    if not isinstance(text, str) or len(text) != len(names):
        raise CheckpointError(f"mixed quant config: 'precisions' must be a string of {len(names)} characters "
                              f"(one per unit), got {text!r:.80}")
    bad = sorted(c for c in set(text) if registry.precision_of_char(c) is None)
    if bad:
        raise CheckpointError(f"mixed quant config: unknown precision characters {bad} "
                              f"(known: {registry.PRECISION_CHARS})")
    return {n: registry.precision_of_char(c) for n, c in zip(names, text)}


def _check_version(cfg: dict, version: int, what: str) -> None:
    if cfg.get("version") != version:
        raise CheckpointError(f"{what} version {cfg.get('version')!r} is not supported "
                              f"(this code reads version {version})")


def _read_uniform(cfg: dict, model: nn.Module) -> Callable:
    _check_version(cfg, CONFIG_VERSION, "quant config")
    specs = {}
    for name, entry in cfg["modules"].items():
        entry = dict(entry)
        kind = entry.pop("kind", None)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"quant config names module '{name}', which the model does not have") from None
        if kind_of(module) != kind:
            raise CheckpointError(f"quant config: '{name}' is a {type(module).__name__}, config says {kind}")
        specs[name] = QuantSpec.from_dict(entry, f"quant_config.{name}")
    return lambda name, module: specs.get(name)


def _read_mixed(cfg: dict, model: nn.Module) -> Callable:
    g = cfg.get("group_size")
    if not isinstance(g, int) or isinstance(g, bool) or g < 1:
        raise CheckpointError(f"mixed quant config: group_size {g!r} is not a positive integer")
    try:
        alloc = check_allocation(model, _mixed_allocation(cfg, model))
    except ParamsError as e:
        raise CheckpointError(f"mixed quant config: {e}") from None
    return allocation_spec_for(alloc, g)


CONFIG_FORMATS: dict[str, Callable[[dict, nn.Module], Callable]] = {
    CONFIG_FORMAT: _read_uniform,
    MIXED_FORMAT: _read_mixed,
}


def apply_config(model: nn.Module, cfg: dict) -> nn.Module:
    """Swap empty stored modules into a freshly built float model as the stored `cfg` describes,
    ready for load_state_dict(strict=True). The format picks the reader from CONFIG_FORMATS."""
    fmt = cfg.get("format") if isinstance(cfg, dict) else cfg
    reader = CONFIG_FORMATS.get(fmt)
    if reader is None:
        raise CheckpointError(f"quant config: unknown format {fmt!r}; known: {', '.join(CONFIG_FORMATS)}")
    return build_empty(model, reader(cfg, model))

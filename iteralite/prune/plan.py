"""Planning which units to remove: protection patterns, the plan types (`LayerPlan`,
`PrunePlan`) and `plan`, which allocates a cumulative ratio over the layers (by the allocation
mode's weights, from `ALLOCATION_WEIGHTS`), splits each layer's share into whole experts, heads
and expert-channel steps, and picks the lowest-scored units. Planning never modifies the model.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from iteralite.io.params import check
from iteralite.prune.config import ALLOCATIONS, DEFAULT_PROTECTED, check_layer_ratios, check_ratio
from iteralite.prune.counting import head_params, layer_count, layer_shapes, prunable_params, require_float
from iteralite.prune.importance import Scores

# --------------------------------------------------------------------------- protection


def _unit_names(model, i: int, kind: str) -> list[str]:
    """Module and parameter names a unit kind of layer i touches."""
    layer = model.layers[i]
    mods = {"heads": [("mixer", layer.mixer)], "channels": [("moe.experts", layer.moe.experts)],
            "experts": [("moe.router", layer.moe.router), ("moe.experts", layer.moe.experts)]}[kind]
    names = []
    for prefix, m in mods:
        full = f"layers.{i}.{prefix}"
        names += [f"{full}.{n}" if n else full for n, _ in m.named_modules()]
        names += [f"{full}.{n}" for n, _ in m.named_parameters()]
    return names


def _matches(name: str, pattern: str) -> bool:
    """A pattern protects the module it names and everything inside it (fnmatch wildcards allowed)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def protected_by(model, i: int, kind: str, protected: Sequence[str]) -> str | None:
    """The first pattern that protects this unit kind of layer i (None if unprotected).
    A pattern naming a container (e.g. 'layers.0') protects what is inside; one naming a part
    (e.g. 'layers.0.mixer.out_proj') protects every unit that would cut that part."""
    names = _unit_names(model, i, kind)
    return next((pat for pat in protected if any(_matches(n, pat) for n in names)), None)


def check_protected(model, protected: Sequence[str]) -> None:
    """Every pattern must name at least one module or parameter of the model."""
    names = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()]
    for pattern in protected:
        check(isinstance(pattern, str) and any(_matches(n, pattern) for n in names), "prune", "protected",
              f"entry {pattern!r} names no module or parameter of the model "
              f"(names look like 'embedding', 'layers.0.mixer', 'layers.1.moe.experts')")


# --------------------------------------------------------------------------- plan


@dataclass
class LayerPlan:
    """What to remove from one layer, in the layer's current indices. Applied in this order:
    experts, then channels (one list per expert kept, ascending expert id; equal lengths), then heads."""

    heads: list[int] = field(default_factory=list)
    experts: list[int] = field(default_factory=list)
    channels: list[list[int]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.heads or self.experts or any(self.channels))


@dataclass
class PrunePlan:
    layers: dict[int, LayerPlan] = field(default_factory=dict)
    ratio: float | None = None
    base_prunable: int | None = None
    base_shapes: dict[int, dict[str, int]] | None = None
    predicted_prunable_after: int | None = None


@dataclass
class _Layer:
    """Planning state of one layer: its current sizes, limits and the chosen counts."""

    i: int
    h: int
    e: int
    f: int
    d: int
    head_cost: int
    base: int  # prunable count of this layer in the unpruned model
    removed_before: int  # already removed by earlier calls
    kh_max: int  # most heads removable (0 when protected)
    levels: list[int]  # allowed kept d_ff, levels[0] = f (no channel removal)
    fixed: bool = False  # ratio given explicitly in layer_ratios
    cap: float = 1.0
    kh: int = 0
    c: int = 0  # index into levels
    experts: list[int] = field(default_factory=list)

    def removed(self, kh: int | None = None, c: int | None = None) -> int:
        """Parameters this plan removes from the layer now (exact: experts at width f, then
        channels from the experts left)."""
        kh = self.kh if kh is None else kh
        c = self.c if c is None else c
        ke = len(self.experts)
        return (kh * self.head_cost + ke * (2 * self.d * self.f + self.d)
                + (self.e - ke) * 2 * self.d * (self.f - self.levels[c]))

    def frac_after(self, kh=None, c=None) -> float:
        return (self.removed_before + self.removed(kh, c)) / self.base

    def max_removed(self) -> int:
        """Most this layer can lose now through heads and channels."""
        return self.removed(self.kh_max, len(self.levels) - 1)


def _kept_levels(f: int, multiple: int) -> list[int]:
    """Kept widths allowed: f itself, then multiples of `multiple` below f, never below it."""
    m = max(1, multiple)
    return [f] + [k for k in range((f - 1) // m * m, m - 1, -m) if k < f]


def resolve_base(model, base_prunable, base_shapes) -> tuple[int, dict[int, dict[str, int]]]:
    """(total, per-layer unpruned shapes) the ratio is measured against.

    No base given: the model as it is now is the original. Only base_prunable given: the
    unpruned shapes are the config's uniform sizes (pruning only writes the layer_* lists), which
    must add up to base_prunable; pass base_shapes (from the first report) otherwise."""
    cfg = model.cfg
    if base_shapes is not None:
        shapes = {int(k): {key: int(v[key]) for key in ("n_heads", "n_experts", "d_ff")}
                  for k, v in base_shapes.items()}
        if sorted(shapes) != list(range(len(model.layers))):
            raise ValueError(f"base_shapes has layers {sorted(shapes)}, the model has {len(model.layers)}")
    elif base_prunable is None:
        shapes = layer_shapes(model)
    else:
        shapes = {i: {"n_heads": cfg.n_heads, "n_experts": cfg.n_experts, "d_ff": cfg.d_ff}
                  for i in range(len(model.layers))}
    total = sum(layer_count(cfg, s) for s in shapes.values())
    if base_prunable is not None and int(base_prunable) != total:
        raise ValueError(f"base_prunable={base_prunable} does not match the unpruned layer shapes "
                         f"({total} prunable params); pass base_shapes from the first prune report")
    for i, now in layer_shapes(model).items():
        if any(now[k] > shapes[i][k] for k in now):
            raise ValueError(f"layer {i} is larger now ({now}) than in the base shapes ({shapes[i]})")
    return total, shapes


def _water_fill(amount: float, bases: dict, weights: dict, caps: dict) -> dict[int, float]:
    """Fractions a_i = min(cap_i, lam * w_i) with sum a_i * base_i = amount (as far as caps allow)."""
    fracs, free = {}, set(bases)
    while free:
        taken = sum(fracs[i] * bases[i] for i in fracs)
        denom = sum(weights[i] * bases[i] for i in free)
        lam = max(0.0, amount - taken) / denom if denom > 0 else 0.0
        over = [i for i in free if lam * weights[i] > caps[i]]
        if not over:
            fracs.update({i: lam * weights[i] for i in free})
            break
        for i in over:  # capped layers stop growing; the rest share what is left
            fracs[i] = caps[i]
            free.discard(i)
    return fracs


def _choose_experts(L: _Layer, target: float, scores: Scores, routing: dict, min_usage: float,
                    top_k: int) -> None:
    """Whole experts that are rarely routed, least important first, while they fit the target."""
    routed = routing[L.i]["routed"]
    rare = [e for e in range(L.e) if float(routed[e]) < min_usage / L.e]
    rare.sort(key=lambda e: float(scores.experts[L.i][e]))
    for e in rare:
        if L.e - len(L.experts) <= top_k:
            break
        if L.removed() + 2 * L.d * L.f + L.d <= target:
            L.experts.append(e)


def _decompose(L: _Layer, target: float) -> None:
    """Split a layer's removal target into heads (the SSM's proportional share, rounded) and
    expert channels (the finer unit, absorbing the heads' rounding)."""
    rest = target - L.removed(0, 0)
    size = L.h * L.head_cost + (L.e - len(L.experts)) * (2 * L.d * L.f + L.d)
    L.kh = min(L.kh_max, max(0, round(rest / size * L.h))) if size > 0 else 0
    L.c = min(range(len(L.levels)), key=lambda c: (abs(target - L.removed(L.kh, c)), c))


def _fill(layers: list[_Layer], goal: float) -> None:
    """Greedy +-1 head / channel-level moves across layers while they bring the total removal
    closer to `goal`; ties go to the layer with the smaller removed fraction (for +) or larger (for -)."""
    total = sum(L.removed() for L in layers)
    while True:
        best = None
        for L in layers:
            for kind, delta in (("c", 1), ("c", -1), ("h", 1), ("h", -1)):
                kh, c = L.kh + (delta if kind == "h" else 0), L.c + (delta if kind == "c" else 0)
                if not (0 <= kh <= L.kh_max and 0 <= c < len(L.levels)):
                    continue
                if delta > 0 and L.frac_after(kh, c) > L.cap + 1e-12:
                    continue
                new_total = total - L.removed() + L.removed(kh, c)
                key = (abs(goal - new_total), delta * L.frac_after(kh, c), kind != "c")
                if best is None or key < best[0]:
                    best = (key, L, kh, c, new_total)
        if best is None or best[0][0] >= abs(goal - total) - 1e-9:
            return
        _, L, L.kh, L.c, total = best


def _pick(L: _Layer, scores: Scores) -> LayerPlan:
    """Turn counts into indices: the lowest-scored heads, and per kept expert its own lowest
    channels."""
    heads = sorted(torch.argsort(scores.heads[L.i].float(), stable=True)[:L.kh].tolist())
    k = L.f - L.levels[L.c]
    kept = [e for e in range(L.e) if e not in L.experts]
    channels = [sorted(torch.argsort(scores.channels[L.i][e].float(), stable=True)[:k].tolist()) for e in kept] \
        if k else []
    return LayerPlan(heads=heads, experts=sorted(L.experts), channels=channels)


def _check_scores(model, scores: Scores) -> None:
    for i, s in layer_shapes(model).items():
        want = {"heads": (s["n_heads"],), "channels": (s["n_experts"], s["d_ff"]), "experts": (s["n_experts"],)}
        for kind, shape in want.items():
            got = getattr(scores, kind).get(i)
            if got is None or tuple(got.shape) != shape:
                raise ValueError(f"scores.{kind}[{i}] has shape {None if got is None else tuple(got.shape)}, "
                                 f"the model needs {shape}: compute scores on the model being pruned")


def _layer_states(model, shapes, removed_now, protected, channel_multiple) -> list[_Layer]:
    cfg, hc = model.cfg, head_params(model.cfg)
    out = []
    for i, s in layer_shapes(model).items():
        base = layer_count(cfg, shapes[i])
        kh_max = 0 if protected_by(model, i, "heads", protected) else s["n_heads"] - 1
        levels = [s["d_ff"]] if protected_by(model, i, "channels", protected) \
            else _kept_levels(s["d_ff"], channel_multiple)
        out.append(_Layer(i, s["n_heads"], s["n_experts"], s["d_ff"], cfg.d_model, hc, base,
                          removed_now[i], kh_max, levels))
    return out


def plan(model, ratio: float, scores: Scores, *, allocation: str = "uniform",
         layer_sensitivity: dict[int, float] | None = None, protected: Sequence[str] = DEFAULT_PROTECTED,
         expert_removal: bool = False, routing: dict | None = None, expert_min_usage: float = 0.25,
         channel_multiple: int = 1, max_layer_ratio: float = 0.8,
         layer_ratios: dict[int, float] | None = None, base_prunable: int | None = None,
         base_shapes: dict | None = None) -> PrunePlan:
    """Decide which heads / expert channels / experts to remove so that the prunable parameters
    removed, as a fraction of `base_prunable` (default: the model's current count), reach `ratio`
    as closely as the units allow. Does not modify the model.

    allocation "uniform": every layer loses the same fraction of its own prunable params;
    "sensitivity": fractions proportional to 1 / layer_sensitivity[i] (lower = less sensitive =
    pruned more), normalised to the total. Either way no layer goes above
    max(max_layer_ratio, ratio). layer_ratios fixes the fraction of the layers it names; the rest
    share the remaining target. Inside a layer, whole experts go first (only with expert_removal,
    only experts whose routed share is below expert_min_usage / n_experts, needs `routing`), then
    the SSM gives its proportional share in whole heads and expert channels absorb the rounding;
    a final pass moves single heads / channel steps between layers to hit the total.
    """
    check_ratio(ratio)
    check(allocation in ALLOCATIONS, "prune", "allocation",
          f"must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    require_float(model)
    _check_scores(model, scores)
    n_layers = len(model.layers)
    protected = list(protected)
    check_protected(model, protected)
    check_layer_ratios(layer_ratios, n_layers)
    kinds = ("heads", "channels") + (("experts",) if expert_removal else ())
    for i in (layer_ratios or {}):
        for kind in kinds:
            pat = protected_by(model, i, kind, protected)
            check(pat is None, "prune", "layer_ratios",
                  f"sets a ratio for layer {i}, but {pat!r} is protected (prune.protected) and "
                  f"would be pruned; remove the layer from one of the two")
    if expert_removal and routing is None:
        raise ValueError("expert_removal needs routing statistics: pass routing=routing_stats(model, batches)")

    total_base, shapes = resolve_base(model, base_prunable, base_shapes)
    removed_now = {i: layer_count(model.cfg, shapes[i]) - layer_count(model.cfg, s)
                   for i, s in layer_shapes(model).items()}
    layers = _layer_states(model, shapes, removed_now, protected, channel_multiple)
    current = prunable_params(model)
    need = current - (1.0 - ratio) * total_base  # still to remove now
    result = PrunePlan({}, ratio, total_base, shapes, current)
    if need <= 0:
        return result

    fracs = _allocate(layers, ratio * total_base, allocation, layer_sensitivity, max(max_layer_ratio, ratio),
                      layer_ratios or {})
    for L in layers:
        target = max(0.0, fracs[L.i] * L.base - L.removed_before)
        if expert_removal and target > 0 and not protected_by(model, L.i, "experts", protected):
            _choose_experts(L, target, scores, routing, expert_min_usage, model.cfg.top_k)
        _decompose(L, target)
    free = [L for L in layers if not L.fixed]
    _fill(free, need - sum(L.removed() for L in layers if L.fixed))

    for L in layers:
        lp = _pick(L, scores)
        if not lp.empty():
            result.layers[L.i] = lp
    result.predicted_prunable_after = current - sum(L.removed() for L in layers)
    return result


def _uniform_weights(free: list[_Layer], sensitivity) -> dict[int, float]:
    """Every layer loses the same fraction of its own prunable params."""
    return {L.i: 1.0 for L in free}


def _sensitivity_weights(free: list[_Layer], sensitivity) -> dict[int, float]:
    """Weights 1 / layer_sensitivity[i] (int or str keys): less sensitive layers lose more."""
    if sensitivity is None:
        raise ValueError("allocation 'sensitivity' needs layer_sensitivity {layer: value} "
                         "(see measure_sensitivity)")
    for L in free:
        s = sensitivity.get(L.i, sensitivity.get(str(L.i)))
        if s is None or not math.isfinite(s) or s <= 0:
            raise ValueError(f"layer_sensitivity[{L.i}] must be a finite value > 0, got {s!r}")
    return {L.i: 1.0 / float(sensitivity.get(L.i, sensitivity.get(str(L.i)))) for L in free}


# allocation mode (config.ALLOCATIONS) -> weights(free layers, layer_sensitivity) {layer: weight};
# a layer's removed fraction is proportional to its weight (up to its cap).
ALLOCATION_WEIGHTS: dict[str, Callable[[list[_Layer], dict | None], dict[int, float]]] = {
    "uniform": _uniform_weights, "sensitivity": _sensitivity_weights}


def _allocate(layers: list[_Layer], amount: float, allocation: str, sensitivity, cap: float,
              layer_ratios: dict) -> dict[int, float]:
    """Per-layer fractions of their base counts (total removal incl. earlier calls)."""
    fracs = {}
    for L in layers:
        L.cap = cap
        if L.i in layer_ratios:
            L.fixed, L.cap = True, max(cap, layer_ratios[L.i])
            fracs[L.i] = float(layer_ratios[L.i])
    free = [L for L in layers if not L.fixed]
    weights = ALLOCATION_WEIGHTS[allocation](free, sensitivity)
    # A layer's cap also reflects what its unprotected units can give at all.
    caps = {L.i: min(L.cap, (L.removed_before + L.max_removed()) / L.base) for L in free}
    rest = amount - sum(fracs[L.i] * L.base for L in layers if L.fixed)
    fracs.update(_water_fill(rest, {L.i: L.base for L in free}, weights, caps))
    return fracs

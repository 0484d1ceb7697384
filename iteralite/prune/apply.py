"""Carrying out a plan: `apply_plan` removes the planned units in place with the pruners and
records the new per-layer sizes in `model.cfg` (layer_n_heads, layer_n_experts, layer_d_ff), so
a checkpoint rebuilds the pruned model from its config and loads with strict shapes. `prune` is
scoring + `plan` + `apply_plan` in one call and returns a JSON-able report.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from torch import nn

from iteralite.io.params import check
from iteralite.prune.config import DEFAULT_PROTECTED, check_ratio
from iteralite.prune.counting import layer_count, layer_shapes, prunable_params, require_float
from iteralite.prune.importance import Scores, importance_scores, routing_stats
from iteralite.prune.plan import PrunePlan, check_protected, plan, protected_by, resolve_base
from iteralite.prune.pruners import CHANNEL_PRUNER, EXPERT_PRUNER, HEAD_PRUNER

log = logging.getLogger(__name__)


def _check_plan_protection(model, p: PrunePlan, protected: Sequence[str]) -> None:
    for i, lp in p.layers.items():
        for kind, used in (("heads", lp.heads), ("channels", any(lp.channels)), ("experts", lp.experts)):
            pat = protected_by(model, i, kind, protected) if used else None
            check(pat is None, "prune", "protected",
                  f"the plan removes {kind} of layer {i}, but {pat!r} is protected")


def apply_plan(model, p: PrunePlan, protected: Sequence[str] = ()) -> nn.Module:
    """Remove the planned units in place (experts, then channels, then heads per layer) and
    record the new per-layer sizes in model.cfg. Raises ParamsError if the plan touches a
    protected module. Returns the model."""
    require_float(model)
    check_protected(model, protected)
    n_layers = len(model.layers)
    for i in p.layers:
        if not (isinstance(i, int) and 0 <= i < n_layers):
            raise ValueError(f"plan names layer {i!r}; the model has layers 0..{n_layers - 1}")
    _check_plan_protection(model, p, protected)
    for i, lp in sorted(p.layers.items()):
        layer = model.layers[i]
        if lp.experts:
            EXPERT_PRUNER(layer.moe, lp.experts)
        if any(lp.channels):
            e, f = layer.moe.experts.w1.shape[:2]
            if len(lp.channels) != e:
                raise ValueError(f"plan for layer {i}: {len(lp.channels)} channel lists for {e} experts")
            CHANNEL_PRUNER(layer.moe.experts, [k * f + j for k, chans in enumerate(lp.channels) for j in chans])
        if lp.heads:
            HEAD_PRUNER(layer.mixer, lp.heads)
    _update_config(model)
    return model


def _update_config(model) -> None:
    """A new config (the old object may be shared with the caller) with per-layer sizes."""
    shapes = layer_shapes(model)
    order = range(len(model.layers))
    model.cfg = dataclasses.replace(
        model.cfg, layer_n_heads=[shapes[i]["n_heads"] for i in order],
        layer_n_experts=[shapes[i]["n_experts"] for i in order], layer_d_ff=[shapes[i]["d_ff"] for i in order])
    model.cfg.validate()


def prune(model, ratio: float, importance: str | Scores = "magnitude", *, batches=None,
          routing: dict | None = None, base_prunable: int | None = None, base_shapes: dict | None = None,
          **plan_kwargs) -> dict:
    """plan + apply_plan in place; returns the report (see `_report`).

    importance: "magnitude", "taylor" (needs batches: token tensors (b, l+1)) or precomputed
    Scores. For repeated (iterative) calls pass the first report's base_prunable (and
    base_shapes when the unpruned model was not uniform): `ratio` is cumulative against it.
    plan_kwargs: see `plan` (PruneConfig.plan_kwargs() gives them from params).
    """
    check_ratio(ratio)
    require_float(model)
    batches = None if batches is None else list(batches)  # iterated more than once
    if plan_kwargs.get("expert_removal") and routing is None:
        if batches is None:
            raise ValueError("expert_removal needs routing statistics: pass batches or routing")
        routing = routing_stats(model, batches)
    if isinstance(importance, Scores):
        scores = importance
    else:
        scores = importance_scores(model, importance, batches, routing)
    total_base, shapes = resolve_base(model, base_prunable, base_shapes)
    before, params_before = prunable_params(model), model.num_params()
    p = plan(model, ratio, scores, routing=routing, base_prunable=total_base, base_shapes=shapes, **plan_kwargs)
    apply_plan(model, p, protected=plan_kwargs.get("protected", DEFAULT_PROTECTED))
    rep = _report(model, ratio, total_base, shapes, before, params_before, p)
    rep["importance"] = scores.kind
    rep["allocation"] = plan_kwargs.get("allocation", "uniform")
    if rep["prunable_params_removed_frac"] < ratio - 0.02:
        log.warning("pruning reached %.3f of the requested %.3f (protected modules or per-layer limits)",
                    rep["prunable_params_removed_frac"], ratio)
    return rep


def _report(model, ratio, total_base, shapes, before, params_before, p: PrunePlan) -> dict:
    """JSON-able summary. sparsity[i]: fraction removed from the unpruned layer, per kind."""
    cfg, now = model.cfg, layer_shapes(model)
    after = prunable_params(model)
    d = cfg.d_model
    sparsity = {}
    for i, s in now.items():
        b = shapes[i]
        moe_b, moe_n = b["n_experts"] * (2 * d * b["d_ff"] + d), s["n_experts"] * (2 * d * s["d_ff"] + d)
        sparsity[i] = {"heads": 1 - s["n_heads"] / b["n_heads"], "experts": 1 - s["n_experts"] / b["n_experts"],
                       "d_ff": 1 - s["d_ff"] / b["d_ff"], "ssm_params": 1 - s["n_heads"] / b["n_heads"],
                       "moe_params": 1 - moe_n / moe_b,
                       "prunable_params": 1 - layer_count(cfg, s) / layer_count(cfg, b)}
    removed = {i: {"heads": lp.heads, "experts": lp.experts,
                   "channels_per_expert": len(lp.channels[0]) if lp.channels else 0}
               for i, lp in p.layers.items()}
    return {"ratio": ratio, "base_prunable": total_base, "base_shapes": shapes,
            "prunable_before": before, "prunable_after": after,
            "prunable_params_removed_frac": (total_base - after) / total_base,
            "params_before": params_before, "params_after": model.num_params(),
            "layers": now, "sparsity": sparsity, "removed_now": removed}

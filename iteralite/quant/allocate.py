"""Sensitivity-driven mixed precision: profile, allocate, and check the budget.

1. Profile: for every allocation unit (see `mixed.units`: embedding/head, SSM projections,
   router, each expert) and every candidate precision, the calibration-loss increase when that
   unit alone is stored at that precision (round to nearest, its range from min/max or, when the
   fine-tunes learn ranges, from the clip search they start at; fp16 for 16), everything else as
   in the starting model. Measured on dev windows, never on the validation split.
2. Allocate: start with every unit at the highest candidate precision and repeatedly take the
   move (one unit to a lower precision) with the smallest loss increase per saved bit, until the
   next move would break the budget (`objective: ppl_budget`) or the size reaches
   `target_bits_per_weight` (`objective: bits_target`). Sizes are exact stored bits
   (`mixed.unit_bits`). The profile's increases are made monotone (a lower precision never
   counts as better than a higher one) and summed, which ignores interactions; so the summed
   prediction is checked by measuring the whole allocation at once and, while the measured
   increase exceeds the budget, the allocator is rerun with the budget scaled down.
3. (In `pipeline.mixed`) a short fine-tune with the allocation's own fake quantization, then
   export to packed storage.

The budget: `max_ppl_delta_pct` is relative to FP32 perplexity, i.e. the allowed loss is
L_fp32 + ln(1 + pct/100) on the calibration windows; what the starting model already lost to
pruning counts against it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from iteralite.io.errors import IteraliteError
from iteralite.train.evaluate import mean_loss
from iteralite.quant.fake import fake_weight
from iteralite.quant.intcodes import quantize_rtn
from iteralite.quant.registry import precision_spec
from iteralite.quant.units import split_expert, unit_bits, units

UNIT_TYPES = ("embedding", "embed_in", "head_proj", "in_proj", "x_proj", "dt_proj", "out_proj", "router", "experts")


def unit_type(name: str) -> str:
    """'layers.0.mixer.in_proj' -> 'in_proj'; 'layers.1.moe.experts[2]' -> 'experts'."""
    return split_expert(name)[0].rsplit(".", 1)[-1]


# --------------------------------------------------------------------------- profile


def _targets(model: nn.Module, name: str) -> list[tuple[torch.Tensor, int | None]]:
    """The float weight tensors of a unit: [(tensor, expert index or None)]."""
    base, e = split_expert(name)
    m = model.get_submodule(base)
    return [(m.w1, e), (m.w2, e)] if e is not None else [(m.weight, None)]


def _fake(w: torch.Tensor, precision: int, group_size: int, clip: bool = False) -> torch.Tensor:
    spec = precision_spec(precision, w.shape[-1], group_size)
    if clip and spec.method == "rtn":  # the MSE-optimal range: where a learned-range fine-tune starts
        return quantize_rtn(w, spec.bits, spec.group_size, spec.symmetric, clip=True).dequantize()
    return fake_weight(w, spec)


@torch.no_grad()
def set_allocation_(model: nn.Module, allocation: dict, group_size: int, clip: bool = False) -> None:
    """Replace the float weights of `model` by their values at the allocated precisions, in place
    (clip: each group's range from the clip search instead of min/max)."""
    for name, p in allocation.items():
        for t, e in _targets(model, name):
            if e is None:
                t.copy_(_fake(t, p, group_size, clip))
            else:
                t[e].copy_(_fake(t[e], p, group_size, clip))


@torch.no_grad()
def profile(model: nn.Module, wins: torch.Tensor, precisions, group_size: int, batch_size: int,
            progress: bool = True, clip: bool = False) -> tuple[float, dict]:
    """(baseline loss, {unit: {precision: loss increase}}), one unit quantized at a time
    (clip: with clip-searched ranges, see `set_allocation_`)."""
    base = mean_loss(model, wins, batch_size)
    out: dict[str, dict[int, float]] = {}
    jobs = [(u, p) for u in units(model) for p in precisions]
    for name, p in tqdm(jobs, desc="profile", disable=not progress, dynamic_ncols=True):
        saved = [(t, e, (t if e is None else t[e]).clone()) for t, e in _targets(model, name)]
        set_allocation_(model, {name: p}, group_size, clip)
        out.setdefault(name, {})[p] = mean_loss(model, wins, batch_size) - base
        for t, e, w in saved:
            (t if e is None else t[e]).copy_(w)
    return base, out


# --------------------------------------------------------------------------- allocate


def monotone(sens: dict) -> dict:
    """Loss increases clipped at 0 and made non-increasing in precision (noise can make a lower
    precision look better than a higher one; the allocator must not believe it)."""
    out = {}
    for u, by_p in sens.items():
        ps = sorted(by_p, reverse=True)
        run, mono = 0.0, {}
        for p in ps:
            run = max(run, by_p[p], 0.0)
            mono[p] = run
        out[u] = mono
    return out


def allocate(sizes: dict, sens: dict, budget: float | None = None, target_bits: float | None = None) -> dict:
    """Greedy allocation. sizes {unit: {precision: stored bits}}, sens {unit: {precision: loss
    increase}} (monotone). Stops when the next move would push the summed increase over `budget`,
    or as soon as the total bits are <= `target_bits`. Returns {unit: precision}."""
    if (budget is None) == (target_bits is None):
        raise ValueError("allocate needs exactly one of budget and target_bits")
    cur = {u: max(by_p) for u, by_p in sizes.items()}
    loss = sum(sens[u][p] for u, p in cur.items())
    bits = sum(sizes[u][p] for u, p in cur.items())
    while target_bits is None or bits > target_bits:
        best = None
        for u, p in cur.items():
            for q in sizes[u]:
                saved, dl = sizes[u][p] - sizes[u][q], sens[u][q] - sens[u][p]
                if q >= p or saved <= 0 or (budget is not None and loss + dl > budget):
                    continue
                key = (dl / saved, -saved)
                if best is None or key < best[0]:
                    best = (key, u, q, dl, saved)
        if best is None:
            break
        _, u, q, dl, saved = best
        cur[u], loss, bits = q, loss + dl, bits - saved
    return cur


def manual_allocation(shapes: dict, manual: dict) -> dict:
    """The plan's fixed map: one precision per unit type."""
    return {u: manual[unit_type(u)] for u in shapes}


def uniform_allocation(shapes: dict, precision: int) -> dict:
    return {u: precision for u in shapes}


@dataclass
class Optimized:
    allocation: dict
    budget: float | None  # allowed loss increase (nats/token) over the starting model
    refits: list = field(default_factory=list)  # [{allowed, predicted, measured, bits}]


def optimize(start: nn.Module, wins: torch.Tensor, sizes: dict, sens: dict, cfg,
             base_loss: float, teacher_loss: float, extra: float = 0.0) -> Optimized:
    """Allocation for cfg.objective, its budget checked by measuring the whole allocation.
    `extra` (nats/token) widens the budget before fine-tuning: the loss a fine-tune was measured to
    win back (see `pipeline.mixed`)."""
    weights = sum(_unit_count(u, start) for u in sizes)
    if cfg.objective == "bits_target":
        alloc = allocate(sizes, sens, target_bits=cfg.target_bits_per_weight * weights)
        return Optimized(alloc, None)
    budget = teacher_loss + math.log1p(cfg.max_ppl_delta_pct / 100) - base_loss
    if budget <= 0 and not extra:
        raise IteraliteError(
            f"mixed_precision: the starting model is already {100 * math.expm1(base_loss - teacher_loss):.1f}% "
            f"above FP32 perplexity on the calibration windows, over the budget of {cfg.max_ppl_delta_pct}%: "
            "raise mixed_precision.max_ppl_delta_pct or cut a larger student (student.d_model, n_layers, tokens)")
    budget += extra
    allowed, out = budget, Optimized({}, budget)
    for _ in range(cfg.max_refits + 1):
        alloc = allocate(sizes, sens, budget=allowed)
        probe = copy.deepcopy(start)
        set_allocation_(probe, alloc, cfg.group_size, cfg.learned_range)
        measured = mean_loss(probe, wins, cfg.batch_size) - base_loss
        out.allocation = alloc
        out.refits.append({"allowed": round(allowed, 6), "predicted": round(sum(sens[u][p] for u, p in alloc.items()), 6),
                           "measured": round(measured, 6), "bits": sum(sizes[u][p] for u, p in alloc.items())})
        if measured <= budget:
            break
        allowed *= budget / measured  # the parts interact: shrink what the summed profile may spend
    return out


def _unit_count(name: str, model: nn.Module) -> int:
    return sum((t if e is None else t[e]).numel() for t, e in _targets(model, name))


def sizes_table(model: nn.Module, precisions, group_size: int, scale_bits: int = 0) -> dict:
    """{unit: {precision: exact stored bits}} (scale_bits: the scales' grid, 0 = fp16)."""
    return {u: {p: unit_bits(u, s, p, group_size, scale_bits) for p in precisions} for u, s in units(model).items()}



def summarize(allocation: dict, sizes: dict, model: nn.Module) -> dict:
    """Bits per weight of the allocated units and the share of weights at each precision."""
    count = {u: _unit_count(u, model) for u in allocation}
    total = sum(count.values())
    by_p: dict[str, float] = {}
    for u, p in allocation.items():
        by_p[str(p)] = by_p.get(str(p), 0.0) + count[u] / total
    bits = sum(sizes[u][p] for u, p in allocation.items())
    return {"allocated_bits_per_weight": round(bits / total, 4), "allocated_bytes": bits // 8,
            "weight_share_by_precision": {k: round(v, 4) for k, v in sorted(by_p.items(), key=lambda kv: int(kv[0]))}}

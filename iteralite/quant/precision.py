"""Sensitivity-driven mixed precision: the smallest allocation inside a quality budget.

1. Profile: for every allocation unit (see `mixed.units`: embedding/head, SSM projections,
   router, each expert) and every candidate precision, the calibration-loss increase when that
   unit alone is stored at that precision (round to nearest; fp16 for 16), everything else as
   in the starting model. Measured on training windows, never on the validation split.
2. Allocate: start with every unit at the highest candidate precision and repeatedly take the
   move (one unit to a lower precision) with the smallest loss increase per saved bit, until the
   next move would break the budget (`objective: ppl_budget`) or the size reaches
   `target_bits_per_weight` (`objective: bits_target`). Sizes are exact stored bits
   (`mixed.unit_bits`). The profile's increases are made monotone (a lower precision never
   counts as better than a higher one) and summed, which ignores interactions; so the summed
   prediction is checked by measuring the whole allocation at once and, while the measured
   increase exceeds the budget, the allocator is rerun with the budget scaled down.
3. A short fine-tune with the allocation's own fake quantization (straight-through, the export's
   quantizer) and distillation from the FP32 teacher, then export to packed storage.

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
from torch.nn.utils import parametrize
from tqdm import tqdm

from iteralite.io.errors import IteraliteError
from iteralite.quant.mixed import parse_precision, quantize_mixed, split_expert, unit_bits, units
from iteralite.io.params import check
from iteralite.quant.quantize import fake_quantize, fit_group_size, quantize_rtn

POLICIES = ("optimized", "manual")
OBJECTIVES = ("ppl_budget", "bits_target")
UNIT_TYPES = ("embedding", "in_proj", "x_proj", "dt_proj", "out_proj", "router", "experts")
# The original plan's fixed map. The head is tied to the embedding here, so one precision serves both.
DEFAULT_MANUAL = {"embedding": 8, "in_proj": 8, "out_proj": 8, "x_proj": 16, "dt_proj": 16,
                  "router": 16, "experts": 4}


@dataclass
class MixedConfig:
    from_ratio: float = 0.4  # start from checkpoints/finetune/<from_ratio>
    policy: str = "optimized"  # optimized | manual: the headline artifact
    objective: str = "ppl_budget"  # ppl_budget | bits_target
    max_ppl_delta_pct: float = 15.0  # versus FP32 perplexity
    target_bits_per_weight: float = 3.5  # bits of the allocated weights / their count
    precisions: list[int | str] = field(default_factory=lambda: [2, 3, 4, 8, 16])
    group_size: int = 64
    sens_samples: int = 32  # calibration windows (training split) for the profile and the budget
    seq_len: int = 256
    batch_size: int = 16
    seed: int = 23
    max_refits: int = 4  # allocator reruns with a smaller budget when the measured loss exceeds it
    finetune_steps: int = 150  # distillation steps after assignment (optimizer settings: `finetune`)
    manual: dict = field(default_factory=lambda: dict(DEFAULT_MANUAL))
    compare: list[int | str] = field(default_factory=lambda: [8, 4])  # uniform precisions on the Pareto plot
    control_finetune: bool = True  # also fine-tune uniform int4 for the same steps (a fair control)

    def validate(self, section: str = "mixed_precision") -> None:
        check(0.0 <= self.from_ratio < 1.0, section, "from_ratio", f"must be in [0, 1); got {self.from_ratio}")
        check(self.policy in POLICIES, section, "policy", f"must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        check(self.objective in OBJECTIVES, section, "objective",
              f"must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        check(self.max_ppl_delta_pct > 0, section, "max_ppl_delta_pct",
              f"(the quality budget) must be > 0; got {self.max_ppl_delta_pct}")
        check(self.target_bits_per_weight > 0, section, "target_bits_per_weight",
              f"must be > 0; got {self.target_bits_per_weight}")
        check(len(self.precisions) > 0, section, "precisions", "must list at least one precision")
        self.precisions = sorted({parse_precision(p, f"{section}.precisions") for p in self.precisions})
        self.compare = [parse_precision(p, f"{section}.compare") for p in self.compare]
        for key in ("group_size", "sens_samples", "batch_size", "finetune_steps"):
            check(getattr(self, key) >= 1, section, key, "must be >= 1")
        check(self.seq_len >= 2, section, "seq_len", "must be >= 2")
        check(self.max_refits >= 0, section, "max_refits", "must be >= 0")
        unknown = sorted(set(self.manual) - set(UNIT_TYPES))
        check(not unknown, section, "manual", f"has unknown unit types {unknown}; allowed: {', '.join(UNIT_TYPES)}")
        missing = sorted(set(UNIT_TYPES) - set(self.manual))
        check(not missing, section, "manual", f"must give a precision for every unit type; missing {missing}")
        self.manual = {k: parse_precision(v, f"{section}.manual.{k}") for k, v in self.manual.items()}


def unit_type(name: str) -> str:
    """'layers.0.mixer.in_proj' -> 'in_proj'; 'layers.1.moe.experts[2]' -> 'experts'."""
    return split_expert(name)[0].rsplit(".", 1)[-1]


# --------------------------------------------------------------------------- profile


def _targets(model: nn.Module, name: str) -> list[tuple[torch.Tensor, int | None]]:
    """The float weight tensors of a unit: [(tensor, expert index or None)]."""
    base, e = split_expert(name)
    m = model.get_submodule(base)
    return [(m.w1, e), (m.w2, e)] if e is not None else [(m.weight, None)]


def fake_weight(w: torch.Tensor, precision: int, group_size: int) -> torch.Tensor:
    """dequantize(quantize(w)) at `precision` without gradient: w (out, in)."""
    if precision == 16:
        return w.detach().half().float()
    return quantize_rtn(w, precision, fit_group_size(w.shape[-1], group_size), False).dequantize()


@torch.no_grad()
def set_allocation_(model: nn.Module, allocation: dict, group_size: int) -> None:
    """Replace the float weights of `model` by their values at the allocated precisions, in place."""
    for name, p in allocation.items():
        for t, e in _targets(model, name):
            if e is None:
                t.copy_(fake_weight(t, p, group_size))
            else:
                t[e].copy_(fake_weight(t[e], p, group_size))


@torch.no_grad()
def profile(model: nn.Module, wins: torch.Tensor, precisions, group_size: int, batch_size: int,
            progress: bool = True) -> tuple[float, dict]:
    """(baseline loss, {unit: {precision: loss increase}}), one unit quantized at a time."""
    from iteralite.quant.calibrate import mean_loss

    base = mean_loss(model, wins, batch_size)
    out: dict[str, dict[int, float]] = {}
    jobs = [(u, p) for u in units(model) for p in precisions]
    for name, p in tqdm(jobs, desc="profile", disable=not progress, dynamic_ncols=True):
        saved = [(t, e, (t if e is None else t[e]).clone()) for t, e in _targets(model, name)]
        set_allocation_(model, {name: p}, group_size)
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


def optimize(start: nn.Module, wins: torch.Tensor, sizes: dict, sens: dict, cfg: MixedConfig,
             base_loss: float, teacher_loss: float) -> Optimized:
    """Allocation for cfg.objective, its budget checked by measuring the whole allocation."""
    from iteralite.quant.calibrate import mean_loss

    weights = sum(_unit_count(u, start) for u in sizes)
    if cfg.objective == "bits_target":
        alloc = allocate(sizes, sens, target_bits=cfg.target_bits_per_weight * weights)
        return Optimized(alloc, None)
    budget = teacher_loss + math.log1p(cfg.max_ppl_delta_pct / 100) - base_loss
    if budget <= 0:
        raise IteraliteError(
            f"mixed_precision: the starting model is already {100 * math.expm1(base_loss - teacher_loss):.1f}% "
            f"above FP32 perplexity on the calibration windows, over the budget of {cfg.max_ppl_delta_pct}%: "
            "raise mixed_precision.max_ppl_delta_pct or start from a smaller from_ratio")
    allowed, out = budget, Optimized({}, budget)
    for _ in range(cfg.max_refits + 1):
        alloc = allocate(sizes, sens, budget=allowed)
        probe = copy.deepcopy(start)
        set_allocation_(probe, alloc, cfg.group_size)
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


def sizes_table(model: nn.Module, precisions, group_size: int) -> dict:
    """{unit: {precision: exact stored bits}}."""
    return {u: {p: unit_bits(u, s, p, group_size) for p in precisions} for u, s in units(model).items()}


# --------------------------------------------------------------------------- fine-tune


class _HalfSTE(nn.Module):
    """Parametrization: w -> fp16(w) in the forward pass, identity gradient."""

    def forward(self, w):
        return w + (w.half().float() - w).detach()


class FakeQuantAt(nn.Module):
    """Parametrization: w at one precision (2-D) or one precision per expert (3-D (e, out, in)),
    through the export's own quantizer with a straight-through gradient."""

    def __init__(self, precisions: list[int] | int, group_size: int):
        super().__init__()
        self.precisions, self.group_size = precisions, group_size

    def _one(self, w, p):
        if p == 16:
            return _HalfSTE()(w)
        return fake_quantize(w, p, fit_group_size(w.shape[-1], self.group_size), False)

    def forward(self, w):
        if w.dim() == 3:
            return torch.stack([self._one(w[e], p) for e, p in enumerate(self.precisions)])
        return self._one(w, self.precisions)


def attach_allocation(model: nn.Module, allocation: dict, group_size: int) -> None:
    """Register FakeQuantAt on every allocated weight of a float IteraLite."""
    experts: dict[str, dict[int, int]] = {}
    for name, p in allocation.items():
        base, e = split_expert(name)
        if e is None:
            parametrize.register_parametrization(model.get_submodule(name), "weight", FakeQuantAt(p, group_size))
        else:
            experts.setdefault(base, {})[e] = p
    for base, by_e in experts.items():
        precs = [by_e[e] for e in sorted(by_e)]
        m = model.get_submodule(base)
        for slot in ("w1", "w2"):
            parametrize.register_parametrization(m, slot, FakeQuantAt(precs, group_size))


def finetune_allocation(start: nn.Module, teacher: nn.Module, data: torch.Tensor, allocation: dict,
                        group_size: int, qat_cfg, progress: bool = True, desc: str = "mixed finetune"):
    """(packed mixed model, stats): distill a fake-quantized copy of `start`, then export."""
    from iteralite.quant.qat import distill_train, strip_fake_quant

    student = copy.deepcopy(start)
    attach_allocation(student, allocation, group_size)
    stats = distill_train(student, teacher, data, qat_cfg, progress, desc)
    strip_fake_quant(student)
    return quantize_mixed(student, allocation, group_size), stats


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



@dataclass
class MixedRun:
    allocation: dict  # the headline allocation {unit: precision}
    model: nn.Module  # the headline artifact (packed, fine-tuned)
    candidates: dict  # {name: (packed model, allocation)} for the Pareto comparison
    info: dict  # JSON-able: losses, budget, refits, profile, fine-tune stats


def run_mixed(teacher: nn.Module, start: nn.Module, data: torch.Tensor, cfg: MixedConfig, qat_cfg,
              progress: bool = True) -> MixedRun:
    """The whole stage's computation on a float starting model (see the module docstring)."""
    from iteralite.quant.calibrate import mean_loss, windows

    wins = windows(data, cfg.sens_samples, cfg.seq_len, cfg.seed)
    teacher_loss = mean_loss(teacher, wins, cfg.batch_size)
    base, sens = profile(start, wins, cfg.precisions, cfg.group_size, cfg.batch_size, progress)
    sizes = sizes_table(start, cfg.precisions, cfg.group_size)
    shapes = units(start)
    info = {"calib_loss_fp32": round(teacher_loss, 6), "calib_loss_start": round(base, 6),
            "profile": {u: {str(p): round(v, 6) for p, v in by_p.items()} for u, by_p in sens.items()}}
    opt = optimize(start, wins, sizes, monotone(sens), cfg, base, teacher_loss)
    info.update(budget_nats=None if opt.budget is None else round(opt.budget, 6), refits=opt.refits)
    headline = opt.allocation if cfg.policy == "optimized" else manual_allocation(shapes, cfg.manual)

    candidates = {}
    for p in cfg.compare:
        alloc = uniform_allocation(shapes, p)
        candidates[f"uniform_{_pname(p)}"] = (quantize_mixed(copy.deepcopy(start), alloc, cfg.group_size), alloc)
    manual = manual_allocation(shapes, cfg.manual)
    candidates["manual"] = (quantize_mixed(copy.deepcopy(start), manual, cfg.group_size), manual)
    candidates["optimized_before_finetune"] = (quantize_mixed(copy.deepcopy(start), opt.allocation, cfg.group_size),
                                               opt.allocation)
    model, stats = finetune_allocation(start, teacher, data, headline, cfg.group_size, qat_cfg, progress)
    info["finetune"] = stats
    info["calib_loss_final"] = round(mean_loss(model, wins, cfg.batch_size), 6)
    if cfg.control_finetune:
        alloc = uniform_allocation(shapes, 4)
        ctl, ctl_stats = finetune_allocation(start, teacher, data, alloc, cfg.group_size, qat_cfg, progress,
                                             desc="control int4 finetune")
        candidates["uniform_int4_finetuned"] = (ctl, alloc)
        info["control_finetune"] = ctl_stats
    return MixedRun(headline, model, candidates, info)


def _pname(p: int) -> str:
    return "fp16" if p == 16 else f"int{p}"

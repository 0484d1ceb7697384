"""The mixed_precision stage's computation: profile, allocate under the budget, fine-tune the
allocation with its own fake quantization, export, and the comparison candidates. The
library pieces live in `quant.units` (vocabulary), `quant.allocate` (profile and allocator) and
`quant.qat` (fake-quantized distillation)."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from iteralite.io.errors import DataError
from iteralite.io.grid import snap_linear
from iteralite.io.params import check
from iteralite.quant.allocate import (UNIT_TYPES, manual_allocation, monotone, optimize, profile, sizes_table,
                                      uniform_allocation)
from iteralite.train.evaluate import mean_loss, tiles, windows
from iteralite.quant.qat import distill_quantized
from iteralite.train.distill import CachedTeacher
from iteralite.quant.spec import SCALE_BITS
from iteralite.train.live import log_point, log_summary
from iteralite.train.loop import check_stream
from iteralite.quant.gptq_start import gptq_start, unit_hessians
from iteralite.quant.registry import parse_precision, precision_name
from iteralite.quant.swap import dequantize_model
from iteralite.quant.units import allocation_spec_for, quantize_allocation, units

POLICIES = ("optimized", "manual")
OBJECTIVES = ("ppl_budget", "bits_target")
# The original plan's fixed map. The head is tied to the embedding here, so one precision serves both.
CONTROL_PRECISION = 4  # control_finetune: the uniform precision fine-tuned for the same steps, as a fair control
SLACK_NATS = math.log1p(0.01)  # slack below ~1% perplexity is not worth another fine-tune
TARGET_KEYS = ("objective", "max_ppl_delta_pct", "target_bits_per_weight", "budget_rounds", "finetune_steps",
               "max_refits", "control_finetune", "slack_rule", "round_start", "finetune_init", "backoff")
DEFAULT_MANUAL = {"embedding": 8, "embed_in": 8, "head_proj": 8, "in_proj": 8, "out_proj": 8, "x_proj": 16,
                  "dt_proj": 16, "router": 16, "experts": 4}


@dataclass
class MixedConfig:
    policy: str = "optimized"  # optimized | manual: the headline artifact
    objective: str = "ppl_budget"  # ppl_budget | bits_target
    max_ppl_delta_pct: float = 30.0  # versus FP32 perplexity, measured on the dev split
    target_bits_per_weight: float = 3.5  # bits of the allocated weights / their count
    precisions: list[int | str] = field(default_factory=lambda: [2, 3, 4, 8, 16])
    group_size: int = 64
    scale_bits: int = 0  # 0: fp16 group scales; b: each tensor's scales on its b-bit log grid (io.grid)
    leftover_bits: int = 0  # 0: float leftovers (norms, conv, biases) in fp16; b: on their b-bit linear grid
    sens_samples: int = 32  # dev-split windows for the profile and the allocator's budget
    check_share: float = 0.0  # share of the dev tokens held out from the profile: every fine-tune's budget
                              # check scores it whole (0: the checks score the profile's own windows)
    seq_len: int = 256
    batch_size: int = 16
    seed: int = 23
    max_refits: int = 4  # allocator reruns with a smaller budget when the measured loss exceeds it
    finetune_steps: int = 150  # distillation steps after assignment (optimizer settings: `finetune`)
    finetune_lr: float = 0.0  # the fine-tunes' peak learning rate (0: finetune.lr; min_lr scales with it)
    learned_range: bool = True  # fine-tunes train each group's range (quant.learned) instead of min/max
    manual: dict = field(default_factory=lambda: dict(DEFAULT_MANUAL))
    compare: list[int | str] = field(default_factory=lambda: [8, 4])  # uniform precisions on the Pareto plot
    control_finetune: bool = True  # also fine-tune uniform int4 for the same steps (a fair control)
    budget_rounds: int = 5  # reallocate with the dev budget the fine-tune left unused (one fine-tune each)
    slack_rule: str = "measured"  # measured | scaled: how much allowance a round offers (SLACK_RULES)
    backoff: str = "half"  # half | secant: what a round offers after one over the budget (BACKOFFS)
    round_start: str = "student"  # student | kept: what a budget round fine-tunes from (ROUND_STARTS)
    finetune_init: str = "rtn"  # rtn | gptq: the weights a fine-tune starts from (FINETUNE_INITS)
    targets: dict = field(default_factory=dict)  # student target -> overrides of TARGET_KEYS for its stage

    def for_target(self, name: str, section: str = "mixed_precision") -> "MixedConfig":
        """This config with student target `name`'s overrides (none: as it is), validated."""
        cfg = dataclasses.replace(self, **self.targets.get(name, {}))
        cfg.validate(section if name not in self.targets else f"{section}.targets.{name}")
        return cfg

    def validate(self, section: str = "mixed_precision") -> None:
        for name, over in self.targets.items():
            check(isinstance(over, dict), section, f"targets.{name}", "must be a mapping of overrides")
            bad = sorted(set(over) - set(TARGET_KEYS))
            check(not bad, section, f"targets.{name}", f"has unknown keys {bad}; allowed: {', '.join(TARGET_KEYS)}")
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
        check(self.finetune_lr >= 0, section, "finetune_lr", "must be >= 0 (0 = finetune.lr)")
        for key in ("group_size", "sens_samples", "batch_size", "finetune_steps"):
            check(getattr(self, key) >= 1, section, key, "must be >= 1")
        check(self.seq_len >= 2, section, "seq_len", "must be >= 2")
        check(0 <= self.check_share < 1, section, "check_share",
              f"must be >= 0 and < 1 (a share of the dev tokens); got {self.check_share!r}")
        check(self.scale_bits in SCALE_BITS, section, "scale_bits",
              f"must be 0 (fp16 scales) or 2..{SCALE_BITS[-1]} (a log grid); got {self.scale_bits!r}")
        check(self.leftover_bits in SCALE_BITS, section, "leftover_bits",
              f"must be 0 (fp16) or 2..{SCALE_BITS[-1]} (a linear grid); got {self.leftover_bits!r}")
        check(self.max_refits >= 0, section, "max_refits", "must be >= 0")
        check(self.budget_rounds >= 0, section, "budget_rounds", "must be >= 0")
        check(self.slack_rule in SLACK_RULES, section, "slack_rule",
              f"must be one of {', '.join(SLACK_RULES)}; got {self.slack_rule!r}")
        check(self.backoff in BACKOFFS, section, "backoff",
              f"must be one of {', '.join(BACKOFFS)}; got {self.backoff!r}")
        check(self.round_start in ROUND_STARTS, section, "round_start",
              f"must be one of {', '.join(ROUND_STARTS)}; got {self.round_start!r}")
        check(self.finetune_init in FINETUNE_INITS, section, "finetune_init",
              f"must be one of {', '.join(FINETUNE_INITS)}; got {self.finetune_init!r}")
        unknown = sorted(set(self.manual) - set(UNIT_TYPES))
        check(not unknown, section, "manual", f"has unknown unit types {unknown}; allowed: {', '.join(UNIT_TYPES)}")
        missing = sorted(set(UNIT_TYPES) - set(self.manual))
        check(not missing, section, "manual", f"must give a precision for every unit type; missing {missing}")
        self.manual = {k: parse_precision(v, f"{section}.manual.{k}") for k, v in self.manual.items()}
        self._check_candidates(section)

    def _check_candidates(self, section: str) -> None:
        """Every precision the stage uses must be a candidate: only candidates are profiled and
        sized, so any other one would fail (KeyError) after the profile and the fine-tunes."""
        names = ", ".join(map(precision_name, self.precisions))
        where = f"not among the candidates 'mixed_precision.precisions' ({names})"
        manual = sorted({p for p in self.manual.values() if p not in self.precisions})
        if manual:
            uses = "; ".join(f"{precision_name(p)} for {', '.join(k for k, v in self.manual.items() if v == p)}"
                             for p in manual)
            check(False, section, "manual", f"uses {uses}, {where}; add them to precisions or map those unit "
                                            "types to candidates")
        compare = [p for p in dict.fromkeys(self.compare) if p not in self.precisions]
        check(not compare, section, "compare", f"has {', '.join(map(precision_name, compare))}, {where}; add "
                                               "them to precisions or drop them from compare")
        check(not self.control_finetune or CONTROL_PRECISION in self.precisions, section, "control_finetune",
              f"fine-tunes a uniform {precision_name(CONTROL_PRECISION)} control, which is {where}; add "
              f"{CONTROL_PRECISION} to precisions or set control_finetune: false")



@torch.no_grad()
def round_leftovers_(model: nn.Module, bits: int = 0) -> nn.Module:
    """Round every float32 tensor left in a stored model (norms, the depthwise conv, A_log, D, the
    dt bias), in place: bits 0 to its nearest fp16 value (the compact layout's f16 codec stores it
    in 2 bytes a value), bits b to the nearest value of its own b-bit linear grid (`io.grid`; the
    grid codec stores b bits a value). Lossless either way: the model computes with exactly what
    is stored."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dtype == torch.float32:
            h = t.half()
            if not torch.isfinite(h).all():
                raise ValueError("a float tensor of the model exceeds the fp16 range; it cannot be stored in 16 bits")
            t.copy_(snap_linear(h.float(), bits) if bits else h.float())
    return model


def finetune_allocation(start: nn.Module, teacher: nn.Module, data: torch.Tensor, allocation: dict,
                        cfg: MixedConfig, qat_cfg, progress: bool = True, desc: str = "mixed finetune", *,
                        live=None, step_offset: int = 0, round_index: int | None = None):
    """(packed mixed model, stats): distill a fake-quantized copy of `start`, export it and round
    its float leftovers as stored (so every check measures the stored model). live, step_offset,
    round_index: the stage's dvclive logger and where this fine-tune's steps go."""
    model, stats = distill_quantized(copy.deepcopy(start), teacher, data,
                                     allocation_spec_for(allocation, cfg.group_size, cfg.scale_bits), qat_cfg,
                                     progress, desc, live=live, step_offset=step_offset, round_index=round_index)
    return round_leftovers_(model, cfg.leftover_bits), stats


def stored_allocation(start: nn.Module, allocation: dict, cfg: MixedConfig) -> nn.Module:
    """A copy of `start` stored at `allocation` by round to nearest, its leftovers rounded as stored."""
    model = quantize_allocation(copy.deepcopy(start), allocation, cfg.group_size, cfg.scale_bits)
    return round_leftovers_(model, cfg.leftover_bits)


@dataclass
class MixedRun:
    allocation: dict  # the headline allocation {unit: precision}
    model: nn.Module  # the headline artifact (packed, fine-tuned)
    candidates: dict  # {name: (packed model, allocation)} for the Pareto comparison
    info: dict  # JSON-able: losses, budget, refits, profile, fine-tune stats


def _step_measured(slack: float, opt, final: float, base: float) -> float:
    """Offer the slack itself: as if the fine-tune won nothing back of the extra damage."""
    return slack


def _step_scaled(slack: float, opt, final: float, base: float) -> float:
    """Offer the slack divided by the share of the damage the last fine-tune kept: post-fine-tune
    damage (final - base) over the damage measured before it (the allocator's last refit, same
    windows). A fine-tune that keeps 40% of the damage turns 0.05 nats of slack into 0.125 nats
    of allowance. The share is clamped to [1/4, 1], so the offer is 1 to 4 times the slack."""
    before = opt.refits[-1]["measured"] if getattr(opt, "refits", None) else 0.0
    keep = (final - base) / before if before > 0 else 1.0
    return slack / min(1.0, max(0.25, keep))


SLACK_RULES = {"measured": _step_measured, "scaled": _step_scaled}  # mixed_precision.slack_rule


def _back_half(step: float, kept_loss: float, over_loss: float, target: float) -> float:
    """After a round over the budget, offer half the step that went over."""
    return step / 2


def _back_secant(step: float, kept_loss: float, over_loss: float, target: float) -> float:
    """After a round over the budget, offer the share of the step where the line through the kept
    round's dev loss (no extra step) and the failed round's (the whole step) meets the target,
    clamped to [1/4, 3/4] of the step: a curved response or one noisy fine-tune cannot send the next
    try to either end. A failed round that measured no worse than the kept one offers half."""
    share = (target - kept_loss) / (over_loss - kept_loss) if over_loss > kept_loss else 0.5
    return step * min(0.75, max(0.25, share))


BACKOFFS = {"half": _back_half, "secant": _back_secant}  # mixed_precision.backoff


def _start_student(start: nn.Module, kept: nn.Module) -> nn.Module:
    """Every round fine-tunes from the float student, as the first fine-tune does."""
    return start


def _start_kept(start: nn.Module, kept: nn.Module) -> nn.Module:
    """A round fine-tunes from the kept allocation's fine-tuned model, dequantized: the tensors
    whose precision stays start on their own grid, the others are rounded from trained weights,
    and the training of every kept round carries over (rounds compound instead of restarting)."""
    return dequantize_model(copy.deepcopy(kept))


ROUND_STARTS = {"student": _start_student, "kept": _start_kept}  # mixed_precision.round_start


def _init_rtn(origin: nn.Module, allocation: dict, data: torch.Tensor, cfg: "MixedConfig") -> nn.Module:
    """The fine-tune's fake quantization rounds the float weights to nearest (its range search aside)."""
    return origin


def _init_gptq(origin: nn.Module, allocation: dict, data: torch.Tensor, cfg: "MixedConfig") -> nn.Module:
    """The low-bit units start from their GPTQ-quantized weights (`quant.gptq_start`), the Hessians
    from `sens_samples` windows of the training tokens `data` (never the dev windows of the budget)."""
    calib = windows(data, cfg.sens_samples, cfg.seq_len, cfg.seed)
    return gptq_start(origin, allocation, unit_hessians(origin, calib, cfg.batch_size), cfg.group_size)


FINETUNE_INITS = {"rtn": _init_rtn, "gptq": _init_gptq}  # mixed_precision.finetune_init


def use_the_slack(first: tuple, target: float, rounds: int, reallocate, fit, bits, *, rule: str = "measured",
                  base: float = 0.0, backoff: str = "half") -> tuple:
    """The budget is checked before fine-tuning and the fine-tune then wins some loss back, so the
    fine-tuned headline lands under the budget: budget left unused. Each round gives the allocator
    more allowance on top of its budget (`reallocate(extra_nats) -> Optimized`): the dev-measured
    slack, or with rule "scaled" the slack over the share of damage a fine-tune keeps (see
    SLACK_RULES; `base` is the starting model's dev loss). It fine-tunes the smaller allocation
    returned (`fit(allocation, kept model) -> (model, stats, dev loss)`) and keeps it if that dev loss still
    meets `target`. A round over the target keeps the previous one and backs off: the next round
    offers less on top of the kept allocation's allowance (`backoff`: half as much, or the secant's
    share of it; see BACKOFFS).
    first: (Optimized, model, stats, dev loss) of the first fine-tune -> (the kept one, rounds record)."""
    kept, record, extra, step = first, [], 0.0, None
    for _ in range(rounds):
        opt, _, _, final = kept
        slack = target - final
        step = SLACK_RULES[rule](slack, opt, final, base) if step is None else step
        if slack < SLACK_NATS or step < SLACK_NATS:  # too little left to spend, or offers halved below it
            break
        cand = reallocate(extra + step)
        row = {"slack_nats": round(slack, 6), "extra_nats": round(extra + step, 6), "bits": bits(cand.allocation)}
        record.append(row)
        if row["bits"] >= bits(opt.allocation):
            row["kept"] = False
            break
        model, stats, loss = fit(cand.allocation, kept[1])
        row.update(dev_loss=round(loss, 6), kept=loss <= target)
        if loss > target:
            step = BACKOFFS[backoff](step, kept[3], loss, target)
            continue
        kept, extra, step = (cand, model, stats, loss), extra + step, None
    return kept, record


def split_dev(dev: torch.Tensor, share: float, seq_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the dev tokens the profile samples its windows from, the held-out check windows or None):
    the last `share` of the dev stream, cut into whole windows, is never profiled, so the budget
    checks that pick among fine-tuned allocations are not scored on the windows the allocation was
    fitted to (a check on those reads the chosen allocation as better than it is). share 0: None,
    the checks score the profile's windows."""
    if not share:
        return dev, None
    cut = len(dev) - int(len(dev) * share)
    check_stream(dev[:cut], seq_len, "mixed_precision", "mixed_precision.seq_len", "dev (profile part)")
    held = tiles(dev[cut:], seq_len)
    if len(held) == 0:
        raise DataError(f"mixed_precision: the held-out dev part has {len(dev) - cut} tokens, too few for one window "
                        f"of 'mixed_precision.seq_len' = {seq_len}; raise mixed_precision.check_share or add dev data")
    return dev[:cut], held


def run_mixed(teacher: nn.Module, start: nn.Module, data: torch.Tensor, cfg: MixedConfig, qat_cfg,
              progress: bool = True, *, dev: torch.Tensor, live=None) -> MixedRun:
    """The whole stage's computation on a float starting model (see the module docstring).
    `data`: the training tokens (the fine-tunes distil on them); `dev`: the dev tokens (the profile,
    the budget and every check of it). `live`: the stage's dvclive logger or None; every fine-tune
    logs on one step counter with `round` = its place in the order they run (0 the headline
    allocation, then one per slack round that fine-tunes, then the int4 control), and its dev
    loss at its last step."""
    check_stream(dev, cfg.seq_len, "mixed_precision", "mixed_precision.seq_len", "dev")
    check_stream(data, qat_cfg.seq_len, "mixed_precision", "finetune.seq_len")
    profiled, held = split_dev(dev, cfg.check_share, cfg.seq_len)
    wins = windows(profiled, cfg.sens_samples, cfg.seq_len, cfg.seed)
    teacher_loss = mean_loss(teacher, wins, cfg.batch_size)
    base, sens = profile(start, wins, cfg.precisions, cfg.group_size, cfg.batch_size, progress, cfg.learned_range)
    checks = wins if held is None else held  # what every fine-tuned model's dev loss is scored on
    check_fp32 = teacher_loss if held is None else mean_loss(teacher, checks, cfg.batch_size)
    check_start = base if held is None else mean_loss(start, checks, cfg.batch_size)
    sizes = sizes_table(start, cfg.precisions, cfg.group_size, cfg.scale_bits)
    shapes = units(start)
    info = {"calib_loss_fp32": round(teacher_loss, 6), "calib_loss_start": round(base, 6),
            "profile": {u: {str(p): round(v, 6) for p, v in by_p.items()} for u, by_p in sens.items()},
            "check_share": cfg.check_share, "check_tokens": int(checks[:, 1:].numel()),
            "check_loss_fp32": round(check_fp32, 6), "check_loss_start": round(check_start, 6)}
    opt = optimize(start, wins, sizes, monotone(sens), cfg, base, teacher_loss)
    info.update(budget_nats=None if opt.budget is None else round(opt.budget, 6), refits=opt.refits)
    headline = opt.allocation if cfg.policy == "optimized" else manual_allocation(shapes, cfg.manual)

    candidates = {}
    for p in cfg.compare:
        alloc = uniform_allocation(shapes, p)
        candidates[f"uniform_{precision_name(p)}"] = (stored_allocation(start, alloc, cfg), alloc)
    manual = manual_allocation(shapes, cfg.manual)
    candidates["manual"] = (stored_allocation(start, manual, cfg), manual)

    logged, rounds = 0, 0  # dvclive steps and fine-tunes so far
    # every fine-tune distils on the same batches: the teacher runs once per batch, not once per fine-tune
    several = (cfg.policy == "optimized" and cfg.objective == "ppl_budget" and cfg.budget_rounds) or cfg.control_finetune
    fit_teacher = CachedTeacher(teacher) if several else teacher

    def fit(alloc, desc="mixed finetune", origin=start):
        nonlocal logged, rounds
        origin = FINETUNE_INITS[cfg.finetune_init](origin, alloc, data, cfg)
        m, st = finetune_allocation(origin, fit_teacher, data, alloc, cfg, qat_cfg, progress, desc, live=live,
                                    step_offset=logged, round_index=rounds)
        logged, rounds = logged + qat_cfg.steps, rounds + 1
        loss = mean_loss(m, checks, cfg.batch_size)
        log_point(live, logged, {"dev_loss": loss})
        return m, st, loss

    model, stats, final = fit(headline)
    if cfg.policy == "optimized" and cfg.objective == "ppl_budget":
        (opt, model, stats, final), info["budget_rounds"] = use_the_slack(
            (opt, model, stats, final), check_fp32 + math.log1p(cfg.max_ppl_delta_pct / 100), cfg.budget_rounds,
            lambda extra: optimize(start, wins, sizes, monotone(sens), cfg, base, teacher_loss, extra=extra),
            lambda alloc, kept: fit(alloc, "mixed finetune (slack round)",
                                    ROUND_STARTS[cfg.round_start](start, kept)),
            lambda alloc: sum(sizes[u][p] for u, p in alloc.items()), rule=cfg.slack_rule, base=check_start,
            backoff=cfg.backoff)
        headline = opt.allocation
        info.update(budget_nats_final=round(opt.budget, 6), slack_rule=cfg.slack_rule, round_start=cfg.round_start,
                    backoff=cfg.backoff)
    info["finetune_init"] = cfg.finetune_init
    candidates["optimized_before_finetune"] = (stored_allocation(start, opt.allocation, cfg), opt.allocation)
    info["finetune"] = stats
    info["calib_loss_final"] = round(final, 6)  # on the check windows (held out, or the profile's)
    log_summary(live, {"final_train_ce": stats["final_train_ce"], "final_dev_loss": final})  # the headline's
    if cfg.control_finetune:
        alloc = uniform_allocation(shapes, CONTROL_PRECISION)
        ctl, ctl_stats, _ = fit(alloc, "control int4 finetune")
        candidates["uniform_int4_finetuned"] = (ctl, alloc)
        info["control_finetune"] = ctl_stats
    return MixedRun(headline, model, candidates, info)

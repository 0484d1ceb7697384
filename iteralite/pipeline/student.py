"""The student stage's computation: a width- and depth-cut copy of a fine-tuned pruned model,
trained by logit distillation from the FP32 teacher for a budget of training tokens.

The cuts are Minitron-style: whole blocks go first (the least "block influence" on the dev
split, `prune.activation`), then residual channels (d_model) by their share of mean |RMSNorm
output|, rescored on the depth-cut model. Both scores read dev windows only; the distillation
reads the training split. `tokens: 0` keeps the cut model as it is (no distillation), and a cut
to the model's own d_model and n_layers removes nothing, so `student` can also pass the
fine-tuned model through unchanged.

Named targets (`targets`, one student stage each: `student` for "headline", `student_<name>` for
the others) override the cut per target: d_model, n_layers, embed_rank (a factorised embedding,
`core.model`: the cut (V, d) table is replaced by its rank-r SVD, a (V, r) table with r -> d and
d -> r projections, before distillation), max_heads / max_ff (each layer keeps at most that many
SSM heads / expert channels, the lowest first-order Taylor scores on dev go) and tokens.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from iteralite.io.params import check
from iteralite.prune.activation import activation_scores, channels_to_remove, layers_to_remove
from iteralite.prune.apply import apply_plan
from iteralite.prune.depth import prune_layers
from iteralite.prune.importance import importance_scores
from iteralite.prune.plan import LayerPlan, PrunePlan
from iteralite.prune.width import prune_residual
from iteralite.train.evaluate import mean_loss, windows
from iteralite.quant.qat import QATConfig
from iteralite.train.distill import distill_train
from iteralite.train.live import log_point, log_summary
from iteralite.train.loop import check_stream


@dataclass
class StudentConfig:
    from_ratio: float = 0.4  # cut checkpoints/finetune/<from_ratio> (one of prune.ratios)
    d_model: int = 64  # residual width kept
    n_layers: int = 3  # blocks kept
    tokens: int = 6553600  # distillation budget in training tokens (0: keep the cut model untrained)
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 50
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    distill_weight: float = 0.9  # loss = w * KL(teacher || student) + (1 - w) * CE
    temperature: float = 1.0
    calib_windows: int = 64  # dev windows the cuts are scored on
    dev_windows: int = 32  # dev windows scored before and after distillation (reported)
    seed: int = 29
    threads: int = 0
    embed_rank: int = 0  # 0: keep the dense (V, d) embedding; r: factorise it at rank r
    max_heads: int = 0  # 0: keep every SSM head the cut leaves; n: at most n per layer
    max_ff: int = 0  # 0: keep every expert channel; n: at most n per expert
    targets: dict = field(default_factory=lambda: {"headline": {}})  # name -> overrides of TARGET_KEYS

    def validate(self, section: str = "student") -> None:
        for key in ("d_model", "n_layers", "batch_size", "calib_windows", "dev_windows"):
            check(getattr(self, key) >= 1, section, key, "must be >= 1")
        check(self.tokens >= 0, section, "tokens", "must be >= 0 (0 = no distillation)")
        check(self.seq_len >= 2, section, "seq_len", "must be >= 2")
        check(self.lr > 0, section, "lr", "must be > 0")
        check(0 <= self.min_lr <= self.lr, section, "min_lr", "must be in [0, lr]")
        check(self.grad_clip > 0, section, "grad_clip", "must be > 0")
        check(self.aux_loss_coef >= 0, section, "aux_loss_coef", "must be >= 0")
        check(0.0 <= self.distill_weight <= 1.0, section, "distill_weight", "must be in [0, 1]")
        check(self.temperature > 0, section, "temperature", "must be > 0")
        check(self.threads >= 0, section, "threads", "must be >= 0 (0 = all cores)")
        steps = self.steps
        check(self.tokens == 0 or 0 <= self.warmup_steps < steps, section, "warmup_steps",
              f"must be in [0, {steps}): the budget of {self.tokens} tokens is {steps} steps of "
              f"{self.batch_size} x {self.seq_len}")
        check("headline" in self.targets, section, "targets", "must name a 'headline' target")
        for name, over in self.targets.items():
            check(isinstance(name, str) and name.isidentifier(), section, "targets",
                  f"target names must be identifiers; got {name!r}")
            check(isinstance(over, dict), section, f"targets.{name}", "must be a mapping of overrides")
            bad = sorted(set(over) - set(TARGET_KEYS))
            check(not bad, section, f"targets.{name}", f"has unknown keys {bad}; allowed: {', '.join(TARGET_KEYS)}")
            for key, v in over.items():
                if key in FLOAT_TARGET_KEYS:
                    check(isinstance(v, (int, float)) and not isinstance(v, bool), section, f"targets.{name}.{key}",
                          f"must be a number; got {v!r}")
                else:
                    check(isinstance(v, int) and not isinstance(v, bool), section, f"targets.{name}.{key}",
                          f"must be an integer; got {v!r}")
        for key in ("embed_rank", "max_heads", "max_ff"):
            check(getattr(self, key) >= 0, section, key, "must be >= 0 (0 = no limit / dense)")
        check(self.embed_rank < self.d_model or not self.embed_rank, section, "embed_rank",
              f"must be below d_model ({self.d_model}) or 0; got {self.embed_rank}")
        check(0.0 <= self.from_ratio < 1.0, section, "from_ratio", f"must be in [0, 1); got {self.from_ratio}")

    def for_target(self, name: str, section: str = "student") -> "StudentConfig":
        """This config with target `name`'s overrides applied (validated)."""
        check(name in self.targets, section, "targets", f"has no target {name!r}; known: {', '.join(self.targets)}")
        cfg = dataclasses.replace(self, **self.targets[name])
        cfg.validate(f"{section}.targets.{name}")
        return cfg

    @property
    def steps(self) -> int:
        """Distillation steps: the token budget in whole batches (rounded up)."""
        return math.ceil(self.tokens / (self.batch_size * self.seq_len))

    def distill_config(self) -> QATConfig:
        return QATConfig(seed=self.seed, steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len,
                         lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps, grad_clip=self.grad_clip,
                         aux_loss_coef=self.aux_loss_coef, threads=self.threads, distill_weight=self.distill_weight,
                         temperature=self.temperature)


FLOAT_TARGET_KEYS = ("lr", "min_lr")  # a target may train at its own learning rate (the others are integers)
TARGET_KEYS = ("d_model", "n_layers", "embed_rank", "max_heads", "max_ff", "tokens", *FLOAT_TARGET_KEYS)


def check_cut(model: nn.Module, cfg: StudentConfig, section: str = "student") -> None:
    """The cut must not grow the model (one line naming the key)."""
    check(cfg.d_model <= model.cfg.d_model, section, "d_model",
          f"{cfg.d_model} is wider than the model it cuts (d_model {model.cfg.d_model})")
    check(cfg.n_layers <= model.cfg.n_layers, section, "n_layers",
          f"{cfg.n_layers} is more than the model it cuts has ({model.cfg.n_layers})")


def cut(model: nn.Module, calib: torch.Tensor, d_model: int, n_layers: int, batch_size: int,
        max_heads: int = 0, max_ff: int = 0) -> dict:
    """Depth, then width, then heads and expert channels, in place, scored on `calib` windows
    (n, l+1). Returns what was removed."""
    scores = activation_scores(model, calib.split(batch_size))
    layers = layers_to_remove(scores, n_layers) if n_layers < len(model.layers) else []
    if layers:
        prune_layers(model, layers)
    channels = []
    if d_model < model.cfg.d_model:
        scores = activation_scores(model, calib.split(batch_size))  # rescored on the blocks kept
        channels = channels_to_remove(scores, d_model)
        prune_residual(model, channels)
    info = {"layers_removed": layers, "layer_influence": [round(float(v), 6) for v in scores.layers],
            "channels_removed": len(channels)}
    if max_heads or max_ff:
        info.update(cap_units(model, calib.split(batch_size), max_heads, max_ff))
    return info


def cap_units(model: nn.Module, batches, max_heads: int, max_ff: int) -> dict:
    """Keep at most `max_heads` SSM heads and `max_ff` channels per expert in every layer (0: no
    limit), removing the lowest first-order Taylor scores (`prune.importance`) on `batches`."""
    scores = importance_scores(model, "taylor", batches)
    plan = PrunePlan()
    heads_removed = channels_removed = 0
    for i, layer in enumerate(model.layers):
        h = model.cfg.heads(i)
        e, f = layer.moe.experts.w1.shape[:2]
        kh = max(0, h - max_heads) if max_heads else 0
        kf = max(0, f - max_ff) if max_ff else 0
        heads = sorted(torch.argsort(scores.heads[i].float(), stable=True)[:kh].tolist())
        chans = [sorted(torch.argsort(scores.channels[i][j].float(), stable=True)[:kf].tolist())
                 for j in range(e)] if kf else []
        plan.layers[i] = LayerPlan(heads=heads, channels=chans)
        heads_removed, channels_removed = heads_removed + kh, channels_removed + kf * e
    apply_plan(model, plan)
    return {"heads_removed": heads_removed, "expert_channels_removed": channels_removed}


@torch.no_grad()
def factorise_embedding(model: nn.Module, rank: int) -> nn.Module:
    """Replace a float model's dense tied (V, d) embedding by its best rank-`rank` factorisation
    (truncated SVD E = U S V^T: table U_r S_r^1/2, embed_in V_r S_r^1/2, head_proj S_r^1/2 V_r^T),
    in place; the lookup and the head then both compute with the rank-r product. Returns the model
    (a new IteraLite sharing every other tensor)."""
    from iteralite.core.model import IteraLite

    if not rank or model.cfg.embed_rank:
        return model
    E = model.embedding.weight.detach().double()
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    root = S[:rank].sqrt()
    cfg = dataclasses.replace(model.cfg, embed_rank=rank)
    out = IteraLite(cfg)
    state = {k: v for k, v in model.state_dict().items() if k != "embedding.weight"}
    state["embedding.weight"] = (U[:, :rank] * root).float()
    state["embed_in.weight"] = (Vh[:rank].T * root).float()
    state["head_proj.weight"] = (root[:, None] * Vh[:rank]).float()
    out.load_state_dict(state)
    return out


def make_student(teacher: nn.Module, start: nn.Module, train: torch.Tensor, dev: torch.Tensor, cfg: StudentConfig,
                 progress: bool = True, *, live=None) -> tuple[nn.Module, dict]:
    """Cut `start` (a float model, modified in place) and distil it from `teacher`:
    (the student, JSON-able stats: what was cut, dev losses, distillation stats). `live`: the
    stage's dvclive logger or None; the dev loss is logged at step 0 (the cut model) and after the
    last distillation step."""
    check_cut(start, cfg)
    check_stream(dev, cfg.seq_len, "student", "student.seq_len", "dev")
    calib = windows(dev, cfg.calib_windows, cfg.seq_len, cfg.seed)
    probe = windows(dev, cfg.dev_windows, cfg.seq_len, cfg.seed + 1)
    params_before = sum(p.numel() for p in start.parameters())
    info = cut(start, calib, cfg.d_model, cfg.n_layers, cfg.batch_size, cfg.max_heads, cfg.max_ff)
    start = factorise_embedding(start, cfg.embed_rank)
    info["embed_rank"] = cfg.embed_rank
    info.update(params_before=params_before, params_after=sum(p.numel() for p in start.parameters()),
                dev_loss_teacher=round(mean_loss(teacher, probe, cfg.batch_size), 6),
                dev_loss_cut=round(mean_loss(start, probe, cfg.batch_size), 6),
                distill_tokens=cfg.steps * cfg.batch_size * cfg.seq_len, distill_steps=cfg.steps)
    log_point(live, 0, {"dev_loss": info["dev_loss_cut"]})
    if cfg.steps:
        check_stream(train, cfg.seq_len, "student", "student.seq_len")
        info["distill"] = distill_train(start, teacher, train, cfg.distill_config(), progress, "student", live=live)
    info["dev_loss_student"] = round(mean_loss(start, probe, cfg.batch_size), 6)
    if cfg.steps:
        log_point(live, cfg.steps, {"dev_loss": info["dev_loss_student"]})
    log_summary(live, {k: info[k] for k in ("dev_loss_teacher", "dev_loss_cut", "dev_loss_student")})
    return start, info

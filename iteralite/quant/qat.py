"""Quantization-aware training: fake-quantized weights (the export's own quantizer, with a
straight-through gradient) and distillation from the FP32 teacher, then export to packed form.

Fake quantization is attached with `torch.nn.utils.parametrize`, so the float modules stay as
they are and `export` simply removes the parametrizations and quantizes the trained weights with
the same code path: the exported model computes exactly what the QAT forward computed.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from iteralite.io.params import check
from iteralite.quant.quantize import QuantSpec, fake_quantize
from iteralite.quant.qmodules import kind_of, make_spec_for, quantize_model
from iteralite.train.loop import get_batch, lr_at, set_threads


@dataclass
class QATConfig:
    seed: int = 7
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup_steps: int = 20
    grad_clip: float = 1.0
    distill_weight: float = 0.9  # loss = w * KL(teacher || student) + (1 - w) * CE
    temperature: float = 1.0
    aux_loss_coef: float = 0.01
    group_size: int = 64  # the exported 4-bit format (round to nearest, same quantizer as int4)
    symmetric: bool = False
    keep_float: list[str] = field(default_factory=lambda: ["dt_proj"])
    threads: int = 0

    def validate(self, section: str = "qat") -> None:
        check(self.steps >= 1, section, "steps", "must be >= 1")
        check(self.batch_size >= 1, section, "batch_size", "must be >= 1")
        check(self.seq_len >= 2, section, "seq_len", "must be >= 2")
        check(self.lr > 0, section, "lr", "must be > 0")
        check(0 <= self.min_lr <= self.lr, section, "min_lr", "must be in [0, lr]")
        check(0 <= self.warmup_steps < self.steps, section, "warmup_steps", "must be in [0, steps)")
        check(0.0 <= self.distill_weight <= 1.0, section, "distill_weight", "must be in [0, 1]")
        check(self.temperature > 0, section, "temperature", "must be > 0")
        check(self.grad_clip > 0, section, "grad_clip", "must be > 0")
        QuantSpec(4, self.group_size, self.symmetric, "rtn").validate(section)


class FakeQuant(nn.Module):
    """Parametrization: weight -> dequantize(quantize(weight)) with a straight-through gradient."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec

    def forward(self, w):
        s = self.spec
        return fake_quantize(w, s.bits, s.group_size, s.symmetric)


def _weight_slots(name: str, module: nn.Module) -> list[str]:
    if isinstance(module, nn.Linear):
        return ["weight"]
    if hasattr(module, "w1") and hasattr(module, "w2"):
        return ["w1", "w2"]
    return ["weight"]


def attach_fake_quant(model: nn.Module, spec: QuantSpec, keep_float=("dt_proj",)) -> dict:
    """Register FakeQuant on every weight the export will quantize; returns {module name: spec}."""
    if spec.method != "rtn" or spec.clip:
        # fake_quantize has no range search, so only plain RTN export equals the QAT forward
        raise ValueError(f"QAT trains against plain round-to-nearest codes (method 'rtn', clip off); got {spec}")
    spec_for = make_spec_for(spec, keep_float)
    chosen = {}
    for name, module in list(model.named_modules()):
        if kind_of(module) is None:
            continue
        s = spec_for(name, module)
        if s is None:
            continue
        for slot in _weight_slots(name, module):
            parametrize.register_parametrization(module, slot, FakeQuant(s))
        chosen[name] = s
    return chosen


def strip_fake_quant(model: nn.Module) -> nn.Module:
    """Remove every FakeQuant parametrization, keeping the trained float weights."""
    for name, module in list(model.named_modules()):
        if parametrize.is_parametrized(module):
            for slot in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, slot, leave_parametrized=False)
    return model


def export(model: nn.Module, chosen: dict) -> nn.Module:
    """Remove fake quant (keeping the trained float weights) and swap in packed modules."""
    strip_fake_quant(model)
    return quantize_model(model, lambda name, m: chosen.get(name))


def distill_loss(student_logits, teacher_logits, targets, cfg: QATConfig):
    t = cfg.temperature
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V)
    kl = F.kl_div(F.log_softmax(s / t, -1), F.log_softmax(teacher_logits.reshape(-1, V) / t, -1),
                  log_target=True, reduction="batchmean") * (t * t)
    ce = F.cross_entropy(s, targets.reshape(-1))
    return cfg.distill_weight * kl + (1 - cfg.distill_weight) * ce, ce


def distill_train(student: nn.Module, teacher: nn.Module, data: torch.Tensor, cfg: QATConfig,
                  progress: bool = True, desc: str = "qat") -> dict:
    """Train `student` (fake-quantized or not) towards `teacher` on random windows of `data`."""
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    teacher.eval()
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0 = time.perf_counter()
    ema = None
    bar = tqdm(range(cfg.steps), disable=not progress, desc=desc, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        batch = get_batch(data, cfg.batch_size, cfg.seq_len, cfg.seed, step)
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            t_logits = teacher(x)[0]
        with parametrize.cached():
            s_logits, aux = student(x)
            loss, ce = distill_loss(s_logits, t_logits, y, cfg)
            loss = loss + cfg.aux_loss_coef * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema = ce.item() if ema is None else 0.95 * ema + 0.05 * ce.item()
        bar.set_postfix(ce=f"{ema:.3f}")
    student.eval()
    return {"steps": cfg.steps, "seconds": round(time.perf_counter() - t0, 1), "final_train_ce": round(ema, 5)}


def qat(fp32_model: nn.Module, spec: QuantSpec, data: torch.Tensor, cfg: QATConfig, progress: bool = True,
        student: nn.Module | None = None, desc: str = "qat"):
    """FP32 teacher -> (packed quantized model, stats). The student starts as a copy of the
    teacher unless given (e.g. a pruned, dequantized model for recovery fine-tuning)."""
    teacher = fp32_model
    student = copy.deepcopy(fp32_model) if student is None else student
    chosen = attach_fake_quant(student, spec, tuple(cfg.keep_float))
    stats = distill_train(student, teacher, data, cfg, progress, desc)
    return export(student, chosen), stats

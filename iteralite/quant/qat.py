"""Quantization-aware training: fake-quantized weights (the export's own quantizer, with a
straight-through gradient) and distillation from the FP32 teacher, then export to packed form.

Fake quantization is attached with `torch.nn.utils.parametrize`, so the float modules stay as
they are and `export` simply removes the parametrizations and quantizes the trained weights with
the same code path: the exported model computes exactly what the QAT forward computed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from iteralite.io.params import check
from iteralite.quant.fake import FakeQuant
from iteralite.quant.learned import LearnedRange
from iteralite.quant.spec import QuantSpec
from iteralite.quant.swap import SpecFor, kind_of, make_spec_for, quantize
from iteralite.train.distill import distill_train
from iteralite.train.loop import ScheduleConfig

_SLOTS = {"linear": ("weight",), "embedding": ("weight",), "experts": ("w1", "w2")}


@dataclass
class QATConfig(ScheduleConfig):
    """Distillation settings (the qat and finetune sections; prune's recovery and the mixed
    fine-tune reuse `finetune`'s) and the exported 4-bit format."""

    seed: int = 7
    steps: int = 300
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup_steps: int = 20
    distill_weight: float = 0.9  # loss = w * KL(teacher || student) + (1 - w) * CE
    temperature: float = 1.0
    group_size: int = 64  # the exported 4-bit format (round to nearest, same quantizer as int4)
    symmetric: bool = False
    keep_float: list[str] = field(default_factory=lambda: ["dt_proj"])
    learned_range: bool = False  # train a per-group range with the weights (quant.learned) instead of min/max

    def validate(self, section: str = "qat") -> None:
        super().validate(section)
        check(0.0 <= self.distill_weight <= 1.0, section, "distill_weight", "must be in [0, 1]")
        check(self.temperature > 0, section, "temperature", "must be > 0")
        QuantSpec(4, self.group_size, self.symmetric, "rtn").validate(section)


def rtn_spec_for(spec: QuantSpec, keep_float=("dt_proj",)) -> SpecFor:
    """The spec_for of uniform QAT: `spec` on every quantizable module but `keep_float`. Only plain
    round-to-nearest export equals the QAT forward (fake quantization has no range search)."""
    if spec.method != "rtn" or spec.clip:
        raise ValueError(f"QAT trains against plain round-to-nearest codes (method 'rtn', clip off); got {spec}")
    return make_spec_for(spec, keep_float)


def attach_fake_quant(model: nn.Module, spec_for: SpecFor, learned: bool = False) -> dict:
    """Register FakeQuant (learned: LearnedRange, a trained range per group) on every weight
    `spec_for` names; returns {module name: spec}, the spec_for of the matching export."""
    chosen = {}
    for name, module in list(model.named_modules()):
        kind = kind_of(module)
        spec = None if kind is None else spec_for(name, module)
        if spec is None:
            continue
        for slot in _SLOTS[kind]:
            fq = LearnedRange(spec, getattr(module, slot)) if learned and _integer(spec) else FakeQuant(spec)
            parametrize.register_parametrization(module, slot, fq)
        chosen[name] = spec
    return chosen


def _integer(spec) -> bool:
    return any(s.method != "fp16" for s in (spec if isinstance(spec, (list, tuple)) else [spec]))


def strip_fake_quant(model: nn.Module) -> nn.Module:
    """Remove every fake-quant parametrization, keeping the trained float weights; a LearnedRange
    weight is kept clamped to its learned range, so the plain export quantizes it as trained."""
    for name, module in list(model.named_modules()):
        if parametrize.is_parametrized(module):
            for slot in list(module.parametrizations.keys()):
                plist = module.parametrizations[slot]
                if isinstance(plist[0], LearnedRange):
                    with torch.no_grad():
                        plist.original.copy_(plist[0].clamped(plist.original))
                parametrize.remove_parametrizations(module, slot, leave_parametrized=False)
    return model


def export(model: nn.Module, chosen: dict) -> nn.Module:
    """Remove fake quant (keeping the trained float weights) and swap in the stored modules."""
    strip_fake_quant(model)
    return quantize(model, lambda name, m: chosen.get(name))


def distill_quantized(student: nn.Module, teacher: nn.Module, data: torch.Tensor, spec_for: SpecFor,
                      cfg: "QATConfig", progress: bool = True, desc: str = "qat", *, live=None,
                      step_offset: int = 0, round_index: int | None = None):
    """Fake-quantize `student` as `spec_for` says, distill it from `teacher`, export it:
    (stored model, training stats). Every QAT-style stage goes through here. live, step_offset,
    round_index: the stage's dvclive logger and where this run's steps go (`distill_train`)."""
    chosen = attach_fake_quant(student, spec_for, learned=cfg.learned_range)
    stats = distill_train(student, teacher, data, cfg, progress, desc, live=live, step_offset=step_offset,
                          round_index=round_index)
    return export(student, chosen), stats


def qat(fp32_model: nn.Module, spec: QuantSpec, data: torch.Tensor, cfg: "QATConfig", progress: bool = True,
        student: nn.Module | None = None, desc: str = "qat", *, live=None):
    """FP32 teacher -> (packed quantized model, stats). The student starts as a copy of the
    teacher unless given (e.g. a pruned, dequantized model for recovery fine-tuning). live: the
    stage's dvclive logger or None."""
    student = copy.deepcopy(fp32_model) if student is None else student
    return distill_quantized(student, fp32_model, data, rtn_spec_for(spec, tuple(cfg.keep_float)), cfg, progress, desc,
                             live=live)

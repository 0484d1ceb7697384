"""GPTQ-compensated starting weights for an allocation's fine-tune (`mixed_precision.finetune_init: gptq`).

Round to nearest quantizes every weight on its own; GPTQ (`quant.gptq`) quantizes a weight's
input columns one by one and spreads each column's rounding error over the columns not yet
quantized through the inverse Hessian of the layer's inputs, so the layer's output moves less.
Here it only shapes the *starting point* of a fine-tune: each low-bit unit's float weights are
replaced by their GPTQ-quantized values (dequantized), and the fine-tune then attaches its own
fake quantization to them as it would to the student's weights. The stored artifact is still
what the fine-tune exports; nothing changes on disk or in any runtime.

The Hessians come from training windows (`collect_act_stats(..., hessian=True)`), never from the
dev windows the budget is checked on."""
from __future__ import annotations

import copy

import torch
from torch import nn

from iteralite.quant.calib_stats import collect_act_stats
from iteralite.quant.gptq import quantize_gptq
from iteralite.quant.registry import PRECISIONS, format_of
from iteralite.quant.units import check_allocation, split_expert

MAX_BITS = 4  # wider units lose too little to round to nearest to be worth the pass
SLOTS = ("w1", "w2")  # an expert unit's two matrices: (f, d) and (d, f)


def unit_hessians(model: nn.Module, wins: torch.Tensor, batch_size: int) -> dict:
    """X^T X / n of every weight's inputs over token windows (n, l) (`collect_act_stats` keys)."""
    return collect_act_stats(model, (wins[i:i + batch_size] for i in range(0, len(wins), batch_size)),
                             hessian=True)


def gptq_weight(w: torch.Tensor, H: torch.Tensor, precision: int, group_size: int, name: str) -> torch.Tensor:
    """w (out, in) quantized by GPTQ at `precision` with Hessian H (in, in), dequantized."""
    spec = PRECISIONS[precision].spec(w.shape[-1], group_size)
    return quantize_gptq(w.detach().float(), H, spec.bits, spec.group_size, spec.symmetric, name=name).dequantize()


def _integer(precision: int) -> bool:
    p = PRECISIONS[precision]
    return format_of(p.method).integer and p.bits <= MAX_BITS


@torch.no_grad()
def gptq_start(model: nn.Module, allocation: dict, hessians: dict, group_size: int) -> nn.Module:
    """A float copy of `model` whose units allocated at most MAX_BITS (ternary included) hold their
    GPTQ-quantized weights; the other units and every other tensor as in `model`."""
    out = copy.deepcopy(model)
    for unit, p in check_allocation(model, allocation).items():
        if not _integer(p):
            continue
        base, e = split_expert(unit)
        mod = out.get_submodule(base)
        if e is None:
            mod.weight.copy_(gptq_weight(mod.weight, hessians[base], p, group_size, unit))
            continue
        for slot in SLOTS:
            w = getattr(mod, slot)
            w[e].copy_(gptq_weight(w[e], hessians[f"{base}.{slot}"][e], p, group_size, f"{unit}.{slot}"))
    return out

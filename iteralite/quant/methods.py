"""The tensor-level method registry: method name -> its storage class, its quantizer and the
calibration statistic it needs. `quantize_tensor` is the one entry point every module uses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from iteralite.quant.awq import quantize_awq
from iteralite.quant.gptq import quantize_gptq
from iteralite.quant.intcodes import QTensor, quantize_rtn
from iteralite.quant.nf4 import NF4Tensor, quantize_nf4
from iteralite.quant.spec import INT_METHODS, QuantSpec, check_group_size


@dataclass(frozen=True)
class Method:
    """One quantization method: its storage class and how to quantize a weight with it.

    stat: which calibration statistic it needs ("act_sq_mean" (*lead, in), "hessian"
    (*lead, in, in)) or None."""

    tensor_cls: type
    quantize: Callable
    stat: str | None


def _q_rtn(w, spec, stat, name):
    return quantize_rtn(w, spec.bits, spec.group_size, spec.symmetric, clip=spec.clip,
                        clip_weight=stat, name=name, scale_bits=spec.scale_bits)


def _q_awq(w, spec, stat, name):
    return quantize_awq(w, stat, spec.bits, spec.group_size, spec.symmetric, clip=spec.clip, name=name)


def _q_gptq(w, spec, stat, name):
    return quantize_gptq(w, stat, spec.bits, spec.group_size, spec.symmetric, name=name)


def _q_nf4(w, spec, stat, name):
    return quantize_nf4(w, spec.group_size)


METHODS: dict[str, Method] = {
    "rtn": Method(QTensor, _q_rtn, None),
    "awq": Method(QTensor, _q_awq, "act_sq_mean"),
    "gptq": Method(QTensor, _q_gptq, "hessian"),
    "nf4": Method(NF4Tensor, _q_nf4, None),
}


def quantize_tensor(w: torch.Tensor, spec: QuantSpec, stat: torch.Tensor | None = None,
                    name: str = "weight"):
    """Quantize w (out, in) or (e, out, in) with `spec`; stat is the calibration statistic the
    method needs (see Method.stat; rtn uses an optional act_sq_mean only to weight clipping)."""
    spec.validate()
    method = METHODS[spec.method]
    if spec.method in INT_METHODS:
        check_group_size(name, w.shape[-1], spec.group_size)
    if method.stat is not None and stat is None:
        raise ValueError(f"quantize: method '{spec.method}' needs calibration statistic "
                         f"'{method.stat}' for '{name}'; pass act_stats from collect_act_stats("
                         f"model, batches, hessian={method.stat == 'hessian'})")
    return method.quantize(w, spec, _adapt_stat(stat, w, method.stat, name), name)


def _adapt_stat(stat, w: torch.Tensor, want: str | None, name: str):
    """Let one collection serve every method: a Hessian (*lead, in, in) gives act_sq_mean as its
    diagonal (X^T X / n has mean x^2 on it). A per-channel statistic cannot stand in for a Hessian."""
    if stat is None:
        return None
    per_channel = (*w.shape[:-2], w.shape[-1])
    if tuple(stat.shape) == per_channel + (w.shape[-1],) and want != "hessian":
        return stat.diagonal(dim1=-2, dim2=-1)
    if want == "hessian" and tuple(stat.shape) != per_channel + (w.shape[-1],):
        raise ValueError(f"quantize: gptq needs a Hessian {per_channel + (w.shape[-1],)} for '{name}', "
                         f"got shape {tuple(stat.shape)}; use collect_act_stats(..., hessian=True)")
    return stat


def dequantize(qt) -> torch.Tensor:
    """QTensor or NF4Tensor -> float32 weight of its shape."""
    return qt.dequantize()

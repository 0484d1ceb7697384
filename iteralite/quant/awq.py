"""AWQ: activation-aware per-input-channel scaling folded into integer storage."""
from __future__ import annotations

import math

import torch

from iteralite.quant.intcodes import QTensor, quantize_rtn, stack_qtensors
from iteralite.quant.spec import QuantSpec, check_group_size

AWQ_ALPHAS = tuple(i / 10 for i in range(11))


def weighted_error(w: torch.Tensor, wq: torch.Tensor, act_sq_mean: torch.Tensor) -> torch.Tensor:
    """Diagonal approximation of E||x W^T - x Wq^T||^2: sum_in act_sq_mean[in] * (W - Wq)^2.

    w, wq (*lead, out, in); act_sq_mean (*lead, in). Returns a scalar."""
    return ((w - wq) ** 2 * act_sq_mean.unsqueeze(-2)).sum()


def awq_in_scale(act_sq_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel scale rms(x)^alpha, normalized to geometric mid-range 1, as fp16 (in,)."""
    a = act_sq_mean.float()
    a = a.clamp(min=a.max().clamp(min=1e-30) * 1e-8)  # dead channels: keep the scale finite and > 0
    s = a ** (alpha / 2)
    s = s / (s.max() * s.min()).sqrt()
    return s.half()


def _awq_2d(w, act_sq_mean, bits, group_size, symmetric, clip, alphas, name):
    """w (out, in), act_sq_mean (in,) -> best QTensor over the alpha grid."""
    best, best_err = None, math.inf
    for alpha in alphas:
        qt = quantize_rtn(w, bits, group_size, symmetric, in_scale=awq_in_scale(act_sq_mean, alpha),
                          clip=clip, clip_weight=act_sq_mean, name=name)
        err = float(weighted_error(w, qt.dequantize(), act_sq_mean))
        if err < best_err:  # strict: ties keep the smaller alpha (alpha=0 is plain RTN)
            best, best_err = qt, err
    return best


def quantize_awq(w: torch.Tensor, act_sq_mean: torch.Tensor, bits: int, group_size: int,
                 symmetric: bool, *, clip: bool = False, alphas=AWQ_ALPHAS, name: str = "weight") -> QTensor:
    """Activation-aware scaling: pick alpha so that quantizing w * s, s = act_sq_mean^(alpha/2),
    minimizes `weighted_error`. w (out, in) with act_sq_mean (in,), or (e, out, in) with (e, in)
    (each expert searched on its own). The chosen s is stored as in_scale."""
    QuantSpec(bits, group_size, symmetric, "awq").validate()
    check_group_size(name, w.shape[-1], group_size)
    w = w.detach().float()
    act_sq_mean = act_sq_mean.detach().float()
    if act_sq_mean.shape != (*w.shape[:-2], w.shape[-1]):
        raise ValueError(f"awq: act_sq_mean for '{name}' has shape {tuple(act_sq_mean.shape)}, "
                         f"expected {(*w.shape[:-2], w.shape[-1])}")
    if w.dim() == 2:
        return _awq_2d(w, act_sq_mean, bits, group_size, symmetric, clip, alphas, name)
    parts = [_awq_2d(w[e], act_sq_mean[e], bits, group_size, symmetric, clip, alphas, f"{name}[{e}]")
             for e in range(w.shape[0])]
    return stack_qtensors(parts)

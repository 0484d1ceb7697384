"""Fake quantization for quantization-aware training: the export's quantizer in the forward
pass with a straight-through gradient, attached to weights with `torch.nn.utils.parametrize`."""
from __future__ import annotations

import torch
from torch import nn

from iteralite.quant.intcodes import group_codes, split_groups, in_channel_view, quantize_rtn
from iteralite.quant.spec import QuantSpec, fitted


class _STE(torch.autograd.Function):
    """Forward returns the dequantized weight exactly; backward passes the gradient to w where
    the value fell inside the quantization range (zero where it was clamped)."""

    @staticmethod
    def forward(ctx, w, wq, mask):
        ctx.save_for_backward(mask)
        return wq

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  in_scale: torch.Tensor | None = None, scale_bits: int = 0) -> torch.Tensor:
    """dequantize(quantize_rtn(w)) with a straight-through gradient. w (*lead, out, in).
    Uses the export's code path, so the forward equals the exported weights bit for bit."""
    with torch.no_grad():
        qt = quantize_rtn(w, bits, group_size, symmetric, in_scale=in_scale, scale_bits=scale_bits)
        wq = qt.dequantize().to(w.dtype)
        ws = w.detach().float()
        if qt.in_scale is not None:
            ws = ws * in_channel_view(qt.in_scale)
        _, mask = group_codes(split_groups(ws, group_size), qt.scales, qt.zeros, bits, symmetric, return_mask=True)
        mask = mask.reshape(w.shape).to(w.dtype)
    return _STE.apply(w, wq, mask)


# --------------------------------------------------------------------------- activations


def quantize_activations_int8(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token symmetric int8 fake quantization: x (..., d) -> dequantized (..., d)."""
    s = (x.abs().amax(-1, keepdim=True) / 127.0).clamp(min=1e-12)
    return torch.round(x / s).clamp(-127, 127) * s


def fake_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """dequantize(quantize(w)) under `spec` (integer round to nearest or fp16), no gradient."""
    if spec.method == "fp16":
        return w.detach().half().float()
    return quantize_rtn(w, spec.bits, spec.group_size, spec.symmetric, scale_bits=spec.scale_bits).dequantize()


def fake_ste(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.method == "fp16":
        return w + (w.half().float() - w).detach()
    return fake_quantize(w, spec.bits, spec.group_size, spec.symmetric, scale_bits=spec.scale_bits)


class FakeQuant(nn.Module):
    """Parametrization: weight -> its stored value under `spec` with a straight-through gradient.
    `spec` is a QuantSpec (plain round to nearest or fp16), or for experts' 3-D weights
    (e, out, in) a list of one spec per expert, fitted to the weight's input dim."""

    def __init__(self, spec: QuantSpec | list[QuantSpec]):
        super().__init__()
        self.spec = spec

    def forward(self, w):
        if isinstance(self.spec, (list, tuple)):
            return torch.stack([fake_ste(w[e], fitted(s, w.shape[-1])) for e, s in enumerate(self.spec)])
        return fake_ste(w, self.spec)

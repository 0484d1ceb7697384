"""Learned quantization ranges for quantization-aware training (LSQ-style: the step size is
trained with the weights; here through a per-group range shrink).

Plain round to nearest takes each group's range from its min and max, so at 2 bits one outlier
spreads the four levels over a range most weights never use. `LearnedRange` is a
parametrization that clamps each group to `shrink` times its range (shrink per group, a trained
parameter initialised by the MSE-optimal clip search) and then round-to-nearest quantizes the
clamped weight:

    lo, hi   = min(group) (<= 0), max(group) (>= 0)
    w_c      = clamp(w, shrink * lo, shrink * hi)
    forward  = dequantize(quantize_rtn(w_c))      (the export's own quantizer, bit for bit)

Because the clamped weight's min and max ARE shrink * lo and shrink * hi, quantize_rtn(w_c)
uses exactly that range: export replaces each weight by its clamped value (`clamped`) and runs
the ordinary export, so the stored codes, scales and zero-points are what the forward used and
nothing new is stored. Gradients: the weights get the straight-through estimate (1 inside the
range, 0 where clamped); shrink gets LSQ's step-size gradient through the scale
(round(w/s) - w/s inside, the clamp level outside) and through the clamp bounds.
"""
from __future__ import annotations

import torch
from torch import nn

from iteralite.quant.fake import fake_ste
from iteralite.quant.intcodes import clip_search, float_step, group_params, split_groups
from iteralite.quant.spec import QuantSpec, fitted

SHRINK_MIN = 0.05  # the range never collapses below 5% of the group's min/max


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) exactly in value, identity gradient."""
    return torch.round(x.detach()) + (x - x.detach())


def clamp_to_range(w: torch.Tensor, shrink: torch.Tensor, group_size: int) -> torch.Tensor:
    """w (*lead, out, in) clamped per group to shrink * [min (<= 0), max (>= 0)]; shrink (*lead, out, G)."""
    wg = split_groups(w, group_size)
    sh = shrink.clamp(SHRINK_MIN, 1.0)[..., None]
    lo = wg.detach().amin(-1, keepdim=True).clamp(max=0) * sh
    hi = wg.detach().amax(-1, keepdim=True).clamp(min=0) * sh
    return torch.maximum(torch.minimum(wg, hi), lo).reshape(w.shape)


def learned_fake_quantize(w: torch.Tensor, shrink: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The forward of `LearnedRange` for one weight (*lead, out, in) under integer `spec`."""
    bits, g, sym = spec.bits, spec.group_size, spec.symmetric
    wc = split_groups(clamp_to_range(w, shrink, g), g)
    s16, z16 = group_params(wc.detach().float(), bits, sym, scale_bits=spec.scale_bits)  # the export's, exactly
    # the float step size the stored fp16 scale rounds up from, differentiable in shrink
    s = float_step(wc, bits, sym)
    step = (s16.float() + (s - s.detach()))[..., None]  # value: the fp16 scale; gradient: d s
    if sym:
        lim = 2 ** (bits - 1) - 1
        q = _round_ste(wc / step).clamp(-lim, lim)
        out = q * step
    else:
        z = z16.float()[..., None]
        q = (_round_ste(wc / step) + z).clamp(0, 2 ** bits - 1)
        out = (q - z) * step
    return out.reshape(w.shape).to(w.dtype)


class LearnedRange(nn.Module):
    """Parametrization: weight -> its round-to-nearest value inside a trained per-group range.
    spec: an integer QuantSpec, or for experts' 3-D weights a list of one spec per expert (fitted
    to the input dim; fp16 entries pass through with a straight-through fp16 rounding)."""

    def __init__(self, spec: QuantSpec | list[QuantSpec], w: torch.Tensor):
        super().__init__()
        self.spec = spec
        specs = spec if isinstance(spec, (list, tuple)) else [spec]
        weights = list(w) if isinstance(spec, (list, tuple)) else [w]
        self.shrink = nn.ParameterList(
            nn.Parameter(self._init(wi.detach().float(), fitted(s, wi.shape[-1]))) for s, wi in zip(specs, weights))

    @staticmethod
    def _init(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        if spec.method == "fp16":
            return torch.ones(0)
        return clip_search(w, spec.bits, spec.group_size, spec.symmetric, scale_bits=spec.scale_bits)

    def _one(self, w, spec, shrink):
        spec = fitted(spec, w.shape[-1])
        if spec.method == "fp16":
            return fake_ste(w, spec)
        return learned_fake_quantize(w, shrink, spec)

    def forward(self, w):
        if isinstance(self.spec, (list, tuple)):
            return torch.stack([self._one(w[e], s, self.shrink[e]) for e, s in enumerate(self.spec)])
        return self._one(w, self.spec, self.shrink[0])

    @torch.no_grad()
    def clamped(self, w: torch.Tensor) -> torch.Tensor:
        """The float weight whose plain round-to-nearest export equals this forward."""
        def one(wi, spec, shrink):
            spec = fitted(spec, wi.shape[-1])
            return wi.clone() if spec.method == "fp16" else clamp_to_range(wi, shrink, spec.group_size)
        if isinstance(self.spec, (list, tuple)):
            return torch.stack([one(w[e], s, self.shrink[e]) for e, s in enumerate(self.spec)])
        return one(w, self.spec, self.shrink[0])

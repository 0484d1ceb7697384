"""Calibration statistics: per-weight input statistics (mean x^2 per input channel, or X^T X)
gathered by running the float model, for AWQ, GPTQ and clipping."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from iteralite.quant.swap import kind_of

class _Accum:
    """Running sum of x^2 per channel (or of x^T x) and the token count."""

    SAMPLE = 4096  # |x| values kept per batch for the percentile estimate

    def __init__(self, hessian: bool):
        self.hessian, self.total, self.count = hessian, None, 0
        self.absmax, self.samples = 0.0, []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        s = x.T @ x if self.hessian else (x * x).sum(0)
        self.total = s if self.total is None else self.total + s
        self.count += x.shape[0]
        a = x.abs().flatten().float()
        if a.numel():
            self.absmax = max(self.absmax, float(a.max()))
            step = max(1, a.numel() // self.SAMPLE)
            self.samples.append(a[::step].clone())  # a copy: a strided view would keep all of `a` alive

    def ranges(self, q: float = 0.999) -> tuple[float, float]:
        """(absmax, q-quantile of |x|) over what was added (from a strided sample)."""
        if not self.samples:
            return 0.0, 0.0
        return self.absmax, float(torch.quantile(torch.cat(self.samples)[:16_000_000], q))

    def mean(self, width: int) -> torch.Tensor:
        """-> (width,) mean x^2, or (width, width) X^T X / n; zeros if nothing was added."""
        if self.total is None:  # never reached (e.g. an expert no token was routed to)
            shape = (width, width) if self.hessian else (width,)
            return torch.zeros(shape)
        return (self.total / self.count).float()


@torch.no_grad()
def collect_act_stats(model: nn.Module, batches: Iterable[torch.Tensor], hessian: bool = False,
                      ranges: dict | None = None) -> dict:
    """Run the float model on token batches (b, l) and collect per-weight input statistics.

    Keys: a Linear's name -> (in,); '<experts>.w1' -> (e, d) and '<experts>.w2' -> (e, f) (per
    expert, over the tokens routed to it); the TiedEmbedding's name -> (d,) (inputs of `attend`).
    Values are mean x^2 (for awq/clipping), or with hessian=True X^T X / n with an extra in dim
    (for gptq). If `ranges` is a dict, it is filled with {key: (absmax, p99.9 of |x|)} per
    accumulator key (experts per expert: '<experts>.w1[e]')."""
    acc: dict[str, _Accum] = {}
    handles, patched = [], []

    def get(key):
        return acc.setdefault(key, _Accum(hessian))

    for name, m in model.named_modules():
        kind = kind_of(m)
        if kind == "linear":
            handles.append(m.register_forward_pre_hook(lambda mod, args, key=name: get(key).add(args[0])))
        elif kind == "embedding":
            def attend(h, m=m, key=name):
                get(key).add(h)
                return type(m).attend(m, h)
            m.attend = attend
            patched.append((m, "attend"))
        elif kind == "experts":
            def run(e, x, m=m, key=name):
                get(f"{key}.w1[{e}]").add(x)
                get(f"{key}.w2[{e}]").add(F.silu(F.linear(x, m.w1[e])))
                return type(m).run(m, e, x)
            m.run = run
            patched.append((m, "run"))
    try:
        for idx in batches:
            model(idx)
    finally:
        for h in handles:
            h.remove()
        for m, attr in patched:
            delattr(m, attr)
    if ranges is not None:
        ranges.update({k: a.ranges() for k, a in acc.items()})
    return _finish_stats(model, acc, hessian)


def _finish_stats(model: nn.Module, acc: dict, hessian: bool) -> dict:
    """Accumulators -> mean statistics, stacking experts into (e, ...)."""
    out = {}
    for name, m in model.named_modules():
        kind = kind_of(m)
        if kind in ("linear", "embedding") and name in acc:
            width = m.in_features if kind == "linear" else m.weight.shape[1]
            out[name] = acc[name].mean(width)
        elif kind == "experts":
            e, f, d = m.w1.shape
            for w, width in (("w1", d), ("w2", f)):
                out[f"{name}.{w}"] = torch.stack([acc.get(f"{name}.{w}[{i}]", _Accum(hessian)).mean(width)
                                                  for i in range(e)])
    return out

"""Residual-width (d_model) pruning: remove residual-stream channels from every tensor that has a
d_model dimension, and set cfg.d_model, so the cut model rebuilds from its config.

Where d_model lives (read from core/model.py, ssm.py, moe.py; `RESIDUAL_DIMS` holds it as data):
  writes the stream   embedding.weight (V, d) columns (the input embedding; the same tensor is the
                      tied LM head, which reads the stream), mixer.out_proj.weight (d, h*p) rows,
                      moe.experts.w2 (e, d, f) dim 1
  reads the stream    norm1/norm2/norm_f weights (d); after a norm: mixer.in_proj.weight
                      (2*h*p, d) columns, moe.router.weight (e, d) columns, moe.experts.w1
                      (e, f, d) dim 2
Nothing else has a d_model dimension (x_proj, conv1d, dt_proj, A_log, D are d_inner / per head);
`rebuild.check_rebuilds` compares every tensor against IteraLite(cfg) after the cut.

Norm compensation. Channels C of the stream are "off" when every writer's C entries are zero
(`mask_residual_channels`, the reference twin): the stream is then exactly 0 there, but each
RMSNorm still divides by the mean over d_old channels, x / sqrt(S / d_old + eps) with S the sum of
squares of the kept channels. The cut model averages over d_new. With a = sqrt(d_new / d_old)
the cut model multiplies every writer by a (the stream becomes a * x) and every norm weight by
1 / a: a*x * (w / a) / sqrt(a^2 S / d_new + eps) = x * w / sqrt(S / d_old + eps), which is the
reference's norm output exactly, eps included (scaling only the norm weights by sqrt(d_old/d_new)
would be exact only for eps = 0; eps is fixed in core/model.py, so it cannot be rescaled instead).
Every block then reads what it read before and writes a times as much, so the stream stays
a * x. The tied head sees the scaled embedding a * E, so norm_f's weight gets a further 1 / a
(1 / a^2 in all) and the logits are unchanged. All of this is linear, so the step() path agrees too.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from torch import nn

from iteralite.core.model import TiedEmbedding
from iteralite.core.moe import MoE
from iteralite.core.ssm import SSM
from iteralite.prune.rebuild import check_indices, check_rebuilds, require_plain

# module type -> {parameter name inside it: (dimension that is d_model, writes the stream?)}.
# The one dispatch point for residual-width cuts: a new module type with a d_model tensor
# registers here (and check_rebuilds fails until it does).
RESIDUAL_DIMS: dict[type, dict[str, tuple[int, bool]]] = {
    TiedEmbedding: {"weight": (1, True)},
    nn.RMSNorm: {"weight": (0, False)},
    SSM: {"in_proj.weight": (1, False), "out_proj.weight": (0, True)},
    MoE: {"router.weight": (1, False), "experts.w1": (2, False), "experts.w2": (1, True)},
}


def _residual_params(model):
    """(owner module, leaf name, parameter, d_model dim, writes?, module) for every d_model tensor."""
    for _, module in model.named_modules():
        for pname, (dim, writes) in RESIDUAL_DIMS.get(type(module), {}).items():
            prefix, _, leaf = pname.rpartition(".")
            owner = module.get_submodule(prefix) if prefix else module
            yield owner, leaf, getattr(owner, leaf), dim, writes, module


def _fix_shape_attrs(module: nn.Module) -> None:
    """The attributes that repeat a weight's shape (read by forward and by repr)."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.RMSNorm):
        module.normalized_shape = (module.weight.shape[0],)


@torch.no_grad()
def mask_residual_channels(model, channels: Sequence[int]) -> nn.Module:
    """Reference twin of `prune_residual`: zero `channels` in every tensor that writes the residual
    stream (embedding columns, out_proj rows, experts' w2 rows) in place, so the stream is 0 there.
    Shapes, norms and cfg are unchanged. Returns the model."""
    require_plain(model)
    chans = torch.tensor(check_indices(channels, model.cfg.d_model, "residual channels",
                                       "residual-width masking"), dtype=torch.long)
    for _, _, p, dim, writes, _ in _residual_params(model):
        if writes:
            p.index_fill_(dim, chans.to(p.device), 0.0)
    return model


@torch.no_grad()
def prune_residual(model, channels: Sequence[int]) -> nn.Module:
    """Remove residual channels `channels` (indices into d_model) in place from every d_model
    tensor, rescale writers by a = sqrt(d_new / d_old) and norm weights by 1 / a (norm_f by 1 / a^2;
    see the module docstring), and set model.cfg (a new object) to d_model = d_new.

    The result computes exactly what `mask_residual_channels(model, channels)` computes (logits,
    step(), balance loss) up to float rounding. Parameters are new tensors without gradients:
    rebuild any optimizer. IteraliteError for indices out of range, repeated, or all of them.
    """
    require_plain(model)
    d_old = model.cfg.d_model
    drop = check_indices(channels, d_old, "residual channels", "residual-width pruning")
    gone = set(drop)
    keep = torch.tensor([c for c in range(d_old) if c not in gone], dtype=torch.long)
    a = residual_scale(d_old, keep.numel())
    for owner, leaf, p, dim, writes, module in list(_residual_params(model)):
        scale = a if writes else 1.0
        if isinstance(module, nn.RMSNorm):
            scale = 1.0 / a if module is not model.norm_f else 1.0 / (a * a)
        w = p.detach().index_select(dim, keep.to(p.device)) * scale
        setattr(owner, leaf, nn.Parameter(w, requires_grad=p.requires_grad))
        _fix_shape_attrs(owner)
    model.cfg = dataclasses.replace(model.cfg, d_model=keep.numel())
    check_rebuilds(model)
    return model


def residual_scale(d_old: int, d_new: int) -> float:
    """The factor a = sqrt(d_new / d_old) the cut applies to the stream (norm weights get 1 / a)."""
    return math.sqrt(d_new / d_old)

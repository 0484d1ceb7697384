"""The three pruning units as torch-pruning pruning functions: `SSMHeadPruner` (heads of an
`SSM` mixer), `ExpertChannelPruner` (hidden channels of stacked `Experts`) and `ExpertPruner`
(whole experts of a `MoE`), with one shared instance of each.

They are `torch_pruning.pruner.BasePruningFunc` subclasses whose channels are heads, flattened
expert channels and experts; they follow torch-pruning's intra-layer convention
(prune_in_channels = prune_out_channels) and cut the nn.Linear / depthwise nn.Conv1d /
nn.Parameter pieces with torch-pruning's own pruning functions. Parameters are replaced by new
tensors: rebuild any optimizer afterwards.

torch-pruning's DependencyGraph is NOT used for grouping: it traces this model without error,
but the chunked scan is einsum/bmm/permute/reshape, which it treats as element-wise, so a group
rooted at one head's out_proj columns wrongly pulls in x_proj's output rows (dt, B, C),
dt_proj's outputs, and A_log / D with channel indices (out of range for these per-head vectors).
Because d_model is never pruned, all coupling sits inside one mixer or one MoE and is encoded in
the pruners.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch_pruning.pruner import function as tpf

from iteralite.core.moe import Experts, MoE
from iteralite.core.ssm import SSM

# torch-pruning's per-parameter pruner along dim 0 (its shared PrunerBox instance prunes dim -1).
_PARAM_DIM0 = tpf.ParameterPruner(pruning_dim=0)


def _gather_param(w: nn.Parameter, dim: int, index: torch.Tensor) -> nn.Parameter:
    """A new Parameter holding w gathered along `dim` (and its gradient, as torch-pruning does)."""
    new = nn.Parameter(torch.gather(w.detach(), dim, index), requires_grad=w.requires_grad)
    if w.grad is not None:
        new.grad = torch.gather(w.grad, dim, index)
    return new


class SSMHeadPruner(tpf.BasePruningFunc):
    """Removes whole heads of an `SSM` mixer; its channels are head indices 0 <= h < n_heads.

    Head h owns d_inner channels c = h*p .. h*p + p - 1: in_proj rows c (x half) and d_inner + c
    (z half), conv1d channels c, x_proj columns c, out_proj columns c; and dt_proj row h, A_log[h],
    D[h]. Input and output channels are the same heads (torch-pruning's intra-layer convention).
    """

    TARGET_MODULES = SSM

    def check(self, layer, idxs, to_output=True):
        super().check(layer, idxs, to_output)
        if len(set(idxs)) != len(idxs):
            raise ValueError(f"SSM head pruning: duplicate head indices {idxs}")
        if len(idxs) >= layer.n_heads:
            raise ValueError(f"SSM head pruning: removing {len(idxs)} of {layer.n_heads} heads; "
                             "a layer must keep at least one head")

    def prune_out_channels(self, layer: SSM, idxs: Sequence[int]) -> SSM:
        p, d_inner = layer.headdim, layer.d_inner
        heads = sorted(idxs)
        ch = [h * p + k for h in heads for k in range(p)]  # the heads' d_inner channels
        with torch.no_grad():
            tpf.prune_linear_out_channels(layer.in_proj, ch + [d_inner + c for c in ch])
            tpf.prune_depthwise_conv_out_channels(layer.conv1d, ch)  # also fixes groups / in_channels
            tpf.prune_linear_in_channels(layer.x_proj, ch)
            tpf.prune_linear_out_channels(layer.dt_proj, heads)
            layer.A_log = _PARAM_DIM0.prune_out_channels(layer.A_log, heads)
            layer.D = _PARAM_DIM0.prune_out_channels(layer.D, heads)
            tpf.prune_linear_in_channels(layer.out_proj, ch)
        layer.n_heads -= len(heads)
        layer.d_inner = layer.n_heads * p  # forward reshapes and conv groups read these
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: SSM) -> int:
        return layer.n_heads

    get_in_channels = get_out_channels


class ExpertChannelPruner(tpf.BasePruningFunc):
    """Removes hidden channels of stacked `Experts` (w1 (e, f, d), w2 (e, d, f)).

    Channel index e * f + j names hidden unit j of expert e, so each expert can lose different
    units; every expert must lose the same count because the weights stay one stacked tensor.
    """

    TARGET_MODULES = Experts

    def check(self, layer, idxs, to_output=True):
        super().check(layer, idxs, to_output)
        e, f, _ = layer.w1.shape
        if len(set(idxs)) != len(idxs):
            raise ValueError("expert channel pruning: duplicate channel indices")
        per_expert = torch.bincount(torch.as_tensor(list(idxs), dtype=torch.long) // f, minlength=e)
        if len(idxs) and (per_expert != per_expert[0]).any():
            raise ValueError(f"expert channel pruning: every expert must lose the same number of "
                             f"channels, got {per_expert.tolist()}")
        if len(idxs) and int(per_expert[0]) >= f:
            raise ValueError(f"expert channel pruning: removing all {f} channels of each expert; keep >= 1")

    def prune_out_channels(self, layer: Experts, idxs: Sequence[int]) -> Experts:
        e, f, d = layer.w1.shape
        drop = torch.zeros(e * f, dtype=torch.bool)
        drop[list(idxs)] = True
        keep = (~drop).view(e, f).nonzero()[:, 1].view(e, -1)  # (e, f') kept units, ascending per expert
        with torch.no_grad():
            layer.w1 = _gather_param(layer.w1, 1, keep[:, :, None].expand(-1, -1, d))
            layer.w2 = _gather_param(layer.w2, 2, keep[:, None, :].expand(-1, d, -1))
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: Experts) -> int:
        return layer.w1.shape[0] * layer.w1.shape[1]

    get_in_channels = get_out_channels


class ExpertPruner(tpf.BasePruningFunc):
    """Removes whole experts of a `MoE`: w1[e], w2[e] and router row e (never below top_k)."""

    TARGET_MODULES = MoE

    def check(self, layer, idxs, to_output=True):
        super().check(layer, idxs, to_output)
        n = layer.experts.w1.shape[0]
        if len(set(idxs)) != len(idxs):
            raise ValueError(f"expert pruning: duplicate expert indices {idxs}")
        if n - len(idxs) < layer.top_k:
            raise ValueError(f"expert pruning: removing {len(idxs)} of {n} experts leaves fewer than "
                             f"top_k={layer.top_k}")

    def prune_out_channels(self, layer: MoE, idxs: Sequence[int]) -> MoE:
        ids = sorted(idxs)
        with torch.no_grad():
            tpf.prune_linear_out_channels(layer.router, ids)
            layer.experts.w1 = _PARAM_DIM0.prune_out_channels(layer.experts.w1, ids)
            layer.experts.w2 = _PARAM_DIM0.prune_out_channels(layer.experts.w2, ids)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: MoE) -> int:
        return layer.experts.w1.shape[0]

    get_in_channels = get_out_channels


HEAD_PRUNER, CHANNEL_PRUNER, EXPERT_PRUNER = SSMHeadPruner(), ExpertChannelPruner(), ExpertPruner()

"""Activation importance for the model-global cuts (Minitron-style, from calibration batches):
one score per residual channel (for `width`) and one per block (for `depth`); higher = keep.

channels[c]  channel c's share of mean |RMSNorm output| (mean over tokens of |out_c|, divided
             by the sum of that over the channels), averaged over all 2 * n_layers + 1 norms
             (norm1, norm2 of each block, norm_f); the scores sum to 1. The stream is read only
             through these norms, so their outputs are exactly what every reader (in_proj,
             router, experts' w1, the tied head) sees of channel c; they are per-token
             normalised, so a few large tokens do not dominate (Minitron scores embedding
             channels from the LayerNorm outputs likewise). Shares rather than raw means: a
             norm's overall scale is arbitrary (its readers can absorb it), so each norm votes
             equally; and a width cut scales norm_f's output by 1 / a (see `width`), which a
             share cancels, so a cut model scores exactly as its masked twin and scores can be
             recomputed between iterative cuts.
layers[i]    mean over tokens of 1 - cos(block input residual, block output residual) (ShortGPT's
             "block influence"): 0 for a block that adds nothing, up to 2. It comes from the
             same single forward pass per batch as the channel scores; the alternative, the loss
             increase with the block skipped, costs n_layers + 1 passes and is left to
             `skip_layers` + `train.losses` where a later stage wants it.

These are not `importance.SCORERS` entries: that registry's contract is a `Scores` of SSM heads,
expert channels and experts for `plan`, and the params.yaml "prune.importance" names; residual
channels and whole blocks are other units, planned by other code (not wired into a stage yet).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from iteralite.io.errors import IteraliteError


@dataclass
class ActivationScores:
    """channels (d,) float64 (sums to 1), layers (n_layers,) float64, over `tokens` calibration tokens."""

    channels: torch.Tensor
    layers: torch.Tensor
    tokens: int
    kind: str = "activation"


@torch.no_grad()
def activation_scores(model, batches: Iterable[torch.Tensor]) -> ActivationScores:
    """Score residual channels and blocks on calibration batches: token tensors (b, l+1), run as
    model(batch[:, :-1]) like the other calibration statistics, so the same batches serve all.
    Deterministic for given weights and batches; the model's train/eval mode is restored."""
    norms = [m for m in model.modules() if isinstance(m, nn.RMSNorm)]
    d, n_layers = model.cfg.d_model, len(model.layers)
    absum = torch.zeros(len(norms), d, dtype=torch.float64)  # sum over tokens of |norm output|
    infl = torch.zeros(n_layers, dtype=torch.float64)
    count = {"tokens": 0}

    def norm_hook(k):
        def hook(_mod, _inp, out):  # out (b, l, d)
            absum[k] += out.detach().abs().reshape(-1, d).double().sum(0).cpu()
        return hook

    def block_hook(i):
        def hook(_mod, inp, out):  # inp[0], out[0]: (b, l, d) residual before / after the block
            cos = F.cosine_similarity(inp[0].double(), out[0].double(), dim=-1)
            infl[i] += (1.0 - cos).clamp_min(0.0).sum().cpu()
        return hook

    hooks = [m.register_forward_hook(norm_hook(k)) for k, m in enumerate(norms)]
    hooks += [b.register_forward_hook(block_hook(i)) for i, b in enumerate(model.layers)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x = batch[:, :-1]
            model(x)
            count["tokens"] += x.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    t = count["tokens"]
    if t == 0:
        raise IteraliteError("activation_scores needs at least one calibration batch of tokens (b, l+1), l >= 1")
    shares = absum / absum.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return ActivationScores(shares.mean(0), infl / t, t)


def lowest(scores: torch.Tensor, keep: int, what: str) -> list[int]:
    """Indices of all but the `keep` highest scores (ascending index; ties: lower index removed
    first), i.e. what to pass to prune_residual / prune_layers to keep `keep` units."""
    n = scores.numel()
    if not 1 <= keep <= n:
        raise IteraliteError(f"keep {keep} {what}: must be between 1 and {n}")
    order = torch.argsort(scores, stable=True)
    return sorted(order[:n - keep].tolist())


def channels_to_remove(scores: ActivationScores, d_keep: int) -> list[int]:
    """The d_model - d_keep lowest-scored residual channels."""
    return lowest(scores.channels, d_keep, "residual channels")


def layers_to_remove(scores: ActivationScores, n_keep: int) -> list[int]:
    """The n_layers - n_keep least influential blocks."""
    return lowest(scores.layers, n_keep, "layers")

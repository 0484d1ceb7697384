"""Per-layer sensitivity for the "sensitivity" allocation: the LM-loss increase when one layer
alone loses a probe share of its prunable params, measured with an exact zero mask (the model is
restored afterwards)."""
from __future__ import annotations

import torch

from iteralite.prune.importance import Scores
from iteralite.prune.plan import PrunePlan, plan
from iteralite.train.losses import next_token_loss


def _mean_loss(model, batches: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy over the batches (b, l+1)."""
    return sum(float(next_token_loss(model, b)[0]) for b in batches) / len(batches)


@torch.no_grad()
def _mask_plan(model, p: PrunePlan) -> None:
    """Zero what makes the planned heads / channels contribute nothing (no experts): a head's
    x_proj and out_proj columns (dt, B, C stop depending on it and its output is dropped), a
    channel's w2 column. Equivalent to removing them."""
    for i, lp in p.layers.items():
        mixer, experts = model.layers[i].mixer, model.layers[i].moe.experts
        for h in lp.heads:
            cols = slice(h * mixer.headdim, (h + 1) * mixer.headdim)
            mixer.x_proj.weight[:, cols] = 0
            mixer.out_proj.weight[:, cols] = 0
        for e, chans in enumerate(lp.channels):
            experts.w2[e, :, chans] = 0


@torch.no_grad()
def measure_sensitivity(model, batches, scores: Scores, probe_ratio: float = 0.25,
                        channel_multiple: int = 1) -> dict[int, float]:
    """Per layer: LM-loss increase on `batches` when that layer alone loses `probe_ratio` of its
    prunable params (heads + channels chosen by `scores`, applied as an exact zero mask and
    restored). Protection is ignored here: this measures the layer. Values are floored at 1e-6 so
    they can be inverted by the "sensitivity" allocation."""
    batches = list(batches)
    base = _mean_loss(model, batches)
    out = {}
    for i, layer in enumerate(model.layers):
        others = {j: (probe_ratio if j == i else 0.0) for j in range(len(model.layers))}
        p = plan(model, probe_ratio, scores, protected=(), layer_ratios=others,
                 channel_multiple=channel_multiple)
        saved = {k: v.clone() for k, v in layer.state_dict().items()}
        try:
            _mask_plan(model, p)
            loss = _mean_loss(model, batches)
        finally:
            layer.load_state_dict(saved)
        out[i] = max(loss - base, 1e-6)
    return out

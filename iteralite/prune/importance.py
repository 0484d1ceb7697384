"""Unit importance (higher = keep): `Scores` per head / expert channel / expert, computed by
magnitude (L2 norm of each unit's parameter group) or first-order Taylor (|w * dL/dw| on
calibration batches), plus the router statistics (`routing_stats`) that decide which experts are
rarely routed. `importance_scores` picks a scorer by its params.yaml name from `SCORERS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from iteralite.core.moe import Experts
from iteralite.core.ssm import SSM
from iteralite.io.params import check
from iteralite.prune.config import IMPORTANCES
from iteralite.train.losses import next_token_loss


@dataclass
class Scores:
    """Importance per unit for the model's current shapes (higher = keep).
    heads[i] (h,), channels[i] (e, f), experts[i] (e,)."""

    heads: dict[int, torch.Tensor]
    channels: dict[int, torch.Tensor]
    experts: dict[int, torch.Tensor]
    kind: str = "custom"


# The group of a unit is every parameter whose zeroing is part of switching the unit off.
# A_log and the dt_proj bias are left out although they are removed with the head: zero is not
# their "off" value (A_log = 0 means decay rate 1, the dt bias is an inverse softplus of dt near
# -5), and their size would swamp the weights' norms. The router row is left out of an expert's
# group for the same reason (logit 0 is not "never routed").


def _head_sums(mixer: SSM, t) -> torch.Tensor:
    """Sum of t(w) over each head's entries of every tensor in its group -> (h,).
    t maps a parameter to an elementwise tensor of the same shape (w**2, w*grad, ...)."""
    h, p = mixer.n_heads, mixer.headdim
    s = t(mixer.in_proj.weight).view(2, h, p, -1).sum((0, 2, 3))  # x and z halves
    s = s + t(mixer.conv1d.weight).reshape(h, -1).sum(1) + t(mixer.conv1d.bias).view(h, p).sum(1)
    s = s + t(mixer.x_proj.weight).view(-1, h, p).sum((0, 2))
    s = s + t(mixer.dt_proj.weight).sum(1) + t(mixer.D)
    return s + t(mixer.out_proj.weight).view(-1, h, p).sum((0, 2))


def _channel_sums(experts: Experts, t) -> torch.Tensor:
    """Per expert hidden unit: w1 row + w2 column -> (e, f)."""
    return t(experts.w1).sum(2) + t(experts.w2).sum(1)


def _expert_sums(experts: Experts, t) -> torch.Tensor:
    """Per expert: all of w1[e] and w2[e] -> (e,)."""
    return t(experts.w1).sum((1, 2)) + t(experts.w2).sum((1, 2))


def magnitude_scores(model, routing: dict | None = None) -> Scores:
    """L2 norm of each unit's group; an expert's norm is scaled by its mean router probability
    when `routing` (from routing_stats) is given."""
    def sq(w):
        return w.detach().float() ** 2

    heads, channels, experts = {}, {}, {}
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            heads[i] = _head_sums(layer.mixer, sq).sqrt()
            channels[i] = _channel_sums(layer.moe.experts, sq).sqrt()
            experts[i] = _expert_sums(layer.moe.experts, sq).sqrt()
            if routing is not None:
                experts[i] = experts[i] * routing[i]["prob"]
    return Scores(heads, channels, experts, "magnitude")


def taylor_scores(model, batches: Iterable[torch.Tensor]) -> Scores:
    """First-order Taylor importance |sum over the group of w * dL/dw| per unit.

    batches: token tensors (b, l+1). The score is averaged over batches of the per-batch
    |sum w*g| rather than taken from the summed gradient: near a trained minimum the mean
    gradient vanishes and the signed sum would cancel to noise.
    """
    params = [p for layer in model.layers for p in (*layer.mixer.parameters(), *layer.moe.parameters())]
    flags = [p.requires_grad for p in params]
    acc_h, acc_c, acc_e, n = {}, {}, {}, 0
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in batches:
            with torch.enable_grad():
                grads = torch.autograd.grad(next_token_loss(model, batch)[0], params, allow_unused=True)
            gmap = {p: (torch.zeros_like(p) if g is None else g) for p, g in zip(params, grads)}

            def wg(w):
                return w.detach() * gmap[w]

            for i, layer in enumerate(model.layers):
                acc_h[i] = acc_h.get(i, 0) + _head_sums(layer.mixer, wg).abs()
                acc_c[i] = acc_c.get(i, 0) + _channel_sums(layer.moe.experts, wg).abs()
                acc_e[i] = acc_e.get(i, 0) + _expert_sums(layer.moe.experts, wg).abs()
            n += 1
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    if n == 0:
        raise ValueError("taylor_scores needs at least one calibration batch")
    return Scores(*({i: v / n for i, v in acc.items()} for acc in (acc_h, acc_c, acc_e)), kind="taylor")


@torch.no_grad()
def routing_stats(model, batches: Iterable[torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer: "prob" (e,) mean router probability and "routed" (e,) share of the top-k slots
    each expert receives (sums to 1), over the tokens of batches (b, l+1)."""
    prob, routed, tokens, hooks = {}, {}, {}, []

    def hook_for(i, moe):
        def hook(_mod, _inp, logits):
            probs = F.softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)  # (t, e)
            top = probs.topk(moe.top_k, dim=-1).indices.reshape(-1)
            prob[i] = prob.get(i, 0) + probs.sum(0)
            routed[i] = routed.get(i, 0) + torch.bincount(top, minlength=probs.shape[1]).float()
            tokens[i] = tokens.get(i, 0) + probs.shape[0]
        return hook

    for i, layer in enumerate(model.layers):
        hooks.append(layer.moe.router.register_forward_hook(hook_for(i, layer.moe)))
    try:
        for batch in batches:
            model(batch[:, :-1])
    finally:
        for h in hooks:
            h.remove()
    if not tokens:
        raise ValueError("routing_stats needs at least one calibration batch")
    return {i: {"prob": prob[i] / tokens[i], "routed": routed[i] / routed[i].sum()} for i in tokens}


def _magnitude_by_name(model, batches, routing) -> Scores:
    return magnitude_scores(model, routing)


def _taylor_by_name(model, batches, routing) -> Scores:
    if batches is None:
        raise ValueError("taylor importance needs calibration batches (token tensors (b, l+1))")
    return taylor_scores(model, batches)


# params.yaml name (config.IMPORTANCES) -> scorer(model, batches, routing).
SCORERS: dict[str, Callable[..., Scores]] = {"taylor": _taylor_by_name, "magnitude": _magnitude_by_name}


def importance_scores(model, importance: str, batches=None, routing=None) -> Scores:
    """Scores by name: "magnitude" (batches not needed) or "taylor" (needs batches)."""
    check(importance in IMPORTANCES, "prune", "importance",
          f"must be one of {', '.join(IMPORTANCES)}, got {importance!r}")
    return SCORERS[importance](model, batches, routing)

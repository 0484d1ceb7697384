"""Depth pruning: remove whole blocks (layers) and update cfg.n_layers and every per-layer list
(layer_n_heads, layer_n_experts, layer_d_ff), so the cut model rebuilds from its config.

A block is residual (x -> x + SSM(norm1(x)) -> ... + MoE(norm2(...))), so removing it is exactly
running the model with that block replaced by the identity: `skip_layers` is that reference twin
(for forward, return_state and step). The balance loss is the one difference: `IteraLite.forward`
averages it over the blocks present, so a skipped block counts as 0 in the twin's mean.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

from torch import nn

from iteralite.prune.rebuild import check_indices, check_rebuilds, require_plain

# The config fields that hold one entry per layer (None = uniform, stays None).
PER_LAYER_FIELDS = ("layer_n_heads", "layer_n_experts", "layer_d_ff")


@contextlib.contextmanager
def skip_layers(model, layers: Sequence[int]) -> Iterator[nn.Module]:
    """Reference twin of `prune_layers`: inside the context, blocks `layers` return their input
    unchanged (forward: (x, aux 0, the state passed in); step: (x, state)). Restored on exit."""
    idx = check_indices(layers, len(model.layers), "layers", "layer skipping")
    blocks = [model.layers[i] for i in idx]

    def identity(x, state=None, return_state=False):
        return x, x.new_zeros(()), state

    def identity_step(x, state):
        return x, state

    for b in blocks:  # instance attributes shadow the class methods; nn.Module.__call__ uses them
        b.forward, b.step = identity, identity_step
    try:
        yield model
    finally:
        for b in blocks:
            del b.forward, b.step


def prune_layers(model, layers: Sequence[int]) -> nn.Module:
    """Remove blocks `layers` (indices 0..n_layers-1) in place and set model.cfg (a new object)
    with n_layers and the per-layer lists of the blocks kept. Equals `skip_layers` (logits and
    step()). IteraliteError for indices out of range, repeated, or all of them."""
    require_plain(model)
    n = len(model.layers)
    drop = set(check_indices(layers, n, "layers", "depth pruning"))
    keep = [i for i in range(n) if i not in drop]
    model.layers = nn.ModuleList(model.layers[i] for i in keep)
    lists = {f: [getattr(model.cfg, f)[i] for i in keep]
             for f in PER_LAYER_FIELDS if getattr(model.cfg, f) is not None}
    model.cfg = dataclasses.replace(model.cfg, n_layers=len(keep), **lists)
    check_rebuilds(model)
    return model

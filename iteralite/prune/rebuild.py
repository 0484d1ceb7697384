"""Checks shared by the model-global cuts (`width`, `depth`): the unit indices they are given, and
that a cut model still matches the model its config builds, so a checkpoint of it loads with
strict shapes (`io.checkpoint.build_model` rebuilds from the config, then fills the tensors).
"""
from __future__ import annotations

from typing import Sequence

import torch

from iteralite.core.model import IteraLite, TiedEmbedding
from iteralite.io.errors import IteraliteError
from iteralite.prune.counting import require_float


def check_indices(idxs: Sequence[int], size: int, what: str, where: str) -> list[int]:
    """Sorted unique indices 0 <= i < size that leave at least one unit; IteraliteError otherwise.
    `what` names the unit ("residual channels"), `where` the operation, for the messages."""
    try:
        got = [int(i) for i in idxs]
    except (TypeError, ValueError):
        raise IteraliteError(f"{where}: {what} must be integer indices, got {idxs!r}") from None
    if any(isinstance(i, bool) or int(i) != i for i in idxs):
        raise IteraliteError(f"{where}: {what} must be integer indices, got {list(idxs)!r}")
    bad = sorted({i for i in got if not 0 <= i < size})
    if bad:
        raise IteraliteError(f"{where}: {what} {bad} are out of range; the model has {size} (0..{size - 1})")
    if len(set(got)) != len(got):
        dup = sorted({i for i in got if got.count(i) > 1})
        raise IteraliteError(f"{where}: {what} {dup} are listed more than once")
    if len(got) >= size:
        raise IteraliteError(f"{where}: removing all {size} {what}; keep at least one")
    return sorted(got)


def require_plain(model) -> None:
    """The cuts handle the float IteraLite only: quantized twins hold packed tensors."""
    if not isinstance(model, IteraLite):
        raise IteraliteError(f"width/depth pruning needs an IteraLite model, got {type(model).__name__}")
    require_float(model)
    if type(model.embedding) is not TiedEmbedding:
        raise IteraliteError(f"width/depth pruning needs a float model, but 'embedding' is a "
                             f"{type(model.embedding).__name__}; dequantize it first")


def check_rebuilds(model) -> None:
    """Raise IteraliteError unless every tensor of `model` has the name and shape that
    IteraLite(model.cfg) gives it (built on the meta device: no memory, no init cost)."""
    model.cfg.validate()
    with torch.device("meta"):
        ref = IteraLite(model.cfg)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [f"{k}: {got.get(k)} vs config {want.get(k)}" for k in sorted(set(want) | set(got))
             if want.get(k) != got.get(k)]
    if wrong:
        raise IteraliteError("the cut model disagrees with its config: " + "; ".join(wrong[:8]))

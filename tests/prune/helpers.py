"""Small models and token batches shared by the prune tests."""
from __future__ import annotations

import torch

from iteralite.core.model import IteraLite
from tests.conftest import tiny_config

SHA = "0" * 64


def build(**kw) -> IteraLite:
    torch.manual_seed(0)
    return IteraLite(tiny_config(**kw)).eval()


def bigger() -> IteraLite:
    return build(n_heads=4, d_ff=32, n_experts=4)


def twin(model: IteraLite) -> IteraLite:
    """An independent copy through config + state_dict (no pickling)."""
    other = IteraLite(model.cfg)
    other.load_state_dict(model.state_dict())
    return other.eval()


def tokens(b=2, l=20, seed=1, vocab=300) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, l), generator=g)


def batches(n=3) -> list[torch.Tensor]:
    return [tokens(2, 17, seed=10 + k) for k in range(n)]


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]

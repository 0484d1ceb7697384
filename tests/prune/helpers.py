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


def assert_step_and_resume_match(model, idx: torch.Tensor, split: int) -> None:
    """The recurrent step() token by token, and a forward resumed from the state after idx[:, :split],
    both give the full forward's logits."""
    with torch.no_grad():
        full = model(idx)[0]
        state = model.init_state(idx.shape[0])
        for t in range(idx.shape[1]):
            lg, state = model.step(idx[:, t], state)
            torch.testing.assert_close(lg, full[:, t], atol=1e-4, rtol=1e-4)
        _, _, st = model(idx[:, :split], return_state=True)
        second = model(idx[:, split:], state=st, return_state=True)[0]  # state is read only with return_state
    torch.testing.assert_close(second, full[:, split:], atol=1e-4, rtol=1e-4)

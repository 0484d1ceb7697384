"""Activation importance: switched-off channels / blocks score lowest, scores are deterministic,
the width cut leaves the kept channels' scores unchanged, and the selection helpers."""
from __future__ import annotations

import pytest
import torch

from iteralite.io.errors import IteraliteError
from iteralite.prune.activation import activation_scores, channels_to_remove, layers_to_remove, lowest
from iteralite.prune.width import mask_residual_channels, prune_residual
from tests.prune.helpers import batches, twin
from tests.prune.test_width import model_4l


def test_zeroed_channels_score_lowest():
    model = mask_residual_channels(model_4l(), [3, 11, 29])
    s = activation_scores(model, batches())
    assert s.channels.shape == (32,) and s.tokens == 3 * 2 * 16
    assert s.channels.sum().item() == pytest.approx(1.0)
    assert (s.channels[[3, 11, 29]] == 0).all() and (s.channels.sum() - s.channels[[3, 11, 29]].sum()) > 0
    assert channels_to_remove(s, 29) == [3, 11, 29]


def test_zeroed_block_scores_lowest():
    model = model_4l()
    with torch.no_grad():  # block 2 writes nothing: its output residual equals its input
        model.layers[2].mixer.out_proj.weight.zero_()
        model.layers[2].moe.experts.w2.zero_()
    s = activation_scores(model, batches())
    assert s.layers.shape == (4,) and s.layers[2] < 1e-12 and (s.layers[[0, 1, 3]] > 1e-4).all()
    assert layers_to_remove(s, 3) == [2]
    assert layers_to_remove(s, 1) == sorted(torch.argsort(s.layers)[:3].tolist())


def test_scores_are_deterministic_and_restore_mode():
    model = model_4l().train()
    a, b = activation_scores(model, batches()), activation_scores(twin(model), iter(batches()))
    assert torch.equal(a.channels, b.channels) and torch.equal(a.layers, b.layers)
    assert model.training and not any(m._forward_hooks for m in model.modules())


def test_width_cut_keeps_its_masked_twins_scores():
    """The cut leaves every norm output as in the masked twin, so the scores agree too (the
    layer scores as well: cos ignores the stream's scale a and the twin's zero channels)."""
    model = model_4l()
    drop = channels_to_remove(activation_scores(model, batches()), 20)
    masked = activation_scores(mask_residual_channels(twin(model), drop), batches())
    after = activation_scores(prune_residual(model, drop), batches())
    keep = [c for c in range(32) if c not in drop]
    torch.testing.assert_close(after.channels, masked.channels[keep], rtol=1e-5, atol=0)
    torch.testing.assert_close(after.layers, masked.layers, rtol=1e-4, atol=1e-9)


def test_errors():
    model = model_4l()
    with pytest.raises(IteraliteError, match="at least one calibration batch"):
        activation_scores(model, [])
    s = activation_scores(model, batches(1))
    with pytest.raises(IteraliteError, match="between 1 and 32"):
        channels_to_remove(s, 0)
    with pytest.raises(IteraliteError, match="between 1 and 4"):
        layers_to_remove(s, 5)
    assert lowest(torch.tensor([1.0, 1.0, 0.5]), 1, "units") == [0, 2]  # ties: lower index goes first

"""measure_sensitivity: a layer's value is the loss increase of really removing its probe units,
a layer that contributes nothing gets the floor while a working one gets more, and the model is
restored afterwards."""
from __future__ import annotations

import pytest
import torch

from iteralite.prune.apply import apply_plan
from iteralite.prune.importance import magnitude_scores
from iteralite.prune.plan import plan
from iteralite.prune.sensitivity import measure_sensitivity
from iteralite.train.losses import next_token_loss
from tests.prune.helpers import batches, bigger, logits, tokens, twin

PROBE = 0.3


def fitted(silent: int | None = None):
    """bigger() fitted for a few steps to two batches, so that removing units raises the loss
    (at a fresh init the loss is ~ln(vocab) and a removal moves it either way by less than the
    1e-6 floor). silent: a layer whose out_proj and w2 stay zero, so it adds nothing."""
    model, bs = bigger(), batches(2)
    if silent is not None:
        for w in (model.layers[silent].mixer.out_proj.weight, model.layers[silent].moe.experts.w2):
            with torch.no_grad():
                w.zero_()
            w.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(20):
        for b in bs:
            opt.zero_grad()
            next_token_loss(model, b)[0].backward()
            opt.step()
    return model.eval(), bs


def mean_loss(model, bs) -> float:
    with torch.no_grad():
        return sum(float(next_token_loss(model, b)[0]) for b in bs) / len(bs)


def test_sensitivity_is_the_loss_increase_of_removing_the_probe_units():
    model, bs = fitted()
    scores = magnitude_scores(model)
    sens = measure_sensitivity(model, bs, scores, probe_ratio=PROBE)
    assert sorted(sens) == [0, 1]
    base = mean_loss(model, bs)
    for i in range(2):
        # reference: physically prune layer i alone by the probe share, on a copy (no mask)
        only_i = {j: (PROBE if j == i else 0.0) for j in range(2)}
        p = plan(model, PROBE, scores, protected=(), layer_ratios=only_i)
        assert list(p.layers) == [i] and p.layers[i].heads and any(p.layers[i].channels)
        want = mean_loss(apply_plan(twin(model), p), bs) - base
        assert want > 1e-3  # far above the floor, so the comparison means something
        assert sens[i] == pytest.approx(want, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("silent", [0, 1])
def test_silent_layer_gets_the_floor_and_a_working_layer_more(silent):
    model, bs = fitted(silent)
    ref = twin(model)
    sens = measure_sensitivity(model, bs, magnitude_scores(model), probe_ratio=PROBE)
    assert sens[silent] == 1e-6  # masking units whose output is already zero changes nothing
    assert sens[1 - silent] > 1e-3
    idx = tokens()  # every mask was undone
    torch.testing.assert_close(logits(model, idx), logits(ref, idx), atol=0, rtol=0)

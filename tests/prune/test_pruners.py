"""The pruners remove exactly what zero-masking switches off: pruned models equal their masked
twins, keep the recurrent step and segmented forward consistent, and refuse to go below limits."""
from __future__ import annotations

import pytest
import torch

from iteralite.prune.apply import apply_plan, prune
from iteralite.prune.plan import LayerPlan, PrunePlan
from tests.prune.helpers import bigger, build, logits, tokens, twin


def test_head_removal_equals_zeroing_its_x_proj_and_out_proj_columns():
    model = build(n_heads=4)
    p = model.cfg.headdim
    ref = twin(model)
    with torch.no_grad():
        for i, h in ((0, 1), (1, 3), (1, 0)):
            # x_proj columns: dt, B and C of the other heads stop depending on this head;
            # out_proj columns: its own output is dropped. Both are needed for equality.
            ref.layers[i].mixer.x_proj.weight[:, h * p:(h + 1) * p] = 0
            ref.layers[i].mixer.out_proj.weight[:, h * p:(h + 1) * p] = 0
    apply_plan(model, PrunePlan({0: LayerPlan(heads=[1]), 1: LayerPlan(heads=[3, 0])}))
    assert model.cfg.layer_n_heads == [3, 2]
    assert model.layers[1].mixer.conv1d.groups == 2 * p
    idx = tokens(l=21)  # not a multiple of the chunk size
    torch.testing.assert_close(logits(model, idx), logits(ref, idx), atol=1e-5, rtol=0)


def test_expert_channel_removal_equals_zeroing_w2_columns():
    model = build(d_ff=16)
    ref = twin(model)
    chans = [[0, 5], [3, 7], [15, 2]]  # each expert loses its own channels
    with torch.no_grad():
        for e, js in enumerate(chans):
            ref.layers[1].moe.experts.w2[e, :, js] = 0
    apply_plan(model, PrunePlan({1: LayerPlan(channels=chans)}))
    assert model.cfg.layer_d_ff == [16, 14]
    assert model.layers[1].moe.experts.w1.shape == (3, 14, model.cfg.d_model)
    idx = tokens()
    torch.testing.assert_close(logits(model, idx), logits(ref, idx), atol=1e-5, rtol=0)


def test_expert_removal_equals_router_logit_minus_inf():
    model = build(n_experts=4)
    ref = twin(model)

    def never_route_2(_mod, _inp, out):
        out = out.clone()
        out[..., 2] = float("-inf")
        return out

    ref.layers[0].moe.router.register_forward_hook(never_route_2)
    apply_plan(model, PrunePlan({0: LayerPlan(experts=[2], channels=[[1], [4], [9]])}))
    assert model.cfg.layer_n_experts == [3, 4] and model.cfg.layer_d_ff == [15, 16]
    with torch.no_grad():  # the remaining experts 0, 1, 3 lost channels 1, 4, 9
        for e, j in ((0, 1), (1, 4), (3, 9)):
            ref.layers[0].moe.experts.w2[e, :, j] = 0
    idx = tokens()
    torch.testing.assert_close(logits(model, idx), logits(ref, idx), atol=1e-5, rtol=0)


def test_pruners_never_go_below_limits():
    model = build(n_heads=2, n_experts=3, top_k=2)
    with pytest.raises(ValueError, match="at least one head"):
        apply_plan(model, PrunePlan({0: LayerPlan(heads=[0, 1])}))
    with pytest.raises(ValueError, match="top_k"):
        apply_plan(model, PrunePlan({0: LayerPlan(experts=[0, 1])}))
    with pytest.raises(ValueError, match="same number"):
        apply_plan(model, PrunePlan({0: LayerPlan(channels=[[0], [1, 2], [3]])}))


def test_step_and_segments_match_forward_after_pruning():
    model = bigger()
    prune(model, 0.4, "magnitude")
    idx = tokens(b=2, l=12)
    full = logits(model, idx)
    state = model.init_state(2)
    with torch.no_grad():
        for t in range(idx.shape[1]):
            out, state = model.step(idx[:, t], state)
            torch.testing.assert_close(out, full[:, t], atol=1e-4, rtol=0)
        # a second segment continued from the first one's state (conv with groups=d_inner)
        _, _, st = model(idx[:, :5], return_state=True)
        second, _, _ = model(idx[:, 5:], state=st, return_state=True)
    torch.testing.assert_close(second, full[:, 5:], atol=1e-4, rtol=0)

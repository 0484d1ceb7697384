"""Planning: which units go (lowest scores, rare experts), allocation over layers, protection,
per-layer ratios and kept widths."""
from __future__ import annotations

import pytest
import torch

from iteralite.io.errors import ParamsError
from iteralite.prune.apply import apply_plan, prune
from iteralite.prune.config import ALLOCATIONS
from iteralite.prune.importance import magnitude_scores
from iteralite.prune.plan import ALLOCATION_WEIGHTS, LayerPlan, PrunePlan, plan
from iteralite.quant.spec import QuantSpec
from iteralite.quant.swap import make_spec_for, quantize
from tests.prune.helpers import bigger, logits, tokens


def test_lowest_scored_units_are_removed():
    model = bigger()
    s = magnitude_scores(model)
    s.heads[0] = torch.tensor([3.0, 0.1, 2.0, 1.0])
    s.channels[1] = torch.arange(32.0).flip(0).repeat(4, 1)  # channel 31 least important everywhere
    p = plan(model, 0.2, s)
    assert 1 in p.layers[0].heads
    assert all(31 in chans for chans in p.layers[1].channels)


def test_rare_experts_are_removed_only_with_expert_removal():
    model = bigger()
    rare = {i: {"prob": torch.tensor([0.3, 0.3, 0.3, 0.1]), "routed": torch.tensor([0.33, 0.33, 0.33, 0.01])}
            for i in range(2)}
    p = plan(model, 0.4, magnitude_scores(model, rare), expert_removal=True, routing=rare)
    assert all(lp.experts == [3] for lp in p.layers.values())
    p = plan(model, 0.4, magnitude_scores(model), expert_removal=False)
    assert all(not lp.experts for lp in p.layers.values())
    with pytest.raises(ValueError, match="routing"):
        plan(model, 0.4, magnitude_scores(model), expert_removal=True)


def test_scores_must_match_the_model():
    model = bigger()
    s = magnitude_scores(bigger())
    prune(model, 0.3, "magnitude")
    with pytest.raises(ValueError, match="compute scores"):
        plan(model, 0.5, s)


def test_every_configurable_allocation_has_weights():
    assert set(ALLOCATION_WEIGHTS) == set(ALLOCATIONS)


def test_sensitivity_allocation_prunes_less_sensitive_layers_more():
    model = bigger()
    rep = prune(model, 0.3, "magnitude", allocation="sensitivity", layer_sensitivity={0: 1.0, 1: 4.0})
    assert abs(rep["prunable_params_removed_frac"] - 0.3) < 0.01
    s0, s1 = rep["sparsity"][0]["prunable_params"], rep["sparsity"][1]["prunable_params"]
    assert s0 > 2 * s1 and s0 <= 0.8 + 1e-9
    with pytest.raises(ValueError, match="layer_sensitivity"):
        prune(bigger(), 0.3, "magnitude", allocation="sensitivity")


def test_sensitivity_allocation_is_capped_per_layer():
    model = bigger()
    rep = prune(model, 0.5, "magnitude", allocation="sensitivity", layer_sensitivity={0: 1.0, 1: 100.0},
                max_layer_ratio=0.7)
    assert rep["sparsity"][0]["prunable_params"] <= 0.7 + 1e-9
    assert abs(rep["prunable_params_removed_frac"] - 0.5) < 0.01  # the rest goes to layer 1


def test_channel_multiple_keeps_quantizable_widths():
    model = bigger()
    rep = prune(model, 0.4, "magnitude", channel_multiple=8)
    assert all(s["d_ff"] % 8 == 0 for s in rep["layers"].values())
    assert abs(rep["prunable_params_removed_frac"] - 0.4) < 0.02
    quantize(model, make_spec_for(QuantSpec(bits=4, group_size=8)))
    assert torch.isfinite(logits(model, tokens())).all()


def test_protected_layer_is_skipped_and_ratio_still_reached():
    model = bigger()
    rep = prune(model, 0.3, "magnitude", protected=["embedding", "layers.0.mixer"])
    assert rep["layers"][0]["n_heads"] == 4
    assert abs(rep["prunable_params_removed_frac"] - 0.3) < 0.01


def test_ratio_for_protected_layer_is_an_error():
    model = bigger()
    with pytest.raises(ParamsError, match=r"layer 0.*'layers\.0\.mixer' is protected"):
        prune(model, 0.2, "magnitude", protected=["layers.0.mixer"], layer_ratios={0: 0.3})
    with pytest.raises(ParamsError, match=r"removes heads of layer 0.*'layers\.\*\.mixer' is protected"):
        apply_plan(model, PrunePlan({0: LayerPlan(heads=[1])}), protected=["layers.*.mixer"])
    with pytest.raises(ParamsError, match="names no module"):
        prune(model, 0.2, "magnitude", protected=["layers.7.mixer"])
    assert model.cfg.layer_n_heads is None  # nothing was touched


def test_layer_ratios_fix_named_layers():
    model = bigger()
    rep = prune(model, 0.3, "magnitude", layer_ratios={1: 0.1})
    assert abs(rep["sparsity"][1]["prunable_params"] - 0.1) < 0.03
    assert abs(rep["prunable_params_removed_frac"] - 0.3) < 0.01

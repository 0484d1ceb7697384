"""Structured pruning: exactness against zero-masked twins, recurrent/parallel agreement,
checkpoint round trip, ratio accounting, allocation, protection and params validation."""
from __future__ import annotations

import math

import pytest
import torch

from iteralite.io.checkpoint import load_model, save_checkpoint
from iteralite.io.errors import IteraliteError, ParamsError
from iteralite.core.model import IteraLite
from iteralite.io.params import from_dict
from iteralite.prune.prune import (LayerPlan, PruneConfig, PrunePlan, apply_plan, head_params,
                             iterative_schedule, layer_shapes, magnitude_scores, measure_sensitivity,
                             plan, prunable_params, prune, routing_stats, taylor_scores)
from iteralite.quant.quantize import QuantSpec
from iteralite.quant.qmodules import dequantize_model, make_spec_for, quantize_model
from tests.conftest import tiny_config

SHA = "0" * 64


def build(**kw) -> IteraLite:
    torch.manual_seed(0)
    return IteraLite(tiny_config(**kw)).eval()


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


def bigger():
    return build(n_heads=4, d_ff=32, n_experts=4)


# --------------------------------------------------------------------------- accounting


def test_prunable_params_counts_every_mixer_and_moe_parameter():
    model = bigger()
    cfg = model.cfg
    fixed = model.embedding.weight.numel() + sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert prunable_params(model) == model.num_params() - fixed
    d = cfg.d_model
    per_layer = cfg.n_heads * head_params(cfg) + cfg.n_experts * (2 * d * cfg.d_ff + d)
    assert prunable_params(model) == cfg.n_layers * per_layer


# --------------------------------------------------------------------------- exactness


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


def test_plan_never_goes_below_limits():
    model = build(n_heads=2, n_experts=3, top_k=2)
    with pytest.raises(ValueError, match="at least one head"):
        apply_plan(model, PrunePlan({0: LayerPlan(heads=[0, 1])}))
    with pytest.raises(ValueError, match="top_k"):
        apply_plan(model, PrunePlan({0: LayerPlan(experts=[0, 1])}))
    with pytest.raises(ValueError, match="same number"):
        apply_plan(model, PrunePlan({0: LayerPlan(channels=[[0], [1, 2], [3]])}))


# --------------------------------------------------------------------------- pruned model behaviour


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


def test_checkpoint_round_trip_rebuilds_pruned_shapes(tmp_path):
    model = bigger()
    prune(model, 0.4, "magnitude", batches=batches(), expert_removal=True,
          routing={i: {"prob": torch.tensor([0.4, 0.4, 0.15, 0.05]),
                       "routed": torch.tensor([0.45, 0.45, 0.08, 0.02])} for i in range(2)})
    path = tmp_path / "pruned.safetensors"
    save_checkpoint(path, model, kind="pruned", tokenizer_sha256=SHA)
    loaded, ckpt = load_model(path)
    assert ckpt.config.layer_n_heads == model.cfg.layer_n_heads
    assert ckpt.config.layer_n_experts == model.cfg.layer_n_experts == [3, 3]
    assert layer_shapes(loaded) == layer_shapes(model)
    idx = tokens()
    torch.testing.assert_close(logits(loaded, idx), logits(model, idx), atol=0, rtol=0)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.4])
def test_ratio_is_reached(ratio):
    model = bigger()
    before = prunable_params(model)
    rep = prune(model, ratio, "magnitude")
    assert rep["prunable_before"] == rep["base_prunable"] == before
    assert rep["prunable_after"] == prunable_params(model)
    assert rep["prunable_params_removed_frac"] == pytest.approx((before - prunable_params(model)) / before)
    assert abs(rep["prunable_params_removed_frac"] - ratio) < 0.01
    assert rep["params_before"] - rep["params_after"] == before - rep["prunable_after"]
    for i, kept in rep["layers"].items():
        cfg = model.cfg
        assert kept == {"n_heads": cfg.heads(i), "n_experts": cfg.experts(i), "d_ff": cfg.ff(i)}
        # uniform: every layer loses about the same fraction of its own prunable params
        assert abs(rep["sparsity"][i]["prunable_params"] - ratio) < 0.03


def test_ratio_zero_and_already_reached_change_nothing():
    model = bigger()
    rep = prune(model, 0.0, "magnitude")
    assert rep["prunable_params_removed_frac"] == 0 and model.cfg.layer_n_heads == [4, 4]
    base = prune(model, 0.3, "magnitude")["base_prunable"]
    after = prunable_params(model)
    prune(model, 0.2, "magnitude", base_prunable=base)
    assert prunable_params(model) == after


def test_iterative_cumulative_pruning_reaches_target():
    assert iterative_schedule(0.4, 4) == [0.1, 0.2, 0.3, 0.4]
    assert iterative_schedule(0.4, 2, start=0.2) == [0.3, 0.4]
    model = bigger()
    first = prune(model, 0.2, "magnitude")
    assert abs(first["prunable_params_removed_frac"] - 0.2) < 0.01
    second = prune(model, 0.4, "magnitude", base_prunable=first["base_prunable"])
    assert second["base_prunable"] == first["base_prunable"]
    assert abs(second["prunable_params_removed_frac"] - 0.4) < 0.01
    assert second["sparsity"][0]["heads"] >= first["sparsity"][0]["heads"]
    # base_shapes (needed when the unpruned model was not uniform) gives the same accounting
    third = prune(model, 0.5, "magnitude", base_shapes=first["base_shapes"])
    assert abs(third["prunable_params_removed_frac"] - 0.5) < 0.01


def test_base_prunable_must_match_config_shapes():
    model = bigger()
    with pytest.raises(ValueError, match="base_shapes"):
        prune(model, 0.2, "magnitude", base_prunable=prunable_params(model) + 1)


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


def test_measure_sensitivity_is_positive_and_restores_the_model():
    model = bigger()
    ref = twin(model)
    sens = measure_sensitivity(model, batches(2), magnitude_scores(model), probe_ratio=0.3)
    assert sorted(sens) == [0, 1] and all(v > 0 and math.isfinite(v) for v in sens.values())
    idx = tokens()
    torch.testing.assert_close(logits(model, idx), logits(ref, idx), atol=0, rtol=0)


def test_channel_multiple_keeps_quantizable_widths():
    model = bigger()
    rep = prune(model, 0.4, "magnitude", channel_multiple=8)
    assert all(s["d_ff"] % 8 == 0 for s in rep["layers"].values())
    assert abs(rep["prunable_params_removed_frac"] - 0.4) < 0.02
    quantize_model(model, make_spec_for(QuantSpec(bits=4, group_size=8)))
    assert torch.isfinite(logits(model, tokens())).all()


def test_quantized_model_is_refused_until_dequantized():
    model = bigger()
    quantize_model(model, make_spec_for(QuantSpec(bits=8, group_size=8)))
    with pytest.raises(IteraliteError, match="dequantize_model"):
        prune(model, 0.2, "magnitude")
    dequantize_model(model)
    rep = prune(model, 0.2, "magnitude")
    assert abs(rep["prunable_params_removed_frac"] - 0.2) < 0.01


# --------------------------------------------------------------------------- importance


def test_taylor_scores_are_finite_and_differ_from_magnitude():
    model = bigger()
    tay, mag = taylor_scores(model, batches()), magnitude_scores(model)
    for kind in ("heads", "channels", "experts"):
        for i in range(2):
            t, m = getattr(tay, kind)[i], getattr(mag, kind)[i]
            assert t.shape == m.shape and torch.isfinite(t).all() and (t >= 0).all()
    assert not torch.allclose(tay.heads[0] / tay.heads[0].sum(), mag.heads[0] / mag.heads[0].sum())
    assert not torch.allclose(tay.channels[0] / tay.channels[0].sum(), mag.channels[0] / mag.channels[0].sum())
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind
    rep = prune(model, 0.2, "taylor", batches=batches())
    assert rep["importance"] == "taylor" and abs(rep["prunable_params_removed_frac"] - 0.2) < 0.01
    with pytest.raises(ValueError, match="batches"):
        prune(bigger(), 0.2, "taylor")


def test_lowest_scored_units_are_removed():
    model = bigger()
    s = magnitude_scores(model)
    s.heads[0] = torch.tensor([3.0, 0.1, 2.0, 1.0])
    s.channels[1] = torch.arange(32.0).flip(0).repeat(4, 1)  # channel 31 least important everywhere
    p = plan(model, 0.2, s)
    assert 1 in p.layers[0].heads
    assert all(31 in chans for chans in p.layers[1].channels)


def test_routing_stats_and_rare_expert_removal():
    model = bigger()
    stats = routing_stats(model, batches())
    for st in stats.values():
        assert st["routed"].sum() == pytest.approx(1.0) and st["prob"].sum() == pytest.approx(1.0)
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


# --------------------------------------------------------------------------- protection


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


# --------------------------------------------------------------------------- params


def test_prune_config_defaults_and_validation():
    cfg = from_dict(PruneConfig, {}, "prune")
    assert cfg.ratios == [0.1, 0.2, 0.4] and cfg.importance == "taylor" and cfg.protected == ["embedding"]
    assert from_dict(PruneConfig, {"ratios": [0.3], "layer_ratios": {0: 0.2}}, "prune").ratios == [0.3]
    bad = [({"ratios": [1.0]}, r"'prune\.ratios'.*1\.0"), ({"ratios": [-0.1]}, r"'prune\.ratios'.*-0\.1"),
           ({"ratios": []}, r"'prune\.ratios' must list"),
           ({"importance": "random"}, r"'prune\.importance'.*taylor, magnitude.*'random'"),
           ({"allocation": "greedy"}, r"'prune\.allocation'.*uniform, sensitivity"),
           ({"steps": 0}, r"'prune\.steps'"), ({"layer_ratios": {0: 1.5}}, r"'prune\.layer_ratios'"),
           ({"protected": [" "]}, r"'prune\.protected'"), ({"ratio": 0.1}, "did you mean 'ratios'")]
    for raw, msg in bad:
        with pytest.raises(ParamsError, match=msg):
            from_dict(PruneConfig, raw, "prune")


def test_prune_rejects_bad_ratio_directly():
    for r in (1.0, -0.1):
        with pytest.raises(ParamsError, match=r"prune\.ratios"):
            prune(bigger(), r, "magnitude")
    with pytest.raises(ParamsError, match="importance"):
        prune(bigger(), 0.1, "random")


def test_config_plan_kwargs_drive_prune():
    cfg = PruneConfig(ratios=[0.25], importance="magnitude", channel_multiple=8, protected=["embedding"])
    model = bigger()
    rep = prune(model, cfg.ratios[0], cfg.importance, **cfg.plan_kwargs())
    assert all(s["d_ff"] % 8 == 0 for s in rep["layers"].values())

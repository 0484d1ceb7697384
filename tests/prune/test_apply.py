"""prune(): ratio accounting in its report, cumulative (iterative) calls, checkpoint round trip
of the pruned shapes, and argument checks."""
from __future__ import annotations

import pytest
import torch

from iteralite.io.checkpoint import load_model, save_checkpoint
from iteralite.io.errors import ParamsError
from iteralite.prune.apply import prune
from iteralite.prune.config import PruneConfig
from iteralite.prune.counting import layer_shapes, prunable_params
from tests.prune.helpers import SHA, batches, bigger, logits, tokens


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

"""Depth pruning equals skipping the blocks (forward, step, segments), keeps the per-layer lists in
step with the blocks, survives keeping 1 of 4 layers and a checkpoint round trip."""
from __future__ import annotations

import pytest
import torch

from iteralite.io.checkpoint import load_model, save_checkpoint
from iteralite.io.errors import IteraliteError
from iteralite.prune.depth import prune_layers, skip_layers
from iteralite.prune.width import prune_residual
from tests.prune.helpers import assert_step_and_resume_match, build, tokens, twin
from tests.prune.test_width import model_4l, out


def test_layer_removal_equals_skipping_blocks():
    model = model_4l()  # layer_n_heads [4, 3, 4, 4], layer_n_experts [4, 4, 4, 3], layer_d_ff [.., 31]
    ref = twin(model)
    prune_layers(model, [2, 1])
    cfg = model.cfg
    assert cfg.n_layers == 2 and len(model.layers) == 2
    assert cfg.layer_n_heads == [4, 4] and cfg.layer_n_experts == [4, 3] and cfg.layer_d_ff == [32, 31]
    idx = tokens(l=21)
    with skip_layers(ref, [1, 2]):
        want = out(ref, idx)[0]
        state = ref.init_state(2)
        with torch.no_grad():
            ref_steps = []
            for t in range(5):
                lg, state = ref.step(idx[:, t], state)
                ref_steps.append(lg)
    torch.testing.assert_close(out(model, idx)[0], want, atol=0, rtol=0)  # the same operations
    state = model.init_state(2)
    with torch.no_grad():
        for t in range(5):
            lg, state = model.step(idx[:, t], state)
            torch.testing.assert_close(lg, ref_steps[t], atol=0, rtol=0)
    # The context restored the blocks: the twin is the full model again.
    assert not torch.equal(out(ref, idx)[0], want)


def test_skipping_uniform_config_keeps_lists_none():
    model = build(n_layers=3)
    prune_layers(model, [0])
    assert model.cfg.n_layers == 2 and model.cfg.layer_n_heads is None and model.cfg.layer_d_ff is None


def test_step_and_segments_match_forward_after_width_and_depth_cuts():
    model = prune_layers(prune_residual(model_4l(), [1, 5, 9, 20]), [0, 3])
    assert model.cfg.d_model == 28 and model.cfg.n_layers == 2
    assert_step_and_resume_match(model, tokens(b=2, l=12), split=7)


def test_keep_one_of_four_layers_and_checkpoint_round_trip(tmp_path):
    model = model_4l()
    ref = twin(model)
    prune_layers(model, [0, 1, 3])
    assert model.cfg.n_layers == 1 and model.cfg.layer_n_heads == [4]
    idx = tokens()
    with skip_layers(ref, [0, 1, 3]):
        torch.testing.assert_close(out(model, idx)[0], out(ref, idx)[0], atol=0, rtol=0)
    path = tmp_path / "d.safetensors"
    save_checkpoint(path, model, kind="pruned", tokenizer_sha256="")
    loaded, ckpt = load_model(path)
    assert ckpt.config == model.cfg
    torch.testing.assert_close(out(loaded, idx)[0], out(model, idx)[0], atol=0, rtol=0)


@pytest.mark.parametrize("layers, msg", [
    ([0, 1], "removing all 2 layers"),
    ([2], r"layers \[2\] are out of range; the model has 2"),
    ([1, 1], "more than once"),
])
def test_bad_layers_are_refused(layers, msg):
    model = build()
    with pytest.raises(IteraliteError, match=msg):
        prune_layers(model, layers)
    assert model.cfg.n_layers == 2 and len(model.layers) == 2  # untouched
    with pytest.raises(IteraliteError, match=msg):
        with skip_layers(model, layers):
            pass

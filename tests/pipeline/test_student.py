"""The student stage's computation: depth then width cuts scored on dev windows, distillation for
a token budget on the training split, and the checks that stop a bad config before any work."""
from __future__ import annotations

import copy

import pytest
import torch

from iteralite.io.errors import ParamsError
from iteralite.io.params import from_dict
from iteralite.pipeline import student as student_mod
from iteralite.pipeline.student import StudentConfig, cut, make_student
from iteralite.prune.activation import activation_scores, channels_to_remove, layers_to_remove
from iteralite.prune.depth import prune_layers
from iteralite.prune.width import prune_residual
from iteralite.train.live import stage_live
from tests.prune.helpers import build, logits, tokens
from tests.train.conftest import offline_live, read_live


def stream(n=4000, seed=0, vocab=300):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def cfg(**kw):
    base = dict(d_model=24, n_layers=1, tokens=8 * 2 * 16, batch_size=2, seq_len=16, warmup_steps=1,
                calib_windows=4, dev_windows=4, threads=1)
    return from_dict(StudentConfig, {**base, **kw}, "student")


def test_steps_are_the_token_budget_in_whole_batches():
    assert cfg(tokens=0).steps == 0
    assert cfg(tokens=1, warmup_steps=0).steps == 1
    assert cfg(tokens=2 * 16, warmup_steps=0).steps == 1
    assert cfg(tokens=2 * 16 + 1).steps == 2


@pytest.mark.parametrize("kw,match", [
    ({"tokens": -1}, "'student.tokens' must be >= 0"),
    ({"d_model": 0}, "'student.d_model' must be >= 1"),
    ({"tokens": 32, "warmup_steps": 1}, r"'student.warmup_steps' must be in \[0, 1\): the budget of 32 tokens"),
    ({"min_lr": 1.0}, "'student.min_lr' must be in"),
])
def test_bad_config_is_one_params_error(kw, match):
    with pytest.raises(ParamsError, match=match):
        cfg(**kw)


def test_a_cut_that_would_grow_the_model_is_refused_before_any_work():
    m = build(n_layers=2)
    for kw, key in (({"d_model": m.cfg.d_model + 8}, "d_model"), ({"n_layers": 3}, "n_layers")):
        with pytest.raises(ParamsError, match=f"'student.{key}'"):
            make_student(m, copy.deepcopy(m), stream(), stream(seed=1), cfg(**kw), progress=False)


def test_cut_is_depth_then_width_by_activation_scores():
    """The cut equals the two library cuts applied by hand in that order, the width cut rescored on
    the depth-cut model."""
    m = build(n_layers=3, n_heads=4, d_ff=32, n_experts=4)
    calib = torch.stack([tokens(1, 17, seed=s)[0] for s in range(4)])
    ref = copy.deepcopy(m)
    sc = activation_scores(ref, calib.split(2))
    prune_layers(ref, layers_to_remove(sc, 2))
    prune_residual(ref, channels_to_remove(activation_scores(ref, calib.split(2)), 24))
    info = cut(m, calib, 24, 2, 2)
    assert m.cfg == ref.cfg and m.cfg.d_model == 24 and m.cfg.n_layers == 2
    assert len(info["layers_removed"]) == 1 and info["channels_removed"] == m.cfg.d_model + 8 - 24
    idx = tokens(2, 12)
    assert torch.equal(logits(m, idx), logits(ref, idx))


def test_no_cut_and_no_tokens_pass_the_model_through():
    m = build(n_layers=2)
    out, info = make_student(m, copy.deepcopy(m), stream(), stream(seed=1),
                             cfg(d_model=m.cfg.d_model, n_layers=2, tokens=0), progress=False)
    idx = tokens(2, 12)
    assert torch.equal(logits(out, idx), logits(m, idx))
    assert info["layers_removed"] == [] and info["channels_removed"] == 0 and "distill" not in info
    assert info["dev_loss_cut"] == info["dev_loss_student"]


def test_cuts_score_dev_and_distillation_reads_train(monkeypatch):
    """Spies: the cut's calibration windows come from dev, the distillation's stream is train."""
    seen = {}
    real_cut, real_distill = student_mod.cut, student_mod.distill_train

    def spy_cut(model, calib, *a):
        seen["calib"] = calib
        return real_cut(model, calib, *a)

    def spy_distill(student, teacher, data, *a, **kw):
        seen["data"] = data
        return real_distill(student, teacher, data, *a, **kw)

    monkeypatch.setattr(student_mod, "cut", spy_cut)
    monkeypatch.setattr(student_mod, "distill_train", spy_distill)
    m = build(n_layers=2)
    train, dev = stream(seed=2, vocab=150), 150 + stream(seed=3, vocab=150)  # disjoint token ranges
    out, info = make_student(m, copy.deepcopy(m), train, dev, cfg(), progress=False)
    assert seen["calib"].min() >= 150 and seen["data"] is train
    assert info["distill"]["steps"] == 8 and info["distill_tokens"] == 8 * 2 * 16
    assert out.cfg.d_model == 24 and out.cfg.n_layers == 1
    assert info["params_after"] < info["params_before"]
    assert all(torch.isfinite(p).all() for p in out.parameters())


def test_student_logs_its_distillation_and_dev_losses(tmp_path, monkeypatch):
    """The cut model's dev loss at step 0, the distillation's points, the student's dev loss at the
    last step; the three dev losses in the summary."""
    live_root = offline_live(tmp_path, monkeypatch)
    m = build(n_layers=2)
    with stage_live(live_root / "student") as live:
        _, info = make_student(m, copy.deepcopy(m), stream(seed=2), stream(seed=3), cfg(), progress=False, live=live)
    tsvs, summary = read_live(live_root / "student")
    assert tsvs["dev/loss.tsv"] == [(0, info["dev_loss_cut"]), (8, info["dev_loss_student"])]
    assert [s for s, _ in tsvs["train/ce.tsv"]] == [8]
    assert summary["dev_loss_teacher"] == info["dev_loss_teacher"] and summary["step"] == 8


def test_targets_override_the_cut_and_unknown_keys_are_one_line():
    c = cfg(embed_rank=8, targets={"headline": {}, "tiny": {"d_model": 16, "embed_rank": 4, "max_heads": 1}})
    assert c.for_target("headline").embed_rank == 8
    tiny = c.for_target("tiny")
    assert (tiny.d_model, tiny.embed_rank, tiny.max_heads, tiny.max_ff) == (16, 4, 1, 0)
    with pytest.raises(ParamsError, match="has no target 'small'"):
        c.for_target("small")
    with pytest.raises(ParamsError, match=r"targets.tiny' has unknown keys \['seed'\]"):
        cfg(targets={"headline": {}, "tiny": {"seed": 1}})
    with pytest.raises(ParamsError, match="must name a 'headline' target"):
        cfg(targets={"tiny": {}})
    with pytest.raises(ParamsError, match="embed_rank"):
        cfg(targets={"headline": {}, "tiny": {"d_model": 8, "embed_rank": 8}}).for_target("tiny")


def test_a_target_may_set_its_own_learning_rate():
    c = cfg(targets={"headline": {}, "tiny": {"lr": 0.006, "min_lr": 0.0006}})
    tiny, head = c.for_target("tiny"), c.for_target("headline")
    assert (tiny.lr, tiny.min_lr) == (0.006, 0.0006) and (head.lr, head.min_lr) == (c.lr, c.min_lr)
    assert tiny.distill_config().lr == 0.006
    with pytest.raises(ParamsError, match=r"targets.tiny.lr' must be a number; got 'fast'"):
        cfg(targets={"headline": {}, "tiny": {"lr": "fast"}})
    with pytest.raises(ParamsError, match=r"targets.tiny.d_model' must be an integer; got 1.5"):
        cfg(targets={"headline": {}, "tiny": {"d_model": 1.5}})
    with pytest.raises(ParamsError, match="min_lr"):  # the override is checked against the other keys
        cfg(min_lr=0.001, targets={"headline": {}, "tiny": {"lr": 0.0005}}).for_target("tiny")


def test_full_rank_factorisation_is_the_same_model():
    """A (V, d) table of rank <= r factorises exactly: the logits do not move (float rounding)."""
    model = build(n_heads=2)
    with torch.no_grad():
        E = model.embedding.weight
        u, s, vh = torch.linalg.svd(E, full_matrices=False)
        model.embedding.weight.copy_((u[:, :5] * s[:5]) @ vh[:5])  # rank 5
    idx = tokens()
    before = logits(model, idx)
    fact = student_mod.factorise_embedding(model, 5)
    assert fact.cfg.embed_rank == 5 and fact.embedding.weight.shape == (300, 5)
    torch.testing.assert_close(logits(fact, idx), before, rtol=1e-4, atol=1e-4)
    assert student_mod.factorise_embedding(fact, 3) is fact  # already factorised: unchanged


def test_cap_units_keeps_at_most_max_heads_and_channels():
    model = build(n_heads=3, d_ff=16)
    info = student_mod.cap_units(model, [tokens(2, 17, seed=s) for s in range(2)], max_heads=2, max_ff=8)
    assert all(model.cfg.heads(i) == 2 and model.cfg.ff(i) == 8 for i in range(model.cfg.n_layers))
    assert info == {"heads_removed": 2, "expert_channels_removed": 2 * 3 * 8}
    assert logits(model, tokens()).isfinite().all()
    assert model.num_params() == model.cfg.num_weights()

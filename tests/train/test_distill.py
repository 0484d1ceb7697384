import copy

import pytest
import torch

from iteralite.io.errors import DivergedError
from iteralite.quant.qat import QATConfig
from iteralite.train.distill import CachedTeacher, distill_train
from iteralite.train.live import stage_live
from tests.train.conftest import read_live


def _data(cfg):
    return torch.randint(0, cfg.vocab_size, (4000,), generator=torch.Generator().manual_seed(0))


def test_distillation_trains_and_reports(model, cfg):
    student = copy.deepcopy(model)
    stats = distill_train(student, model, _data(cfg), QATConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=1,
                                                                threads=1), progress=False, desc="qat")
    assert stats["steps"] == 3 and stats["final_train_ce"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(student.parameters(), model.parameters()))


def test_diverging_distillation_stops_with_the_loop_name_and_step(model, cfg):
    """Every distillation loop (qat, finetune, prune recovery, mixed fine-tune) goes through here."""
    student = copy.deepcopy(model)
    qcfg = QATConfig(steps=20, batch_size=2, seq_len=16, warmup_steps=1, lr=1e8, min_lr=1e8, threads=1)
    with pytest.raises(DivergedError, match=r"recover 0.4 diverged at step \d+ of 20: .*lower it"):
        distill_train(student, model, _data(cfg), qcfg, progress=False, desc="recover 0.4")


def test_distillation_runs_log_on_one_step_counter(model, cfg, live_root):
    """Two runs into one logger (as prune's recoveries and mixed precision's fine-tunes do): points
    every 10 steps and at each run's last step, the second run's steps after the first's, `round`
    with each point; logging changes no weight."""
    qcfg = dict(batch_size=2, seq_len=16, warmup_steps=1, threads=1)
    plain = copy.deepcopy(model)
    distill_train(plain, model, _data(cfg), QATConfig(steps=12, **qcfg), progress=False)
    student = copy.deepcopy(model)
    with stage_live(live_root / "d") as live:
        distill_train(student, model, _data(cfg), QATConfig(steps=12, **qcfg), progress=False, live=live,
                      step_offset=0, round_index=0)
        assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), plain.state_dict().values()))
        distill_train(student, model, _data(cfg), QATConfig(steps=5, seed=8, **qcfg), progress=False, live=live,
                      step_offset=12, round_index=1)
    tsvs, summary = read_live(live_root / "d")
    assert sorted(tsvs) == ["lr.tsv", "round.tsv", "tokens_per_s.tsv", "train/ce.tsv", "train/distill_loss.tsv"]
    assert tsvs["round.tsv"] == [(10, 0.0), (12, 0.0), (17, 1.0)]
    assert [s for s, _ in tsvs["train/ce.tsv"]] == [10, 12, 17] == [s for s, _ in tsvs["train/distill_loss.tsv"]]
    assert summary["step"] == 17 and summary["round"] == 1
    assert "final_train_ce" not in summary  # a stage of several runs says which one is final


def test_a_single_distillation_run_summarizes_its_final_losses(model, cfg, live_root):
    with stage_live(live_root / "q") as live:
        stats = distill_train(copy.deepcopy(model), model, _data(cfg),
                              QATConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=1, threads=1),
                              progress=False, live=live)
    tsvs, summary = read_live(live_root / "q")
    assert tsvs["train/ce.tsv"] == [(3, summary["train"]["ce"])] and "round.tsv" not in tsvs
    assert summary["final_train_ce"] == stats["final_train_ce"] and summary["final_distill_loss"] > 0


def test_the_cached_teacher_gives_the_teachers_logits_bit_for_bit(model):
    model.eval()
    cached = CachedTeacher(model)
    a = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    b = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_a, want_b = model(a), model(b)
    for x, want in ((a, want_a), (b, want_b), (a, want_a), (b[:, :-1], model(b[:, :-1]))):
        got = cached(x)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert cached.hits == 1  # the second `a`; `b[:, :-1]` is another batch, not served b's logits


def test_distilling_from_the_cached_teacher_equals_distilling_from_the_teacher(model, cfg):
    data, qcfg = _data(cfg), QATConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=1, threads=1)
    teacher = copy.deepcopy(model).eval()
    plain, fast = copy.deepcopy(model), copy.deepcopy(model)
    distill_train(plain, teacher, data, qcfg, progress=False)
    cached = CachedTeacher(teacher)
    distill_train(copy.deepcopy(model), cached, data, qcfg, progress=False)  # fills the cache
    distill_train(fast, cached, data, qcfg, progress=False)  # every batch from the cache
    assert cached.hits == qcfg.steps
    for p, q in zip(plain.state_dict().values(), fast.state_dict().values()):
        assert torch.equal(p, q)

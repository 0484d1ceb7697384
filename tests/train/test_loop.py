import math
from pathlib import Path

import pytest
import torch

from iteralite.core.model import IteraLite
from iteralite.data.tokenizer import load_tokens
from iteralite.io.errors import DataError, DivergedError, ParamsError
from iteralite.io.params import from_dict
from iteralite.train import loop as train_mod
from iteralite.train.dist import DistEnv
from iteralite.train.evaluate import EvalConfig, Evaluator
from iteralite.train.live import stage_live
from iteralite.train.loop import (TrainConfig, check_finite, check_finite_model, check_stream, get_batch, lr_at,
                                  make_optimizer, set_threads, train)
from iteralite.train.losses import next_token_loss
from tests.conftest import tiny_config
from tests.train.conftest import read_live

TINY = dict(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=6,
            eval_tokens=512, checkpoint_every=4, threads=1, device="cpu")
EVAL = EvalConfig(seq_len=32, batch_size=8, max_tokens=2048)
TIMING = {"tokens_per_s", "train_tokens_per_s", "train_seconds"}  # the only numbers two equal runs may differ in


def train_ref(model_cfg, cfg: TrainConfig, tok_dir) -> torch.nn.Module:
    """Reference twin: the single-process loop as it was before data parallelism and dvclive,
    its arithmetic only (validation and logging change no weight)."""
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = torch.from_numpy(load_tokens(Path(tok_dir) / "train.npy").astype("int64"))
    model = IteraLite(model_cfg)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    model.train()
    for step in range(cfg.steps):
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = get_batch(data, cfg.batch_size, cfg.seq_len, cfg.seed, step)
        ce, aux = next_token_loss(model, batch)
        loss = ce + cfg.aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_training_reduces_loss_and_logs_step_metrics(tok_dir, tmp_path, live_root):
    """Points every 10 steps and at each eval step (6, 10, 12), val/loss at the eval steps only;
    the summary holds the last values, the last step and the final losses."""
    cfg = tiny_config()
    torch.manual_seed(0)
    before = Evaluator(EVAL, tok_dir).valid_loss(IteraLite(cfg))
    with stage_live(live_root / "train") as live:
        model, stats = train(cfg, TrainConfig(**TINY), EVAL, tok_dir=tok_dir, resume_path=tmp_path / "r.st",
                             progress=False, live=live)
    after = Evaluator(EVAL, tok_dir).valid_loss(model)
    assert after < before - 0.5
    assert stats["steps"] == 12 and stats["train_tokens_per_s"] > 0
    tsvs, summary = read_live(live_root / "train")
    assert sorted(tsvs) == ["lr.tsv", "tokens_per_s.tsv", "train/ce.tsv", "val/loss.tsv"]
    assert [s for s, _ in tsvs["train/ce.tsv"]] == [6, 10, 12] == [s for s, _ in tsvs["lr.tsv"]]
    assert [s for s, _ in tsvs["val/loss.tsv"]] == [6, 12]
    assert tsvs["train/ce.tsv"][-1][1] == pytest.approx(stats["final_train_loss"], abs=1e-5)
    assert tsvs["lr.tsv"][-1][1] == lr_at(TrainConfig(**TINY), 11)
    assert summary["step"] == 12 and summary["train"]["ce"] == tsvs["train/ce.tsv"][-1][1]
    assert summary["val"]["loss"] == tsvs["val/loss.tsv"][-1][1]
    assert summary["final_train_loss"] == stats["final_train_loss"] and summary["dev_loss"] == stats["dev_loss"]
    assert sorted(p.name for p in (live_root / "train").iterdir()) == ["metrics.json", "plots"]  # no dvc.yaml, report


def test_one_process_is_the_single_process_arithmetic(tok_dir, tmp_path):
    """World size 1 (implicit or an explicit DistEnv): the same weights, bit for bit, as the plain
    loop, so the FP32 checkpoint is byte-identical to the one written before data parallelism."""
    cfg, tc = tiny_config(), TrainConfig(**TINY)
    ref = train_ref(cfg, tc, tok_dir)
    model, _ = train(cfg, tc, EVAL, tok_dir=tok_dir, resume_path=tmp_path / "a.st", progress=False)
    assert_same_weights(model, ref)
    model, _ = train(cfg, tc, EVAL, tok_dir=tok_dir, resume_path=tmp_path / "b.st", progress=False, env=DistEnv())
    assert_same_weights(model, ref)


def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(tok_dir, tmp_path, live_root, monkeypatch):
    """Interrupted right after the resume file of step 8, then rerun into a fresh dvclive folder (DVC
    deletes declared outputs before a stage runs): the same weights, stats and logged history as one
    run of 12 steps (throughput and timings aside)."""
    cfg, tc = tiny_config(), TrainConfig(**TINY)
    with stage_live(live_root / "full") as live:
        full, full_stats = train(cfg, tc, EVAL, tok_dir=tok_dir, resume_path=tmp_path / "a.st", progress=False,
                                 live=live)
    orig = train_mod.save_resume

    def interrupt_at_8(path, model, opt, step, *a):
        orig(path, model, opt, step, *a)
        if step == 8:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_resume", interrupt_at_8)
    with pytest.raises(KeyboardInterrupt), stage_live(live_root / "cut") as live:
        train(cfg, tc, EVAL, tok_dir=tok_dir, resume_path=tmp_path / "b.st", progress=False, live=live)
    monkeypatch.setattr(train_mod, "save_resume", orig)
    with stage_live(live_root / "resumed") as live:
        resumed, stats = train(cfg, tc, EVAL, tok_dir=tok_dir, resume_path=tmp_path / "b.st", progress=False,
                               live=live)
    assert stats["resumed_from_step"] == 8
    assert_same_weights(resumed, full)
    drop = TIMING | {"resumed_from_step"}
    assert {k: v for k, v in stats.items() if k not in drop} == {k: v for k, v in full_stats.items() if k not in drop}
    (tsv_full, sum_full), (tsv_res, sum_res) = read_live(live_root / "full"), read_live(live_root / "resumed")
    assert tsv_full.keys() == tsv_res.keys()
    for name in tsv_full:
        if name == "tokens_per_s.tsv":
            assert [s for s, _ in tsv_res[name]] == [s for s, _ in tsv_full[name]]
        else:
            assert tsv_res[name] == tsv_full[name], name
    assert {k: v for k, v in sum_res.items() if k not in TIMING} == {k: v for k, v in sum_full.items() if k not in TIMING}


def test_train_config_checks_device_and_process_count():
    assert from_dict(TrainConfig, {}, "train").device == "cpu"  # the artifact depends on the device: CUDA is opted into
    assert from_dict(TrainConfig, {}, "train").nproc == 1
    with pytest.raises(ParamsError, match=r"'train.device' must be one of auto, cpu, cuda; got 'gpu'"):
        from_dict(TrainConfig, {"device": "gpu"}, "train")
    with pytest.raises(ParamsError, match=r"'train.nproc' must be >= 1"):
        from_dict(TrainConfig, {"nproc": 0}, "train")
    with pytest.raises(ParamsError, match=r"'train.batch_size' = 16 must be divisible by 'train.nproc' = 3"):
        from_dict(TrainConfig, {"batch_size": 16, "nproc": 3}, "train")
    from_dict(TrainConfig, {"batch_size": 16, "nproc": 4, "device": "cpu"}, "train")


def test_resume_file_of_other_params_is_ignored(tok_dir, tmp_path):
    cfg = tiny_config()
    train(cfg, TrainConfig(**{**TINY, "steps": 9}), EVAL, tok_dir=tok_dir, resume_path=tmp_path / "r.st",
          progress=False)
    assert (tmp_path / "r.st").exists()
    _, stats = train(cfg, TrainConfig(**{**TINY, "lr": 1e-3}), EVAL, tok_dir=tok_dir,
                     resume_path=tmp_path / "r.st", progress=False)
    assert stats["resumed_from_step"] == 0


def test_resume_file_of_other_code_is_ignored(tok_dir, tmp_path, capsys):
    """Same params and data, another code digest: the resume file is not resumed."""
    cfg = tiny_config()
    kw = dict(tok_dir=tok_dir, resume_path=tmp_path / "r.st", progress=False)
    train(cfg, TrainConfig(**{**TINY, "steps": 9}), EVAL, code="old", **kw)
    assert (tmp_path / "r.st").exists()
    _, stats = train(cfg, TrainConfig(**TINY), EVAL, code="new", **kw)
    assert stats["resumed_from_step"] == 0
    assert "other params, data or code" in capsys.readouterr().out


def test_diverging_training_stops_at_the_first_non_finite_step(tok_dir, tmp_path):
    """lr 1e6: a DivergedError naming the step and the key."""
    with pytest.raises(DivergedError, match=r"training diverged at step \d+ of 12: .*'train.lr' too high"):
        train(tiny_config(), TrainConfig(**{**TINY, "lr": 1e6}), EVAL, tok_dir=tok_dir,
              resume_path=tmp_path / "r.st", progress=False)


def test_check_finite_names_what_is_not_finite():
    check_finite("x", 0, 5, 1.0, 2.0, 0.1)
    with pytest.raises(DivergedError, match="x diverged at step 3 of 5: loss is nan"):
        check_finite("x", 2, 5, math.nan, 1.0, 0.1)
    with pytest.raises(DivergedError, match="gradient norm is inf"):
        check_finite("x", 2, 5, 1.0, math.inf, 0.1)
    model = IteraLite(tiny_config())
    check_finite_model(model, "x")
    with torch.no_grad():
        model.embedding.weight[0, 0] = float("nan")
    with pytest.raises(DivergedError, match="embedding.weight holds NaN"):
        check_finite_model(model, "x")


def test_training_stream_too_short_for_the_window_is_a_data_error():
    check_stream(torch.arange(40), 32, "train", "train.seq_len")
    with pytest.raises(DataError, match="has 33 tokens, too few for windows of 'train.seq_len' = 32"):
        check_stream(torch.arange(33), 32, "train", "train.seq_len")


def test_schedule_and_batches():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(cfg, 0) == 0.1 and lr_at(cfg, 9) == 1.0
    assert abs(lr_at(cfg, 99) - 0.1) < 1e-3
    data = torch.arange(1000)
    b1 = get_batch(data, 4, 16, seed=1, step=5)
    assert torch.equal(b1, get_batch(data, 4, 16, seed=1, step=5))
    assert not torch.equal(b1, get_batch(data, 4, 16, seed=1, step=6))
    assert torch.equal(b1[:, 1:], b1[:, :-1] + 1)


def test_eval_tokens_below_one_window_fails_before_the_first_step(tok_dir, tmp_path):
    with pytest.raises(ParamsError, match="'train.eval_tokens' = 8 leaves less than one window"):
        train(tiny_config(), TrainConfig(**{**TINY, "eval_tokens": 8}), EVAL, tok_dir=tok_dir,
              resume_path=tmp_path / "r.st", progress=False)
    assert not (tmp_path / "r.st").exists()

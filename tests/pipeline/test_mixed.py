"""`run_mixed` end to end on a tiny model: the headline artifact, the candidates, the info."""
from __future__ import annotations

import pytest
import torch

from iteralite.io import grid
from iteralite.io.errors import DataError, ParamsError
from iteralite.io.params import from_dict
from iteralite.pipeline.mixed import (BACKOFFS, ROUND_STARTS, SLACK_NATS, MixedConfig, run_mixed, split_dev,
                                      stored_allocation, use_the_slack)
from iteralite.quant import registry
from iteralite.quant.units import units
from iteralite.quant.qat import QATConfig
from iteralite.quant.units import allocation_bits, check_allocation
from iteralite.train.evaluate import mean_loss, tiles, windows
from iteralite.train.live import stage_live
from tests.train.conftest import offline_live, read_live


@pytest.mark.parametrize("scale_bits,leftover_bits", [(0, 0), (6, 8)])
def test_run_mixed_on_a_tiny_model(model, scale_bits, leftover_bits):
    cfg = from_dict(MixedConfig, {"group_size": 8, "sens_samples": 4, "seq_len": 17, "batch_size": 4,
                                  "finetune_steps": 2, "max_ppl_delta_pct": 50.0, "scale_bits": scale_bits,
                                  "leftover_bits": leftover_bits}, "mixed_precision")
    qcfg = QATConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, threads=1)
    data = torch.randint(0, model.cfg.vocab_size, (3000,), generator=torch.Generator().manual_seed(0))
    res = run_mixed(model, model, data, cfg, qcfg, progress=False, dev=data.flip(0))
    check_allocation(model, res.allocation)  # one known precision for every unit
    assert set(res.candidates) == {"uniform_int8", "uniform_int4", "manual", "optimized_before_finetune",
                                   "uniform_int4_finetuned"}
    for packed, alloc in res.candidates.values():
        assert any(type(m).__name__ == "MixedExperts" for m in packed.modules())
        assert allocation_bits(model, alloc, 8) > 0
    assert allocation_bits(model, res.allocation, 8) < allocation_bits(model, {u: 16 for u in res.allocation}, 8)
    assert res.info["refits"] and res.info["budget_nats"] > 0 and res.info["finetune"]["steps"] == 2
    assert res.info["calib_loss_final"] > 0
    idx = torch.randint(0, model.cfg.vocab_size, (1, 8))
    assert torch.isfinite(res.model(idx)[0]).all()
    for packed, _ in [(res.model, None), *res.candidates.values()]:  # every artifact is stored as computed
        state = packed.state_dict()
        scales = [t for k, t in state.items() if k.endswith("scales")]
        floats = [t for t in state.values() if t.dtype == torch.float32]
        assert scales and floats
        assert all(torch.equal(t.half().float(), t) for t in floats)
        if scale_bits:
            assert all(grid.encode(t)[0] & 0x0F <= scale_bits for t in scales)
            assert all(grid.encode(t)[0] & 0x0F <= leftover_bits for t in floats)


def test_finetunes_log_on_one_step_counter(model, tmp_path, monkeypatch):
    """Every fine-tune (headline, slack rounds, control) into the stage's one logger: 2 steps each
    on one counter, `round` counting them, each one's dev loss at its last step, and the headline's
    losses in the summary."""
    live_root = offline_live(tmp_path, monkeypatch)
    cfg = from_dict(MixedConfig, {"group_size": 8, "sens_samples": 4, "seq_len": 17, "batch_size": 4,
                                  "finetune_steps": 2, "max_ppl_delta_pct": 50.0}, "mixed_precision")
    qcfg = QATConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, threads=1)
    data = torch.randint(0, model.cfg.vocab_size, (3000,), generator=torch.Generator().manual_seed(0))
    with stage_live(live_root / "mixed") as live:
        res = run_mixed(model, model, data, cfg, qcfg, progress=False, dev=data.flip(0), live=live)
    tsvs, summary = read_live(live_root / "mixed")
    n = len(tsvs["round.tsv"])
    assert n >= 2  # the headline and the control at least
    assert tsvs["round.tsv"] == [(2 * (i + 1), float(i)) for i in range(n)]
    assert [s for s, _ in tsvs["dev/loss.tsv"]] == [s for s, _ in tsvs["train/ce.tsv"]] == [2 * (i + 1) for i in range(n)]
    assert summary["final_train_ce"] == res.info["finetune"]["final_train_ce"]
    assert summary["final_dev_loss"] == pytest.approx(res.info["calib_loss_final"], abs=1e-6)


@pytest.mark.parametrize("key,value,match", [("scale_bits", 1, "must be 0 \\(fp16 scales\\) or 2..8"),
                                             ("leftover_bits", 9, "must be 0 \\(fp16\\) or 2..8")])
def test_grid_bits_are_checked(key, value, match):
    with pytest.raises(ParamsError, match=f"'mixed_precision.{key}' {match}"):
        from_dict(MixedConfig, {key: value}, "mixed_precision").validate()


@pytest.mark.parametrize("mixed_seq,ft_seq,key,split", [(64, 16, "mixed_precision.seq_len", "dev"),
                                                       (17, 63, "finetune.seq_len", "training")])
def test_run_mixed_refuses_too_little_data_before_the_profile(model, monkeypatch, mixed_seq, ft_seq, key, split):
    import iteralite.pipeline.mixed as mixed

    def no_profile(*a, **k):
        raise AssertionError("the profile ran")

    monkeypatch.setattr(mixed, "profile", no_profile)
    cfg = from_dict(MixedConfig, {"group_size": 8, "sens_samples": 4, "seq_len": mixed_seq}, "mixed_precision")
    qcfg = QATConfig(steps=2, batch_size=2, seq_len=ft_seq, warmup_steps=1, threads=1)
    data = torch.randint(0, model.cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(DataError, match=rf"the {split} split has 64 tokens, too few for windows of '{key}'"):
        run_mixed(model, model, data, cfg, qcfg, progress=False, dev=data)


@pytest.mark.parametrize("init", ["rtn", "gptq"])
def test_profile_and_budget_read_the_dev_split_and_finetunes_the_training_split(model, monkeypatch, init):
    """Every dev window feeds the profile and the budget; the fine-tunes, and finetune_init gptq's
    Hessians (one draw per fine-tune), read the training split only."""
    import iteralite.pipeline.mixed as mixed

    seen = {"windows": [], "finetune": []}
    real_windows, real_distill = mixed.windows, mixed.distill_quantized

    def windows(data, *a, **k):
        seen["windows"].append(data)
        return real_windows(data, *a, **k)

    def distill(student, teacher, data, *a, **k):
        seen["finetune"].append(data)
        return real_distill(student, teacher, data, *a, **k)

    monkeypatch.setattr(mixed, "windows", windows)
    monkeypatch.setattr(mixed, "distill_quantized", distill)
    cfg = from_dict(MixedConfig, {"group_size": 8, "sens_samples": 4, "seq_len": 17, "batch_size": 4,
                                  "finetune_steps": 2, "max_ppl_delta_pct": 50.0, "finetune_init": init},
                    "mixed_precision")
    qcfg = QATConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, threads=1)
    data = torch.randint(0, model.cfg.vocab_size, (3000,), generator=torch.Generator().manual_seed(0))
    dev = torch.randint(0, model.cfg.vocab_size, (800,), generator=torch.Generator().manual_seed(1))
    run_mixed(model, model, data, cfg, qcfg, progress=False, dev=dev)
    assert seen["windows"] and all(d is dev or d is data for d in seen["windows"])
    from_data = sum(d is data for d in seen["windows"])
    assert from_data == (len(seen["finetune"]) if init == "gptq" else 0)
    assert len(seen["finetune"]) >= 2 and all(d is data for d in seen["finetune"])  # headline (+ rounds) + control


class _Opt:
    def __init__(self, bits, measured=None):
        self.allocation = {"u": bits}
        self.refits = [] if measured is None else [{"measured": measured}]


def _slack_run(first_loss, target, results, rounds=2, kw_origins=None, **kw):
    """use_the_slack with fakes: allocation = its bit count; results[i] = dev loss of round i's
    fine-tune; the extra nats offered in each round are recorded too."""
    calls, origins = [], []

    def reallocate(extra):
        return _Opt(100 - 10 * (len(calls) + 1))

    def fit(alloc, kept_model):
        calls.append(alloc["u"])
        origins.append(kept_model)
        return f"model{alloc['u']}", {"steps": 1}, results[len(calls) - 1]

    first = kw.pop("first", _Opt(100))
    kept, record = use_the_slack((first, "model100", {}, first_loss), target, rounds, reallocate, fit,
                                 lambda a: a["u"], **kw)
    if kw_origins is not None:
        kw_origins.extend(origins)
    return kept, record, calls


def test_slack_is_given_back_while_the_fine_tuned_loss_meets_the_budget():
    kept, record, calls = _slack_run(2.0, 2.5, [2.3, 2.45])
    assert calls == [90, 80] and kept[1] == "model80" and kept[3] == 2.45
    assert [r["kept"] for r in record] == [True, True] and record[0]["slack_nats"] == 0.5


def test_each_round_is_handed_the_model_of_the_allocation_kept_so_far():
    origins = []
    _slack_run(2.0, 2.5, [2.3, 2.6, 2.45], rounds=3, kw_origins=origins)
    assert origins == ["model100", "model90", "model90"]  # round 2 went over: round 3 starts from round 1's


def test_a_round_over_the_budget_keeps_the_previous_allocation():
    kept, record, calls = _slack_run(2.0, 2.5, [2.6], rounds=1)
    assert calls == [90] and kept[1] == "model100" and record[0]["kept"] is False


def test_after_a_round_over_the_budget_the_next_offers_half_as_much():
    kept, record, calls = _slack_run(2.0, 2.5, [2.3, 2.6, 2.45], rounds=3)
    assert [r["extra_nats"] for r in record] == [0.5, 0.7, 0.6]  # 0.5 kept; +0.2 failed; +0.1 kept
    assert [r["kept"] for r in record] == [True, False, True] and kept[1] == "model70" and kept[3] == 2.45


def test_the_scaled_rule_divides_the_slack_by_the_share_of_damage_the_fine_tune_kept():
    # start loss 1.8, damage 0.8 before the fine-tune and 0.2 after it (2.0): a quarter kept, so the
    # 0.1 nats of slack become 0.4 nats of allowance
    first = _Opt(100, measured=0.8)
    kept, record, calls = _slack_run(2.0, 2.1, [2.05], rounds=1, first=first, rule="scaled", base=1.8)
    assert record[0]["extra_nats"] == pytest.approx(0.4) and kept[1] == "model90"
    # the share is clamped to [1/4, 1]: a fine-tune that made things worse offers the slack itself
    _, record, _ = _slack_run(2.0, 2.1, [2.05], rounds=1, first=_Opt(100, measured=0.1), rule="scaled", base=1.8)
    assert record[0]["extra_nats"] == pytest.approx(0.1)
    _, record, _ = _slack_run(2.0, 2.1, [2.05], rounds=1, first=_Opt(100, measured=100.0), rule="scaled", base=1.8)
    assert record[0]["extra_nats"] == pytest.approx(0.4)
    # no measurement to scale by (no refit recorded): the slack itself, as the measured rule
    _, record, _ = _slack_run(2.0, 2.1, [2.05], rounds=1, rule="scaled", base=1.8)
    assert record[0]["extra_nats"] == pytest.approx(0.1)


def test_the_scaled_rule_treats_a_fine_tune_that_beat_the_start_as_keeping_a_quarter():
    # final 1.7 is below the start's 1.8: a negative share, clamped to 1/4, so 4x the slack
    _, record, _ = _slack_run(1.7, 1.8, [1.75], rounds=1, first=_Opt(100, measured=0.5), rule="scaled", base=1.8)
    assert record[0]["extra_nats"] == pytest.approx(0.4)


def test_the_scaled_rule_runs_no_round_on_a_slack_under_the_threshold():
    # 1/4 kept would turn the slack into 4x as much, over SLACK_NATS, but the slack itself is not worth a round
    first = _Opt(100, measured=0.8)
    kept, record, calls = _slack_run(2.0, 2.0 + SLACK_NATS / 2, [], rounds=2, first=first, rule="scaled", base=1.8)
    assert calls == [] and record == [] and kept[1] == "model100"


def test_after_a_scaled_round_over_the_budget_the_next_offers_half_as_much():
    first = _Opt(100, measured=0.8)  # a quarter kept: 0.1 of slack -> 0.4 offered
    kept, record, calls = _slack_run(2.0, 2.1, [2.2, 2.05], rounds=2, first=first, rule="scaled", base=1.8)
    assert [r["extra_nats"] for r in record] == pytest.approx([0.4, 0.2])
    assert [r["kept"] for r in record] == [False, True] and kept[1] == "model80"


def test_an_unknown_slack_rule_is_one_line():
    with pytest.raises(ParamsError, match="slack_rule' must be one of measured, scaled; got 'greedy'"):
        from_dict(MixedConfig, {"slack_rule": "greedy"}, "mixed_precision")


def test_an_unknown_round_start_is_one_line():
    with pytest.raises(ParamsError, match="round_start' must be one of student, kept; got 'best'"):
        from_dict(MixedConfig, {"round_start": "best"}, "mixed_precision")


def test_a_kept_round_start_is_the_kept_model_dequantized_and_leaves_it_alone(model):
    """round_start kept: a float copy that computes what the stored kept model computes."""
    cfg = from_dict(MixedConfig, {"group_size": 8}, "mixed_precision")
    kept = stored_allocation(model, {u: 4 for u in units(model)}, cfg)
    before = {k: v.clone() for k, v in kept.state_dict().items()}
    origin = ROUND_STARTS["kept"](model, kept)
    assert origin is not kept and not any(registry.is_stored(m) for m in origin.modules())
    assert all(torch.equal(v, kept.state_dict()[k]) for k, v in before.items())
    idx = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(origin(idx)[0], kept(idx)[0], rtol=1e-5, atol=1e-5)
    assert ROUND_STARTS["student"](model, kept) is model


def test_an_unknown_finetune_init_is_one_line():
    with pytest.raises(ParamsError, match="finetune_init' must be one of rtn, gptq; got 'awq'"):
        from_dict(MixedConfig, {"finetune_init": "awq"}, "mixed_precision")


@pytest.mark.parametrize("round_start,init", [("student", "rtn"), ("kept", "rtn"), ("student", "gptq")])
def test_run_mixed_rounds_from_either_start(model, round_start, init):
    cfg = from_dict(MixedConfig, {"group_size": 8, "sens_samples": 4, "seq_len": 17, "batch_size": 4,
                                  "finetune_steps": 2, "max_ppl_delta_pct": 80.0, "control_finetune": False,
                                  "budget_rounds": 2, "slack_rule": "scaled", "round_start": round_start,
                                  "finetune_init": init}, "mixed_precision")
    qcfg = QATConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, threads=1)
    data = torch.randint(0, model.cfg.vocab_size, (3000,), generator=torch.Generator().manual_seed(0))
    res = run_mixed(model, model, data, cfg, qcfg, progress=False, dev=data.flip(0))
    check_allocation(model, res.allocation)
    assert res.info["calib_loss_final"] > 0 and "budget_rounds" in res.info
    assert res.info["round_start"] == round_start and res.info["finetune_init"] == init


def test_no_slack_no_round():
    kept, record, calls = _slack_run(2.5 - SLACK_NATS / 2, 2.5, [])
    assert calls == [] and record == [] and kept[1] == "model100"


def test_split_dev_holds_the_last_share_out_as_whole_windows():
    dev = torch.arange(1000)
    assert split_dev(dev, 0.0, 17) == (dev, None)
    profiled, held = split_dev(dev, 0.5, 17)
    assert torch.equal(profiled, dev[:500])
    assert held.shape == (500 // 17, 17) and torch.equal(held.flatten(), dev[500:500 + 29 * 17])


@pytest.mark.parametrize("share,match", [(0.01, "the held-out dev part has 10 tokens, too few for one window"),
                                         (0.99, "the dev \\(profile part\\) split has 10 tokens, too few")])
def test_split_dev_refuses_a_part_too_small(share, match):
    with pytest.raises(DataError, match=match):
        split_dev(torch.arange(1000), share, 17)


@pytest.mark.parametrize("share", [-0.1, 1.0])
def test_check_share_must_be_a_share(share):
    with pytest.raises(ParamsError, match="check_share' must be >= 0 and < 1"):
        from_dict(MixedConfig, {"check_share": share}, "mixed_precision")


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_budget_checks_score_the_held_out_windows(model, monkeypatch, share):
    """With a check share the profile samples only the dev part before the cut and the kept model's
    dev loss is its loss on the held-out windows; without one, on the profile's windows."""
    import iteralite.pipeline.mixed as mixed

    sampled = []
    real_windows = mixed.windows

    def spy(data, *a, **k):
        sampled.append(data)
        return real_windows(data, *a, **k)

    monkeypatch.setattr(mixed, "windows", spy)
    cfg = from_dict(MixedConfig, {"group_size": 8, "sens_samples": 4, "seq_len": 17, "batch_size": 4,
                                  "finetune_steps": 2, "max_ppl_delta_pct": 80.0, "control_finetune": False,
                                  "budget_rounds": 2, "slack_rule": "scaled", "check_share": share},
                    "mixed_precision")
    qcfg = QATConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, threads=1)
    data = torch.randint(0, model.cfg.vocab_size, (3000,), generator=torch.Generator().manual_seed(0))
    dev = torch.randint(0, model.cfg.vocab_size, (800,), generator=torch.Generator().manual_seed(1))
    res = run_mixed(model, model, data, cfg, qcfg, progress=False, dev=dev)
    assert len(sampled) == 1 and torch.equal(sampled[0], dev[:400] if share else dev)
    checks = tiles(dev[400:], 17) if share else windows(dev, 4, 17, cfg.seed)
    assert res.info["calib_loss_final"] == pytest.approx(mean_loss(res.model, checks, 4), abs=1e-6)
    assert res.info["check_loss_fp32"] == pytest.approx(mean_loss(model, checks, 4), abs=1e-6)
    assert res.info["check_tokens"] == checks[:, 1:].numel() and res.info["check_share"] == share


def test_the_secant_backoff_offers_where_the_line_through_kept_and_failed_meets_the_budget():
    # kept 2.3 after +0.5, +0.2 more went to 2.6 over the 2.5 target: 2/3 of that step lands on it
    _, record, _ = _slack_run(2.0, 2.5, [2.3, 2.6, 2.45], rounds=3, backoff="secant")
    assert [r["extra_nats"] for r in record] == pytest.approx([0.5, 0.7, 0.5 + 0.2 * 2 / 3])
    assert [r["kept"] for r in record] == [True, False, True]


@pytest.mark.parametrize("kept,over,share", [(2.49, 2.9, 0.25), (2.0, 2.501, 0.75), (2.4, 2.4, 0.5), (2.4, 2.3, 0.5)])
def test_the_secant_backoff_is_clamped_to_a_quarter_and_three_quarters(kept, over, share):
    assert BACKOFFS["secant"](0.4, kept, over, 2.5) == pytest.approx(0.4 * share)
    assert BACKOFFS["half"](0.4, kept, over, 2.5) == pytest.approx(0.2)


def test_an_unknown_backoff_is_one_line():
    with pytest.raises(ParamsError, match="backoff' must be one of half, secant; got 'bisect'"):
        from_dict(MixedConfig, {"backoff": "bisect"}, "mixed_precision")

"""prune_with_recovery, one step on the tiny model: a dequantized, physically pruned float model
whose config records its sizes, recovered by distillation, ready for the stage's 4-bit packing."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils import parametrize

from iteralite.io.errors import IteraliteError
from iteralite.prune.config import PruneConfig
from iteralite.prune.counting import layer_shapes, prunable_params, require_float
from iteralite.prune.recovery import prune_with_recovery
from iteralite.quant.qat import QATConfig
from iteralite.quant.spec import QuantSpec
from iteralite.quant.swap import make_spec_for, quantize
from iteralite.train.live import stage_live
from tests.prune.helpers import bigger, logits, tokens
from tests.train.conftest import offline_live, read_live

RATIO = 0.3


def run(recovery_steps: int, dev: torch.Tensor | None = None, steps: int = 1, live=None):
    cfg = PruneConfig(ratios=[RATIO], importance="magnitude", steps=steps, recovery_steps=recovery_steps,
                      calib_batches=1, channel_multiple=8)
    recovery = QATConfig(steps=1, batch_size=2, seq_len=16, warmup_steps=0, group_size=8)
    spec = QuantSpec(bits=4, group_size=8, method="rtn")
    quantized = quantize(bigger(), make_spec_for(spec, tuple(recovery.keep_float)))
    data = torch.randint(0, 300, (2000,), generator=torch.Generator().manual_seed(5))
    dev = torch.randint(0, 300, (1500,), generator=torch.Generator().manual_seed(6)) if dev is None else dev
    model, report, history = prune_with_recovery(quantized, bigger(), data, RATIO, cfg, spec, recovery,
                                                 progress=False, dev=dev, live=live)
    return model, report, history, spec, recovery


def test_one_step_prunes_recovers_and_packs():
    model, report, history, spec, recovery = run(recovery_steps=1)
    unpruned = bigger()
    # pruned to the ratio, and the config records the new per-layer sizes
    assert abs(report["prunable_params_removed_frac"] - RATIO) < 0.02
    shapes = layer_shapes(model)
    assert report["layers"] == shapes
    assert model.cfg.layer_n_heads == [s["n_heads"] for s in shapes.values()]
    assert model.cfg.layer_n_experts == [s["n_experts"] for s in shapes.values()]
    assert model.cfg.layer_d_ff == [s["d_ff"] for s in shapes.values()]
    assert all(s["d_ff"] % 8 == 0 for s in shapes.values())
    assert prunable_params(model) < prunable_params(unpruned)
    assert report["params_after"] == model.num_params() < unpruned.num_params()
    # one schedule step with its recovery
    assert len(history) == 1 and history[0]["target"] == RATIO and math.isfinite(history[0]["recovery_ce"])
    # a plain float model: dequantized, fake quant stripped
    require_float(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    idx = tokens()
    out = logits(model, idx)
    assert torch.isfinite(out).all()
    # recovery trained the pruned weights (same pruning without recovery gives other logits)
    assert not torch.allclose(out, logits(run(recovery_steps=0)[0], idx))
    # the stage's export: every pruned width still packs into 4-bit groups of 8
    packed = quantize(model, make_spec_for(spec, tuple(recovery.keep_float)))
    with pytest.raises(IteraliteError, match="dequantize"):
        require_float(packed)
    assert torch.isfinite(logits(packed, idx)).all()


def test_decisions_read_the_dev_split_and_recovery_trains_on_the_training_split(monkeypatch):
    import iteralite.prune.recovery as recovery_mod

    seen = {}
    real_batches, real_distill = recovery_mod.calibration_batches, recovery_mod.distill_train

    def batches(data, *a, **k):
        seen["calibration"] = data
        return real_batches(data, *a, **k)

    def distill(student, teacher, data, *a, **k):
        seen["recovery"] = data
        return real_distill(student, teacher, data, *a, **k)

    monkeypatch.setattr(recovery_mod, "calibration_batches", batches)
    monkeypatch.setattr(recovery_mod, "distill_train", distill)
    dev = torch.randint(0, 300, (1500,), generator=torch.Generator().manual_seed(9))
    run(recovery_steps=1, dev=dev)
    assert seen["calibration"] is dev  # importance, routing and sensitivity batches
    assert seen["recovery"].numel() == 2000  # the training tokens


def test_recoveries_log_on_one_step_counter(tmp_path, monkeypatch):
    """Two pruning steps of 3 recovery steps each into the stage's one logger: steps 3 and 6,
    `round` 0 and 1, and the last recovery's CE in the summary."""
    live_root = offline_live(tmp_path, monkeypatch)
    with stage_live(live_root / "prune") as live:
        _, _, history, _, _ = run(recovery_steps=3, steps=2, live=live)
    tsvs, summary = read_live(live_root / "prune")
    assert tsvs["round.tsv"] == [(3, 0.0), (6, 1.0)]
    assert [s for s, _ in tsvs["train/ce.tsv"]] == [3, 6]
    assert summary["step"] == 6 and summary["final_train_ce"] == history[-1]["recovery_ce"]

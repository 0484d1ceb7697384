"""The allocator, the profile, the mixed fine-tune and the stage's config checks."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from iteralite.train.evaluate import mean_loss
from iteralite.io.errors import IteraliteError, ParamsError
from iteralite.quant.units import allocation_bits, allocation_spec_for, quantize_allocation, units
from iteralite.io.params import from_dict
from iteralite.pipeline.mixed import MixedConfig
from iteralite.quant.allocate import allocate, manual_allocation, monotone, optimize, profile, sizes_table
from iteralite.quant.qat import attach_fake_quant
from iteralite.quant.qat import QATConfig, strip_fake_quant
from iteralite.train.distill import distill_train

SIZES = {"a": {2: 20, 4: 40, 16: 160}, "b": {2: 20, 4: 40, 16: 160}, "c": {2: 200, 4: 400, 16: 1600}}
SENS = {"a": {2: 0.5, 4: 0.01, 16: 0.0}, "b": {2: 0.05, 4: 0.0, 16: 0.0}, "c": {2: 0.2, 4: 0.02, 16: 0.0}}


@pytest.mark.parametrize("budget", [0.0, 0.01, 0.03, 0.1, 0.3, 1.0])
def test_allocator_respects_its_budget(budget):
    alloc = allocate(SIZES, SENS, budget=budget)
    assert sum(SENS[u][p] for u, p in alloc.items()) <= budget + 1e-12
    # and it is greedy-maximal: no single further move fits the budget
    used = sum(SENS[u][p] for u, p in alloc.items())
    for u, p in alloc.items():
        for q in SIZES[u]:
            if q < p:
                assert used + SENS[u][q] - SENS[u][p] > budget


def test_allocator_spends_bits_where_they_matter():
    alloc = allocate(SIZES, SENS, budget=0.1)
    assert alloc == {"a": 4, "b": 2, "c": 4}  # b is cheap to squeeze, a is not; c's 2-bit costs too much


def test_allocator_reaches_a_bits_target():
    total = sum(max(v.values()) for v in SIZES.values())
    for target in (total, 0.5 * total, 300, 0):
        alloc = allocate(SIZES, SENS, target_bits=target)
        bits = sum(SIZES[u][p] for u, p in alloc.items())
        assert bits <= target or all(p == min(SIZES[u]) for u, p in alloc.items())


def test_monotone_never_lets_a_lower_precision_look_better():
    m = monotone({"u": {2: 0.1, 3: 0.3, 4: -0.01, 8: 0.02, 16: 0.0}})["u"]
    assert m == {16: 0.0, 8: 0.02, 4: 0.02, 3: 0.3, 2: 0.3}


def _windows(cfg, n=8, l=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (n, l), generator=g)


def test_optimize_on_a_toy_model_keeps_the_measured_loss_inside_the_budget(model):
    cfg = from_dict(MixedConfig, {"group_size": 8, "batch_size": 4, "max_refits": 6}, "mixed_precision")
    wins = _windows(model.cfg)
    base, sens = profile(model, wins, cfg.precisions, cfg.group_size, cfg.batch_size, progress=False)
    assert set(sens) == set(units(model)) and all(set(v) == {2, 3, 4, 8, 16} for v in sens.values())
    sizes = sizes_table(model, cfg.precisions, cfg.group_size)
    teacher_loss = base  # the start equals the teacher: the whole budget is ln(1.15)
    for pct in (1.0, 15.0):
        cfg.max_ppl_delta_pct = pct
        opt = optimize(model, wins, sizes, monotone(sens), cfg, base, teacher_loss)
        probe = quantize_allocation(copy.deepcopy(model), opt.allocation, cfg.group_size)
        assert mean_loss(probe, wins, 4) - base <= math.log1p(pct / 100) + 1e-6
    assert allocation_bits(model, opt.allocation, 8) < allocation_bits(model, {u: 16 for u in sizes}, 8)


def test_optimize_refuses_a_start_that_is_already_over_budget(model):
    cfg = from_dict(MixedConfig, {"group_size": 8}, "mixed_precision")
    sizes = sizes_table(model, cfg.precisions, 8)
    with pytest.raises(IteraliteError, match="already .* above FP32 .* raise mixed_precision.max_ppl_delta_pct"):
        optimize(model, _windows(model.cfg), sizes, {u: {p: 0.0 for p in v} for u, v in sizes.items()}, cfg,
                 base_loss=3.0, teacher_loss=2.0)


def test_mixed_fine_tune_exports_exactly_what_it_trained(model, tok_dir):
    alloc = {u: (2, 3, 4, 8, 16)[i % 5] for i, u in enumerate(units(model))}
    student = copy.deepcopy(model)
    attach_fake_quant(student, allocation_spec_for(alloc, 8))
    data = torch.randint(0, model.cfg.vocab_size, (4000,))
    qcfg = QATConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=1, threads=1)
    distill_train(student, model, data, qcfg, progress=False)
    idx = _windows(model.cfg, 2, 12)
    with torch.no_grad():
        trained = student(idx)[0]
    strip_fake_quant(student)
    exported = quantize_allocation(student, alloc, 8)
    torch.testing.assert_close(exported(idx)[0], trained, atol=1e-5, rtol=1e-5)


def test_manual_map_assigns_by_unit_type(model):
    cfg = from_dict(MixedConfig, {}, "mixed_precision")
    alloc = manual_allocation(units(model), cfg.manual)
    assert alloc["embedding"] == 8 and alloc["layers.0.mixer.x_proj"] == 16 and alloc["layers.1.moe.experts[2]"] == 4


@pytest.mark.parametrize("raw,match", [
    ({"precisions": [2, 5]}, "unknown precision 5"),
    ({"precisions": ["int4", "float8"]}, "unknown precision 'float8'"),
    ({"precisions": []}, "at least one precision"),
    ({"max_ppl_delta_pct": 0}, "quality budget.*must be > 0"),
    ({"max_ppl_delta_pct": -3.0}, "quality budget.*must be > 0"),
    ({"policy": "auto"}, "must be one of optimized, manual"),
    ({"objective": "speed"}, "must be one of ppl_budget, bits_target"),
    ({"manual": {"embedding": 8}}, "missing"),
    ({"manual": {"embeddings": 8}}, "unknown unit types"),
    ({"from_ratio": 0.4}, "unknown key .mixed_precision.from_ratio."),  # moved to the student stage
    ({"finetune_lr": -1.0}, "must be >= 0"),
    ({"budget": 3}, "unknown key 'mixed_precision.budget'"),
])
def test_config_errors_name_the_key_and_the_allowed_values(raw, match):
    with pytest.raises(ParamsError, match=match):
        from_dict(MixedConfig, raw, "mixed_precision")


_ALL4 = dict.fromkeys(("embedding", "embed_in", "head_proj", "in_proj", "x_proj", "dt_proj", "out_proj", "router", "experts"), 4)


@pytest.mark.parametrize("raw,match", [
    # the default manual map (int8, fp16, int4) with fewer candidates: refused before any profile
    ({"precisions": [2, 3, 4]}, r"'mixed_precision.manual' uses int8 for embedding, embed_in, head_proj, in_proj, out_proj; fp16 for "
                                r"x_proj, dt_proj, router, not among the candidates 'mixed_precision.precisions' "
                                r"\(int2, int3, int4\)"),
    ({"precisions": [2, 3, 4], "manual": _ALL4}, r"'mixed_precision.compare' has int8, not among the candidates "
                                                 r"'mixed_precision.precisions' \(int2, int3, int4\)"),
    ({"precisions": [2, 8], "manual": {**_ALL4, "experts": 2, **dict.fromkeys(_ALL4, 8)}, "compare": [8]},
     r"'mixed_precision.control_finetune' fine-tunes a uniform int4 control, which is not among the candidates.*"
     r"add 4 to precisions or set control_finetune: false"),
])
def test_manual_compare_and_control_must_use_candidate_precisions(raw, match):
    with pytest.raises(ParamsError, match=match):
        from_dict(MixedConfig, raw, "mixed_precision")


def test_candidate_rule_accepts_a_consistent_small_set():
    cfg = from_dict(MixedConfig, {"precisions": ["int2", "int4"], "manual": _ALL4, "compare": [4, "int2"]},
                    "mixed_precision")
    assert cfg.precisions == [2, 4] and cfg.compare == [4, 2]
    cfg = from_dict(MixedConfig, {"precisions": [2, 8], "manual": dict.fromkeys(_ALL4, 8), "compare": [8],
                                  "control_finetune": False}, "mixed_precision")
    assert cfg.precisions == [2, 8]

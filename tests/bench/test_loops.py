"""Decode loops like for like: the step loop is one driver for every runtime, a best loop gives
the same ids as the step loop of the same runtime, ratios never mix the two, and free-running
agreement counts equal ids position by position."""
from __future__ import annotations

import copy

import pytest
import torch

from iteralite.bench import loops
from iteralite.quant.units import quantize_allocation, units
from iteralite.runtime.native.runtime import NativeIteraLite
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def packed_model():
    from iteralite.core.model import IteraLite

    torch.manual_seed(0)
    model = IteraLite(tiny_config()).eval()
    alloc = {u: (2, 4, 8)[i % 3] for i, u in enumerate(units(model))}
    return quantize_allocation(copy.deepcopy(model), alloc, 8).eval()


def test_the_native_c_loop_gives_the_step_loops_ids(packed_model):
    native = NativeIteraLite.from_model(packed_model)
    prompt = [5, 17, 42]
    best = loops.greedy_ids(native, "native", prompt, 40)
    assert best == loops.greedy_ids(native, "native", prompt, 40, best=False)
    assert len(best) == 40 and loops.best_loop("native").run is not None


def test_the_step_loop_is_the_generation_after_the_prompt(packed_model):
    """prefilled + step_loop == stepping the prompt and then greedy steps by hand."""
    prompt = [3, 9, 27]
    got = loops.greedy_ids(packed_model, "artifact", prompt, 6)
    state, want = packed_model.init_state(1), []
    with torch.no_grad():
        for t in prompt:
            logits, state = packed_model.step(torch.tensor([t]), state)
        for _ in range(6):
            want.append(int(logits.argmax(-1)))
            logits, state = packed_model.step(torch.tensor([want[-1]]), state)
    assert got == want


def test_measure_loops_fills_both_columns(packed_model):
    native = NativeIteraLite.from_model(packed_model)
    out = loops.measure_loops("n", "native", native, [1, 2], 8, 1, prefill_len=8)
    assert out["best_loop"] == loops.BEST_LOOPS["native"].label
    assert out["decode_tok_s_1thread"] == out["decode_tok_s_best_loop"] > 0
    assert out["decode_tok_s_step_loop"] > 0 and out["decode_tok_s_step_loop_all_threads"] > 0
    assert out["prompt_tokens"] == 2 and out["decode_tokens"] == 8 and out["prefill_ms_8"] > 0
    eager = loops.measure_loops("e", "artifact", packed_model, [1, 2], 4, 1, prefill_len=8)
    assert eager["best_loop"].startswith(loops.STEP_LOOP)  # no loop of its own: one measurement, both columns
    assert eager["decode_tok_s_best_loop"] == eager["decode_tok_s_step_loop"]
    assert eager["decode_tok_s_all_threads"] == eager["decode_tok_s_step_loop_all_threads"]


def test_speedups_divide_like_by_like_only():
    results = {"fp32": {"decode_tok_s_step_loop": 100.0, "decode_tok_s_best_loop": 100.0,
                        "decode_tok_s_all_threads": 50.0},
               "fused": {"decode_tok_s_step_loop": 1000.0, "decode_tok_s_best_loop": 1000.0},
               "native": {"decode_tok_s_step_loop": 2000.0, "decode_tok_s_best_loop": 5000.0},
               "itl_run": {"decode_tok_s_best_loop": 6000.0}}
    loops.speedups(results)
    nat, prog = results["native"], results["itl_run"]
    assert nat["decode_speedup_vs_fused"] == 5.0 and nat["decode_speedup_vs_fused_step_loop"] == 2.0
    assert nat["decode_speedup_vs_fp32_eager"] == 50.0 and nat["decode_speedup_vs_fp32_eager_step_loop"] == 20.0
    assert prog["decode_speedup_vs_fused"] == 6.0 and "decode_speedup_vs_fused_step_loop" not in prog
    assert "decode_speedup_vs_fp32_eager_all_threads" not in nat  # native has no all-threads column here
    for key, (num, _, den) in loops.SPEEDUPS.items():  # every ratio: the same column over the same column
        assert num == den, key


def test_agreement_counts_equal_ids_position_by_position():
    assert loops.agreement([1, 2, 3, 4], [1, 2, 3, 4]) == {
        "greedy_agreement_with_eager": 1.0, "greedy_first_divergence_from_eager": 4, "greedy_agreement_steps": 4}
    out = loops.agreement([1, 9, 3], [1, 2, 3, 4], against="native")
    assert out == {"greedy_agreement_with_native": 0.5, "greedy_first_divergence_from_native": 1,
                   "greedy_agreement_steps": 4}

"""The program rows (itl-run, the wasm runner) read through their command-line contract, with a
fake program that speaks it; a program that is missing or fails gives `available: false` and
the reason; instruction counts come from callgrind and repeat exactly."""
from __future__ import annotations

import shutil
import sys

import pytest

from iteralite.bench import loops, programs
from tests.conftest import REPO

FAKE = REPO / "tests" / "bench" / "fake_program.py"


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """PROGRAMS["itl_run"] replaced by the fake; returns a function that sets the ids it prints."""
    monkeypatch.setitem(programs.PROGRAMS, "itl_run",
                        programs.Program("fake loop", "itl-run", "tests.bench.test_programs:_fake_argv"))
    ids_file = tmp_path / "ids.txt"
    monkeypatch.setenv("FAKE_IDS", str(ids_file))

    def set_ids(ids):
        ids_file.write_text(" ".join(map(str, ids)))
    return set_ids


def _fake_argv():
    return [sys.executable, str(FAKE)]


def _missing_argv():
    raise programs.ProgramMissing("not built here")


def _row(reference, native=None, n_tokens=4):
    refs = {"eager": reference, **({"native": native} if native is not None else {})}
    return programs.program_row("itl_run", FAKE, "tok.bin", "Once", n_tokens, 2, refs, loops.agreement)


def test_a_program_row_reads_speed_and_ids_from_the_contract(fake):
    reference = list(range(10, 30))
    ids = list(reference)
    ids[5] = 999
    fake(ids)
    row = _row(reference, native=ids)
    assert row["available"] is True and row["best_loop"] == "fake loop"
    assert row["decode_tok_s_best_loop"] == pytest.approx(1600.0)  # the timed runs: 4 ids in 2.5 ms
    assert row["decode_tok_s_1thread"] == row["decode_tok_s_best_loop"]
    assert row["prompt_tokens"] == 4 and row["prefill_ms_prompt"] == 0.3 and row["generated_tokens"] == 20
    assert row["greedy_agreement_with_eager"] == 0.95 and row["greedy_first_divergence_from_eager"] == 5
    assert row["greedy_agreement_with_native"] == 1.0 and row["greedy_first_divergence_from_native"] == 20
    assert row["greedy_agreement_steps"] == 20 and "decode_tok_s_step_loop" not in row


def test_a_program_that_stops_early_counts_the_missing_ids_as_different(fake):
    fake([1, 2, 3])
    row = _row([1, 2, 3, 4, 5, 6], n_tokens=2)
    assert row["greedy_agreement_with_eager"] == 0.5 and row["greedy_first_divergence_from_eager"] == 3


def test_a_missing_program_gives_an_unavailable_row_with_the_reason(monkeypatch):
    monkeypatch.setitem(programs.PROGRAMS, "itl_run",
                        programs.Program("x", "itl-run", "tests.bench.test_programs:_missing_argv"))
    row = _row([1, 2])
    assert row == {"kind": "program", "best_loop": "x", "available": False, "reason": "not built here"}


def test_a_failing_program_gives_an_unavailable_row_with_its_error_line(fake, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "bad artifact")
    row = _row([1, 2])
    assert row["available"] is False and row["reason"] == "itl-run exited 2: itl-run: error: bad artifact"


def test_a_program_without_the_timing_line_fails_clearly(fake, monkeypatch):
    fake([1, 2])
    monkeypatch.setenv("FAKE_PREFIX", "something-else")
    row = _row([1, 2])
    assert row["available"] is False and "no timing line" in row["reason"]


def test_the_real_programs_say_why_when_they_are_not_there(monkeypatch, tmp_path):
    monkeypatch.setattr(programs, "ROOT", tmp_path)  # no web/ here
    with pytest.raises(programs.ProgramMissing, match="itl-node.mjs is missing|node is not installed"):
        programs.wasm_argv()


COUNTER = """#!/bin/sh
# a stand-in program whose work grows with -n: a shell loop of n rounds; it refuses to run
# unless the count forces the AVX2 path (valgrind has no AVX-512)
[ "$ITERALITE_NATIVE_ISA" = avx2 ] || exit 3
n=0
while [ $# -gt 0 ]; do [ "$1" = "-n" ] && n=$2; shift; done
i=0
while [ $i -lt $n ]; do i=$((i + 1)); done
"""


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_instructions_per_token_is_a_repeatable_difference_of_callgrind_counts(monkeypatch, tmp_path):
    script = tmp_path / "counter.sh"
    script.write_text(COUNTER)
    script.chmod(0o755)
    monkeypatch.setitem(programs.PROGRAMS, "itl_run",
                        programs.Program("c", "itl-run", "tests.bench.test_programs:_argv"))
    monkeypatch.setattr(sys.modules[__name__], "_SCRIPT", str(script), raising=False)
    first = programs.instructions_per_token("a", "b", "p", 10, 210)
    again = programs.instructions_per_token("a", "b", "p", 10, 210)
    assert first["instructions_available"] is True and first["instructions_tokens"] == [10, 210]
    assert "callgrind" in first["instructions_tool"] and first["instructions_program"] == "itl-run"
    assert first["instructions_isa"] == "avx2"
    assert first["instructions_per_token"] > 100  # a shell loop round costs hundreds of instructions
    assert abs(again["instructions_per_token"] / first["instructions_per_token"] - 1) < 0.01


def _argv():
    return [_SCRIPT]


_SCRIPT = ""


def test_instructions_without_valgrind_are_marked_unavailable(monkeypatch):
    monkeypatch.setattr(programs.shutil, "which", lambda name: None)
    out = programs.instructions_per_token("a", "b", "p", 1, 2)
    assert out == {"instructions_available": False, "instructions_reason": "valgrind is not installed"}

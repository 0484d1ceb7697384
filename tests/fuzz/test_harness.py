"""The fuzz harness itself: its budget counts CPU time (a busy case is stopped, a waiting one is
not), and a failing case is reported with its name, seed, index and mutation."""
from __future__ import annotations

import time

import pytest

from tests.fuzz.harness import CaseTimeout, Failure, run_cases, time_budget


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_busy_case_is_stopped_at_its_cpu_budget():
    t0 = time.process_time()
    with pytest.raises(CaseTimeout, match="0.2 s CPU budget"), time_budget(0.2):
        _spin(5.0)
    assert time.process_time() - t0 < 2.0


def test_waiting_costs_no_budget():
    """A loaded box stretches wall time, not CPU time: 0.5 s asleep fits a 0.2 s budget."""
    with time_budget(0.2):
        time.sleep(0.5)


def test_failures_name_the_case_and_its_mutation():
    def case(rng, describe):
        describe(f"draw {rng.randrange(1000)}")
        if rng.random() < 0.5:
            raise Failure("broke the property")
        if rng.random() < 0.5:
            _spin(1.0)

    failures = run_cases("demo", 7, 20, case, budget_s=0.1)
    assert failures, "20 cases with a 50% failure rate all passed"
    for line in failures:
        assert line.startswith("demo seed=7 case=") and "mutation=draw " in line
        assert line.endswith("property: broke the property") or "CaseTimeout: ran past its 0.1 s CPU budget" in line
    again = run_cases("demo", 7, 20, case, budget_s=0.1)
    assert [f.split(" -> ")[0] for f in again] == [f.split(" -> ")[0] for f in failures]

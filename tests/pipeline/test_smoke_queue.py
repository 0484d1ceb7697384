"""The README's sweep recipe on tiny params: queued experiments run in the background and show up
in `dvc exp show`. A module of its own (with its own clone), so `make test` runs it beside
test_smoke.py's chain rather than after it."""
from __future__ import annotations

import json
import time

import pytest

from tests.pipeline_utils import run as _run, tiny_clone

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    return tiny_clone(tmp_path_factory)


def _experiments(shown) -> list[dict]:
    """Every experiment row of `dvc exp show --json` (queued runs are nested under their baseline)."""
    rows = []
    for base in shown:
        for exp in base.get("experiments") or []:
            rows.extend(exp.get("revs") or [])
    return rows


def test_queued_sweeps_run_in_the_background_and_show_up_in_exp_show(clone):
    """The README's sweep: two `dvc exp run --queue -S prune.ratios=...`, `dvc queue start -j 1`,
    then both experiments are in `dvc exp show` with their params and headline metrics."""
    dst, env = clone
    _run(["dvc", "repro"], dst, env)
    _run(["git", "add", "-A"], dst, env)  # the baseline the queue builds on: code, dvc.lock, metrics
    _run(["git", "commit", "-q", "-m", "baseline run"], dst, env)
    sweeps = {"0.2": "[0.2,0.4]", "0.1": "[0.1,0.4]"}
    for ratios in sweeps.values():
        queued = _run(["dvc", "exp", "run", "--queue", "-S", f"prune.ratios={ratios}"], dst, env)
        assert "Queued experiment" in queued.stdout, queued.stdout
    _run(["dvc", "queue", "start", "-j", "1"], dst, env)
    deadline = time.monotonic() + 900
    while True:
        status = _run(["dvc", "queue", "status"], dst, env).stdout
        if not any(s in status for s in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert status.count("Success") == 2, status
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], dst, env).stdout)
    rows = _experiments(shown)
    assert len(rows) >= 2, shown
    found = {}
    for row in rows:
        data = row.get("data") or {}
        ratios = data["params"]["params.yaml"]["data"]["prune"]["ratios"]
        metrics = {path: m["data"] for path, m in (data.get("metrics") or {}).items()}
        found[str(ratios[0])] = metrics
    for ratio in sweeps:
        metrics = found[ratio]
        headline = metrics[f"metrics/headline/finetune_{ratio}.json"]
        assert headline["val_ppl"] > 1 and headline["size_bytes"] > 0
        assert "metrics/headline/benchmark.json" in metrics
        assert not any(path.startswith("metrics/") and "/headline/" not in path for path in metrics), metrics

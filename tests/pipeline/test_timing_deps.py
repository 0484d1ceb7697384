"""No stage depends on a file that holds timings: `dvc repro -f -s train` with nothing changed
rewrites metrics/train.json (seconds, tokens/s), and every stage that listed it was then out of
date. Stages read the timing-free records in metrics/quality/ instead (`write_metrics(...,
quality=True)`); the check_params stage runs before all others."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from iteralite.pipeline.stage import PARAMS_CHECKED, QUALITY_DIR, holds_timings, quality_path, quality_record
from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
# Measurements of one run found in the pipeline's metrics files (and artifacts.RUN_FACTS): none may
# reach a quality record.
KNOWN_TIMING_KEYS = {"seconds", "train_seconds", "train_tokens_per_s", "threads", "resumed_from_step",
                     "compile_seconds",
                     "decode_tok_s_1thread", "decode_tok_s_1thread_unfused", "decode_tok_s_1thread_fp32_eager",
                     "decode_tok_s_fp32", "decode_tok_s_int4_kernel", "prefill_ms_128", "prefill_ms_128_unfused",
                     "baseline_rss_mb", "peak_rss_mb", "peak_minus_baseline_mb", "decode_speedup_vs_fp32_eager",
                     "decode_speedup_vs_unfused", "load_to_first_token_ms", "threads_all", "rss_over_baseline_mib",
                     "speed", "requests_per_s", "tokens_per_s", "ttft_ms", "per_token_ms"}


def _paths(items) -> list[str]:
    return [i if isinstance(i, str) else next(iter(i)) for i in items or []]


def _outputs(st: dict) -> list[str]:
    return [p for key in ("outs", "metrics", "plots") for p in _paths(st.get(key))]


def _as_regex(out: str) -> re.Pattern:
    return re.compile("[^/]+".join(re.escape(p) for p in re.split(r"\$\{[^}]*\}", out)))


def _keys(d) -> set[str]:
    if isinstance(d, dict):
        return set(d) | {k for v in d.values() for k in _keys(v)}
    if isinstance(d, list):
        return {k for v in d for k in _keys(v)}
    return set()


def test_no_stage_depends_on_a_file_that_holds_timings():
    timed = [o for st in STAGES.values() for o in _outputs(st) if holds_timings(o)]
    assert "metrics/train.json" in timed and "dvclive/train" in timed
    bad = [f"stage '{name}' depends on {dep}, which holds timings: depend on {quality_path(dep)} instead"
           for name, st in STAGES.items() for dep in _paths(st.get("deps"))
           if holds_timings(dep) or any(_as_regex(o).fullmatch(dep) or _as_regex(dep).fullmatch(o) for o in timed)]
    assert not bad, "\n".join(bad)


def test_every_metrics_dep_is_a_record_some_stage_writes():
    written = [o for st in STAGES.values() for o in _outputs(st)]
    deps = [d for st in STAGES.values() for d in _paths(st.get("deps")) if d.startswith("metrics/")]
    assert deps and all(d.startswith(QUALITY_DIR + "/") for d in deps), deps
    missing = [d for d in deps if d not in written]
    assert not missing, f"no stage writes {missing}"


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "metrics").glob("*.json")))
def test_quality_records_of_the_pipelines_metrics_hold_no_timing(path):
    metrics = json.loads((REPO / "metrics" / path).read_text())
    assert not _keys(quality_record(metrics)) & KNOWN_TIMING_KEYS
    assert quality_record(metrics).get("val_ppl") == metrics.get("val_ppl")  # quality stays


def test_run_facts_are_timing_keys():
    from iteralite.pipeline.artifacts import RUN_FACTS

    assert not _keys(quality_record({k: 1 for k in RUN_FACTS}))


def test_a_stage_that_writes_a_quality_record_declares_it():
    for name, st in STAGES.items():
        script = (REPO / next(w for w in st["cmd"].split() if w.startswith("stages/"))).read_text()  # student_tiny: student.py
        declared = [o for o in _outputs(st) if o.startswith(QUALITY_DIR + "/")]
        assert bool(declared) == ("quality=True" in script or name == "check_params"), name


def test_check_params_runs_before_every_other_stage():
    """It tracks the whole params file, and `data` (every stage's ancestor) depends on its output."""
    st = STAGES["check_params"]
    assert st["params"] == [{"params.yaml": None}] and _outputs(st) == [PARAMS_CHECKED]
    assert PARAMS_CHECKED in _paths(STAGES["data"]["deps"])
    assert not [n for n, s in STAGES.items() if n != "check_params" and PARAMS_CHECKED in _outputs(s)]

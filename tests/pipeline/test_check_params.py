"""The check_params stage (dvc.yaml's first): every params section and what one says about another,
checked before any stage works, as one line and exit status 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from iteralite.pipeline.stage import PARAMS_CHECKED
from tests.conftest import REPO


def _run_stage(tmp_path, params: dict):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "stages" / "check_params.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_student_ratio_no_stage_writes_stops_the_first_stage(tmp_path):
    """Before: DVC ran the pipeline up to the student stage, then said a dependency file does not
    exist, naming neither key."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["student"]["from_ratio"] = 0.3
    p = _run_stage(tmp_path, params)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("[check_params] error: params: 'student.from_ratio' = 0.3 is not one of "
                               "'prune.ratios' [0.1, 0.2, 0.4]") and p.stderr.count("\n") == 1, p.stderr
    assert not (tmp_path / PARAMS_CHECKED).exists()


def test_valid_params_write_the_same_record_every_time(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    p = _run_stage(tmp_path, params)
    assert p.returncode == 0, p.stderr
    first = (tmp_path / PARAMS_CHECKED).read_bytes()
    assert json.loads(first)["checked_sections"][0] == "data"
    params["train"]["steps"] = 3200  # another value: the record, which `data` depends on, stays the same
    assert _run_stage(tmp_path, params).returncode == 0
    assert (tmp_path / PARAMS_CHECKED).read_bytes() == first

"""Faults around `dvc repro`: kill -9 in the middle of a stage (the run resumes, or restarts when its
code changed, and ends with valid outputs), a diverged run (stops, nothing cached), and a forced
rerun (byte-identical artifacts, nothing downstream to rerun)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from iteralite.io.checkpoint import load_model
from tests.conftest import REPO
from tests.pipeline_utils import clone_env, make_clone, run

pytestmark = pytest.mark.slow


def _params(**sections) -> str:
    p = yaml.safe_load((REPO / "tests" / "tiny_params.yaml").read_text())
    for sec, kv in sections.items():
        p[sec].update(kv)
    return yaml.safe_dump(p, sort_keys=False)


def _kill_when(cmd, dst, env, ready, timeout=180.0) -> None:
    """Start `cmd` in its own process group, SIGKILL the whole group once ready() is true."""
    proc = subprocess.Popen(cmd, cwd=dst, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{cmd} finished before it could be killed")
        if time.monotonic() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("stage never reached the point to kill it")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _killed_train(tmp_path):
    """A tiny clone whose train stage was killed (-9) once it had written a resume file."""
    dst = make_clone(tmp_path / "repo", _params(train={"steps": 400, "checkpoint_every": 20, "eval_every": 200}))
    env = clone_env(dst)
    run(["dvc", "repro", "tokenizer"], dst, env)
    resume = dst / "checkpoints" / "train_resume.safetensors"
    _kill_when(["dvc", "repro", "train"], dst, env, lambda: resume.exists())
    return dst, env, resume


def test_kill_9_during_train_then_repro_resumes(tmp_path):
    dst, env, resume = _killed_train(tmp_path)
    out = dst / "checkpoints" / "fp32.safetensors"
    assert not out.exists() and not (dst / "metrics" / "train.json").exists()
    r = run(["dvc", "repro", "train"], dst, env)
    train = json.loads((dst / "metrics" / "train.json").read_text())
    assert train["resumed_from_step"] > 0, r.stdout
    assert not resume.exists()  # removed once the run completed
    load_model(out)
    assert "up to date" in run(["dvc", "status", "train"], dst, env).stdout.lower()


def test_kill_9_during_finetune_then_repro_restarts_cleanly(tmp_path):
    dst = make_clone(tmp_path / "repo", _params(prune={"ratios": [0.4]}, finetune={"steps": 3000}))
    env = clone_env(dst)
    run(["dvc", "repro", "prune@0.4"], dst, env)
    assert (dst / "checkpoints" / "prune" / "0.4.safetensors").exists()
    out = dst / "checkpoints" / "finetune" / "0.4.safetensors"
    t_start = time.monotonic()
    _kill_when(["dvc", "repro", "finetune@0.4"], dst, env, lambda: time.monotonic() - t_start > 8)
    assert not out.exists()
    # the rerun restarts finetune from its inputs (with fewer steps, to keep the test short)
    params = (dst / "params.yaml").read_text().replace("steps: 3000", "steps: 3")
    (dst / "params.yaml").write_text(params)
    run(["dvc", "repro", "finetune@0.4"], dst, env)
    model, ckpt = load_model(out)
    assert ckpt.meta["stage"] == "finetune"
    m = json.loads((dst / "metrics" / "finetune_0.4.json").read_text())
    assert m["size_bytes"] == out.stat().st_size
    assert "up to date" in run(["dvc", "status", "finetune@0.4"], dst, env).stdout.lower()


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_diverged_train_exits_with_one_line_and_caches_nothing(tmp_path):
    dst = make_clone(tmp_path / "repo", _params(train={"lr": 1.0e6, "min_lr": 0.0}))
    env = clone_env(dst)
    run(["dvc", "repro", "tokenizer"], dst, env)
    r = run(["dvc", "repro", "train"], dst, env, check=False)
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("[train]")]
    assert len(ours) == 1 and "error: training diverged at step" in ours[0] and "'train.lr' too high" in ours[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (dst / "checkpoints" / "fp32.safetensors").exists()
    assert not (dst / "metrics" / "train.json").exists()
    status = run(["dvc", "status", "train"], dst, env).stdout
    assert "train:" in status and "up to date" not in status.lower(), status


def test_forced_train_rerun_is_byte_identical_and_leaves_dvc_status_clean(tmp_path):
    """metrics/train.json holds timings, so the rerun rewrites it: qat, which reads the FP32 quality,
    depends on the timing-free metrics/quality/train.json instead and is not marked changed."""
    dst = make_clone(tmp_path / "repo", _params())
    env = clone_env(dst)
    run(["dvc", "repro", "calibrate", "qat"], dst, env)
    out = dst / "checkpoints" / "fp32.safetensors"
    first = _md5(out)
    run(["dvc", "repro", "--force", "--single-item", "train"], dst, env)
    assert _md5(out) == first
    status = run(["dvc", "status"], dst, env).stdout
    for stage in ("check_params", "data", "tokenizer", "train", "calibrate", "qat"):  # downstream: not changed
        assert f"{stage}:" not in status, status


def test_resume_after_a_code_change_starts_from_step_0(tmp_path):
    dst, env, resume = _killed_train(tmp_path)
    assert resume.exists()
    dep = dst / "iteralite" / "train" / "losses.py"  # a dependency of the train stage in dvc.yaml
    dep.write_text(dep.read_text() + "\n# an edit to the code the train stage depends on\n")
    r = run(["dvc", "repro", "train"], dst, env)
    assert "belongs to other params, data or code: starting fresh" in r.stdout + r.stderr
    train = json.loads((dst / "metrics" / "train.json").read_text())
    assert train["resumed_from_step"] == 0
    assert "up to date" in run(["dvc", "status", "train"], dst, env).stdout.lower()

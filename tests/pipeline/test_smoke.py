"""Smoke test: the real `dvc repro` on tiny params, in a temporary copy of the repository; then, on
the same run, the README's queued sweep recipe and a workspace sweep (one clone and one tiny
pipeline for all of them)."""
from __future__ import annotations

import json
import sys
import time

import pytest

from iteralite.io.checkpoint import read_checkpoint
from iteralite.pipeline.artifacts import RUN_FACTS
from tests.pipeline_utils import run as _run, tiny_clone

pytestmark = [pytest.mark.slow, pytest.mark.critical_path]  # the longest chain of `make test` (tests/conftest.py)


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    return tiny_clone(tmp_path_factory)


def test_dvc_repro_runs_the_pipeline_then_is_a_no_op(clone):
    dst, env = clone
    r = _run(["dvc", "repro"], dst, env)
    train = json.loads((dst / "metrics" / "train.json").read_text())
    for key in ("params", "size_bytes", "val_loss", "val_ppl", "val_bpb", "wikitext2_ppl", "train_seconds",
                "train_tokens_per_s", "train_loss_final", "dev_loss", "epochs"):
        assert key in train, key
    assert train["epochs"] == round(train["tokens_seen"] / train["train_tokens"], 3)
    data = json.loads((dst / "metrics" / "data.json").read_text())
    assert data["dev_stories"] == 40 and data["train_stories"] + data["dev_stories"] <= 300
    assert train["size_bytes"] == (dst / "checkpoints" / "fp32.safetensors").stat().st_size
    assert (dst / "dvc.lock").exists()
    again = _run(["dvc", "repro"], dst, env)
    assert "didn't change" in again.stdout and "Running stage" not in again.stdout, again.stdout
    status = _run(["dvc", "status"], dst, env)
    assert "up to date" in status.stdout.lower(), status.stdout
    gen = _run([sys.executable, "-m", "iteralite.cli", "generate", "--max-new-tokens", "5"], dst, env)
    assert gen.stdout.startswith("Once upon a time")
    for r in ("0.1", "0.4"):  # the prune/finetune matrix follows prune.ratios
        for stage in ("prune", "finetune"):
            m = json.loads((dst / "metrics" / f"{stage}_{r}.json").read_text())
            assert m["size_bytes"] == (dst / "checkpoints" / stage / f"{r}.safetensors").stat().st_size
            assert 0 < m["prunable_params_removed_frac"] < 1
    assert (dst / "plots" / "prune_ratio.csv").read_text().startswith("ratio,")
    for name in ("int4", "qat", "mixed_precision", "fuse"):
        m = json.loads((dst / "metrics" / f"{name}.json").read_text())
        assert m["compression_vs_fp32"] > 1 and "val_ppl_delta_pct" in m
    mixed = json.loads((dst / "metrics" / "mixed_precision.json").read_text())
    assert mixed["size_bytes"] == (dst / "checkpoints" / "mixed.safetensors").stat().st_size
    assert mixed["entropy_coded"] is True and mixed["size_bytes"] < mixed["size_bytes_uncoded"]
    assert (dst / "plots" / "mixed_coding.csv").read_text().startswith("name,bits,symbols,")
    bench = json.loads((dst / "metrics" / "benchmark.json").read_text())
    for key in ("decode_tok_s_1thread", "decode_speedup_vs_fp32_eager", "prefill_ms_128", "greedy_match_unfused",
                "size_bytes", "val_ppl", "peak_rss_mb"):
        assert key in bench["fused"], key
    assert bench["fused"]["greedy_match_unfused"] is True
    assert {"fp32", "mixed", "fused", "finetune_0.4", "peer_int8_weight_only"} <= set(bench)
    report = (dst / "metrics" / "report.md").read_text()
    assert all(name in report for name in bench) and (dst / "plots" / "bench_pareto.png").exists()
    shown = json.loads(_run(["dvc", "plots", "show", "--json"], dst, env).stdout)
    plots = shown["data"]
    # the plot definitions name the default ratios' dvclive curves; the tiny sweep has no 0.2
    assert all("_0.2/" in e["source"] for e in shown.get("errors") or []), shown["errors"]
    import yaml
    defined = yaml.safe_load((dst / "dvc.yaml").read_text())["plots"]
    assert len(plots) == len(defined), sorted(plots)  # every top-level plot renders, nothing else
    for name, rendered in plots.items():
        assert rendered and rendered[0]["type"] in ("vega", "image"), name
        if rendered[0]["type"] == "vega":
            assert rendered[0]["content"]["data"]["values"], f"plot {name} has no data"
    _both_artifacts(dst, bench)
    for ckpt in (dst / "checkpoints").rglob("*.safetensors"):  # timings go to metrics, never into artifacts
        if ckpt.name != "calibration.safetensors":
            assert not RUN_FACTS & _keys(read_checkpoint(ckpt).meta), ckpt


def _both_artifacts(dst, bench: dict) -> None:
    """The headline and tiny targets: both artifacts written, factorised as their params say, in
    the benchmark (tiny on the native step too), and the fused and native runtimes give eager's
    greedy tokens on each."""
    import torch

    from iteralite.io.checkpoint import load_model
    from iteralite.runtime.fused import FusedIteraLite
    from iteralite.runtime.native.runtime import NativeIteraLite
    from iteralite.train.generate import generate_ids

    assert {"student_tiny", "mixed_tiny", "native_tiny"} <= set(bench)
    for target, ckpt, rank in (("headline", "mixed", 8), ("tiny", "mixed_tiny", 4)):
        m = json.loads((dst / "metrics" / f"mixed_precision{'' if target == 'headline' else '_tiny'}.json").read_text())
        assert m["target"] == target and m["size_bytes"] == (dst / "checkpoints" / f"{ckpt}.safetensors").stat().st_size
        model = load_model(dst / "checkpoints" / f"{ckpt}.safetensors")[0].eval()
        assert model.cfg.embed_rank == rank and {"embed_in", "head_proj"} <= set(m["allocation"])
        with torch.no_grad():
            eager = list(generate_ids(model, [1, 2, 3], 40, temperature=0))
            fused = list(generate_ids(FusedIteraLite.from_model(model), [1, 2, 3], 40, temperature=0))
            native = list(generate_ids(NativeIteraLite.from_model(model), [1, 2, 3], 40, temperature=0))
        assert fused == eager and native == eager, target
    tiny = json.loads((dst / "metrics" / "student_tiny.json").read_text())
    assert tiny["params"] < json.loads((dst / "metrics" / "student.json").read_text())["params"]


def _keys(meta: dict) -> set:
    return set(meta) | {k for v in meta.values() if isinstance(v, dict) for k in _keys(v)}


def _experiments(shown) -> list[dict]:
    """Every experiment row of `dvc exp show --json` (queued runs are nested under their baseline)."""
    rows = []
    for base in shown:
        for exp in base.get("experiments") or []:
            rows.extend(exp.get("revs") or [])
    return rows


def test_queued_sweeps_run_in_the_background_and_show_up_in_exp_show(clone):
    """The README's sweep: two `dvc exp run --queue -S prune.ratios=...`, `dvc queue start -j 1`,
    then both experiments are in `dvc exp show` with their params and headline metrics. Queued runs
    build in their own temporary copies, so the workspace (the baseline of the next test) is left as
    it was; the baseline's `dvc repro` is a no-op after the first test."""
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
        time.sleep(10)  # each `dvc queue status` is a DVC start-up (about 2 CPU seconds)
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


def test_sweeping_prune_ratios_reruns_only_prune_and_after(clone):
    dst, env = clone
    _run(["dvc", "repro"], dst, env)
    # 0.4 stays in the list: it is mixed_precision.from_ratio, whose finetune output that stage reads
    r = _run(["dvc", "exp", "run", "-S", "prune.ratios=[0.3,0.4]"], dst, env)
    ran = {line.split("'")[1] for line in r.stdout.splitlines() if line.startswith("Running stage")}
    # the benchmark table covers every ratio; mixed_precision (from_ratio 0.4), fuse and the rest do not rerun;
    # check_params (which tracks every param) reruns, and its unchanged output reruns nothing
    assert ran == {"check_params", "prune@0.3", "finetune@0.3", "prune_report", "benchmark"}, r.stdout


def test_unknown_params_key_stops_the_stage_with_its_name(clone):
    dst, env = clone
    params = (dst / "params.yaml").read_text()
    try:
        (dst / "params.yaml").write_text(params.replace("  lr: 0.003", "  lrr: 0.003"))
        r = _run([sys.executable, "stages/train.py"], dst, env, check=False)
        assert r.returncode == 2
        assert "unknown key 'train.lrr'" in r.stderr and "Traceback" not in r.stderr
    finally:
        (dst / "params.yaml").write_text(params)


def test_missing_raw_data_says_dvc_pull(clone, tmp_path):
    dst, env = clone
    params = (dst / "params.yaml").read_text()
    try:
        (dst / "params.yaml").write_text(params.replace("source: data/raw/tinystories", f"source: {tmp_path}/none"))
        r = _run([sys.executable, "stages/data.py"], dst, env, check=False)
        assert r.returncode == 2 and "dvc pull" in r.stderr and "Traceback" not in r.stderr
    finally:
        (dst / "params.yaml").write_text(params)

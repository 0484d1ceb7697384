"""`make gate`: the working tree's guarded headline metrics against a committed revision. Each test
works in a fresh clone of this repository's HEAD (no DVC cache, as in CI: `dvc metrics diff` reads the
committed metric files), with this checkout's gate.yaml copied in; the real tree is never touched."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from iteralite.pipeline import gate
from tests.conftest import REPO

MIXED = "metrics/headline/mixed_precision.json"
BENCH = "metrics/headline/benchmark.json"


@pytest.fixture
def clone(tmp_path):
    """A clone of HEAD whose committed metrics meet every `at_most` bar: these tests are about the
    gate's logic, not about whether today's default run meets the bars (`make gate` says that)."""
    root = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True)
    shutil.copy(REPO / "gate.yaml", root / "gate.yaml")
    for g in gate.load_config(root / "gate.yaml")["metrics"]:
        if "at_most" in g:
            _edit(root, g["file"], lambda d, g=g: _clamp(d, g["key"].split("."), g["at_most"]))
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-am", "inside the bars"], check=True)
    return root


def _clamp(d: dict, path: list[str], bar: float) -> None:
    """d's value at `path` lowered to `bar` when it is above it."""
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = min(d[path[-1]], bar)


def _edit(root, path, fn):
    p = root / path
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d, indent=2) + "\n")


def _gate(root, capsys, base="HEAD"):
    png = root.parent / "out" / "gate_frontier.png"
    rc = gate.main(["--root", str(root), "--base", base, "--png", str(png)])
    out, err = capsys.readouterr()
    return rc, out, err, png


def _row(out, name):
    rows = [line for line in out.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, out
    return rows[0]


def test_gate_passes_on_unchanged_tree(clone, capsys):
    rc, out, err, png = _gate(clone, capsys)
    assert rc == 0, out + err
    for g in gate.load_config(clone / "gate.yaml")["metrics"]:
        name = f"{g['file'].rsplit('/', 1)[1][:-5]}:{g['key']}"
        assert _row(out, name).endswith("| ok |" if "at_most" in g else "| same |")
    assert "Gate passed" in out and str(png) in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gate_fails_on_a_regressed_size(clone, capsys):
    _edit(clone, MIXED, lambda d: d.update(size_bytes=round(d["size_bytes"] * 1.05)))
    rc, out, err, _ = _gate(clone, capsys)
    assert rc == 1, out + err
    assert "**FAIL**" in _row(out, "mixed_precision:size_bytes")
    assert "+5.00%" in _row(out, "mixed_precision:size_bytes")
    assert out.strip().splitlines()[-1].endswith("beyond tolerance: mixed_precision:size_bytes")


def test_gate_passes_an_improvement_and_noise_within_tolerance(clone, capsys):
    _edit(clone, MIXED, lambda d: d.update(size_bytes=round(d["size_bytes"] * 0.9),
                                           val_ppl_delta_pct=min(29.9, d["val_ppl_delta_pct"] + 1)))
    _edit(clone, BENCH, lambda d: d["native"].update(decode_speedup_vs_fused=d["native"]["decode_speedup_vs_fused"] * 0.9))
    rc, out, err, _ = _gate(clone, capsys)
    assert rc == 0, out + err
    assert _row(out, "mixed_precision:size_bytes").endswith("| better |")
    assert _row(out, "mixed_precision:val_ppl_delta_pct").endswith("| ok |")  # inside the budget: a bar, not a drift
    assert _row(out, "benchmark:native.decode_speedup_vs_fused").endswith("| ok |")


def test_gate_fails_a_slower_decode_beyond_its_tolerance(clone, capsys):
    _edit(clone, BENCH, lambda d: d["native"].update(decode_speedup_vs_fused=d["native"]["decode_speedup_vs_fused"] * 0.4))
    rc, out, err, _ = _gate(clone, capsys)
    assert rc == 1, out + err
    assert "**FAIL**" in _row(out, "benchmark:native.decode_speedup_vs_fused")


def test_gate_reports_a_missing_metric(clone, capsys):
    _edit(clone, BENCH, lambda d: d["native"].pop("val_ppl_delta_vs_dequantized_pct"))
    rc, out, err, _ = _gate(clone, capsys)
    assert rc == 0, out + err
    assert _row(out, "benchmark:native.val_ppl_delta_vs_dequantized_pct").endswith("| missing in working tree |")
    assert "Missing (not checked): benchmark:native.val_ppl_delta_vs_dequantized_pct" in out


@pytest.mark.parametrize("path, data", [(MIXED, b'{"size_bytes": 1,\n'), (MIXED, b"\xff\xfe\x00"),
                                        ("metrics/headline/int4.json", b"{")])  # guarded; declared only
def test_invalid_json_is_one_line_and_exit_2(clone, capsys, path, data):
    (clone / path).write_bytes(data)
    rc, out, err, png = _gate(clone, capsys)
    assert rc == 2 and out == "" and not png.exists()
    assert err.count("\n") == 1 and path in err and "not valid JSON" in err, err


def test_gate_against_the_parent_commit_as_ci_runs_it(clone, capsys):
    """CI's case: the last commit changed the metrics (and the frontier data); BASE=HEAD~1."""
    size = json.loads((clone / MIXED).read_text())["size_bytes"]
    _edit(clone, MIXED, lambda d: d.update(val_ppl_delta_pct=31.0, size_bytes=round(size * 1.02)))
    csv = clone / "plots" / "mixed_pareto.csv"
    csv.write_text(csv.read_text().replace(f"mixed_optimized,{size},", "mixed_optimized,120000,"))
    git = ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["commit", "-q", "-am", "worse"], check=True)
    rc, out, err, png = _gate(clone, capsys, base="HEAD~1")
    assert rc == 1, out + err
    assert "**FAIL**" in _row(out, "mixed_precision:val_ppl_delta_pct")  # over the 30% bar
    assert "**FAIL**" in _row(out, "mixed_precision:size_bytes") and "+2.00%" in out
    assert png.is_file() and "no size_bytes/val_ppl rows" not in out


def test_unknown_revision_and_bad_config_are_one_line(clone, capsys):
    rc, out, err, _ = _gate(clone, capsys, base="no-such-rev")
    assert rc == 2 and out == "" and "no-such-rev" in err and err.count("\n") == 1
    (clone / "gate.yaml").write_text("metrics:\n  - {file: x.json, key: a, better: up, tolerance: 0.1}\n")
    rc, out, err, _ = _gate(clone, capsys)
    assert rc == 2 and "better (lower|higher)" in err and err.count("\n") == 1


def test_judge_directions_and_tolerance_edges():
    lower = {"better": "lower", "tolerance": 0.01}
    higher = {"better": "higher", "tolerance": 0.15}
    assert gate.judge(lower, 100, 101)[1:] == ("ok", False)
    assert gate.judge(lower, 100, 101.5)[1:] == ("**FAIL**", True)
    assert gate.judge(lower, 100, 90)[1:] == ("better", False)
    assert gate.judge(higher, 100, 85)[1:] == ("ok", False)
    assert gate.judge(higher, 100, 84)[1:] == ("**FAIL**", True)
    assert gate.judge(higher, 100, None)[1:] == ("missing in working tree", False)
    assert gate.judge(lower, None, 3)[1:] == ("missing in BASE", False)
    assert gate.judge(lower, 0, 1)[2] and not gate.judge(lower, 0, 0)[2]


def test_at_most_is_a_bar_whatever_base_had():
    bar = {"at_most": 119999}
    assert gate.judge(bar, 137783, 119000)[1:] == ("ok", False)
    assert gate.judge(bar, 100000, 120000)[1:] == ("**FAIL**", True)
    assert gate.judge(bar, None, 119999)[1:] == ("ok", False)  # a new metric: BASE had none
    assert gate.judge(bar, 1, None)[1:] == ("missing in working tree", False)


def test_a_guard_mixing_both_forms_is_refused(tmp_path):
    bad = tmp_path / "gate.yaml"
    bad.write_text("metrics:\n  - {file: a.json, key: k, at_most: 3, better: lower}\n")
    with pytest.raises(gate.GateError, match="at_most"):
        gate.load_config(bad)


def test_pareto_keeps_the_non_dominated_points():
    rows = [(3, 1.0, "c"), (1, 5.0, "a"), (2, 6.0, "dominated"), (2, 2.0, "b"), (4, 1.0, "same y")]
    assert [r[2] for r in gate.pareto(rows)] == ["a", "b", "c"]

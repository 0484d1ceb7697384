"""`make frontier` and `make sweep`: the size-quality frontier built from `dvc exp show --json`.

The fixture document has the shape DVC 3.x prints (checked against `dvc exp show --json` in this
repository: a list of {rev, name, data, error, experiments}, each experiment range {revs, executor,
name}, each metrics file {data} or {error}): the workspace, its baseline commit, two finished
experiments, one more that lands inside the frontier, one failed and one still queued."""
from __future__ import annotations

import copy
import csv
import itertools
import json
import shlex
import shutil

import pytest
import yaml

from iteralite.pipeline import frontier
from tests.conftest import REPO

HEAD_FILE = "metrics/headline/mixed_precision.json"
TINY_FILE = "metrics/headline/mixed_precision_tiny.json"
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def _m(size, ppl, delta, wiki=1200.0, params=None):
    d = {"size_bytes": size, "compression_vs_fp32": round(7_000_000 / size, 3), "val_ppl": ppl,
         "val_bpb": 1.1, "val_ppl_delta_pct": delta, "wikitext2_ppl": wiki}
    if params is not None:
        d["params"] = params
    return d


HEADLINE = _m(137783, 16.8901, 25.248, 1124.932, 365888)
TINY = _m(61000, 19.2, 42.377, 1300.5, 98000)


def _params(tiny_student=None, tiny_mixed=None) -> dict:
    p = copy.deepcopy(PARAMS)
    p["student"]["targets"]["tiny"].update(tiny_student or {})
    p["mixed_precision"]["targets"]["tiny"].update(tiny_mixed or {})
    return p


def _data(rev, params, metrics: dict) -> dict:
    """One state's `data`: a metrics file maps to its numbers, or to an exception (a load error)."""
    mets = {f: ({"error": {"type": "FileNotFoundError", "msg": f"[Errno 2] No such file or directory: '{f}'"}}
                if isinstance(v, Exception) else {"data": v}) for f, v in metrics.items()}
    return {"rev": rev, "timestamp": None if rev == "workspace" else "2026-12-06T20:00:00",
            "params": {"params.yaml": {"data": params}}, "metrics": mets, "deps": {}, "outs": {}, "meta": {}}


def _exp(name, rev, params, metrics, state="success"):
    return {"revs": [{"rev": rev, "name": name, "data": _data(rev, params, metrics), "error": None,
                      "experiments": None}],
            "executor": {"state": state, "name": None, "local": None}, "name": name}


def exp_show_doc() -> list:
    base = _params()
    return [
        {"rev": "workspace", "name": None, "error": None, "experiments": None,
         "data": _data("workspace", base, {HEAD_FILE: HEADLINE, TINY_FILE: TINY, "dvclive/train/metrics.json": {"step": 1}})},
        {"rev": "969b01aa5c89a9bd93eab76fce499c03370cd38c", "name": "main", "error": None,
         "data": _data("969b01aa5c89a9bd93eab76fce499c03370cd38c", base, {HEAD_FILE: HEADLINE, TINY_FILE: TINY}),
         "experiments": [
             # the headline target is untouched by a tiny override: its point equals the baseline's
             _exp("exp-a24", "a" * 40, _params({"d_model": 24}), {HEAD_FILE: HEADLINE, TINY_FILE: _m(45000, 24.5, 81.674)}),
             _exp("exp-b40", "b" * 40, _params({"d_model": 40}, {"target_bits_per_weight": 3.0}),
                  {HEAD_FILE: HEADLINE, TINY_FILE: _m(80000, 17.5, 29.771)}),
             # larger and worse than exp-b40: off the frontier
             _exp("exp-c40", "c" * 40, _params({"d_model": 40}), {HEAD_FILE: HEADLINE, TINY_FILE: _m(90000, 18.0, 33.479)}),
             # its tiny metrics file failed to load: only the headline point (a duplicate) remains
             _exp("exp-d", "d" * 40, _params({"d_model": 28}), {HEAD_FILE: HEADLINE, TINY_FILE: FileNotFoundError()}),
             {"revs": [{"rev": "e" * 40, "name": "exp-failed", "data": None, "experiments": None,
                        "error": {"msg": "Failed to reproduce experiment 'eeeeeee'", "type": "ReproductionError"}}],
              "executor": {"state": "failed", "name": None, "local": None}, "name": "exp-failed"},
             # queued: params, no metrics yet
             {"revs": [{"rev": "f" * 40, "name": "exp-queued", "error": None, "experiments": None,
                        "data": {**_data("f" * 40, _params({"d_model": 36}), {}), "metrics": {}}}],
              "executor": {"state": "queued", "name": None, "local": None}, "name": "exp-queued"},
         ]},
    ]


def _by(points):
    return {(p["name"], p["target"]): p for p in points}


def test_parse_gives_one_point_per_experiment_and_target_with_its_params():
    points, notes = frontier.experiment_points(exp_show_doc())
    got = [(p["name"], p["target"]) for p in points]
    assert got == [("workspace", "headline"), ("workspace", "tiny"), ("main", "headline"), ("main", "tiny"),
                   ("exp-a24", "headline"), ("exp-a24", "tiny"), ("exp-b40", "headline"), ("exp-b40", "tiny"),
                   ("exp-c40", "headline"), ("exp-c40", "tiny"), ("exp-d", "headline")]
    by = _by(points)
    assert by[("exp-b40", "tiny")] == {
        "name": "exp-b40", "kind": "experiment", "target": "tiny", "rev": "b" * 40, **_m(80000, 17.5, 29.771),
        "d_model": 40, "n_layers": 2, "embed_rank": 16, "max_heads": 3, "max_ff": 64, "tokens": PARAMS["student"]["targets"]["tiny"]["tokens"],
        "objective": "bits_target", "target_bits_per_weight": 3.0}
    # the headline target takes the section's own values; tiny its overrides of them
    head = by[("workspace", "headline")]
    assert (head["d_model"], head["n_layers"], head["embed_rank"], head["max_ppl_delta_pct"]) == (
        PARAMS["student"]["d_model"], PARAMS["student"]["n_layers"], PARAMS["student"]["embed_rank"],
        PARAMS["mixed_precision"]["max_ppl_delta_pct"])
    assert by[("exp-c40", "tiny")]["target_bits_per_weight"] == (
        PARAMS["mixed_precision"]["targets"]["tiny"]["target_bits_per_weight"])
    assert any(n.startswith("exp-failed: skipped (Failed to reproduce") for n in notes), notes
    assert any(n.startswith(f"exp-d: {TINY_FILE} could not be read") for n in notes), notes
    assert not any("exp-queued" in n for n in notes), notes  # queued: nothing to say yet


def test_duplicates_are_kept_once_and_the_frontier_is_marked():
    points, _ = frontier.build(exp_show_doc(), candidates=False)
    assert [(p["name"], p["target"], p["pareto"]) for p in points] == [
        ("exp-a24", "tiny", True), ("workspace", "tiny", True), ("exp-b40", "tiny", True),
        ("exp-c40", "tiny", False), ("workspace", "headline", True)]
    by = _by(points)
    assert by[("workspace", "headline")]["also"] == ["main", "exp-a24", "exp-b40", "exp-c40", "exp-d"]
    assert by[("workspace", "tiny")]["also"] == ["main"]
    assert "also" not in by[("exp-c40", "tiny")]


def test_pareto_marking_against_hand_checked_points():
    pts = [{"size_bytes": s, "val_ppl": v, "n": n} for n, s, v in [
        ("a", 100, 30.0), ("b", 200, 20.0), ("c", 200, 25.0),  # same size, worse: c dominated by b
        ("d", 300, 20.0),                                       # same ppl, larger: dominated by b
        ("e", 400, 10.0), ("f", 400, 10.0),                     # identical: neither beats the other
        ("g", 50, 40.0), ("h", 150, 35.0)]]                     # h: larger and worse than a
    frontier.mark_pareto(pts)
    assert {p["n"] for p in pts if p["pareto"]} == {"a", "b", "e", "f", "g"}
    frontier.mark_pareto(pts, y="size_bytes")  # y = size: only the smallest survives
    assert [p["n"] for p in pts if p["pareto"]] == ["g"]


def test_candidates_come_from_the_full_metrics_pareto_section(tmp_path):
    full = {"val_ppl": 16.8901, "val_ppl_delta_pct": 25.248, "pareto": {
        "uniform_int8": {"size_bytes": 377360, "val_ppl": 15.498111074199741, "allocated_bits_per_weight": 8.2993},
        "uniform_int4": {"size_bytes": 186572, "val_ppl": 16.4092811944081},
        "optimized_before_finetune": {"size_bytes": 131932, "val_ppl": 22.17429075684839},
        "broken": {"size_bytes": None, "val_ppl": 1.0},
        "mixed_optimized": {"size_bytes": 137783, "val_ppl": 16.8901}}}
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "mixed_precision.json").write_text(json.dumps(full))
    (tmp_path / "metrics" / "mixed_precision_tiny.json").write_text("{not json")  # unreadable: skipped
    cands = frontier.candidate_points(tmp_path, PARAMS)
    assert [c["name"] for c in cands] == ["uniform_int8", "uniform_int4", "optimized_before_finetune"]
    int8 = cands[0]
    assert (int8["kind"], int8["target"], int8["size_bytes"], int8["val_ppl"]) == ("candidate", "headline", 377360, 15.4981)
    assert int8["allocated_bits_per_weight"] == 8.2993
    fp32 = 16.8901 / 1.25248  # 13.4853: train's FP32 val_ppl
    assert int8["val_ppl_delta_pct"] == pytest.approx(100 * (15.498111074199741 / fp32 - 1), abs=1e-3)

    points, _ = frontier.build(exp_show_doc(), tmp_path)
    by = _by(points)
    assert by[("uniform_int4", "headline")]["pareto"] and by[("uniform_int8", "headline")]["pareto"]
    assert not by[("optimized_before_finetune", "headline")]["pareto"]  # exp-b40's tiny beats it


def _run(tmp_path, capsys, doc_text, *extra):
    src = tmp_path / "exp.json"
    src.write_text(doc_text)
    out_csv, out_png = tmp_path / "out" / "frontier.csv", tmp_path / "out" / "frontier.png"
    rc = frontier.main(["--json", str(src), "--root", str(tmp_path), "--csv", str(out_csv),
                        "--png", str(out_png), *extra])
    out, err = capsys.readouterr()
    return rc, out, err, out_csv, out_png


def test_main_writes_the_csv_and_png(tmp_path, capsys):
    rc, out, err, out_csv, out_png = _run(tmp_path, capsys, json.dumps(exp_show_doc()))
    assert rc == 0, err
    rows = list(csv.DictReader(out_csv.open()))
    assert tuple(rows[0]) == frontier.COLUMNS
    assert [(r["name"], r["target"], r["pareto"], r["size_bytes"]) for r in rows] == [
        ("exp-a24", "tiny", "True", "45000"), ("workspace", "tiny", "True", "61000"),
        ("exp-b40", "tiny", "True", "80000"), ("exp-c40", "tiny", "False", "90000"),
        ("workspace", "headline", "True", "137783")]
    assert rows[-1]["also"] == "main exp-a24 exp-b40 exp-c40 exp-d"
    assert rows[-1]["params"] == "365888" and rows[2]["target_bits_per_weight"] == "3.0"
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "5 point(s), 4 on the frontier" in out
    assert "note: exp-failed: skipped" in err


@pytest.mark.parametrize("text, says", [
    ("{\"workspace\": ", "is not valid JSON"),
    (json.dumps({"workspace": {"baseline": {}}}), "is not DVC 3's `dvc exp show --json`"),
    (json.dumps([{"rev": "workspace", "name": None, "data": {"params": {}, "metrics": {}}, "experiments": None}]),
     "no experiment has headline size_bytes and val_ppl yet"),
])
def test_unusable_json_is_one_line_and_writes_nothing(tmp_path, capsys, text, says):
    rc, out, err, out_csv, out_png = _run(tmp_path, capsys, text, "--no-candidates")
    assert rc == 1 and out == ""
    assert err.startswith("frontier: ") and says in err and err.count("\n") == 1, err
    assert not out_csv.exists() and not out_png.exists()


def test_dvc_failing_is_one_line(tmp_path, capsys):
    """Outside a DVC repository `dvc exp show` fails; the frontier says so in one line."""
    rc = frontier.main(["--root", str(tmp_path)])
    _, err = capsys.readouterr()
    assert rc == 1 and err.startswith("frontier: `dvc exp show --json` failed") and err.count("\n") == 1, err
    assert "Traceback" not in err


# ---- the documented sweep grid (Makefile SWEEP, docs/experiments.md) must keep working ----

def _makefile_grid() -> list[str]:
    line = next(s for s in (REPO / "Makefile").read_text().splitlines() if s.startswith("SWEEP ?="))
    return _set_params(shlex.split(line.partition("?=")[2]))


def _docs_grid() -> list[str]:
    text = (REPO / "docs" / "experiments.md").read_text()
    section = text.split("## The size-quality frontier", 1)[1].split("\n## ", 1)[0]
    line = next(s for s in section.splitlines() if s.startswith("dvc exp run --queue"))
    return _set_params(shlex.split(line)[4:])


def _set_params(args: list[str]) -> list[str]:
    assert args and all(a == "-S" for a in args[::2]), args
    return args[1::2]


def _expand(overrides: list[str]) -> list[dict]:
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps
    return get_hydra_sweeps(to_path_overrides(overrides))


def test_the_documented_grid_is_the_makefiles_and_expands_to_valid_params(tmp_path):
    from dvc.utils.hydra import apply_overrides

    from iteralite.pipeline.sections import check_params

    grid = _makefile_grid()
    assert grid == _docs_grid()
    values = {g.partition("=")[0]: [yaml.safe_load(v) for v in g.partition("=")[2].split(",")] for g in grid}
    sweeps = _expand(grid)
    assert len(sweeps) == len(values["student.targets.tiny.d_model"]) * len(values[
        "mixed_precision.targets.tiny.target_bits_per_weight"]) > 1
    seen = set()
    for i, sweep in enumerate(sweeps):
        assert list(sweep) == ["params.yaml"]
        path = tmp_path / f"params_{i}.yaml"
        shutil.copy(REPO / "params.yaml", path)
        apply_overrides(path, sweep["params.yaml"])  # DVC's own write: an unknown key is refused
        check_params(path)  # and the pipeline's first stage accepts the result
        written = yaml.safe_load(path.read_text())
        point = []
        for key in values:
            node = written
            for part in key.split("."):
                node = node[part]
            point.append(node)
        seen.add(tuple(point))
        tiny = frontier.target_params(written, "tiny")  # the frontier reads the swept values back
        assert (tiny["d_model"], tiny["target_bits_per_weight"]) == tuple(point)
    assert seen == set(itertools.product(*values.values()))


def test_a_grid_key_params_yaml_lacks_is_refused(tmp_path):
    """The check above can fail: DVC refuses a key that is not in params.yaml (headline has no overrides)."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    (sweep,) = _expand(["student.targets.headline.d_model=40"])
    with pytest.raises(InvalidArgumentError):
        apply_overrides(path, sweep["params.yaml"])

"""dvc.yaml's `deps` must list every iteralite module each stage's script can import, and no other.

DVC reruns a stage only when a listed dep changes, so a module missing from the list is an edit
that silently leaves stale outputs. `iteralite.pipeline.deps` computes each stage's import closure
statically and `make deps` writes it into dvc.yaml; these tests fail, naming `make deps` as the fix,
when the file is out of date. The resolver itself is tested on fake packages in
tests/pipeline/test_deps.py.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import yaml

from iteralite.pipeline.deps import PKG, covered, is_module, main, plan, stage_code

ROOT = Path(__file__).resolve().parents[1]
DVC_YAML = ROOT / "dvc.yaml"
STAGES = yaml.safe_load(DVC_YAML.read_text())["stages"]


def _deps(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]


@cache
def _plan():
    return plan(ROOT, DVC_YAML)


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_deps_cover_import_closure(name):
    problems = _plan().problems.get(name, [])
    assert not problems, "\n".join([f"stage '{name}':"] + problems + ["run `make deps` to rewrite dvc.yaml's deps"])


def test_make_deps_would_change_nothing():
    p = _plan()
    assert p.text == DVC_YAML.read_text(), f"dvc.yaml's deps of {p.changed} are stale: run `make deps`"


def test_every_stage_lists_its_script():
    bad = []
    for name, st in STAGES.items():
        script, _, _ = stage_code(ROOT, st.get("cmd", ""))
        if not script or not covered(script, _deps(st)):
            bad.append(f"stage '{name}' runs {script} but does not list it (run `make deps`)")
    assert not bad, "\n".join(bad)


def test_listed_code_deps_exist():
    stale = [f"stage '{n}' lists {d}, which does not exist (run `make deps`)" for n, st in STAGES.items()
             for d in _deps(st) if "${" not in d and d.split("/")[0] in (PKG, "stages") and not (ROOT / d).exists()]
    assert not stale, "\n".join(stale)


def test_the_train_launcher_and_its_imports_are_in_the_closure():
    _, parent, _ = stage_code(ROOT, STAGES["train"]["cmd"])
    assert f"{PKG}/train/torchrun.py" in parent and "stages/train.py" in parent
    assert f"{PKG}/train/__init__.py" in parent  # `python -m PKG.train.torchrun` runs its package first


def test_no_stage_imports_the_deps_tool():
    users = [n for n, st in STAGES.items() if f"{PKG}/pipeline/deps.py" in stage_code(ROOT, st.get("cmd", ""))[1]]
    assert not users, f"stages {users} import iteralite.pipeline.deps; it must stay out of every closure"


# --- --write and --check on a copy of the real dvc.yaml ----------------------------------------

def _written_copy(tmp_path: Path) -> Path:
    """dvc.yaml as `make deps` leaves it, in tmp_path (so the test holds while dvc.yaml is stale)."""
    copy = tmp_path / "dvc.yaml"
    copy.write_text(plan(ROOT, DVC_YAML).text)
    return copy


def test_write_keeps_non_python_deps_and_is_idempotent(tmp_path):
    before = STAGES
    copy = _written_copy(tmp_path)
    after = yaml.safe_load(copy.read_text())["stages"]
    assert list(after) == list(before)
    for name in before:
        script, _, _ = stage_code(ROOT, before[name]["cmd"])
        old, new = _deps(before[name]), _deps(after[name])
        assert new[0] == script, name
        assert [d for d in new if not is_module(d) and d != script] == \
               [d for d in old if not is_module(d) and d != script], name
        mods = [d for d in new if is_module(d) and d != script]
        assert mods == sorted(mods), name
        assert {k: v for k, v in after[name].items() if k != "deps"} == \
               {k: v for k, v in before[name].items() if k != "deps"}, name
    assert f"{PKG}/runtime/native/itl_step.c" in _deps(after["fuse"]) and "data/raw" in _deps(after["data"])
    assert "checkpoints/prune/${item.ratio}.safetensors" in _deps(after["finetune"])
    assert "matrix" in after["prune"]
    # everything outside the deps blocks is byte for byte the same: comments, plots, metrics
    def outside_lists(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("      - ")]
    assert outside_lists(copy.read_text()) == outside_lists(DVC_YAML.read_text())
    second = plan(ROOT, copy)
    assert second.text == copy.read_text() and not second.changed


def test_check_reports_a_dropped_module(tmp_path, capsys):
    copy = _written_copy(tmp_path)
    assert "data" not in plan(ROOT, copy).problems
    text = copy.read_text()
    line = f"      - {PKG}/io/atomic.py\n"
    assert line in text
    copy.write_text(text.replace(line, "", 1))  # the first stage's (data) copy of it
    assert main(["--check", "--file", str(copy), "--root", str(ROOT)]) == 1
    err = capsys.readouterr().err
    assert f"stage 'data':\n  imports {PKG}/io/atomic.py (via stages/data.py -> " in err
    assert "make deps" in err
    assert main(["--write", "--file", str(copy), "--root", str(ROOT)]) in (0, 1)  # 1: broken imports only
    assert copy.read_text() == plan(ROOT, DVC_YAML).text and "data" not in plan(ROOT, copy).problems


def test_check_reports_a_module_no_longer_imported(tmp_path, capsys):
    copy = _written_copy(tmp_path)
    text = copy.read_text()
    anchor = "      - stages/data.py\n"
    copy.write_text(text.replace(anchor, anchor + f"      - {PKG}/core/model.py\n", 1))
    assert plan(ROOT, copy).problems["data"] == [f"lists {PKG}/core/model.py, which its code does not import"]
    assert main(["--check", "--file", str(copy), "--root", str(ROOT)]) == 1
    assert "stage 'data':" in capsys.readouterr().err


# A stage that lists its own section key by key must list every key: a key left out is a setting
# DVC does not see, so `dvc exp run -S` on it (or an edit of it) reruns nothing.
KEY_BY_KEY = {"student": "student", "student_tiny": "student", "mixed_precision": "mixed_precision",
              "mixed_precision_tiny": "mixed_precision"}


@pytest.mark.parametrize("name", sorted(KEY_BY_KEY))
def test_a_stage_lists_every_key_of_its_own_section(name):
    import dataclasses

    from iteralite.pipeline.sections import section_class

    section = KEY_BY_KEY[name]
    listed = {p for p in STAGES[name].get("params", []) if isinstance(p, str)}
    fields = [f.name for f in dataclasses.fields(section_class(section)) if f.name != "targets"]
    missing = [f"{section}.{f}" for f in fields if f"{section}.{f}" not in listed and section not in listed]
    assert not missing, f"dvc.yaml stage {name!r} does not list {missing} under params"

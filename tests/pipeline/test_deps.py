"""iteralite.pipeline.deps on fake packages: the static import resolver, and --write / --check on
a small dvc.yaml whose exact text is known."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from iteralite.pipeline.deps import PKG, chain, closure, covered, imports_of, main, plan, script_of, stage_code

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


# --- the resolver ------------------------------------------------------------------------------

def test_lazy_import_and_package_inits_are_found(tmp_path):
    _tree(tmp_path, {f"{PKG}/__init__.py": "", f"{PKG}/a.py": "def f():\n    if 1:\n        from .b import g\n",
                     f"{PKG}/b.py": "", f"{PKG}/unused.py": "", "s.py": f"import {PKG}.a\n"})
    parent, unresolved = closure(tmp_path, tmp_path / "s.py")
    assert set(parent) == {"s.py", f"{PKG}/__init__.py", f"{PKG}/a.py", f"{PKG}/b.py"}
    assert chain(parent, f"{PKG}/b.py") == f"s.py -> {PKG}/a.py -> {PKG}/b.py" and not unresolved


def test_from_package_import_submodule_or_name(tmp_path):
    _tree(tmp_path, {f"{PKG}/__init__.py": "", f"{PKG}/sub/__init__.py": "def fn(): pass\n",
                     f"{PKG}/sub/mod.py": "", f"{PKG}/sub/other.py": "",
                     "s.py": f"from {PKG}.sub import mod, fn\nfrom {PKG}.gone import x\n"})
    parent, unresolved = closure(tmp_path, tmp_path / "s.py")
    assert set(parent) == {"s.py", f"{PKG}/__init__.py", f"{PKG}/sub/__init__.py", f"{PKG}/sub/mod.py"}
    assert unresolved == {f"{PKG}.gone": "s.py"}


def test_relative_imports_resolve(tmp_path):
    _tree(tmp_path, {f"{PKG}/__init__.py": "", f"{PKG}/core/__init__.py": "from . import util\n",
                     f"{PKG}/core/util.py": "", f"{PKG}/core/model.py": "", f"{PKG}/quant/__init__.py": "",
                     f"{PKG}/quant/gptq.py": "from ..core import model\nfrom ..core.util import h\n",
                     "s.py": f"from {PKG}.quant import gptq\n"})
    parent, _ = closure(tmp_path, tmp_path / "s.py")
    assert {f"{PKG}/core/model.py", f"{PKG}/core/util.py", f"{PKG}/core/__init__.py"} <= set(parent)
    assert parent[f"{PKG}/core/model.py"] == f"{PKG}/quant/gptq.py"


def test_registry_strings_count_as_imports(tmp_path):
    root = _tree(tmp_path, {f"{PKG}/__init__.py": "", f"{PKG}/reg.py": f'KINDS = {{"a": "{PKG}.impl:load"}}\n',
                            f"{PKG}/impl.py": "", f"{PKG}/other.py": f'X = "{PKG}.impl is not an entry"\n'})
    assert f"{PKG}.impl" in imports_of(root, root / f"{PKG}/reg.py")
    assert f"{PKG}.impl" not in imports_of(root, root / f"{PKG}/other.py")


def test_directory_deps_cover_files():
    assert covered(f"{PKG}/core/model.py", [f"{PKG}/core/"]) and covered("a.py", ["a.py"])
    assert not covered(f"{PKG}/core2/model.py", [f"{PKG}/core"]) and not covered("a.py", ["b.py"])


def test_script_and_launcher_are_found_in_the_cmd(tmp_path):
    _tree(tmp_path, {f"{PKG}/__init__.py": "", f"{PKG}/run/__init__.py": "", f"{PKG}/run/launch.py": "import os\n",
                     f"{PKG}/a.py": "", "stages/s.py": f"import {PKG}.a\n"})
    cmd = f"python -m {PKG}.run.launch --n ${{x.n}} stages/s.py"
    script, parent, unresolved = stage_code(tmp_path, cmd)
    assert script == "stages/s.py" and not unresolved
    assert set(parent) == {"stages/s.py", f"{PKG}/__init__.py", f"{PKG}/a.py", f"{PKG}/run/__init__.py",
                           f"{PKG}/run/launch.py"}
    assert script_of(tmp_path, f"python -m {PKG}.a --x") == f"{PKG}/a.py"
    assert stage_code(tmp_path, "python stages/gone.py")[2] == {"stages/gone.py": "cmd"}


# --- --write and --check on a fake repository --------------------------------------------------

FILES = {f"{PKG}/__init__.py": "", f"{PKG}/a.py": "from . import b\n", f"{PKG}/b.py": "", f"{PKG}/c.py": "",
         f"{PKG}/native/__init__.py": "", f"{PKG}/native/step.c": "int x;\n",
         "stages/s.py": f"from {PKG} import a\n", "stages/t.py": f"import {PKG}.c\n"}

# Stage s lists a module it no longer imports (c), misses b, and keeps a C source, a data folder
# and a templated checkpoint among its modules; t is already as --write leaves it.
S_DEPS = f"""    deps:
      - {PKG}/c.py
      - {PKG}/native/step.c
      - stages/s.py
      # the raw data
      - data/raw
      - {PKG}/a.py
      - checkpoints/${{item.r}}.safetensors
      - {PKG}/__init__.py
"""
DVC = f"""# top comment: kept
stages:
  s:
    matrix:
      r: ${{rs}}  # templated
    cmd: python stages/s.py ${{item.r}}
{S_DEPS}    outs:
      - out/${{item.r}}   # a comment

  t:
    cmd:
      - python stages/t.py
    deps:
    - stages/t.py
    - {PKG}/__init__.py
    - {PKG}/c.py
    params:
      - t
metrics:
  - m.json
"""

WRITTEN = DVC.replace(S_DEPS, f"""    deps:
      - stages/s.py
      - {PKG}/__init__.py
      - {PKG}/a.py
      - {PKG}/b.py
      - {PKG}/native/step.c
      # the raw data
      - data/raw
      - checkpoints/${{item.r}}.safetensors
""")


def test_write_replaces_only_the_modules_and_is_idempotent(tmp_path):
    _tree(tmp_path, FILES | {"dvc.yaml": DVC})
    p = plan(tmp_path, tmp_path / "dvc.yaml")
    assert WRITTEN != DVC and p.text == WRITTEN and p.changed == ["s"] and not p.broken
    assert main(["--write", "--file", str(tmp_path / "dvc.yaml"), "--root", str(tmp_path)]) == 0
    assert (tmp_path / "dvc.yaml").read_text() == WRITTEN
    assert main(["--write", "--file", str(tmp_path / "dvc.yaml"), "--root", str(tmp_path)]) == 0
    assert (tmp_path / "dvc.yaml").read_text() == WRITTEN
    again = plan(tmp_path, tmp_path / "dvc.yaml")
    assert again.text == WRITTEN and not again.changed and not again.problems


def test_check_names_missing_and_extra_modules(tmp_path, capsys):
    _tree(tmp_path, FILES | {"dvc.yaml": DVC})
    assert plan(tmp_path, tmp_path / "dvc.yaml").problems == {"s": [
        f"imports {PKG}/b.py (via stages/s.py -> {PKG}/a.py -> {PKG}/b.py) but dvc.yaml does not list it",
        f"lists {PKG}/c.py, which its code does not import"]}
    assert main(["--check", "--file", str(tmp_path / "dvc.yaml"), "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "stage 's':\n" in err and "stage 't'" not in err and "run `make deps`" in err
    assert (tmp_path / "dvc.yaml").read_text() == DVC  # --check writes nothing


def test_check_reports_order_and_broken_imports(tmp_path, capsys):
    swapped = WRITTEN.replace(f"      - {PKG}/a.py\n      - {PKG}/b.py\n", f"      - {PKG}/b.py\n      - {PKG}/a.py\n")
    _tree(tmp_path, FILES | {"dvc.yaml": swapped, f"{PKG}/c.py": f"from {PKG} import gone\nimport {PKG}.gone2\n"})
    p = plan(tmp_path, tmp_path / "dvc.yaml")
    assert p.problems["s"] == ["lists its deps out of `make deps` order"]
    broken = f"{PKG}/c.py imports {PKG}.gone2, which is no file under {PKG}/"
    assert p.problems["t"] == [broken] and p.broken == [f"stage 't': {broken}"]
    assert main(["--write", "--file", str(tmp_path / "dvc.yaml"), "--root", str(tmp_path)]) == 1  # broken stays
    assert (tmp_path / "dvc.yaml").read_text() == WRITTEN
    assert "gone2" in capsys.readouterr().err


def test_runs_as_a_module(tmp_path):
    _tree(tmp_path, FILES | {"dvc.yaml": WRITTEN})
    cmd = [sys.executable, "-m", "iteralite.pipeline.deps", "--check", "--file", str(tmp_path / "dvc.yaml"),
           "--root", str(tmp_path)]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    (tmp_path / "dvc.yaml").write_text(DVC)
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 1 and "run `make deps`" in run.stderr

"""dvc.yaml's hand-kept `deps` must cover every iteralite module each stage's script can import.

DVC reruns a stage only when a listed dep changes, so a module missing from the list is an edit
that silently leaves stale outputs. The import closure is computed statically with `ast` (no
iteralite import): absolute and relative imports, imports inside functions (lazy) and under `if`,
`from pkg import submodule`, the `__init__.py` of every package on the way, and lazy-registry
entries: a string constant "iteralite.x.y:attr" (how `bench.variants` names its loaders) is an
import of iteralite.x.y. A dep that is a directory covers the files below it. Templated deps
(`${...}`) are ignored.
"""
from __future__ import annotations

import ast
import re
import shlex
from collections import deque
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = "iteralite"
DVC_YAML = ROOT / "dvc.yaml"
REGISTRY_ENTRY = re.compile(rf"^({PKG}(?:\.\w+)+):\w+$")  # "module:attr", imported on use


def module_file(root: Path, dotted: str) -> Path | None:
    """`a.b` -> root/a/b/__init__.py or root/a/b.py (a package wins, as in Python), else None."""
    base = root.joinpath(*dotted.split("."))
    for cand in (base / "__init__.py", base.with_name(base.name + ".py")):
        if cand.is_file():
            return cand
    return None


def dotted_name(root: Path, path: Path) -> str | None:
    """Module name of a file under root/PKG (a package's __init__.py -> the package), else None."""
    parts = path.relative_to(root).with_suffix("").parts
    if parts[0] != PKG or len(parts) < 2:
        return None
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(root: Path, path: Path) -> set[str]:
    """Names of PKG modules `path` imports anywhere in its AST (function bodies included)."""
    me = dotted_name(root, path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if me is None:
                    continue  # a relative import outside the package cannot reach it
                pkg = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                keep = len(pkg) - (node.level - 1)
                if keep <= 0:
                    continue
                base = ".".join(pkg[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module
            found.add(base)  # `from base import name`: name may itself be a submodule
            found.update(f"{base}.{a.name}" for a in node.names
                         if a.name != "*" and module_file(root, f"{base}.{a.name}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and REGISTRY_ENTRY.match(node.value):
            found.add(REGISTRY_ENTRY.match(node.value)[1])
    return {m for m in found if m == PKG or m.startswith(PKG + ".")}


def closure(root: Path, script: Path) -> tuple[dict[str, str | None], dict[str, str]]:
    """BFS from `script`: ({file: the file that first imported it}, {unresolvable name: importer}).
    Paths are root-relative posix strings; importing a.b.c also runs a/ and a/b/'s __init__.py."""
    start = script.relative_to(root).as_posix()
    parent: dict[str, str | None] = {start: None}
    unresolved: dict[str, str] = {}
    queue = deque([script])
    while queue:
        path = queue.popleft()
        here = path.relative_to(root).as_posix()
        names = imports_of(root, path)
        if here == start and dotted_name(root, script):  # `python -m PKG.x` runs PKG.x's packages
            names.add(dotted_name(root, script).rpartition(".")[0] or PKG)
        for name in sorted(names):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                f = module_file(root, ".".join(parts[:i]))
                if f is None:
                    unresolved.setdefault(name, here)
                    break
                rel = f.relative_to(root).as_posix()
                if rel not in parent:
                    parent[rel] = here
                    queue.append(f)
    return parent, unresolved


def chain(parent: dict[str, str | None], rel: str) -> str:
    out = [rel]
    while parent[out[-1]] is not None:
        out.append(parent[out[-1]])
    return " -> ".join(reversed(out))


def covered(rel: str, deps: list[str]) -> bool:
    """`rel` is listed exactly, or lies under a listed directory."""
    return any(rel == d or rel.startswith(d + "/") for d in (d.rstrip("/") for d in deps))


def script_of(root: Path, cmd) -> str | None:
    """The python file a stage's cmd runs: `python stages/x.py ...` (also when a launcher runs it:
    `python -m PKG.launcher ... stages/x.py`), else `python -m PKG.x`."""
    lines = cmd if isinstance(cmd, list) else [cmd]
    for line in lines:
        for tok in shlex.split(line):
            if tok.endswith(".py") and "${" not in tok:
                return tok
    for line in lines:
        toks = shlex.split(line)
        for i, tok in enumerate(toks):
            if tok == "-m" and i + 1 < len(toks):
                f = module_file(root, toks[i + 1])
                if f is not None and f.name == "__init__.py":
                    f = f.with_name("__main__.py")
                return f.relative_to(root).as_posix() if f else toks[i + 1]
    return None


def load_stages(root: Path, dvc_yaml: Path) -> dict[str, tuple[str | None, list[str]]]:
    """{stage: (script, deps)} in file order; matrix stages are one entry (same script and deps)."""
    out = {}
    for name, st in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        deps = [d if isinstance(d, str) else next(iter(d)) for d in st.get("deps", [])]
        out[name] = (script_of(root, st.get("cmd", "")), deps)
    return out


def stage_problems(root: Path, name: str, script: str, deps: list[str]) -> list[str]:
    """One message per imported module the stage's deps do not cover (and per broken import)."""
    parent, unresolved = closure(root, root / script)
    listed = [d for d in deps if "${" not in d]
    msgs = [f"stage '{name}' imports {rel} (via {chain(parent, rel)}) but dvc.yaml does not list it"
            for rel in sorted(parent) if rel != script and not covered(rel, listed)]
    msgs += [f"stage '{name}': {imp} imports {mod}, which is no file under {PKG}/"
             for mod, imp in sorted(unresolved.items())]
    return msgs


STAGES = load_stages(ROOT, DVC_YAML)


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_deps_cover_import_closure(name):
    script, deps = STAGES[name]
    assert script, f"stage '{name}': no python script found in its cmd"
    problems = stage_problems(ROOT, name, script, deps)
    assert not problems, "\n".join(problems)


def test_every_stage_lists_its_script():
    bad = [f"stage '{n}' runs {s} but does not list it" for n, (s, deps) in STAGES.items()
           if s and not covered(s, deps)]
    assert not bad, "\n".join(bad)


def test_listed_code_deps_exist():
    stale = [f"stage '{n}' lists {d}, which does not exist" for n, (_, deps) in STAGES.items()
             for d in deps if "${" not in d and d.split("/")[0] in (PKG, "stages")
             and not (ROOT / d).exists()]
    assert not stale, "\n".join(stale)


def launcher_modules(cmd: str) -> list[str]:
    """Files of the package modules a cmd runs with `python -m` (the train stage's launcher)."""
    words = shlex.split(cmd)
    found = []
    for i, w in enumerate(words[:-1]):
        if w == "-m" and words[i + 1].startswith(f"{PKG}."):
            path = module_file(ROOT, words[i + 1])
            found.append(str(path.relative_to(ROOT)) if path else words[i + 1])
    return found


def test_modules_run_with_python_m_are_listed_with_their_imports():
    doc = yaml.safe_load(DVC_YAML.read_text())["stages"]
    problems = []
    for name, st in doc.items():
        deps = [d if isinstance(d, str) else next(iter(d)) for d in st.get("deps", [])]
        for mod in launcher_modules(st.get("cmd", "")):
            if not (ROOT / mod).is_file():
                problems.append(f"stage '{name}' runs {mod}, which is no file under {PKG}/")
                continue
            problems += [f"stage '{name}' runs {mod} -> {rel} but dvc.yaml does not list it"
                         for rel in sorted(closure(ROOT, ROOT / mod)[0]) if not covered(rel, deps)]
    assert not problems, "\n".join(problems)


# --- the resolver itself, on a fake package -------------------------------------------------

def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


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
    root = _tree(tmp_path, {"iteralite/__init__.py": "", "iteralite/reg.py": 'KINDS = {"a": "iteralite.impl:load"}\n',
                            "iteralite/impl.py": "", "iteralite/other.py": 'X = "iteralite.impl is not an entry"\n'})
    assert "iteralite.impl" in imports_of(root, root / "iteralite/reg.py")
    assert "iteralite.impl" not in imports_of(root, root / "iteralite/other.py")


def test_directory_deps_cover_files():
    assert covered(f"{PKG}/core/model.py", [f"{PKG}/core/"]) and covered("a.py", ["a.py"])
    assert not covered(f"{PKG}/core2/model.py", [f"{PKG}/core"]) and not covered("a.py", ["b.py"])


def test_a_dropped_dep_is_reported(tmp_path):
    _tree(tmp_path, {f"{PKG}/__init__.py": "", f"{PKG}/a.py": "from . import b\n", f"{PKG}/b.py": "",
                     "stages/s.py": f"from {PKG} import a\n"})
    dvc = tmp_path / "dvc.yaml"
    dvc.write_text(yaml.safe_dump({"stages": {"s": {
        "matrix": {"r": [1, 2]}, "cmd": "python stages/s.py ${item.r}",
        "deps": ["stages/s.py", f"{PKG}/__init__.py", f"{PKG}/a.py", f"{PKG}/b.py", "out/${item.r}"]}}}))
    (script, deps), = load_stages(tmp_path, dvc).values()
    assert script == "stages/s.py" and stage_problems(tmp_path, "s", script, deps) == []
    msgs = stage_problems(tmp_path, "s", script, [d for d in deps if d != f"{PKG}/b.py"])
    assert msgs == [f"stage 's' imports {PKG}/b.py (via stages/s.py -> {PKG}/a.py -> {PKG}/b.py) "
                    "but dvc.yaml does not list it"]
    assert script_of(tmp_path, f"python -m {PKG}.a --x") == f"{PKG}/a.py"

"""dvc.yaml's `deps:` kept by a command: `python -m iteralite.pipeline.deps --write` (`make deps`)
lists each stage's script and its whole iteralite import closure, so an edit reruns exactly the
stages it should; `--check` exits 1 naming per stage what is missing or extra.

The closure is static (`ast`, nothing imported): absolute and relative imports, imports inside
functions and under `if`, `from pkg import submodule`, every package `__init__.py` on the way, a
module the cmd runs with `python -m` (train's launcher), and lazy-registry strings
"iteralite.x.y:attr" (how `bench.variants` and `pipeline.sections` name what they load). --write
edits the deps blocks only, as text (the rest of dvc.yaml stays byte for byte): the script, the
closure's modules sorted, then every dep that is not an iteralite/*.py module (data, checkpoints,
the C source, `${...}` templates) as it was. No stage imports this module.
"""
from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
import textwrap
from collections import deque
from pathlib import Path
from typing import NamedTuple

import yaml

PKG = "iteralite"
REGISTRY_ENTRY = re.compile(rf"^({PKG}(?:\.\w+)+):\w+$")  # "module:attr", imported on use
KEY = re.compile(r"^( *)([\w.@-]+):(?:\s+(.*))?$")  # a mapping key at the start of its line
FIX = "run `make deps` (python -m iteralite.pipeline.deps --write)"


class DepsError(ValueError):
    """dvc.yaml is laid out in a way the text edit cannot follow safely."""


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


def closure(root: Path, script: Path, memo: dict | None = None) -> tuple[dict[str, str | None], dict[str, str]]:
    """BFS from `script`: ({file: the file that first imported it}, {unresolvable name: importer}).
    Paths are root-relative posix strings; importing a.b.c also runs a/ and a/b/'s __init__.py.
    `memo` keeps each file's imports across calls (one pass over dvc.yaml parses a file once)."""
    memo = {} if memo is None else memo
    start = script.relative_to(root).as_posix()
    parent: dict[str, str | None] = {start: None}
    unresolved: dict[str, str] = {}
    queue = deque([script])
    while queue:
        path = queue.popleft()
        here = path.relative_to(root).as_posix()
        if path not in memo:
            memo[path] = imports_of(root, path)
        names = set(memo[path])
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
    """How `rel` is reached: "stages/x.py -> iteralite/a.py -> iteralite/b.py"."""
    out = [rel]
    while parent[out[-1]] is not None:
        out.append(parent[out[-1]])
    return " -> ".join(reversed(out))


def covered(rel: str, deps: list[str]) -> bool:
    """`rel` is listed exactly, or lies under a listed directory."""
    return any(rel == d or rel.startswith(d + "/") for d in (d.rstrip("/") for d in deps))


def is_module(dep: str) -> bool:
    """A dep the closure owns (--write replaces these): an iteralite/*.py file, not a template."""
    return dep.startswith(PKG + "/") and dep.endswith(".py") and "${" not in dep


def _run_modules(root: Path, cmd) -> list[str]:
    """Files of the modules a cmd runs with `python -m` (a package runs its __main__.py); a name
    that resolves to no file is returned as it is."""
    found = []
    for line in cmd if isinstance(cmd, list) else [cmd]:
        toks = shlex.split(line)
        for i, tok in enumerate(toks[:-1]):
            if tok == "-m":
                f = module_file(root, toks[i + 1])
                if f is not None and f.name == "__init__.py":
                    f = f.with_name("__main__.py")
                found.append(f.relative_to(root).as_posix() if f else toks[i + 1])
    return found


def script_of(root: Path, cmd) -> str | None:
    """The python file a stage's cmd runs: `python stages/x.py ...` (also when a launcher runs it:
    `python -m PKG.launcher ... stages/x.py`), else `python -m PKG.x`."""
    for line in cmd if isinstance(cmd, list) else [cmd]:
        for tok in shlex.split(line):
            if tok.endswith(".py") and "${" not in tok:
                return tok
    return next(iter(_run_modules(root, cmd)), None)


def stage_code(root: Path, cmd, memo: dict | None = None) -> tuple[str | None, dict[str, str | None], dict[str, str]]:
    """(script, closure, unresolved) of a stage's cmd; the closure also holds each PKG module the
    cmd runs with `python -m` (a launcher) and all it imports. A missing file's importer is "cmd"."""
    script = script_of(root, cmd)
    parent: dict[str, str | None] = {}
    unresolved: dict[str, str] = {}
    for rel in ([script] if script else []) + [m for m in _run_modules(root, cmd) if m.startswith(PKG)]:
        if rel not in parent:
            p, u = closure(root, root / rel, memo) if (root / rel).is_file() else ({}, {rel: "cmd"})
            parent |= {k: v for k, v in p.items() if k not in parent}
            unresolved |= {k: v for k, v in u.items() if k not in unresolved}
    return script, parent, unresolved


# --- dvc.yaml as text ---------------------------------------------------------------------------

def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _blank(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("#")


def _block_end(lines: list[str], i: int) -> int:
    """End (exclusive) of the block under the key on lines[i]: the lines indented deeper (or a
    `- ` list at the key's own indent); blank and comment lines inside count, trailing ones not."""
    ind, end = _indent(lines[i]), i + 1
    for j in range(i + 1, len(lines)):
        if not _blank(lines[j]):
            if _indent(lines[j]) < ind or (_indent(lines[j]) == ind and not lines[j].lstrip().startswith("- ")):
                break
            end = j + 1
    return end


def _keys(lines: list[str], lo: int, hi: int) -> dict[str, int]:
    """{key: line} of the mapping in lines[lo:hi] (keys at its first line's indent)."""
    body = next((_indent(l) for l in lines[lo:hi] if not _blank(l)), None)
    return {m[2]: j for j in range(lo, hi) if (m := KEY.match(lines[j].rstrip("\n"))) and len(m[1]) == body}


def _items(chunk: list[str]) -> list[tuple[str, list[str], list[str]]]:
    """A block list's items: (dep name, the comment lines before it, its own lines)."""
    ind = next((_indent(l) for l in chunk if not _blank(l)), 0)
    items: list[list] = []
    pending: list[str] = []  # blank and comment lines go with the item after them
    for line in chunk:
        if _blank(line):
            pending.append(line)
        elif _indent(line) == ind and line.lstrip().startswith("-"):
            items.append([pending, [line]])
            pending = []
        else:  # a continuation line (a dep written as a mapping)
            items[-1][1] += pending + [line]
            pending = []
    deps = [yaml.safe_load(textwrap.dedent("".join(l for l in own if not _blank(l))))[0] for _, own in items]
    return [(d if isinstance(d, str) else next(iter(d)), before, own) for d, (before, own) in zip(deps, items)]


class Plan(NamedTuple):
    text: str                       # dvc.yaml with every stage's deps as --write leaves them
    problems: dict[str, list[str]]  # stage -> what --check reports (differences, broken imports)
    broken: list[str]               # imports of no file, stages without a script: --write can't fix
    changed: list[str]              # stages whose deps block --write rewrites


def plan(root: Path, dvc_yaml: Path) -> Plan:
    """Compute every stage's deps from its code and lay them into dvc.yaml's text."""
    text = dvc_yaml.read_text()
    stages = (yaml.safe_load(text) or {}).get("stages") or {}
    lines = text.splitlines(keepends=True)
    top = _keys(lines, 0, len(lines))
    spans = _keys(lines, top["stages"] + 1, _block_end(lines, top["stages"])) if "stages" in top else {}
    if list(spans) != list(stages):
        raise DepsError(f"{dvc_yaml}: stage names read as text {list(spans)} differ from the YAML's {list(stages)}")
    problems, broken, changed, edits, memo = {}, [], [], [], {}
    for name, s in spans.items():
        keys = _keys(lines, s + 1, _block_end(lines, s))
        if "do" in keys:  # a foreach stage keeps its body under `do:`
            keys = _keys(lines, keys["do"] + 1, _block_end(lines, keys["do"]))
        script, parent, unresolved = stage_code(root, stages[name].get("cmd", ""), memo)
        msgs = [f"its cmd runs {m}, which does not exist" if imp == "cmd" else
                f"{imp} imports {m}, which is no file under {PKG}/" for m, imp in sorted(unresolved.items())]
        if script is None:
            msgs.append("no python script found in its cmd")
        broken += [f"stage '{name}': {m}" for m in msgs]
        if script not in parent:  # no script file: nothing to compute the deps from
            problems[name] = msgs
            continue
        d = keys.get("deps")
        if d is None or (KEY.match(lines[d].rstrip("\n"))[3] or "#")[0] != "#":
            raise DepsError(f"{dvc_yaml}: stage '{name}' needs a block `deps:` list, one `- dep` a line")
        lo, hi = d + 1, _block_end(lines, d)
        items = _items(lines[lo:hi])
        pad = " " * min([_indent(l) for l in lines[lo:hi] if not _blank(l)] or [_indent(lines[d]) + 2])
        listed = [dep for dep, _, _ in items]
        keep = [not is_module(dep) and dep != script for dep in listed]
        kept = [dep for dep, k in zip(listed, keep) if k]
        mods = sorted(f for f in parent if f != script and is_module(f) and not covered(f, kept))
        new = [l for (_, before, _), k in zip(items, keep) if not k for l in before]  # their comments stay
        new += [f"{pad}- {dep}\n" for dep in [script] + mods]
        new += [l for (_, before, own), k in zip(items, keep) if k for l in before + own]
        msgs += [f"imports {f} (via {chain(parent, f)}) but dvc.yaml does not list it" if f != script
                 else f"runs {f} but dvc.yaml does not list it" for f in sorted(parent) if not covered(f, listed)]
        msgs += [f"lists {dep}, which " + ("its code does not import" if (root / dep).is_file() else "does not exist")
                 for dep in listed if is_module(dep) and dep not in parent]
        if new != lines[lo:hi]:
            changed.append(name)
            msgs = msgs or ["lists its deps out of `make deps` order"]
        if msgs:
            problems[name] = msgs
        edits.append((lo, hi, new))
    for lo, hi, new in reversed(edits):
        lines[lo:hi] = new
    return Plan("".join(lines), problems, broken, changed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m iteralite.pipeline.deps", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 if any stage's deps differ from its code's")
    mode.add_argument("--write", action="store_true", help="rewrite every stage's deps in dvc.yaml")
    ap.add_argument("--file", type=Path, default=Path("dvc.yaml"), help="the pipeline file (default: dvc.yaml)")
    ap.add_argument("--root", type=Path, default=Path("."), help="the repository root (default: .)")
    args = ap.parse_args(argv)
    try:
        p = plan(args.root.resolve(), args.file)
    except (OSError, DepsError) as e:
        print(f"{e} (run from the repository root)" if isinstance(e, OSError) else e, file=sys.stderr)
        return 2
    if args.write:
        if p.changed:
            args.file.write_text(p.text)
            print(f"{args.file}: rewrote the deps of {', '.join(p.changed)}")
        print("".join(f"{b}\n" for b in p.broken), end="", file=sys.stderr)
        return 1 if p.broken else 0
    for name, msgs in p.problems.items():
        print(f"stage '{name}':\n" + "".join(f"  {m}\n" for m in msgs), end="", file=sys.stderr)
    if p.problems:
        print(f"{args.file}: {len(p.problems)} stage(s) out of date; {FIX}", file=sys.stderr)
    return 1 if p.problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""What `dvc.yaml` says about one stage: its dependency files and its outputs.

Stages read it at run time for two things DVC itself does not give them: a digest of the code they
depend on (so a resume file written by other code is never resumed), and the output folders to
check for writability before any expensive work.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from iteralite.io.errors import IteraliteError

DVC_YAML = "dvc.yaml"
CODE_PREFIXES = ("iteralite/", "stages/")


def stage_entry(name: str, dvc_yaml: str | Path = DVC_YAML) -> dict:
    """The stage's mapping in dvc.yaml (`cmd`, `deps`, `outs`, ...); a matrix stage by its base name."""
    path = Path(dvc_yaml)
    try:
        stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError) as e:
        raise IteraliteError(f"{path}: cannot read the pipeline definition ({e}); run from the repository root") from None
    entry = stages.get(name.split("@")[0])
    if not isinstance(entry, dict):
        raise IteraliteError(f"{path}: no stage {name!r} (stages: {', '.join(stages)})")
    return entry


def _paths(items) -> list[str]:
    """Entries of a deps/outs/metrics/plots list: plain strings or single-key mappings."""
    out = []
    for item in items or []:
        out.extend([item] if isinstance(item, str) else list(item))
    return out


def stage_deps(name: str, dvc_yaml: str | Path = DVC_YAML) -> list[str]:
    return _paths(stage_entry(name, dvc_yaml).get("deps"))


def stage_outputs(name: str, dvc_yaml: str | Path = DVC_YAML) -> list[str]:
    """Every path the stage writes (outs, metrics, plots), templated ones (`${item}`) included as written."""
    entry = stage_entry(name, dvc_yaml)
    return [p for key in ("outs", "metrics", "plots") for p in _paths(entry.get(key))]


def code_digest(name: str, root: str | Path = ".", dvc_yaml: str | Path | None = None) -> str:
    """sha256 over the names and bytes of the stage's code deps (files under iteralite/ and stages/,
    as dvc.yaml lists them), in sorted order: any edit to the stage's code changes it."""
    root = Path(root)
    h = hashlib.sha256()
    for dep in sorted(d for d in stage_deps(name, dvc_yaml or root / DVC_YAML) if d.startswith(CODE_PREFIXES)):
        f = root / dep
        files = sorted(p for p in f.rglob("*.py")) if f.is_dir() else [f]
        for p in files:
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(p.read_bytes() if p.is_file() else b"<missing>")
            h.update(b"\0")
    return h.hexdigest()

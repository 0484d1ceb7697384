"""`make gate BASE=<rev>`: the working tree's headline metrics against those committed at BASE.

`dvc metrics diff --json --all BASE` gives both sides of every declared metric; gate.yaml names the
guarded ones, each with a direction (lower or higher is better) and a relative tolerance. Prints a
markdown table (metric, base, now, change, tolerance, verdict) and a PNG overlaying BASE's and the
working tree's size-versus-quality frontiers (the committed plots/*.csv). Exit status: 0 pass,
1 a guarded metric regressed beyond its tolerance, 2 a usage error (unknown rev, bad gate.yaml, a
metric file that is not valid JSON, dvc failing): one line, no traceback.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import yaml

from iteralite.io.errors import IteraliteError
from iteralite.io.plotting import pyplot, save_png

CONFIG = Path("gate.yaml")
DEFAULT_PNG = Path("build/gate/gate_frontier.png")


class GateError(IteraliteError):
    """The gate cannot compare: the message is the one line printed before exit status 2."""


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True)  # bytes: a file may not be UTF-8


def load_config(path: Path) -> dict:
    """gate.yaml -> {"metrics": [{file, key, better, tolerance} | {file, key, at_most}],
    "frontier": [{csv, x, y[, title, log_x]}]}."""
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise GateError(f"gate: cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise GateError(f"gate: {path} must be a mapping with `metrics:` (and `frontier:`)")
    guards = cfg.get("metrics")
    if not isinstance(guards, list) or not guards:
        raise GateError(f"gate: {path} needs a non-empty `metrics:` list")
    for i, g in enumerate(guards):
        relative = (isinstance(g, dict) and set(g) == {"file", "key", "better", "tolerance"}
                    and g["better"] in ("lower", "higher") and _num(g["tolerance"]) and g["tolerance"] >= 0)
        bound = isinstance(g, dict) and set(g) == {"file", "key", "at_most"} and _num(g["at_most"])
        if not (relative or bound):
            raise GateError(f"gate: {path} metrics[{i}] must have exactly file, key, and either "
                            f"better (lower|higher) and tolerance (a fraction >= 0), or at_most (a bound): {g!r}")
    frontier = cfg.get("frontier") or []
    if not all(isinstance(f, dict) and {"csv", "x", "y"} <= set(f) for f in frontier):
        raise GateError(f"gate: {path} frontier entries need csv, x and y")
    return {"metrics": guards, "frontier": frontier}


def resolve(root: Path, rev: str) -> str:
    r = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if r.returncode:
        raise GateError(f"gate: unknown git revision {rev!r} (not a commit here; a shallow clone has no parents)")
    return r.stdout.decode().strip()


def base_bytes(root: Path, sha: str, path: str) -> bytes | None:
    """The file as committed at sha, or None where that commit has no such file."""
    r = _git(root, "show", f"{sha}:{path}")
    return r.stdout if r.returncode == 0 else None


def check_json(root: Path, sha: str, rev: str, files) -> None:
    """Each metric file, on each side where it exists, must parse: else one line (exit 2)."""
    for f in sorted(set(files)):
        p = root / f
        now = p.read_bytes() if p.is_file() else None
        for where, data in ((f"at {rev}", base_bytes(root, sha, f)), ("in the working tree", now)):
            if data is None:
                continue
            try:
                json.loads(data)
            except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not text
                raise GateError(f"gate: {f} {where} is not valid JSON ({e}); fix or regenerate it") from None


def dvc_diff(root: Path, rev: str) -> tuple[dict, str]:
    """`dvc metrics diff --json --all rev` -> ({file: {key: {old, new[, diff]}}}, dvc's warnings)."""
    r = subprocess.run([sys.executable, "-m", "dvc", "metrics", "diff", "--json", "--all", rev],
                       cwd=root, capture_output=True, text=True)
    if r.returncode:
        last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise GateError(f"gate: `dvc metrics diff {rev}` failed: {last}")
    try:
        return (json.loads(r.stdout) if r.stdout.strip() else {}), r.stderr.strip()
    except json.JSONDecodeError:
        raise GateError(f"gate: `dvc metrics diff --json {rev}` printed no JSON: {r.stdout[:80]!r}") from None


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def judge(g: dict, old, new) -> tuple[str, str, bool]:
    """(change, verdict, failed) for one guarded metric: relative to BASE, or (`at_most`) an
    absolute bound the working tree's value must meet whatever BASE had."""
    if "at_most" in g:
        if not _num(new):
            return "", "missing in working tree" if new is None else "not a number", new is not None
        failed = new > g["at_most"]
        return ("" if not (_num(old) and old) else f"{(new - old) / abs(old):+.2%}",
                "**FAIL**" if failed else "ok", failed)
    if old is None or new is None:
        side = "BASE" if old is None else "working tree"
        return "", f"missing in {side}", False
    if not (_num(old) and _num(new)):
        return "", "not a number", False
    rel = 0.0 if old == new else (new - old) / abs(old) if old else math.copysign(math.inf, new - old)
    worse = rel if g["better"] == "lower" else -rel
    failed = worse > g["tolerance"] + 1e-12
    verdict = "**FAIL**" if failed else ("better" if worse < 0 else ("same" if rel == 0 else "ok"))
    return f"{rel:+.2%}", verdict, failed


def _fmt(v) -> str:
    return "-" if v is None else f"{v:,}" if type(v) is int else f"{v:.6g}" if type(v) is float else str(v)


def report(guards: list[dict], diff: dict, rev: str, sha: str) -> tuple[list[str], list[str]]:
    """Markdown lines and the names of the guarded metrics that regressed beyond tolerance."""
    lines = [f"## Metrics gate: working tree vs {rev} ({sha[:10]})", "",
             "| metric | base | now | change | tolerance | verdict |", "|---|---:|---:|---:|---|---|"]
    failed, missing = [], []
    for g in guards:
        entry = diff.get(g["file"], {}).get(g["key"], {})
        old, new = entry.get("old"), entry.get("new")
        name = f"{Path(g['file']).stem}:{g['key']}"
        change, verdict, bad = judge(g, old, new)
        if not entry:
            verdict = "missing on both sides"
        if "at_most" in g:
            tol = f"at most {_fmt(g['at_most'])}"
        else:
            sign = "+" if g["better"] == "lower" else "-"
            tol = f"{sign}{g['tolerance']:.0%} ({g['better']} is better)"
        lines.append(f"| {name} | {_fmt(old)} | {_fmt(new)} | {change} | {tol} | {verdict} |")
        if bad:
            failed.append(name)
        if verdict.startswith("missing"):
            missing.append(name)
    if missing:
        lines += ["", f"Missing (not checked): {', '.join(missing)}"]
    return lines, failed


def _rows(data: bytes | None, x: str, y: str) -> list[tuple[float, float, str]]:
    out = []
    for r in csv.DictReader(io.StringIO((data or b"").decode(errors="replace"))):
        try:
            out.append((float(r[x]), float(r[y]), r.get("name", "")))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def pareto(rows: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The non-dominated points (smaller x and smaller y both better), by increasing x."""
    front, best = [], math.inf
    for p in sorted(rows):
        if p[1] < best:
            front.append(p)
            best = p[1]
    return front


def plot_frontier(root: Path, sha: str, rev: str, panels: list[dict], png: Path) -> list[str]:
    """One panel per CSV: BASE's points and frontier (grey) under the working tree's (blue).
    Returns notes about CSVs absent on a side."""
    plt = pyplot()
    from matplotlib.ticker import EngFormatter, NullFormatter
    notes = []
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, p in zip(axes[0], panels):
        now_path = root / p["csv"]
        sides = [(f"BASE {rev}", base_bytes(root, sha, p["csv"]), "#7f7f7f", "s"),
                 ("working tree", now_path.read_bytes() if now_path.is_file() else None, "#1f77b4", "o")]
        for label, data, color, marker in sides:
            rows = _rows(data, p["x"], p["y"])
            if not rows:
                notes.append(f"{p['csv']}: no {p['x']}/{p['y']} rows in the {label}")
                continue
            ax.scatter([r[0] for r in rows], [r[1] for r in rows], color=color, marker=marker,
                       alpha=0.45, s=30, label=f"{label}: all points")
            front = pareto(rows)
            ax.step([r[0] for r in front], [r[1] for r in front], where="post", color=color, lw=1.8,
                    marker=marker, label=f"{label}: frontier")
            if label == "working tree":
                for fx, fy, n in front:
                    ax.annotate(n, (fx, fy), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if p.get("log_x"):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_xlabel(p["x"] + (" (log scale)" if p.get("log_x") else ""))
        ax.set_ylabel(p["y"])
        ax.set_title(p.get("title", p["csv"]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Size versus quality frontier: {rev} ({sha[:10]}) vs working tree")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, png)
    return notes


def gate(root: Path, rev: str, config: Path, png: Path | None) -> tuple[list[str], int]:
    cfg = load_config(config if config.is_absolute() else root / config)
    sha = resolve(root, rev)
    check_json(root, sha, rev, [g["file"] for g in cfg["metrics"]])
    diff, warnings = dvc_diff(root, rev)
    check_json(root, sha, rev, list(diff))
    lines, failed = report(cfg["metrics"], diff, rev, sha)
    if warnings:
        lines += ["", f"dvc: {' '.join(warnings.split())} (a metrics file absent there reads as missing)"]
    if cfg["frontier"]:
        png = png or DEFAULT_PNG
        out = png if png.is_absolute() else root / png
        notes = plot_frontier(root, sha, rev, cfg["frontier"], out)
        lines += ["", f"Frontier plot (BASE and working tree): {out}"] + [f"- {n}" for n in notes]
    lines.append("")
    if failed:
        lines.append(f"**Gate failed**: {len(failed)} guarded metric(s) regressed beyond tolerance: {', '.join(failed)}")
    else:
        lines.append(f"Gate passed: no guarded metric regressed beyond its tolerance against {rev}.")
    return lines, 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m iteralite.pipeline.gate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD", help="the git revision to compare against (default: HEAD)")
    ap.add_argument("--config", type=Path, default=CONFIG, help="guarded metrics and tolerances (default: gate.yaml)")
    ap.add_argument("--png", type=Path, default=None, help=f"the frontier plot, relative to --root (default: {DEFAULT_PNG})")
    ap.add_argument("--root", type=Path, default=Path("."), help="the repository root (default: .)")
    args = ap.parse_args(argv)
    try:
        lines, status = gate(args.root.resolve(), args.base, args.config, args.png)
    except GateError as e:
        print(e, file=sys.stderr)
        return 2
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())

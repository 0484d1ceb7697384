"""`make frontier`: the size-quality frontier across experiments, one table and one plot.

`dvc exp show --json` (DVC 3) lists the workspace, the baseline commit and every experiment queued,
running, finished or failed beside it, each with its params and headline metrics. Each student
target (`student.targets`: headline, tiny) has its own final artifact and headline metrics file
(`metrics/headline/mixed_precision.json`, `..._tiny.json`), so every experiment gives one point
per target: bytes on disk against validation perplexity. Each point also carries the params that
define it (the student's width, depth and embedding rank after the target's overrides, and the
quality budget `mixed_precision.max_ppl_delta_pct` after its override), so the table says what a
point is, not only where it lies.

The workspace's full mixed_precision metrics add the comparison allocations of its Pareto plot
(uniform int8/int4, the manual map, the allocation before fine-tuning) as points of kind
"candidate". A point whose target and metrics equal an earlier one's (a queued experiment that
changed a param its target overrides, the baseline commit beside an unchanged workspace) is kept
once; the `also` column names the duplicates. A point is Pareto-optimal when no other point is at
most as large and at most as perplexed, and strictly better in one of the two.

Writes plots/frontier.csv (one row per point, smallest first) and plots/frontier.png. Errors
(dvc failing, JSON that is not `exp show`'s, no point with metrics) are one line, exit status 1.
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

from iteralite.bench.report import PLAN_BYTES
from iteralite.io.atomic import write_text
from iteralite.io.errors import IteraliteError
from iteralite.io.plotting import pyplot, save_png
from iteralite.pipeline import paths

CSV = Path("plots/frontier.csv")
PNG = Path("plots/frontier.png")
PARAMS_FILE = "params.yaml"
HEADLINE_MIXED = "metrics/headline/mixed_precision.json"

METRIC_KEYS = ("size_bytes", "val_ppl", "val_ppl_delta_pct", "val_bpb", "wikitext2_ppl", "params",
               "compression_vs_fp32", "allocated_bits_per_weight", "entropy_coded")
STUDENT_KEYS = ("d_model", "n_layers", "embed_rank", "max_heads", "max_ff", "tokens")
BUDGET_KEYS = ("objective", "max_ppl_delta_pct", "target_bits_per_weight")
COLUMNS = ("name", "kind", "target", "pareto", *METRIC_KEYS, *STUDENT_KEYS, *BUDGET_KEYS, "rev", "also")
# candidates of the full metrics' "pareto" dict that are not a point of their own: the artifact itself
SKIP_CANDIDATES = ("mixed_optimized",)


class FrontierError(IteraliteError):
    """The frontier cannot be built: the message is the one line printed before exit status 1."""


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def headline_file(target: str) -> str:
    """A target's headline metrics file as `dvc exp show` keys it."""
    return paths.for_target(HEADLINE_MIXED, target)


def target_params(params: dict, target: str) -> dict:
    """The params that define target `target`'s point: the student keys after the target's
    overrides (`student.targets.<target>`) and the budget after its overrides
    (`mixed_precision.targets.<target>`): the objective and its own key, max_ppl_delta_pct for
    ppl_budget, target_bits_per_weight for bits_target. Keys absent from `params` are left out."""
    student, mixed = _dict(params.get("student")), _dict(params.get("mixed_precision"))
    s = {**student, **_dict(_dict(student.get("targets")).get(target))}
    m = {**mixed, **_dict(_dict(mixed.get("targets")).get(target))}
    out = {k: s[k] for k in STUDENT_KEYS if k in s}
    objective = m.get("objective", "ppl_budget")
    key = "target_bits_per_weight" if objective == "bits_target" else "max_ppl_delta_pct"
    if "objective" in m:
        out["objective"] = objective
    if key in m:
        out[key] = m[key]
    return out


def _targets(params: dict) -> list[str]:
    """The student targets an experiment defines (its params), else the pipeline's."""
    named = _dict(_dict(params.get("student")).get("targets"))
    return list(named) or list(paths.TARGETS)


def _states(doc) -> list[tuple[str, dict, str]]:
    """(name, state, rev) for every baseline and experiment of an `exp show --json` document, in
    its order: each baseline (the workspace, then commits), then the experiments beside it."""
    if not isinstance(doc, list) or not all(isinstance(e, dict) and "rev" in e for e in doc):
        raise FrontierError("frontier: the JSON is not DVC 3's `dvc exp show --json` (a list of "
                            "{rev, name, data, experiments}); regenerate it with DVC 3")
    out = []
    for base in doc:
        rev = str(base.get("rev") or "")
        out.append((base.get("name") or (rev if rev == "workspace" else rev[:7]), base, rev))
        for exp_range in base.get("experiments") or []:
            for i, state in enumerate(_dict(exp_range).get("revs") or []):
                state = _dict(state)
                r = str(state.get("rev") or "")
                name = state.get("name") or (exp_range.get("name") if i == 0 else None) or r[:7]
                out.append((name, state, r))
    return out


def _metrics(data: dict, file: str) -> dict | None:
    """A metrics file's numbers inside one state's data, None when absent or unreadable there."""
    entry = _dict(_dict(data.get("metrics")).get(file))
    return entry["data"] if isinstance(entry.get("data"), dict) and not entry.get("error") else None


def experiment_points(doc) -> tuple[list[dict], list[str]]:
    """One point per (experiment, target) with a headline size and perplexity; plus notes naming
    what was skipped (an errored experiment, a target whose metrics file failed to load)."""
    points, notes = [], []
    for name, state, rev in _states(doc):
        data = state.get("data")
        if state.get("error") or not isinstance(data, dict):
            err = _dict(state.get("error")).get("msg") or "no data"
            notes.append(f"{name}: skipped ({' '.join(str(err).split())[:120]})")
            continue
        pfile = _dict(_dict(data.get("params")).get(PARAMS_FILE))
        params = _dict(pfile.get("data"))
        for target in _targets(params):
            file = headline_file(target)
            m = _metrics(data, file)
            if m is None:
                if _dict(_dict(data.get("metrics")).get(file)).get("error"):
                    notes.append(f"{name}: {file} could not be read; {target} skipped")
                continue
            if not (_num(m.get("size_bytes")) and _num(m.get("val_ppl"))):
                notes.append(f"{name}: {file} has no size_bytes/val_ppl; {target} skipped")
                continue
            p = {"name": name, "kind": "experiment", "target": target, "rev": rev}
            p.update({k: m[k] for k in METRIC_KEYS if k in m})
            p.update(target_params(params, target))
            points.append(p)
    return points, notes


def candidate_points(root: Path, params: dict) -> list[dict]:
    """The workspace's comparison allocations: each target's full mixed_precision metrics'
    "pareto" dict, with the perplexity increase computed against the FP32 perplexity those
    metrics imply (val_ppl / (1 + val_ppl_delta_pct / 100))."""
    out = []
    for target in _targets(params):
        f = root / paths.for_target(paths.MIXED_METRICS, target)
        try:
            full = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # not run yet, or unreadable: the experiment points still stand
        full = _dict(full)
        fp32 = None
        if _num(full.get("val_ppl")) and _num(full.get("val_ppl_delta_pct")):
            fp32 = full["val_ppl"] / (1 + full["val_ppl_delta_pct"] / 100)
        for cand, m in _dict(full.get("pareto")).items():
            m = _dict(m)
            if cand in SKIP_CANDIDATES or not (_num(m.get("size_bytes")) and _num(m.get("val_ppl"))):
                continue
            p = {"name": cand, "kind": "candidate", "target": target, "rev": "workspace"}
            p.update({k: m[k] for k in METRIC_KEYS if k in m})
            p["val_ppl"] = round(m["val_ppl"], 4)
            if fp32 and "val_ppl_delta_pct" not in p:
                p["val_ppl_delta_pct"] = round(100 * (m["val_ppl"] / fp32 - 1), 3)
            p.update(target_params(params, target))
            out.append(p)
    return out


def dedupe(points: list[dict]) -> list[dict]:
    """Keep the first of points with the same target, size and quality; the later ones' names go
    in the kept point's `also`."""
    kept: dict[tuple, dict] = {}
    for p in points:
        key = (p["target"], p["size_bytes"], round(p["val_ppl"], 4),
               p.get("val_ppl_delta_pct"), p.get("wikitext2_ppl"))
        if key in kept:
            kept[key].setdefault("also", []).append(p["name"])
        else:
            kept[key] = p
    return list(kept.values())


def mark_pareto(points: list[dict], y: str = "val_ppl") -> list[dict]:
    """Set each point's `pareto`: True when no other point has size_bytes and `y` both at most its
    own, one of them strictly smaller."""
    for p in points:
        p["pareto"] = not any(
            q is not p and q["size_bytes"] <= p["size_bytes"] and q[y] <= p[y]
            and (q["size_bytes"] < p["size_bytes"] or q[y] < p[y]) for q in points)
    return points


def build(doc, root: Path = Path("."), candidates: bool = True) -> tuple[list[dict], list[str]]:
    """The frontier's points (deduplicated, Pareto-marked, smallest first) and the skip notes."""
    points, notes = experiment_points(doc)
    if candidates:
        ws = next((s for n, s, r in _states(doc) if r == "workspace"), {})
        params = _dict(_dict(_dict(_dict(ws.get("data")).get("params")).get(PARAMS_FILE)).get("data"))
        points += candidate_points(root, params)
    if not points:
        raise FrontierError("frontier: no experiment has headline size_bytes and val_ppl yet "
                            f"({HEADLINE_MIXED} and its per-target files); run the pipeline or the sweep first")
    points = mark_pareto(dedupe(points))
    points.sort(key=lambda p: (p["size_bytes"], p["val_ppl"], p["target"], p["name"]))
    return points, notes


def to_csv(points: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for p in points:
        row = {k: p.get(k, "") for k in COLUMNS}
        row["also"] = " ".join(p.get("also", []))
        w.writerow(row)
    return buf.getvalue()


def _label(p: dict) -> str:
    spec = [f"d{p['d_model']}" if "d_model" in p else "", f"L{p['n_layers']}" if "n_layers" in p else ""]
    if p["kind"] == "experiment" and _num(p.get("max_ppl_delta_pct")):
        spec.append(f"\u2264{p['max_ppl_delta_pct']:g}%")
    if p["kind"] == "experiment" and _num(p.get("target_bits_per_weight")):
        spec.append(f"{p['target_bits_per_weight']:g} bits")
    spec = " ".join(s for s in spec if s)
    return f"{p['name']} ({spec})" if p["kind"] == "experiment" and spec else p["name"]


def plot(points: list[dict], png: Path) -> None:
    """Bytes (log scale) against validation perplexity: one marker per target, filled for the
    experiments' artifacts and hollow for the workspace's comparison allocations, the frontier as
    a step line, the plan's 120,000-byte line, and a right axis in % over FP32 when every point
    implies the same FP32 perplexity."""
    plt = pyplot()
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter
    fig, ax = plt.subplots(figsize=(9, 5.5))
    present = {p["target"] for p in points}  # the pipeline's targets first: a target keeps its marker
    targets = [t for t in paths.TARGETS if t in present] + sorted(present - set(paths.TARGETS))
    markers = dict(zip(targets, "o^sDvP*X"))
    colors = dict(zip(targets, ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")))
    for t in targets:
        for kind, filled in (("experiment", True), ("candidate", False)):
            pts = [p for p in points if p["target"] == t and p["kind"] == kind]
            if pts:
                ax.scatter([p["size_bytes"] for p in pts], [p["val_ppl"] for p in pts], s=46,
                           marker=markers[t], edgecolors=colors[t], linewidths=1.4, zorder=3,
                           facecolors=colors[t] if filled else "none",
                           label=f"{t}: {'artifact' if filled else 'comparison allocation'}")
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["size_bytes"])
    ax.step([p["size_bytes"] for p in front], [p["val_ppl"] for p in front], where="post",
            color="black", lw=1.3, alpha=0.7, zorder=2, label="Pareto frontier")
    for p in points:
        ax.annotate(_label(p), (p["size_bytes"], p["val_ppl"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=7, color="black" if p["pareto"] else "#666666")
    ax.axvline(PLAN_BYTES, color="#ff7f0e", ls="--", lw=1.2, label=f"plan: {PLAN_BYTES:,} bytes")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.xaxis.set_major_formatter(EngFormatter(unit="B"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("artifact size on disk (bytes, log scale)")
    ax.set_ylabel("validation perplexity (lower is better)")
    fp32 = {round(p["val_ppl"] / (1 + p["val_ppl_delta_pct"] / 100), 2)
            for p in points if _num(p.get("val_ppl_delta_pct")) and p["val_ppl_delta_pct"] > -100}
    if len(fp32) == 1:
        ref = fp32.pop()
        sec = ax.secondary_yaxis("right", functions=(lambda v: 100 * (v / ref - 1), lambda d: ref * (1 + d / 100)))
        sec.set_ylabel(f"perplexity increase over FP32 ({ref:g}), %")
    ax.set_title(f"Size-quality frontier: {sum(p['kind'] == 'experiment' for p in points)} experiment "
                 f"point(s), {sum(p['pareto'] for p in points)} on the frontier")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    save_png(fig, png)


def exp_show(root: Path, all_commits: bool = False) -> str:
    """`dvc exp show --json` (with `-A`: every commit's experiments, not only HEAD's) run in `root`:
    its stdout, or a FrontierError with dvc's last line."""
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"] + (["-A"] if all_commits else [])
    try:
        r = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    except OSError as e:
        raise FrontierError(f"frontier: could not run dvc ({e})") from None
    if r.returncode:
        last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise FrontierError(f"frontier: `dvc exp show --json` failed (exit {r.returncode}): {last}")
    return r.stdout


def load(text: str, where: str):
    try:
        return json.loads(text)
    except ValueError as e:
        raise FrontierError(f"frontier: {where} is not valid JSON ({e})") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m iteralite.pipeline.frontier", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="a saved `dvc exp show --json` output (default: run it)")
    ap.add_argument("--root", type=Path, default=Path("."), help="the repository root (default: .)")
    ap.add_argument("--csv", type=Path, default=CSV, help=f"the table, relative to --root (default: {CSV})")
    ap.add_argument("--png", type=Path, default=PNG, help=f"the plot, relative to --root (default: {PNG})")
    ap.add_argument("--all-commits", action="store_true",
                    help="pass -A to `dvc exp show`: experiments of every commit, not only HEAD's")
    ap.add_argument("--no-candidates", action="store_true",
                    help="leave out the workspace's comparison allocations (uniform int8/int4, manual, ...)")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    try:
        if args.json:
            try:
                text = args.json.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise FrontierError(f"frontier: cannot read {args.json} ({e.__class__.__name__}: {e})") from None
            doc = load(text, str(args.json))
        else:
            doc = load(exp_show(root, args.all_commits), "the output of `dvc exp show --json`")
        points, notes = build(doc, root, candidates=not args.no_candidates)
    except FrontierError as e:
        print(e, file=sys.stderr)
        return 1
    csv_path, png_path = (p if p.is_absolute() else root / p for p in (args.csv, args.png))
    write_text(csv_path, to_csv(points))
    plot(points, png_path)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    front = [p for p in points if p["pareto"]]
    print(f"{len(points)} point(s), {len(front)} on the frontier: {csv_path}, {png_path}")
    for p in front:
        print(f"  {p['target']:9} {p['name']:28} {p['size_bytes']:>9,} B  val_ppl {p['val_ppl']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

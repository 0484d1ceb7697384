"""The benchmark stage's one-page report: a table of every variant, a size-versus-quality Pareto
plot, a decode-speed chart, the profiler's hotspots, and the Pareto data as CSV for `dvc plots`.

Size and speed stay separate columns and separate plots: a 4-bit file that decodes at FP32
speed is 7x smaller, not 7x "effectively compressed", so the two are never multiplied. A metric
a variant does not have is shown as "—" rather than dropped, so the table's shape never hides
what was not measured.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from iteralite.io.atomic import write_text
from iteralite.io.plotting import pyplot, save_png

MISSING = "—"

# (metric key, column header, formatter)
COLUMNS = [
    ("params", "params", lambda v: f"{int(v):,}"),
    ("size_bytes", "size (bytes)", lambda v: f"{int(v):,}"),
    ("bits_per_weight", "bits/weight", lambda v: f"{v:.2f}"),
    ("compression_vs_fp32", "compression", lambda v: f"{v:.2f}x"),
    ("val_ppl", "val ppl", lambda v: f"{v:.2f}"),
    ("val_bpb", "val bpb", lambda v: f"{v:.4f}"),
    ("wikitext2_ppl", "WikiText-2 ppl", lambda v: f"{v:.0f}"),
    ("decode_tok_s_step_loop", "decode tok/s, step loop (1 thread)", lambda v: f"{v:.0f}"),
    ("decode_tok_s_step_loop_all_threads", "step loop (all threads)", lambda v: f"{v:.0f}"),
    ("decode_tok_s_best_loop", "decode tok/s, best loop (1 thread)", lambda v: f"{v:.0f}"),
    ("decode_tok_s_all_threads", "best loop (all threads)", lambda v: f"{v:.0f}"),
    ("prefill_ms_128", "prefill 128 (ms)", lambda v: f"{v:.1f}"),
    ("peak_rss_mb", "peak RSS (MiB)", lambda v: f"{v:.0f}"),
    ("peak_minus_baseline_mb", "RSS over baseline (MiB)", lambda v: f"{v:.0f}"),
    ("resident_weight_bytes", "resident weights (bytes)", lambda v: f"{int(v):,}"),
    ("load_to_first_token_ms", "load to 1st token (ms)", lambda v: f"{v:.0f}"),
    ("decode_speedup_vs_fused_step_loop", "vs fused, step loops", lambda v: f"{v:.2f}x"),
    ("decode_speedup_vs_fused", "vs fused, best loops", lambda v: f"{v:.2f}x"),
]

# the loops table: one row per variant with a best loop (runtimes and programs)
LOOP_COLUMNS = [
    ("best_loop", "best loop", str),
    ("decode_tok_s_step_loop", "step loop tok/s", lambda v: f"{v:.0f}"),
    ("decode_tok_s_best_loop", "best loop tok/s", lambda v: f"{v:.0f}"),
    ("greedy_agreement_with_eager", "greedy ids = eager's", lambda v: f"{100 * v:.1f}%"),
    ("greedy_first_divergence_from_eager", "first id != eager's", lambda v: f"{int(v)}"),
    ("greedy_agreement_with_native", "greedy ids = native's", lambda v: f"{100 * v:.1f}%"),
    ("greedy_top1_agreement", "top-1 = eager's (teacher-forced)", lambda v: f"{100 * v:.1f}%"),
    ("instructions_per_token", "instructions/token", lambda v: f"{v:,.0f}"),
]

HOW_TO_READ = """\
**How to read this.** Sizes are the artifact file's bytes for the pipeline's own artifacts, and
in-memory bytes of the weight tensors (packed codes, scales and absmax included) for the peers
that are never saved (bitsandbytes NF4, int8 weight-only, torch.compile). Perplexity is per BPE
token of our tokenizer on the held-out TinyStories split; bits per byte does not depend on the
tokenizer. Prefill is one batch-1 forward over 128 tokens.
Peak RSS is measured in a fresh process per variant (load, then decode a few tokens); the
baseline is that process with torch imported, before loading. Resident weights are the bytes
of weight tensors the loaded runtime holds (the native step keeps the packed codes; the others
hold float or packed tensors as loaded); load to first token is loading plus one decode step, in
this process (the fused path's includes its compile). The native row runs the mixed artifact on
the C step and is scored here. The peer_onnxruntime row runs the same artifact on ONNX Runtime
(FP32 weights in memory): its quality is scored here, through ONNX Runtime, on the full-sequence
graph over the same windows (the step graph's logits are compared with it and the difference
recorded); it equals the mixed row's because both compute the same FP32 math on the same weights.
Speed and size are reported separately and never multiplied into an "effective compression".

**Decode speed, like for like.** Every decode column is batch-1 greedy generation after the same
prompt (`benchmark.prompt`, prefilled untimed), `decode_tokens` tokens, the median of repeats
after warm-up, all in one process.
- *step loop*: the same Python driver for every runtime (`logits, state = model.step(tok, state)`,
  `tok = logits.argmax(-1)`), so it times each runtime's step plus the same per-token Python cost.
- *best loop*: the runtime's fastest end-to-end loop, named in the loops table: the native
  runtime's greedy loop in C (one call), ONNX Runtime's session called on numpy arrays, and for
  eager, fused (the compiled AOTInductor step) and the peers the step loop itself (they have no
  loop of their own: one measurement fills both columns). itl-run and wasm are programs: their
  best loop is their own (artifact reader, tokenizer and greedy loop in C, or in wasm under
  Node), read from the timing line they print; they have no Python step loop.
- "vs fused" ratios divide step loop by step loop, or best loop by best loop, never one by the
  other (`decode_speedup_vs_fused` and `decode_speedup_vs_fp32_eager` are best loop over best
  loop, the `_step_loop` ones step loop over step loop). `decode_tok_s_1thread` /
  `decode_tok_s_all_threads` in metrics/benchmark.json are the best loop's (the names earlier
  runs used); the native C loop is single-threaded, so its two agree.
- What still differs is the math, not the loop: the native step (and itl-run, and wasm) runs only
  the top-k experts each token, on packed low-bit weights with int8 activations, single-threaded;
  the fused path and ONNX Runtime hold FP32 weights (dequantized once) and run every expert,
  dense-gated (zero weight outside the top-k); eager runs the top-k experts through PyTorch
  modules that dequantize the stored codes.
- *greedy ids = eager's*: the runtime's own greedy ids over `agreement_tokens` steps against the
  eager model of the same artifact, position by position, both free-running: after the first
  differing id (a near tie) the two stories part, so the first divergence says more than the
  share. *top-1 = eager's (teacher-forced)*: the native step fed eager's tokens, per step.
- *instructions/token*: the native C step's instructions per decoded token, counted by callgrind
  on itl-run ((Ir(N2) - Ir(N1)) / (N2 - N1), so loading and the prompt cancel): a count, it repeats
  between runs where wall-clock does not. It counts the AVX2 path (valgrind has no AVX-512), so it
  is not the instruction count of the timed AVX-512 loop.
Wall-clock numbers come from a shared 2-core machine and move by 10-20% between runs;
differences smaller than that are noise.
"""

def _relpath(target, start_dir) -> str:
    return Path(os.path.relpath(Path(target).resolve(), Path(start_dir).resolve())).as_posix()


def _cell(metrics: dict, key: str, fmt) -> str:
    v = metrics.get(key)
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return MISSING
    return fmt(v)


def variant_table(results: dict[str, dict]) -> str:
    """Markdown table: one row per variant, one column per known metric ("—" when missing)."""
    head = "| variant | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "| --- | " + " | ".join("---:" for _ in COLUMNS) + " |"
    rows = [f"| {name} | " + " | ".join(_cell(m, k, f) for k, _, f in COLUMNS) + " |"
            for name, m in results.items()]
    return "\n".join([head, rule, *rows])


def loops_table(results: dict[str, dict]) -> str:
    """Markdown table of the rows that have a best loop (runtimes and programs); a program that
    did not run shows its reason."""
    head = "| variant | " + " | ".join(h for _, h, _ in LOOP_COLUMNS) + " |"
    rule = "| --- | --- | " + " | ".join("---:" for _ in LOOP_COLUMNS[1:]) + " |"
    rows = []
    for name, m in results.items():
        if "best_loop" not in m:
            continue
        if m.get("available") is False:
            why = f"not measured: {m.get('reason', '')}".replace("|", "\\|")
            rows.append(f"| {name} | " + " | ".join([why] + [MISSING] * (len(LOOP_COLUMNS) - 1)) + " |")
            continue
        rows.append(f"| {name} | " + " | ".join(_cell(m, k, f) for k, _, f in LOOP_COLUMNS) + " |")
    return "\n".join([head, rule, *rows])


def hotspot_table(rows: list[dict]) -> str:
    """Markdown table of `timing.profile_hotspots` rows."""
    out = ["| op | self CPU (ms, total) | self CPU per token (us) | calls | share |",
           "| --- | ---: | ---: | ---: | ---: |"]
    out += [f"| `{r['op']}` | {r['self_cpu_ms_total']:.2f} | {r.get('self_cpu_us_per_token', MISSING)} | "
            f"{r['calls']} | {r['pct']:.1f}% |" for r in rows]
    return "\n".join(out)


PLAN_BYTES = 120_000  # the original plan's bar for the final model: under 0.12 MB
PEER_PREFIX = "peer_"  # peers are built in memory, never saved: they are not on the size frontier


def write_pareto_csv(results: dict[str, dict], path) -> None:
    """name,size_bytes,val_ppl,val_bpb,decode_tok_s_1thread (empty cell when missing), for `dvc plots`."""
    cols = ["size_bytes", "val_ppl", "val_bpb", "decode_tok_s_1thread"]
    lines = ["name," + ",".join(cols)]
    lines += [",".join([name] + ["" if m.get(c) is None else str(m[c]) for c in cols])
              for name, m in results.items()]
    write_text(path, "\n".join(lines) + "\n")


def frontier_points(results: dict[str, dict]) -> list[tuple[str, dict]]:
    """(name, metrics) of every saved artifact with a size and a validation perplexity."""
    return [(n, m) for n, m in results.items() if not n.startswith(PEER_PREFIX) and m.get("size_bytes")
            and m.get("val_ppl") is not None]


def plot_pareto(results: dict[str, dict], path, fp32: str = "fp32") -> None:
    """The size frontier: every saved artifact's file bytes (log x) against validation perplexity
    and bits per byte, with the plan's 0.12 MB bar and the 50x-smaller-than-FP32 line. Peers are
    left out: they are in-memory builds, not files."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    pts = frontier_points(results)
    fp32_bytes = results.get(fp32, {}).get("size_bytes")
    for ax, key, label in ((axes[0], "val_ppl", "TinyStories validation perplexity"),
                           (axes[1], "val_bpb", "TinyStories validation bits per byte")):
        for name, m in pts:
            if m.get(key) is None:
                continue
            ax.scatter(m["size_bytes"], m[key], s=30)
            ax.annotate(name, (m["size_bytes"], m[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axvline(PLAN_BYTES, color="tab:red", ls="--", lw=1, label="plan: 0.12 MB")
        if fp32_bytes:
            ax.axvline(fp32_bytes / 50, color="tab:purple", ls=":", lw=1, label="50x smaller than FP32")
        ax.set_xscale("log")
        ax.set_xlabel("artifact file size (bytes, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("Size versus quality of every artifact (lower left is better)")
    fig.tight_layout()
    save_png(fig, path)


def plot_speed(results: dict[str, dict], path) -> None:
    """Grouped bars: batch-1 decode tok/s at 1 thread, step loop and best loop, per variant."""
    plt = pyplot()
    names = list(results)
    keys = [("decode_tok_s_step_loop", "step loop (same Python driver)"), ("decode_tok_s_best_loop", "best loop (own)")]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4.5))
    width = 0.4
    values = []
    for j, (key, label) in enumerate(keys):
        ys = [results[n].get(key) or 0 for n in names]
        values += [y for y in ys if y > 0]
        ax.bar([i + (j - 0.5) * width for i in range(len(names))], ys, width, label=label)
    if values and max(values) / min(values) > 20:  # one slow peer would flatten every other bar
        ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("decode tokens / s (batch 1, greedy)")
    ax.set_title("Decode speed, 1 thread (higher is better; bar missing = not measured)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_png(fig, path)


def render_report(results: dict[str, dict], pareto_rel: str, speed_rel: str,
                  hotspots: dict[str, list[dict]] | None = None, title: str = "Benchmark") -> str:
    """The markdown page; images are linked by the given relative paths."""
    parts = [f"# {title}", "", variant_table(results), "", "## Decode loops", "", loops_table(results), "",
             HOW_TO_READ,
             f"![size versus validation perplexity and bits per byte of every artifact]({pareto_rel})", "",
             f"![decode speed]({speed_rel})", ""]
    for label, rows in (hotspots or {}).items():
        parts += [f"## Decode hotspots: {label}", "", hotspot_table(rows), ""]
    return "\n".join(parts)


def write_bench_report(results: dict[str, dict], report_md, pareto_png, speed_png, pareto_csv,
                       hotspots: dict[str, list[dict]] | None = None, title: str = "Benchmark") -> None:
    """Write the two plots, the Pareto CSV and the markdown report (each atomically).

    results: {variant name: metrics}; hotspots: {label (e.g. "fp32 eager"): profile_hotspots rows}."""
    plot_pareto(results, pareto_png)
    plot_speed(results, speed_png)
    write_pareto_csv(results, pareto_csv)
    here = Path(report_md).parent
    write_text(report_md, render_report(results, _relpath(pareto_png, here), _relpath(speed_png, here),
                                        hotspots, title))

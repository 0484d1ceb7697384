"""Cross-stage summaries: the pruning sweep's per-layer sparsity chart and its
quality-versus-ratio table (CSV for `dvc plots`, PNG for people)."""
from __future__ import annotations

import json
from pathlib import Path

from iteralite.io.atomic import write_text
from iteralite.io.plotting import pyplot, save_png


def load_sweep(ratios: list[float], metrics_dir="metrics") -> list[dict]:
    """One row per ratio from metrics/prune_<r>.json and metrics/finetune_<r>.json."""
    rows = []
    for r in sorted(ratios):
        p = json.loads(Path(metrics_dir, f"prune_{r}.json").read_text())
        f = json.loads(Path(metrics_dir, f"finetune_{r}.json").read_text())
        rows.append({"ratio": r, "removed_frac": p["prunable_params_removed_frac"], "params": f["params"],
                     "size_bytes": f["size_bytes"], "compression_vs_fp32": f["compression_vs_fp32"],
                     "prune_val_ppl": p["val_ppl"], "finetune_val_ppl": f["val_ppl"],
                     "finetune_val_ppl_delta_pct": f["val_ppl_delta_pct"], "sparsity": p["sparsity"]})
    return rows


def write_sweep(rows: list[dict], fp32_ppl: float, csv_path, curve_png, sparsity_png) -> None:
    cols = ["ratio", "removed_frac", "params", "size_bytes", "compression_vs_fp32", "prune_val_ppl",
            "finetune_val_ppl", "finetune_val_ppl_delta_pct"]
    write_text(csv_path, "\n".join([",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["ratio"] for r in rows]
    ax.plot(xs, [r["prune_val_ppl"] for r in rows], "o--", label="after pruning (+ recovery)")
    ax.plot(xs, [r["finetune_val_ppl"] for r in rows], "o-", label="after fine-tuning")
    ax.axhline(fp32_ppl, color="gray", lw=1, label="FP32 baseline")
    ax.set_xlabel("pruning ratio (fraction of prunable parameters removed)")
    ax.set_ylabel("TinyStories validation perplexity (4-bit artifact)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, curve_png)

    kinds = ["heads", "d_ff", "experts", "prunable_params"]
    n_layers = len(rows[0]["sparsity"]) if rows else 0
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * max(1, len(rows)), 3.6), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], rows):
        width = 0.8 / len(kinds)
        for j, k in enumerate(kinds):
            ax.bar([i + j * width for i in range(n_layers)],
                   [r["sparsity"][str(i)][k] if str(i) in r["sparsity"] else r["sparsity"][i][k]
                    for i in range(n_layers)], width, label=k)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(n_layers)], [f"layer {i}" for i in range(n_layers)])
        ax.set_title(f"ratio {r['ratio']} (removed {r['removed_frac']:.1%})")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("fraction removed")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Per-layer structured sparsity (heads, expert width, experts, all prunable params)")
    fig.tight_layout()
    save_png(fig, sparsity_png)

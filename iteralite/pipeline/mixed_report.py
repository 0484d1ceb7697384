"""Pictures of the mixed-precision stage: which precision each unit got (and why), and where the
allocation sits against uniform precisions on size versus validation perplexity."""
from __future__ import annotations

from iteralite.io.atomic import write_text
from iteralite.io.plotting import pyplot, save_png

COLORS = {2: "#d62728", 3: "#ff7f0e", 4: "#2ca02c", 8: "#1f77b4", 16: "#9467bd"}


def plot_allocation(allocation: dict, profile: dict, png_path, title: str = "Mixed-precision allocation") -> None:
    """One bar per unit: its precision (bits), coloured by precision, labelled with the profiled
    calibration-loss increase of that unit alone at that precision."""
    plt = pyplot()
    names = list(allocation)
    fig, ax = plt.subplots(figsize=(9, max(4, 0.26 * len(names))))
    bits = [allocation[n] for n in names]
    ax.barh(range(len(names)), bits, color=[COLORS.get(b, "grey") for b in bits])
    for i, n in enumerate(names):
        inc = profile.get(n, {}).get(str(allocation[n]))
        if inc is not None:
            ax.text(bits[i] + 0.2, i, f"{inc:+.4f}", va="center", fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("bits per weight of the unit (label: profiled loss increase, nats/token)")
    ax.set_xticks(sorted(set(COLORS)))
    ax.set_xlim(0, 19)
    ax.set_title(title)
    fig.tight_layout()
    save_png(fig, png_path)


def write_pareto(rows: list[dict], png_path, csv_path, fp32_ppl: float | None = None, headline: str = "") -> None:
    """rows: [{name, size_bytes, val_ppl}] -> a CSV for `dvc plots` and a labelled scatter (log size)."""
    lines = ["name,size_bytes,val_ppl"] + [f"{r['name']},{r['size_bytes']},{r['val_ppl']:.4f}" for r in rows]
    write_text(csv_path, "\n".join(lines) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        star = r["name"] == headline
        ax.scatter(r["size_bytes"], r["val_ppl"], s=90 if star else 40, marker="*" if star else "o",
                   color="#d62728" if star else "#1f77b4", zorder=3)
        ax.annotate(r["name"], (r["size_bytes"], r["val_ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if fp32_ppl:
        ax.axhline(fp32_ppl, color="grey", ls="--", lw=1, label=f"FP32 ({fp32_ppl:.2f})")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("artifact file size (bytes, log scale)")
    ax.set_ylabel("validation perplexity (TinyStories, per token)")
    ax.set_title("Size versus quality: mixed precision against uniform precisions")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, png_path)

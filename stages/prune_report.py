"""Stage `prune_report`: the sweep across prune.ratios: sparsity chart and ppl-versus-ratio curve."""
import json

from iteralite.io.params import load_section
from iteralite.prune.prune import PruneConfig
from iteralite.prune.report import load_sweep, write_sweep
from iteralite.pipeline.stage import run


def main():
    ratios = load_section(PruneConfig, "prune").ratios
    rows = load_sweep(ratios)
    fp32 = json.load(open("metrics/train.json"))
    write_sweep(rows, fp32["val_ppl"], "plots/prune_ratio.csv", "plots/prune_ratio.png", "plots/prune_sparsity.png")


if __name__ == "__main__":
    run("prune_report", main)

"""Stage `prune_report`: the sweep across prune.ratios: sparsity chart and ppl-versus-ratio curve."""
import json

from iteralite.io.params import load_section
from iteralite.pipeline import paths
from iteralite.pipeline.stage import QUALITY_DIR, TRAIN_QUALITY, run
from iteralite.prune.config import PruneConfig
from iteralite.prune.report import load_sweep, write_sweep


def main():
    ratios = load_section(PruneConfig, "prune").ratios
    rows = load_sweep(ratios, QUALITY_DIR)  # the timing-free records: a forced rerun changes nothing here
    with open(TRAIN_QUALITY) as f:
        fp32 = json.load(f)
    write_sweep(rows, fp32["val_ppl"], paths.PRUNE_RATIO_CSV, paths.PRUNE_RATIO_PNG, paths.PRUNE_SPARSITY_PNG)


if __name__ == "__main__":
    run("prune_report", main)

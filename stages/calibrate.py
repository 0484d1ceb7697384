"""Stage `calibrate`: activation statistics and per-tensor sensitivity of the FP32 model."""
import torch

from iteralite.quant.calibrate import CalibrateConfig, calibrate, plot_sensitivity, save_stats
from iteralite.io.checkpoint import load_model
from iteralite.io.params import load_section
from iteralite.pipeline.stage import run, write_metrics
from iteralite.data.tokenizer import load_tokens


def main():
    cfg = load_section(CalibrateConfig, "calibrate")
    model, _ = load_model("checkpoints/fp32.safetensors")
    data = torch.from_numpy(load_tokens("data/tokenizer/train.npy").astype("int64"))
    tensors, summary = calibrate(model, data, cfg)
    save_stats("checkpoints/calibration.safetensors", tensors, summary)
    plot_sensitivity(summary, "plots/sensitivity.png", "plots/sensitivity.csv")
    top = sorted(summary["sensitivity"].items(), key=lambda kv: -kv[1][str(min(cfg.sens_bits))])[:5]
    write_metrics("metrics/calibrate.json", {**{k: v for k, v in summary.items() if k != "act_ranges"},
                                             "most_sensitive": [k for k, _ in top]})


if __name__ == "__main__":
    run("calibrate", main)

"""Stage `calibrate`: activation statistics and per-tensor sensitivity of the FP32 model, on the dev split."""
import torch

from iteralite.data.tokenizer import load_tokens
from iteralite.io.checkpoint import load_model
from iteralite.io.params import load_section
from iteralite.pipeline import paths
from iteralite.pipeline.stage import run, write_metrics
from iteralite.quant.calibrate import CalibrateConfig, calibrate, plot_sensitivity, save_stats


def main():
    cfg = load_section(CalibrateConfig, "calibrate")
    model, _ = load_model(paths.FP32_CKPT)
    data = torch.from_numpy(load_tokens(paths.DEV_TOKENS).astype("int64"))
    tensors, summary = calibrate(model, data, cfg)
    save_stats(paths.CALIBRATION, tensors, summary)
    plot_sensitivity(summary, paths.SENSITIVITY_PNG, paths.SENSITIVITY_CSV)
    top = sorted(summary["sensitivity"].items(), key=lambda kv: -kv[1][str(min(cfg.sens_bits))])[:5]
    write_metrics(paths.CALIBRATE_METRICS, {**{k: v for k, v in summary.items() if k != "act_ranges"},
                                            "most_sensitive": [k for k, _ in top]})


if __name__ == "__main__":
    run("calibrate", main)

"""Calibration: activation statistics per quantizable weight, and per-tensor sensitivity.

Statistics (from the FP32 model over `n_samples` windows of the dev split): per input channel
mean x^2 (activation-aware weighting), X^T X / n (GPTQ's Hessian), absmax and the 99.9th
percentile of |x|. Sensitivity: the loss increase when that tensor alone is quantized (RTN, group
`group_size`) to each of `bits`, everything else left in FP32, on other dev windows. The dev split
is held out of training (so the teacher does not look better than it is, as on text it memorised)
and is not the validation split, so later choices made from it are not tuned on what we report.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from iteralite.io.errors import CheckpointError
from iteralite.io.atomic import write_text
from iteralite.io.stfile import save_tensors
from iteralite.io.params import check
from iteralite.io.plotting import pyplot, save_png
from iteralite.quant.calib_stats import collect_act_stats
from iteralite.quant.spec import QuantSpec
from iteralite.quant.swap import make_spec_for, quantizable_modules, quantize
from iteralite.train.evaluate import mean_loss, windows

STATS_FORMAT = "iteralite-calibration"


@dataclass
class CalibrateConfig:
    n_samples: int = 1000  # calibration windows from the dev split
    seq_len: int = 256
    batch_size: int = 16
    sens_samples: int = 128  # dev windows (other than the statistics ones) per sensitivity probe
    sens_bits: list[int] = field(default_factory=lambda: [4, 8])
    group_size: int = 64
    seed: int = 11

    def validate(self, section: str = "calibrate") -> None:
        for key in ("n_samples", "seq_len", "batch_size", "sens_samples", "group_size"):
            check(getattr(self, key) >= 1, section, key, "must be >= 1")
        check(len(self.sens_bits) > 0 and all(b in (2, 3, 4, 8) for b in self.sens_bits), section, "sens_bits",
              f"must be a non-empty list from 2, 3, 4, 8; got {self.sens_bits}")


def sensitivity(model, wins: torch.Tensor, cfg: CalibrateConfig, progress: bool = True) -> tuple[float, dict]:
    """(baseline loss, {module: {bits: loss increase}}) quantizing one module at a time."""
    base = mean_loss(model, wins, cfg.batch_size)
    names = quantizable_modules(model)
    out = {}
    jobs = [(n, b) for n in names for b in cfg.sens_bits]
    for name, bits in tqdm(jobs, desc="sensitivity", disable=not progress, dynamic_ncols=True):
        # Swap the one module for its quantized twin and put the float one back afterwards
        # (a deep copy of the whole model per probe would cost more than the probe).
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = getattr(parent, child)
        spec_for = make_spec_for(QuantSpec(bits=bits, group_size=cfg.group_size), keep_float=())
        try:
            quantize(model, lambda n, m: spec_for(n, m) if n == name else None)
            out.setdefault(name, {})[str(bits)] = round(mean_loss(model, wins, cfg.batch_size) - base, 6)
        finally:
            setattr(parent, child, original)
    return base, out


def calibrate(model, data: torch.Tensor, cfg: CalibrateConfig, progress: bool = True):
    """-> (tensors to store, summary dict)."""
    model.eval()
    wins = windows(data, cfg.n_samples, cfg.seq_len, cfg.seed)
    ranges: dict = {}
    batches = tqdm([wins[i:i + cfg.batch_size] for i in range(0, len(wins), cfg.batch_size)],
                   desc="activation stats", disable=not progress, dynamic_ncols=True)
    hess = collect_act_stats(model, batches, hessian=True, ranges=ranges)
    tensors = {}
    for key, h in hess.items():
        tensors[f"{key}.hessian"] = h.contiguous()
        tensors[f"{key}.act_sq_mean"] = torch.diagonal(h, dim1=-2, dim2=-1).contiguous()
    held_out = windows(data, cfg.sens_samples, cfg.seq_len, cfg.seed + 1)
    base, sens = sensitivity(model, held_out, cfg, progress)
    summary = {"n_samples": cfg.n_samples, "tokens": cfg.n_samples * cfg.seq_len,
               "sens_tokens": cfg.sens_samples * (cfg.seq_len - 1), "baseline_loss": round(base, 5),
               "sensitivity": sens,
               "act_ranges": {k: {"absmax": round(a, 4), "p999": round(p, 4)} for k, (a, p) in sorted(ranges.items())}}
    return tensors, summary


def save_stats(path, tensors: dict, summary: dict) -> None:
    meta = {"format": STATS_FORMAT, "version": "1", "summary": json.dumps(summary)}
    save_tensors(path, tensors, meta)


def load_stats(path, kind: str = "act_sq_mean") -> tuple[dict, dict]:
    """({weight key: statistic}, summary); kind is 'act_sq_mean' or 'hessian'."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: calibration statistics not found (run `dvc repro calibrate`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATS_FORMAT:
                raise CheckpointError(f"{path}: not a calibration statistics file")
            suffix = f".{kind}"
            stats = {k[: -len(suffix)]: f.get_tensor(k) for k in f.keys() if k.endswith(suffix)}
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable calibration statistics ({e})") from None
    return stats, json.loads(meta.get("summary", "{}"))


def plot_sensitivity(summary: dict, png_path, csv_path) -> None:
    plt = pyplot()
    sens = summary["sensitivity"]
    names = list(sens)
    bits = sorted({b for v in sens.values() for b in v}, key=int)
    rows = ["tensor," + ",".join(f"bits{b}" for b in bits)]
    rows += [f"{n}," + ",".join(f"{sens[n][b]:.6g}" for b in bits) for n in names]
    write_text(csv_path, "\n".join(rows) + "\n")
    fig, ax = plt.subplots(figsize=(10, max(4, 0.28 * len(names))))
    y = range(len(names))
    hgt = 0.8 / len(bits)
    for j, b in enumerate(bits):
        ax.barh([i + j * hgt for i in y], [max(sens[n][b], 1e-6) for n in names], height=hgt, label=f"{b}-bit")
    ax.set_yticks([i + 0.4 - hgt / 2 for i in y], names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("calibration loss increase (nats/token), this tensor alone quantized (RTN)")
    ax.set_title("Per-tensor quantization sensitivity")
    ax.legend()
    fig.tight_layout()
    save_png(fig, png_path)

"""What every post-training stage starts from, loaded in one place: the evaluator, the FP32
teacher and its checkpoint (tokenizer id), the FP32 metrics (for deltas and compression) and,
on request, the training token stream (what distillation trains on) and the dev token stream (what
every calibration, importance, budget and selection decision reads; never trained on)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from iteralite.data.tokenizer import load_tokens
from iteralite.io.checkpoint import Checkpoint, load_model
from iteralite.io.params import load_section
from iteralite.pipeline import paths
from iteralite.train.evaluate import EvalConfig, Evaluator


@dataclass
class Baseline:
    evaluator: Evaluator
    model: torch.nn.Module  # the FP32 model (eval mode)
    ckpt: Checkpoint
    metrics: dict  # metrics/train.json
    train_tokens: torch.Tensor | None = None  # int64 (n,)
    dev_tokens: torch.Tensor | None = None  # int64 (n,)


def load_baseline(train_tokens: bool = True, *, fp32=paths.FP32_CKPT, train_metrics=paths.TRAIN_METRICS,
                  tok_dir=paths.TOKENIZER_DIR, params=paths.PARAMS) -> Baseline:
    """The baseline from the pipeline's files (paths default to `pipeline.paths`)."""
    evaluator = Evaluator(load_section(EvalConfig, "eval", params), tok_dir)
    model, ckpt = load_model(fp32)
    with open(train_metrics) as f:
        metrics = json.load(f)
    train = dev = None
    if train_tokens:
        train = torch.from_numpy(load_tokens(f"{tok_dir}/train.npy").astype("int64"))
        dev = torch.from_numpy(load_tokens(f"{tok_dir}/dev.npy").astype("int64"))
    return Baseline(evaluator, model, ckpt, metrics, train, dev)

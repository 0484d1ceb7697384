"""What every post-training stage starts from, loaded in one place: the evaluator, the FP32
teacher and its checkpoint (tokenizer id), the FP32 metrics (for deltas and compression) and,
on request, the training token stream (for distillation and calibration)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from iteralite.io.checkpoint import Checkpoint, load_model
from iteralite.train.evaluate import EvalConfig, Evaluator
from iteralite.io.params import load_section
from iteralite.data.tokenizer import load_tokens

FP32 = "checkpoints/fp32.safetensors"


@dataclass
class Baseline:
    evaluator: Evaluator
    model: torch.nn.Module  # the FP32 model (eval mode)
    ckpt: Checkpoint
    metrics: dict  # metrics/train.json
    train_tokens: torch.Tensor | None = None  # int64 (n,)


def load_baseline(train_tokens: bool = True) -> Baseline:
    evaluator = Evaluator(load_section(EvalConfig, "eval"))
    model, ckpt = load_model(FP32)
    with open("metrics/train.json") as f:
        metrics = json.load(f)
    tokens = torch.from_numpy(load_tokens("data/tokenizer/train.npy").astype("int64")) if train_tokens else None
    return Baseline(evaluator, model, ckpt, metrics, tokens)

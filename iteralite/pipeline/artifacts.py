"""Save, reload, score: what every model-producing stage does with its artifact, in one place.
The score is always of the file on disk (what a user loads), never of the in-memory model."""
from __future__ import annotations

from iteralite.io.checkpoint import load_model, save_checkpoint
from iteralite.pipeline.baseline import Baseline
from iteralite.train.evaluate import artifact_metrics


def publish(path: str, model, base: Baseline, *, kind: str, quant: dict | None, meta: dict):
    """Write `model` to `path` (atomically, with the FP32 tokenizer's id), load it back and score it
    against the baseline: (the loaded model, its artifact metrics)."""
    save_checkpoint(path, model, kind=kind, tokenizer_sha256=base.ckpt.tokenizer_sha256, quant=quant, meta=meta)
    loaded, _ = load_model(path)
    return loaded, artifact_metrics(loaded, path, base.metrics, base.evaluator(loaded))

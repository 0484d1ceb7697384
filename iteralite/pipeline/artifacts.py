"""Save, reload, score: what every model-producing stage does with its artifact, in one place.
The score is always of the file on disk (what a user loads), never of the in-memory model.

Artifacts are byte-identical for identical inputs: facts of one run (timings, thread count, the
step a run resumed from) go to metrics only, and `artifact_meta` drops them from a header's meta.
"""
from __future__ import annotations

from iteralite.io.checkpoint import load_model, save_checkpoint
from iteralite.pipeline.baseline import Baseline
from iteralite.train.evaluate import artifact_metrics
from iteralite.train.loop import check_finite_model

RUN_FACTS = frozenset({"seconds", "train_seconds", "train_tokens_per_s", "threads", "resumed_from_step",
                       "compile_seconds"})


def artifact_meta(meta: dict) -> dict:
    """`meta` without the facts of one run (at any depth): what may go into an artifact's header."""
    return {k: artifact_meta(v) if isinstance(v, dict) else v for k, v in meta.items() if k not in RUN_FACTS}


def publish(path: str, model, base: Baseline, *, kind: str, quant: dict | None, meta: dict):
    """Write `model` to `path` (atomically, with the FP32 tokenizer's id), load it back and score it
    against the baseline: (the loaded model, its artifact metrics)."""
    check_finite_model(model, kind)
    save_checkpoint(path, model, kind=kind, tokenizer_sha256=base.ckpt.tokenizer_sha256, quant=quant,
                    meta=artifact_meta(meta))
    loaded, _ = load_model(path)
    return loaded, artifact_metrics(loaded, path, base.metrics, base.evaluator(loaded))

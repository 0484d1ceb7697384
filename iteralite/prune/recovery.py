"""Iterative structured pruning with recovery: the prune stage's logic.

From a quantized (QAT) artifact: dequantize to float, then for each cumulative ratio of the
schedule (e.g. 0.1, 0.2, 0.3, 0.4) score units (Taylor or magnitude on calibration windows of the
dev split, which also feed routing statistics and layer sensitivity), remove them physically
(`apply.prune`), and recover with a short fake-quantized distillation from the FP32 teacher on the
training split, so the model stays fit for 4-bit export. The result is exported to the same
packed 4-bit format as QAT.
"""
from __future__ import annotations

import dataclasses

import torch

from iteralite.prune.apply import prune
from iteralite.prune.config import PruneConfig, iterative_schedule
from iteralite.prune.counting import layer_shapes, prunable_params
from iteralite.prune.importance import importance_scores, routing_stats
from iteralite.prune.sensitivity import measure_sensitivity
from iteralite.train.evaluate import windows
from iteralite.quant.qat import QATConfig, attach_fake_quant, rtn_spec_for, strip_fake_quant
from iteralite.train.distill import distill_train
from iteralite.train.live import log_summary
from iteralite.quant.spec import QuantSpec
from iteralite.quant.swap import dequantize_model


def calibration_batches(data: torch.Tensor, cfg: PruneConfig, seq_len: int = 256, batch_size: int = 8,
                        seed: int = 23) -> list[torch.Tensor]:
    wins = windows(data, cfg.calib_batches * batch_size, seq_len + 1, seed)
    return [wins[i:i + batch_size] for i in range(0, len(wins), batch_size)]


def prune_with_recovery(quantized_model, teacher, data: torch.Tensor, ratio: float, cfg: PruneConfig,
                        spec: QuantSpec, recovery: QATConfig, progress: bool = True, *, dev: torch.Tensor,
                        live=None):
    """-> (pruned float model with its cfg updated, final prune report, per-step history).
    `data`: the training tokens (recovery distils on them); `dev`: the dev tokens (every decision:
    importance, routing statistics, layer sensitivity). `live`: the stage's dvclive logger or None;
    the recoveries log on one step counter, `round` = the pruning step (0-based)."""
    model = dequantize_model(quantized_model)
    batches = calibration_batches(dev, cfg, seq_len=recovery.seq_len)
    base, shapes = prunable_params(model), layer_shapes(model)
    sens = None
    if cfg.allocation == "sensitivity":
        scores = importance_scores(model, cfg.importance, batches=batches)
        sens = measure_sensitivity(model, batches, scores, cfg.probe_ratio, cfg.channel_multiple)
    history, report, logged = [], None, 0
    for k, r in enumerate(iterative_schedule(ratio, cfg.steps)):
        routing = routing_stats(model, batches) if cfg.expert_removal else None
        report = prune(model, r, cfg.importance, batches=batches, routing=routing, base_prunable=base,
                       base_shapes=shapes, layer_sensitivity=sens, **cfg.plan_kwargs())
        step = {"target": r, "removed_frac": round(report["prunable_params_removed_frac"], 5),
                "params": report["params_after"]}
        if cfg.recovery_steps:
            attach_fake_quant(model, rtn_spec_for(spec, tuple(recovery.keep_float)))
            rcfg = dataclasses.replace(recovery, steps=cfg.recovery_steps, seed=recovery.seed + k,
                                       warmup_steps=min(recovery.warmup_steps, cfg.recovery_steps - 1))
            stats = distill_train(model, teacher, data, rcfg, progress, desc=f"recover {r:g}", live=live,
                                  step_offset=logged, round_index=k)
            logged += rcfg.steps
            strip_fake_quant(model)
            step["recovery_ce"] = stats["final_train_ce"]
        history.append(step)
    if sens is not None:
        report["layer_sensitivity"] = sens
    if cfg.recovery_steps:
        log_summary(live, {"final_train_ce": history[-1]["recovery_ce"]})
    return model, report, history

"""The losses every training and scoring loop uses: next-token cross-entropy and distillation.

One definition serves training (`loop`), distillation (`distill`), pruning importance
(`prune.importance`) and calibration probes (`quant.calibrate`), so a change to how the loss is
computed changes it everywhere at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_ce(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (..., V) against integer targets (...)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction=reduction)


def next_token_loss(model, batch: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, MoE auxiliary loss) of predicting batch[:, 1:] from batch[:, :-1]; batch (b, l+1)."""
    logits, aux = model(batch[:, :-1])
    return token_ce(logits, batch[:, 1:], reduction), aux


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 weight: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * T^2 * KL(teacher || student) at temperature T + (1 - weight) * CE, CE)."""
    t = temperature
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V)
    kl = F.kl_div(F.log_softmax(s / t, -1), F.log_softmax(teacher_logits.reshape(-1, V) / t, -1),
                  log_target=True, reduction="batchmean") * (t * t)
    ce = token_ce(s, targets)
    return weight * kl + (1 - weight) * ce, ce

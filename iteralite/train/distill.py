"""Distillation training: a student (fake-quantized, pruned or plain) towards a teacher's logits on
random windows of the training stream. The loop of the qat, finetune, prune-recovery, student and
mixed-precision stages. It stops at the first non-finite loss or gradient norm (`DivergedError`).

It runs in one process (the distillation stages are not data-parallel). Step metrics go to the
stage's dvclive logger when one is given (`train.live`); a stage that distils several times (prune's
recovery after each pruning step, mixed precision's fine-tunes) passes the same logger to each run
with `step_offset` = the steps logged before, so its steps count on, and `round_index` = which run
it is (logged as `round`).
"""
from __future__ import annotations

import hashlib
import time

import torch
from torch.nn.utils import parametrize
from tqdm import tqdm

from iteralite.train.live import Throughput, log_point, log_summary, should_log
from iteralite.train.loop import check_finite, check_finite_model, check_stream, get_batch, lr_at, set_threads
from iteralite.train.losses import distill_loss


class CachedTeacher(torch.nn.Module):
    """A teacher that remembers, per input batch, the normed residual its head reads (`features`),
    and recomputes only the head on a batch it has seen: the same logits bit for bit (the head is
    the last op of the forward, run on the same tensor), for a fraction of the cost. For a stage
    that distils several students on the same batches (mixed precision's fine-tunes: one seed, one
    schedule). Batches are keyed by their token ids' SHA-256, so a new batch is never served an old
    one's logits. Memory: batch x seq_len x d_model floats per batch seen (the headline's 250
    steps of 16 x 256 at d_model 128: 0.5 GB)."""

    def __init__(self, teacher: torch.nn.Module):
        super().__init__()
        self.teacher = teacher
        self._cache: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = 0

    @torch.no_grad()
    def forward(self, idx):
        key = hashlib.sha256(idx.detach().cpu().contiguous().numpy().tobytes()).digest() + repr(tuple(idx.shape)).encode()
        got = self._cache.get(key)
        if got is None:
            h, aux, _ = self.teacher.features(idx)
            got = self._cache[key] = (h, aux)
        else:
            self.hits += 1
        return self.teacher.head(got[0]), got[1]


def distill_train(student: torch.nn.Module, teacher: torch.nn.Module, data: torch.Tensor, cfg,
                  progress: bool = True, desc: str = "qat", *, live=None, step_offset: int = 0,
                  round_index: int | None = None) -> dict:
    """Train `student` towards `teacher` on random windows of `data`. cfg: a QATConfig (seed,
    steps, batch_size, seq_len, lr schedule, grad_clip, distill_weight, temperature, aux_loss_coef,
    threads). live: a dvclive logger or None; its steps are step_offset + steps done (1-based), and
    `round_index`, when given, is logged as `round` with every point (and the final losses are left
    out of the summary: the stage knows which run is final). Returns the run's stats; the last step
    logged is step_offset + cfg.steps."""
    set_threads(cfg.threads)
    check_stream(data, cfg.seq_len, desc, "seq_len")
    torch.manual_seed(cfg.seed)
    teacher.eval()
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0 = time.perf_counter()
    ema = loss_ema = None
    speed = Throughput(0, cfg.batch_size * cfg.seq_len)
    bar = tqdm(range(cfg.steps), disable=not progress, desc=desc, dynamic_ncols=True)
    for step in bar:
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = get_batch(data, cfg.batch_size, cfg.seq_len, cfg.seed, step)
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            t_logits = teacher(x)[0]
        with parametrize.cached():
            s_logits, aux = student(x)
            loss, ce = distill_loss(s_logits, t_logits, y, cfg.distill_weight, cfg.temperature)
            objective = loss.item()  # the distillation loss without the MoE balance term (logged)
            loss = loss + cfg.aux_loss_coef * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        check_finite(desc, step, cfg.steps, loss.item(), norm.item(), lr)
        opt.step()
        ema = ce.item() if ema is None else 0.95 * ema + 0.05 * ce.item()
        loss_ema = objective if loss_ema is None else 0.95 * loss_ema + 0.05 * objective
        bar.set_postfix(ce=f"{ema:.3f}")
        done = step + 1
        if live is not None and should_log(done, cfg.steps):
            log_point(live, step_offset + done, {"train_loss": ema, "distill_loss": loss_ema, "lr": lr,
                                                 "tokens_per_s": speed.since_last(done), "round": round_index})
    check_finite_model(student, desc)
    student.eval()
    stats = {"steps": cfg.steps, "seconds": round(time.perf_counter() - t0, 1), "final_train_ce": round(ema, 5)}
    if round_index is None:  # a stage of several runs summarizes them itself
        log_summary(live, {"final_train_ce": stats["final_train_ce"], "final_distill_loss": round(loss_ema, 5)})
    return stats

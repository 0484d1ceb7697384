"""Distillation training: a student (fake-quantized, pruned or plain) towards a teacher's logits on
random windows of the training stream. The loop of the qat, finetune, prune-recovery and
mixed-precision stages. It stops at the first non-finite loss or gradient norm (`DivergedError`)."""
from __future__ import annotations

import time

import torch
from torch.nn.utils import parametrize
from tqdm import tqdm

from iteralite.train.loop import check_finite, check_finite_model, check_stream, get_batch, lr_at, set_threads
from iteralite.train.losses import distill_loss


def distill_train(student: torch.nn.Module, teacher: torch.nn.Module, data: torch.Tensor, cfg,
                  progress: bool = True, desc: str = "qat") -> dict:
    """Train `student` towards `teacher` on random windows of `data`. cfg: a QATConfig (seed,
    steps, batch_size, seq_len, lr schedule, grad_clip, distill_weight, temperature, aux_loss_coef,
    threads)."""
    set_threads(cfg.threads)
    check_stream(data, cfg.seq_len, desc, "seq_len")
    torch.manual_seed(cfg.seed)
    teacher.eval()
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0 = time.perf_counter()
    ema = None
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
            loss = loss + cfg.aux_loss_coef * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        check_finite(desc, step, cfg.steps, loss.item(), norm.item(), lr)
        opt.step()
        ema = ce.item() if ema is None else 0.95 * ema + 0.05 * ce.item()
        bar.set_postfix(ce=f"{ema:.3f}")
    check_finite_model(student, desc)
    student.eval()
    return {"steps": cfg.steps, "seconds": round(time.perf_counter() - t0, 1), "final_train_ce": round(ema, 5)}

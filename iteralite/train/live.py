"""Step metrics of the training loops through dvclive: one `Live` per stage, made by the stage
script (on rank 0 only) and handed to the loops, which log into it or skip logging when given None.

What a stage's folder (`paths.live_dir(stage)`) holds, and nothing else:
    metrics.json                 the summary: the last value of every step metric, the last step,
                                 and the final numbers the loop or the stage adds (`log_summary`)
    plots/metrics/<name>.tsv     one file per step metric, columns `step` and the metric's last
                                 name part (`train/ce` -> plots/metrics/train/ce.tsv, column `ce`)

Step metrics (names as logged):
    train/ce            training cross-entropy, an EMA (0.95) of the per-step values
    train/distill_loss  distillation objective w * T^2 * KL + (1 - w) * CE, same EMA (distillation)
    val/loss            periodic validation loss (the train stage)
    dev/loss            dev-split loss where a stage measures one (student, mixed-precision fine-tunes)
    lr                  learning rate of the step
    tokens_per_s        training tokens per second since the previous logged step (all processes)
    round               which of the stage's distillation runs the step belongs to (prune, mixed)

The logger is built with every side channel off: no dvc.yaml (DVC declares the outputs), no
report, no experiment saved, no system monitoring, no timestamps. It posts to DVC Studio only if
a Studio token is configured (dvclive's own rule); tests set `DVC_STUDIO_OFFLINE`. Note that
`Live()` looks for a DVC repository from the current directory (and, inside a Git repository
without one, runs `dvc init` there): run it from the project root or from a plain folder.
"""
from __future__ import annotations

import math
import numbers
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# A curve point's keys (the resume file stores points under these) -> the metric names logged.
POINT_METRICS = {"train_loss": "train/ce", "distill_loss": "train/distill_loss", "val_loss": "val/loss",
                 "dev_loss": "dev/loss", "lr": "lr", "tokens_per_s": "tokens_per_s", "round": "round"}
LOG_EVERY = 10  # steps between logged points (plus each eval step and the last step)


def make_live(directory: str | Path):
    """A dvclive logger writing to `directory` (its previous metrics and plots are removed)."""
    from dvclive import Live

    return Live(dir=str(directory), resume=False, report=None, save_dvc_exp=False, dvcyaml=None,
                cache_images=False, monitor_system=False)


@contextmanager
def stage_live(directory: str | Path, enabled: bool = True) -> Iterator:
    """`with stage_live(paths.live_dir("qat")) as live:` -> a Live ended (summary written) on exit,
    or None when not `enabled` (the processes other than rank 0)."""
    if not enabled:
        yield None
        return
    live = make_live(directory)
    try:
        yield live
    finally:
        live.end()


def log_point(live, step: int, point: dict) -> None:
    """Log one point at `step`: every key of POINT_METRICS present and not None, then close the
    step. The same call replays stored points after a resume, so the history is complete."""
    if live is None:
        return
    live.step = step
    for key, name in POINT_METRICS.items():
        value = point.get(key)
        if value is not None:
            live.log_metric(name, value)
    live.next_step()


def log_summary(live, values: dict) -> None:
    """Add the numbers of `values` (finite ints and floats; other values are skipped) to the
    summary, which metrics.json receives at the next step or at `end()`. (Writing it now would
    record the step after the last one: `next_step` has already counted on.)"""
    if live is None:
        return
    for key, value in values.items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            live.summary[key] = value


class Throughput:
    """Training tokens per second between logged points (the `tokens_per_s` step metric)."""

    def __init__(self, step: int, tokens_per_step: int):
        self.step, self.time, self.tokens_per_step = step, time.perf_counter(), tokens_per_step

    def since_last(self, step: int) -> float:
        now = time.perf_counter()
        tps = (step - self.step) * self.tokens_per_step / max(1e-9, now - self.time)
        self.step, self.time = step, now
        return round(tps, 1)


def should_log(done: int, steps: int) -> bool:
    """Every LOG_EVERY steps and the last one (`done`: steps completed)."""
    return done % LOG_EVERY == 0 or done == steps

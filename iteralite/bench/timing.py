"""Speed measurements for every variant the benchmark stage compares, and where the time goes.

- Speed (`decode_tok_s`, `prefill_ms`, `measure_variant`): batch-1 decode throughput with the
  recurrent `step` and prefill latency with the parallel forward, each at 1 thread and at all
  cores, in the same process so variants share one machine state. Warm-up first (allocator,
  caches, lazy dequantization, compiled graphs), then the median of repeats: the median ignores
  the odd slow repeat when another job steals the core. Each call sets torch's thread count and
  restores it afterwards, so measurements never leak settings into each other.
- Where the time goes (`profile_hotspots`): torch.profiler over batch-1 decode steps.

This module takes a model, never a variant name: it imports neither the variant registry nor
the peers, so a stage that only times its own model stays light. A benchmark is not a test:
nothing here asserts a speed.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Iterator

import torch


def all_threads() -> int:
    """The cores this process may run on (what 'all threads' means in every measurement)."""
    return len(os.sched_getaffinity(0))


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch using `n` threads (None: leave as is), then restore the count."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def greedy_steps(model, n: int) -> None:
    """`n` batch-1 greedy `model.step` calls from a fresh state, starting from token 0; a model
    with its own greedy loop (the native runtime's, in C) runs that instead."""
    state = model.init_state(1)
    if hasattr(model, "greedy"):
        model.greedy(0, n, state)
        return
    tok = torch.zeros(1, dtype=torch.long)
    for _ in range(n):
        logits, state = model.step(tok, state)
        tok = logits.argmax(-1)


@torch.no_grad()
def decode_tok_s(model, n_tokens: int = 64, warmup: int = 8, repeats: int = 3, threads: int | None = None) -> float:
    """Tokens per second of `model.step` at batch 1, greedy (median of `repeats` timed runs of
    `n_tokens` steps each, after `warmup` untimed steps; every run starts from a fresh state)."""
    model.eval()
    with num_threads(threads):
        greedy_steps(model, warmup)
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            greedy_steps(model, n_tokens)
            rates.append(n_tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


@torch.no_grad()
def prefill_ms(model, seq_len: int = 128, repeats: int = 5, threads: int | None = None, warmup: int = 2) -> float:
    """Milliseconds of one batch-1 forward over `seq_len` tokens (median of `repeats`, after
    `warmup` untimed calls of the same shape)."""
    model.eval()
    idx = torch.zeros(1, seq_len, dtype=torch.long)
    with num_threads(threads):
        for _ in range(warmup):
            model(idx)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(idx)
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def measure_variant(name: str, model, n_tokens: int = 64, repeats: int = 3, prefill_len: int = 128) -> dict:
    """Speed keys of one variant: decode_tok_s_1thread, decode_tok_s_all_threads,
    prefill_ms_<prefill_len> (at all threads) and threads_all (that count).
    `name` only labels the progress line."""
    n_all = all_threads()
    out = {"decode_tok_s_1thread": decode_tok_s(model, n_tokens, repeats=repeats, threads=1),
           "decode_tok_s_all_threads": decode_tok_s(model, n_tokens, repeats=repeats, threads=n_all),
           f"prefill_ms_{prefill_len}": prefill_ms(model, prefill_len, repeats=max(repeats, 3), threads=n_all),
           "threads_all": n_all}
    print(f"[benchmark] {name}: {out}", flush=True)
    return out


@torch.no_grad()
def profile_hotspots(model, n_tokens: int = 32, top: int = 10, threads: int | None = 1, warmup: int = 8) -> list[dict]:
    """The `top` operators by self CPU time over `n_tokens` batch-1 decode steps (after warm-up),
    as rows {op, self_cpu_ms_total, self_cpu_us_per_token, calls, pct}, sorted by self time.
    `pct` is the share of all profiled self CPU time; totals are over the n_tokens steps."""
    from torch.profiler import ProfilerActivity, profile

    model.eval()
    with num_threads(threads):
        greedy_steps(model, warmup)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            greedy_steps(model, n_tokens)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_cpu_ms_total": round(e.self_cpu_time_total / 1000, 3),
             "self_cpu_us_per_token": round(e.self_cpu_time_total / n_tokens, 2), "calls": e.count,
             "pct": round(100 * e.self_cpu_time_total / total, 2)} for e in events[:top]]

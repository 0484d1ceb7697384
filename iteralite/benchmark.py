"""Speed measurements: batch-1 decode throughput with the recurrent step and prefill latency.
Medians over repeats after warm-up; every variant is measured in the same process."""
from __future__ import annotations

import statistics
import time

import torch


@torch.no_grad()
def decode_tok_s(model, n_tokens: int = 64, warmup: int = 8, repeats: int = 3, threads: int | None = None) -> float:
    """Tokens per second of `model.step` at batch 1 (median of `repeats` runs)."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model.eval()
        rates = []
        for _ in range(repeats):
            state = model.init_state(1)
            tok = torch.zeros(1, dtype=torch.long)
            for _ in range(warmup):
                logits, state = model.step(tok, state)
            t0 = time.perf_counter()
            for _ in range(n_tokens):
                logits, state = model.step(tok, state)
                tok = logits.argmax(-1)
            rates.append(n_tokens / (time.perf_counter() - t0))
        return statistics.median(rates)
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def prefill_ms(model, seq_len: int = 128, repeats: int = 5, threads: int | None = None) -> float:
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        idx = torch.zeros(1, seq_len, dtype=torch.long)
        model(idx)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(idx)
            times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)
    finally:
        torch.set_num_threads(old)

"""Speed and memory measurements for every variant the benchmark stage compares.

- Speed (`decode_tok_s`, `prefill_ms`, `measure_variant`): batch-1 decode throughput with the
  recurrent `step` and prefill latency with the parallel forward, each at 1 thread and at all
  cores, in the same process so variants share one machine state. Warm-up first (allocator,
  caches, lazy dequantization, compiled graphs), then the median of repeats: the median ignores
  the odd slow repeat when another job steals the core. Each call sets torch's thread count and
  restores it afterwards, so measurements never leak settings into each other.
- Memory (`peak_rss`): peak resident set (VmHWM) of loading one variant and decoding a few
  tokens, in a fresh Python process, because a high-water mark taken in-process would include
  every variant loaded before. The child loads the variant by the same recipe as the parent, by
  name, through `VARIANT_KINDS` (a dict of loaders other modules can add to, see
  `register_variant`), and also reports its RSS before loading (torch and iteralite imported),
  so a table can show the variant's own cost next to the interpreter's.
- Where the time goes (`profile_hotspots`): torch.profiler over batch-1 decode steps.

A benchmark is not a test: nothing here asserts a speed.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from iteralite.bench import peers


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


@torch.no_grad()
def decode_tok_s(model, n_tokens: int = 64, warmup: int = 8, repeats: int = 3, threads: int | None = None) -> float:
    """Tokens per second of `model.step` at batch 1, greedy (median of `repeats` timed runs of
    `n_tokens` steps each, after `warmup` untimed steps; every run starts from a fresh state)."""
    model.eval()
    with num_threads(threads):
        _greedy_steps(model, warmup)
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _greedy_steps(model, n_tokens)
            rates.append(n_tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


def _greedy_steps(model, n: int) -> None:
    state = model.init_state(1)
    tok = torch.zeros(1, dtype=torch.long)
    for _ in range(n):
        logits, state = model.step(tok, state)
        tok = logits.argmax(-1)


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
        _greedy_steps(model, warmup)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _greedy_steps(model, n_tokens)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_cpu_ms_total": round(e.self_cpu_time_total / 1000, 3),
             "self_cpu_us_per_token": round(e.self_cpu_time_total / n_tokens, 2), "calls": e.count,
             "pct": round(100 * e.self_cpu_time_total / total, 2)} for e in events[:top]]


# --------------------------------------------------------------------------- variants by name


def _artifact(path) -> nn.Module:
    from iteralite.io.checkpoint import load_model

    return load_model(path)[0]


def _peer(build: Callable[[nn.Module], nn.Module]) -> Callable[[str], nn.Module]:
    return lambda path: build(_artifact(path))


# kind -> loader(path) -> model in eval mode. "artifact" loads any checkpoint as saved; a peer
# kind builds from an FP32 checkpoint. Add kinds with register_variant (e.g. the fused model).
VARIANT_KINDS: dict[str, Callable[[str], nn.Module]] = {
    "artifact": _artifact,
    **{kind: _peer(build) for kind, build in peers.PEERS.items()},
}


def register_variant(kind: str, loader: Callable[[str], nn.Module]) -> None:
    """Add a variant kind. Call it at import time of the module defining `loader`: `peak_rss`'s
    child process imports that module (loader.__module__) to find the kind again."""
    if loader.__module__ == "__main__":
        raise ValueError(f"variant '{kind}': its loader must live in an importable module, not __main__")
    VARIANT_KINDS[kind] = loader


def load_variant(kind: str, path) -> nn.Module:
    """The model of variant `kind` loaded from checkpoint `path`."""
    if kind not in VARIANT_KINDS:
        raise KeyError(f"unknown variant kind '{kind}'; known: {', '.join(sorted(VARIANT_KINDS))}")
    return VARIANT_KINDS[kind](str(path)).eval()


# --------------------------------------------------------------------------- memory


def _maxrss_mb() -> float:
    """This process's peak RSS in MiB: VmHWM from /proc (Linux), not getrusage's ru_maxrss,
    which a child inherits from its parent's peak at fork and keeps across exec, so a probe
    spawned by a big benchmark process would report the parent's memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS needs Linux")


def rss_probe(kind: str, path: str, n_tokens: int) -> dict:
    """Run inside the child process: RSS high-water mark before and after loading + decoding."""
    baseline = _maxrss_mb()
    model = load_variant(kind, path)
    with torch.no_grad():
        _greedy_steps(model, n_tokens)
    return {"baseline_rss_mb": baseline, "peak_rss_mb": _maxrss_mb()}


_CHILD = ("import importlib, json, sys\n"
          "importlib.import_module(sys.argv[1])\n"
          "from iteralite.bench.benchmark import rss_probe\n"
          "print('RSS ' + json.dumps(rss_probe(sys.argv[2], sys.argv[3], int(sys.argv[4]))))\n")


def peak_rss(kind: str, path, n_tokens: int = 32, timeout: float = 900) -> dict:
    """Peak resident memory (MiB) of loading variant `kind` from `path` and decoding `n_tokens`
    at batch 1, in a fresh interpreter. Returns peak_rss_mb, baseline_rss_mb (that interpreter
    with torch and iteralite imported, before loading) and peak_minus_baseline_mb.
    A peer's peak includes the FP32 model it is built from: that is how a peer is obtained."""
    if kind not in VARIANT_KINDS:
        raise KeyError(f"unknown variant kind '{kind}'; known: {', '.join(sorted(VARIANT_KINDS))}")
    module = VARIANT_KINDS[kind].__module__
    args = [sys.executable, "-c", _CHILD, module, kind, str(Path(path).resolve()), str(n_tokens)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RSS ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe of '{kind}' failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(lines[-1][4:])
    out["peak_minus_baseline_mb"] = out["peak_rss_mb"] - out["baseline_rss_mb"]
    return {k: round(v, 1) for k, v in out.items()}

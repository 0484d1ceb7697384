"""Peak memory of one variant, measured in a fresh process.

`peak_rss` reports the peak resident set (VmHWM) of loading one variant and decoding a few
tokens, in a fresh Python process, because a high-water mark taken in-process would include
every variant loaded before. The child loads the variant by the same recipe as the parent, by
kind name, through the registry in `variants`, and also reports its RSS before loading (torch,
iteralite and the kind's loader module imported), so a table can show the variant's own cost
next to the interpreter's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from iteralite.bench import variants
from iteralite.bench.timing import greedy_steps
from torch import nn


def state_bytes(model: nn.Module) -> int:
    """In-memory bytes of every tensor that holds the model's weights: parameters, buffers and
    bitsandbytes quant states (absmax, code book), each storage counted once. Not a file size."""
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        tensors += _quant_state_tensors(getattr(getattr(m, "weight", None), "quant_state", None))
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values())


def _quant_state_tensors(qs) -> list[torch.Tensor]:
    if qs is None:
        return []
    own = [v for v in vars(qs).values() if isinstance(v, torch.Tensor)]
    return own + _quant_state_tensors(getattr(qs, "state2", None))


def _maxrss_mb() -> float:
    """This process's peak RSS in MiB: VmHWM from /proc (Linux), not getrusage's ru_maxrss,
    which a child inherits from its parent's peak at fork and keeps across exec, so a probe
    spawned by a big benchmark process would report the parent's memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS needs Linux")


def rss_probe(kind: str, path: str, n_tokens: int) -> dict:
    """Run inside the child process: RSS high-water mark before and after loading + decoding.
    The kind's loader is imported before the baseline, so the baseline is the interpreter's."""
    variants.resolve(variants.variant_kind(kind).loader)
    baseline = _maxrss_mb()
    model = variants.load_variant(kind, path)
    with torch.no_grad():
        greedy_steps(model, n_tokens)
    return {"baseline_rss_mb": baseline, "peak_rss_mb": _maxrss_mb()}


_CHILD = ("import json, sys\n"
          "from iteralite.bench.memory import rss_probe\n"
          "print('RSS ' + json.dumps(rss_probe(sys.argv[1], sys.argv[2], int(sys.argv[3]))))\n")


def peak_rss(kind: str, path, n_tokens: int = 32, timeout: float = 900) -> dict:
    """Peak resident memory (MiB) of loading variant `kind` from `path` and decoding `n_tokens`
    at batch 1, in a fresh interpreter. Returns peak_rss_mb, baseline_rss_mb (that interpreter
    with torch and iteralite imported, before loading) and peak_minus_baseline_mb.
    A peer's peak includes the FP32 model it is built from: that is how a peer is obtained."""
    variants.variant_kind(kind)  # an unknown kind fails here, not in the child
    # the child imports this very package (with its built native library), not a copy of the
    # sources in the working folder: `-P` keeps the folder off sys.path (a queued DVC experiment
    # runs in a temporary checkout without build outputs), PYTHONPATH names the package's root
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    args = [sys.executable, "-P", "-c", _CHILD, kind, str(Path(path).resolve()), str(n_tokens)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RSS ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe of '{kind}' failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(lines[-1][4:])
    out["peak_minus_baseline_mb"] = out["peak_rss_mb"] - out["baseline_rss_mb"]
    return {k: round(v, 1) for k, v in out.items()}

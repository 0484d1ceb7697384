"""Decode loops, like for like: every runtime row of the benchmark is timed twice.

- The step loop (`step_loop`): the same per-token Python driver for every runtime, `logits, state =
  model.step(tok, state); tok = logits.argmax(-1)`, from the same prompt (prefilled by the same
  driver, untimed) for the same number of tokens. It measures each runtime's step plus the same
  Python overhead per token, so step loops compare with step loops.
- The best loop: the fastest end-to-end greedy loop the runtime has (`BEST_LOOPS`): the native
  runtime's greedy loop in C (one call for all tokens), ONNX Runtime's session called on numpy
  arrays with no torch in the loop; for a kind with no loop of its own (eager, fused, the peers)
  the step loop is its best loop and the one measurement fills both columns. Best loops compare
  with best loops; a ratio never mixes the two (`speedups`).

What still differs between rows is the math each runtime does, not the loop: see the report.
Greedy agreement (`agreement`) compares a runtime's free-running greedy ids with those of the eager
model of the same artifact, position by position, from the same prompt.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from iteralite.bench.timing import all_threads, num_threads, prefill_ms
from iteralite.bench.variants import resolve


@dataclass(frozen=True)
class BestLoop:
    """A kind's best end-to-end greedy loop.

    label: what the loop is (recorded as the row's `best_loop`).
    run: "module:attr" of fn(model, token, n, state) -> the n greedy ids after `token` (state:
        the model's batch-1 state after the prompt before `token`); None: the step loop is the best loop.
    agree: compare the loop's greedy ids with the eager model of the row's artifact.
    counted_by: a programs.PROGRAMS name that runs the same C step: its instructions per token
        are counted for the row (callgrind).
    """
    label: str
    run: str | None = None
    agree: bool = False
    counted_by: str | None = None


STEP_LOOP = "the step loop"
BEST_LOOPS: dict[str, BestLoop] = {
    "native": BestLoop("C greedy loop (itl_greedy: one call generates every token)",
                       "iteralite.bench.loops:native_greedy", agree=True, counted_by="itl_run"),
    "native_exact": BestLoop("C greedy loop, float activations (itl_greedy in the exact mode)",
                             "iteralite.bench.loops:native_greedy", agree=True, counted_by="itl_run_exact"),
    "onnxruntime": BestLoop("ONNX Runtime session.run per token on numpy arrays (no torch in the loop)",
                            "iteralite.bench.loops:ort_greedy", agree=True),
    "fused": BestLoop(f"{STEP_LOOP}: the compiled fused step (AOTInductor) per token", agree=True),
    "artifact": BestLoop(f"{STEP_LOOP}: the eager PyTorch step per token"),
    "compiled": BestLoop(f"{STEP_LOOP}: the torch.compile'd step per token"),
}


def best_loop(kind: str) -> BestLoop:
    return BEST_LOOPS.get(kind, BestLoop(f"{STEP_LOOP}: the eager step per token (no faster loop for this kind)"))


@torch.no_grad()
def prefilled(model, prompt_ids: list[int]):
    """(last prompt id, batch-1 state after the prompt before it), by the step driver."""
    state = model.init_state(1)
    for t in prompt_ids[:-1]:
        _, state = model.step(torch.tensor([t]), state)
    return prompt_ids[-1], state


@torch.no_grad()
def step_loop(model, token: int, n: int, state) -> list[int]:
    """The same per-token Python driver for every runtime: n greedy `model.step` calls."""
    tok, out = torch.tensor([token]), []
    for _ in range(n):
        logits, state = model.step(tok, state)
        tok = logits.argmax(-1)
        out.append(tok)
    return [int(t) for t in out]


def native_greedy(model, token: int, n: int, state) -> list[int]:
    """The native runtime's greedy loop, in C."""
    return model.greedy(token, n, state)


def ort_greedy(model, token: int, n: int, state) -> list[int]:
    """ONNX Runtime's step session called directly on numpy arrays, argmax in numpy."""
    session = model._session()  # noqa: SLF001 (the session of the current thread count)
    names = [f"s{i}" for i in range(len(state[0]))]
    st, tok, out = list(state[0]), np.array([token], dtype=np.int64), []
    for _ in range(n):
        logits, *st = session.run(None, {"token": tok, **dict(zip(names, st))})
        t = int(logits[0].argmax())
        out.append(t)
        tok = np.array([t], dtype=np.int64)
    return out


def greedy_ids(model, kind: str, prompt_ids: list[int], n: int, best: bool = True) -> list[int]:
    """The n greedy ids after the prompt by the kind's best loop (or by the step loop)."""
    spec = best_loop(kind)
    run = resolve(spec.run) if best and spec.run else step_loop
    token, state = prefilled(model, prompt_ids)
    return run(model, token, n, state)


def tok_s(run, model, prompt_ids: list[int], n: int, repeats: int, threads: int, warmup: int = 8) -> float:
    """Median tokens/s of `run(model, token, n, state)` over `repeats` runs, each from a fresh
    prefilled state (the prefill untimed), after `warmup` untimed tokens."""
    with torch.no_grad(), num_threads(threads):
        token, state = prefilled(model, prompt_ids)
        run(model, token, warmup, state)
        rates = []
        for _ in range(repeats):
            token, state = prefilled(model, prompt_ids)
            t0 = time.perf_counter()
            run(model, token, n, state)
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def measure_loops(name: str, kind: str, model, prompt_ids: list[int], n_tokens: int, repeats: int,
                  prefill_len: int = 128) -> dict:
    """A runtime row's speed: the step loop and the kind's best loop at 1 thread and at all cores
    (`decode_tok_s_1thread` / `_all_threads` are the best loop's, the names earlier runs used),
    and prefill_ms_<prefill_len> (one forward, all cores)."""
    model.eval()
    n_all, spec = all_threads(), best_loop(kind)
    out = {"decode_tok_s_step_loop": tok_s(step_loop, model, prompt_ids, n_tokens, repeats, 1),
           "decode_tok_s_step_loop_all_threads": tok_s(step_loop, model, prompt_ids, n_tokens, repeats, n_all)}
    if spec.run:
        run = resolve(spec.run)
        best = (tok_s(run, model, prompt_ids, n_tokens, repeats, 1),
                tok_s(run, model, prompt_ids, n_tokens, repeats, n_all))
    else:
        best = out["decode_tok_s_step_loop"], out["decode_tok_s_step_loop_all_threads"]
    out.update({"decode_tok_s_best_loop": best[0], "best_loop": spec.label, "decode_tok_s_1thread": best[0],
                "decode_tok_s_all_threads": best[1], "decode_tokens": n_tokens, "prompt_tokens": len(prompt_ids),
                f"prefill_ms_{prefill_len}": prefill_ms(model, prefill_len, repeats=max(repeats, 3), threads=n_all),
                "threads_all": n_all})
    print(f"[benchmark] {name}: step loop {out['decode_tok_s_step_loop']:.0f} tok/s, best loop {best[0]:.0f} tok/s "
          f"({spec.label})", flush=True)
    return out


def agreement(ids: list[int], reference: list[int], against: str = "eager") -> dict:
    """Free-running greedy agreement with `against`: the share of the reference's positions where
    `ids` has the same id (a missing id counts as different), and the first position that
    differs (len(reference) if none). Both runs follow their own ids, so after one flip (a near
    tie) the two stories part and later positions rarely match: the first divergence says more."""
    n = len(reference)
    same = [i < len(ids) and ids[i] == r for i, r in enumerate(reference)]
    first = next((i for i, s in enumerate(same) if not s), n)
    return {f"greedy_agreement_with_{against}": round(sum(same) / n, 4) if n else None,
            f"greedy_first_divergence_from_{against}": first, "greedy_agreement_steps": n}


# ratio key -> (numerator column, denominator row, denominator column): only like for like
SPEEDUPS = {
    "decode_speedup_vs_fused": ("decode_tok_s_best_loop", "fused", "decode_tok_s_best_loop"),
    "decode_speedup_vs_fused_step_loop": ("decode_tok_s_step_loop", "fused", "decode_tok_s_step_loop"),
    "decode_speedup_vs_fp32_eager": ("decode_tok_s_best_loop", "fp32", "decode_tok_s_best_loop"),
    "decode_speedup_vs_fp32_eager_step_loop": ("decode_tok_s_step_loop", "fp32", "decode_tok_s_step_loop"),
    "decode_speedup_vs_fp32_eager_all_threads": ("decode_tok_s_all_threads", "fp32", "decode_tok_s_all_threads"),
}


def speedups(results: dict[str, dict]) -> None:
    """Add every SPEEDUPS ratio to every row that has the numerator (in place); best loop over
    best loop, step loop over step loop, never mixed. A row or base missing its column gets none."""
    for row in results.values():
        for key, (num, base_row, den) in SPEEDUPS.items():
            base = results.get(base_row, {}).get(den)
            if row.get(num) and base:
                row[key] = round(row[num] / base, 2)

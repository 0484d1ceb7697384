"""The native runtime's row of the benchmark: its quality measured here, on the same evaluation
as every stage, and against the very artifact it runs, dequantized (the `mixed` row): perplexity
and greedy agreement over `GREEDY_STEPS` steps."""
from __future__ import annotations

import os

import torch

from iteralite.bench.memory import state_bytes
from iteralite.bench.variants import load_artifact

GREEDY_STEPS = 1000


@torch.no_grad()
def greedy_agreement(native, reference, n: int = GREEDY_STEPS, start: int = 0) -> float:
    """Share of `n` greedy steps where `native`'s top-1 equals `reference`'s, both fed the
    reference's greedy tokens (so one disagreement does not derail the rest)."""
    rs, ns = reference.init_state(1), native.init_state(1)
    tok, same = torch.tensor([start]), 0
    for _ in range(n):
        ref_logits, rs = reference.step(tok, rs)
        nat_logits, ns = native.step(tok, ns)
        tok = ref_logits.argmax(-1)
        same += int(nat_logits.argmax(-1).item() == tok.item())
    return same / n


def score_native(model, path, evaluator, fp32: dict, results: dict) -> dict:
    """The native row's quality: val/WikiText-2 scored here; deltas against FP32 and against the
    same artifact dequantized (results["mixed"], scored by its stage); greedy top-1 agreement."""
    reference = load_artifact(path).eval()
    q = evaluator(model)
    size, mixed = os.path.getsize(path), results["mixed"]  # the plan lists mixed before native
    return {**q, "size_bytes": size, "size_kind": "file", "params": mixed["params"],
            "bits_per_weight": mixed["bits_per_weight"], "compression_vs_fp32": round(fp32["size_bytes"] / size, 3),
            "val_ppl_delta_pct": round(100 * (q["val_ppl"] / fp32["val_ppl"] - 1), 3),
            "val_ppl_delta_vs_dequantized_pct": round(100 * (q["val_ppl"] / mixed["val_ppl"] - 1), 3),
            "quality_from": "benchmark (the native step over the mixed artifact)",
            "packed_weight_bytes": state_bytes(reference), "isa": model.isa,
            "greedy_top1_agreement": round(greedy_agreement(model, reference), 4), "greedy_steps": GREEDY_STEPS}

"""The numbers people compare across experiments: each stage's headline metrics.

A stage writes its whole result to `metrics/<stage>.json` (the stage contract: per-layer tables,
allocations, profiles, timings; a plain DVC output) and the few numbers that decide between runs
to `metrics/headline/<stage>.json`, the file `dvc.yaml` declares under `metrics:`. So `dvc exp
show`, `dvc metrics diff` and the VS Code table list size, compression, quality and decode speed,
not ~500 columns of detail.

`HEADLINE` is a registry: a stage's metrics file name (without `.json` and a matrix suffix such as
`_0.1`) -> the keys kept, where "a.b" is a key inside a nested section. A stage absent from the
registry has no headline file.
"""
from __future__ import annotations

import re
from pathlib import Path

HEADLINE_DIR = "headline"

# size and quality of an artifact: every stage that writes a model
QUALITY = ("size_bytes", "compression_vs_fp32", "val_ppl", "val_bpb", "val_ppl_delta_pct", "wikitext2_ppl")
# decode speed (tokens/s on one thread) of the runtimes people choose between
SPEED_ROWS = ("fp32", "mixed", "fused", "native", "mixed_tiny", "native_tiny", "peer_onnxruntime", "peer_compiled")

HEADLINE: dict[str, tuple[str, ...]] = {
    "data": ("train_stories", "valid_stories"),
    "tokenizer": ("train_tokens", "train_bytes_per_token"),
    "train": ("params", "size_bytes", "val_ppl", "val_bpb", "wikitext2_ppl", "dev_loss"),
    "int4": QUALITY,
    "qat": QUALITY,
    "prune": QUALITY + ("prunable_params_removed_frac",),
    "finetune": QUALITY,
    "student": QUALITY + ("params",),
    "student_tiny": QUALITY + ("params",),
    "mixed_precision": QUALITY + ("params", "allocated_bits_per_weight", "entropy_coded"),
    "mixed_precision_tiny": QUALITY + ("params", "allocated_bits_per_weight", "entropy_coded"),
    "fuse": ("val_ppl", "decode_tok_s_1thread"),
    "benchmark": tuple(f"{row}.decode_tok_s_1thread" for row in SPEED_ROWS)
    + ("native.decode_speedup_vs_fused", "native.val_ppl", "native.val_ppl_delta_vs_dequantized_pct",
       "native_tiny.val_ppl", "native_tiny.val_ppl_delta_vs_dequantized_pct"),
}

_MATRIX_SUFFIX = re.compile(r"_[0-9.]+$")


def stage_of(metrics_path: str | Path) -> str:
    """metrics/prune_0.1.json -> 'prune'; metrics/train.json -> 'train'."""
    return _MATRIX_SUFFIX.sub("", Path(metrics_path).stem)


def headline_path(metrics_path: str | Path) -> Path:
    """metrics/<name>.json -> metrics/headline/<name>.json."""
    p = Path(metrics_path)
    return p.parent / HEADLINE_DIR / p.name


def _get(metrics: dict, dotted: str):
    value = metrics
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def select(stage: str, metrics: dict) -> dict | None:
    """The headline subset of a stage's metrics, nested as in the full file (keys the run did not
    produce are left out); None for a stage with no headline."""
    keys = HEADLINE.get(stage)
    if keys is None:
        return None
    out: dict = {}
    for dotted in keys:
        value = _get(metrics, dotted)
        if value is None or isinstance(value, (dict, list)):
            continue
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out

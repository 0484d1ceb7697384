"""Save, reload, score: what every model-producing stage does with its artifact, in one place.
The score is always of the file on disk (what a user loads), never of the in-memory model.

Artifacts are byte-identical for identical inputs: facts of one run (timings, thread count, the
step a run resumed from) go to metrics only, and `artifact_meta` drops them from a header's meta.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from iteralite.io.atomic import write_text
from iteralite.io.checkpoint import header_bytes, load_model, save_checkpoint
from iteralite.pipeline.baseline import Baseline
from iteralite.train.evaluate import artifact_metrics
from iteralite.train.loop import check_finite_model

RUN_FACTS = frozenset({"seconds", "train_seconds", "train_tokens_per_s", "threads", "resumed_from_step",
                       "compile_seconds"})


def artifact_meta(meta: dict) -> dict:
    """`meta` without the facts of one run (at any depth): what may go into an artifact's header."""
    return {k: artifact_meta(v) if isinstance(v, dict) else v for k, v in meta.items() if k not in RUN_FACTS}


def publish(path: str, model, base: Baseline, *, kind: str, quant: dict | None, meta: dict,
            layout: str = "default"):
    """Write `model` to `path` (atomically, with the FP32 tokenizer's id, in checkpoint `layout`:
    "compact" entropy-codes the integer codes), load it back and score it against the baseline:
    (the loaded model, its artifact metrics)."""
    check_finite_model(model, kind)
    save_checkpoint(path, model, kind=kind, tokenizer_sha256=base.ckpt.tokenizer_sha256, quant=quant,
                    meta=artifact_meta(meta), layout=layout)
    loaded, _ = load_model(path)
    return loaded, artifact_metrics(loaded, path, base.metrics, base.evaluator(loaded))


def coding_metrics(path: str, model, csv_path: str, **save_kw) -> dict:
    """What entropy coding did to the compact artifact at `path` (`model`: it, loaded): the same
    model's size in the default layout (packed codes, not coded: a real file, written to a
    temporary folder and removed), the header's share of the file, totals of the per-tensor coding
    report, and that report as a CSV (name, bits, symbols, raw_bytes, coded_bytes, entropy_bytes,
    stored) for `dvc plots`, and the context-model codecs' effect (`io.compact.codec_report`)."""
    from iteralite.io.compact import codec_report
    from iteralite.quant.coding import coding_report, report_totals

    with tempfile.TemporaryDirectory(dir=Path(path).parent) as d:
        uncoded = save_checkpoint(Path(d) / "uncoded.safetensors", model, layout="default", **save_kw)
    size, head = Path(path).stat().st_size, header_bytes(path)
    rows = coding_report(model)
    cols = ["name", "bits", "symbols", "raw_bytes", "coded_bytes", "entropy_bytes", "stored"]
    write_text(csv_path, "\n".join([",".join(cols)] + [",".join("" if r[c] is None else str(r[c]) for c in cols)
                                                     for r in rows]) + "\n")
    return {"entropy_coded": True, "size_bytes_uncoded": uncoded,
            "coding_saved_pct": round(100.0 * (1 - size / uncoded), 3),
            "header_bytes": head, "header_share": round(head / size, 5), "coding": report_totals(rows),
            # issue 24's coder options, measured on this artifact: blob bytes with only the
            # context-free codecs and with each context model; `write` keeps one per tensor only
            # where it is smaller, so "saved" is what each option bought here
            "coding_options": codec_report(model.state_dict(), model)}

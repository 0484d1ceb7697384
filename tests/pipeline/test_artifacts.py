import pytest

from iteralite.pipeline.artifacts import RUN_FACTS, artifact_meta


def test_artifact_meta_drops_the_facts_of_one_run_at_any_depth():
    meta = {"stage": "qat", "steps": 3, "seconds": 1.5, "threads": 2,
            "finetune": {"steps": 4, "seconds": 2.0, "final_train_ce": 1.2}, "train_tokens_per_s": 9.0}
    assert artifact_meta(meta) == {"stage": "qat", "steps": 3, "finetune": {"steps": 4, "final_train_ce": 1.2}}
    assert {"train_seconds", "train_tokens_per_s", "resumed_from_step"} <= RUN_FACTS


@pytest.mark.parametrize("key", sorted(RUN_FACTS))
def test_every_run_fact_is_dropped(key):
    assert artifact_meta({key: 1, "keep": 2}) == {"keep": 2}


def test_coding_metrics_of_a_compact_mixed_artifact(tmp_path):
    """Sizes are real files: the compact artifact, and the same model in the default (packed, uncoded)
    layout; the per-tensor report lands in a CSV whose stored bytes add up to the totals."""
    import csv

    from iteralite.io.checkpoint import load_model, save_checkpoint
    from iteralite.pipeline.artifacts import coding_metrics
    from tests.io.test_compact import build

    model, quant = build("int2-4")
    kw = dict(kind="mixed-test", tokenizer_sha256="ab" * 32, quant=quant, meta={"stage": "t"})
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, layout="compact", **kw)
    loaded, _ = load_model(path)
    m = coding_metrics(str(path), loaded, str(tmp_path / "coding.csv"), **kw)
    assert m["entropy_coded"] is True and m["size_bytes_uncoded"] == save_checkpoint(tmp_path / "d.st", model, **kw)
    assert m["size_bytes_uncoded"] > path.stat().st_size and 0 < m["header_share"] < 1
    assert list(tmp_path.glob("tmp*")) == []  # the uncoded copy is gone
    rows = list(csv.DictReader((tmp_path / "coding.csv").open()))
    assert len(rows) == m["coding"]["tensors"] > 0
    stored = sum(int(r["coded_bytes"]) if r["stored"] == "rans" else int(r["raw_bytes"]) for r in rows)
    assert stored == m["coding"]["stored_bytes"] <= m["coding"]["raw_bytes"]

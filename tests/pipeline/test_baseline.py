"""The FP32 baseline every post-training stage loads, and save-reload-score (`publish`)."""
from __future__ import annotations

import json

import torch

from iteralite.data.tokenizer import file_sha256
from iteralite.io.checkpoint import save_checkpoint
from iteralite.pipeline.artifacts import publish
from iteralite.pipeline.baseline import load_baseline
from iteralite.quant.config import quant_config
from iteralite.quant.spec import QuantSpec
from iteralite.quant.swap import make_spec_for, quantize
from iteralite.train.evaluate import EvalConfig, Evaluator


def _files(tmp_path, model, tok_dir):
    fp32 = tmp_path / "fp32.safetensors"
    size = save_checkpoint(fp32, model, kind="fp32", tokenizer_sha256=file_sha256(tok_dir / "tokenizer.json"))
    metrics = tmp_path / "train.json"
    ev = Evaluator(EvalConfig(seq_len=16, batch_size=4), tok_dir)(model)
    metrics.write_text(json.dumps({"size_bytes": size, **ev}))
    params = tmp_path / "params.yaml"
    params.write_text("eval:\n  seq_len: 16\n  batch_size: 4\n  max_tokens: 0\n")
    return fp32, metrics, params


def test_load_baseline_reads_every_part_from_the_given_paths(model, tok_dir, tmp_path):
    fp32, metrics, params = _files(tmp_path, model, tok_dir)
    base = load_baseline(fp32=fp32, train_metrics=metrics, tok_dir=tok_dir, params=params)
    idx = torch.randint(0, model.cfg.vocab_size, (1, 8))
    assert torch.equal(base.model(idx)[0], model(idx)[0]) and not base.model.training
    assert base.metrics == json.loads(metrics.read_text())
    assert base.evaluator.cfg.seq_len == 16 and base.train_tokens.dtype == torch.int64 and base.train_tokens.numel() > 100
    assert base.ckpt.tokenizer_sha256 == file_sha256(tok_dir / "tokenizer.json")
    assert load_baseline(False, fp32=fp32, train_metrics=metrics, tok_dir=tok_dir, params=params).train_tokens is None


def test_publish_scores_the_file_on_disk(model, tok_dir, tmp_path):
    fp32, metrics, params = _files(tmp_path, model, tok_dir)
    base = load_baseline(False, fp32=fp32, train_metrics=metrics, tok_dir=tok_dir, params=params)
    q = quantize(model, make_spec_for(QuantSpec(bits=4, group_size=8)))
    out = tmp_path / "q.safetensors"
    loaded, m = publish(str(out), q, base, kind="int4-test", quant=quant_config(q), meta={"stage": "test"})
    assert m["size_bytes"] == out.stat().st_size and m["compression_vs_fp32"] > 1
    assert m == {**m, **base.evaluator(loaded)}  # quality of what was loaded back
    assert abs(m["val_ppl_delta_pct"] - 100 * (m["val_ppl"] / base.metrics["val_ppl"] - 1)) < 1e-2

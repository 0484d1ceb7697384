"""The ONNX Runtime peer: the fused step and the fused full-sequence forward exported with
torch.onnx (dynamo) run on onnxruntime and compute what the fused eager model computes; the
row's perplexity is scored through onnxruntime, not copied from the mixed row."""
import copy

import pytest
import torch

from iteralite.bench import ort_peer
from iteralite.bench.variants import load_artifact
from iteralite.io.checkpoint import save_checkpoint
from iteralite.quant.config import mixed_config
from iteralite.quant.units import quantize_allocation, units
from iteralite.runtime.fused import FusedIteraLite
from iteralite.train.evaluate import EvalConfig, Evaluator

pytestmark = pytest.mark.early  # compiles or spawns for a minute or more: handed out early (tests/conftest.py)


@pytest.fixture(scope="module")
def fused_and_ort():
    from iteralite.core.model import IteraLite
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = IteraLite(tiny_config()).eval()
    alloc = {u: (2, 4, 16)[i % 3] for i, u in enumerate(units(model))}
    fused = FusedIteraLite.from_model(quantize_allocation(copy.deepcopy(model), alloc, 8))
    onnx_bytes = ort_peer.export_step(fused)
    return fused, ort_peer.OrtStep(fused, onnx_bytes), onnx_bytes


def test_onnxruntime_step_equals_the_fused_step(fused_and_ort):
    fused, ort, _ = fused_and_ort
    fs, os_ = fused.init_state(1), ort.init_state(1)
    for t in [1, 7, 299, 0, 42]:
        want, fs = fused.step(torch.tensor([t]), fs)
        got, os_ = ort.step(torch.tensor([t]), os_)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_onnxruntime_forward_is_the_step_loop(fused_and_ort):
    fused, ort, _ = fused_and_ort
    idx = torch.tensor([[3, 9, 27, 81]])
    torch.testing.assert_close(ort(idx)[0], fused(idx)[0], atol=1e-4, rtol=1e-4)


def test_the_export_uses_plain_matmuls(fused_and_ort):
    import onnx

    ops = {n.op_type for n in onnx.load_from_string(fused_and_ort[2]).graph.node}
    assert ops & {"Gemm", "MatMul"}, sorted(ops)


def test_the_sequence_graph_equals_the_fused_forward_at_any_batch(fused_and_ort):
    fused, ort, _ = fused_and_ort
    seq = ort_peer.OrtSequence(fused)
    idx = torch.randint(0, 300, (3, 13), generator=torch.Generator().manual_seed(1))  # 13: not a chunk multiple
    for rows in (idx, idx[:1]):
        torch.testing.assert_close(seq(rows)[0], fused(rows)[0], atol=1e-4, rtol=1e-4)
    assert ort_peer.step_vs_sequence(ort, seq, 13) < 1e-4


@pytest.fixture(scope="module")
def mixed_path(tmp_path_factory):
    from iteralite.core.model import IteraLite
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = IteraLite(tiny_config()).eval()
    alloc = {u: (2, 4, 16)[i % 3] for i, u in enumerate(units(model))}
    path = tmp_path_factory.mktemp("ort") / "mixed.safetensors"
    save_checkpoint(path, quantize_allocation(copy.deepcopy(model), alloc, 8), kind="mixed", tokenizer_sha256="t",
                    quant=mixed_config(alloc, 8, model))
    return path


def _score(path, evaluator):
    results = {"mixed": {"params": 1000, "val_ppl": 999.0, "quality_from": "m.json"}}  # the row must not copy it
    row = ort_peer.score_onnxruntime(ort_peer.load_onnxruntime(path), path, evaluator,
                                     {"size_bytes": 4000, "val_ppl": 100.0}, results)
    return row


def test_the_row_is_scored_through_onnxruntime(mixed_path, tok_dir, monkeypatch):
    evaluator = Evaluator(EvalConfig(seq_len=32, batch_size=5), tok_dir)
    want = evaluator(load_artifact(mixed_path).eval())  # the artifact in PyTorch, same windows
    row = _score(mixed_path, evaluator)
    for key in ("val_ppl", "val_bpb", "wikitext2_ppl"):
        assert row[key] == pytest.approx(want[key], rel=1e-4), key
    assert row["val_ppl_delta_vs_dequantized_pct"] == pytest.approx(100 * (want["val_ppl"] / 999.0 - 1), abs=0.01)
    assert row["val_ppl_delta_pct"] == pytest.approx(100 * (want["val_ppl"] / 100.0 - 1), abs=0.01)
    assert row["max_abs_logit_diff_sequence_vs_step"] < ort_peer.STEP_MATCH_ATOL
    assert row["quality_from"].startswith("benchmark") and row["eval_tokens"] == "all"

    def perturbed(path):  # the weights onnxruntime runs, changed: its perplexity must follow them
        m = load_artifact(path)
        with torch.no_grad():
            m.norm_f.weight.mul_(3.0)
        return m

    monkeypatch.setattr(ort_peer, "load_artifact", perturbed)
    moved = _score(mixed_path, evaluator)
    assert abs(moved["val_ppl"] / row["val_ppl"] - 1) > 0.01
    assert moved["max_abs_logit_diff_sequence_vs_step"] < ort_peer.STEP_MATCH_ATOL  # both graphs perturbed


def test_the_session_loop_gives_the_step_loops_ids(fused_and_ort):
    from iteralite.bench import loops

    fused, ort, _ = fused_and_ort
    best = loops.greedy_ids(ort, "onnxruntime", [4, 8], 12)
    assert best == loops.greedy_ids(ort, "onnxruntime", [4, 8], 12, best=False)
    assert best == loops.greedy_ids(fused, "fused", [4, 8], 12)

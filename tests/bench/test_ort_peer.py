"""The ONNX Runtime peer: the fused step exported with torch.onnx (dynamo) runs on onnxruntime
and computes what the fused eager step computes; its matmuls are plain Gemm/MatMul."""
import copy

import pytest
import torch

from iteralite.bench import ort_peer
from iteralite.quant.units import quantize_allocation, units
from iteralite.runtime.fused import FusedIteraLite


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

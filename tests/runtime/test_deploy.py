"""The deployable model: any artifact (here a mixed-precision one) fused, saved and reloaded."""
from __future__ import annotations

import copy

import pytest
import torch

from iteralite.bench.suite import BenchmarkConfig
from iteralite.io.checkpoint import load_model, save_checkpoint
from iteralite.runtime.deploy import FuseConfig, fuse, load_fused, save_fused
from iteralite.io.errors import ParamsError
from iteralite.train.generate import generate_ids
from iteralite.quant.config import mixed_config
from iteralite.quant.units import quantize_allocation, units
from iteralite.io.params import from_dict


@pytest.fixture
def mixed_path(model, tmp_path):
    alloc = {u: (1, 2, 3, 4, 8, 16)[i % 6] for i, u in enumerate(units(model))}  # 1: ternary
    q = quantize_allocation(copy.deepcopy(model), alloc, 8)
    path = tmp_path / "mixed.safetensors"
    save_checkpoint(path, q, kind="mixed", tokenizer_sha256="t", quant=mixed_config(alloc, 8, model))
    return path


def test_fused_mixed_model_decodes_exactly_like_the_unfused_one(mixed_path):
    unfused, _ = load_model(mixed_path)
    fused = fuse(unfused, backend="eager")
    prompt = [5, 17, 42]
    a = list(generate_ids(unfused, prompt, 30, temperature=0))
    b = list(generate_ids(fused, prompt, 30, temperature=0))
    assert a == b
    idx = torch.tensor([prompt * 4])
    torch.testing.assert_close(fused(idx)[0], unfused(idx)[0], atol=1e-4, rtol=1e-4)


def test_fused_artifact_keeps_the_packed_bytes_and_its_runtime(mixed_path, tmp_path):
    unfused, ckpt = load_model(mixed_path)
    out = tmp_path / "fused.safetensors"
    save_fused(out, unfused, ckpt, FuseConfig(backend="eager"), str(mixed_path))
    reloaded, ck2 = load_model(out)
    assert ck2.kind == "fused" and ck2.meta["runtime"]["backend"] == "eager" and ck2.quant == ckpt.quant
    a, b = unfused.state_dict(), reloaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fused = load_fused(out)
    idx = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(fused(idx)[0], unfused(idx)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls,section,raw,match", [
    (FuseConfig, "fuse", {"backend": "tvm"}, "must be one of aoti, inductor, eager"),
    (FuseConfig, "fuse", {"prefill_lens": [0]}, "entries must be >= 1"),
    (BenchmarkConfig, "benchmark", {"peers": ["onnx"]}, "unknown peers"),
    (BenchmarkConfig, "benchmark", {"peer_eval_tokens": -1}, "must be >= 0"),
])
def test_config_errors_name_the_key(cls, section, raw, match):
    with pytest.raises(ParamsError, match=match):
        from_dict(cls, raw, section)

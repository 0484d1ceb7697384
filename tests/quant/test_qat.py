import copy

import pytest
import torch

from iteralite.io.checkpoint import load_model, save_checkpoint
from iteralite.quant.qat import QATConfig, attach_fake_quant, export, qat, rtn_spec_for
from iteralite.quant.spec import QuantSpec
from iteralite.quant.config import quant_config


def test_fake_quant_forward_equals_exported_model(model, cfg):
    student = copy.deepcopy(model)
    chosen = attach_fake_quant(student, rtn_spec_for(QuantSpec(bits=4, group_size=8), keep_float=("dt_proj",)))
    assert "layers.0.moe.experts" in chosen and "embedding" in chosen and "layers.0.mixer.dt_proj" not in chosen
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        fq = student(idx)[0]
    exported = export(student, chosen)
    with torch.no_grad():
        assert torch.equal(exported(idx)[0], fq)


def test_ste_passes_gradients_to_float_weights(model, cfg):
    student = copy.deepcopy(model).train()
    attach_fake_quant(student, rtn_spec_for(QuantSpec(bits=4, group_size=8)))
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    logits, _ = student(idx)
    logits.square().mean().backward()
    orig = student.layers[0].moe.experts.parametrizations.w1.original
    assert orig.grad is not None and orig.grad.abs().sum() > 0
    assert student.embedding.parametrizations.weight.original.grad.abs().sum() > 0


def test_qat_trains_and_exports_a_loadable_artifact(model, cfg, tmp_path):
    data = torch.randint(0, cfg.vocab_size, (4000,), generator=torch.Generator().manual_seed(0))
    qcfg = QATConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=1, group_size=8, threads=1)
    q, stats = qat(model, QuantSpec(bits=4, group_size=8), data, qcfg, progress=False)
    assert stats["steps"] == 3
    path = tmp_path / "q.safetensors"
    save_checkpoint(path, q, kind="int4-qat", tokenizer_sha256="", quant=quant_config(q))
    loaded, ckpt = load_model(path)
    idx = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], q(idx)[0])
    # the teacher is untouched
    assert not any("parametrizations" in n for n, _ in model.named_parameters())


def test_qat_refuses_specs_the_export_cannot_match(model):
    with pytest.raises(ValueError, match="round-to-nearest"):
        attach_fake_quant(copy.deepcopy(model), rtn_spec_for(QuantSpec(bits=4, group_size=8, clip=True)))

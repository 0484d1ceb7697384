"""The variant registry: every entry resolves, loading by kind gives the right model, peers are
built from the FP32 checkpoint, and the scoring loader is the same model by another route."""
from __future__ import annotations

import pytest
import torch

from iteralite.bench import peers, variants
from iteralite.io.checkpoint import save_checkpoint


@pytest.fixture
def fp32_path(model, tmp_path):
    path = tmp_path / "fp32.safetensors"
    save_checkpoint(path, model, kind="fp32", tokenizer_sha256="x")
    return path


@pytest.mark.parametrize("kind", sorted(variants.VARIANTS))
def test_every_registry_entry_resolves_to_a_callable(kind):
    spec = variants.VARIANTS[kind]
    for target in filter(None, (spec.loader, spec.scoring_loader)):
        assert callable(variants.resolve(target)), target


def test_peer_kinds_are_the_registry_entries_built_from_fp32():
    assert variants.PEER_KINDS == ("bnb_nf4", "int8_weight_only", "compiled")
    for kind in variants.PEER_KINDS:
        assert variants.resolve(variants.VARIANTS[kind].loader) is getattr(peers, kind)
    assert not any(variants.VARIANTS[k].from_fp32 for k in ("artifact", "fused"))


def test_load_variant_by_kind(model, fp32_path):
    idx = torch.randint(0, model.cfg.vocab_size, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(variants.load_variant("artifact", fp32_path)(idx)[0], model(idx)[0])
        peer = variants.load_variant("int8_weight_only", fp32_path)
        torch.testing.assert_close(peer(idx)[0], peers.int8_weight_only(model)(idx)[0])
    assert not peer.training
    with pytest.raises(KeyError, match="unknown variant kind 'nope'; known: artifact, bnb_nf4"):
        variants.load_variant("nope", fp32_path)


def test_scoring_loader_is_the_same_int8_model_without_the_kernel(model, fp32_path):
    timed = variants.load_variant("int8_weight_only", fp32_path)
    scored = variants.load_variant("int8_weight_only", fp32_path, for_scoring=True)
    kernels = {m.kernel for m in scored.modules() if hasattr(m, "kernel")}
    assert kernels == {False} and {m.kernel for m in timed.modules() if hasattr(m, "kernel")} == {True}
    idx = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(scored(idx)[0], timed(idx)[0], atol=1e-5, rtol=1e-4)


def test_for_scoring_without_a_scoring_loader_loads_the_variant(model, fp32_path):
    idx = torch.randint(0, model.cfg.vocab_size, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(variants.load_variant("artifact", fp32_path, for_scoring=True)(idx)[0],
                                   model(idx)[0])


"""The factorised embedding (`ModelConfig.embed_rank`): the same model as its dense reference, the
parameter count as it computes, and its trip through quantization and the compact layout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from iteralite.core.model import IteraLite
from iteralite.io.checkpoint import load_model, save_checkpoint
from iteralite.io.errors import ParamsError
from iteralite.quant.config import mixed_config
from iteralite.quant.units import quantize_allocation, units
from tests.conftest import tiny_config

SHA = "0" * 64


def build(rank=6, **kw) -> IteraLite:
    torch.manual_seed(0)
    return IteraLite(tiny_config(embed_rank=rank, **kw)).eval()


def test_lookup_and_head_equal_the_dense_matrices_they_factor():
    m = build()
    E, W_in, W_out = m.embedding.weight, m.embed_in.weight, m.head_proj.weight
    dense_in, dense_out = E @ W_in.T, E @ W_out  # (V, d) each: what a dense model would hold
    idx = torch.randint(0, 300, (2, 9))
    h = torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.embed(idx), F.embedding(idx, dense_in), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.head(h), h @ dense_out.T, rtol=1e-5, atol=1e-5)


def test_parameter_count_is_the_model_as_it_computes():
    for rank in (0, 4, 6):
        m = build(rank)
        assert m.num_params() == m.cfg.num_weights() == sum(p.numel() for p in m.parameters())
    dense, fact = build(0), build(4)
    assert dense.num_params() - fact.num_params() == 300 * 32 - (300 * 4 + 2 * 4 * 32)


def test_step_equals_forward():
    m = build()
    idx = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        full = m(idx)[0]
        state, outs = m.init_state(2), []
        for t in range(12):
            o, state = m.step(idx[:, t], state)
            outs.append(o)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [-1, 32, 40])
def test_a_rank_outside_0_to_d_model_is_one_params_error(rank):
    with pytest.raises(ParamsError, match="embed_rank"):
        tiny_config(embed_rank=rank).validate()


def test_the_projections_are_allocation_units_and_round_trip_the_compact_layout(tmp_path):
    m = build()
    shapes = units(m)
    assert shapes["embedding"] == (300, 6) and shapes["embed_in"] == (32, 6) and shapes["head_proj"] == (6, 32)
    alloc = {u: 4 for u in shapes} | {"embed_in": 8, "head_proj": 3}
    packed = quantize_allocation(build(), alloc, group_size=8)
    path = tmp_path / "f.safetensors"
    save_checkpoint(path, packed, kind="test", tokenizer_sha256=SHA, quant=mixed_config(alloc, 8, m), layout="compact")
    loaded = load_model(path)[0]
    assert loaded.cfg.embed_rank == 6
    idx = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], packed(idx)[0], rtol=0, atol=0)

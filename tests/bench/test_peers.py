"""Baseline peers: close to the FP32 model they come from, recurrent step equal to the parallel
forward, and honest in-memory sizes."""
from __future__ import annotations

import pytest
import torch

from iteralite.bench import memory, peers
from iteralite.core.moe import Experts

pytestmark = pytest.mark.early  # compiles or spawns for a minute or more: handed out early (tests/conftest.py)


def _rel_err(a, b) -> float:
    """Mean absolute error relative to the reference's mean magnitude (a routing flip in one
    token moves a few logits a lot, so a max-error bound would test luck, not the quantizer)."""
    return ((a - b).abs().mean() / b.abs().mean()).item()


@pytest.fixture(scope="module")
def compiled_peer():
    """The tiny model compiled once for the module (compiling costs seconds per shape)."""
    from iteralite.core.model import IteraLite

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    fp32 = IteraLite(tiny_config()).eval()
    return fp32, peers.compiled(fp32, prefill_len=11, warm_steps=8)


@pytest.mark.parametrize("kind, tol", [("bnb_nf4", 0.25), ("int8_weight_only", 0.03)])
def test_quantized_peer_logits_close_to_fp32(model, kind, tol):
    idx = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    peer = getattr(peers, kind)(model)
    with torch.no_grad():
        assert _rel_err(peer(idx)[0], model(idx)[0]) < tol


def test_compiled_peer_matches_fp32(compiled_peer):
    fp32, peer = compiled_peer
    idx = torch.randint(0, fp32.cfg.vocab_size, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(peer(idx)[0], fp32(idx)[0], atol=1e-5, rtol=1e-5)


def _step_vs_forward(peer, vocab: int, atol: float) -> None:
    """Prefill 8 tokens, step 3 more: each step's logits equal the forward's logits at that
    position (causal, so one forward over all 11 gives every prefix's last position; two input
    shapes only, which keeps the compiled peer's recompiles down)."""
    idx = torch.randint(0, vocab, (1, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = peer(idx)[0]  # (1, 11, V)
        _, _, state = peer(idx[:, :8], return_state=True)
        for t in range(8, 11):
            logits, state = peer.step(idx[:, t], state)
            torch.testing.assert_close(logits, full[:, t], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bnb_nf4", "int8_weight_only"])
def test_quantized_peer_step_matches_forward(model, kind):
    _step_vs_forward(getattr(peers, kind)(model), model.cfg.vocab_size, atol=1e-5)


def test_compiled_peer_step_matches_forward(compiled_peer):
    fp32, peer = compiled_peer
    _step_vs_forward(peer, fp32.cfg.vocab_size, atol=1e-5)


def test_int8_without_kernel_is_the_same_model(model):
    idx = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(peers.int8_weight_only(model, kernel=False)(idx)[0],
                                   peers.int8_weight_only(model)(idx)[0], atol=1e-5, rtol=1e-4)


def test_peers_leave_the_source_model_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peers.int8_weight_only(model)
    peers.bnb_nf4(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_dt_proj_stays_float_everywhere_else_swapped(model):
    for kind in ("bnb_nf4", "int8_weight_only"):
        peer = getattr(peers, kind)(model)
        for layer in peer.layers:
            assert type(layer.mixer.dt_proj) is torch.nn.Linear
            assert type(layer.mixer.in_proj) is not torch.nn.Linear
            assert not isinstance(layer.moe.experts, Experts)


def test_int8_state_bytes_is_a_quarter_of_fp32_for_quantized_weights(model):
    peer = peers.int8_weight_only(model)
    quantized = [p for n, p in model.named_parameters()
                 if n.endswith(("proj.weight", "router.weight", "w1", "w2", "embedding.weight")) and "dt_proj" not in n]
    fp32_bytes = 4 * sum(p.numel() for p in quantized)
    rows = sum(p.shape[:-1].numel() for p in quantized)
    int8_bytes = fp32_bytes // 4 + 4 * rows  # codes + one fp32 scale per output row
    assert memory.state_bytes(peer) == memory.state_bytes(model) - fp32_bytes + int8_bytes
    # a quarter, plus the scales (4 bytes per row of K >= 16 inputs in the tiny model)
    assert int8_bytes / fp32_bytes < 0.25 + 1 / 16 + 1e-9


def test_nf4_state_bytes_counts_packed_codes_and_absmax(model):
    peer = peers.bnb_nf4(model)
    four_bit = [m for m in peer.modules() if type(m).__name__ == "Linear4bit"]
    assert four_bit and all(m.weight.dtype == torch.uint8 for m in four_bit)
    packed = sum(m.weight.numel() + 4 * m.weight.quant_state.absmax.numel() for m in four_bit)
    fp32_rest = memory.state_bytes(model) - 4 * sum(m.in_features * m.out_features for m in four_bit)
    # fp32 rest + codes + absmax, and at most the 16-entry NF4 code book per module on top
    assert packed + fp32_rest <= memory.state_bytes(peer) <= packed + fp32_rest + 64 * len(four_bit)


def test_expert_weights_are_the_dequantized_weights(model):
    for kind in ("bnb_nf4", "int8_weight_only"):
        ex = getattr(peers, kind)(model).layers[0].moe.experts
        x = torch.randn(5, model.cfg.d_model)
        w1, w2 = ex.expert_weights(1)
        with torch.no_grad():
            ref = torch.nn.functional.linear(torch.nn.functional.silu(x @ w1.T), w2)
            torch.testing.assert_close(ex.run(1, x), ref, atol=1e-4, rtol=1e-4)
        assert ex.n_experts == model.cfg.n_experts

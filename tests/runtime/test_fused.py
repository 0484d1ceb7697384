import pytest
import torch

from iteralite.runtime.fused import (FusedIteraLite, moe_dense_gated, moe_ref, ssm_prefill, ssm_prefill_ref,
                             ssm_step, ssm_step_ref)
from iteralite.train.generate import generate_ids
from iteralite.core.model import IteraLite

from tests.conftest import tiny_config

pytestmark = pytest.mark.early  # compiles or spawns for a minute or more: handed out early (tests/conftest.py)

ATOL = 1e-5


def _greedy_steps_match(ref, fused, tok, sr, sf, n_steps):
    """Greedy-step both models from their own states (ref picks the tokens); compare logits."""
    with torch.no_grad():
        for _ in range(n_steps):
            lr, sr = ref.step(tok, sr)
            lf, sf = fused.step(tok, sf)
            torch.testing.assert_close(lf, lr, atol=ATOL, rtol=1e-4)
            tok = lr.argmax(-1)


def _steps_match(ref, fused, idx, n_steps=6):
    """Prefill both models on idx, then greedy-step both from their own states; compare logits."""
    with torch.no_grad():
        lr, _, sr = ref(idx, return_state=True)
        lf, _, sf = fused(idx, return_state=True)
    torch.testing.assert_close(lf, lr, atol=ATOL, rtol=1e-4)
    _greedy_steps_match(ref, fused, lr[:, -1].argmax(-1), sr, sf, n_steps)


def test_step_equals_model_step_from_zero_state(model):
    fused = FusedIteraLite.from_model(model)
    _greedy_steps_match(model, fused, torch.tensor([3, 7]), model.init_state(2), fused.init_state(2), 8)


def test_prefill_equals_forward_and_state_continues(model):
    fused = FusedIteraLite.from_model(model)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 19))  # not a multiple of chunk_size
    _steps_match(model, fused, idx)
    with torch.no_grad():  # prefill from a returned state == prefill of the concatenation
        full, _ = fused(idx)
        _, _, st = fused(idx[:, :10], return_state=True)
        tail, _ = fused(idx[:, 10:], st)
    torch.testing.assert_close(tail, full[:, 10:], atol=ATOL, rtol=1e-4)


def test_fused_ops_equal_ref_twins(model):
    torch.manual_seed(1)
    blk = FusedIteraLite.from_model(model).blocks[0]
    x = torch.randn(3, model.cfg.d_model)
    conv = torch.randn(3, blk.d_inner, blk.d_conv)
    S = torch.randn(3, blk.h, blk.p, blk.n)
    for a, b in zip(ssm_step(blk, x, conv, S), ssm_step_ref(blk, x, conv, S)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)
    xs = torch.randn(3, 13, model.cfg.d_model)
    for a, b in zip(ssm_prefill(blk, xs, conv, S), ssm_prefill_ref(blk, xs, conv, S)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)
    xt = torch.randn(40, model.cfg.d_model)
    torch.testing.assert_close(moe_dense_gated(blk, xt), moe_ref(blk, xt), atol=ATOL, rtol=1e-4)


def test_pruned_uneven_config():
    torch.manual_seed(0)
    m = IteraLite(tiny_config(layer_n_heads=[2, 1], layer_d_ff=[16, 8], layer_n_experts=[3, 2])).eval()
    _steps_match(m, FusedIteraLite.from_model(m), torch.randint(0, 300, (1, 11)))


def test_quantized_model_matches_dequantized_float(model):
    import copy

    from iteralite.quant.swap import dequantize_model, make_spec_for, quantize
    from iteralite.quant.spec import QuantSpec

    q = quantize(copy.deepcopy(model), make_spec_for(QuantSpec(bits=4, group_size=8)))
    fused = FusedIteraLite.from_model(q)
    assert type(q.layers[0].mixer.in_proj).__name__ == "QuantLinear"  # from_model left q untouched
    _steps_match(dequantize_model(copy.deepcopy(q)), fused, torch.randint(0, 300, (1, 9)))


def test_from_model_reads_every_stored_format(model):
    """A mixed-precision model (integer codes at 2..8 bits, fp16 units, a precision per expert) goes
    straight into the fused model: no caller-side dequantization first."""
    import copy

    from iteralite.quant.swap import dequantize_model
    from iteralite.quant.units import quantize_allocation, units

    alloc = {u: (1, 2, 3, 4, 8, 16)[i % 6] for i, u in enumerate(units(model))}  # 1: ternary
    q = quantize_allocation(copy.deepcopy(model), alloc, 8)
    assert {"HalfLinear", "MixedExperts"} <= {type(m).__name__ for m in q.modules()}
    _steps_match(dequantize_model(copy.deepcopy(q)), FusedIteraLite.from_model(q), torch.randint(0, 300, (1, 9)))


@pytest.fixture(scope="module")
def compiled():
    """(eager IteraLite, compiled FusedIteraLite), compiled once: AOTInductor takes ~20-40 s."""
    torch.manual_seed(0)
    m = IteraLite(tiny_config()).eval()
    return m, FusedIteraLite.from_model(m).compile(prefill_lens=(5,))


def test_compiled_equals_eager(compiled):
    m, fused = compiled
    assert fused._step_c is not None and (1, 5) in fused._forward_c
    _steps_match(m, fused, torch.randint(0, 300, (1, 5)))  # compiled prefill, then compiled steps
    _steps_match(m, fused, torch.randint(0, 300, (1, 7)))  # eager prefill of another length, compiled steps


def test_greedy_generation_identical(compiled):
    m, fused = compiled
    prompt = [5, 17, 42, 8, 99]
    want = list(generate_ids(m, prompt, 20, temperature=0))
    assert list(generate_ids(fused, prompt, 20, temperature=0)) == want

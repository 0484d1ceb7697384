"""`quant.gptq_start`: GPTQ-compensated starting weights for a fine-tune, against round to nearest."""
from __future__ import annotations

import pytest
import torch

from iteralite.quant.gptq_start import MAX_BITS, gptq_start, gptq_weight, unit_hessians
from iteralite.quant.intcodes import quantize_rtn
from iteralite.quant.registry import PRECISIONS, TERNARY
from iteralite.quant.units import split_expert, units

LOW = [TERNARY, 2, 3, 4]


@pytest.mark.parametrize("precision", LOW)
def test_with_an_identity_hessian_gptq_is_round_to_nearest(precision):
    """No correlation between inputs: no error to spread, so the reference twin is plain RTN."""
    w = torch.randn(12, 16, generator=torch.Generator().manual_seed(precision))
    spec = PRECISIONS[precision].spec(16, 8)
    want = quantize_rtn(w, spec.bits, spec.group_size, spec.symmetric).dequantize()
    torch.testing.assert_close(gptq_weight(w, torch.eye(16), precision, 8, "w"), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", LOW)
def test_gptq_moves_the_layer_output_less_than_round_to_nearest(precision):
    g = torch.Generator().manual_seed(10 + precision)
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, 16, generator=g)  # correlated inputs
    w = torch.randn(24, 16, generator=g)
    H = x.T @ x / len(x)
    spec = PRECISIONS[precision].spec(16, 8)
    rtn = quantize_rtn(w, spec.bits, spec.group_size, spec.symmetric).dequantize()
    err = lambda q: ((x @ (w - q).T) ** 2).mean().item()  # noqa: E731
    assert err(gptq_weight(w, H, precision, 8, "w")) < err(rtn)


def _levels_per_group(w: torch.Tensor, group: int) -> int:
    return max(len(torch.unique(row[i:i + group])) for row in w.reshape(-1, w.shape[-1])
               for i in range(0, w.shape[-1], group))


def test_gptq_start_rounds_the_low_bit_units_only_and_leaves_the_model_alone(model):
    wins = torch.randint(0, model.cfg.vocab_size, (8, 17), generator=torch.Generator().manual_seed(3))
    names = list(units(model))
    alloc = {u: [TERNARY, 2, 3, 4, 8, 16][i % 6] for i, u in enumerate(names)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = gptq_start(model, alloc, unit_hessians(model, wins, 4), group_size=8)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    changed = {k for k, v in out.state_dict().items() if not torch.equal(v, before[k])}
    for u, p in alloc.items():
        base, e = split_expert(u)
        mats = [out.get_submodule(base).weight] if e is None else \
            [getattr(out.get_submodule(base), s)[e] for s in ("w1", "w2")]
        for w in mats:
            if PRECISIONS[p].bits <= MAX_BITS:
                group = PRECISIONS[p].spec(w.shape[-1], 8).group_size
                assert _levels_per_group(w, group) <= PRECISIONS[p].levels, u
    low = {split_expert(u)[0] for u, p in alloc.items() if PRECISIONS[p].bits <= MAX_BITS}
    assert changed and all(any(k.startswith(b + ".") or k == b for b in low) for k in changed)

"""Learned quantization ranges: the forward is the export's own round to nearest of the clamped
weight (bit for bit, every bit width, symmetric or not, mixed experts), the range gets an LSQ
gradient, and a trained range beats min/max at 2 bits on the quantization error it is trained on."""
import copy

import pytest
import torch

from iteralite.io import grid
from iteralite.quant.intcodes import clip_search, quantize_rtn
from iteralite.quant.learned import LearnedRange, clamp_to_range, learned_fake_quantize
from iteralite.quant.qat import attach_fake_quant, export, rtn_spec_for
from iteralite.quant.spec import QuantSpec
from iteralite.quant.units import allocation_spec_for, units


def weight(shape=(12, 32), seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    w[..., 3] *= 8  # an outlier column: min/max wastes most levels on it
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", [(12, 32), (3, 12, 32)])
@pytest.mark.parametrize("scale_bits", [0, 5])
def test_forward_equals_round_to_nearest_of_the_clamped_weight(bits, symmetric, shape, scale_bits):
    w = weight(shape)
    spec = QuantSpec(bits, 8, symmetric, "rtn", scale_bits=scale_bits)
    shrink = torch.rand(*shape[:-1], 4, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.1
    got = learned_fake_quantize(w, shrink, spec)
    want = quantize_rtn(clamp_to_range(w, shrink, 8), bits, 8, symmetric, scale_bits=scale_bits).dequantize()
    assert torch.equal(got, want)


def test_shrink_one_is_plain_min_max_round_to_nearest():
    w = weight()
    got = learned_fake_quantize(w, torch.ones(12, 4), QuantSpec(2, 8, False, "rtn"))
    assert torch.equal(got, quantize_rtn(w, 2, 8, False).dequantize())


def test_range_gets_a_gradient_and_weights_a_straight_through_one():
    w = weight().requires_grad_()
    lr = LearnedRange(QuantSpec(2, 8, False, "rtn"), w)
    out = lr(w)
    (out * torch.randn_like(out)).sum().backward()
    assert lr.shrink[0].grad is not None and lr.shrink[0].grad.abs().sum() > 0
    clamped = clamp_to_range(w.detach(), lr.shrink[0].detach(), 8) != w.detach()
    assert clamped.any() and (w.grad[clamped] == 0).all() and (w.grad[~clamped] != 0).any()


def test_init_is_the_mse_optimal_clip_search():
    w = weight()
    lr = LearnedRange(QuantSpec(2, 8, False, "rtn"), w)
    assert torch.equal(lr.shrink[0].detach(), clip_search(w, 2, 8, False))


def test_training_the_range_lowers_the_2_bit_error_below_min_max():
    """Fit the quantized weight to the float one: from min/max, the learned range ends well below
    min/max's error and within 5% of the clip search's best grid point per group (gradient descent on a
    piecewise-constant rounding can stop a little short of the grid's optimum)."""
    w = torch.randn((16, 64), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(2, 16, False, "rtn")
    lr = LearnedRange(spec, w)
    with torch.no_grad():
        lr.shrink[0].fill_(1.0)  # start at min/max
    minmax = (quantize_rtn(w, 2, 16, False).dequantize() - w).square().mean().item()
    opt = torch.optim.Adam(lr.parameters(), lr=0.02)
    for _ in range(100):
        opt.zero_grad()
        loss = (lr(w) - w).square().mean()
        loss.backward()
        opt.step()
    best_grid = (learned_fake_quantize(w, clip_search(w, 2, 16, False), spec) - w).square().mean().item()
    assert loss.item() < 0.85 * minmax and loss.item() < 1.05 * best_grid


@pytest.mark.parametrize("alloc_bits,scale_bits", [((2,), 0), ((2, 3, 16), 0), ((1, 2, 3, 16), 6)])
def test_learned_qat_forward_equals_its_export(model, cfg, alloc_bits, scale_bits):
    """Uniform and mixed (per-expert specs, fp16 units, a scale grid) allocations: the exported
    packed model computes exactly what the learned-range QAT model computed, after its ranges moved."""
    student = copy.deepcopy(model)
    alloc = {u: alloc_bits[i % len(alloc_bits)] for i, u in enumerate(units(student))}
    chosen = attach_fake_quant(student, allocation_spec_for(alloc, 8, scale_bits), learned=True)
    ranges = [p for n, p in student.named_parameters() if n.endswith(".shrink.0") or ".shrink." in n]
    assert ranges
    with torch.no_grad():
        for p in ranges:
            p.mul_(0.8)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        fq = student(idx)[0]
    exported = export(student, chosen)
    assert not any("shrink" in n for n, _ in exported.named_parameters())
    if scale_bits:  # every scale tensor (one per expert, too) lies on its own grid
        scales = [t for k, t in exported.state_dict().items() if k.endswith("scales")]
        assert scales and all(grid.encode(t)[0] & 0x0F <= scale_bits for t in scales)
    with torch.no_grad():
        assert torch.equal(exported(idx)[0], fq)


def test_uniform_learned_qat_keeps_fp16_units_plain(model):
    student = copy.deepcopy(model)
    attach_fake_quant(student, rtn_spec_for(QuantSpec(bits=2, group_size=8)), learned=True)
    assert isinstance(student.embedding.parametrizations.weight[0], LearnedRange)
    assert not hasattr(student.layers[0].mixer, "parametrizations") or \
        "weight" not in getattr(student.layers[0].mixer.dt_proj, "parametrizations", {})


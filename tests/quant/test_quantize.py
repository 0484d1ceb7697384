import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from iteralite.core.config import ModelConfig
from iteralite.io import grid
from iteralite.io.errors import CheckpointError, ParamsError
from iteralite.core.model import IteraLite
from iteralite.core.moe import Experts
from iteralite.quant.calib_stats import collect_act_stats
from iteralite.quant.config import apply_config, quant_config
from iteralite.quant.modules import QuantEmbedding, QuantExperts, QuantLinear
from iteralite.quant.swap import make_spec_for, quantize
from iteralite.quant.awq import quantize_awq, weighted_error
from iteralite.quant.fake import fake_quantize, quantize_activations_int8
from iteralite.quant.gptq import quantize_gptq
from iteralite.quant.intcodes import QTensor, quantize_rtn
from iteralite.quant.registry import quantize_tensor
from iteralite.quant.nf4 import NF4Tensor, dequantize_nf4_ref, quantize_nf4
from iteralite.quant.spec import QuantSpec, QuantSpecError

TINY = dict(vocab_size=64, d_model=32, n_layers=2, headdim=8, n_heads=2, d_state=4, n_experts=3,
            top_k=2, d_ff=16, dt_rank=4, chunk_size=8)


def randw(*shape, seed=0, scale=0.05):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def group_view(t, g):
    return t.reshape(*t.shape[:-1], t.shape[-1] // g, g)


# ----------------------------------------------------------------------------- RTN


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [8, 32])
@pytest.mark.parametrize("scale_bits", [0, 3, 6])
def test_rtn_error_within_half_step(bits, symmetric, group_size, scale_bits):
    """Also with the scales on a log grid (scale_bits): rounded up, so still within half a step."""
    w = randw(16, 64, seed=bits)
    w[0, :5] = 0.0  # pruned weights
    qt = quantize_rtn(w, bits, group_size, symmetric, scale_bits=scale_bits)
    if scale_bits:
        assert qt.scales.unique().numel() <= 2 ** scale_bits
        assert grid.encode(qt.scales) is not None  # the compact layout stores them at <= scale_bits bits
        assert grid.encode(qt.scales)[0] & 0x0F <= scale_bits
    assert qt.codes.dtype == torch.uint8 and qt.codes.shape == (16, 64)
    assert int(qt.codes.max()) < 2 ** bits
    assert qt.scales.dtype == torch.float16 and qt.scales.shape == (16, 64 // group_size)
    if symmetric:
        assert qt.zeros is None
    else:
        assert qt.zeros.dtype == torch.float16 and torch.equal(qt.zeros, qt.zeros.round())
    err = group_view((qt.dequantize() - w).abs(), group_size)
    half_step = 0.5 * qt.scales.float()[..., None]
    assert (err <= half_step * (1 + 1e-5) + 1e-7).all()
    assert torch.equal(qt.dequantize()[0, :5], torch.zeros(5))  # zero is exactly representable


def test_dequant_convention():
    w = randw(4, 16, seed=3)
    qt = quantize_rtn(w, 4, 8, symmetric=False)
    s = qt.scales.float().repeat_interleave(8, dim=1)
    z = qt.zeros.float().repeat_interleave(8, dim=1)
    assert torch.equal(qt.dequantize(), (qt.codes.float() - z) * s)
    qs = quantize_rtn(w, 4, 8, symmetric=True)
    s = qs.scales.float().repeat_interleave(8, dim=1)
    assert torch.equal(qs.dequantize(), (qs.codes.float() - 8) * s)


def test_3d_expert_weights_quantize_like_stacked_rows():
    w = randw(3, 8, 16, seed=4)
    qt = quantize_rtn(w, 4, 8, False)
    flat = quantize_rtn(w.reshape(24, 16), 4, 8, False)
    assert qt.shape == (3, 8, 16)
    assert torch.equal(qt.dequantize().reshape(24, 16), flat.dequantize())


@pytest.mark.parametrize("spec", [QuantSpec(4, 8, False), QuantSpec(3, 4, True), QuantSpec(2, 16, False),
                                  QuantSpec(8, 16, True), QuantSpec(4, 8, False, "awq")])
def test_to_tensors_round_trip_through_safetensors(spec):
    w = randw(2, 6, 16, seed=5)
    stat = torch.rand(2, 16) if spec.method == "awq" else None
    qt = quantize_tensor(w, spec, stat)
    blob = st_save(qt.to_tensors("layer."))
    d = st_load(blob)
    assert d["layer.codes"].numel() * 8 == ((w.numel() * spec.bits + 7) // 8) * 8
    back = QTensor.from_tensors(d, "layer.", w.shape, spec)
    assert torch.equal(back.codes, qt.codes)
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_storage_bits_exact():
    w = randw(64, 128)
    assert quantize_rtn(w, 4, 32, True).storage_bits() / w.numel() == 4 + 16 / 32
    assert quantize_rtn(w, 4, 32, False).storage_bits() / w.numel() == 4 + 16 / 32 + 4 / 32  # zeros packed
    assert quantize_rtn(w, 3, 64, True).storage_bits() / w.numel() == 3 + 16 / 64
    qa = quantize_awq(w, torch.rand(128), 4, 32, False)
    assert qa.storage_bits() == w.numel() * 4 + (16 + 4) * (w.numel() // 32) + 16 * 128
    # bits counted from the real packed bytes
    d = qa.to_tensors()
    assert qa.storage_bits() == sum(t.numel() * t.element_size() * 8 for t in d.values())


# ----------------------------------------------------------------------------- errors


def test_group_size_must_divide_input_dim():
    with pytest.raises(QuantSpecError) as ei:
        quantize_rtn(randw(4, 24), 4, 16, False, name="layers.0.mixer.x_proj.weight")
    msg = str(ei.value)
    assert "group_size=16 does not divide the input dim 24 of 'layers.0.mixer.x_proj.weight'" in msg
    assert "valid group sizes for it: 1, 2, 3, 4, 6, 8, 12, 24" in msg
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, ParamsError)


def test_quantize_model_names_the_module_with_a_bad_group_size():
    model = IteraLite(ModelConfig(**TINY))
    with pytest.raises(QuantSpecError, match="input dim 4 of 'layers.0.mixer.dt_proj'"):
        quantize(model, lambda name, m: QuantSpec(4, 8))


def test_bad_bits_and_method():
    with pytest.raises(ValueError, match=r"'quantize.bits' must be one of 2, 3, 4, 8; got 5"):
        quantize_rtn(randw(4, 16), 5, 8, False)
    with pytest.raises(ParamsError, match=r"'quantize.bits' must be one of 2, 3, 4, 8; got 5"):
        QuantSpec(bits=5).validate()
    with pytest.raises(ParamsError, match=r"'quantize.method' must be one of rtn, awq, gptq, nf4, fp16; got 'int4'"):
        QuantSpec(method="int4").validate()
    with pytest.raises(ParamsError, match=r"'quantize.bits' must be 4 for method nf4"):
        QuantSpec(bits=3, group_size=64, method="nf4").validate()
    with pytest.raises(ParamsError, match="unknown key 'quantize.bitz'"):
        QuantSpec.from_dict({"bitz": 4})
    with pytest.raises(ParamsError, match=r"'quantize.scale_bits' must be 0 \(fp16 scales\) or 2..8 .*got 1"):
        QuantSpec(scale_bits=1).validate()
    with pytest.raises(ParamsError, match=r"'quantize.scale_bits' .* rtn only; got method 'awq'"):
        QuantSpec(method="awq", scale_bits=6).validate()
    assert "scale_bits" not in QuantSpec().to_dict()  # the default leaves configs as they were
    assert QuantSpec.from_dict(QuantSpec(scale_bits=6).to_dict()).scale_bits == 6


def test_missing_or_wrong_stats_are_clear_errors():
    with pytest.raises(ValueError, match="method 'awq' needs calibration statistic 'act_sq_mean' for 'w'"):
        quantize_tensor(randw(4, 16), QuantSpec(4, 8, method="awq"), None, name="w")
    with pytest.raises(ValueError, match=r"gptq needs a Hessian \(16, 16\) for 'w', got shape \(16,\)"):
        quantize_tensor(randw(4, 16), QuantSpec(4, 8, method="gptq"), torch.rand(16), name="w")


# ----------------------------------------------------------------------------- modules


@pytest.mark.parametrize("spec", [QuantSpec(4, 16, False), QuantSpec(3, 8, True),
                                  QuantSpec(4, 64, True, "nf4"), QuantSpec(4, 16, False, "awq")])
def test_quant_linear_matches_reference(spec):
    torch.manual_seed(0)
    lin = nn.Linear(32, 24, bias=True)
    stat = torch.rand(32) if spec.method == "awq" else None
    qt = quantize_tensor(lin.weight, spec, stat)
    ql = QuantLinear.from_weight(lin.weight, lin.bias, spec, stat)
    x = torch.randn(2, 5, 32)
    assert torch.equal(ql(x), F.linear(x, qt.dequantize(), lin.bias))
    assert all(not k.endswith("weight") for k in ql.state_dict())  # only the packed form persists


def test_quant_experts_and_embedding_interfaces():
    torch.manual_seed(0)
    ex = Experts(3, 16, 8)
    spec = QuantSpec(4, 8, False)
    qe = QuantExperts.from_float(ex, spec)
    assert qe.n_experts == 3
    w1 = quantize_rtn(ex.w1, 4, 8, False).dequantize()
    w2 = quantize_rtn(ex.w2, 4, 8, False).dequantize()
    x = torch.randn(5, 16)
    assert torch.equal(qe.run(1, x), F.linear(F.silu(F.linear(x, w1[1])), w2[1]))
    assert torch.equal(qe.expert_weights(2)[0], w1[2])

    model = IteraLite(ModelConfig(**TINY))
    emb = QuantEmbedding.from_float(model.embedding, spec)
    w = quantize_rtn(model.embedding.weight, 4, 8, False).dequantize()
    idx = torch.tensor([[1, 5, 63]])
    assert torch.equal(emb(idx), F.embedding(idx, w))
    h = torch.randn(2, 32)
    assert torch.equal(emb.attend(h), F.linear(h, w))


def test_dequant_cache_follows_buffer_changes():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    ql = QuantLinear.from_float(lin, QuantSpec(4, 8))
    empty = QuantLinear(16, 8, QuantSpec(4, 8))
    x = torch.randn(3, 16)
    assert torch.equal(empty(x), torch.zeros(3, 8))  # caches the all-zero weight
    empty.load_state_dict(ql.state_dict(), strict=True)
    assert torch.equal(empty(x), ql(x))


def test_int4_kernel_matches_reference():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=True)
    x = torch.randn(3, 64)
    for spec, stat in [(QuantSpec(4, 32, False), None), (QuantSpec(4, 32, True), None),
                       (QuantSpec(4, 32, False, "awq"), torch.rand(64) + 0.1)]:
        ql = QuantLinear.from_weight(lin.weight, lin.bias, spec, stat)
        assert ql.int4_eligible()
        ref = ql(x)
        ql.use_int4_kernel = True
        torch.testing.assert_close(ql(x), ref, rtol=1e-5, atol=1e-5)


def test_int8_activation_quantization():
    x = torch.randn(4, 7, 32)
    xq = quantize_activations_int8(x)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((xq - x).abs() <= step / 2 + 1e-6).all()
    torch.manual_seed(0)
    lin = nn.Linear(32, 16, bias=False)
    ql = QuantLinear.from_float(lin, QuantSpec(4, 8, act_int8=True))
    assert torch.equal(ql(x), F.linear(xq, ql.dequantized_weight()))


# ----------------------------------------------------------------------------- fake quant


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_bits", [0, 4])
def test_fake_quantize_equals_export_and_passes_gradients(symmetric, scale_bits):
    w = randw(8, 32, seed=7).requires_grad_(True)
    wq = fake_quantize(w, 4, 8, symmetric, scale_bits=scale_bits)
    assert torch.equal(wq, quantize_rtn(w, 4, 8, symmetric, scale_bits=scale_bits).dequantize())
    upstream = torch.randn(8, 32)
    (wq * upstream).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert torch.equal(w.grad, upstream)  # min/max ranges: every weight is inside the clamp range

    in_scale = torch.rand(32) + 0.5
    assert torch.equal(fake_quantize(w, 3, 8, symmetric, in_scale),
                       quantize_rtn(w, 3, 8, symmetric, in_scale=in_scale).dequantize())


# ----------------------------------------------------------------------------- AWQ / GPTQ / clip


def test_awq_beats_rtn_on_outlier_channels():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g) * 0.05
    act = torch.rand(64, generator=g) * 0.1 + 0.01
    act[[3, 17, 40, 41]] = 50.0  # a few channels with large activations
    rtn = quantize_rtn(w, 3, 32, False).dequantize()
    qa = quantize_awq(w, act, 3, 32, False)
    assert qa.in_scale is not None and qa.in_scale.dtype == torch.float16
    e_rtn, e_awq = weighted_error(w, rtn, act), weighted_error(w, qa.dequantize(), act)
    assert e_awq < e_rtn
    # per-expert search on 3-D weights
    w3, a3 = torch.stack([w, w.flip(0)]), torch.stack([act, act.flip(0)])
    q3 = quantize_awq(w3, a3, 3, 32, False)
    assert q3.in_scale.shape == (2, 64)
    assert weighted_error(w3, q3.dequantize(), a3) <= weighted_error(w3, quantize_rtn(w3, 3, 32, False).dequantize(), a3)


def test_clip_search_does_not_increase_weighted_error():
    w = randw(16, 64, seed=9)
    act = torch.rand(64) + 0.1
    plain = weighted_error(w, quantize_rtn(w, 2, 32, False).dequantize(), act)
    clipped = weighted_error(w, quantize_rtn(w, 2, 32, False, clip=True, clip_weight=act).dequantize(), act)
    assert clipped <= plain


def test_gptq_beats_rtn_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g) * 0.05
    mix = torch.randn(64, 64, generator=g) / 8
    X = torch.randn(512, 64, generator=g) @ mix + torch.randn(512, 64, generator=g) * 0.1
    H = X.T @ X / X.shape[0]

    def out_err(wq):
        return ((X @ (w - wq).T) ** 2).mean()

    qg = quantize_gptq(w, H, 3, 16, False)
    assert int(qg.codes.max()) < 8
    assert out_err(qg.dequantize()) < out_err(quantize_rtn(w, 3, 16, False).dequantize())


# ----------------------------------------------------------------------------- NF4


@pytest.mark.parametrize("shape", [(16, 128), (5, 48), (3, 33), (2, 4, 64)])
def test_nf4_round_trip(shape):
    w = randw(*shape, seed=11)
    t = quantize_nf4(w)
    assert t.packed.dtype == torch.uint8 and t.packed.numel() == (w.numel() + 1) // 2
    assert t.absmax.numel() == -(-w.numel() // 64)
    dq = t.dequantize()
    assert dq.shape == w.shape
    assert torch.equal(dq, dequantize_nf4_ref(t))  # bitsandbytes kernel == plain-torch twin
    assert ((dq - w).abs() <= 0.5 * w.abs().max()).all()
    d = st_load(st_save(t.to_tensors("emb.")))
    back = NF4Tensor.from_tensors(d, "emb.", shape, QuantSpec(4, 64, method="nf4"))
    assert torch.equal(back.dequantize(), dq)
    assert t.storage_bits() == 8 * ((w.numel() + 1) // 2) + 32 * t.absmax.numel()
    assert json.loads(json.dumps(t.meta()))["blocksize"] == 64


# ----------------------------------------------------------------------------- whole model


def _mixed_spec_for(name, module):
    if name.endswith("dt_proj"):
        return None  # keep float
    if name == "embedding":
        return QuantSpec(4, 64, method="nf4")
    if name.endswith("experts"):
        return QuantSpec(4, 8, False, "awq", clip=True)
    if name.endswith("router"):
        return QuantSpec(8, 32, True, "gptq")
    if name.endswith("x_proj"):
        return QuantSpec(3, 16, True, "rtn", clip=True)
    return QuantSpec(4, 16, False, "rtn")


@pytest.mark.parametrize("spec_for", [_mixed_spec_for,
                                      make_spec_for(QuantSpec(2, 32, False, "rtn")),
                                      make_spec_for(QuantSpec(4, 64, method="nf4"), keep_float=())])
def test_model_state_dict_round_trip(spec_for):
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY)
    model = IteraLite(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    float_logits, _ = model(idx)
    stats = collect_act_stats(model, [idx], hessian=True)  # awq/clip use its diagonal
    diag = collect_act_stats(model, [idx])
    torch.testing.assert_close(stats["layers.0.moe.experts.w2"].diagonal(dim1=-2, dim2=-1),
                               diag["layers.0.moe.experts.w2"])
    quantize(model, spec_for, stats)
    assert isinstance(model.embedding, QuantEmbedding)
    assert isinstance(model.layers[1].moe.experts, QuantExperts)
    logits, _ = model(idx)
    assert (logits - float_logits).abs().max() < 0.5

    cfg_json = json.loads(json.dumps(quant_config(model)))
    state = st_load(st_save(model.state_dict()))  # safetensors: plain tensors, no pickle
    fresh = IteraLite(ModelConfig(**TINY)).eval()
    apply_config(fresh, cfg_json)
    fresh.load_state_dict(state, strict=True)
    logits2, _ = fresh(idx)
    assert torch.equal(logits, logits2)
    # the recurrent path runs on the quantized modules too
    step_logits, _ = fresh.step(idx[:, 0], fresh.init_state(2))
    torch.testing.assert_close(step_logits, logits2[:, 0], rtol=1e-4, atol=1e-4)


def test_apply_quant_config_rejects_unknown_modules():
    model = IteraLite(ModelConfig(**TINY))
    cfg = {"format": "iteralite-quant", "version": 1,
           "modules": {"layers.9.mixer.in_proj": {"kind": "linear", **dataclasses.asdict(QuantSpec())}}}
    with pytest.raises(CheckpointError, match="'layers.9.mixer.in_proj', which the model does not have"):
        apply_config(model, cfg)
    with pytest.raises(CheckpointError, match="version 2 is not supported"):
        apply_config(model, {**cfg, "version": 2})


def test_spec_for_helper_fits_group_sizes():
    model = IteraLite(ModelConfig(**TINY))
    spec_for = make_spec_for(QuantSpec(4, 32))
    specs = {n: spec_for(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Experts))}
    assert specs["layers.0.mixer.dt_proj"] is None
    assert specs["layers.0.mixer.x_proj"].group_size == 16  # d_inner = 16
    assert specs["layers.0.moe.experts"].group_size == 16  # d_ff = 16 < 32
    assert specs["layers.0.mixer.in_proj"].group_size == 32
    q = quantize(copy.deepcopy(model), spec_for)
    assert isinstance(q.layers[0].mixer.dt_proj, nn.Linear)


def test_gptq_on_expert_stacks_runs_each_expert_alone():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 8, 16, generator=g) * 0.05
    X = torch.randn(2, 64, 16, generator=g)
    H = X.transpose(1, 2) @ X / 64
    q3 = quantize_gptq(w, H, 4, 8, True)
    for e in range(2):
        assert torch.equal(q3.dequantize()[e], quantize_gptq(w[e], H[e], 4, 8, True).dequantize())

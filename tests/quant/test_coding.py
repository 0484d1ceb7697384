"""Code tensors of a built model: which buffers are codes, their exact rANS round trip, and the
coding report's numbers."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from iteralite.io.errors import CheckpointError
from iteralite.quant import entropy
from iteralite.quant.coding import CodeView, code_tensors, coding_report, report_totals
from iteralite.quant.config import mixed_config
from iteralite.quant.packing import pack_bits, packed_nbytes
from iteralite.quant.spec import QuantSpec
from iteralite.quant.swap import make_spec_for, quantize
from iteralite.quant.registry import PRECISIONS
from iteralite.quant.units import quantize_allocation, units


def _uniform(model, **spec):
    return quantize(copy.deepcopy(model), make_spec_for(QuantSpec(**{"bits": 4, "group_size": 8, **spec})))


def _mixed(model):
    alloc = {u: tuple(PRECISIONS)[i % len(PRECISIONS)] for i, u in enumerate(units(model))}
    return quantize_allocation(copy.deepcopy(model), alloc, 8), alloc


def test_uniform_model_lists_codes_and_zeros_with_their_widths(model):
    q = _uniform(model, bits=3)
    views = code_tensors(q)
    state = q.state_dict()
    assert list(views) == [k for k in state if k in views]  # state_dict order
    assert "layers.0.mixer.in_proj.weight_codes" in views and "layers.0.mixer.in_proj.weight_zeros" in views
    assert "layers.0.moe.experts.w1_codes" in views and "embedding.weight_codes" in views
    assert not any(k.endswith("scales") for k in views)
    assert not any("dt_proj" in k for k in views)  # kept float by make_spec_for
    lin = q.layers[0].mixer.in_proj
    v = views["layers.0.mixer.in_proj.weight_codes"]
    assert (v.bits, v.count, v.packing) == (3, lin.in_features * lin.out_features, "bits")
    for key, v in views.items():
        assert v.bits == 3 and state[key].numel() == v.packed_bytes == packed_nbytes(v.count, 3)


def test_symmetric_specs_have_no_zero_point_tensors(model):
    views = code_tensors(_uniform(model, symmetric=True))
    assert views and all(k.endswith("_codes") for k in views)


def test_mixed_model_views_follow_each_units_precision(model):
    q, alloc = _mixed(model)
    views = code_tensors(q)
    assert not any("weight_half" in k for k in views)  # fp16 units are not codes
    for e in range(model.cfg.n_experts):
        p = alloc[f"layers.0.moe.experts[{e}]"]
        key = f"layers.0.moe.experts.w1.{e}.weight_codes"
        assert (key in views) == (p != 16)
        if p != 16:
            assert views[key].bits == (2 if p == 1 else p)  # ternary: 2-bit codes (3 of 4 symbols used)
    assert {v.bits for v in views.values()} == {2, 3, 4, 8}


def test_empty_and_filled_models_have_the_same_views(model):
    from iteralite.core.model import IteraLite
    from iteralite.quant.config import apply_config

    q, alloc = _mixed(model)
    empty = apply_config(IteraLite(model.cfg), mixed_config(alloc, 8, model))
    assert code_tensors(empty) == code_tensors(q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 1000])
def test_encode_decode_gives_back_the_packed_bytes(bits, n):
    rng = np.random.default_rng(bits * n)
    codes = np.clip(rng.normal(2 ** (bits - 1), 2 ** bits / 8, n).round(), 0, 2 ** bits - 1).astype(np.uint8)
    packed = pack_bits(torch.from_numpy(codes), bits)
    v = CodeView("w", bits, n, "bits")
    blob = v.encode(packed)
    out = v.decode(blob)
    assert out.dtype == torch.uint8 and torch.equal(out, packed)


def test_nonzero_pad_bits_are_not_coded():
    v = CodeView("w", 3, 5, "bits")  # 15 bits in 2 bytes: one pad bit
    packed = pack_bits(torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8), 3)
    assert v.encode(packed) is not None
    packed[-1] |= 0x80
    assert v.encode(packed) is None  # the codes would re-pack to other bytes
    assert v.encode(packed[:1]) is None  # not this view's size


def test_decode_refuses_foreign_or_corrupt_blobs():
    v = CodeView("layer.w_codes", 2, 100, "bits")
    wide = entropy.encode(np.arange(100, dtype=np.uint8) % 16, 16)  # 4-bit codes
    with pytest.raises(CheckpointError, match=r"'layer.w_codes': entropy blob holds a code 15, .* 2-bit codes"):
        v.decode(wide)
    good = v.encode(pack_bits(torch.arange(100, dtype=torch.uint8) % 3, 2))
    with pytest.raises(CheckpointError, match=r"'layer.w_codes': entropy blob holds 100 codes, expected 99"):
        CodeView("layer.w_codes", 2, 99, "bits").decode(good)
    with pytest.raises(CheckpointError, match="'layer.w_codes': .*truncated|'layer.w_codes': .*payload"):
        v.decode(good[:-1])


def test_nf4_codes_round_trip(model):
    pytest.importorskip("bitsandbytes")
    q = quantize(copy.deepcopy(model), make_spec_for(QuantSpec(4, 64, method="nf4"), keep_float=("dt_proj", "x_proj")))
    views = code_tensors(q)
    state = q.state_dict()
    assert views and all(v.packing == "nf4" and k.endswith("_codes") for k, v in views.items())
    for key, v in views.items():
        assert torch.equal(v.decode(v.encode(state[key])), state[key])


def test_report_numbers_are_consistent(model):
    q, _ = _mixed(model)
    rows = coding_report(q)
    state = q.state_dict()
    assert [r["name"] for r in rows] == list(code_tensors(q))
    for r in rows:
        assert r["raw_bytes"] == state[r["name"]].numel() == packed_nbytes(r["symbols"], r["bits"])
        assert r["entropy_bytes"] <= r["coded_bytes"]  # no static-table coder beats the entropy
        assert r["stored"] == ("rans" if r["coded_bytes"] < r["raw_bytes"] else "raw")
        if r["stored"] == "rans":
            assert r["coded_bytes"] < r["raw_bytes"]
    t = report_totals(rows)
    assert t["tensors"] == len(rows) and t["entropy_bytes"] <= t["stored_bytes"] <= t["raw_bytes"]
    assert t["stored_bytes"] == sum(min(r["coded_bytes"], r["raw_bytes"]) for r in rows)


def test_large_skewed_tensors_are_kept_coded_small_ones_raw(model):
    """8-bit codes of a Gaussian weight hold ~7 bits of entropy: the 9600-code embedding gains,
    while a small tensor's frequency table (~2 bytes a symbol) costs more than it saves."""
    rows = {r["name"]: r for r in coding_report(_uniform(model, bits=8))}
    emb = rows["embedding.weight_codes"]
    assert emb["stored"] == "rans" and emb["coded_bytes"] < 0.95 * emb["raw_bytes"]
    assert rows["layers.0.moe.router.weight_zeros"]["stored"] == "raw"
    assert coding_report(model) == []

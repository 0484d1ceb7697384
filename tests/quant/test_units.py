"""Mixed-precision storage: exact packing at every precision, byte accounting, loading and errors."""
from __future__ import annotations

import copy
import json
import struct

import pytest
import torch

from iteralite.io import grid

from iteralite.io.checkpoint import load_model as load_artifact
from iteralite.io.checkpoint import checkpoint_checksum, header_bytes, save_checkpoint
from iteralite.io.errors import CheckpointError, ParamsError
from iteralite.quant.config import mixed_config
from iteralite.quant.modules import MixedExperts
from iteralite.quant.swap import dequantize_model
from iteralite.quant.registry import PRECISIONS, parse_precision, precision_char, precision_spec
from iteralite.quant.units import allocation_bits, quantize_allocation, split_expert, unit_bits, units
from iteralite.quant.packing import pack_bits, unpack_bits
from iteralite.quant.fake import fake_weight


def _alloc(model, cycle=tuple(PRECISIONS)):
    return {u: cycle[i % len(cycle)] for i, u in enumerate(units(model))}


def _save(model, path, alloc, g=8):
    q = quantize_allocation(copy.deepcopy(model), alloc, g)
    save_checkpoint(path, q, kind="mixed", tokenizer_sha256="t", quant=mixed_config(alloc, g, model))
    return q


def test_precision_names_and_unknown_precision_error():
    assert [parse_precision(x) for x in ("int2", "INT3", "int4", "int8", "fp16", 2, 16)] == [2, 3, 4, 8, 16, 2, 16]
    assert [parse_precision(x) for x in ("ternary", " Ternary", 1, "1")] == [1, 1, 1, 1]
    assert [parse_precision(x) for x in ("8", " 16 ")] == [8, 16]  # a number written as text
    for bad in (5, "int5", "bf16", 4.0, True, None, "5", "4.0", "-4"):
        with pytest.raises(ParamsError, match=r"unknown precision .*allowed: 1, 2, 3, 4, 8, 16, .*ternary"):
            parse_precision(bad, "mixed_precision.precisions")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_code_width_round_trips_exactly(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 9, 24, 1001):
        codes = torch.randint(0, 2 ** bits, (n,), generator=g, dtype=torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.numel() == (n * bits + 7) // 8
        assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_saved_mixed_artifact_reloads_bit_for_bit(model, tmp_path):
    alloc = _alloc(model)
    q = _save(model, tmp_path / "m.safetensors", alloc)
    loaded, ckpt = load_artifact(tmp_path / "m.safetensors")
    assert ckpt.quant["precisions"] == "".join(precision_char(alloc[u]) for u in units(model))
    assert len(json.dumps(ckpt.quant)) < 120  # one character per unit, not a dictionary of names
    a, b = q.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 12))
    assert torch.equal(q(idx)[0], loaded(idx)[0])
    assert isinstance(loaded.layers[0].moe.experts, MixedExperts)


def test_each_unit_computes_with_its_fake_quantized_weight(model):
    alloc = _alloc(model, (3, 16, 2, 8, 4))
    q = quantize_allocation(copy.deepcopy(model), alloc, 8)
    ref = copy.deepcopy(model)
    from iteralite.quant.allocate import set_allocation_
    set_allocation_(ref, alloc, 8)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 12))
    torch.testing.assert_close(q(idx)[0], ref(idx)[0], atol=1e-5, rtol=1e-5)
    w = model.layers[0].mixer.in_proj.weight
    torch.testing.assert_close(q.layers[0].mixer.in_proj.dequantized_weight(), fake_weight(w, precision_spec(alloc["layers.0.mixer.in_proj"], w.shape[-1], 8)))


def test_bits_accounted_equal_the_file_bytes_minus_header_and_float_leftovers(model, tmp_path):
    """File = 8-byte length + JSON header + tensor bytes; tensor bytes = the allocation's exact
    stored bits / 8 + the FP32 leftovers (norms, conv, A_log, D, dt bias). Nothing else."""
    alloc = _alloc(model)
    path = tmp_path / "m.safetensors"
    q = _save(model, path, alloc)
    with open(path, "rb") as f:
        header = 8 + struct.unpack("<Q", f.read(8))[0]
    assert header == header_bytes(path)
    packed_names = ("_codes", "_scales", "_zeros", "weight_half")
    leftovers = sum(t.numel() * t.element_size() for k, t in q.state_dict().items()
                    if not any(s in k for s in packed_names))
    assert allocation_bits(model, alloc, 8) % 8 == 0
    assert path.stat().st_size == header + allocation_bits(model, alloc, 8) // 8 + leftovers
    assert leftovers < 0.1 * path.stat().st_size


def test_ternary_stores_minus_one_zero_plus_one_times_a_scale_per_group(model):
    """Every group of a ternary unit dequantizes to {-s, 0, +s} for its one fp16 scale s: three
    levels, no zero-point stored."""
    q = quantize_allocation(copy.deepcopy(model), {u: 1 for u in units(model)}, 8)
    qt = q.layers[0].mixer.in_proj.qtensor("weight_")
    assert qt.zeros is None and qt.symmetric and qt.bits == 2
    assert set(qt.codes.unique().tolist()) <= {1, 2, 3}  # -1, 0, +1 offset by 2
    w = qt.dequantize().reshape(*qt.scales.shape, -1)
    s = qt.scales.float()[..., None]
    assert torch.all((w == 0) | (w == s) | (w == -s))
    assert (w == 0).any() and (w > 0).any() and (w < 0).any()


def test_lower_precision_is_smaller_for_every_unit(model):
    for u, shape in units(model).items():
        sizes = [unit_bits(u, shape, p, 8) for p in PRECISIONS]
        assert sizes == sorted(sizes), (u, sizes)


def test_unit_bits_with_a_scale_grid_bound_what_the_grid_codec_stores(model):
    """With scale_bits, a unit's scales are counted at scale_bits each plus the grid's 5 bytes:
    what the compact layout's grid codec takes at most (it may find a narrower grid)."""
    alloc = _alloc(model)
    q = quantize_allocation(copy.deepcopy(model), alloc, 8, scale_bits=5)
    state = q.state_dict()
    for u, p in alloc.items():
        if p == 16:
            continue
        saved = unit_bits(u, units(model)[u], p, 8) - unit_bits(u, units(model)[u], p, 8, scale_bits=5)
        base, e = split_expert(u)
        keys = [k for k in state if k.endswith("scales") and k.startswith(base + ".")
                and (e is None or f".{e}.weight_scales" in k)]
        assert keys, u
        fp16 = sum(16 * state[k].numel() for k in keys)
        coded = sum(8 * len(grid.encode(state[k])) for k in keys)
        assert coded <= fp16 - saved, u


def test_to_float_matches_the_mixed_model(model):
    q = quantize_allocation(copy.deepcopy(model), _alloc(model), 8)
    f = dequantize_model(copy.deepcopy(q))
    assert not any("Quant" in type(m).__name__ or "Half" in type(m).__name__ or isinstance(m, MixedExperts)
                   for m in f.modules())
    idx = torch.randint(0, model.cfg.vocab_size, (1, 10))
    torch.testing.assert_close(f(idx)[0], q(idx)[0], atol=1e-5, rtol=1e-5)


def _rewrite_quant(src, dst, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    quant = json.loads(meta["quant"])
    edit(quant)
    meta["quant"] = json.dumps(quant)
    # re-signed, so the loader gets past the checksum to the quant config under test
    meta["sha256"] = checkpoint_checksum(meta, tensors)
    save_file(tensors, str(dst), metadata=meta)


def _set_first(q, char):
    q["precisions"] = char + q["precisions"][1:]


@pytest.mark.parametrize("edit,match", [
    (lambda q: _set_first(q, "5"), r"unknown precision characters \['5'\]"),
    (lambda q: q.update(version=99), "version 99 is not supported"),
    (lambda q: q.update(precisions=q["precisions"][1:]), "one per unit"),
    (lambda q: q.update(precisions=7), "must be a string"),
    (lambda q: _set_first(q, "8" if q["precisions"][0] != "8" else "4"), "tensors disagree with the stored config"),
    (lambda q: q.update(version=1, allocation={"embedding": 5}), r"missing \[.layers.0.mixer.dt_proj."),
])
def test_bad_mixed_quant_config_is_a_clear_checkpoint_error(model, tmp_path, edit, match):
    src = tmp_path / "m.safetensors"
    _save(model, src, _alloc(model))
    bad = tmp_path / "bad.safetensors"
    _rewrite_quant(src, bad, edit)
    with pytest.raises(CheckpointError, match=match):
        load_artifact(bad)


def test_version_1_mixed_config_still_loads(model, tmp_path):
    alloc = _alloc(model)
    src, old = tmp_path / "m.safetensors", tmp_path / "v1.safetensors"
    q = _save(model, src, alloc)

    def to_v1(quant):
        quant.update(version=1, allocation=alloc, bias={"layers.0.mixer.dt_proj": True})
        del quant["precisions"]
    _rewrite_quant(src, old, to_v1)
    loaded, _ = load_artifact(old)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 12))
    assert torch.equal(q(idx)[0], loaded(idx)[0])


def test_uniform_artifacts_still_load_through_the_same_loader(model, tmp_path):
    from iteralite.quant.config import quant_config
    from iteralite.quant.swap import make_spec_for, quantize
    from iteralite.quant.spec import QuantSpec
    q = quantize(copy.deepcopy(model), make_spec_for(QuantSpec(bits=4, group_size=8)))
    save_checkpoint(tmp_path / "u.safetensors", q, kind="int4", tokenizer_sha256="t", quant=quant_config(q))
    loaded, _ = load_artifact(tmp_path / "u.safetensors")
    idx = torch.randint(0, model.cfg.vocab_size, (1, 8))
    assert torch.equal(loaded(idx)[0], q(idx)[0])

"""The quantization registry: every format and precision entry, looked up by every consumer, and
no consumer dispatching around it."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from iteralite.io.errors import ParamsError
from iteralite.quant import registry
from iteralite.quant.coding import code_tensors
from iteralite.quant.config import apply_config, mixed_config, quant_config
from iteralite.quant.spec import QuantSpec
from iteralite.quant.swap import dequantize_model, make_spec_for, quantize
from iteralite.quant.units import quantize_allocation, units

ROOT = Path(__file__).resolve().parents[2]


def _spec(method: str) -> QuantSpec:
    return {"nf4": QuantSpec(bits=4, group_size=64, method="nf4"),
            "fp16": QuantSpec(bits=16, method="fp16")}.get(method, QuantSpec(bits=4, group_size=8, method=method))


@pytest.mark.parametrize("method", list(registry.FORMATS))
def test_every_format_stores_every_kind_it_names_and_is_found_again(model, method):
    fmt = registry.FORMATS[method]
    spec = _spec(method)
    spec.validate()
    for kind, cls in fmt.stored.items():
        float_module = {"linear": model.layers[0].mixer.in_proj, "embedding": model.embedding,
                        "experts": model.layers[0].moe.experts}[kind]
        stored = cls.empty(float_module, spec, kind)
        assert registry.is_stored(stored) and not registry.is_stored(float_module)
        assert registry.module_format(stored) is fmt
        assert registry.stored_kind(stored) == kind
        assert registry.stored_class("m", kind, spec) is cls


def test_a_format_without_a_stored_kind_says_so(model):
    with pytest.raises(ParamsError, match="method 'fp16' cannot store a experts"):
        registry.stored_class("layers.0.moe.experts", "experts", _spec("fp16"))


@pytest.mark.parametrize("method", ["rtn", "awq", "gptq", "nf4"])
def test_code_fields_are_exactly_the_code_buffers_of_the_stored_module(model, method):
    fmt = registry.FORMATS[method]
    q = copy.deepcopy(model)
    stats = None
    if fmt.stat is not None:
        from iteralite.quant.calib_stats import collect_act_stats
        stats = collect_act_stats(q, [torch.randint(0, model.cfg.vocab_size, (2, 16))], hessian=fmt.stat == "hessian")
    quantize(q, make_spec_for(_spec(method)), stats)
    views = code_tensors(q)
    lin = q.layers[0].mixer.in_proj
    want = [f"layers.0.mixer.in_proj.weight_{f}" for f, *_ in fmt.code_fields(tuple(lin._shapes["weight_"]), lin.spec)]
    assert want and all(k in views for k in want)
    assert {views[k].packing for k in want} <= set(registry.PACKINGS)


def test_native_sources_come_from_the_registry(model):
    q = quantize(copy.deepcopy(model), make_spec_for(_spec("rtn")))
    lin = q.layers[0].mixer.in_proj
    src = registry.module_format(lin).native(lin, "weight_")
    assert torch.equal(src.dequantize(), lin.dequantized_weight())
    h = quantize(copy.deepcopy(model), lambda name, m: _spec("fp16") if isinstance(m, nn.Linear) else None)
    hl = h.layers[0].mixer.in_proj
    assert registry.module_format(hl).native(hl, "weight_").dtype == torch.float16
    assert registry.FORMATS["nf4"].native is None  # the native step does not read NF4


@pytest.mark.parametrize("number", list(registry.PRECISIONS))
def test_every_precision_parses_by_name_number_and_char_and_keeps_its_levels(number):
    p = registry.PRECISIONS[number]
    assert registry.parse_precision(p.name) == registry.parse_precision(str(number)) == number
    assert registry.precision_of_char(p.char) == number and registry.precision_name(number) == p.name
    spec = p.spec(64, 16)
    spec.validate()
    assert spec.bits == p.bits
    if not registry.FORMATS[spec.method].integer:
        return
    w = torch.randn(8, 64) * 3
    codes = registry.quantize_tensor(w, spec).codes
    assert len(torch.unique(codes)) <= p.levels <= 2 ** p.bits


def test_ternary_is_three_levels_in_two_bit_codes():
    t = registry.PRECISIONS[registry.TERNARY]
    assert (t.name, t.bits, t.levels, t.char) == ("ternary", 2, 3, "t")
    codes = registry.quantize_tensor(torch.randn(16, 64), t.spec(64, 16)).codes
    assert set(torch.unique(codes).tolist()) == {1, 2, 3}  # -1, 0, +1 around the implied zero 2


def test_unknown_precision_lists_the_registry():
    with pytest.raises(ParamsError, match="allowed: 1, 2, 3, 4, 8, 16, ternary, int2, int3, int4, int8, fp16"):
        registry.parse_precision("int5")


def test_configs_round_trip_through_the_registry(model):
    alloc = {u: tuple(registry.PRECISIONS)[i % len(registry.PRECISIONS)] for i, u in enumerate(units(model))}
    q = quantize_allocation(copy.deepcopy(model), alloc, 8)
    cfg = mixed_config(alloc, 8, model)
    assert set(cfg["precisions"]) == set(registry.PRECISION_CHARS)
    rebuilt = apply_config(copy.deepcopy(model), cfg)
    rebuilt.load_state_dict(q.state_dict(), strict=True)
    with pytest.raises(ValueError, match="describe a mixed-precision model with mixed_config"):
        quant_config(q)
    u = quantize(copy.deepcopy(model), make_spec_for(_spec("rtn")))
    assert {m["kind"] for m in quant_config(u)["modules"].values()} == {"linear", "experts", "embedding"}


def test_dequantize_model_leaves_no_stored_module(model):
    alloc = {u: tuple(registry.PRECISIONS)[i % len(registry.PRECISIONS)] for i, u in enumerate(units(model))}
    q = dequantize_model(quantize_allocation(copy.deepcopy(model), alloc, 8))
    assert not any(registry.is_stored(m) for m in q.modules())


def test_no_consumer_dispatches_on_class_names_or_keeps_its_own_table():
    runtime = "\n".join(p.read_text() for p in (ROOT / "iteralite" / "runtime").rglob("*.py"))
    assert not re.search(r"__name__\s*(==|in)", runtime), "runtime/ dispatches on a class-name string"
    assert 'hasattr(m, "to_float")' not in runtime
    package = "\n".join(p.read_text() for p in (ROOT / "iteralite").rglob("*.py") if p.name != "registry.py")
    for old in ("METHODS[", "LINEAR_CLASSES", "CODE_FIELDS", "PRECISION_CHARS =", "_CHAR_PRECISION", "FORMATS ="):
        assert old not in package, f"{old} outside quant/registry.py"
    assert not re.search(r"from iteralite\.quant\.intcodes import [^\n]*\b_\w", package), "a private intcodes helper is imported"

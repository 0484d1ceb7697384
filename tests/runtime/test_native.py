"""The native step (iteralite/runtime/native): its C code equals its PyTorch `_ref` twin for every
precision on both code paths (AVX2 and scalar), the sparse top-k MoE equals the dense-gated
reference, the resident layout round-trips the packed codes, and it fails clearly where it cannot run.
(The AVX-512 path and the chunked prefill have their own tests in test_native_isa.py.)"""
import copy

import numpy as np
import pytest
import torch

from iteralite.quant.registry import PRECISIONS
from iteralite.quant.units import quantize_allocation, units
from iteralite.runtime.native import library
from iteralite.runtime.native import layout
from iteralite.runtime.native.ref import RefModel, act_int8_ref
from iteralite.runtime.native.runtime import NativeIteraLite, NativeUnavailable
from tests.conftest import tiny_config

ISAS = ["scalar", "avx2", "avx512"]


def packed(alloc_cycle, cfg=None, group_size=8, seed=0):
    from iteralite.core.model import IteraLite

    torch.manual_seed(seed)
    model = IteraLite(cfg or tiny_config()).eval()
    alloc = {u: alloc_cycle[i % len(alloc_cycle)] for i, u in enumerate(units(model))}
    return quantize_allocation(copy.deepcopy(model), alloc, group_size)


WIDE = dict(d_model=64, n_heads=4, headdim=16, d_state=8, dt_rank=8, d_ff=48, vocab_size=257)


def test_the_extension_is_built():
    """The README's setup builds the C step (CI runs this from a fresh clone)."""
    assert library.available(), "the native library was not built by the setup command"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_dim", [4, 8, 12, 48, 56])
def test_resident_rows_round_trip_the_codes(bits, in_dim):
    codes = torch.randint(0, 2 ** bits, (5, in_dim), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    rb = layout.RESIDENT_BITS[bits]
    m = layout.NativeMat(layout.INT, 5, in_dim, in_dim, rb, layout._repack_rows(codes, rb))
    assert torch.equal(m.unpacked_codes().to(torch.uint8), codes)
    assert m.codes.shape == (5, (in_dim * rb + 7) // 8)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_resident_weights_dequantize_exactly_like_the_artifact(precision):
    q = packed([precision])
    w = layout.native_weights(q)
    assert torch.equal(w.emb.dequantize(), q.embedding.dequantized("weight_"))
    for i, layer in enumerate(q.layers):
        for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
            want = getattr(layer.mixer, name).dequantized_weight()
            assert torch.equal(w.layers[i].mats[name].dequantize(), want), (i, name)
        for e in range(len(w.layers[i].w1)):
            w1, w2 = layer.moe.experts.expert_weights(e)
            assert torch.equal(w.layers[i].w1[e].dequantize(), w1) and torch.equal(w.layers[i].w2[e].dequantize(), w2)


def _run(model: NativeIteraLite, ref: RefModel, tokens):
    state, rstate = model.init_state(1), ref.init_state()
    worst = 0.0
    for t in tokens:
        logits, state = model.step(torch.tensor([t]), state)
        want, rstate = ref.step_ref(t, rstate)
        scale = want.abs().max().item()
        worst = max(worst, (logits[0] - want).abs().max().item() / scale)
    conv = np.concatenate([c.numpy().reshape(-1) for c, _ in rstate])
    ssm = np.concatenate([s.numpy().reshape(-1) for _, s in rstate])
    return worst, np.abs(state[0][0] - conv).max(), np.abs(state[0][1] - ssm).max()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cycle", [[p] for p in PRECISIONS] + [list(PRECISIONS)], ids=lambda c: "".join(map(str, c)))
def test_native_step_equals_its_ref_twin(isa, cycle):
    """Every precision alone and all mixed; logits within 1e-4 of their max, states within 1e-4
    (float32 sums in another order; the int8 activation rounding is the same)."""
    q = packed(cycle)
    w = layout.native_weights(q)
    model = NativeIteraLite(w, q.cfg, isa=isa)
    if model.isa != isa:
        pytest.skip(f"this CPU has no {isa}")
    worst, dconv, dssm = _run(model, RefModel(w), [1, 5, 299, 0, 17, 17, 42, 7])
    assert worst < 1e-4 and dconv < 1e-4 and dssm < 1e-4


@pytest.mark.parametrize("isa", ISAS)
def test_wide_layers_take_the_simd_main_loops(isa):
    """Rows of 48/64 inputs and groups of 48/64: the 32-code unpack and 16-lane dot loops run."""
    q = packed(list(PRECISIONS), tiny_config(**WIDE), group_size=64, seed=1)
    w = layout.native_weights(q)
    assert {m.group for m in w.all_mats()} >= {48, 64}
    model = NativeIteraLite(w, q.cfg, isa=isa)
    if model.isa != isa:
        pytest.skip(f"this CPU has no {isa}")
    worst, dconv, dssm = _run(model, RefModel(w), [3, 250, 9, 9, 100])
    assert worst < 1e-4 and dconv < 1e-4 and dssm < 1e-4


@pytest.mark.parametrize("group_size", [8, 16, 24, 32, 40, 48, 56, 64])
@pytest.mark.parametrize("cycle", [[2], [4], ["ternary", 3]], ids=lambda c: "".join(map(str, c)))
def test_every_specialised_group_kernel_equals_the_ref(group_size, cycle):
    """The AVX2 path at every group of 8..64 and code width (the packed 16-row kernel for codes of
    up to 4 bits), on a model whose matrices all take that group (inputs of 48/64/160 with groups
    dividing them, or the nearest divisor), equals the ref twin."""
    cfg = tiny_config(**dict(WIDE, d_model=group_size * (64 // group_size), d_ff=group_size * 2))
    q = packed(cycle, cfg, group_size=group_size, seed=group_size)
    w = layout.native_weights(q)
    assert group_size in {m.group for m in w.all_mats()}
    model = NativeIteraLite(w, q.cfg, isa="avx2")
    if model.isa != "avx2":
        pytest.skip("this CPU has no AVX2/FMA/F16C")
    worst, dconv, dssm = _run(model, RefModel(w), [3, 250, 9, 100])
    assert worst < 1e-4 and dconv < 1e-4 and dssm < 1e-4


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_simd_and_scalar_paths_agree_and_the_environment_forces_scalar(monkeypatch, isa):
    q = packed(list(PRECISIONS), tiny_config(**WIDE), group_size=64, seed=2)
    w = layout.native_weights(q)
    monkeypatch.setenv("ITERALITE_NATIVE_ISA", "scalar")
    forced = NativeIteraLite(w, q.cfg)
    assert forced.isa == "scalar"
    monkeypatch.delenv("ITERALITE_NATIVE_ISA")
    fast = NativeIteraLite(w, q.cfg, isa=isa)
    if fast.isa != isa:
        pytest.skip(f"this CPU has no {isa}")
    idx = torch.tensor([[4, 8, 15, 16, 23, 42]])
    a, b = forced(idx)[0], fast(idx)[0]
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_sparse_moe_runs_only_the_top_k_experts_and_equals_dense_gating():
    """With one expert's weights poisoned (NaN scales), tokens never routed to it are unaffected:
    the C step skips unselected experts, while the dense-gated twin multiplies them by zero."""
    q = packed([4])
    w = layout.native_weights(q)
    ref = RefModel(w)
    state = ref.init_state()
    x = ref._deq[id(w.emb)][3].clone()
    x, _, _ = ref.mixer_ref(0, x, *state[0])
    L = w.layers[0]
    p = torch.softmax(ref.matvec_ref(L.mats["router"], ref._rms(x, ref.vec[0]["norm2"], L.eps2)), -1)
    unused = int(p.argmin())
    model = NativeIteraLite(w, q.cfg)
    before = model(torch.tensor([[3]]))[0]
    L.w1[unused].scales[:] = np.float16(np.nan).view(np.uint16)
    poisoned = NativeIteraLite(w, q.cfg)
    assert torch.equal(poisoned(torch.tensor([[3]]))[0], before)


def test_greedy_loop_in_c_equals_stepping_with_argmax():
    q = packed(list(PRECISIONS))
    model = NativeIteraLite.from_model(q)
    got = model.greedy(5, 12, model.init_state(1))
    state, tok, want = model.init_state(1), torch.tensor([5]), []
    for _ in range(12):
        logits, state = model.step(tok, state)
        tok = logits.argmax(-1)
        want.append(int(tok))
    assert got == want


def test_resident_bytes_stay_near_the_packed_bytes():
    """Codes stay packed (3-bit rows as nibbles), so the resident weights are close to the file's
    packed tensors, far below a float copy."""
    q = packed(list(PRECISIONS), tiny_config(**WIDE), group_size=64)
    w = layout.native_weights(q)
    packed_bytes = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert w.resident_bytes <= 1.25 * packed_bytes


def test_int8_activation_rounding_is_per_block_and_half_to_even():
    x = torch.tensor([0.5, -1.0, 127.0, 1.5, 2.5, -2.5, 0.0, 3.0])
    assert torch.equal(act_int8_ref(x, 8), torch.round(x / 1.0).clamp(-127, 127))
    y = act_int8_ref(torch.tensor([1.0, 2.0, 100.0, -50.0]), 2)
    assert torch.allclose(y, torch.tensor([1.0, 2.0, 100.0, -50.0]), rtol=1e-2)


def test_a_float_model_is_refused_with_one_line(model):
    with pytest.raises(layout.NativeUnsupported, match="'embedding' is a TiedEmbedding; the native step runs packed"):
        NativeIteraLite.from_model(model)


def test_a_missing_library_says_how_to_build_it(monkeypatch):
    from iteralite.runtime.native import library
    monkeypatch.setattr(library, "_LIB", None)
    monkeypatch.setattr(library, "library_path", lambda: None)
    with pytest.raises(NativeUnavailable, match="not built here .*make setup.*needs a C compiler"):
        NativeIteraLite.from_model(packed([4]))


def test_sampling_on_the_native_step_with_a_tiny_top_p_is_the_greedy_loop_in_c():
    """Sampling lives in generate_ids, on the native step's logits: a nucleus of one token at any
    temperature and seed is the C greedy loop's story, and a real nucleus repeats with its seed."""
    from iteralite.train.generate import generate_ids

    model = NativeIteraLite.from_model(packed(list(PRECISIONS)))
    want = model.greedy(5, 12, model.init_state(1))
    for seed in range(3):
        assert list(generate_ids(model, [5], 12, temperature=1.7, top_k=0, top_p=1e-9, seed=seed)) == want
    a = list(generate_ids(model, [5], 12, temperature=1.2, top_k=0, top_p=0.9, seed=1))
    assert a == list(generate_ids(model, [5], 12, temperature=1.2, top_k=0, top_p=0.9, seed=1))


def test_the_structs_are_built_once_and_shared_by_every_runtime():
    q = packed(list(PRECISIONS))
    w = layout.native_weights(q)
    first = w.struct()
    kept = len(w._keep)
    for isa in ISAS:
        NativeIteraLite(w, q.cfg, isa=isa)
    assert w.struct() is first and len(w._keep) == kept


def test_more_experts_than_the_c_router_holds_are_refused_with_one_line(monkeypatch):
    q = packed([4])  # tiny_config's experts, more than the limit set here
    monkeypatch.setattr(layout, "MAX_EXPERTS", 1)
    with pytest.raises(layout.NativeUnsupported, match=r"experts; the native step routes at most 1 ") as e:
        layout.native_weights(q)
    assert "\n" not in str(e.value)

"""Factorised embeddings (`cfg.embed_rank` r > 0: a (V, r) table, `embed_in` r -> d after the lookup,
`head_proj` d -> r before the tied head) on every runtime: the native C step equals its `_ref` twin
(both code paths) and greedy-decodes the eager packed model's tokens; the twin without activation
rounding is the eager `IteraLite.step`; the fused runtime (eager, and its ONNX export) equals the
model; a dense model's native layout keeps its old shape; the C library validates the new fields."""
import copy

import pytest
import torch
from torch import nn

from iteralite.core.model import IteraLite
from iteralite.quant.registry import PRECISIONS, precision_spec
from iteralite.quant.swap import quantize
from iteralite.quant.units import allocation_spec_for, units
from iteralite.runtime.fused import FusedIteraLite
from iteralite.runtime.native import layout
from iteralite.runtime.native.ref import RefModel
from iteralite.runtime.native.runtime import NativeInputError, NativeIteraLite
from tests.conftest import tiny_config
from tests.runtime.test_native import ISAS, _run

pytestmark = pytest.mark.early  # compiles or spawns for a minute or more: handed out early (tests/conftest.py)

RANK = 8
PROJ = ("embed_in", "head_proj")
TOKENS = [1, 5, 299, 0, 17, 17, 42, 7]


def factorised_float(seed: int = 0, **kw) -> IteraLite:
    torch.manual_seed(seed)
    return IteraLite(tiny_config(embed_rank=RANK, **kw)).eval()


def factorised(proj, cycle=tuple(PRECISIONS), seed: int = 0, group_size: int = 8) -> IteraLite:
    """A random factorised model, packed: every other unit cycles through `cycle`; the projections
    at proj = (embed_in, head_proj) precisions, "float" (left nn.Linear, weights rounded to fp16
    values) or "raw" (left nn.Linear as initialised)."""
    model = factorised_float(seed)
    cycle = list(cycle)
    alloc = {u: cycle[i % len(cycle)] for i, u in enumerate(u for u in units(model) if u not in PROJ)}
    rest = allocation_spec_for(alloc, group_size)
    chosen = dict(zip(PROJ, proj))
    with torch.no_grad():
        for name, p in chosen.items():
            if p == "float":
                w = getattr(model, name).weight
                w.copy_(w.half().float())

    def spec_for(name, module):
        if name in chosen:
            p = chosen[name]
            return None if p in ("float", "raw") else precision_spec(p, module.weight.shape[1], group_size)
        return rest(name, module)

    return quantize(copy.deepcopy(model), spec_for)


PROJ_CASES = [(4, 8), (8, 4), (16, 16), ("float", "float"), (1, 2), (3, 16), (16, "float")]
ids = lambda c: "-".join(map(str, c))  # noqa: E731


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("proj", PROJ_CASES, ids=ids)
def test_native_step_equals_its_ref_twin(isa, proj):
    """Logits within 1e-4 of their max and states within 1e-4, as the dense native tests."""
    q = factorised(proj)
    w = layout.native_weights(q)
    assert w.rank == RANK and w.emb.in_ == RANK
    assert (w.embed_in.out, w.embed_in.in_, w.head_proj.out, w.head_proj.in_) == (32, RANK, RANK, 32)
    model = NativeIteraLite(w, q.cfg, isa=isa)
    if isa == "avx2" and model.isa != "avx2":
        pytest.skip("this CPU has no AVX2/FMA/F16C")
    worst, dconv, dssm = _run(model, RefModel(w), TOKENS)
    assert worst < 1e-4 and dconv < 1e-4 and dssm < 1e-4


@pytest.mark.parametrize("proj", PROJ_CASES, ids=ids)
def test_resident_projections_are_the_stored_weights_and_the_twin_is_the_eager_step(proj):
    """The resident matrices dequantize to exactly what the artifact computes with, and the twin
    without int8 activations equals `IteraLite.step` of the packed model (float rounding)."""
    q = factorised(proj)
    w = layout.native_weights(q)
    for name in PROJ:
        mod = getattr(q, name)
        want = mod.weight if isinstance(mod, nn.Linear) else mod.dequantized_weight()
        assert torch.equal(w.__dict__[name].dequantize(), want.float()), name
    ref = RefModel(w, int8_acts=False)
    rstate, estate = ref.init_state(), q.init_state(1)
    with torch.no_grad():
        for t in TOKENS:
            want, estate = q.step(torch.tensor([t]), estate)
            got, rstate = ref.step_ref(t, rstate)
            assert (got - want[0]).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("proj", [(4, 8), (16, 16), ("float", "float")], ids=ids)
def test_native_greedy_decodes_the_eager_models_tokens(proj):
    """120 greedy tokens of the C loop are the packed model's own (eager PyTorch) greedy tokens, and
    every step's native logits are within 2% of the eager ones (the int8 activation rounding)."""
    q = factorised(proj)
    nat = NativeIteraLite.from_model(q)
    got = nat.greedy(5, 120, nat.init_state(1))
    assert len(set(got)) >= 5  # a story, not one token repeated
    tok, est, nst, want = torch.tensor([5]), q.init_state(1), nat.init_state(1), []
    with torch.no_grad():
        for _ in range(120):
            el, est = q.step(tok, est)
            nl, nst = nat.step(tok, nst)
            assert (nl - el).abs().max() <= 0.02 * el.abs().max()
            tok = el.argmax(-1)
            want.append(int(tok))
    assert got == want


def test_a_float_projection_that_is_not_fp16_is_refused_with_one_line():
    q = factorised(("raw", 4))
    with pytest.raises(layout.NativeUnsupported, match="'embed_in' is a float Linear whose weights are not fp16 "
                                                       "values") as e:
        layout.native_weights(q)
    assert "\n" not in str(e.value)


def test_a_dense_model_keeps_its_native_layout():
    from tests.runtime.test_native import packed

    q = packed(list(PRECISIONS))
    w = layout.native_weights(q)
    assert w.rank == 0 and w.embed_in is None and w.head_proj is None
    assert w.emb.in_ == q.cfg.d_model and len(w.all_mats()) == 1 + sum(5 + 2 * len(L.w1) for L in w.layers)
    s = w.struct()
    assert s.rank == 0 and s.embed_in.codes is None and s.embed_in.w16 is None and s.head_proj.out == 0


@pytest.mark.parametrize("field,value,msg", [
    ("rank", RANK + 1, r"layer -1 emb has the wrong shape \(out 300, in 8\)"),
    ("rank", 0, r"layer -1 emb has the wrong shape \(out 300, in 8\)"),
    ("rank", -1, r"embedding rank -1 out of range"),
    ("embed_in.out", 31, r"layer -1 embed_in has the wrong shape"),
    ("head_proj.in_", 8, r"layer -1 head_proj has the wrong shape"),
    ("head_proj.codes", None, r"layer -1 head_proj has a null codes/scales/zeros pointer"),
])
def test_the_c_library_checks_the_factorised_fields(field, value, msg):
    w = layout.native_weights(factorised((4, 8)))
    s = w.struct()
    *path, last = field.split(".")
    setattr(getattr(s, path[0]) if path else s, last, value)
    with pytest.raises(NativeInputError, match="the native step cannot run this model: " + msg):
        NativeIteraLite(w, None)


def test_a_dense_struct_with_a_rank_is_refused():
    from tests.runtime.test_native import packed

    w = layout.native_weights(packed([4]))
    w.struct().rank = 4  # a (V, d) table but a rank: the table has the wrong width
    with pytest.raises(NativeInputError, match="emb has the wrong shape"):
        NativeIteraLite(w, None)


# ------------------------------------------------------------------------- fused (and ONNX Runtime)

def _fused_matches(ref, fused, atol=1e-5):
    idx = torch.randint(0, ref.cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        lr, _, sr = ref(idx, return_state=True)
        lf, _, sf = fused(idx, return_state=True)
        torch.testing.assert_close(lf, lr, atol=atol, rtol=1e-4)
        tok = lr[:, -1].argmax(-1)
        for _ in range(8):
            lr, sr = ref.step(tok, sr)
            lf, sf = fused.step(tok, sf)
            torch.testing.assert_close(lf, lr, atol=atol, rtol=1e-4)
            tok = lr.argmax(-1)


def test_fused_equals_the_float_factorised_model():
    model = factorised_float(1)
    fused = FusedIteraLite.from_model(model)
    assert fused.rank == RANK and fused.embed_in.shape == (32, RANK) and fused.head_proj.shape == (RANK, 32)
    _fused_matches(model, fused)


@pytest.mark.parametrize("proj", [(4, 8), (16, "float")], ids=ids)
def test_fused_equals_the_packed_factorised_model(proj):
    q = factorised(proj)
    _fused_matches(q, FusedIteraLite.from_model(q))


def test_compiled_fused_equals_the_factorised_model():
    """The AOTInductor step and prefill (the decode matmuls in their reduction form) too."""
    model = factorised_float(2)
    fused = FusedIteraLite.from_model(model).compile(prefill_lens=(19,), batch=2)
    assert fused._step_c is not None and (2, 19) in fused._forward_c
    _fused_matches(model, fused)


def test_a_dense_fused_model_has_no_projection_buffers(model):
    fused = FusedIteraLite.from_model(model)
    assert fused.rank == 0 and not any(k in ("embed_in", "head_proj") for k, _ in fused.named_buffers())


def test_onnxruntime_step_equals_the_fused_factorised_step():
    pytest.importorskip("onnxruntime")
    from iteralite.bench import ort_peer

    fused = FusedIteraLite.from_model(factorised((4, 8)))
    ort = ort_peer.OrtStep(fused, ort_peer.export_step(fused))
    fs, os_ = fused.init_state(1), ort.init_state(1)
    for t in TOKENS:
        want, fs = fused.step(torch.tensor([t]), fs)
        got, os_ = ort.step(torch.tensor([t]), os_)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

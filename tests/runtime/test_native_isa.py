"""The native step's code paths and its chunked prefill: the AVX-512 VNNI path (the context's own
copy of the codes, 16 rows a block) equals the `_ref` twin at every precision, group width and
row count; every path gives the same greedy tokens; `forward` (itl_prefill, a chunk of tokens
through each matrix at once) equals stepping token by token across chunk boundaries; the ISA
names, fallbacks and the environment override."""
import ctypes

import numpy as np
import pytest
import torch

from iteralite.quant.registry import PRECISIONS
from iteralite.runtime.native import layout
from iteralite.runtime.native.ref import RefModel
from iteralite.runtime.native.runtime import ISAS, NativeInputError, NativeIteraLite, _fptr, load_library
from tests.conftest import tiny_config
from tests.runtime.test_factorised import factorised
from tests.runtime.test_native import WIDE, _run, packed

CHUNK = 16  # ITL_CHUNK in itl_step.c


def _has(isa: str) -> bool:
    lib = load_library()
    return {"scalar": True, "avx2": bool(lib.itl_avx2_supported()), "avx512": bool(lib.itl_avx512_supported())}[isa]


def _on(w, cfg, isa: str) -> NativeIteraLite:
    if not _has(isa):
        pytest.skip(f"this CPU has no {isa}")
    model = NativeIteraLite(w, cfg, isa=isa)
    assert model.isa == isa
    return model


needs512 = pytest.mark.skipif(not _has("avx512"), reason="this CPU has no AVX-512 F/BW/VL + VNNI")


@needs512
@pytest.mark.parametrize("cycle", [[p] for p in PRECISIONS] + [list(PRECISIONS)], ids=lambda c: "".join(map(str, c)))
def test_avx512_step_equals_its_ref_twin(cycle):
    """Every precision alone and all mixed (2-, 4- and 8-bit resident codes, fp16), as the other paths."""
    q = packed(cycle)
    w = layout.native_weights(q)
    worst, dconv, dssm = _run(_on(w, q.cfg, "avx512"), RefModel(w), [1, 5, 299, 0, 17, 17, 42, 7])
    assert worst < 1e-4 and dconv < 1e-4 and dssm < 1e-4


@needs512
@pytest.mark.parametrize("group_size", [4, 8, 12, 20, 24, 40, 48, 56, 64])
@pytest.mark.parametrize("cycle", [[2], [4], [8], ["ternary", 3]], ids=lambda c: "".join(map(str, c)))
def test_avx512_every_group_width_and_row_count_equals_the_ref(group_size, cycle):
    """Groups that are not a multiple of 8 (padded with zero codes), rows that are not a multiple
    of 16 (the last block partly empty), wide layers (several groups a row)."""
    cfg = tiny_config(**dict(WIDE, d_model=group_size * (64 // group_size), d_ff=group_size * 2 + 4))
    q = packed(cycle, cfg, group_size=group_size, seed=group_size)
    w = layout.native_weights(q)
    assert group_size in {m.group for m in w.all_mats()}
    assert any(m.out % 16 for m in w.all_mats())
    worst, dconv, dssm = _run(_on(w, q.cfg, "avx512"), RefModel(w), [3, 250, 9, 100])
    assert worst < 1e-4 and dconv < 1e-4 and dssm < 1e-4


@needs512
@pytest.mark.parametrize("proj", [(4, 8), (16, 16), ("float", "float"), (3, 16)], ids=lambda c: "-".join(map(str, c)))
def test_avx512_factorised_embedding_equals_its_ref_twin(proj):
    q = factorised(proj)
    w = layout.native_weights(q)
    worst, dconv, dssm = _run(_on(w, q.cfg, "avx512"), RefModel(w), [1, 5, 299, 0, 17, 17, 42, 7])
    assert worst < 1e-4 and dconv < 1e-4 and dssm < 1e-4


def test_every_path_gives_the_same_greedy_tokens():
    q = packed(list(PRECISIONS), tiny_config(**WIDE), group_size=64, seed=3)
    w = layout.native_weights(q)
    runs = {isa: NativeIteraLite(w, q.cfg, isa=isa) for isa in ISAS if _has(isa)}
    got = {isa: rt.greedy(7, 24, rt.init_state(1)) for isa, rt in runs.items()}
    assert len(set(map(tuple, got.values()))) == 1, got


def _stepped(model, idx):
    state, rows = model.init_state(1), []
    for t in idx:
        logits, state = model.step(torch.tensor([t]), state)
        rows.append(logits[0])
    return torch.stack(rows), state


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_chunked_prefill_equals_stepping_token_by_token(isa, length):
    """Logits of every position and the state after the prompt; then the same greedy tokens."""
    q = packed(list(PRECISIONS), tiny_config(**WIDE), group_size=64, seed=4)
    w = layout.native_weights(q)
    model = _on(w, q.cfg, isa)
    idx = torch.randint(0, w.vocab, (length,), generator=torch.Generator().manual_seed(length))
    want, wstate = _stepped(model, idx.tolist())
    got, _, state = model(idx[None], return_state=True)
    assert (got[0] - want).abs().max() <= 1e-5 * want.abs().max()
    for a, b in zip(state[0], wstate[0]):
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max())
    tok = int(idx[-1])
    assert model.greedy(tok, 12, state) == model.greedy(tok, 12, wstate)


def test_prefill_of_a_batch_runs_each_row_on_its_own_state():
    q = packed(list(PRECISIONS), tiny_config(**WIDE), group_size=64, seed=5)
    model = NativeIteraLite.from_model(q)
    idx = torch.randint(0, q.cfg.vocab_size, (3, CHUNK + 3), generator=torch.Generator().manual_seed(0))
    got = model(idx)[0]
    for b in range(3):
        want, _ = _stepped(model, idx[b].tolist())
        assert (got[b] - want).abs().max() <= 1e-5 * want.abs().max()


def test_prefill_in_c_with_the_last_logits_only_and_its_checks():
    """all = 0 writes the last token's logits alone (a vocab-sized buffer is enough); a bad token
    anywhere in the prompt, a short logits buffer or a negative count is refused before anything
    is written."""
    q = packed(list(PRECISIONS), tiny_config(**WIDE), group_size=64, seed=6)
    model = NativeIteraLite.from_model(q)
    lib, V = model.lib, model.w.vocab
    ids = np.array([4, 8, 15, 16, 23, 42] * 4, dtype=np.int32)
    conv, ssm = model.init_state(1)[0]
    logits = np.zeros(V, np.float32)
    iptr = ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
    assert lib.itl_prefill(model._ctx, iptr, ids.size, _fptr(conv), conv.size, _fptr(ssm), ssm.size,
                           _fptr(logits), V, 0) == 0
    want, _, state = model(torch.from_numpy(ids.astype(np.int64))[None], return_state=True)
    assert np.array_equal(logits, want[0, -1].numpy()) and np.array_equal(conv, state[0][0])
    bad = ids.copy()
    bad[-1] = V
    c2, s2 = model.init_state(1)[0]
    args = (_fptr(c2), c2.size, _fptr(s2), s2.size)
    assert lib.itl_prefill(model._ctx, bad.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), bad.size, *args,
                           _fptr(logits), V, 0) == 3
    assert lib.itl_prefill(model._ctx, iptr, ids.size, *args, _fptr(logits), V, 1) == 5  # needs n * vocab
    assert lib.itl_prefill(model._ctx, iptr, -1, *args, _fptr(logits), V, 0) == 6
    assert lib.itl_prefill(None, iptr, 1, *args, _fptr(logits), V, 0) == 2
    assert not c2.any() and not s2.any()
    with pytest.raises(NativeInputError, match="outside the vocabulary"):
        model(torch.tensor([[1, 2, V]]))


def test_isa_names_fallbacks_and_the_environment(monkeypatch):
    q = packed([4])
    w = layout.native_weights(q)
    best = "avx512" if _has("avx512") else "avx2" if _has("avx2") else "scalar"
    assert NativeIteraLite(w, q.cfg).isa == best
    rt = NativeIteraLite(w, q.cfg)
    assert rt.set_isa("avx512") == best and rt.set_isa("scalar") == "scalar"
    assert rt.set_isa("avx2") == ("avx2" if _has("avx2") else "scalar")
    with pytest.raises(ValueError, match="isa must be one of scalar, avx2, avx512"):
        rt.set_isa("neon")
    for env, want in (("scalar", "scalar"), ("avx2", "avx2" if _has("avx2") else "scalar")):
        monkeypatch.setenv("ITERALITE_NATIVE_ISA", env)
        assert NativeIteraLite(w, q.cfg).isa == want


def test_an_empty_prompt_gives_no_logits_and_leaves_the_state():
    q = packed([4])
    model = NativeIteraLite.from_model(q)
    state = model.init_state(2)
    logits, _, state = model(torch.zeros(2, 0, dtype=torch.long), state, return_state=True)
    assert logits.shape == (2, 0, q.cfg.vocab_size) and not any(a.any() for row in state for a in row)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [dict(d_state=16, headdim=32), dict(d_state=16, headdim=24), dict(d_state=20, headdim=16),
                                   dict(d_conv=3), dict(d_conv=2, d_state=16, headdim=16)], ids=lambda s: str(s))
def test_state_and_conv_shapes_take_every_kernel_and_equal_the_ref(isa, shape):
    """A state of 16 (sixteen channels' dots reduced together, plus a channel tail) or not, and
    conv windows other than 4 taps (the scalar conv loop beside the 4-tap vector one)."""
    q = packed(list(PRECISIONS), tiny_config(**dict(WIDE, **shape)), group_size=64, seed=7)
    w = layout.native_weights(q)
    worst, dconv, dssm = _run(_on(w, q.cfg, isa), RefModel(w), [3, 250, 9, 100, 17])
    assert worst < 1e-4 and dconv < 1e-4 and dssm < 1e-4


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group_size", [4, 12, 20, 40, 56])
@pytest.mark.parametrize("cycle", [[2], [4], [8], list(PRECISIONS)], ids=lambda c: "".join(map(str, c)))
def test_chunked_prefill_equals_stepping_at_every_group_width(isa, group_size, cycle):
    """The prefill's kernels (four tokens a block of codes, on the AVX-512 and the AVX2 paths)
    against the single-token step, groups that are and are not a multiple of 8."""
    cfg = tiny_config(**dict(WIDE, d_model=group_size * (64 // group_size), d_ff=group_size * 2 + 4))
    q = packed(cycle, cfg, group_size=group_size, seed=group_size + 1)
    w = layout.native_weights(q)
    model = _on(w, q.cfg, isa)
    idx = torch.randint(0, w.vocab, (CHUNK + 7,), generator=torch.Generator().manual_seed(group_size))
    want, wstate = _stepped(model, idx.tolist())
    got, _, state = model(idx[None], return_state=True)
    assert (got[0] - want).abs().max() <= 1e-5 * want.abs().max()
    assert np.abs(state[0][1] - wstate[0][1]).max() <= 1e-5 * max(1.0, np.abs(wstate[0][1]).max())

"""The native runtime's boundary: bad tokens, counts and states end in one NativeInputError line
(checked in Python and again by the C library's own ITL_ERR_* codes), a runtime is copy-safe,
closed once, and thread-safe."""
import copy
import ctypes
import gc
import pickle
import threading

import numpy as np
import pytest
import torch

from iteralite.io.errors import IteraliteError
from iteralite.quant.registry import PRECISIONS
from iteralite.runtime.native import layout
from iteralite.runtime.native.runtime import NativeClosed, NativeInputError, NativeIteraLite, _fptr
from tests.conftest import tiny_config
from tests.runtime.test_native import WIDE, packed


@pytest.fixture(scope="module")
def rt():
    return NativeIteraLite.from_model(packed(list(PRECISIONS)))


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, IteraliteError)
    return msg


BAD_TOKENS = [-1, 10 ** 6, 2 ** 31, 2 ** 32 + 5, -(2 ** 40)]


@pytest.mark.parametrize("tok", BAD_TOKENS)
def test_greedy_refuses_a_token_outside_the_vocabulary(rt, tok):
    state = rt.init_state(1)
    with pytest.raises(NativeInputError, match=rf"token id {tok} is outside the vocabulary \(0\.\.") as e:
        rt.greedy(tok, 3, state)
    one_line(e)
    assert not state[0][0].any() and not state[0][1].any()  # nothing ran


@pytest.mark.parametrize("tok", [1.5, True, "3", None])
def test_greedy_refuses_a_token_that_is_not_an_integer(rt, tok):
    with pytest.raises(NativeInputError, match="a token id must be an integer") as e:
        rt.greedy(tok, 3, rt.init_state(1))
    one_line(e)


@pytest.mark.parametrize("n", [-1, 2 ** 31, 2.0])
def test_greedy_refuses_a_bad_count(rt, n):
    with pytest.raises(NativeInputError, match=r"n must be an integer in 0\.\.2147483647"):
        rt.greedy(3, n, rt.init_state(1))


@pytest.mark.parametrize("tok", BAD_TOKENS)
def test_step_and_forward_refuse_a_token_outside_the_vocabulary(rt, tok):
    with pytest.raises(NativeInputError, match=rf"token id {tok} is outside"):
        rt.step(torch.tensor([tok]), rt.init_state(1))
    with pytest.raises(NativeInputError, match=rf"token id {tok} is outside"):
        rt(torch.tensor([[3, tok]]))


def test_float_token_ids_are_refused(rt):
    with pytest.raises(NativeInputError, match="token ids must be integers; got dtype float32"):
        rt.step(torch.tensor([3.0]), rt.init_state(1))


def test_more_tokens_than_state_rows_are_refused_not_dropped(rt):
    with pytest.raises(NativeInputError, match=r"3 token row\(s\) but 2 state row\(s\); use this runtime's init_state\(3\)"):
        rt.step(torch.tensor([1, 2, 3]), rt.init_state(2))
    with pytest.raises(NativeInputError, match=r"2 token row\(s\) but 1 state row\(s\)"):
        rt(torch.tensor([[1], [2]]), rt.init_state(1))
    with pytest.raises(NativeInputError, match=r"1 token row\(s\) but 2 state row\(s\)"):
        rt.greedy(1, 2, rt.init_state(2))


def _bad_states(rt):
    conv, ssm = rt.init_state(1)[0]
    return {
        "short": ([(conv[:-1].copy(), ssm)], "conv must be float32 of shape"),
        "long": ([(conv, np.zeros(ssm.size + 8, np.float32))], "ssm must be float32 of shape"),
        "float64": ([(conv.astype(np.float64), ssm)], "conv must be float32 of shape .* got float64"),
        "float16": ([(conv, ssm.astype(np.float16))], "ssm must be float32 of shape .* got float16"),
        "view": ([(np.zeros(2 * conv.size, np.float32)[::2], ssm)], "C-contiguous, aligned, writable"),
        "readonly": ([(np.frombuffer(bytes(conv.nbytes), np.float32), ssm)], "C-contiguous, aligned, writable"),
        "torch": ([(torch.from_numpy(conv), torch.from_numpy(ssm))], "must be a numpy array; got Tensor"),
        "triple": ([(conv, ssm, ssm)], r"must be a \(conv, ssm\) pair"),
        "dict": ({"conv": conv}, "must be init_state's list of"),
    }


@pytest.mark.parametrize("case", ["short", "long", "float64", "float16", "view", "readonly", "torch", "triple", "dict"])
def test_states_of_the_wrong_size_dtype_layout_or_type_are_refused(rt, case):
    state, msg = _bad_states(rt)[case]
    for call in (lambda: rt.greedy(3, 2, state), lambda: rt.step(torch.tensor([3]), state),
                 lambda: rt(torch.tensor([[3]]), state)):
        with pytest.raises(NativeInputError, match=msg) as e:
            call()
        one_line(e)


def test_a_state_of_another_model_is_refused(rt):
    other = NativeIteraLite.from_model(packed([4], tiny_config(**WIDE), group_size=64))
    with pytest.raises(NativeInputError, match="the state was made by another model's runtime"):
        rt.greedy(3, 2, other.init_state(1))
    with pytest.raises(NativeInputError, match="must be float32 of shape"):  # untagged: its sizes
        rt.greedy(3, 2, list(other.init_state(1)))
    same_shape = NativeIteraLite.from_model(packed([8]))  # same sizes, other weights: the tag
    with pytest.raises(NativeInputError, match="the state was made by another model's runtime"):
        rt.greedy(3, 2, same_shape.init_state(1))
    twin = NativeIteraLite(rt.w, rt.cfg)  # another runtime over the same weights: its states fit
    assert twin.greedy(3, 4, rt.init_state(1)) == rt.greedy(3, 4, rt.init_state(1))
    state = rt.init_state(1)
    rt.greedy(3, 2, state)
    for dup in (copy.copy(state), copy.deepcopy(state), pickle.loads(pickle.dumps(state))):
        assert rt.greedy(7, 4, dup) == rt.greedy(7, 4, copy.deepcopy(state))  # copies keep fitting


# ------------------------------------------------------------------------- the C library's own checks

def test_the_c_step_checks_its_own_inputs(rt):
    """Called without the Python checks in front, every entry point returns an error code."""
    lib, (conv, ssm), logits = rt.lib, rt.init_state(1)[0], np.zeros(rt.w.vocab, np.float32)
    out = np.zeros(4, np.int32)
    optr = out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
    args = (_fptr(conv), conv.size, _fptr(ssm), ssm.size, _fptr(logits), logits.size)
    assert lib.itl_step(rt._ctx, 3, *args) == 0
    for tok in (-1, rt.w.vocab, 2 ** 31 - 1):
        assert lib.itl_step(rt._ctx, tok, *args) == 3 and lib.itl_greedy(rt._ctx, tok, 4, *args, optr) == 3
    assert lib.itl_step(None, 3, *args) == 2 and lib.itl_greedy(None, 3, 4, *args, optr) == 2
    assert lib.itl_step(ctypes.addressof(rt._struct), 3, *args) == 2  # not a context
    assert lib.itl_step(rt._ctx, 3, None, conv.size, *args[2:]) == 1
    assert lib.itl_step(rt._ctx, 3, _fptr(conv), conv.size - 1, *args[2:]) == 4
    assert lib.itl_step(rt._ctx, 3, *args[:3], ssm.size - 1, *args[4:]) == 4
    assert lib.itl_step(rt._ctx, 3, *args[:5], logits.size - 1) == 5
    assert lib.itl_greedy(rt._ctx, 3, -1, *args, optr) == 6
    assert lib.itl_greedy(rt._ctx, 3, 4, *args, None) == 1
    assert lib.itl_get_isa(None) < 0 and lib.itl_set_isa(None, 1) < 0 and lib.itl_create(None) is None
    assert lib.itl_strerror(3) == b"the token id is outside the vocabulary"
    lib.itl_free(None)


@pytest.mark.parametrize("field,value,msg", [
    ("e", layout.MAX_EXPERTS + 1, r"layer 0 has 65 experts; the step routes 1\.\.64"),
    ("e", 0, "layer 0 has 0 experts"),
    ("k", 99, r"layer 0 routes top-99 of \d+ experts"),
    ("k", 0, "layer 0 routes top-0"),
    ("d_inner", 10 ** 6, "layer 0 sizes out of range"),
])
def test_the_c_library_refuses_an_inconsistent_model(field, value, msg):
    """The C router's arrays and the scratch buffers are guarded in C, not only by layout.py."""
    w = layout.native_weights(packed([4]))
    layers = ctypes.cast(w.struct().layers, ctypes.POINTER(layout.Layer))
    setattr(layers[0], field, value)
    with pytest.raises(NativeInputError, match="the native step cannot run this model: " + msg) as e:
        NativeIteraLite(w, None)
    one_line(e)


def test_the_library_override_must_name_a_file(monkeypatch, tmp_path):
    from iteralite.runtime.native import library, runtime
    monkeypatch.setattr(library, "_LIB", None)
    monkeypatch.setenv("ITERALITE_NATIVE_LIB", str(tmp_path / "missing.so"))
    with pytest.raises(runtime.NativeUnavailable, match="ITERALITE_NATIVE_LIB=.*missing.so is not a file"):
        NativeIteraLite.from_model(packed([4]))



def test_a_stale_or_foreign_library_is_unavailable_not_a_traceback(monkeypatch, tmp_path):
    """A library built from older sources (a symbol missing: here a C library with none of ours)
    or a file that is not a library: NativeUnavailable with the fix, so `--runtime auto` falls back."""
    import shutil
    from iteralite.runtime.native import library, runtime
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("needs a C compiler")
    import subprocess
    src = tmp_path / "old.c"
    src.write_text("int itl_create(void) { return 0; }\n")
    subprocess.run([gcc, "-shared", "-fPIC", "-o", str(tmp_path / "old.so"), str(src)], check=True)
    (tmp_path / "junk.so").write_bytes(b"not a library")
    for name, match in (("old.so", "itl_check_model"), ("junk.so", "cannot be used")):
        monkeypatch.setattr(library, "_LIB", None)
        monkeypatch.setenv("ITERALITE_NATIVE_LIB", str(tmp_path / name))
        with pytest.raises(runtime.NativeUnavailable, match=match) as e:
            NativeIteraLite.from_model(packed([4]))
        assert "make setup" in str(e.value) and "\n" not in str(e.value)

# ------------------------------------------------------------------------- lifetime, copies, threads

def test_calls_after_close_raise_one_line():
    rt = NativeIteraLite.from_model(packed([4]))
    rt.close()
    rt.close()  # idempotent
    for call in (lambda: rt.greedy(3, 2, rt.init_state(1)), lambda: rt.step(torch.tensor([3]), rt.init_state(1)),
                 lambda: rt(torch.tensor([[3]])), lambda: rt.isa, lambda: rt.set_isa("scalar")):
        with pytest.raises(NativeClosed, match="was closed; make a new one") as e:
            call()
        one_line(e)
    rt.__del__()
    with pytest.raises(NativeClosed):
        rt.greedy(3, 2, rt.init_state(1))


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy])
def test_a_copy_has_its_own_context_and_collecting_it_leaves_the_original_working(how):
    rt = NativeIteraLite.from_model(packed(list(PRECISIONS)), isa="scalar")
    want = rt.greedy(5, 8, rt.init_state(1))
    dup = how(rt)
    assert dup._ctx != rt._ctx and dup.isa == "scalar"
    assert dup.greedy(5, 8, dup.init_state(1)) == want
    del dup
    gc.collect()
    assert rt.greedy(5, 8, rt.init_state(1)) == want


def test_a_runtime_refuses_to_be_pickled():
    rt = NativeIteraLite.from_model(packed([4]))
    with pytest.raises(TypeError, match="cannot be pickled .*load_native"):
        pickle.dumps(rt)


def test_two_threads_stepping_one_runtime_give_the_sequential_logits():
    """ctypes releases the GIL: without the runtime's lock the shared scratch races."""
    rt = NativeIteraLite.from_model(packed(list(PRECISIONS), tiny_config(**WIDE), group_size=64))
    seqs = [[(7 * i + 3 * j) % rt.w.vocab for j in range(60)] for i in range(2)]

    def run(seq):
        state, out = rt.init_state(1), []
        for t in seq:
            logits, state = rt.step(torch.tensor([t]), state)
            out.append(logits)
        return torch.cat(out), rt.greedy(seq[-1], 40, state)

    want = [run(s) for s in seqs]
    for _ in range(3):
        got = [None, None]
        barrier = threading.Barrier(2)

        def worker(i):
            barrier.wait()
            got[i] = run(seqs[i])
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for (gl, gt), (wl, wt) in zip(got, want):
            assert torch.equal(gl, wl) and gt == wt

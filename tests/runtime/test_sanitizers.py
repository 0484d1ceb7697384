"""The C step under AddressSanitizer and UndefinedBehaviorSanitizer: every `*.c` of the native
folder built with ASan+UBSan into a temporary library, loaded through ITERALITE_NATIVE_LIB in a
subprocess with the ASan runtime preloaded, runs the step (every code path) against its `_ref`
twin and the chunked prefill against stepping, the bad tokens/counts/states (each the one clear
error, not a sanitizer report), the C entry points called with bad arguments directly, copies,
close, two threads, and a seeded fuzz of valid and invalid calls. Skipped only where gcc is
missing."""
import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.early  # compiles or spawns for a minute or more: handed out early (tests/conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NATIVE = os.path.join(ROOT, "iteralite", "runtime", "native")
FLAGS = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined",
         "-std=gnu11", "-shared", "-fPIC"]

SCRIPT = textwrap.dedent(r"""
    import copy, ctypes, gc, threading
    import numpy as np, torch
    from iteralite.quant.registry import PRECISIONS
    from iteralite.runtime.native import layout, runtime
    from iteralite.runtime.native.runtime import NativeInputError, NativeClosed, NativeIteraLite, _fptr
    from iteralite.runtime.native.ref import RefModel
    from tests.conftest import tiny_config
    from tests.runtime.test_native import WIDE, _run, packed
    from tests.runtime.test_factorised import factorised

    assert runtime.library_path() == __import__("os").environ["ITERALITE_NATIVE_LIB"]

    def refused(call, what):
        try:
            call()
        except NativeInputError as e:
            assert "\n" not in str(e), e
            return
        raise AssertionError(f"{what}: not refused")

    # the step equals its ref twin, both code paths, narrow and wide (SIMD main loops) models
    # and factorised embeddings (a (V, r) table, embed_in / head_proj) at int and fp16 projections
    for q in (packed(list(PRECISIONS)), packed(list(PRECISIONS), tiny_config(**WIDE), group_size=64, seed=1),
              factorised((4, 8)), factorised((16, 3))):
        w = layout.native_weights(q)
        for isa in ("scalar", "avx2", "avx512"):
            rt = NativeIteraLite(w, q.cfg, isa=isa)
            worst, dconv, dssm = _run(rt, RefModel(w), [3, 250 % w.vocab, 9, 0, 100])
            assert worst < 1e-4 and dconv < 1e-4 and dssm < 1e-4, (isa, worst, dconv, dssm)
            # the chunked prefill (itl_prefill) across a chunk boundary equals stepping
            idx = torch.arange(37)[None] % w.vocab
            got, _, st = rt(idx, return_state=True)
            want, wst = [], rt.init_state(1)
            for t in idx[0]:
                logits, wst = rt.step(t[None], wst)
                want.append(logits[0])
            assert (got[0] - torch.stack(want)).abs().max() <= 1e-5 * got.abs().max(), isa
            assert np.abs(st[0][1] - wst[0][1]).max() <= 1e-5 * max(1.0, np.abs(wst[0][1]).max()), isa

    rt = NativeIteraLite.from_model(packed(list(PRECISIONS)))
    V = rt.w.vocab
    conv, ssm = rt.init_state(1)[0]
    for tok in (-1, V, 2 ** 31, 2 ** 40, -(2 ** 63)):
        refused(lambda: rt.greedy(tok, 4, rt.init_state(1)), f"greedy token {tok}")
        refused(lambda: rt.step(torch.tensor([tok]), rt.init_state(1)), f"step token {tok}")
    bad_states = [[(conv[:-1].copy(), ssm)], [(conv.astype(np.float64), ssm)], [(conv, ssm.astype(np.float16))],
                  [(np.zeros(2 * conv.size, np.float32)[::2], ssm)], [(torch.zeros(conv.size), ssm)],
                  [(np.frombuffer(bytes(conv.nbytes), np.float32), ssm)], []]
    for st in bad_states:
        refused(lambda: rt.greedy(3, 4, st), "bad state")
        refused(lambda: rt.step(torch.tensor([3]), st), "bad state")
    refused(lambda: rt.greedy(3, -1, rt.init_state(1)), "negative n")
    refused(lambda: rt.step(torch.tensor([1, 2]), rt.init_state(1)), "more tokens than states")

    # the C entry points, called directly with bad arguments
    lib, logits = rt.lib, np.zeros(V, np.float32)
    out = np.zeros(4, np.int32)
    optr = out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
    args = (_fptr(conv), conv.size, _fptr(ssm), ssm.size, _fptr(logits), logits.size)
    assert lib.itl_step(rt._ctx, 2 ** 31 - 1, *args) == 3 and lib.itl_step(rt._ctx, -5, *args) == 3
    assert lib.itl_step(None, 1, *args) == 2 and lib.itl_step(rt._ctx, 1, None, 0, None, 0, None, 0) == 1
    assert lib.itl_step(rt._ctx, 1, *args[:5], V - 1) == 5 and lib.itl_greedy(rt._ctx, 1, 4, *args, None) == 1
    assert lib.itl_check_model(None, None, 0) != 0 and lib.itl_create(None) is None
    ids = np.arange(20, dtype=np.int32)
    iptr = ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
    assert lib.itl_prefill(rt._ctx, iptr, 20, *args, 0) == 0  # the last logits only
    assert lib.itl_prefill(rt._ctx, iptr, 20, *args, 1) == 5 and lib.itl_prefill(rt._ctx, iptr, -1, *args, 0) == 6
    assert lib.itl_prefill(rt._ctx, None, 2, *args, 0) == 1 and lib.itl_prefill(None, iptr, 2, *args, 0) == 2

    # copies, close
    dup = copy.copy(rt)
    want = dup.greedy(5, 6, dup.init_state(1))
    del dup
    gc.collect()
    assert rt.greedy(5, 6, rt.init_state(1)) == want
    deep = copy.deepcopy(rt)
    assert deep.greedy(5, 6, deep.init_state(1)) == want
    deep.close()
    try:
        deep.greedy(5, 6, deep.init_state(1))
        raise AssertionError("a closed runtime stepped")
    except NativeClosed:
        pass

    # two threads on one runtime
    res = [None, None]
    def work(i):
        res[i] = rt.greedy(5 + i, 30, rt.init_state(1))
    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert res == [rt.greedy(5 + i, 30, rt.init_state(1)) for i in range(2)]

    # seeded fuzz: random valid calls succeed, invalid ones are refused
    rng = np.random.default_rng(0)
    for it in range(300):
        tok = int(rng.choice([rng.integers(0, V), rng.integers(-3, 0), rng.integers(V, V + 3), 2 ** 33]))
        st = rt.init_state(1)
        bad = not 0 <= tok < V
        if rng.random() < 0.3:
            st, bad = [bad_states[int(rng.integers(len(bad_states)))]][0], True
        kind = int(rng.integers(3))
        n = int(rng.integers(0, 5))
        call = [lambda: rt.greedy(tok, n, st), lambda: rt.step(torch.tensor([tok]), st),
                lambda: rt(torch.tensor([[tok, tok % V]]), st)][kind]
        if bad:
            refused(call, f"fuzz {it}")
        else:
            call()
    print("sanitized run ok")
""")


def _runtime(name: str) -> str | None:
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_the_native_step_is_clean_under_asan_and_ubsan(tmp_path):
    lib = tmp_path / "libitl_asan.so"
    sources = sorted(glob.glob(os.path.join(NATIVE, "*.c")))
    build = subprocess.run(["gcc", *FLAGS, *sources, "-o", str(lib), "-lm"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    preload = [p for p in (_runtime("libasan.so"), _runtime("libubsan.so")) if p]
    assert preload, "gcc has no libasan.so"
    env = dict(os.environ, LD_PRELOAD=" ".join(preload), ITERALITE_NATIVE_LIB=str(lib), OMP_NUM_THREADS="1",
               ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ITERALITE_NATIVE_ISA", None)
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=240)
    report = run.stderr[-4000:]
    assert "ERROR: AddressSanitizer" not in run.stderr and "runtime error:" not in run.stderr, report
    assert run.returncode == 0 and "sanitized run ok" in run.stdout, report

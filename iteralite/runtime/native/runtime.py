"""The native runtime: `NativeIteraLite` runs a packed artifact on the C step (`itl_step.c`),
built by the README's setup command as the shared library `_itl_native` in this folder and
loaded with ctypes. No compile step at load, no float copy of the weights.

Same contract as `IteraLite` / `FusedIteraLite` for generation and benchmarking: `init_state`,
`step(token (b,), state) -> (logits (b, V), state)`, `forward(idx, state=None, return_state=False)`,
plus `greedy(token, n, state)`, the whole greedy loop in C. Prefill runs the C step token by
token (the prompt is short next to the generation; a chunked native prefill is future work).
Batch rows are independent states stepped one after another (the step is batch-1 code)."""
from __future__ import annotations

import ctypes
import glob
import os
from importlib.machinery import EXTENSION_SUFFIXES

import numpy as np
import torch

from iteralite.io.errors import IteraliteError
from iteralite.runtime.native.layout import NativeWeights, native_weights

ISAS = {"scalar": 0, "avx2": 1}
_HERE = os.path.dirname(os.path.abspath(__file__))
_LIB = None


class NativeUnavailable(IteraliteError):
    """The native library is not built here."""


def library_path() -> str | None:
    for suffix in EXTENSION_SUFFIXES:
        hits = sorted(glob.glob(os.path.join(_HERE, "_itl_native" + suffix)))
        if hits:
            return hits[0]
    return None


def load_library():
    """The ctypes library (loaded once); NativeUnavailable with the fix when it is not built."""
    global _LIB
    if _LIB is not None:
        return _LIB
    path = library_path()
    if path is None:
        raise NativeUnavailable("the native step is not built here (no _itl_native library next to "
                                f"{_HERE}); run the README's setup (`make setup`, needs a C compiler)")
    lib = ctypes.CDLL(path)
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float)
    lib.itl_create.argtypes, lib.itl_create.restype = [p], p
    lib.itl_free.argtypes, lib.itl_free.restype = [p], None
    lib.itl_set_isa.argtypes, lib.itl_set_isa.restype = [p, i], i
    lib.itl_get_isa.argtypes, lib.itl_get_isa.restype = [p], i
    lib.itl_avx2_supported.argtypes, lib.itl_avx2_supported.restype = [], i
    lib.itl_step.argtypes, lib.itl_step.restype = [p, i, f, f, f], None
    lib.itl_greedy.argtypes = [p, i, i, f, f, f, ctypes.POINTER(ctypes.c_int32)]
    lib.itl_greedy.restype = None
    _LIB = lib
    return lib


def available() -> bool:
    return library_path() is not None


def load_native(path) -> "NativeIteraLite":
    """A packed checkpoint -> NativeIteraLite (the benchmark's and the CLI's loader)."""
    from iteralite.io.checkpoint import load_model
    return NativeIteraLite.from_model(load_model(path)[0])


def _fptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


class InferenceOnly:
    """What callers written for nn.Module ask of an inference-only runtime (`training`, `eval()`,
    `train()`): a runtime with no training mode answers them as a no-op."""

    training = False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self


class NativeIteraLite(InferenceOnly):
    """A packed IteraLite on the native step. `isa`: "avx2" (default where the CPU has it) or
    "scalar"; the environment variable ITERALITE_NATIVE_ISA=scalar forces scalar too."""

    def __init__(self, weights: NativeWeights, cfg, isa: str | None = None):
        self.lib = load_library()
        self.w, self.cfg = weights, cfg
        self._struct = weights.struct()
        self._ctx = self.lib.itl_create(ctypes.byref(self._struct))
        if not self._ctx:
            raise MemoryError("native step: out of memory for its scratch buffers")
        self._conv_n = sum(L.d_inner * L.d_conv for L in weights.layers)
        self._ssm_n = sum(L.h * L.p * L.n for L in weights.layers)
        self._logits = np.zeros(weights.vocab, dtype=np.float32)
        if isa is not None:
            self.set_isa(isa)

    _NAMES = {v: k for k, v in ISAS.items()}

    @classmethod
    def from_model(cls, model, isa: str | None = None) -> "NativeIteraLite":
        return cls(native_weights(model), model.cfg, isa)

    def __del__(self):
        ctx, lib = getattr(self, "_ctx", None), getattr(self, "lib", None)
        if ctx and lib is not None:
            lib.itl_free(ctx)
            self._ctx = None

    # ----------------------------------------------------------------- configuration

    @property
    def isa(self) -> str:
        """The code path in use: "avx2" or "scalar"."""
        return self._NAMES[self.lib.itl_get_isa(self._ctx)]

    def set_isa(self, name: str) -> str:
        """Ask for a code path ("avx2" falls back to "scalar" on a CPU without AVX2/FMA/F16C);
        returns the one in use."""
        if name not in ISAS:
            raise ValueError(f"isa must be one of {', '.join(ISAS)}; got {name!r}")
        return self._NAMES[self.lib.itl_set_isa(self._ctx, ISAS[name])]

    @property
    def resident_weight_bytes(self) -> int:
        return self.w.resident_bytes


    # ----------------------------------------------------------------- the contract

    def init_state(self, batch: int = 1):
        return [(np.zeros(self._conv_n, np.float32), np.zeros(self._ssm_n, np.float32)) for _ in range(batch)]

    def _step1(self, token: int, st) -> np.ndarray:
        if not 0 <= token < self.w.vocab:
            raise ValueError(f"token id {token} is outside the vocabulary (0..{self.w.vocab - 1})")
        self.lib.itl_step(self._ctx, token, _fptr(st[0]), _fptr(st[1]), _fptr(self._logits))
        return self._logits.copy()

    @torch.no_grad()
    def step(self, token, state):
        """token (b,) -> logits (b, V), state (updated in place and returned)."""
        toks = token.reshape(-1).tolist()
        return torch.from_numpy(np.stack([self._step1(t, st) for t, st in zip(toks, state)])), state

    @torch.no_grad()
    def forward(self, idx, state=None, return_state: bool = False):
        """idx (b, l) -> logits (b, l, V), aux (zero); with return_state the state after the last token."""
        b, l = idx.shape
        state = self.init_state(b) if state is None else state
        rows = idx.tolist()
        logits = torch.from_numpy(np.stack([np.stack([self._step1(t, st) for t in row])
                                            for row, st in zip(rows, state)]))
        aux = logits.new_zeros(())
        return (logits, aux, state) if return_state else (logits, aux)

    __call__ = forward

    def greedy(self, token: int, n: int, state) -> list[int]:
        """n greedy tokens after `token` (batch-1 state), the loop in C."""
        out = np.zeros(n, dtype=np.int32)
        self.lib.itl_greedy(self._ctx, int(token), n, _fptr(state[0][0]), _fptr(state[0][1]), _fptr(self._logits),
                            out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)))
        return out.tolist()

"""The native runtime: `NativeIteraLite` runs a packed artifact on the C step (`itl_step.c`),
built by the README's setup command as the shared library `_itl_native` in this folder and
loaded with ctypes. No compile step at load, no float copy of the weights.

Same contract as `IteraLite` / `FusedIteraLite` for generation and benchmarking: `init_state`,
`step(token (b,), state) -> (logits (b, V), state)`, `forward(idx, state=None, return_state=False)`,
plus `greedy(token, n, state)`, the whole greedy loop in C. `forward` (the prefill) runs the
prompt in chunks through `itl_prefill` (each matrix applied to a chunk of tokens at once; on the
AVX-512 path a block of codes is read once for four tokens), equal to stepping token by token.
Batch rows are independent states run one after another.

Code paths (`isa`): "avx512" (AVX-512 VNNI integer dot products on a copy of the codes the C
context lays out once), "avx2" and "scalar"; the best the CPU has is the default.
Activations (`act`): "int8" (each matmul's input quantized to int8 per block; the default) or
"f32" (exact: float inputs times the dequantized weights, the eager model's arithmetic up to float
rounding; ITERALITE_NATIVE_ACT=f32 starts a context there).

The boundary is checked once per call, on both sides: tokens (integers in the vocabulary, one per
state row), states (the float32, C-contiguous, writable numpy arrays of `init_state`, of this
model's sizes) and the C library's own checks (its ITL_ERR_* codes) all end in one
`NativeInputError` line. A runtime is thread-safe (one lock around the C calls that share its
scratch context), copy-safe (`copy.copy` / `copy.deepcopy` give a runtime with its own context;
pickling is refused) and `close()`d once (later calls raise `NativeClosed`).

The library's path, loading and C signatures are in `library` (ITERALITE_NATIVE_LIB=/path/to/lib.so
loads that build of the C step instead of the one next to this file: the sanitizer test's ASan build)."""
from __future__ import annotations

import copy
import ctypes
import threading

import numpy as np
import torch

from iteralite.io.errors import IteraliteError
from iteralite.runtime.native.layout import NativeWeights, native_weights
from iteralite.runtime.native.library import (ENV_LIB, NativeUnavailable, available, library_path,  # noqa: F401
                                              load_library)

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
ACTS = {"int8": 0, "f32": 1}  # activation modes: int8 per block (default) or float (exact, as the eager model)
class NativeInputError(IteraliteError, ValueError):
    """A token, count or state the native step cannot run (or the C library refused)."""


class NativeClosed(IteraliteError, RuntimeError):
    """A call on a runtime after `close()`."""


_I32_MAX = 2 ** 31 - 1


def load_native(path, act: str | None = None) -> "NativeIteraLite":
    """A packed checkpoint -> NativeIteraLite (the benchmark's and the CLI's loader); `act` as
    NativeIteraLite's ("f32": exact activations)."""
    from iteralite.io.checkpoint import load_model
    return NativeIteraLite.from_model(load_model(path)[0], act=act)


def _fptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def _check_code(lib, code: int, what: str) -> None:
    """A nonzero ITL_ERR_* code from the C step -> one NativeInputError line."""
    if code:
        raise NativeInputError(f"native {what} refused its input: {lib.itl_strerror(code).decode()} (code {code})")


def _token_id(token, vocab: int) -> int:
    """One token id, checked: an integer (not bool, not float) in 0..vocab-1."""
    if isinstance(token, (np.ndarray, torch.Tensor)) and token.ndim == 0:
        token = token.item()
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
        raise NativeInputError(f"a token id must be an integer; got {type(token).__name__} {token!r}")
    if not 0 <= int(token) < vocab:
        raise NativeInputError(f"token id {int(token)} is outside the vocabulary (0..{vocab - 1})")
    return int(token)


def _token_ids(token, vocab: int) -> list[int]:
    """Token ids (a tensor/array of any shape, flattened), checked once: integers in 0..vocab-1."""
    if isinstance(token, torch.Tensor):
        bad = token.dtype == torch.bool or token.dtype.is_floating_point or token.dtype.is_complex
        dtype, ids = token.dtype, None if bad else token.reshape(-1).tolist()
    else:
        a = np.asarray(token)
        bad = a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer)
        dtype, ids = a.dtype, None if bad else a.reshape(-1).tolist()
    if bad:
        raise NativeInputError(f"token ids must be integers; got dtype {str(dtype).removeprefix('torch.')}")
    if ids and (min(ids) < 0 or max(ids) >= vocab):
        raise NativeInputError(f"token id {min(ids) if min(ids) < 0 else max(ids)} is outside the vocabulary "
                               f"(0..{vocab - 1})")
    return ids


class InferenceOnly:
    """What callers written for nn.Module ask of an inference-only runtime (`training`, `eval()`,
    `train()`): a runtime with no training mode answers them as a no-op."""

    training = False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self


class NativeState(list):
    """`init_state`'s rows [(conv, ssm)], tagged with the weights they were made for (copies keep
    the tag; a pickled state comes back untagged, checked by its sizes alone)."""

    weights = None

    def _tagged(self, rows) -> "NativeState":
        out = NativeState(rows)
        out.weights = self.weights
        return out

    def __copy__(self):
        return self._tagged(self)

    def __deepcopy__(self, memo):
        return self._tagged(copy.deepcopy(list(self), memo))

    def __reduce__(self):
        return NativeState, (list(self),)


class NativeIteraLite(InferenceOnly):
    """A packed IteraLite on the native step. `isa`: "avx512", "avx2" or "scalar" (default: the
    best the CPU has); the environment variable ITERALITE_NATIVE_ISA=scalar (or avx2) starts there.
    `act`: "int8" or "f32" (default: ITERALITE_NATIVE_ACT, else "int8")."""

    def __init__(self, weights: NativeWeights, cfg, isa: str | None = None, act: str | None = None):
        if act is not None and act not in ACTS:
            raise ValueError(f"act must be one of {', '.join(ACTS)}; got {act!r}")
        self.lib = load_library()
        self.w, self.cfg = weights, cfg
        self._lock = threading.RLock()
        self._ctx = None
        self._struct = weights.struct()
        why = ctypes.create_string_buffer(256)
        code = self.lib.itl_check_model(ctypes.byref(self._struct), why, len(why))
        if code:
            raise NativeInputError(f"the native step cannot run this model: {why.value.decode()}")
        self._ctx = self.lib.itl_create(ctypes.byref(self._struct))
        if not self._ctx:
            raise MemoryError("native step: out of memory for its scratch buffers")
        self._conv_n = sum(L.d_inner * L.d_conv for L in weights.layers)
        self._ssm_n = sum(L.h * L.p * L.n for L in weights.layers)
        conv_n, ssm_n = ctypes.c_int64(), ctypes.c_int64()
        self.lib.itl_state_sizes(self._ctx, ctypes.byref(conv_n), ctypes.byref(ssm_n))
        if (conv_n.value, ssm_n.value) != (self._conv_n, self._ssm_n):
            self.close()
            raise NativeInputError(f"the native step's state sizes ({conv_n.value}, {ssm_n.value}) disagree "
                                   f"with the layout's ({self._conv_n}, {self._ssm_n}); rebuild the library")
        self._logits = np.zeros(weights.vocab, dtype=np.float32)
        if isa is not None:
            self.set_isa(isa)
        if act is not None:
            self.set_act(act)

    _NAMES = {v: k for k, v in ISAS.items()}
    _ACT_NAMES = {v: k for k, v in ACTS.items()}

    @classmethod
    def from_model(cls, model, isa: str | None = None, act: str | None = None) -> "NativeIteraLite":
        return cls(native_weights(model), model.cfg, isa, act)

    # ----------------------------------------------------------------- lifetime and copies

    def close(self) -> None:
        """Free the C context now (idempotent); later calls raise NativeClosed."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            ctx, self._ctx = getattr(self, "_ctx", None), None
            if ctx:
                self.lib.itl_free(ctx)

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _live(self):
        """The C context; NativeClosed once closed. Call with the lock held."""
        if not self._ctx:
            raise NativeClosed(f"this {type(self).__name__} was closed; make a new one "
                               "(NativeIteraLite.from_model or load_native)")
        return self._ctx

    def __copy__(self):
        """A runtime over the same weights with its own C context (never a shared one)."""
        return type(self)(self.w, self.cfg, self.isa, self.act)

    def __deepcopy__(self, memo):
        """A runtime over a deep copy of the weights, with its own C context."""
        return type(self)(copy.deepcopy(self.w, memo), copy.deepcopy(self.cfg, memo), self.isa, self.act)

    def __reduce_ex__(self, protocol):
        raise TypeError(f"a {type(self).__name__} cannot be pickled (it holds a C context); save the packed "
                        "checkpoint and load it with load_native")

    # ----------------------------------------------------------------- configuration

    @property
    def isa(self) -> str:
        """The code path in use: "avx512", "avx2" or "scalar"."""
        with self._lock:
            return self._NAMES[self.lib.itl_get_isa(self._live())]

    def set_isa(self, name: str) -> str:
        """Ask for a code path (one the CPU lacks falls back to the best below it: "avx512" needs
        AVX-512 F/BW/VL + VNNI, "avx2" AVX2/FMA/F16C); returns the one in use."""
        if name not in ISAS:
            raise ValueError(f"isa must be one of {', '.join(ISAS)}; got {name!r}")
        with self._lock:
            return self._NAMES[self.lib.itl_set_isa(self._live(), ISAS[name])]

    @property
    def act(self) -> str:
        """The activation mode in use: "int8" or "f32"."""
        with self._lock:
            return self._ACT_NAMES[self.lib.itl_get_act(self._live())]

    def set_act(self, name: str) -> str:
        """Choose the activation mode ("int8" or "f32"); returns the one in use."""
        if name not in ACTS:
            raise ValueError(f"act must be one of {', '.join(ACTS)}; got {name!r}")
        with self._lock:
            return self._ACT_NAMES[self.lib.itl_set_act(self._live(), ACTS[name])]

    @property
    def resident_weight_bytes(self) -> int:
        return self.w.resident_bytes

    # ----------------------------------------------------------------- the contract

    def init_state(self, batch: int = 1) -> NativeState:
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 0:
            raise NativeInputError(f"batch must be a non-negative integer; got {batch!r}")
        state = NativeState((np.zeros(self._conv_n, np.float32), np.zeros(self._ssm_n, np.float32))
                            for _ in range(batch))
        state.weights = self.w
        return state

    def _check_state(self, state, rows: int) -> None:
        """`rows` state rows of this model: each (conv, ssm) float32, C-contiguous, aligned,
        writable numpy arrays of exactly this model's sizes. One NativeInputError line otherwise."""
        fix = "use this runtime's init_state"
        if isinstance(state, NativeState) and state.weights is not None and state.weights is not self.w:
            raise NativeInputError(f"the state was made by another model's runtime; {fix}")
        if not isinstance(state, (list, tuple)):
            raise NativeInputError(f"the state must be init_state's list of (conv, ssm) rows; got {type(state).__name__}")
        if len(state) != rows:
            raise NativeInputError(f"{rows} token row(s) but {len(state)} state row(s); {fix}({rows})")
        for r, row in enumerate(state):
            if not isinstance(row, (list, tuple)) or len(row) != 2:
                raise NativeInputError(f"state row {r} must be a (conv, ssm) pair; {fix}")
            for name, a, n in (("conv", row[0], self._conv_n), ("ssm", row[1], self._ssm_n)):
                if not isinstance(a, np.ndarray):
                    raise NativeInputError(f"state row {r} {name} must be a numpy array; got {type(a).__name__}; {fix}")
                if a.dtype != np.float32 or a.shape != (n,):
                    raise NativeInputError(f"state row {r} {name} must be float32 of shape ({n},); got "
                                           f"{a.dtype} {a.shape}; {fix}")
                if not (a.flags.c_contiguous and a.flags.aligned and a.flags.writeable):
                    raise NativeInputError(f"state row {r} {name} must be a C-contiguous, aligned, writable array "
                                           f"(not a view or a read-only buffer); {fix}")

    def _step1(self, token: int, st) -> np.ndarray:
        """One checked token on one checked state row (the caller holds the lock)."""
        code = self.lib.itl_step(self._live(), token, _fptr(st[0]), st[0].size, _fptr(st[1]), st[1].size,
                                 _fptr(self._logits), self._logits.size)
        _check_code(self.lib, code, "step")
        return self._logits.copy()

    @torch.no_grad()
    def step(self, token, state):
        """token (b,) -> logits (b, V), state (updated in place and returned)."""
        toks = _token_ids(token, self.w.vocab)
        self._check_state(state, len(toks))
        with self._lock:
            rows = [self._step1(t, st) for t, st in zip(toks, state)]
        return torch.from_numpy(np.stack(rows).reshape(len(rows), self.w.vocab)), state

    @torch.no_grad()
    def forward(self, idx, state=None, return_state: bool = False):
        """idx (b, l) -> logits (b, l, V), aux (zero); with return_state the state after the last token."""
        if getattr(idx, "ndim", None) != 2:
            raise NativeInputError(f"idx must be a (batch, length) tensor of token ids; got shape "
                                   f"{tuple(getattr(idx, 'shape', ()))}")
        b, l = idx.shape
        toks = _token_ids(idx, self.w.vocab)
        state = self.init_state(b) if state is None else state
        self._check_state(state, b)
        ids = np.asarray(toks, dtype=np.int32).reshape(b, l)
        out = np.empty((b, l, self.w.vocab), dtype=np.float32)
        with self._lock:
            for i, st in enumerate(state if l else ()):
                code = self.lib.itl_prefill(self._live(), ids[i].ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), l,
                                            _fptr(st[0]), st[0].size, _fptr(st[1]), st[1].size, _fptr(out[i]),
                                            out[i].size, 1)
                _check_code(self.lib, code, "prefill")
        logits = torch.from_numpy(out)
        aux = logits.new_zeros(())
        return (logits, aux, state) if return_state else (logits, aux)

    __call__ = forward

    def greedy(self, token: int, n: int, state) -> list[int]:
        """n greedy tokens after `token` (batch-1 state), the loop in C."""
        token = _token_id(token, self.w.vocab)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= _I32_MAX:
            raise NativeInputError(f"n must be an integer in 0..{_I32_MAX}; got {n!r}")
        self._check_state(state, 1)
        conv, ssm = state[0]
        out = np.zeros(int(n), dtype=np.int32)
        with self._lock:
            code = self.lib.itl_greedy(self._live(), token, int(n), _fptr(conv), conv.size, _fptr(ssm), ssm.size,
                                       _fptr(self._logits), self._logits.size,
                                       out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)))
        _check_code(self.lib, code, "greedy")
        return out.tolist()

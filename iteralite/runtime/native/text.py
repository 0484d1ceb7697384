"""ctypes wrapper of the C text runtime (`itl_text.c`, `itl_sample.c`; built as `_itl_text` here):
`CTokenizer` encodes and decodes with a binary tokenizer (`iteralite.data.tokbin`), `Sampler`
draws ids from logits. It exists so the C code can be tested against `tokenizers` and numpy;
the standalone runtime calls the same functions from C."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from iteralite.io.errors import CheckpointError, DataError, IteraliteError
from iteralite.runtime.native.library import find_built, open_built

_HERE = os.path.dirname(os.path.abspath(__file__))
_LIB = None
# itl_text.h's error codes whose message is about the tokenizer file
_FILE_ERRORS = {-2, -3, -4, -5, -6}


class TextUnavailable(IteraliteError):
    """The C text library is not built here."""


class TextInputError(IteraliteError, ValueError):
    """Text, ids, logits or sampler parameters the C library refused."""


def library_path() -> str | None:
    return find_built("_itl_text")


def available() -> bool:
    return library_path() is not None


def load_library():
    """The ctypes library (loaded once); TextUnavailable with the fix when it is not built."""
    global _LIB
    if _LIB is not None:
        return _LIB
    path = library_path()
    if path is None:
        raise TextUnavailable(f"the C text library is not built here (no _itl_text library in {_HERE}); "
                              "run `python setup.py build_ext --inplace` (needs a C compiler)")
    _LIB = open_built(path, _declare, TextUnavailable, "the C text library", "`python setup.py build_ext --inplace`")
    return _LIB


def _declare(lib) -> None:
    p, sz, i32, i64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int32, ctypes.c_int64
    lib.itl_text_strerror.argtypes, lib.itl_text_strerror.restype = [ctypes.c_int], ctypes.c_char_p
    lib.itl_tok_load.argtypes, lib.itl_tok_load.restype = [ctypes.c_char_p, sz, ctypes.POINTER(p)], ctypes.c_int
    lib.itl_tok_free.argtypes, lib.itl_tok_free.restype = [p], None
    lib.itl_tok_vocab_size.argtypes, lib.itl_tok_vocab_size.restype = [p], i32
    lib.itl_tok_eot_id.argtypes, lib.itl_tok_eot_id.restype = [p], i32
    lib.itl_tok_encode.argtypes, lib.itl_tok_encode.restype = [p, ctypes.c_char_p, sz, p, sz], i64
    lib.itl_tok_decode.argtypes, lib.itl_tok_decode.restype = [p, p, sz, p, sz], i64
    lib.itl_sampler_new.argtypes = [ctypes.c_uint64, ctypes.c_double, i32, ctypes.c_double]
    lib.itl_sampler_new.restype = p
    lib.itl_sampler_free.argtypes, lib.itl_sampler_free.restype = [p], None
    lib.itl_sampler_sample.argtypes, lib.itl_sampler_sample.restype = [p, p, i32], i32
    lib.itl_sampler_next_u32.argtypes, lib.itl_sampler_next_u32.restype = [p], ctypes.c_uint32


def _message(lib, code: int) -> str:
    return lib.itl_text_strerror(int(code)).decode()


class _CHandle:
    """A C object owned by this wrapper: `_FREE` names the library function that frees it, called
    once by `close()` (or on garbage collection)."""

    _FREE = ""
    _h = None

    def close(self) -> None:
        if self._h is not None:
            getattr(self._lib, self._FREE)(self._h)
            self._h = None

    def __del__(self):
        self.close()


class CTokenizer(_CHandle):
    """A binary tokenizer file loaded by the C library."""

    _FREE = "itl_tok_free"

    def __init__(self, path: str | Path | None = None, data: bytes | None = None):
        self._lib = lib = load_library()
        self._h = None
        name = str(path) if path is not None else "tokenizer bytes"
        if data is None:
            if path is None or not Path(path).exists():
                raise DataError(f"{name}: binary tokenizer not found")
            data = Path(path).read_bytes()
        h = ctypes.c_void_p()
        rc = lib.itl_tok_load(data, len(data), ctypes.byref(h))
        if rc != 0:
            cls = CheckpointError if rc in _FILE_ERRORS else TextInputError
            raise cls(f"{name}: {_message(lib, rc)}")
        self._h = h.value
        self.vocab_size = int(lib.itl_tok_vocab_size(self._h))
        eot = int(lib.itl_tok_eot_id(self._h))
        self.eot_id = None if eot < 0 else eot

    def _handle(self):
        if self._h is None:
            raise TextInputError("the tokenizer is closed")
        return self._h

    def encode(self, text: str | bytes) -> list[int]:
        try:
            raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        except UnicodeEncodeError as e:  # a lone surrogate: no UTF-8 for it
            raise TextInputError(f"cannot encode: text is not valid UTF-8 ({e.reason} at {e.start})") from None
        out = np.empty(max(1, len(raw)), dtype=np.int32)  # a token is at least one byte
        n = self._lib.itl_tok_encode(self._handle(), raw, len(raw), out.ctypes.data, len(raw))
        if n < 0:
            raise TextInputError(f"cannot encode: {_message(self._lib, n)}")
        return out[:n].tolist()

    def decode(self, ids) -> bytes:
        arr = np.ascontiguousarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise TextInputError(f"cannot decode: ids must be in [0, {self.vocab_size})")
        arr = arr.astype(np.int32)
        n = self._lib.itl_tok_decode(self._handle(), arr.ctypes.data, arr.size, None, 0)
        if n < 0:
            raise TextInputError(f"cannot decode: {_message(self._lib, n)}")
        buf = ctypes.create_string_buffer(max(1, n))
        n = self._lib.itl_tok_decode(self._handle(), arr.ctypes.data, arr.size, buf, n)
        return buf.raw[:n]


class Sampler(_CHandle):
    """Seeded sampling from logits: temperature <= 0 or top_k == 1 is greedy (argmax, lowest id on
    ties); top_k <= 0 and top_p >= 1 turn those filters off. Non-finite logits are never drawn."""

    _FREE = "itl_sampler_free"

    def __init__(self, seed: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        self._lib = lib = load_library()
        self._h = None
        if not 0 <= seed < 2 ** 64:
            raise TextInputError(f"sampler seed must be in [0, 2**64), got {seed}")
        if not (np.isfinite(temperature) and np.isfinite(top_p) and top_p > 0):
            raise TextInputError(f"sampler needs a finite temperature and 0 < top_p, got {temperature}, {top_p}")
        h = lib.itl_sampler_new(seed, float(temperature), int(top_k), float(top_p))
        if not h:
            raise TextInputError("the C sampler refused its parameters (or is out of memory)")
        self._h = h

    def sample(self, logits: np.ndarray) -> int:
        if self._h is None:
            raise TextInputError("the sampler is closed")
        arr = np.ascontiguousarray(logits, dtype=np.float32)
        if arr.ndim != 1 or not 0 < arr.size < 2 ** 31:
            raise TextInputError(f"sampler needs a non-empty 1-D logits vector, got shape {arr.shape}")
        r = self._lib.itl_sampler_sample(self._h, arr.ctypes.data, arr.size)
        if r < 0:
            raise TextInputError(f"cannot sample: {_message(self._lib, r)}")
        return int(r)

    def next_u32(self) -> int:
        """The PRNG's next raw output (tests of the generator)."""
        if self._h is None:
            raise TextInputError("the sampler is closed")
        return int(self._lib.itl_sampler_next_u32(self._h))

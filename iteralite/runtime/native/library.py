"""The native shared library `_itl_native` (built by the README's setup next to this file): its
path, its loading with ctypes and its C signatures. Kept apart from the runtime so a module that
only needs the library (the rANS coder in `quant.entropy`) does not import the runtime, and the
pipeline stages that code artifacts do not depend on the runtime's source.

ITERALITE_NATIVE_LIB=/path/to/lib.so loads that build of the C step instead of the one next to
this file (the sanitizer test's ASan build)."""
from __future__ import annotations

import ctypes
import glob
import os
from importlib.machinery import EXTENSION_SUFFIXES

from iteralite.io.errors import IteraliteError

_HERE = os.path.dirname(os.path.abspath(__file__))
_LIB = None
ENV_LIB = "ITERALITE_NATIVE_LIB"


class NativeUnavailable(IteraliteError):
    """The native library is not built here."""


def library_path() -> str | None:
    override = os.environ.get(ENV_LIB)
    if override:
        if not os.path.isfile(override):
            raise NativeUnavailable(f"{ENV_LIB}={override} is not a file; point it at a built native "
                                    "library or unset it")
        return override
    return find_built("_itl_native")


def find_built(stem: str) -> str | None:
    """The extension `stem` built next to this file (`python setup.py build_ext --inplace`), or None."""
    for suffix in EXTENSION_SUFFIXES:
        hits = sorted(glob.glob(os.path.join(_HERE, stem + suffix)))
        if hits:
            return hits[0]
    return None


def open_built(path: str, declare, unavailable: type[IteraliteError], what: str, fix: str):
    """ctypes.CDLL(path) with `declare(lib)` run on it; `unavailable` (one line naming `fix`) when it
    cannot be loaded or lacks a symbol `declare` names (built from older sources)."""
    try:
        lib = ctypes.CDLL(path)
        declare(lib)
    except (OSError, AttributeError) as e:
        raise unavailable(f"{what} {path} cannot be used ({' '.join(str(e).split())}); rebuild it with {fix}") from None
    return lib


def available() -> bool:
    return library_path() is not None


def load_library():
    """The ctypes library (loaded once); NativeUnavailable with the fix when it is not built."""
    global _LIB
    if _LIB is not None:
        return _LIB
    path = library_path()
    if path is None:
        raise NativeUnavailable("the native step is not built here (no _itl_native library next to "
                                f"{_HERE}); run the README's setup (`make setup`, needs a C compiler)")
    _LIB = open_built(path, _declare, NativeUnavailable, "the native library", "the README's setup (`make setup`)")
    return _LIB


def _declare(lib) -> None:
    """The C signatures (an AttributeError names a symbol a stale build lacks)."""
    p, i, f, n = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_int64
    lib.itl_create.argtypes, lib.itl_create.restype = [p], p
    lib.itl_check_model.argtypes, lib.itl_check_model.restype = [p, ctypes.c_char_p, i], i
    lib.itl_strerror.argtypes, lib.itl_strerror.restype = [i], ctypes.c_char_p
    lib.itl_free.argtypes, lib.itl_free.restype = [p], None
    lib.itl_set_isa.argtypes, lib.itl_set_isa.restype = [p, i], i
    lib.itl_get_isa.argtypes, lib.itl_get_isa.restype = [p], i
    lib.itl_set_act.argtypes, lib.itl_set_act.restype = [p, i], i
    lib.itl_get_act.argtypes, lib.itl_get_act.restype = [p], i
    lib.itl_state_sizes.argtypes = [p, ctypes.POINTER(n), ctypes.POINTER(n)]
    lib.itl_state_sizes.restype = i
    lib.itl_avx2_supported.argtypes, lib.itl_avx2_supported.restype = [], i
    lib.itl_avx512_supported.argtypes, lib.itl_avx512_supported.restype = [], i
    lib.itl_step.argtypes, lib.itl_step.restype = [p, i, f, n, f, n, f, n], i
    lib.itl_greedy.argtypes = [p, i, i, f, n, f, n, f, n, ctypes.POINTER(ctypes.c_int32)]
    lib.itl_greedy.restype = i
    lib.itl_prefill.argtypes = [p, ctypes.POINTER(ctypes.c_int32), i, f, n, f, n, f, n, i]
    lib.itl_prefill.restype = i

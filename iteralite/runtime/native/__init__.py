"""Native low-bit inference: a C decode step over the artifact's packed codes (`itl_step.c`),
its weight layout (`layout`), its ctypes runtime (`runtime`) and its PyTorch `_ref` twins (`ref`)."""
from iteralite.runtime.native.layout import NativeUnsupported, native_weights
from iteralite.runtime.native.runtime import (NativeClosed, NativeInputError, NativeIteraLite, NativeUnavailable,
                                              available)

__all__ = ["NativeClosed", "NativeInputError", "NativeIteraLite", "NativeUnavailable", "NativeUnsupported",
           "available", "native_weights"]

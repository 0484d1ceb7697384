"""Byte-deterministic safetensors files.

The safetensors library keeps the header's `__metadata__` in a hash map with a per-process random
order, so two saves of the same tensors and metadata can differ in bytes (and in md5, which is what
DVC compares). `save_tensors` serializes with the library, then rewrites the JSON header in one
canonical order (metadata keys sorted, then the tensor entries by offset), compact and padded to
8 bytes as the format requires; the tensor bytes are untouched. Any safetensors reader loads it.

`le_bytes` / `from_le_bytes` are a tensor's bytes in little-endian order whatever the host's byte
order (safetensors stores little-endian; so do the compact layout's raw and f16 codecs and the
checkpoint's tensor digest): each element is viewed as an integer of its width and converted with
an explicit '<' numpy dtype, a no-op on a little-endian host and a byte swap on a big-endian one.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import torch
from safetensors.torch import save

from iteralite.io.atomic import atomic_path

_ALIGN = 8
# element width -> (a torch integer dtype of that width, its little-endian numpy dtype)
_LE = {1: (torch.uint8, "<u1"), 2: (torch.int16, "<i2"), 4: (torch.int32, "<i4"), 8: (torch.int64, "<i8")}


def le_bytes(t: torch.Tensor) -> bytes:
    """A real tensor's elements, row-major, each in little-endian byte order (on any host)."""
    t = t.detach().contiguous().cpu().reshape(-1)
    if t.is_complex() or t.element_size() not in _LE:
        raise ValueError(f"no little-endian byte layout for a {t.dtype} tensor")
    view, le = _LE[t.element_size()]
    return t.view(view).numpy().astype(le, copy=False).tobytes()


def from_le_bytes(data: bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    """Inverse of `le_bytes`: a new tensor of `dtype` and `shape`; `data` must hold exactly its bytes."""
    width = torch.empty(0, dtype=dtype).element_size()
    if width not in _LE:
        raise ValueError(f"no little-endian byte layout for {dtype}")
    view, le = _LE[width]
    native = np.frombuffer(data, dtype=le).astype(np.dtype(le).newbyteorder("="))  # a writable copy
    return torch.from_numpy(native).view(dtype).reshape(shape)


def canonical_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors serialization of `tensors` with a canonically ordered header."""
    raw = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = {}
    if meta:
        ordered["__metadata__"] = dict(sorted(meta.items()))
    for name, entry in sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])):
        ordered[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": entry["data_offsets"]}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % _ALIGN)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (and string `metadata`) to `path` atomically, byte-identical for identical inputs."""
    data = canonical_bytes(tensors, metadata)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)

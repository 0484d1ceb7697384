"""Byte-deterministic safetensors files.

The safetensors library keeps the header's `__metadata__` in a hash map with a per-process random
order, so two saves of the same tensors and metadata can differ in bytes (and in md5, which is what
DVC compares). `save_tensors` serializes with the library, then rewrites the JSON header in one
canonical order (metadata keys sorted, then the tensor entries by offset), compact and padded to
8 bytes as the format requires; the tensor bytes are untouched. Any safetensors reader loads it.
"""
from __future__ import annotations

import json
import os
import struct

import torch
from safetensors.torch import save

from iteralite.io.atomic import atomic_path

_ALIGN = 8


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

"""Self-describing checkpoints in safetensors.

A file holds only tensors and a string header: format name, format version, artifact kind, the
full model config (with per-layer shapes after pruning), the quantization config, the tokenizer's
sha256, free-form meta (step, losses, parent artifact) and a sha256 over all tensor bytes.
Loading rebuilds the model from the config, applies the quantization config (uniform or mixed
precision, by its stored format) as a module swap,
then fills the tensors with strict shape checks. Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from iteralite.core.config import ModelConfig
from iteralite.io.errors import CheckpointError, IteraliteError
from iteralite.io.atomic import atomic_path

FORMAT = "iteralite"
VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class Checkpoint:
    path: Path
    kind: str
    config: ModelConfig
    quant: dict
    tokenizer_sha256: str
    meta: dict
    tensors: dict[str, torch.Tensor] = field(repr=False)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path, model, *, kind: str, tokenizer_sha256: str, meta: dict | None = None,
                    quant: dict | None = None) -> int:
    """Write `model` atomically to `path`; returns the file's size in bytes."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    header = {
        "format": FORMAT,
        "version": str(VERSION),
        "kind": kind,
        "config": json.dumps(model.cfg.to_dict()),
        "quant": json.dumps(quant or {}),
        "tokenizer_sha256": tokenizer_sha256,
        "meta": json.dumps(meta or {}),
        "sha256": tensor_digest(tensors),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path).stat().st_size


def header_bytes(path) -> int:
    """Bytes before the tensor data: the 8-byte length prefix plus the JSON header (config, quant
    config, meta, checksum). File size = header_bytes + the stored tensors' bytes, exactly."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _read_header(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: file is empty or truncated ({size} bytes): not an iteralite checkpoint")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(
                f"{path}: not a safetensors file or truncated (header claims {n} bytes, file has {size}); "
                "iteralite checkpoints are safetensors files written by its stages")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: header is not valid JSON: the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object: the file is corrupt")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{path}: header entry {key!r} is malformed: the file is corrupt")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or padded: expected {8 + n + end} bytes, found {size}")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: header metadata is malformed: the file is corrupt")
    return meta


def read_checkpoint(path) -> Checkpoint:
    """Read and verify a checkpoint's header and tensors (no model is built)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint (run `dvc repro` or `dvc pull` to create it)")
    meta = _read_header(path)
    fmt = meta.get("format")
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: format is {fmt!r}, expected {FORMAT!r}: not an iteralite checkpoint")
    version = meta.get("version")
    if version != str(VERSION):
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r}; this iteralite reads version {VERSION}. "
            "Re-create it with `dvc repro` using this version of the code")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: cannot read tensors ({e}): the file is corrupt") from None
    if tensor_digest(tensors) != meta.get("sha256"):
        raise CheckpointError(f"{path}: tensor checksum mismatch: the file is corrupt (re-create or re-pull it)")
    try:
        config = ModelConfig.from_dict(json.loads(meta["config"]))
        quant = json.loads(meta.get("quant", "{}"))
        info = json.loads(meta.get("meta", "{}"))
        if not isinstance(quant, dict) or not isinstance(info, dict):
            raise CheckpointError("quant and meta must be JSON objects")
    except (KeyError, TypeError, json.JSONDecodeError, IteraliteError) as e:
        raise CheckpointError(f"{path}: config in header is unusable: {e}") from None
    return Checkpoint(path, meta.get("kind", "?"), config, quant, meta.get("tokenizer_sha256", ""),
                      info, tensors)


def build_model(ckpt: Checkpoint):
    """Rebuild the model from the checkpoint's config (and its quant config, through the format
    registry `quant.config.CONFIG_FORMATS`), then fill its tensors."""
    from iteralite.core.model import IteraLite

    model = IteraLite(ckpt.config)
    if ckpt.quant:
        from iteralite.quant.config import apply_config
        try:
            apply_config(model, ckpt.quant)
        except IteraliteError as e:  # includes a ParamsError from an invalid stored spec
            raise CheckpointError(f"{ckpt.path}: quantization config is unusable: {e}") from None
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path}: quantization config is malformed: {e!r}") from None
    try:
        model.load_state_dict(ckpt.tensors, strict=True)
    except RuntimeError as e:
        msg = str(e).split("\n\t", 1)[-1][:800]
        raise CheckpointError(f"{ckpt.path}: tensors disagree with the stored config: {msg}") from None
    model.eval()
    return model


def load_model(path):
    """(model in eval mode, Checkpoint) from a file; every failure is a CheckpointError."""
    ckpt = read_checkpoint(path)
    return build_model(ckpt), ckpt

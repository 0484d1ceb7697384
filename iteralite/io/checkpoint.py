"""Self-describing checkpoints in safetensors.

A file holds only tensors and a string header: format name, format version, artifact kind, the
full model config (with per-layer shapes after pruning), the quantization config, the tokenizer's
sha256, free-form meta (step, losses, parent artifact) and a checksum: a sha256 over every other
header field and over the tensors (names, dtypes, shapes, bytes), so a changed config is caught as
surely as a changed weight. Loading checks the path is a readable regular file (never opening a
FIFO), verifies the checksum before any header field is trusted, rebuilds the model from the
config, applies the quantization config (uniform or mixed precision, by its stored format) as a
module swap, then fills the tensors with strict shape checks. Nothing is ever unpickled.

Layouts (`LAYOUTS`, chosen by `save_checkpoint(..., layout=)`): "default" stores each state_dict
tensor as its own safetensors entry (the header then indexes every tensor by name); "compact"
(`io.compact`, header field `layout: compact-v1`) stores one uint8 blob with the tensors in the
rebuilt model's order, integer codes entropy-coded, and an index of a few bytes per tensor. The
checksum is computed over the stored tensors either way, and `read_checkpoint` reads both.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from iteralite.core.config import ModelConfig
from iteralite.io import compact
from iteralite.io.errors import CheckpointError, IteraliteError
from iteralite.io.stfile import save_tensors

FORMAT = "iteralite"
VERSION = 2  # 2: the checksum covers the header fields too (1: tensor bytes only)
_MAX_HEADER = 100 * 1024 * 1024
_CHECKSUM_KEY = "sha256"
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


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


def checkpoint_checksum(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """The checksum stored under "sha256": sha256 over every metadata field except the checksum
    itself (sorted keys; each key and value length-prefixed, so no two headers frame alike) and the
    tensor digest. It detects corruption; it is not a signature (anyone can recompute it)."""
    fields = sorted((k, v) for k, v in metadata.items() if k != _CHECKSUM_KEY)
    h = hashlib.sha256(b"iteralite-checksum-v2\0")
    h.update(struct.pack("<Q", len(fields)))
    for key, value in fields:
        for s in (key, value):
            b = s.encode("utf-8", "surrogatepass")  # a JSON "\ud800" escape must not raise here
            h.update(struct.pack("<Q", len(b)))
            h.update(b)
    h.update(bytes.fromhex(tensor_digest(tensors)))
    return h.hexdigest()


@dataclass(frozen=True)
class Layout:
    """How a state_dict is stored. tag: the header's "layout" field (None: no field, the default
    layout). write(state, empty model factory) -> (stored tensors, extra header fields);
    read(stored tensors, header, empty model factory) -> state_dict. separators: json.dumps'
    separators for the config, quant and meta fields."""

    tag: str | None
    write: Callable
    read: Callable
    separators: tuple[str, str] | None = None


LAYOUTS: dict[str, Layout] = {
    "default": Layout(None, lambda state, empty: (state, {}), lambda stored, meta, empty: stored),
    "compact": Layout(compact.LAYOUT, lambda state, empty: compact.write(state, empty()),
                      lambda stored, meta, empty: compact.read(stored, meta, empty()), (",", ":")),
}
_BY_TAG = {layout.tag: layout for layout in LAYOUTS.values()}


def save_checkpoint(path, model, *, kind: str, tokenizer_sha256: str, meta: dict | None = None,
                    quant: dict | None = None, layout: str = "default") -> int:
    """Write `model` atomically to `path`; returns the file's size in bytes.

    An empty `tokenizer_sha256` is allowed (unit tests save models with no tokenizer); such a file
    loads, but `check_tokenizer` refuses it. layout: a key of LAYOUTS ("default" or "compact"); the
    compact layout needs `quant` to be the config the model was quantized with (else ValueError)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; known: {', '.join(LAYOUTS)}")
    lay = LAYOUTS[layout]
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    header = {
        "format": FORMAT,
        "version": str(VERSION),
        "kind": kind,
        "config": json.dumps(model.cfg.to_dict(), separators=lay.separators),
        "quant": json.dumps(quant or {}, separators=lay.separators),
        "tokenizer_sha256": tokenizer_sha256,
        "meta": json.dumps(meta or {}, separators=lay.separators),
    }
    tensors, extra = lay.write(state, lambda: _layout_model(model.cfg, quant or {}, path))
    header.update(extra)
    header[_CHECKSUM_KEY] = checkpoint_checksum(header, tensors)
    save_tensors(path, tensors, header)
    return Path(path).stat().st_size


def header_bytes(path) -> int:
    """Bytes before the tensor data: the 8-byte length prefix plus the JSON header (config, quant
    config, meta, checksum). File size = header_bytes + the stored tensors' bytes, exactly."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


_FILE_TYPES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _check_regular_file(path: Path, what: str, missing: str) -> None:
    """Raise a one-line CheckpointError unless `path` (after symlinks) is a regular file.
    `missing` is the hint for a path that does not exist. Only stats: never opens the path."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):  # the link itself exists: its target (a DVC cache file) is gone
            raise CheckpointError(
                f"{path}: is a symlink to {os.readlink(path)!r}, which does not exist (a broken DVC "
                "cache link): run `dvc pull` or `dvc checkout`") from None
        raise CheckpointError(f"{path}: no such {what} {missing}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: symlink loop (too many levels of symbolic links): "
                                  f"fix or remove the link; it is not a {what}") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise CheckpointError(f"{path}: permission denied: cannot reach the {what} "
                                  "(check the permissions of its folders)") from None
        raise CheckpointError(f"{path}: cannot access the {what}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path}: is a directory, not a {what} file")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_TYPES if test(st.st_mode)), "not a regular file")
        raise CheckpointError(f"{path}: is {kind}, not a {what} file")


def _open_regular(path: Path, what: str):
    """Open a file already checked by `_check_regular_file` for reading. O_NONBLOCK keeps the open
    from hanging if the path was swapped for a FIFO meanwhile; fstat then refuses it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied: cannot read the {what} "
                              "(check the file's mode and owner)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open the {what}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: is not a regular file (it changed while being opened)")
    return os.fdopen(fd, "rb")


def _read_header(path: Path) -> dict:
    with _open_regular(path, "checkpoint") as f:
        size = os.fstat(f.fileno()).st_size
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
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
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
    """Read and verify a checkpoint's header and tensors. Only the format name and version are read
    before the checksum is verified; nothing else in the header is used unverified. The default
    layout builds no model; the compact one builds the empty model (to split its blob) only after
    the checksum and config checks. `tensors` is the state_dict in either layout."""
    path = Path(path)
    _check_regular_file(path, "checkpoint", "(run `dvc repro` or `dvc pull` to create it)")
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
            stored = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: cannot read tensors ({e}): the file is corrupt") from None
    # Our JSON parser and safetensors' must agree on the header (they could differ on odd JSON).
    if stored != meta or checkpoint_checksum(meta, tensors) != meta.get(_CHECKSUM_KEY):
        raise CheckpointError(f"{path}: checksum mismatch: header or tensors were changed: "
                              "the file is corrupt (re-create or re-pull it)")
    try:
        config = ModelConfig.from_dict(json.loads(meta["config"]))
        quant = json.loads(meta.get("quant", "{}"))
        info = json.loads(meta.get("meta", "{}"))
        if not isinstance(quant, dict) or not isinstance(info, dict):
            raise CheckpointError("quant and meta must be JSON objects")
    except (KeyError, TypeError, json.JSONDecodeError, IteraliteError) as e:
        raise CheckpointError(f"{path}: config in header is unusable: {e}") from None
    layout = _BY_TAG.get(meta.get("layout"))
    if layout is None:
        known = ", ".join(t for t in _BY_TAG if t)
        raise CheckpointError(f"{path}: tensor layout {meta.get('layout')!r} is unknown; this iteralite "
                              f"reads the default layout and {known}")
    try:
        tensors = layout.read(tensors, meta, lambda: _layout_model(config, quant, path))
    except CheckpointError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    return Checkpoint(path, meta.get("kind", "?"), config, quant, meta.get("tokenizer_sha256", ""),
                      info, tensors)


def check_tokenizer(ckpt: Checkpoint, tokenizer_path) -> None:
    """Raise a one-line CheckpointError unless `tokenizer_path` is the tokenizer `ckpt` was trained
    with: the checkpoint must record a tokenizer sha256, the file must be a readable tokenizer JSON
    with that sha256, and its vocabulary size must equal the model's `config.vocab_size`."""
    from iteralite.data.tokenizer import file_sha256, load_tokenizer

    tok_path = Path(tokenizer_path)
    recorded = ckpt.tokenizer_sha256
    if not (isinstance(recorded, str) and _SHA256_HEX.fullmatch(recorded)):
        raise CheckpointError(
            f"{ckpt.path}: records no tokenizer id (tokenizer_sha256 {recorded!r}), so it cannot be "
            f"checked against {tok_path}; re-create it with `dvc repro`")
    _check_regular_file(tok_path, "tokenizer", "(run `dvc repro tokenizer` or `dvc pull`)")
    with _open_regular(tok_path, "tokenizer"):
        pass  # a readable file: permission problems get their own line, not a library error
    try:
        vocab = load_tokenizer(tok_path).get_vocab_size()
    except IteraliteError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # `tokenizers` raises a bare Exception for a file it cannot parse
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{tok_path}: not a tokenizer JSON file ({reason}); "
                              f"{ckpt.path} needs the tokenizer.json it was trained with") from None
    try:
        actual = file_sha256(tok_path)
    except OSError as e:
        raise CheckpointError(f"{tok_path}: cannot read the tokenizer: {e.strerror}") from None
    if actual != recorded.lower():
        raise CheckpointError(f"{ckpt.path} was trained with another tokenizer than {tok_path} "
                              "(sha256 differs); pass the matching tokenizer")
    if vocab != ckpt.config.vocab_size:
        raise CheckpointError(f"{ckpt.path}: the model's vocab_size is {ckpt.config.vocab_size} but "
                              f"tokenizer {tok_path} has {vocab} tokens; re-create them together with `dvc repro`")


def empty_model(config: ModelConfig, quant: dict, path=""):
    """The model a checkpoint's config and quant config describe (through the format registry
    `quant.config.CONFIG_FORMATS`), with freshly initialized contents. `path` names the file in
    errors."""
    from iteralite.core.model import IteraLite

    model = IteraLite(config)
    if quant:
        from iteralite.quant.config import apply_config
        try:
            apply_config(model, quant)
        except IteraliteError as e:  # includes a ParamsError from an invalid stored spec
            raise CheckpointError(f"{path}: quantization config is unusable: {e}") from None
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{path}: quantization config is malformed: {e!r}") from None
    return model


def _layout_model(config: ModelConfig, quant: dict, path):
    """`empty_model` for a layout's names and shapes, built without touching the global RNG, so
    saving or loading draws the same random numbers in every layout."""
    with torch.random.fork_rng(devices=[]):
        return empty_model(config, quant, path)


def build_model(ckpt: Checkpoint):
    """Rebuild the model from the checkpoint's config and quant config (`empty_model`), then fill
    its tensors."""
    model = empty_model(ckpt.config, ckpt.quant, ckpt.path)
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

"""Self-describing checkpoints in safetensors.

A file holds only tensors and a string header: format name, format version, artifact kind, the
full model config (with per-layer shapes after pruning), the quantization config, the tokenizer's
sha256, free-form meta (step, losses, parent artifact) and a checksum: a sha256 over every other
header field and over the tensors (names, dtypes, shapes, bytes), so a changed config is caught as
surely as a changed weight. Loading checks the path is a readable regular file (never opening a
FIFO), verifies the checksum before any header field is trusted, rebuilds the model from the
config, applies the quantization config (uniform or mixed precision, by its stored format) as a
module swap, then fills the tensors with strict shape checks. Nothing is ever unpickled.

Nothing is allocated from an unchecked size: the JSON header is capped (`_MAX_HEADER`) and parsed
with its errors (deep nesting, giant integers) turned into one line; every config dimension must be
within `CONFIG_LIMITS` before the config is even validated; and the weights the config describes
(`float_weights`) must match the file: exactly the stored values for an unquantized default-layout
file, at most `_MAX_WEIGHTS_PER_BYTE` per stored byte otherwise. Decoded float tensors must be
finite.

Layouts (`LAYOUTS`, chosen by `save_checkpoint(..., layout=)`): "default" stores each state_dict
tensor as its own safetensors entry (the header then indexes every tensor by name); "compact"
(`io.compact`, header field `layout: compact-v3`) stores one uint8 blob with the tensors in the
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
from iteralite.io.stfile import le_bytes, save_tensors

FORMAT = "iteralite"
VERSION = 2  # 2: the checksum covers the header fields too (1: tensor bytes only)
_MAX_HEADER = 16 * 1024 * 1024  # real headers are < 20 KB; JSON this size parses in well under a second
# Sane upper bounds of each config dimension (the pipeline's model is 2000 x 128, 4 layers): checked
# on the raw JSON, before `ModelConfig.validate` loops over the layers or anything is allocated.
CONFIG_LIMITS = {"vocab_size": 1 << 20, "d_model": 1 << 16, "n_layers": 512, "d_state": 1 << 12,
                 "d_conv": 1 << 10, "headdim": 1 << 12, "n_heads": 1 << 12, "dt_rank": 1 << 16,
                 "n_experts": 1 << 12, "top_k": 1 << 12, "d_ff": 1 << 20, "chunk_size": 1 << 16,
                 "embed_rank": 1 << 16}
_LAYER_LISTS = {"layer_n_heads": "n_heads", "layer_n_experts": "n_experts", "layer_d_ff": "d_ff"}
# A quantized or compact file stores >= ~0.7 bits a weight (the pipeline's: 2.9+); refuse a config
# that claims more than 32 weights (0.25 bits each) per stored byte, beyond a small model's worth.
_MAX_WEIGHTS_PER_BYTE = 32
_SMALL_MODEL_WEIGHTS = 1 << 20
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
        h.update(le_bytes(t))  # little-endian on every host, like the stored tensors
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
        where = "" if os.path.isabs(path) else f" (looked for {os.path.abspath(path)})"
        raise CheckpointError(f"{path}: no such {what}{where} {missing}") from None
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
        header = _parse_json(f.read(n), f"{path}: header")
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


def _parse_json(text, what: str):
    """json.loads with every parse failure as one CheckpointError line: invalid JSON or UTF-8, an
    integer over Python's digit limit (ValueError), nesting deeper than the recursion limit."""
    try:
        return json.loads(text)
    except RecursionError:
        raise CheckpointError(f"{what} is nested too deeply to be iteralite's: the file is corrupt") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        reason = str(e).split(";")[0][:120]
        raise CheckpointError(f"{what} is not valid JSON ({reason}): the file is corrupt") from None


def _check_config_limits(raw, path: Path) -> None:
    """Each dimension of the raw config JSON within CONFIG_LIMITS (types are from_dict's job)."""
    if not isinstance(raw, dict):
        return
    for key, limit in CONFIG_LIMITS.items():
        v = raw.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > limit:
            raise CheckpointError(f"{path}: config {key} = {_short(v)} is beyond any iteralite model "
                                  f"(at most {limit:,}): the file is corrupt or crafted")
    for key, uniform in _LAYER_LISTS.items():
        v = raw.get(key)
        if isinstance(v, list):
            if len(v) > CONFIG_LIMITS["n_layers"]:
                raise CheckpointError(f"{path}: config {key} has {len(v):,} entries, more than the "
                                      f"{CONFIG_LIMITS['n_layers']} layers a model may have: the file is corrupt")
            big = next((x for x in v if isinstance(x, int) and not isinstance(x, bool)
                        and x > CONFIG_LIMITS[uniform]), None)
            if big is not None:
                raise CheckpointError(f"{path}: config {key} holds {_short(big)}, beyond any iteralite "
                                      f"model (at most {CONFIG_LIMITS[uniform]:,}): the file is corrupt or crafted")


def _short(v: int) -> str:
    return f"{v:,}" if v < 10 ** 30 else "a number of 30+ digits"


def float_weights(config: ModelConfig) -> int:
    """Weights of the float model `config` describes (= IteraLite(config).num_params()), counted
    without building it."""
    return config.num_weights()


def _check_sizes(path: Path, config: ModelConfig, quant: dict, layout_tag, tensors: dict) -> None:
    """The model `config` describes must fit the stored tensors, before any model is built: exactly
    (as many values) for an unquantized default-layout file, within _MAX_WEIGHTS_PER_BYTE otherwise."""
    weights = float_weights(config)
    values = sum(t.numel() for t in tensors.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    exact = not quant and layout_tag is None
    if (values != weights) if exact else weights > max(_SMALL_MODEL_WEIGHTS, _MAX_WEIGHTS_PER_BYTE * nbytes):
        raise CheckpointError(
            f"{path}: tensors disagree with the stored config: it describes a model of {weights:,} weights "
            f"but the file holds {values:,} values ({nbytes:,} bytes); the file is corrupt or was altered "
            "(re-create it with `dvc repro`)")


def _check_finite(path: Path, tensors: dict) -> None:
    """One line naming the first float tensor that holds a NaN or an infinity."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{path}: tensor {name!r} holds {bad:,} NaN/inf value{'s' if bad > 1 else ''}: the model is "
                "unusable (a diverged run or a damaged file); re-create it with `dvc repro`")


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
    if "config" not in meta:
        raise CheckpointError(f"{path}: config in header is unusable: the header has no config field")
    raw = _parse_json(meta["config"], f"{path}: config in header")
    quant = _parse_json(meta.get("quant", "{}"), f"{path}: quant config in header")
    info = _parse_json(meta.get("meta", "{}"), f"{path}: meta in header")
    _check_config_limits(raw, path)
    try:
        config = ModelConfig.from_dict(raw)
        if not isinstance(quant, dict) or not isinstance(info, dict):
            raise CheckpointError("quant and meta must be JSON objects")
    except (TypeError, IteraliteError) as e:
        raise CheckpointError(f"{path}: config in header is unusable: {e}") from None
    layout = _BY_TAG.get(meta.get("layout"))
    if layout is None:
        known = ", ".join(t for t in _BY_TAG if t)
        raise CheckpointError(f"{path}: tensor layout {meta.get('layout')!r} is unknown; this iteralite "
                              f"reads the default layout and {known}: re-create it with `dvc repro`")
    _check_sizes(path, config, quant, layout.tag, tensors)
    try:
        tensors = layout.read(tensors, meta, lambda: _layout_model(config, quant, path))
    except CheckpointError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    _check_finite(path, tensors)
    return Checkpoint(path, meta.get("kind", "?"), config, quant, meta.get("tokenizer_sha256", ""),
                      info, tensors)


def check_tokenizer(ckpt: Checkpoint, tokenizer_path) -> None:
    """Raise a one-line CheckpointError unless `tokenizer_path` is the tokenizer `ckpt` was trained
    with: the checkpoint must record a tokenizer sha256, the file must be a readable tokenizer JSON
    with that sha256, and its vocabulary size must equal the model's `config.vocab_size`."""
    load_checked_tokenizer(ckpt, tokenizer_path)


def load_checked_tokenizer(ckpt: Checkpoint, tokenizer_path):
    """`check_tokenizer`, returning the tokenizer it checked: the file is read once, and the bytes
    hashed are the bytes parsed, so the tokenizer used is exactly the file named (and checked)."""
    from tokenizers import Tokenizer

    tok_path = Path(tokenizer_path)
    recorded = ckpt.tokenizer_sha256
    if not (isinstance(recorded, str) and _SHA256_HEX.fullmatch(recorded)):
        raise CheckpointError(
            f"{ckpt.path}: records no tokenizer id (tokenizer_sha256 {recorded!r}), so it cannot be "
            f"checked against {tok_path}; re-create it with `dvc repro`")
    _check_regular_file(tok_path, "tokenizer", "(run `dvc repro tokenizer` or `dvc pull`)")
    try:
        with _open_regular(tok_path, "tokenizer") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"{tok_path}: cannot read the tokenizer: {e.strerror}") from None
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
        vocab = tok.get_vocab_size()
    except Exception as e:  # `tokenizers` raises a bare Exception for a file it cannot parse
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{tok_path}: not a tokenizer JSON file ({reason}); "
                              f"{ckpt.path} needs the tokenizer.json it was trained with") from None
    if hashlib.sha256(data).hexdigest() != recorded.lower():
        raise CheckpointError(f"{ckpt.path} was trained with another tokenizer than {tok_path} "
                              "(sha256 differs); pass the matching tokenizer")
    if vocab != ckpt.config.vocab_size:
        raise CheckpointError(f"{ckpt.path}: the model's vocab_size is {ckpt.config.vocab_size} but "
                              f"tokenizer {tok_path} has {vocab} tokens; re-create them together with `dvc repro`")
    return tok


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
        # torch lists one mismatch per line ("\n\t..."); one line of ours names them all, capped
        parts = [p.strip() for p in str(e).split("\n\t")[1:]] or [str(e).strip()]
        msg = "; ".join(" ".join(p.split()) for p in parts)[:800]
        raise CheckpointError(f"{ckpt.path}: tensors disagree with the stored config: {msg}") from None
    model.eval()
    return model


def load_model(path):
    """(model in eval mode, Checkpoint) from a file; every failure is a CheckpointError."""
    ckpt = read_checkpoint(path)
    return build_model(ckpt), ckpt

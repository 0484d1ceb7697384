"""The compact checkpoint layout ("compact-v3"): one uint8 tensor, a tiny index, codes entropy-coded.

The default layout stores every state_dict tensor as its own safetensors entry, so the JSON header
repeats a name, dtype, shape and offsets per tensor (~100 bytes each; 95% of a small mixed-precision
artifact's header). In the compact layout the file is still a plain safetensors file, but it holds
ONE tensor, "blob" (uint8, 1-D), plus these header fields besides the usual ones:

    layout    "compact-v3"
    identity  16 hex digits: the tensor list (name, dtype, shape, in order) the blob holds, hashed
              (`identity`); checked against the rebuilt model before anything is decoded
    index     base64 of one unsigned LEB128 varint (minimal length) per tensor: (length << 3) | codec,
              where length is the stored byte length for a codec whose size the tensor does not
              imply and 0 for raw (its size is the rebuilt tensor's: storing it would only repeat it)

The tensors are those of the model rebuilt from the stored config + quant config (the loader's
empty model), concatenated in its state_dict order: names, dtypes and shapes are implied by the
config and never stored. The identity records which list that was, so code that builds the same
shapes in another order (norm1/norm2, A_log/D) refuses the file instead of loading a tensor into
its neighbour's place. `codec` indexes CODECS, fixed for this layout version; every multi-byte
value is little-endian whatever the host (`stfile.le_bytes`, numpy '<' dtypes):

    0 raw   the tensor's bytes (little-endian, row-major), exactly its dtype size * numel
    1 rans  a packed integer code tensor (see `quant.coding`): its codes, entropy-coded
            (`quant.entropy`); decoding re-packs them, so the loaded model holds the very tensors
            the default layout would
    2 f16   a float32 tensor every value of which is exactly an fp16 value (finite): its fp16
            bytes (little-endian), 2 * numel; lossless, so it is chosen only where it loses nothing
    3 grid  a float16/float32 tensor every value of which lies on the b-bit grid its own min and
            max define (`io.grid`: log for group scales, linear for the float leftovers): b bits
            a value plus 5 bytes; also lossless, so it applies only to tensors snapped to a grid
            (`mixed_precision.scale_bits`, `leftover_bits`)
    4 rans-prev  a packed integer code tensor, its codes entropy-coded with one table per
            previous code (context = the code before; `quant.context`)
    5 rans-rows  the same with one table per group of consecutive codes (G contiguous groups:
            blocks of rows; G stored in the blob)

Codecs 4 and 5 came without a layout version: old files never hold them and an old reader refuses
their ids by name. The writer tries every codec, so a context codec is stored only for the tensors
where it is smaller than rans (`codec_report` measures what each one saves on a model).

compact-v1 (2 codec bits, codecs 0-2) and compact-v2 (no identity) are no longer read: their
artifacts are rebuilt by `dvc repro`.

So a raw or f16 tensor costs one index byte and a coded or grid one two or three. A code tensor is
stored coded only when the blob is smaller than its packed bytes. Reading checks, before decoding
anything, that the identity matches the rebuilt model's tensor list, that the index has one entry per
rebuilt tensor with a known codec, that raw entries carry no length and that the lengths sum to
the blob's size; every failure is a CheckpointError of one line. The checkpoint's sha256 covers
the header fields (identity and index included) and the blob, and is verified before the config is
used to rebuild the model that splits the blob.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from iteralite.io import grid, varint
from iteralite.io.errors import CheckpointError
from iteralite.io.stfile import from_le_bytes, le_bytes

LAYOUT = "compact-v3"
BLOB = "blob"
_CODEC_BITS = 3  # low bits of an index entry; room for 8 codecs in this layout version
_MAX_VARINT_BYTES = 10  # 2**70 > any length a file can hold
_IDENTITY_HEX = 16  # the identity field: the first 64 bits of a sha256, in hex


# --------------------------------------------------------------------------- codecs


def _raw_encode(t: torch.Tensor, view) -> bytes:
    return le_bytes(t)


def _raw_decode(data: bytes, like: torch.Tensor, view) -> torch.Tensor:
    # the index check already made len(data) == like's byte size
    return from_le_bytes(data, like.dtype, like.shape)


def _rans_encode(t: torch.Tensor, view) -> bytes | None:
    return None if view is None else view.encode(t)


def _rans_decode(data: bytes, like: torch.Tensor, view) -> torch.Tensor:
    if view is None:
        raise CheckpointError("is stored entropy-coded but is not an integer code tensor")
    packed = view.decode(data)
    if packed.numel() != like.numel() or like.dtype != torch.uint8:
        raise CheckpointError(f"decodes to {packed.numel()} bytes, the model holds {like.numel()}")
    return packed.reshape(like.shape)


def _f16_encode(t: torch.Tensor, view) -> bytes | None:
    if t.dtype != torch.float32 or not t.numel():
        return None
    h = t.detach().cpu().half()
    if not torch.isfinite(h).all() or not torch.equal(h.float(), t.detach().cpu()):
        return None  # not exactly representable: f16 would not be lossless
    return le_bytes(h)


def _f16_decode(data: bytes, like: torch.Tensor, view) -> torch.Tensor:
    if like.dtype != torch.float32:
        raise CheckpointError(f"is stored as f16 but the model holds a {like.dtype} tensor")
    return from_le_bytes(data, torch.float16, like.shape).float()


def _grid_encode(t: torch.Tensor, view) -> bytes | None:
    return grid.encode(t)


def _grid_decode(data: bytes, like: torch.Tensor, view) -> torch.Tensor:
    return grid.decode(data, like)


def _context():
    from iteralite.quant import context  # io must not import quant at module load
    return context


def _codes(t: torch.Tensor, view):
    """A packed code tensor's codes (numpy uint8), or None when `t` is not one or its packing is
    not reproducible from its codes (nonzero pad bits: only raw is lossless then)."""
    if view is None:
        return None
    packed = t.detach().cpu().reshape(-1)
    if packed.dtype != torch.uint8 or packed.numel() != view.packed_bytes:
        return None
    codes = view.unpack(packed)
    return codes.numpy() if torch.equal(view.pack(codes), packed) else None


def _context_codec(encode_name: str, decode_name: str, label: str):
    """(encode, decode) of a context-modelled code codec (`quant.context`)."""
    def enc(t: torch.Tensor, view) -> bytes | None:
        # None also where the codec provably cannot beat the packed bytes or the plain rans blob
        # (`quant.context`'s lower bound): it would never be chosen, and skipping it keeps
        # writing 8-bit tensors (up to 256 tables each) fast
        codes = _codes(t, view)
        if codes is None:
            return None
        beat = min(view.packed_bytes, len(view.encode(t)))
        return getattr(_context(), encode_name)(codes, view.n_symbols, beat=beat)

    def dec(data: bytes, like: torch.Tensor, view) -> torch.Tensor:
        if view is None:
            raise CheckpointError(f"is stored {label} but is not an integer code tensor")
        codes = getattr(_context(), decode_name)(data, view.n_symbols, view.count)
        packed = view.pack(torch.from_numpy(codes))
        if packed.numel() != like.numel() or like.dtype != torch.uint8:
            raise CheckpointError(f"decodes to {packed.numel()} bytes, the model holds {like.numel()}")
        return packed.reshape(like.shape)

    return enc, dec


@dataclass(frozen=True)
class Codec:
    """encode(tensor, CodeView | None) -> bytes, or None where it does not apply (or, for the
    context codecs, provably cannot be the smallest);
    decode(bytes, like: the rebuilt model's tensor, CodeView | None) -> tensor like `like`.
    implied: like -> the stored length when the tensor implies it (then the index omits it),
    None when the index must carry it."""

    name: str
    encode: Callable
    decode: Callable
    implied: Callable | None = None


# The position is the id stored in the index: append only (a new codec needs no new layout
# version for old files to read, but an old reader refuses the new id clearly).
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


CODECS: tuple[Codec, ...] = (Codec("raw", _raw_encode, _raw_decode, implied=_nbytes),
                             Codec("rans", _rans_encode, _rans_decode),
                             Codec("f16", _f16_encode, _f16_decode, implied=lambda like: 2 * like.numel()),
                             Codec("grid", _grid_encode, _grid_decode),
                             Codec("rans-prev", *_context_codec("encode_prev", "decode_prev", "rans-prev")),
                             Codec("rans-rows", *_context_codec("encode_rows", "decode_rows", "rans-rows")))
CONTEXT_CODECS = ("rans-prev", "rans-rows")  # the context-modelled options `codec_report` measures


# --------------------------------------------------------------------------- index


def encode_index(entries: list[tuple[int, int]]) -> str:
    """[(codec id, stored length)] -> the header's index string."""
    raw = b"".join(varint.encode(length << _CODEC_BITS | codec) for codec, length in entries)
    return base64.b64encode(raw).decode("ascii")


def decode_index(text: str) -> list[tuple[int, int]]:
    """Inverse of `encode_index`; CheckpointError on anything but its exact output."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise CheckpointError("compact index is not base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise CheckpointError("compact index is not in canonical base64")
    entries, pos = [], 0
    while pos < len(raw):
        v, pos = varint.read(raw, pos, "compact index", "entry", _MAX_VARINT_BYTES)
        entries.append((v & ((1 << _CODEC_BITS) - 1), v >> _CODEC_BITS))
    return entries


# --------------------------------------------------------------------------- layout


def _views(empty: nn.Module) -> dict:
    from iteralite.quant.coding import code_tensors  # io must not import quant at module load
    return code_tensors(empty)


def identity(state: dict[str, torch.Tensor]) -> str:
    """The header's "identity": the first 16 hex digits of the sha256 of one UTF-8 line
    "name|dtype|d0,d1,...\\n" per tensor (dtype as torch names it, without "torch."), in
    `state`'s order, so a reordered, renamed, retyped or reshaped tensor list changes it."""
    h = hashlib.sha256()
    for key, t in state.items():
        dtype = str(t.dtype).removeprefix("torch.")
        h.update(f"{key}|{dtype}|{','.join(map(str, t.shape))}\n".encode("utf-8"))
    return h.hexdigest()[:_IDENTITY_HEX]


def _signature(state: dict[str, torch.Tensor]) -> set[tuple[str, torch.dtype, tuple[int, ...]]]:
    return {(k, t.dtype, tuple(t.shape)) for k, t in state.items()}


def _check_tensors(state: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    if _signature(want) != _signature(state):
        diff = sorted(_signature(want) ^ _signature(state), key=str)[:3]
        raise ValueError(f"compact layout: the model's tensors differ from those its config and quant "
                         f"config rebuild (first differences: {diff}); pass the quant config it was built with")


def _candidates(state: dict[str, torch.Tensor], empty: nn.Module) -> list[dict[int, bytes]]:
    """Per tensor of `empty`'s state_dict, in its order: codec id -> stored bytes, for every codec
    that applies to `state`'s tensor (raw always does)."""
    views = _views(empty)
    out = []
    for key in empty.state_dict():
        cands = {}
        for cid, codec in enumerate(CODECS):
            data = codec.encode(state[key], views.get(key))
            if data is not None:
                cands[cid] = data
        out.append(cands)
    return out


def _pick(cands: dict[int, bytes], allowed) -> int:
    """The allowed codec with the fewest bytes, the lowest id on a tie (raw first)."""
    return min((cid for cid in allowed if cid in cands), key=lambda cid: (len(cands[cid]), cid))


def codec_report(state: dict[str, torch.Tensor], empty: nn.Module) -> dict:
    """The measured effect of the context-modelled codecs on a model's compact blob: its size in
    bytes with only the context-free codecs ("rans": raw, rans, f16, grid), with each context
    option added on its own ("rans-prev", "rans-rows"), and with all of them ("chosen": what
    `write` stores); "saved" = bytes each option saves against "rans"; "tensors_by_codec": how
    many tensors `write` stores with each codec. `state` and `empty` as for `write`."""
    _check_tensors(state, empty.state_dict())
    cands = _candidates(state, empty)
    ids = {c.name: i for i, c in enumerate(CODECS)}
    base = [i for i, c in enumerate(CODECS) if c.name not in CONTEXT_CODECS]

    def size(allowed) -> int:
        return sum(len(c[_pick(c, allowed)]) for c in cands)

    out = {"rans": size(base)}
    for name in CONTEXT_CODECS:
        out[name] = size(base + [ids[name]])
    out["chosen"] = size(range(len(CODECS)))
    out["saved"] = {name: out["rans"] - out[name] for name in CONTEXT_CODECS + ("chosen",)}
    by = {}
    for c in cands:
        name = CODECS[_pick(c, range(len(CODECS)))].name
        by[name] = by.get(name, 0) + 1
    out["tensors_by_codec"] = by
    return out


def write(state: dict[str, torch.Tensor], empty: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A model's state_dict -> ({"blob": uint8 (n,)}, {"layout", "identity", "index"}).

    `empty` is the model the loader will rebuild from the stored config + quant config; the model
    being saved must have exactly its tensors (names, dtypes, shapes), else ValueError: a file whose
    index cannot be read back is never written. Each tensor takes the smallest codec that applies
    (raw on a tie)."""
    want = empty.state_dict()
    _check_tensors(state, want)
    parts, entries = [], []
    for cands in _candidates(state, empty):  # the order the loader splits the blob in
        cid = _pick(cands, range(len(CODECS)))
        entries.append((cid, 0 if CODECS[cid].implied is not None else len(cands[cid])))
        parts.append(cands[cid])
    blob = b"".join(parts)
    tensor = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
    return {BLOB: tensor}, {"layout": LAYOUT, "identity": identity(want), "index": encode_index(entries)}


def read(stored: dict[str, torch.Tensor], meta: dict[str, str], empty: nn.Module) -> dict[str, torch.Tensor]:
    """Inverse of `write`: the stored blob + header -> the state_dict to load into `empty`.
    Raises CheckpointError (one line, without the path: the caller adds it)."""
    if set(stored) != {BLOB}:
        raise CheckpointError(f"compact layout holds tensors {sorted(stored)[:4]}, expected only '{BLOB}'")
    blob = stored[BLOB]
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise CheckpointError(f"compact blob is {blob.dtype} of shape {tuple(blob.shape)}, expected 1-D uint8")
    want = empty.state_dict()
    if "identity" not in meta:
        raise CheckpointError("compact layout has no 'identity' field: the file was not written by iteralite; "
                              "re-create it with `dvc repro`")
    if meta["identity"] != identity(want):
        raise CheckpointError("compact layout: the file's tensor list (names, dtypes, shapes in order) does not "
                              "match this code's model; rebuild it with `dvc repro`")
    if "index" not in meta:
        raise CheckpointError("compact layout has no index")
    entries = decode_index(meta["index"])
    if len(entries) != len(want):
        raise CheckpointError(f"compact index lists {len(entries)} tensors; the stored config builds {len(want)}")
    lengths = []
    for (cid, length), (key, like) in zip(entries, want.items()):
        if cid >= len(CODECS):
            raise CheckpointError(f"compact index: tensor '{key}' has codec id {cid}; this iteralite knows "
                                  + ", ".join(f"{i} ({c.name})" for i, c in enumerate(CODECS)))
        if CODECS[cid].implied is not None and length:
            raise CheckpointError(f"compact index: tensor '{key}' is stored {CODECS[cid].name} but its "
                                  f"entry carries a length ({length}); the stored config implies it")
        lengths.append(CODECS[cid].implied(like) if CODECS[cid].implied is not None else length)
    if sum(lengths) != blob.numel():
        raise CheckpointError(f"compact index covers {sum(lengths)} bytes; the blob holds {blob.numel()}")
    views = _views(empty)
    data, out, pos = blob.numpy().tobytes(), {}, 0
    for (cid, _), length, (key, like) in zip(entries, lengths, want.items()):
        chunk, pos = data[pos:pos + length], pos + length
        try:
            out[key] = CODECS[cid].decode(chunk, like, views.get(key))
        except CheckpointError as e:
            msg = str(e)
            raise CheckpointError(msg if msg.startswith(f"'{key}'") else f"'{key}' {msg}") from None
    return out

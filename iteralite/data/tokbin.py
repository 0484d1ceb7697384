"""A compact binary form of the byte-level BPE tokenizer, the one the standalone C runtime
(`iteralite/runtime/native/itl_text.c`) loads: raw token bytes and merge pairs, no JSON, no
byte-to-unicode characters, ~17 KB for the 2,000-token tokenizer (the JSON is ~120 KB).

Only the configuration `iteralite.data.tokenizer` trains is accepted (ByteLevel pre-tokenizer with
the GPT-2 regex and no prefix space, BPE without dropout, subword prefix or suffix, no normalizer);
`write_tokbin` refuses any other, since the C encoder would silently give other ids.

Format, version 1 (all integers little-endian):

    offset  size  field
    0       4     magic b"ITLT"
    4       2     version (1)
    6       2     reserved, 0
    8       4     file size in bytes, checksum included (tells truncated from corrupt)
    12      4     V, the vocabulary size (ids 0..V-1, every id a token; V <= 65536)
    16      4     M, the number of merges
    20      4     A, the number of added tokens
    24      4     the id of <|endoftext|>, 0xFFFFFFFF when there is none
    28      ...   V tokens in id order: LEB128 varint byte length, then the raw bytes (byte-level
                  characters mapped back to bytes; an added token's bytes are its UTF-8 text)
            5*A   added tokens (matched in the text before pre-tokenization, leftmost-longest):
                  u32 id, u8 flags (bit 0: special)
            ...   M merges in rank order (rank 0 first): u16 left id, u16 right id, then the id the
                  merge produces as a zigzag LEB128 varint of (id - previous produced id - 1)
                  (0 for trained tokenizers, whose merge tokens are numbered in rank order)
    end-4   4     CRC-32 (IEEE, zlib's) of every byte before it

A merge's produced token must have exactly the bytes of its left and right tokens together, and
all 256 single bytes must be tokens (byte-level BPE's initial alphabet); the readers check both.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from iteralite.data.corpus import EOT
from iteralite.io import varint
from iteralite.io.atomic import atomic_path
from iteralite.io.errors import CheckpointError, DataError

MAGIC = b"ITLT"
VERSION = 1
HEADER = struct.Struct("<4sHHIIIII")  # magic, version, reserved, size, V, M, A, eot id
NO_ID = 0xFFFFFFFF
MAX_VOCAB = 65536  # merge ids are u16


@dataclass
class TokBin:
    """The content of a tokenizer file: `tokens[i]` the bytes of id i, `merges[r]` (left, right,
    produced id) of rank r, `added` [(id, special)] in file order, `eot_id` or None."""
    tokens: list[bytes]
    merges: list[tuple[int, int, int]]
    added: list[tuple[int, bool]] = field(default_factory=list)
    eot_id: int | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)


def _zigzag(v: int) -> int:
    return (v << 1) if v >= 0 else ((-v << 1) - 1)


def _unzigzag(v: int) -> int:
    return (v >> 1) if not v & 1 else -((v + 1) >> 1)


def from_tokenizer(tok: Tokenizer) -> TokBin:
    """The TokBin of a `tokenizers` byte-level BPE; DataError naming what is unsupported."""
    from iteralite.data.tokenizer import _bytes_to_unicode

    spec = json.loads(tok.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise DataError(f"tokenizer model is {model.get('type')!r}, the binary format holds only BPE")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback", "ignore_merges"):
        if model.get(key) not in (None, "", False):
            raise DataError(f"tokenizer BPE option {key}={model.get(key)!r} is not supported by the binary format")
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise DataError(f"tokenizer pre-tokenizer {pre!r} is not supported: the binary format needs "
                        "ByteLevel(add_prefix_space=False) with the GPT-2 regex")
    if spec.get("normalizer") is not None:
        raise DataError("tokenizer has a normalizer; the binary format supports none")

    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    size = tok.get_vocab_size()
    if size > MAX_VOCAB:
        raise DataError(f"tokenizer vocabulary of {size} tokens is over the binary format's {MAX_VOCAB}")
    tokens: list[bytes | None] = [None] * size
    added: list[tuple[int, bool]] = []
    for a in spec.get("added_tokens", []):
        if a.get("single_word") or a.get("lstrip") or a.get("rstrip"):
            raise DataError(f"added token {a['content']!r} uses single_word/lstrip/rstrip, not supported")
        if not a["content"]:
            raise DataError("tokenizer has an empty added token")
        tokens[a["id"]] = a["content"].encode("utf-8")
        added.append((a["id"], bool(a.get("special"))))
    vocab = model["vocab"]
    for piece, i in vocab.items():
        if tokens[i] is not None:
            continue
        try:
            tokens[i] = bytes(byte_of[ch] for ch in piece)
        except KeyError:
            raise DataError(f"token {i} ({piece!r}) is not byte-level text") from None
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise DataError(f"tokenizer ids are not dense: {len(missing)} ids without a token (first {missing[0]})")
    merges = []
    for m in model.get("merges", []):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        merges.append((vocab[left], vocab[right], vocab[left + right]))
    eot = tok.token_to_id(EOT)
    return TokBin(tokens=tokens, merges=merges, added=added, eot_id=eot)


def to_bytes(tb: TokBin) -> bytes:
    """The file's bytes (the format in the module docstring)."""
    body = bytearray()
    for t in tb.tokens:
        body += varint.encode(len(t)) + t
    for i, special in tb.added:
        body += struct.pack("<IB", i, 1 if special else 0)
    prev = -1
    for left, right, new in tb.merges:
        body += struct.pack("<HH", left, right) + varint.encode(_zigzag(new - prev - 1))
        prev = new
    total = HEADER.size + len(body) + 4
    head = HEADER.pack(MAGIC, VERSION, 0, total, tb.vocab_size, len(tb.merges), len(tb.added),
                       NO_ID if tb.eot_id is None else tb.eot_id)
    data = head + bytes(body)
    return data + struct.pack("<I", zlib.crc32(data))


def write_tokbin(tok: Tokenizer, path: str | Path) -> int:
    """Write `tok` as a binary tokenizer file at `path` (atomically); its size in bytes."""
    data = to_bytes(from_tokenizer(tok))
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return len(data)


def parse(data: bytes, name: str = "tokenizer file") -> TokBin:
    """A TokBin from a file's bytes; CheckpointError (one line, naming `name`) when the bytes are
    not this format, another version, truncated or corrupt."""
    if len(data) < 4 or data[:4] != MAGIC:
        raise CheckpointError(f"{name} is not an iteralite binary tokenizer (magic {bytes(data[:4])!r}, "
                              f"want {MAGIC!r})")
    if len(data) < 6:
        raise CheckpointError(f"{name} is truncated ({len(data)} bytes, inside the header)")
    version = struct.unpack_from("<H", data, 4)[0]
    if version != VERSION:
        raise CheckpointError(f"{name} is binary tokenizer version {version}; this build reads version {VERSION}")
    if len(data) < HEADER.size + 4:
        raise CheckpointError(f"{name} is truncated ({len(data)} bytes, inside the header)")
    _, _, _, total, n_vocab, n_merges, n_added, eot = HEADER.unpack_from(data, 0)
    if len(data) < total:
        raise CheckpointError(f"{name} is truncated ({len(data)} of {total} bytes)")
    if len(data) > total:
        raise CheckpointError(f"{name} has {len(data) - total} trailing bytes after its {total}-byte body")
    if zlib.crc32(data[:-4]) != struct.unpack_from("<I", data, len(data) - 4)[0]:
        raise CheckpointError(f"{name} is corrupt (CRC-32 mismatch)")
    end = len(data) - 4

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{name} is corrupt ({what})")

    if n_vocab > MAX_VOCAB:
        raise bad(f"vocabulary of {n_vocab} tokens is over {MAX_VOCAB}")
    pos, tokens, body = HEADER.size, [], bytes(data[:end])
    try:
        for _ in range(n_vocab):
            n, pos = varint.read(body, pos, name, "token length", 5)
            if pos + n > end:
                raise bad("a token runs past the end")
            tokens.append(bytes(data[pos:pos + n]))
            pos += n
        added = []
        for _ in range(n_added):
            if pos + 5 > end:
                raise bad("the added tokens run past the end")
            i, flags = struct.unpack_from("<IB", data, pos)
            pos += 5
            if i >= n_vocab or not tokens[i]:
                raise bad(f"added token id {i} is not a non-empty token")
            added.append((i, bool(flags & 1)))
        merges, prev = [], -1
        for r in range(n_merges):
            if pos + 4 > end:
                raise bad("the merges run past the end")
            left, right = struct.unpack_from("<HH", data, pos)
            z, pos = varint.read(body, pos + 4, name, "merge id", 5)
            new = prev + 1 + _unzigzag(z)
            if max(left, right) >= n_vocab or not 0 <= new < n_vocab:
                raise bad(f"merge {r} has an id out of range")
            if tokens[new] != tokens[left] + tokens[right]:
                raise bad(f"merge {r} produces token {new} whose bytes are not its pair's")
            merges.append((left, right, new))
            prev = new
    except CheckpointError as e:
        if str(e).startswith(f"{name} is corrupt"):
            raise
        raise bad(str(e)) from None
    if pos != end:
        raise bad(f"{end - pos} unread bytes before the checksum")
    singles = {t for t in tokens if len(t) == 1}
    if len(singles) != 256:
        raise bad(f"only {len(singles)} of the 256 single bytes are tokens")
    if eot != NO_ID and eot >= n_vocab:
        raise bad(f"end-of-text id {eot} is out of range")
    return TokBin(tokens=tokens, merges=merges, added=added, eot_id=None if eot == NO_ID else eot)


def read_tokbin(path: str | Path) -> TokBin:
    """Read a binary tokenizer file; DataError when missing, CheckpointError when unusable."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: binary tokenizer not found")
    return parse(path.read_bytes(), str(path))

"""LEB128 varints (7 bits a byte, low bits first, high bit = more bytes follow), the integers of
the compact checkpoint index and of entropy-coded blobs. Reading is strict: a truncated, over-long
(non-minimal) or too-wide varint is a CheckpointError naming where it was read."""
from __future__ import annotations

from iteralite.io.errors import CheckpointError


def encode(v: int) -> bytes:
    """The minimal varint of a non-negative int."""
    if v < 0:
        raise ValueError(f"a varint holds a non-negative int, got {v}")
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def read(data: bytes, pos: int, owner: str, what: str, max_bytes: int) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos` of `data`; `owner` and `what` name it in
    errors ("entropy blob", "count field")."""
    v = 0
    for i in range(max_bytes):
        if pos + i >= len(data):
            raise CheckpointError(f"{owner} is truncated inside the {what}")
        b = data[pos + i]
        v |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if b == 0 and i > 0:
                raise CheckpointError(f"{owner} has an over-long encoding of the {what}")
            return v, pos + i + 1
    raise CheckpointError(f"{owner}'s {what} is longer than {max_bytes} bytes")

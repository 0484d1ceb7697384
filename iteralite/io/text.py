"""Bytes read from a user's file, pipe or data split, turned into text: one message for a bad byte,
wherever it was read."""
from __future__ import annotations

from iteralite.io.errors import IteraliteError


def decode_utf8(data: bytes, what: str, error_cls: type[IteraliteError] = IteraliteError, offset: int = 0) -> str:
    """`data` as UTF-8 text. A bad byte raises `error_cls` with one line: `what` (the file or stream
    it came from), the byte, and its offset there (`offset` = where `data` starts in `what`, so a
    chunk of a streamed file reports the same offset as a decode of the whole file would)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error_cls(f"{what}: not UTF-8 text (invalid byte 0x{data[e.start]:02x} at offset "
                        f"{offset + e.start})") from None

"""Bytes read from a user's file, pipe or data split, turned into text: one message for a bad byte,
wherever it was read; and token ids turned into text as they stream (`TextStream`)."""
from __future__ import annotations

import codecs
from typing import Callable

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


class TextStream:
    """Token ids in (`push`), text out through `write` in non-empty pieces that add up, after
    `finish`, to `tok.decode(ids)`.

    A byte-level tokenizer (its decoder is `tokenizers.decoders.ByteLevel`, as iteralite's is) is
    decoded from each id's own bytes by an incremental UTF-8 decoder with errors="replace", which
    puts one U+FFFD per maximal invalid subpart, as the tokenizer's lossy decode does: every byte is
    decoded once and `tok.decode` is never called; a byte that cannot start or continue a character
    (a lone 0x80) is written at once as U+FFFD, and only an unfinished character (<= 3 bytes) is
    held. Any other tokenizer: the ids not yet shown are decoded together until their text ends in a
    complete character, then written (work bounded only while characters complete)."""

    def __init__(self, tok, write: Callable[[str], None]):
        self.tok, self.write = tok, write
        self._bytes = _byte_table(tok)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._tail: list[int] = []

    def push(self, token: int) -> None:
        if self._bytes is not None:
            self._put(self._utf8.decode(self._bytes.get(token, b"")))
            return
        self._tail.append(token)
        text = self.tok.decode(self._tail)
        if not text.endswith("\ufffd"):  # wait for a multi-byte character to complete
            self._put(text)
            self._tail.clear()

    def finish(self) -> None:
        """Write what is held (an unfinished character: U+FFFD, as the full decode has it)."""
        if self._bytes is not None:
            self._put(self._utf8.decode(b"", final=True))
        elif self._tail:
            self._put(self.tok.decode(self._tail))
            self._tail.clear()

    def _put(self, text: str) -> None:
        if text:
            self.write(text)


def _byte_table(tok) -> dict[int, bytes] | None:
    """id -> the bytes it stands for, for a byte-level tokenizer (special tokens, which decode
    skips, stand for none); None for any other tokenizer or one with a token that is not bytes."""
    try:
        from tokenizers import decoders

        if not isinstance(tok.decoder, decoders.ByteLevel):
            return None
        from iteralite.data.tokenizer import _bytes_to_unicode

        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        added = tok.get_added_tokens_decoder()
        table = {}
        for piece, i in tok.get_vocab(with_added_tokens=True).items():
            if i in added:
                if not added[i].special:
                    return None  # written out as its text: not bytes
                table[i] = b""
            elif all(ch in byte_of for ch in piece):
                table[i] = bytes(byte_of[ch] for ch in piece)
            else:
                return None
        return table
    except (AttributeError, TypeError, ImportError):  # not a `tokenizers` tokenizer
        return None

"""TextStream (io/text.py): token ids to text as they stream. The pieces add up to the tokenizer's
own decode of all the ids; a lone UTF-8 continuation byte is written at once (as U+FFFD), not held
to the end; and the decode work is linear."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iteralite.data.tokenizer import _bytes_to_unicode, eot_id, load_tokenizer
from iteralite.io.text import TextStream


class CountingTokenizer:
    """Wraps a tokenizer, counting the ids passed to `decode`."""

    def __init__(self, tok):
        self.tok, self.ids = tok, 0

    def decode(self, ids, *a, **kw):
        self.ids += len(ids)
        return self.tok.decode(ids, *a, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


class PlainTokenizer(CountingTokenizer):
    """The same tokenizer seen only through `decode` (no byte-level decoder to read ids' bytes)."""

    decoder = None


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir / "tokenizer.json")


def _byte_ids(tok) -> list[int]:
    """The id of each single-byte token, by byte value."""
    return [tok.token_to_id(c) for _, c in sorted(_bytes_to_unicode().items())]


def _stream(tok, ids):
    pieces, shown = [], []
    s = TextStream(tok, pieces.append)
    for i in ids:
        s.push(i)
        shown.append(len(pieces))
    s.finish()
    return pieces, shown


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_pieces_add_up_to_the_full_decode(tok, data):
    """Any ids: single bytes (lone continuations, unfinished characters), merged tokens, the
    special <|endoftext|> (decode skips it); for a byte-level and a decode-only tokenizer alike."""
    byte_ids = _byte_ids(tok)
    ids = data.draw(st.lists(st.one_of(st.sampled_from(byte_ids), st.integers(0, tok.get_vocab_size() - 1),
                                       st.just(eot_id(tok))), max_size=40))
    for t in (tok, PlainTokenizer(tok)):
        pieces, _ = _stream(t, ids)
        assert "".join(pieces) == tok.decode(ids) and all(pieces)


def test_lone_continuation_bytes_stream_at_once_with_linear_work(tok):
    """A model emitting 0x80 bytes only: was nothing written until the end and ~n^2/2 ids decoded."""
    n = 2000
    counting = CountingTokenizer(tok)
    pieces, shown = _stream(counting, [_byte_ids(tok)[0x80]] * n)
    assert "".join(pieces) == tok.decode([_byte_ids(tok)[0x80]] * n) == "\ufffd" * n
    assert shown == list(range(1, n + 1))  # one U+FFFD written per token, as it comes
    assert counting.ids <= 3 * n


def test_an_unfinished_character_is_held_then_completed_or_flushed(tok):
    b = _byte_ids(tok)
    euro = [b[0xE2], b[0x82], b[0xAC]]
    pieces, shown = _stream(tok, [b[0x41]] + euro + [b[0xE2], b[0x82]])
    assert pieces == ["A", "€", "\ufffd"] and shown == [1, 1, 1, 2, 2, 2]  # the last one by finish

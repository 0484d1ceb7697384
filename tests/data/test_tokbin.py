"""The binary tokenizer format (iteralite/data/tokbin.py): it holds exactly the tokenizer's token
bytes, merges and special tokens, the real tokenizer fits in 25 KB, and foreign, other-version,
truncated or corrupt files fail with one-line errors."""
import json
import os
import struct
import zlib

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from iteralite.data.corpus import EOT, join_stories
from iteralite.data.tokbin import (HEADER, MAGIC, TokBin, from_tokenizer, parse, read_tokbin, to_bytes,
                                   write_tokbin)
from iteralite.data.tokenizer import TokenizerConfig, _bytes_to_unicode, train_tokenizer
from iteralite.io.errors import CheckpointError, DataError
from tests.conftest import REPO, fake_stories

REAL = REPO / "data" / "tokenizer" / "tokenizer.json"


@pytest.fixture(scope="module")
def small_tok():
    text = join_stories(fake_stories(200) + ["Émile ate crème brûlée — 日本 😀 it's 123"])
    return train_tokenizer(TokenizerConfig(vocab_size=320), text)


def _expected(tok: Tokenizer) -> TokBin:
    """The format's content computed independently from the tokenizer's JSON."""
    spec = json.loads(tok.to_str())
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    vocab = spec["model"]["vocab"]
    tokens = [b""] * tok.get_vocab_size()
    for piece, i in vocab.items():
        tokens[i] = bytes(byte_of[c] for c in piece)
    for a in spec["added_tokens"]:
        tokens[a["id"]] = a["content"].encode()
    merges = [(vocab[a], vocab[b], vocab[a + b]) for a, b in spec["model"]["merges"]]
    return TokBin(tokens, merges, [(a["id"], a["special"]) for a in spec["added_tokens"]], tok.token_to_id(EOT))


def test_round_trip_holds_the_tokenizer(small_tok, tmp_path):
    path = tmp_path / "tok.bin"
    n = write_tokbin(small_tok, path)
    assert n == path.stat().st_size
    got = read_tokbin(path)
    assert got == _expected(small_tok)
    assert got.vocab_size == 320 and got.eot_id == small_tok.token_to_id(EOT) and got.added == [(got.eot_id, True)]
    # every token's bytes are what `tokenizers` decodes it to (the EOT aside, which decode skips)
    checked = 0
    for i, t in enumerate(got.tokens):
        if i != got.eot_id and _is_utf8(t):
            assert small_tok.decode([i]) == t.decode(), i
            checked += 1
    assert checked >= 191  # all but the 128 lone bytes >= 0x80 and the EOT
    assert to_bytes(got) == path.read_bytes()  # the writer is a function of the content
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_real_tokenizer_fits_25_kb(tmp_path, small_tok):
    tok = Tokenizer.from_file(str(REAL)) if REAL.exists() else small_tok
    n = write_tokbin(tok, tmp_path / "tok.bin")
    assert n <= 25 * 1024, n
    assert read_tokbin(tmp_path / "tok.bin") == _expected(tok)


@pytest.fixture
def good(small_tok) -> bytes:
    return to_bytes(from_tokenizer(small_tok))


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_foreign_file_is_named(good, tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text('{"version": "1.0"}')
    with pytest.raises(CheckpointError, match=r"tokenizer.json is not an iteralite binary tokenizer \(magic") as e:
        read_tokbin(p)
    _one_line(e)
    with pytest.raises(CheckpointError, match="not an iteralite binary tokenizer"):
        parse(b"")
    with pytest.raises(DataError, match="binary tokenizer not found"):
        read_tokbin(tmp_path / "missing.bin")


def test_other_version(good):
    bad = bytearray(good)
    bad[4:6] = struct.pack("<H", 2)
    with pytest.raises(CheckpointError, match="is binary tokenizer version 2; this build reads version 1") as e:
        parse(bytes(bad))
    _one_line(e)


@pytest.mark.parametrize("keep", [5, 20, 100, -1])
def test_truncated(good, keep):
    with pytest.raises(CheckpointError, match="is truncated") as e:
        parse(good[:keep])
    _one_line(e)


def test_trailing_bytes(good):
    with pytest.raises(CheckpointError, match="1 trailing bytes"):
        parse(good + b"\0")


@pytest.mark.parametrize("where", [HEADER.size, HEADER.size + 300, -5])
def test_flipped_byte_fails_the_checksum(good, where):
    bad = bytearray(good)
    bad[where] ^= 0x10
    with pytest.raises(CheckpointError, match=r"is corrupt \(CRC-32 mismatch\)") as e:
        parse(bytes(bad))
    _one_line(e)


def test_inconsistent_content_with_a_valid_checksum(good):
    tb = parse(good)
    left, right, new = tb.merges[0]
    wrong = TokBin(tb.tokens, [(right, left, new)] + tb.merges[1:], tb.added, tb.eot_id)
    if tb.tokens[right] + tb.tokens[left] == tb.tokens[new]:
        pytest.skip("a palindromic first merge")
    with pytest.raises(CheckpointError, match=r"is corrupt \(merge 0 produces token") as e:
        parse(to_bytes(wrong))
    _one_line(e)
    # a body shortened by one byte, header and checksum made to agree with it
    body = bytearray(good[:-5])
    body[8:12] = struct.pack("<I", len(body) + 4)
    with pytest.raises(CheckpointError, match="is corrupt"):
        parse(_with_crc(bytes(body)))
    # a vocabulary without all 256 single bytes
    few = TokBin([bytes([i]) for i in range(200)], [], [], None)
    with pytest.raises(CheckpointError, match="only 200 of the 256 single bytes"):
        parse(to_bytes(few))
    assert parse(to_bytes(TokBin([bytes([i]) for i in range(256)], [], [], None))).eot_id is None


def test_magic_and_header():
    data = to_bytes(TokBin([bytes([i]) for i in range(256)], [], [], None))
    assert data[:4] == MAGIC and len(data) == HEADER.size + 256 * 2 + 4


def test_unsupported_configuration_is_refused():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    with pytest.raises(DataError, match=r"pre-tokenizer .* is not supported"):
        from_tokenizer(tok)
    tok = Tokenizer(models.BPE(dropout=0.1))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    with pytest.raises(DataError, match="BPE option dropout=0.1"):
        from_tokenizer(tok)

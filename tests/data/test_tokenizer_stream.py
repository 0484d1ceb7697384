"""The streamed tokenizer stage against its in-memory reference: BPE trained from many small
batches equals BPE trained on the whole text; files encoded batch by batch equal `np.save` of the
one-shot `encode_stories`, header included. Both equal, byte for byte, what the stage wrote before
it streamed (sha256 values pinned from e45726e^)."""
import hashlib
import io

import numpy as np
import pytest

from iteralite.data import corpus
from iteralite.data.corpus import join_stories, read_utf8
from iteralite.data.tokenizer import (TokenizerConfig, TokenWriter, _npy_header, build, encode_file, encode_lines,
                                      encode_stories, load_tokenizer, save_tokenizer, token_bytes, train_tokenizer,
                                      train_tokenizer_batches)
from iteralite.io.errors import DataError
from tests.conftest import fake_stories

CFG = TokenizerConfig(vocab_size=300)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _stories():
    return fake_stories(300, 1) + ["Émile ate crème brûlée — 日本 😀", "Line one\r\nline two"]


def _prepared(root, train=None):
    prepared = root / "prepared"
    prepared.mkdir()
    (prepared / "train.txt").write_text(join_stories(train if train is not None else _stories()))
    (prepared / "valid.txt").write_text(join_stories(fake_stories(30, 2)))
    (prepared / "dev.txt").write_text(join_stories(fake_stories(20, 4)))
    (prepared / "wikitext2_test.txt").write_text(" = Heading = \n\n" + "\n".join(fake_stories(20, 3)) + "\n")
    return prepared


# sha256 of what the tokenizer stage writes for `_prepared`'s corpus (vocab_size 300), produced by
# the code before the stage streamed (e45726e^: whole files read, `train_tokenizer` on the text,
# `np.save` of `encode_stories`/`encode_lines`). The in-memory references now share code with the
# streamed stage, so comparing the two alone could not catch a change to both.
GOLDEN_SHA256 = {
    "dev.npy": "504d9da78fd0bf1487f50b267699d749c16e136157fd23776abd699df45e0d49",
    "tokenizer.json": "86fa512ccccaec4f70cb02f878b9148f82afa08b903f1c7fddb9ccfffe24d910",
    "train.npy": "be1a1d66373b1b35538be8e1fbe6b57154ff89b70eb7d4b6c7d9c3aea4b0e26f",
    "valid.npy": "1c879027b6d9b4d80333b14f58d80ce4eeccbcdd0fce3c886fb5afbfbcb234b9",
    "wikitext2.npy": "05801c41f5b6ad0871892dfb956a3d34ba25b692f70d74424ee11c411c47cf6f",
}


def _sha256s(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_build_writes_the_bytes_it_wrote_before_streaming(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(corpus, "READ_BYTES", chunk)
    build(CFG, _prepared(tmp_path), tmp_path / "tok", progress=False)
    written = _sha256s(tmp_path / "tok")
    assert written.pop("tokenizer.bin") and written == GOLDEN_SHA256  # the C runtime's copy: tests/data/test_tokbin.py


def test_in_memory_references_write_the_bytes_of_before_streaming(tmp_path):
    prepared, out = _prepared(tmp_path), tmp_path / "ref"
    out.mkdir()
    tok = train_tokenizer(CFG, read_utf8(prepared / "train.txt"))
    save_tokenizer(tok, out / "tokenizer.json")
    for name in ("train", "dev", "valid"):
        (out / f"{name}.npy").write_bytes(_npy_bytes(encode_stories(tok, read_utf8(prepared / f"{name}.txt"))))
    (out / "wikitext2.npy").write_bytes(_npy_bytes(encode_lines(tok, read_utf8(prepared / "wikitext2_test.txt"))))
    assert _sha256s(out) == GOLDEN_SHA256


def test_bpe_from_small_batches_equals_whole_text():
    text = join_stories(_stories())
    whole = train_tokenizer(CFG, text)
    stories = corpus.split_stories(text)
    batched = train_tokenizer_batches(CFG, (stories[i:i + 7] for i in range(0, len(stories), 7)))
    assert batched.to_str() == whole.to_str()


@pytest.mark.parametrize("chunk", [9, 4096])
def test_batched_encoding_equals_one_shot_npy(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(corpus, "READ_BYTES", chunk)
    text = join_stories(_stories())
    tok = train_tokenizer(CFG, text)
    (tmp_path / "train.txt").write_text(text)
    n, n_bytes = encode_file(tok, tmp_path / "train.txt", tmp_path / "train.npy", token_bytes(tok))
    ref = encode_stories(tok, text)
    assert (tmp_path / "train.npy").read_bytes() == _npy_bytes(ref)
    assert n == ref.size and n_bytes == int(token_bytes(tok)[ref.astype(np.int64)].sum())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


@pytest.mark.parametrize("n", [0, 1, 12345])
def test_token_writer_equals_np_save(n):
    arr = (np.arange(n, dtype=np.int64) * 7919 % 65535).astype(np.uint16)
    buf = io.BytesIO()
    out = TokenWriter(buf)
    for i in range(0, n, 1000):
        out.write(arr[i:i + 1000])
    out.finish()
    assert buf.getvalue() == _npy_bytes(arr)


@pytest.mark.parametrize("n", [0, 2**31, 2**32 + 1, 10**12])
def test_npy_header_has_one_length_and_reads_back_as_n_tokens(n):
    """The header TokenWriter writes over its placeholder: the same length for any count (a 10**12
    token split included; nothing is allocated), and numpy reads it as a (n,) uint16 array."""
    header = _npy_header(n)
    assert len(header) == len(_npy_header(0))
    f = io.BytesIO(header)
    assert np.lib.format.read_magic(f) == (1, 0)
    assert np.lib.format.read_array_header_1_0(f) == ((n,), False, np.dtype("<u2"))
    assert f.tell() == len(header)  # the data would start right after it


def test_build_equals_in_memory_build_and_shows_progress(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(corpus, "READ_BYTES", 512)
    prepared = _prepared(tmp_path)
    metrics = build(CFG, prepared, tmp_path / "tok", progress=True)
    assert "train BPE" in capsys.readouterr().err  # a tqdm bar on stderr
    text = read_utf8(prepared / "train.txt")  # bytes as they are: read_text would turn \r\n into \n
    ref_tok = train_tokenizer(CFG, text)
    assert load_tokenizer(tmp_path / "tok" / "tokenizer.json").to_str() == ref_tok.to_str()
    nb = token_bytes(ref_tok)
    for name in ("train", "dev", "valid", "wikitext2"):
        src = read_utf8(prepared / f"{'wikitext2_test' if name == 'wikitext2' else name}.txt")
        ref = (encode_lines if name == "wikitext2" else encode_stories)(ref_tok, src)
        assert (tmp_path / "tok" / f"{name}.npy").read_bytes() == _npy_bytes(ref), name
        assert metrics[f"{name}_tokens"] == ref.size
        assert metrics[f"{name}_bytes_per_token"] == round(float(nb[ref.astype(np.int64)].sum()) / ref.size, 4)


def test_bad_byte_in_a_prepared_split_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "READ_BYTES", 64)
    prepared = _prepared(tmp_path)
    raw = (prepared / "dev.txt").read_bytes()
    (prepared / "dev.txt").write_bytes(raw[:500] + b"\xff" + raw[500:])
    with pytest.raises(DataError) as e:
        build(CFG, prepared, tmp_path / "tok", progress=False)
    assert str(e.value) == f"{prepared / 'dev.txt'}: not UTF-8 text (invalid byte 0xff at offset 500)"
    assert not (tmp_path / "tok" / "dev.npy").exists()


def test_bad_byte_deep_in_train_txt_stops_the_bpe_before_anything_is_written(tmp_path, monkeypatch):
    """The BPE trainer pulls story batches through the tokenizers library: a bad byte read many
    chunks in still comes out as the one-line DataError, and no tokenizer.json is written."""
    monkeypatch.setattr(corpus, "READ_BYTES", 64)
    prepared = _prepared(tmp_path)
    raw = (prepared / "train.txt").read_bytes()
    cut = raw.index(b" ", len(raw) * 3 // 4)  # ~700 chunks in, inside an ASCII story
    (prepared / "train.txt").write_bytes(raw[:cut] + b"\xff" + raw[cut:])
    with pytest.raises(DataError) as e:
        build(CFG, prepared, tmp_path / "tok", progress=False)
    assert str(e.value) == f"{prepared / 'train.txt'}: not UTF-8 text (invalid byte 0xff at offset {cut})"
    assert "\n" not in str(e.value)
    assert not (tmp_path / "tok").exists()  # no tokenizer.json, nor any other output


def test_missing_prepared_split_says_repro_data(tmp_path):
    prepared = _prepared(tmp_path)
    (prepared / "train.txt").unlink()
    with pytest.raises(DataError, match=r"train\.txt not found \(run `dvc repro data`\)"):
        build(CFG, prepared, tmp_path / "tok", progress=False)
    assert not (tmp_path / "tok").exists()

import errno
import json
import os
import pickle
import signal
import struct

import pytest
import torch

from iteralite.io.atomic import new_file_mode
from iteralite.io.checkpoint import (check_tokenizer, checkpoint_checksum, header_bytes,
                                     load_model, read_checkpoint, save_checkpoint, tensor_digest)
from iteralite.io.errors import CheckpointError


@pytest.fixture
def saved(tmp_path, model):
    path = tmp_path / "m.safetensors"
    size = save_checkpoint(path, model, kind="fp32", tokenizer_sha256="abc", meta={"step": 3})
    assert size == path.stat().st_size
    return path


def test_round_trip_gives_identical_logits(saved, model, cfg):
    loaded, ckpt = load_model(saved)
    assert ckpt.kind == "fp32" and ckpt.meta["step"] == 3 and ckpt.tokenizer_sha256 == "abc"
    assert ckpt.config == cfg
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_truncated_file_is_a_clear_error(saved):
    data = saved.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        saved.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|corrupt|not a safetensors"):
            read_checkpoint(saved)


def test_size_is_header_plus_tensor_bytes_and_mode_is_normal(saved):
    tensors = read_checkpoint(saved).tensors
    assert saved.stat().st_size == header_bytes(saved) + sum(t.numel() * t.element_size() for t in tensors.values())
    assert saved.stat().st_mode & 0o777 == new_file_mode()  # not mkstemp's 0600


def _rewrite_meta(path, resign=False, **changes):
    """Change header fields; with `resign`, store the checksum that matches the new fields (a file
    that is consistent but says something else)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["__metadata__"].update(changes)
    if resign:
        header["__metadata__"]["sha256"] = checkpoint_checksum(header["__metadata__"], read_checkpoint(path).tensors)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_wrong_version_is_a_clear_error(saved):
    _rewrite_meta(saved, version="99")
    with pytest.raises(CheckpointError, match="version '99'.*reads version 2"):
        read_checkpoint(saved)


def test_version_1_file_says_recreate_not_checksum(saved):
    """A genuine version-1 file (checksum over the tensors only) gets the version line."""
    tensors = read_checkpoint(saved).tensors
    _rewrite_meta(saved, version="1", sha256=tensor_digest(tensors))
    msg = r"version '1'; this iteralite reads version 2\. Re-create it with `dvc repro`"
    with pytest.raises(CheckpointError, match=msg):
        read_checkpoint(saved)


def test_wrong_format_is_a_clear_error(saved):
    _rewrite_meta(saved, format="somebody-else")
    with pytest.raises(CheckpointError, match="not an iteralite checkpoint"):
        read_checkpoint(saved)


def test_flipped_byte_is_detected(saved):
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=_MISMATCH):
        read_checkpoint(saved)


_MISMATCH = "checksum mismatch: header or tensors were changed: the file is corrupt"


def test_changed_config_top_k_is_detected(saved, cfg):
    """One byte of the stored config (top_k 2 -> 3) would build another model: refused."""
    raw = saved.read_bytes()
    assert cfg.top_k == 2 and raw.count(b'\\"top_k\\": 2') == 1
    saved.write_bytes(raw.replace(b'\\"top_k\\": 2', b'\\"top_k\\": 3'))
    with pytest.raises(CheckpointError, match=_MISMATCH):
        load_model(saved)


@pytest.mark.parametrize("field,value", [("kind", "int4-rtn"), ("quant", "{}  "), ("meta", '{"step": 4}'),
                                         ("tokenizer_sha256", "abd"), ("extra", "x"), ("sha256", "0" * 64)])
def test_any_changed_header_field_is_detected(saved, field, value):
    _rewrite_meta(saved, **{field: value})
    with pytest.raises(CheckpointError, match=_MISMATCH):
        read_checkpoint(saved)


def test_shapes_disagreeing_with_config_are_a_clear_error(saved, cfg):
    _rewrite_meta(saved, resign=True, config=json.dumps({**cfg.to_dict(), "d_ff": cfg.d_ff * 2}))
    with pytest.raises(CheckpointError, match="disagree with the stored config"):
        load_model(saved)


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pickle executed')",))


def test_pickle_is_never_executed(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"x": _Boom()}))
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    torch.save({"w": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "plain.pt")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "nope.safetensors")


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_checkpoint_path_is_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file") as e:
        read_checkpoint(tmp_path)
    assert str(tmp_path) in _one_line(e)


def test_checkpoint_path_is_a_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("read_checkpoint blocked on a FIFO"))
    signal.alarm(10)
    try:
        with pytest.raises(CheckpointError, match=r"is a FIFO \(named pipe\), not a checkpoint file") as e:
            read_checkpoint(fifo)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert str(fifo) in _one_line(e)


def test_checkpoint_symlink_loop_is_not_called_missing(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    os.symlink(b, a)
    os.symlink(a, b)
    with pytest.raises(CheckpointError, match="symlink loop") as e:
        read_checkpoint(a)
    assert "dvc pull" not in _one_line(e)


def test_dangling_symlink_says_dvc_pull_or_checkout(tmp_path):
    link = tmp_path / "m.safetensors"
    os.symlink(tmp_path / "cache" / "ab" / "cdef", link)  # a DVC cache link whose target is gone
    with pytest.raises(CheckpointError, match=r"broken DVC cache link\): run `dvc pull` or `dvc checkout`") as e:
        read_checkpoint(link)
    assert "cdef" in _one_line(e)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a file with mode 000")
def test_unreadable_checkpoint_is_permission_denied(saved):
    saved.chmod(0)
    try:
        with pytest.raises(CheckpointError, match="permission denied: cannot read the checkpoint") as e:
            read_checkpoint(saved)
        _one_line(e)
    finally:
        saved.chmod(0o644)


def test_permission_denied_on_open_is_one_line(saved, monkeypatch):
    """The same path as the chmod test, simulated so it also runs as root (e.g. in containers)."""
    real_open = os.open

    def denied(path, *a, **kw):
        if str(path) == str(saved):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(CheckpointError, match="permission denied: cannot read the checkpoint") as e:
        read_checkpoint(saved)
    assert str(saved) in _one_line(e)


# check_tokenizer: the checkpoint must name its tokenizer, and the file must be that tokenizer.

@pytest.fixture
def tok_ckpt(tok_dir, tmp_path, model):
    from iteralite.data.tokenizer import file_sha256

    path = tmp_path / "t.safetensors"
    save_checkpoint(path, model, kind="fp32", tokenizer_sha256=file_sha256(tok_dir / "tokenizer.json"))
    return read_checkpoint(path)


def test_check_tokenizer_accepts_the_matching_tokenizer(tok_ckpt, tok_dir):
    check_tokenizer(tok_ckpt, tok_dir / "tokenizer.json")
    check_tokenizer(tok_ckpt, str(tok_dir / "tokenizer.json"))


@pytest.mark.parametrize("recorded", ["", "abc", "g" * 64, "0" * 63])
def test_check_tokenizer_refuses_a_checkpoint_without_tokenizer_id(saved, tok_dir, recorded):
    ckpt = read_checkpoint(saved)
    ckpt.tokenizer_sha256 = recorded
    with pytest.raises(CheckpointError, match="records no tokenizer id") as e:
        check_tokenizer(ckpt, tok_dir / "tokenizer.json")
    assert str(saved) in _one_line(e) and str(tok_dir / "tokenizer.json") in str(e.value)


def test_check_tokenizer_refuses_another_tokenizer_file(tok_ckpt, tok_dir, tmp_path):
    other = tmp_path / "tok.json"
    other.write_text((tok_dir / "tokenizer.json").read_text() + " ")  # same tokenizer, other bytes
    with pytest.raises(CheckpointError, match="was trained with another tokenizer than .*sha256 differs") as e:
        check_tokenizer(tok_ckpt, other)
    assert str(tok_ckpt.path) in _one_line(e) and str(other) in str(e.value)


def test_check_tokenizer_refuses_a_vocab_size_mismatch(tok_dir, tmp_path):
    from iteralite.core.model import IteraLite
    from iteralite.data.tokenizer import file_sha256, load_tokenizer
    from tests.conftest import tiny_config

    n = load_tokenizer(tok_dir / "tokenizer.json").get_vocab_size()
    path = tmp_path / "v.safetensors"
    save_checkpoint(path, IteraLite(tiny_config(vocab_size=n + 7)), kind="fp32",
                    tokenizer_sha256=file_sha256(tok_dir / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=f"vocab_size is {n + 7} but tokenizer .* has {n} tokens") as e:
        check_tokenizer(read_checkpoint(path), tok_dir / "tokenizer.json")
    assert str(path) in _one_line(e)


def test_check_tokenizer_bad_tokenizer_paths_are_one_line(tok_ckpt, tmp_path):
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\xffnot json")
    not_tok = tmp_path / "other.json"
    not_tok.write_text('{"hello": 1}')
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    cases = {tmp_path / "missing.json": "no such tokenizer", tmp_path: "is a directory, not a tokenizer file",
             garbage: "not a tokenizer JSON file", not_tok: "not a tokenizer JSON file",
             fifo: r"is a FIFO \(named pipe\), not a tokenizer file"}
    for path, msg in cases.items():
        with pytest.raises(CheckpointError, match=msg) as e:
            check_tokenizer(tok_ckpt, path)
        assert str(path) in _one_line(e)


def test_check_tokenizer_is_exported_with_its_signature():
    import inspect

    assert str(inspect.signature(check_tokenizer)) == "(ckpt: 'Checkpoint', tokenizer_path) -> 'None'"

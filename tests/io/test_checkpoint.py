import json
import pickle
import struct

import pytest
import torch

from iteralite.io.checkpoint import load_model, read_checkpoint, save_checkpoint
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


def _rewrite_meta(path, **changes):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["__metadata__"].update(changes)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_wrong_version_is_a_clear_error(saved):
    _rewrite_meta(saved, version="99")
    with pytest.raises(CheckpointError, match="version '99'.*reads version 1"):
        read_checkpoint(saved)


def test_wrong_format_is_a_clear_error(saved):
    _rewrite_meta(saved, format="somebody-else")
    with pytest.raises(CheckpointError, match="not an iteralite checkpoint"):
        read_checkpoint(saved)


def test_flipped_byte_is_detected(saved):
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(saved)


def test_shapes_disagreeing_with_config_are_a_clear_error(saved, cfg):
    _rewrite_meta(saved, config=json.dumps({**cfg.to_dict(), "d_ff": cfg.d_ff * 2}))
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

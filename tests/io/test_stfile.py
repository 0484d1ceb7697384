import hashlib

import pytest
import torch
from safetensors import safe_open

from iteralite.io.stfile import canonical_bytes, from_le_bytes, le_bytes, save_tensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(3, 5, generator=g), "a.codes": torch.randint(0, 255, (7,), dtype=torch.uint8, generator=g),
            "c.scale": torch.randn(2, generator=g).half(), "empty": torch.zeros(0)}


def test_saves_are_byte_identical_whatever_the_library_hash_order():
    meta = {f"key{i}": f"value {i}" for i in range(12)}  # enough keys that a random order shows
    digests = {hashlib.sha256(canonical_bytes(_tensors(), meta)).hexdigest() for _ in range(20)}
    assert len(digests) == 1


def test_canonical_file_reads_back_the_same_tensors_and_metadata(tmp_path):
    meta = {"z": "1", "a": "ü"}
    save_tensors(tmp_path / "x.safetensors", _tensors(), meta)
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == meta
        for name, t in _tensors().items():
            assert torch.equal(f.get_tensor(name), t)


@pytest.mark.parametrize("t,stored", [
    (torch.tensor([1.0], dtype=torch.float32), b"\x00\x00\x80\x3f"),  # 0x3f800000
    (torch.tensor([1.0, -2.0], dtype=torch.float16), b"\x00\x3c\x00\xc0"),  # 0x3c00, 0xc000
    (torch.tensor([1.0], dtype=torch.bfloat16), b"\x80\x3f"),  # 0x3f80
    (torch.tensor([1.0], dtype=torch.float64), b"\0" * 6 + b"\xf0\x3f"),  # 0x3ff0000000000000
    (torch.tensor([[1, -2]], dtype=torch.int32), b"\x01\0\0\0\xfe\xff\xff\xff"),
    (torch.tensor([0x0102030405060708], dtype=torch.int64), bytes(range(8, 0, -1))),
    (torch.tensor([True, False]), b"\x01\x00"),
    (torch.tensor([5, 250], dtype=torch.uint8), b"\x05\xfa"),
    (torch.zeros(0, 3), b""),
])
def test_le_bytes_are_little_endian_and_read_back(t, stored):
    """Hand-computed little-endian bytes: both directions go through explicit '<' numpy dtypes,
    so a big-endian host writes and reads these very bytes."""
    assert le_bytes(t) == stored
    back = from_le_bytes(stored, t.dtype, t.shape)
    assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
    back.zero_()  # a writable tensor of its own, not a view of `stored`


def test_le_bytes_of_a_non_contiguous_tensor_are_row_major():
    t = torch.arange(6, dtype=torch.int16).reshape(2, 3).t()
    assert le_bytes(t) == b"".join(int(v).to_bytes(2, "little") for v in t.reshape(-1))


def test_le_bytes_refuse_complex_tensors():
    with pytest.raises(ValueError, match="no little-endian byte layout for a torch.complex64"):
        le_bytes(torch.zeros(2, dtype=torch.complex64))

import hashlib

import torch
from safetensors import safe_open

from iteralite.io.stfile import canonical_bytes, save_tensors


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

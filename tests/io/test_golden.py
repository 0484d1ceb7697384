"""Golden checkpoints (tests/golden, written by `python -m tests.golden.make_golden`): files of every
layout written by an earlier version of the code must keep loading to the same logits, and the
current writer must still write them byte for byte. A failure here means the format changed: if
on purpose, regenerate them and say so in the commit."""
from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors import safe_open

from iteralite.io import compact
from iteralite.io.checkpoint import load_model, save_checkpoint
from tests.golden import make_golden as golden

_NAMES = list(golden.LAYOUTS)


def _file(name: str):
    return golden.HERE / f"{name}.safetensors"


def _expected() -> dict[str, torch.Tensor]:
    with safe_open(str(golden.HERE / golden.LOGITS), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_manifest_lists_every_golden_file_with_its_sha256():
    lines = (golden.HERE / golden.MANIFEST).read_text().splitlines()
    listed = dict(reversed(line.split("  ", 1)) for line in lines)
    present = {p.name for p in golden.HERE.glob("*.safetensors")}
    assert set(listed) == present == {f"{n}.safetensors" for n in _NAMES} | {golden.LOGITS}
    changed = [n for n, digest in listed.items()
               if hashlib.sha256((golden.HERE / n).read_bytes()).hexdigest() != digest]
    assert not changed, f"golden files changed without a manifest update (make_golden.py): {changed}"


@pytest.mark.parametrize("name", _NAMES)
def test_golden_file_loads_to_its_expected_logits(name):
    expected = _expected()
    assert torch.equal(expected["tokens"], golden.TOKENS)
    model, ckpt = load_model(_file(name))
    assert ckpt.kind == "golden" and ckpt.meta == {"golden": name}
    want = expected[name]
    got = golden.logits(model)
    assert got.shape == want.shape == (1, golden.TOKENS.shape[1], golden.CONFIG["vocab_size"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", _NAMES)
def test_the_writer_reproduces_the_golden_bytes(tmp_path, name):
    """Load, then save the same fields the same way: any change to the header, the layout, a
    codec or the entropy coder shows as other bytes."""
    model, ckpt = load_model(_file(name))
    path = tmp_path / f"{name}.safetensors"
    save_checkpoint(path, model, kind=ckpt.kind, tokenizer_sha256=ckpt.tokenizer_sha256, meta=ckpt.meta,
                    quant=ckpt.quant or None, layout=golden.LAYOUTS[name])
    assert path.read_bytes() == _file(name).read_bytes()


def test_the_golden_files_cover_each_layout_and_codec():
    for name, layout in golden.LAYOUTS.items():
        with safe_open(str(_file(name)), framework="pt") as f:
            meta = f.metadata()
        assert meta.get("layout") == (compact.LAYOUT if layout == "compact" else None)
    assert golden.codecs_used(_file("mixed")) >= golden.CODECS["mixed"]
    chars = load_model(_file("mixed"))[1].quant["precisions"]
    assert set(chars) == {"t", "2", "3", "4", "8", "h"}  # every mixed precision
    assert set(load_model(_file("ternary"))[1].quant["precisions"]) == {"t"}

"""The context-modelled codecs in the compact layout (ids 4 rans-prev, 5 rans-rows): the writer
picks one exactly where it is the smallest, the file loads back bit-exactly, `codec_report`
measures each option, and a corrupt context blob is a one-line error naming its tensor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from iteralite.io import compact
from iteralite.io.checkpoint import load_model, read_checkpoint
from iteralite.io.errors import CheckpointError
from iteralite.quant import context
from iteralite.quant.coding import CodeView, code_tensors
from tests.io.test_compact import _entries, _index, _one_line, _resign, build, save

PREV, ROWS = "layers.0.mixer.in_proj.weight_codes", "embedding.weight_codes"


def test_codec_ids_are_appended():
    assert [c.name for c in compact.CODECS] == ["raw", "rans", "f16", "grid", "rans-prev", "rans-rows"]
    assert len(compact.CODECS) <= 1 << compact._CODEC_BITS


def planted():
    """The tiny int4 model with two code tensors given context structure: PREV cycles through the
    16 codes (each code follows from the one before), ROWS draws its first half from codes 0-3 and
    its second half from 12-15 (the distribution changes between blocks of rows)."""
    model, quant = build("int4")
    views = code_tensors(model)
    rng = np.random.default_rng(0)
    n = views[PREV].count
    cycle = torch.from_numpy(np.arange(n, dtype=np.uint8) % 16)
    n = views[ROWS].count
    blocks = torch.from_numpy(np.concatenate([rng.integers(0, 4, n // 2), rng.integers(12, 16, n - n // 2)])
                              .astype(np.uint8))
    state = model.state_dict()
    with torch.no_grad():
        for key, codes in ((PREV, cycle), (ROWS, blocks)):
            state[key].copy_(views[key].pack(codes).reshape(state[key].shape))
    return model, quant


def test_a_winning_context_codec_is_chosen_and_read_back_exactly(tmp_path):
    model, quant = planted()
    path = tmp_path / "c.safetensors"
    save(path, model, quant)
    entries, _, spans = _entries(path)
    by_key = {key: entries[i][0] for i, (key, _, _) in enumerate(spans)}
    assert compact.CODECS[by_key[PREV]].name == "rans-prev"
    assert compact.CODECS[by_key[ROWS]].name == "rans-rows"
    loaded, _ = load_model(path)
    want = model.state_dict()
    for key, t in loaded.state_dict().items():
        assert torch.equal(t, want[key]), key
    # each stored blob is the smallest candidate, and the context ones beat plain rans clearly
    views = code_tensors(model)
    for key in (PREV, ROWS):
        t = want[key]
        sizes = {c.name: len(d) for c in compact.CODECS if (d := c.encode(t, views[key])) is not None}
        chosen = compact.CODECS[by_key[key]].name
        assert sizes[chosen] == min(sizes.values()) and sizes[chosen] < 0.8 * sizes["rans"]


def test_resave_of_a_context_coded_file_is_byte_identical(tmp_path):
    model, quant = planted()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save(a, model, quant)
    save(b, load_model(a)[0], quant)
    assert a.read_bytes() == b.read_bytes()


def test_codec_report_measures_each_option(tmp_path):
    model, quant = planted()
    path = tmp_path / "c.safetensors"
    save(path, model, quant)
    ckpt = read_checkpoint(path)
    empty = load_model(path)[0]
    r = compact.codec_report(ckpt.tensors, empty)
    blob = compact.write(ckpt.tensors, empty)[0][compact.BLOB]
    assert r["chosen"] == blob.numel()
    assert r["rans"] > r["rans-prev"] and r["rans"] > r["rans-rows"]
    assert r["chosen"] < min(r["rans-prev"], r["rans-rows"])  # each option wins on its own tensor
    assert r["saved"] == {"rans-prev": r["rans"] - r["rans-prev"], "rans-rows": r["rans"] - r["rans-rows"],
                          "chosen": r["rans"] - r["chosen"]}
    assert r["tensors_by_codec"]["rans-prev"] >= 1 and r["tensors_by_codec"]["rans-rows"] >= 1
    assert sum(r["tensors_by_codec"].values()) == len(ckpt.tensors)


def test_codec_report_sizes_are_ordered():
    """On an ordinary model: adding options never grows the blob, and "chosen" is what is written."""
    model, _ = build("int4")
    r = compact.codec_report(model.state_dict(), model)
    assert r["chosen"] <= min(r["rans-prev"], r["rans-rows"]) <= max(r["rans-prev"], r["rans-rows"]) <= r["rans"]
    assert r["chosen"] == compact.write(model.state_dict(), model)[0][compact.BLOB].numel()


def test_codec_report_refuses_a_foreign_tensor_list():
    model, quant = build("int4")
    state = dict(model.state_dict())
    state.pop(PREV)
    with pytest.raises(ValueError, match="tensors differ"):
        compact.codec_report(state, model)


@pytest.mark.parametrize("key", [PREV, ROWS])
def test_a_truncated_context_blob_names_its_tensor(tmp_path, key):
    model, quant = planted()
    path = tmp_path / "c.safetensors"
    save(path, model, quant)
    entries, blob, spans = _entries(path)
    i = next(j for j, (k, _, _) in enumerate(spans) if k == key)
    _, off, n = spans[i]
    entries[i] = (entries[i][0], n - 1)
    _resign(path, blob=blob[:off + n - 1] + blob[off + n:], index=_index(entries))
    with pytest.raises(CheckpointError, match=rf"'{key}' rans-(prev|rows) ") as e:
        load_model(path)
    _one_line(e, path)


def test_context_codecs_refuse_a_non_code_tensor():
    like = torch.zeros(4)
    for cid in (4, 5):
        codec = compact.CODECS[cid]
        assert codec.encode(like, None) is None
        with pytest.raises(CheckpointError, match="not an integer code tensor"):
            codec.decode(b"\0", like, None)


def test_context_codecs_skip_irreproducible_packing():
    """Nonzero pad bits: the codes do not give back the packed bytes, so only raw is lossless."""
    view = CodeView("w", 3, 3001, "bits")  # 9003 bits in 1126 bytes: 5 pad bits
    cycle = torch.arange(3001, dtype=torch.uint8) % 8  # each code follows from the previous
    blocks = (torch.arange(3001) >= 1500).to(torch.uint8) * 7  # 0s, then 7s
    for cid, codes in ((4, cycle), (5, blocks)):
        packed = view.pack(codes)
        assert compact.CODECS[cid].encode(packed, view) is not None
        bad = packed.clone()
        bad[-1] |= 0x80
        assert compact.CODECS[cid].encode(bad, view) is None


def test_context_decode_checks_the_packed_size():
    views = code_tensors(build("int4")[0])
    view = views[PREV]
    blob = context.encode_prev(np.zeros(view.count, np.uint8), 16)
    with pytest.raises(CheckpointError, match="decodes to"):
        compact.CODECS[4].decode(blob, torch.zeros(view.packed_bytes + 1, dtype=torch.uint8), view)

"""The compact checkpoint layout: the same model as the default layout, byte-identical resaves, a
small header, and every malformed file answered by a one-line CheckpointError."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from iteralite.core.model import IteraLite
from iteralite.io import compact, grid
from iteralite.io.checkpoint import (checkpoint_checksum, header_bytes, load_model, read_checkpoint,
                                     save_checkpoint)
from iteralite.io.errors import CheckpointError
from iteralite.io.stfile import save_tensors
from iteralite.pipeline.int4 import Int4Config, quantize_int4
from iteralite.quant.coding import code_tensors, coding_report, report_totals
from iteralite.quant.config import mixed_config, quant_config
from iteralite.quant.spec import QuantSpec
from iteralite.quant.swap import make_spec_for, quantize
from iteralite.quant.registry import PRECISIONS
from iteralite.quant.units import quantize_allocation, units
from tests.conftest import tiny_config
from tests.io.test_robustness import loads_as_or_fails_clearly, mutate, mutation, with_a_header_byte_changed

_IDX = torch.arange(24).reshape(2, 12) * 11 % 300  # a fixed input, (b, l) = (2, 12)
_META = {"step": 7, "parent": "models/fp32.safetensors"}


def build(kind: str, cfg=None, group_size: int = 8):
    """(model, quant config) of a tiny model: fp32, uniform int4 (rtn), nf4, or mixed precision
    cycling through 2/3/4/8-bit and fp16 units ("int2-4": alternating 2 and 4 bits). Weight
    matrices get heavy tails (each weight times exp(N(0, 1))), as trained weights have outliers:
    the codes then crowd the middle of the range, as they do in real artifacts."""
    torch.manual_seed(0)
    m = IteraLite(cfg or tiny_config()).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(torch.randn_like(p).exp())
    if kind == "fp32":
        return m, None
    if kind == "int4":
        q = quantize_int4(m, "rtn", Int4Config(group_size=group_size), {})
        return q, quant_config(q)
    if kind == "nf4":
        pytest.importorskip("bitsandbytes")
        q = quantize(copy.deepcopy(m), make_spec_for(QuantSpec(4, 64, method="nf4"), keep_float=("dt_proj", "x_proj")))
        return q, quant_config(q)
    cycle = (2, 4) if kind == "int2-4" else tuple(PRECISIONS)
    alloc = {u: cycle[i % len(cycle)] for i, u in enumerate(units(m))}
    return quantize_allocation(copy.deepcopy(m), alloc, group_size).eval(), mixed_config(alloc, group_size, m)


def save(path, model, quant, layout="compact", kind="test"):
    return save_checkpoint(path, model, kind=kind, tokenizer_sha256="ab" * 32, meta=_META, quant=quant, layout=layout)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_IDX)[0]


def _fields(ckpt) -> tuple:
    return ckpt.kind, ckpt.config, ckpt.quant, ckpt.meta, ckpt.tokenizer_sha256


def _stored(path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _resign(path, blob: bytes | None = None, **changes) -> None:
    """Rewrite a compact file with another blob and/or header fields, under a matching checksum:
    a consistent file that says something else, so the loader gets past the checksum."""
    meta, tensors = _stored(path)
    if blob is not None:
        tensors = {compact.BLOB: torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob
                   else torch.zeros(0, dtype=torch.uint8)}
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    meta["sha256"] = checkpoint_checksum(meta, tensors)
    save_tensors(path, tensors, meta)


def _one_line(exc_info, path) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


# --------------------------------------------------------------------------- same model


@pytest.mark.parametrize("kind", ["fp32", "int4", "mixed", "nf4"])
def test_compact_loads_exactly_the_default_layouts_model(tmp_path, kind):
    model, quant = build(kind)
    save(tmp_path / "d.safetensors", model, quant, "default")
    size = save(tmp_path / "c.safetensors", model, quant)
    a, ca = load_model(tmp_path / "d.safetensors")
    b, cb = load_model(tmp_path / "c.safetensors")
    assert _fields(ca) == _fields(cb)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(_logits(b), _logits(model)) and torch.equal(_logits(a), _logits(b))
    meta, tensors = _stored(tmp_path / "c.safetensors")
    assert meta["layout"] == compact.LAYOUT and list(tensors) == [compact.BLOB]
    assert size == header_bytes(tmp_path / "c.safetensors") + tensors[compact.BLOB].numel()
    assert list(read_checkpoint(tmp_path / "c.safetensors").tensors) == list(sa)  # transparent read


@pytest.mark.parametrize("kind", ["fp32", "mixed"])
def test_resaves_are_byte_identical(tmp_path, kind):
    model, quant = build(kind)
    save(tmp_path / "a.safetensors", model, quant)
    save(tmp_path / "b.safetensors", model, quant)
    loaded, _ = load_model(tmp_path / "a.safetensors")
    save(tmp_path / "c.safetensors", loaded, quant)  # saved, loaded, saved again
    raw = (tmp_path / "a.safetensors").read_bytes()
    assert raw == (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()


def test_default_layout_is_unchanged(tmp_path):
    model, quant = build("mixed")
    save_checkpoint(tmp_path / "a.safetensors", model, kind="test", tokenizer_sha256="ab" * 32, meta=_META, quant=quant)
    save(tmp_path / "b.safetensors", model, quant, "default")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    meta, tensors = _stored(tmp_path / "a.safetensors")
    assert "layout" not in meta and "index" not in meta and sorted(tensors) == sorted(model.state_dict())


def test_loading_draws_the_same_random_numbers_in_both_layouts(tmp_path):
    model, quant = build("mixed")
    draws = []
    for layout in ("default", "compact"):
        save(tmp_path / f"{layout}.safetensors", model, quant, layout)
        torch.manual_seed(1)
        load_model(tmp_path / f"{layout}.safetensors")
        draws.append(torch.rand(4))
    assert torch.equal(*draws)


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("kind", ["int4", "mixed"])
def test_compact_is_smaller_with_a_far_smaller_header(tmp_path, kind):
    model, quant = build(kind)
    d = save(tmp_path / "d.safetensors", model, quant, "default")
    c = save(tmp_path / "c.safetensors", model, quant)
    assert c < d
    assert header_bytes(tmp_path / "c.safetensors") < header_bytes(tmp_path / "d.safetensors") / 3


def test_header_is_under_2_percent_of_a_realistic_artifact(tmp_path):
    """A ~190 KB int2/int4 artifact (d_model 64, 2 layers, 4 experts, vocab 1000): near the ~140 KB
    target, and large enough that the header is what decides the bound. The default layout's
    per-tensor index alone puts its header over 5%; the compact header (config, the mixed quant
    config, sha256s, the index) stays under 1%."""
    cfg = tiny_config(vocab_size=1000, d_model=64, n_heads=8, headdim=16, n_experts=4, d_ff=256)
    model, quant = build("int2-4", cfg, group_size=16)
    d = save(tmp_path / "d.safetensors", model, quant, "default")
    c = save(tmp_path / "c.safetensors", model, quant)
    assert 100_000 < c < d
    assert header_bytes(tmp_path / "d.safetensors") > 0.04 * d
    assert header_bytes(tmp_path / "c.safetensors") <= 0.02 * c


def _stored_float_bytes(t: torch.Tensor) -> int:
    """A float tensor's bytes in the compact blob: fp16 bytes where every value is exactly fp16,
    fewer where its values lie on a grid (io.grid: 5 bytes + bits per value)."""
    exact = t.dtype == torch.float32 and torch.equal(t.half().float(), t)
    on_grid = grid.encode(t)
    return min(t.numel() * (2 if exact else t.element_size()), 10 ** 9 if on_grid is None else len(on_grid))


def test_file_is_header_plus_float_tensors_plus_reported_code_bytes(tmp_path):
    """The report's stored bytes are exactly what the compact file spends on codes."""
    model, quant = build("mixed")
    path = tmp_path / "c.safetensors"
    size = save(path, model, quant)
    views = code_tensors(model)
    floats = sum(_stored_float_bytes(t) for k, t in model.state_dict().items() if k not in views)
    totals = report_totals(coding_report(load_model(path)[0]))
    assert totals["coded"] >= 1
    assert size == header_bytes(path) + floats + totals["stored_bytes"]


# --------------------------------------------------------------------------- malformed files


@pytest.fixture
def saved(tmp_path):
    model, quant = build("mixed", group_size=32)  # groups of 32: four code tensors end up coded
    path = tmp_path / "c.safetensors"
    save(path, model, quant)
    return path


def _entries(path) -> tuple[list, bytes, list]:
    """(index entries, blob bytes, [(key, offset, length)] in blob order) of a compact file."""
    meta, tensors = _stored(path)
    entries = compact.decode_index(meta["index"])
    empty = load_model(path)[0].state_dict()
    spans, pos = [], 0
    for (cid, length), (key, t) in zip(entries, empty.items()):
        implied = compact.CODECS[cid].implied
        n = implied(t) if implied is not None else length
        spans.append((key, pos, n))
        pos += n
    return entries, tensors[compact.BLOB].numpy().tobytes(), spans


def _first_coded(entries) -> int:
    return next(i for i, (cid, _) in enumerate(entries) if cid == 1)


def _index(entries) -> str:
    return compact.encode_index(entries)


def test_index_with_a_missing_entry(saved):
    entries, _, _ = _entries(saved)
    _resign(saved, index=_index(entries[:-1]))
    msg = rf"index lists {len(entries) - 1} tensors; the stored config builds {len(entries)}"
    with pytest.raises(CheckpointError, match=msg) as e:
        load_model(saved)
    _one_line(e, saved)


def test_index_disagreeing_with_the_blob_length(saved):
    entries, blob, _ = _entries(saved)
    i = _first_coded(entries)
    entries[i] = (1, entries[i][1] + 1)
    _resign(saved, index=_index(entries))
    with pytest.raises(CheckpointError, match=rf"index covers {len(blob) + 1} bytes; the blob holds {len(blob)}"):
        load_model(saved)


def test_truncated_blob(saved):
    _, blob, _ = _entries(saved)
    _resign(saved, blob=blob[:-3])
    with pytest.raises(CheckpointError, match=rf"the blob holds {len(blob) - 3}") as e:
        load_model(saved)
    _one_line(e, saved)


def test_unknown_codec_id(saved):
    entries, _, spans = _entries(saved)
    entries[0] = (7, spans[0][2])
    _resign(saved, index=_index(entries))
    msg = rf"tensor '{spans[0][0]}' has codec id 7; this iteralite knows 0 \(raw\), 1 \(rans\)"
    with pytest.raises(CheckpointError, match=msg):
        load_model(saved)


def test_raw_entry_carrying_a_length(saved):
    entries, _, spans = _entries(saved)
    i = entries.index((0, 0))  # a raw tensor
    entries[i] = (0, spans[i][2])
    _resign(saved, index=_index(entries))
    with pytest.raises(CheckpointError, match="is stored raw but its entry carries a length"):
        load_model(saved)


def test_float_tensor_marked_as_coded(saved):
    entries, _, spans = _entries(saved)
    views = code_tensors(load_model(saved)[0])
    i = next(i for i, (key, _, _) in enumerate(spans) if key not in views)
    assert entries[i][0] == 0
    entries[i] = (1, spans[i][2])
    _resign(saved, index=_index(entries))
    msg = rf"'{spans[i][0]}' is stored entropy-coded but is not an integer code tensor"
    with pytest.raises(CheckpointError, match=msg):
        load_model(saved)


@pytest.mark.parametrize("where,match", [
    ("count", "entropy blob holds .* codes, expected"),
    ("payload_cut", "entropy blob's payload is .* bytes; its header says"),
    ("payload_flip", "entropy blob|decodes to"),
])
def test_corrupt_coded_stream(saved, where, match):
    entries, blob, spans = _entries(saved)
    i = _first_coded(entries)
    key, off, n = spans[i]
    stream = bytearray(blob[off:off + n])
    if where == "count":
        stream[3] ^= 0x01  # the first byte of the count varint
    elif where == "payload_cut":
        del stream[-4:]
        entries[i] = (1, n - 4)
    else:
        stream[-5] ^= 0x40  # inside the last payload words
    _resign(saved, blob=blob[:off] + bytes(stream) + blob[off + n:], index=_index(entries))
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(saved)
    assert f"'{key}'" in _one_line(e, saved)


def test_coded_stream_of_another_tensor(saved):
    """Two coded tensors' streams swapped (lengths swapped with them): each is a valid rANS blob,
    but of the wrong size or alphabet for its slot."""
    entries, blob, spans = _entries(saved)
    coded = [i for i, (cid, _) in enumerate(entries) if cid == 1]
    i, j = next((a, b) for a in coded for b in coded if a < b and spans[a][2] != spans[b][2])
    (_, oi, ni), (_, oj, nj) = spans[i], spans[j]
    new = blob[:oi] + blob[oj:oj + nj] + blob[oi + ni:oj] + blob[oi:oi + ni] + blob[oj + nj:]
    entries[i], entries[j] = entries[j], entries[i]
    _resign(saved, blob=new, index=_index(entries))
    with pytest.raises(CheckpointError, match="entropy blob holds"):
        load_model(saved)


@pytest.mark.parametrize("index,match", [
    ("not base64!", "index is not base64"),
    ("QQ", "index is not base64"),  # missing padding
    ("gA==", "index is truncated inside the entry"),
    ("gAA=", "over-long encoding of the entry"),
    ("", "index lists 0 tensors"),
    ("é", "index is not base64"),
])
def test_malformed_index_strings(saved, index, match):
    _resign(saved, index=index)
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(saved)
    _one_line(e, saved)


def test_missing_index_unknown_layout_and_extra_tensors(saved, tmp_path):
    _resign(saved, index=None)
    with pytest.raises(CheckpointError, match="compact layout has no index"):
        load_model(saved)
    path = tmp_path / "u.safetensors"
    model, quant = build("mixed")
    save(path, model, quant)
    for old in ("compact-v9", "compact-v1", "compact-v2"):  # v1: before the grid codec; v2: no identity
        _resign(path, layout=old)
        msg = f"tensor layout '{old}' is unknown; this iteralite reads the default layout and {compact.LAYOUT}"
        with pytest.raises(CheckpointError, match=msg) as e:
            load_model(path)
        _one_line(e, path)
    save(path, model, quant, "default")
    _resign(path, layout=compact.LAYOUT, index="")  # a default file that claims the compact layout
    with pytest.raises(CheckpointError, match="compact layout holds tensors .* expected only 'blob'"):
        load_model(path)


def _swap_registration(monkeypatch, cls, table: str, a: str, b: str) -> None:
    """Make `cls` register its `a` and `b` in each other's place (`table`: "_modules" or
    "_parameters"), as a code change reordering two same-shape tensors would."""
    init = cls.__init__

    def swapped(self, *args, **kw):
        init(self, *args, **kw)
        entries = getattr(self, table)
        keys = list(entries)
        i, j = keys.index(a), keys.index(b)
        keys[i], keys[j] = keys[j], keys[i]
        reordered = {k: entries[k] for k in keys}
        entries.clear()
        entries.update(reordered)

    monkeypatch.setattr(cls, "__init__", swapped)


@pytest.mark.parametrize("kind", ["fp32", "mixed"])
@pytest.mark.parametrize("where", ["norms", "ssm"])
def test_a_reordered_tensor_list_is_refused_before_decoding(tmp_path, monkeypatch, kind, where):
    """Same-shape tensors in another order (code that registers norm2 before norm1, or D before
    A_log): every index check passes, so only the stored identity stops each one loading into
    its neighbour's place."""
    from iteralite.core.model import Block
    from iteralite.core.ssm import SSM

    model, quant = build(kind)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.norm1.weight.fill_(1 + i)
            layer.norm2.weight.fill_(-1 - i)
    path = tmp_path / "c.safetensors"
    save(path, model, quant)
    before = list(read_checkpoint(path).tensors)
    if where == "norms":
        _swap_registration(monkeypatch, Block, "_modules", "norm1", "norm2")
        a, b = "layers.0.norm1.weight", "layers.0.norm2.weight"
    else:
        _swap_registration(monkeypatch, SSM, "_parameters", "A_log", "D")
        a, b = "layers.0.mixer.A_log", "layers.0.mixer.D"
    after = list(IteraLite(model.cfg).state_dict())
    assert before.index(a) < before.index(b) and after.index(a) > after.index(b)  # the patch took
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert _one_line(e, path).endswith("compact layout: the file's tensor list (names, dtypes, shapes in order) "
                                       "does not match this code's model; rebuild it with `dvc repro`")


def test_a_file_without_identity_is_refused(saved):
    _resign(saved, identity=None)
    with pytest.raises(CheckpointError, match="compact layout has no 'identity' field") as e:
        load_model(saved)
    _one_line(e, saved)


def test_identity_hashes_names_dtypes_shapes_in_order():
    a = {"x": torch.zeros(2, 3), "y": torch.zeros(2, 3)}
    line = b"x|float32|2,3\ny|float32|2,3\n"
    assert compact.identity(a) == hashlib.sha256(line).hexdigest()[:16]
    others = [{"y": a["y"], "x": a["x"]}, {"x": a["x"], "z": a["y"]}, {"x": a["x"], "y": a["y"].half()},
              {"x": a["x"], "y": a["y"].reshape(3, 2)}]
    assert len({compact.identity(o) for o in [a, *others]}) == 5


# --------------------------------------------------------------------------- byte order


@pytest.mark.parametrize("t,cid,stored", [
    (torch.tensor([1.0, -2.0]), 2, b"\x00\x3c\x00\xc0"),  # f16: fp16 1.0 = 0x3c00, -2.0 = 0xc000
    (torch.tensor([1.0, -2.5]), 0, b"\x00\x00\x80\x3f\x00\x00\x20\xc0"),  # raw float32 0x3f800000, 0xc0200000
    (torch.tensor([1.0, 0.5]).half(), 0, b"\x00\x3c\x00\x38"),  # raw float16
    (torch.tensor([[1, 258]], dtype=torch.int64), 0, b"\x01" + b"\0" * 7 + b"\x02\x01" + b"\0" * 6),
    (torch.tensor([7, 200], dtype=torch.uint8), 0, b"\x07\xc8"),
])
def test_codecs_store_little_endian_bytes(t, cid, stored):
    """Hand-computed little-endian bytes: the codecs convert through explicit '<' dtypes, so a
    big-endian host writes (and reads) these very bytes, not its own order."""
    codec = compact.CODECS[cid]
    assert codec.encode(t, None) == stored
    like = torch.zeros_like(t, dtype=torch.float32 if cid == 2 else t.dtype)
    assert torch.equal(codec.decode(stored, like, None), like.new_tensor(t.tolist()))


def test_quant_config_disagreeing_with_the_model_is_refused_at_save(tmp_path):
    model, quant = build("int4")
    with pytest.raises(ValueError, match="compact layout: the model's tensors differ"):
        save(tmp_path / "c.safetensors", model, None)
    with pytest.raises(ValueError, match="unknown checkpoint layout 'zip'; known: default, compact"):
        save(tmp_path / "c.safetensors", model, quant, "zip")
    assert not (tmp_path / "c.safetensors").exists()


# --------------------------------------------------------------------------- robustness

_ARTIFACTS: dict = {}


def artifacts(tmp_dir) -> dict:
    """kind -> (compact file bytes, header_bytes, header fields, logits), built once."""
    if not _ARTIFACTS:
        for kind in ("int4", "mixed"):
            model, quant = build(kind)
            path = tmp_dir / f"{kind}.safetensors"
            save(path, model, quant, kind=kind)
            loaded, ckpt = load_model(path)
            _ARTIFACTS[kind] = (path.read_bytes(), header_bytes(path), _fields(ckpt), _logits(loaded))
    return _ARTIFACTS


def _loads_as_original_or_fails_clearly(path, kind) -> bool:
    _, _, fields, logits = _ARTIFACTS[kind]
    return loads_as_or_fails_clearly(path, fields, logits, _fields, _logits)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["int4", "mixed"]), data=st.data())
def test_any_header_byte_change_is_an_error_or_changes_nothing(tmp_path, kind, data):
    raw, n_header, _, _ = artifacts(tmp_path)[kind]
    path = tmp_path / "h.safetensors"
    path.write_bytes(with_a_header_byte_changed(raw, n_header, data))
    _loads_as_original_or_fails_clearly(path, kind)


def test_every_header_byte_changed_is_an_error_or_changes_nothing(tmp_path):
    raw, n_header, _, _ = artifacts(tmp_path)["mixed"]
    rng = random.Random(0)
    path = tmp_path / "h.safetensors"
    for pos in range(n_header):
        path.write_bytes(raw[:pos] + bytes([raw[pos] ^ rng.randrange(1, 256)]) + raw[pos + 1:])
        _loads_as_original_or_fails_clearly(path, "mixed")
    (n,) = struct.unpack("<Q", raw[:8])
    assert json.loads(raw[8:8 + n])["__metadata__"]["layout"] == compact.LAYOUT


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["int4", "mixed"]), muts=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_compact_files_fail_only_with_checkpoint_error(tmp_path, kind, muts):
    path = tmp_path / "m.safetensors"
    path.write_bytes(mutate(artifacts(tmp_path)[kind][0], muts))
    _loads_as_original_or_fails_clearly(path, kind)


def test_float_tensors_exactly_in_fp16_are_stored_in_two_bytes_and_load_exactly(tmp_path):
    """The f16 codec: a float32 tensor whose every value is an fp16 value is stored as fp16
    (half the bytes) and loads bit for bit; one value off the fp16 grid keeps it raw."""
    from iteralite.pipeline.mixed import round_leftovers_

    model, quant = build("mixed")
    plain = save(tmp_path / "p.safetensors", model, quant)
    rounded = round_leftovers_(copy.deepcopy(model))
    half = save(tmp_path / "h.safetensors", rounded, quant)
    off_grid = sum(t.numel() for t in model.state_dict().values()
                   if t.dtype == torch.float32 and not torch.equal(t.half().float(), t))
    assert off_grid > 0 and plain - half == 2 * off_grid
    loaded, _ = load_model(tmp_path / "h.safetensors")
    a, b = rounded.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = _stored_float_bytes(rounded.norm_f.weight.detach())
    with torch.no_grad():
        rounded.norm_f.weight[0] += 1e-4  # off the fp16 grid: that one tensor goes raw again
    assert save(tmp_path / "o.safetensors", rounded, quant) == half - before + 4 * rounded.norm_f.weight.numel()


def test_f16_entry_for_a_tensor_that_is_not_float32_is_refused():
    like = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="stored as f16 but the model holds a torch.uint8"):
        compact.CODECS[2].decode(b"\0" * 6, like, None)


def test_tensors_on_a_grid_are_stored_at_its_bit_width_and_load_exactly(tmp_path):
    """The grid codec: scales snapped to a 6-bit log grid and leftovers to an 8-bit linear grid
    take 6 and 8 bits a value (+5 bytes a tensor) and load bit for bit."""
    from iteralite.pipeline.mixed import round_leftovers_

    model, quant = build("mixed")
    plain = save(tmp_path / "p.safetensors", round_leftovers_(copy.deepcopy(model)), quant)
    snapped = round_leftovers_(copy.deepcopy(model), 8)
    with torch.no_grad():
        for k, t in snapped.state_dict().items():
            if k.endswith("scales"):
                t.copy_(grid.snap_log_up(t, 6))
    size = save(tmp_path / "g.safetensors", snapped, quant)
    state = snapped.state_dict()
    floats = {k: t for k, t in state.items() if t.dtype in (torch.float16, torch.float32)}
    bound = sum(5 + math.ceil(t.numel() * (6 if k.endswith("scales") else 8) / 8) for k, t in floats.items())
    codes = sum(t.numel() for k, t in state.items() if k not in floats)  # packed bytes, or fewer coded
    assert size < plain and size - header_bytes(tmp_path / "g.safetensors") <= bound + codes
    entries = compact.decode_index(_stored(tmp_path / "g.safetensors")[0]["index"])
    big = [i for i, k in enumerate(state) if k.endswith("scales") and state[k].numel() >= 16]
    assert big and all(entries[i][0] == 3 for i in big)
    loaded, _ = load_model(tmp_path / "g.safetensors")
    assert all(torch.equal(state[k], t) for k, t in loaded.state_dict().items())

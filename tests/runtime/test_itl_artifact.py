"""The C artifact reader (iteralite/runtime/native/itl_artifact.c): for tiny mixed-precision
artifacts (dense and factorised embedding, every precision, every codec of the compact layout) it
fills exactly the model layout.py builds from the Python loader's model, and it refuses corrupt,
truncated, foreign and unsupported files with one line, where the Python loader refuses them too."""
from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import struct

import numpy as np
import pytest
import torch

from iteralite.core.model import IteraLite
from iteralite.io import compact
from iteralite.io.checkpoint import checkpoint_checksum, load_model, read_checkpoint, save_checkpoint
from iteralite.io.errors import CheckpointError
from iteralite.io.stfile import save_tensors
from iteralite.pipeline.mixed import round_leftovers_
from iteralite.quant import context
from iteralite.quant.config import mixed_config
from iteralite.quant.units import quantize_allocation, units
from iteralite.runtime.native import layout
from iteralite.runtime.native.runtime import load_library
from tests.conftest import tiny_config

RANK = 8
CYCLE = [4, 3, 2, 8, 1, 16]  # every precision: int4, int3, int2, int8, ternary, fp16
# codec preferences: the writer takes the first that applies to a tensor (raw always does)
VARIANTS = {"prev-grid": ("rans-prev", "grid"), "rows-f16": ("rans-rows", "f16"), "rans-raw": ("rans",),
            "writer": None}
E_TRUNCATED, E_FORMAT, E_VERSION, E_CHECKSUM, E_CORRUPT, E_UNSUPPORTED = -5, -3, -4, -6, -7, -8


@contextlib.contextmanager
def forced_codecs(prefer):
    """The compact writer stores each tensor with the first codec of `prefer` that applies, and
    tries the context codecs on every code tensor (their lower bounds are switched off)."""
    if prefer is None:
        yield
        return
    ids = {c.name: i for i, c in enumerate(compact.CODECS)}
    order = [ids[n] for n in prefer]
    saved = compact._pick, context.bound_prev, context.bound_rows

    def pick(cands, allowed):
        return next((c for c in order if c in cands and c in allowed), saved[0](cands, [0]))

    compact._pick, context.bound_prev, context.bound_rows = pick, lambda *a, **k: 0.0, lambda *a, **k: 0.0
    try:
        yield
    finally:
        compact._pick, context.bound_prev, context.bound_rows = saved


def tiny_artifact(path, *, rank: int = 0, prefer=None, seed: int = 0, group_size: int = 8, scale_bits: int = 3,
                  leftover_bits: int = 4, vocab: int = 300, boost: float = 1.0):
    """A random tiny mixed-precision artifact as the mixed stage writes it: units cycling through every
    precision, scales on a log grid, float leftovers on a linear grid; written in the compact layout."""
    torch.manual_seed(seed)
    cfg = tiny_config(vocab_size=vocab, **({"embed_rank": rank} if rank else {}))
    model = IteraLite(cfg).eval()
    with torch.no_grad():  # louder layer outputs: a random tied head otherwise repeats its input token
        for layer in model.layers:
            layer.mixer.out_proj.weight.mul_(boost)
            layer.moe.experts.w2.mul_(boost)
    alloc = {u: CYCLE[(i + seed) % len(CYCLE)] for i, u in enumerate(units(model))}
    q = round_leftovers_(quantize_allocation(copy.deepcopy(model), alloc, group_size, scale_bits), leftover_bits)
    with forced_codecs(prefer):
        save_checkpoint(path, q, kind="mixed-optimized", tokenizer_sha256="", quant=mixed_config(alloc, group_size, model),
                        layout="compact")
    return path


def codecs_of(path) -> set[str]:
    meta = header(path)["__metadata__"]
    return {compact.CODECS[c].name for c, _ in compact.decode_index(meta["index"])}


def header(path) -> dict:
    b = open(path, "rb").read()
    (n,) = struct.unpack("<Q", b[:8])
    return json.loads(b[8:8 + n])


# --------------------------------------------------------------------------- the C side


def lib():
    lib = load_library()
    p = ctypes.c_void_p
    lib.itl_artifact_load.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(p), ctypes.c_char_p,
                                      ctypes.c_size_t]
    lib.itl_artifact_load_file.argtypes = [ctypes.c_char_p, ctypes.POINTER(p), ctypes.c_char_p, ctypes.c_size_t]
    lib.itl_artifact_model.argtypes, lib.itl_artifact_model.restype = [p], p
    lib.itl_artifact_free.argtypes, lib.itl_artifact_free.restype = [p], None
    lib.itl_artifact_resident_bytes.argtypes, lib.itl_artifact_resident_bytes.restype = [p], ctypes.c_int64
    return lib


class CArtifact:
    """An artifact loaded by the C reader (load_file): rc, err, and the itl_model as layout.Model."""

    def __init__(self, path=None, data: bytes | None = None):
        self.lib, self.h = lib(), ctypes.c_void_p()
        err = ctypes.create_string_buffer(2048)
        if data is not None:
            self.rc = self.lib.itl_artifact_load(data, len(data), ctypes.byref(self.h), err, len(err))
        else:
            self.rc = self.lib.itl_artifact_load_file(str(path).encode(), ctypes.byref(self.h), err, len(err))
        self.err = err.value.decode()
        self.model = layout.Model.from_address(self.lib.itl_artifact_model(self.h)) if self.rc == 0 else None

    def resident_bytes(self) -> int:
        return self.lib.itl_artifact_resident_bytes(self.h)

    def __del__(self):
        if getattr(self, "h", None):
            self.lib.itl_artifact_free(self.h)


def _arr(ptr, n, ctype):
    assert ptr, "null array"
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctype)), (n,)).copy()


def _mat_diffs(cm, pm: layout.NativeMat, name: str) -> list[str]:
    head = (cm.kind, cm.bits, cm.out, cm.in_, cm.group)
    if head != (pm.kind, pm.bits, pm.out, pm.in_, pm.group):
        return [f"{name}: {head} != {(pm.kind, pm.bits, pm.out, pm.in_, pm.group)}"]
    if pm.kind == layout.F16:
        ok = cm.rowbytes == 0 and np.array_equal(_arr(cm.w16, pm.out * pm.in_, ctypes.c_uint16), pm.w16.reshape(-1))
        return [] if ok else [f"{name}.w16"]
    if cm.rowbytes != pm.codes.shape[1]:
        return [f"{name}.rowbytes"]
    g = pm.in_ // pm.group
    out = []
    for field, n, ctype, want in (("codes", pm.codes.size, ctypes.c_uint8, pm.codes),
                                  ("scales", g * pm.out, ctypes.c_uint16, pm.scales),
                                  ("zeros", g * pm.out, ctypes.c_uint8, pm.zeros)):
        if not np.array_equal(_arr(getattr(cm, field), n, ctype), want.reshape(-1)):
            out.append(f"{name}.{field}")
    return out


def model_diffs(c: CArtifact, w: layout.NativeWeights) -> tuple[list[str], int]:
    """Every field and array where the C-filled model differs from layout.py's (A compared apart:
    returns the largest A difference in float32 ulps)."""
    m, ref = c.model, w.struct()
    diffs = [f for f in ("vocab", "d", "n_layers", "max_in", "eps_f", "rank") if getattr(m, f) != getattr(ref, f)]
    if not np.array_equal(_arr(m.norm_f, w.d, ctypes.c_float), w.norm_f):
        diffs.append("norm_f")
    diffs += _mat_diffs(m.emb, w.emb, "emb")
    if w.rank:
        diffs += _mat_diffs(m.embed_in, w.embed_in, "embed_in") + _mat_diffs(m.head_proj, w.head_proj, "head_proj")
    a_ulps = 0
    cl = (layout.Layer * len(w.layers)).from_address(m.layers)
    rl = (layout.Layer * len(w.layers)).from_address(ref.layers)
    for i, (L, R, pl) in enumerate(zip(cl, rl, w.layers)):
        ints = ("d_inner", "d_conv", "h", "p", "n", "r", "e", "k", "f", "eps1", "eps2")
        diffs += [f"layers.{i}.{f}" for f in ints if getattr(L, f) != getattr(R, f)]
        for k, v in pl.vecs.items():
            got = _arr(getattr(L, k), v.size, ctypes.c_float)
            if k == "A":
                a_ulps = max(a_ulps, int(np.abs(got.view(np.int32).astype(np.int64) - v.reshape(-1).view(np.int32)).max()))
            elif not np.array_equal(got, v.reshape(-1)):
                diffs.append(f"layers.{i}.{k}")
        for k, pm in pl.mats.items():
            diffs += _mat_diffs(getattr(L, k), pm, f"layers.{i}.{k}")
        w1, w2 = (layout.Mat * L.e).from_address(L.w1), (layout.Mat * L.e).from_address(L.w2)
        for e in range(L.e):
            diffs += _mat_diffs(w1[e], pl.w1[e], f"layers.{i}.w1[{e}]") + _mat_diffs(w2[e], pl.w2[e], f"layers.{i}.w2[{e}]")
    if c.resident_bytes() != w.resident_bytes:
        diffs.append(f"resident_bytes {c.resident_bytes()} != {w.resident_bytes}")
    return diffs, a_ulps


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("itl_artifacts")
    out = {}
    # the seed also shifts the precision cycle: the embeddings take int4, ternary, fp16, int3 (dense)
    # and int2, int8, ternary, fp16 (factorised)
    for kind, rank, seeds in (("dense", 0, (0, 4, 5, 1)), ("factorised", RANK, (2, 3, 4, 5))):
        for (name, prefer), seed in zip(VARIANTS.items(), seeds):
            out[kind, name] = tiny_artifact(root / f"{kind}-{name}.safetensors", rank=rank, prefer=prefer, seed=seed)
    return out


def test_the_reader_is_in_the_native_library():
    assert hasattr(load_library(), "itl_artifact_load_file"), "rebuild: python setup.py build_ext --inplace"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["dense", "factorised"])
def test_the_c_reader_fills_the_model_layout_py_builds(artifacts, kind, variant):
    path = artifacts[kind, variant]
    c = CArtifact(path)
    assert c.rc == 0, c.err
    w = layout.native_weights(load_model(path)[0])
    assert w.rank == (RANK if kind == "factorised" else 0)
    diffs, a_ulps = model_diffs(c, w)
    assert diffs == []
    # A = -exp(A_log): both round exp once, from double to float (layout.py and the C reader)
    assert a_ulps == 0


def test_every_codec_and_precision_is_covered(artifacts):
    for kind in ("dense", "factorised"):
        used = set().union(*(codecs_of(artifacts[kind, v]) for v in VARIANTS))
        assert used == {c.name for c in compact.CODECS}, (kind, used)
    assert set("t2348h") <= set(read_checkpoint(artifacts["dense", "writer"]).quant["precisions"])


def test_loading_from_memory_equals_loading_the_file(artifacts):
    path = artifacts["factorised", "writer"]
    a, b = CArtifact(path), CArtifact(data=open(path, "rb").read())
    assert a.rc == b.rc == 0
    w = layout.native_weights(load_model(path)[0])
    assert model_diffs(b, w)[0] == [] and a.resident_bytes() == b.resident_bytes()


# --------------------------------------------------------------------------- refusals


def refused(path, code: int, match: str, python_too: bool = True) -> str:
    c = CArtifact(path)
    assert c.rc == code, (c.rc, c.err)
    assert match in c.err and c.err.startswith(str(path)) and "\n" not in c.err, c.err
    if python_too:
        with pytest.raises(CheckpointError):
            read_checkpoint(path)
    return c.err


def resign(src, dst, meta_edit=None, blob_edit=None):
    """A copy of artifact src with its header metadata and/or blob changed and the checksum recomputed
    (so only the reader's later checks can catch it)."""
    h = header(src)
    b = open(src, "rb").read()
    (n,) = struct.unpack("<Q", b[:8])
    blob = bytearray(b[8 + n:])
    meta = dict(h["__metadata__"])
    if meta_edit:
        meta_edit(meta)
    if blob_edit:
        blob_edit(blob)
    tensors = {"blob": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}
    meta["sha256"] = checkpoint_checksum(meta, tensors)
    save_tensors(dst, tensors, meta)
    return dst


def test_truncated_and_empty_files_are_refused(artifacts, tmp_path):
    data = open(artifacts["dense", "writer"], "rb").read()
    for cut, code, match in ((len(data) - 1, E_TRUNCATED, "truncated or padded"), (5, E_TRUNCATED, "truncated"),
                             (0, E_TRUNCATED, "empty or truncated"), (200, E_FORMAT, "not a safetensors file")):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        refused(p, code, match)
    p = tmp_path / "padded.safetensors"
    p.write_bytes(data + b"\0")
    refused(p, E_TRUNCATED, "truncated or padded")


def test_a_changed_byte_is_a_checksum_mismatch(artifacts, tmp_path):
    data = bytearray(open(artifacts["dense", "writer"], "rb").read())
    for at in (len(data) - 7, len(data) // 2):
        d = bytearray(data)
        d[at] ^= 0x10
        p = tmp_path / f"flip{at}.safetensors"
        p.write_bytes(bytes(d))
        refused(p, E_CHECKSUM, "checksum mismatch")


def test_foreign_files_are_refused(tmp_path):
    p = tmp_path / "text.safetensors"
    p.write_bytes(b"hello, this is not a model at all\n" * 10)
    refused(p, E_FORMAT, "not a safetensors file")
    p = tmp_path / "plain.safetensors"
    save_tensors(p, {"x": torch.zeros(3)})
    refused(p, E_FORMAT, "format is None, expected 'iteralite'")
    p = tmp_path / "other.safetensors"
    save_tensors(p, {"x": torch.zeros(3)}, {"format": "gguf"})
    refused(p, E_FORMAT, "format is 'gguf'")
    p = tmp_path / "v1.safetensors"
    save_tensors(p, {"x": torch.zeros(3)}, {"format": "iteralite", "version": "1"})
    refused(p, E_VERSION, "version '1'")
    p = tmp_path / "json.safetensors"
    p.write_bytes(struct.pack("<Q", 8) + b"{[1,2]} ")
    refused(p, E_FORMAT, "header is not valid JSON")
    d = tmp_path / "folder.safetensors"
    d.mkdir()
    c = CArtifact(d)
    assert c.rc == -2 and "is a directory" in c.err
    c = CArtifact(tmp_path / "missing.safetensors")
    assert c.rc == -2 and "cannot open" in c.err


def test_resigned_inconsistencies_are_refused_like_the_python_loader(artifacts, tmp_path):
    src = artifacts["dense", "prev-grid"]
    meta = header(src)["__metadata__"]
    entries = compact.decode_index(meta["index"])

    def codec(cid):
        def edit(m):
            e = list(entries)
            e[0] = (cid, e[0][1])
            m["index"] = compact.encode_index(e)
        return edit

    refused(resign(src, tmp_path / "c7.safetensors", codec(7)), E_UNSUPPORTED, "has codec id 7")
    refused(resign(src, tmp_path / "id.safetensors", lambda m: m.update(identity="0" * 16)), E_CORRUPT,
            "tensor list (names, dtypes, shapes in order) does not match")
    refused(resign(src, tmp_path / "noid.safetensors", lambda m: m.pop("identity")), E_CORRUPT, "no 'identity' field")
    refused(resign(src, tmp_path / "b64.safetensors", lambda m: m.update(index=m["index"][:-1] + "!")), E_CORRUPT,
            "not base64")
    refused(resign(src, tmp_path / "count.safetensors",
                   lambda m: m.update(index=compact.encode_index(entries[:-1]))), E_CORRUPT, "compact index lists")
    refused(resign(src, tmp_path / "len.safetensors",
                   lambda m: m.update(index=compact.encode_index([(c, l + 1 if c not in (0, 2) else l)
                                                                  for c, l in entries]))), E_CORRUPT, "compact index covers")
    refused(resign(src, tmp_path / "prec.safetensors",
                   lambda m: m.update(quant=m["quant"].replace('"precisions":"', '"precisions":"x'))), E_CORRUPT,
            "'precisions' must be a string of")
    refused(resign(src, tmp_path / "cfg.safetensors",
                   lambda m: m.update(config=m["config"].replace('"d_model":32', '"d_model":99999999'))), E_CORRUPT,
            "config d_model")
    # a payload byte of the first code tensor (rans-prev) changed: the entropy decoder's checks catch it
    first = entries[0][1]
    assert compact.CODECS[entries[0][0]].name == "rans-prev"

    def flip(blob):
        blob[first - 3] ^= 0x5A
    err = refused(resign(src, tmp_path / "payload.safetensors", blob_edit=flip), E_CORRUPT, "'embedding.weight_codes'")
    assert "rans-prev" in err


def test_valid_artifacts_the_standalone_runtime_does_not_run_are_refused(artifacts, tmp_path):
    q, ckpt = load_model(artifacts["dense", "writer"])
    p = tmp_path / "default.safetensors"
    save_checkpoint(p, q, kind="mixed", tokenizer_sha256="", quant=ckpt.quant)  # the default layout
    refused(p, E_UNSUPPORTED, "reads compact artifacts", python_too=False)
    torch.manual_seed(0)
    p = tmp_path / "float.safetensors"
    save_checkpoint(p, IteraLite(tiny_config()).eval(), kind="float", tokenizer_sha256="")
    refused(p, E_UNSUPPORTED, "float model", python_too=False)

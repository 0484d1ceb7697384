"""Crafted checkpoints whose checksum is recomputed (so it matches) but whose header asks for far
more than the file holds: each is one CheckpointError line, fast, without building the model; and
a file holding NaN/inf weights is refused by the loader, naming the tensor."""
import copy
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from iteralite.core.model import IteraLite
from iteralite.io.checkpoint import (CONFIG_LIMITS, checkpoint_checksum, float_weights, load_model,
                                     read_checkpoint, save_checkpoint)
from iteralite.io.errors import CheckpointError
from iteralite.io.stfile import save_tensors
from tests.conftest import REPO, tiny_config


def _craft(src, dst, **fields):
    """`src` with header fields replaced (dicts are JSON-encoded) and the checksum recomputed as
    `save_checkpoint` computes it: a consistent file that says something else."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
    tensors = load_file(str(src))
    meta["sha256"] = checkpoint_checksum(meta, tensors)
    save_tensors(dst, tensors, meta)
    return dst


@pytest.fixture
def saved(tmp_path, model):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, kind="fp32", tokenizer_sha256="")
    return path


@pytest.fixture
def quantized(tmp_path, model):
    """A mixed-precision (quantized) checkpoint in the default layout: its size check is a bound."""
    from iteralite.quant.config import mixed_config
    from iteralite.quant.units import quantize_allocation, units

    alloc = {u: 4 for u in units(model)}
    quant = mixed_config(alloc, 8, model)
    path = tmp_path / "q.safetensors"
    save_checkpoint(path, quantize_allocation(copy.deepcopy(model), dict(alloc), 8), kind="mixed",
                    tokenizer_sha256="", quant=quant)
    return path


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def test_float_weights_counts_the_model_without_building_it():
    for cfg in (tiny_config(), tiny_config(n_layers=3, layer_n_heads=[1, 2, 3], layer_n_experts=[2, 3, 2],
                                           layer_d_ff=[4, 8, 16], dt_rank=3, d_conv=2)):
        assert float_weights(cfg) == IteraLite(cfg).num_params()


# Dimensions within CONFIG_LIMITS: only the size check stands between them and gigabytes.
HUGE_IN_LIMITS = {"vocab_size": 1 << 20, "d_model": 1 << 12}  # 4.3 G weights: 17 GB of float32


def _cases(saved, quantized, tmp_path, cfg):
    c = cfg.to_dict()
    return {
        "in-limits float": (_craft(saved, tmp_path / "a.safetensors", config={**c, **HUGE_IN_LIMITS}),
                            "tensors disagree with the stored config: it describes a model of"),
        "in-limits quantized": (_craft(quantized, tmp_path / "b.safetensors", config={**c, **HUGE_IN_LIMITS}),
                                "tensors disagree with the stored config: it describes a model of"),
        "d_ff 1e12": (_craft(saved, tmp_path / "c.safetensors", config={**c, "d_ff": 10 ** 12}),
                      "config d_ff = 1,000,000,000,000 is beyond any iteralite model (at most 1,048,576)"),
        # ModelConfig.validate loops over the layers: this one would never return
        "n_layers 1e40": (_craft(saved, tmp_path / "d.safetensors", config={**c, "n_layers": 10 ** 40}),
                          "config n_layers = a number of 30+ digits is beyond any iteralite model"),
        "layer list": (_craft(saved, tmp_path / "e.safetensors", config={**c, "layer_d_ff": [16] * 10 ** 5}),
                       "config layer_d_ff has 100,000 entries, more than the 512 layers"),
        "giant int": (_craft(saved, tmp_path / "f.safetensors", config='{"vocab_size": ' + "9" * 5000 + "}"),
                      "config in header is not valid JSON (Exceeds the limit"),
        "deep nesting": (_craft(saved, tmp_path / "g.safetensors", meta="[" * 100_000 + "]" * 100_000),
                         "meta in header is nested too deeply"),
    }


def test_crafted_sizes_are_one_line_fast_and_allocate_nothing(saved, quantized, tmp_path, cfg):
    """In a fresh process (its peak RSS is its own): every crafted file is refused within a couple
    of seconds of CPU time, and the process's peak memory grows by less than 100 MB across all of them."""
    cases = _cases(saved, quantized, tmp_path, cfg)
    script = (
        "import json, resource, sys, time\n"
        "from iteralite.io.checkpoint import load_model\n"
        "from iteralite.io.errors import CheckpointError\n"
        "out = {}\n"
        "for name, path in json.loads(sys.argv[1]).items():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    t = time.process_time()\n"
        "    try:\n"
        "        load_model(path); msg = 'loaded'\n"
        "    except CheckpointError as e:\n"
        "        msg = str(e)\n"
        "    out[name] = [msg, time.process_time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before]\n"
        "print(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", script, json.dumps({k: str(p) for k, (p, _) in cases.items()})],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads(r.stdout)
    for name, (path, want) in cases.items():
        msg, seconds, rss_kb = results[name]
        assert msg.startswith(str(path)) and want in msg and "\n" not in msg, (name, msg)
        assert seconds < 3 and rss_kb < 100_000, (name, seconds, rss_kb)


def test_limits_are_checked_before_validate(saved, tmp_path, cfg):
    for key, limit in CONFIG_LIMITS.items():
        path = _craft(saved, tmp_path / f"{key}.safetensors", config={**cfg.to_dict(), key: limit + 1})
        with pytest.raises(CheckpointError, match=f"config {key} = {limit + 1:,} is beyond any iteralite model") as e:
            read_checkpoint(path)
        _one_line(e)


def test_header_with_a_giant_integer_or_deep_nesting_is_one_line(saved, tmp_path):
    raw = saved.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    body = raw[8 + n:]
    for name, header in (("int", b'{"x": {"data_offsets": [0, ' + b"7" * 5000 + b"]}}"),
                         ("deep", b'{"x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")):
        header += b" " * (-len(header) % 8)
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header + body)
        with pytest.raises(CheckpointError, match="header is (not valid JSON|nested too deeply)") as e:
            read_checkpoint(path)
        assert str(path) in _one_line(e)


def test_header_over_the_cap_is_refused_before_parsing(saved, tmp_path):
    path = tmp_path / "big.safetensors"
    n = 17 * 1024 * 1024
    path.write_bytes(struct.pack("<Q", n) + b" " * n)
    with pytest.raises(CheckpointError, match="header claims") as e:
        read_checkpoint(path)
    _one_line(e)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, model, value):
    with torch.no_grad():
        model.layers[1].moe.experts.w2[0, 3, 2] = value
    path = tmp_path / "nan.safetensors"
    save_checkpoint(path, model, kind="fp32", tokenizer_sha256="")
    with pytest.raises(CheckpointError, match=r"tensor 'layers.1.moe.experts.w2' holds 1 NaN/inf value: "
                                              r"the model is unusable") as e:
        load_model(path)
    assert str(path) in _one_line(e)


def test_non_finite_scale_of_a_quantized_model_is_refused(quantized, tmp_path):
    tensors = load_file(str(quantized))
    name = next(k for k, t in tensors.items() if t.is_floating_point() and t.numel() > 1 and "scale" in k)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    from safetensors import safe_open
    with safe_open(str(quantized), framework="pt") as f:
        meta = dict(f.metadata())
    meta["sha256"] = checkpoint_checksum(meta, tensors)
    save_tensors(quantized, tensors, meta)
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds 1 NaN/inf value"):
        load_model(quantized)

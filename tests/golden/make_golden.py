"""Rewrite the golden checkpoints in this folder, their expected logits and SHA256SUMS.

    python -m tests.golden.make_golden        (from the repository root)

Deterministic: the same code writes the same bytes (fixed seeds, one thread, canonical headers).
The files pin the checkpoint format: `tests/io/test_golden.py` loads each with the normal loader
and compares its logits on TOKENS, checks SHA256SUMS, and checks that the current writer resaves
each file to the same bytes. Run this script only when the format changes on purpose (a new layout
version, a new codec, a changed entropy coder: the rANS blobs in mixed and ternary change with
`quant/entropy.py`), and say so in the commit: a regeneration is a format change that old files
no longer read the same.

Artifacts (a tiny config, so each is a few KB):
    float    the float model, default layout
    int4     uniform int4 (rtn, groups of 8), default layout: packed codes
    mixed    mixed precision (ternary, 2/3/4/8-bit and fp16 units), scales on a 6-bit log grid,
             float leftovers on an 8-bit linear grid, compact layout: raw, rans (the ternary
             units' codes; integer codes this small stay raw: a table costs more than it saves)
             and grid codecs
    ternary  every unit ternary (2-bit symmetric codes), leftovers in fp16, default layout
"""
from __future__ import annotations

import copy
import hashlib
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parents[1]) not in sys.path:  # run as a file: make `iteralite` and `tests` importable
    sys.path.insert(0, str(HERE.parents[1]))

from iteralite.core.config import ModelConfig  # noqa: E402
from iteralite.core.model import IteraLite  # noqa: E402
from iteralite.io import compact  # noqa: E402
from iteralite.io.checkpoint import load_model, save_checkpoint  # noqa: E402
from iteralite.io.stfile import save_tensors  # noqa: E402

CONFIG = dict(vocab_size=64, d_model=16, n_layers=1, d_state=4, d_conv=4, headdim=8, n_heads=2,
              dt_rank=4, n_experts=2, top_k=1, d_ff=16, chunk_size=8)
TOKENS = (torch.arange(12) * 7 % CONFIG["vocab_size"]).reshape(1, 12)
LOGITS = "expected_logits.safetensors"  # one float32 (1, 12, vocab) tensor per artifact, + "tokens"
MANIFEST = "SHA256SUMS"  # `sha256sum -c` format
TOKENIZER_SHA256 = "0" * 64
LAYOUTS = {"float": "default", "int4": "default", "mixed": "compact", "ternary": "default"}
CODECS = {"mixed": {"raw", "rans", "grid"}}  # codecs each compact file must use


def float_model() -> IteraLite:
    """The float model every artifact starts from; weight matrices with heavy tails (times
    exp(N(0, 1))), as trained weights have, so the codes crowd the middle and rANS pays."""
    torch.manual_seed(0)
    m = IteraLite(ModelConfig(**CONFIG)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(torch.randn_like(p).exp())
    return m


def build(name: str) -> tuple[torch.nn.Module, dict | None]:
    """(model, quant config) of one artifact."""
    from iteralite.pipeline.int4 import Int4Config, quantize_int4
    from iteralite.pipeline.mixed import round_leftovers_
    from iteralite.quant.config import mixed_config, quant_config
    from iteralite.quant.registry import TERNARY
    from iteralite.quant.units import quantize_allocation, units

    m = float_model()
    if name == "float":
        return m, None
    if name == "int4":
        q = quantize_int4(m, "rtn", Int4Config(group_size=8), {})
        return q.eval(), quant_config(q)
    if name == "mixed":
        cycle = (TERNARY, 2, 4, 3, 8, 16)
        alloc = {u: cycle[i % len(cycle)] for i, u in enumerate(units(m))}
        q = quantize_allocation(copy.deepcopy(m), alloc, 8, scale_bits=6)
        return round_leftovers_(q, 8).eval(), mixed_config(alloc, 8, m)
    if name == "ternary":
        alloc = {u: TERNARY for u in units(m)}
        q = quantize_allocation(copy.deepcopy(m), alloc, 8)
        return round_leftovers_(q).eval(), mixed_config(alloc, 8, m)
    raise ValueError(f"unknown golden artifact {name!r}; known: {', '.join(LAYOUTS)}")


def save(path, model, quant: dict | None, name: str) -> int:
    """How every golden file is saved (the test resaves loaded files the same way)."""
    return save_checkpoint(path, model, kind="golden", tokenizer_sha256=TOKENIZER_SHA256,
                           meta={"golden": name}, quant=quant, layout=LAYOUTS[name])


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(TOKENS)[0].float().contiguous()


def codecs_used(path) -> set[str]:
    """The codec names a compact file's index uses."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        index = f.metadata()["index"]
    return {compact.CODECS[cid].name for cid, _ in compact.decode_index(index)}


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(out: Path = HERE) -> None:
    torch.set_num_threads(1)
    expected = {"tokens": TOKENS.clone()}
    for name in LAYOUTS:
        model, quant = build(name)
        path = out / f"{name}.safetensors"
        save(path, model, quant, name)
        loaded, _ = load_model(path)
        want = logits(model)
        got = logits(loaded)
        if not torch.equal(got, want):
            raise SystemExit(f"make_golden: {name} loads to other logits than the model it saved")
        if name in CODECS and not CODECS[name] <= codecs_used(path):
            raise SystemExit(f"make_golden: {name} uses codecs {sorted(codecs_used(path))}, "
                             f"expected at least {sorted(CODECS[name])}")
        expected[name] = got
        print(f"{path.name}: {path.stat().st_size} bytes")
    save_tensors(out / LOGITS, expected, {"tokens": "TOKENS of tests/golden/make_golden.py"})
    names = [f"{n}.safetensors" for n in LAYOUTS] + [LOGITS]
    (out / MANIFEST).write_text("".join(f"{sha256(out / n)}  {n}\n" for n in names))


if __name__ == "__main__":
    main()

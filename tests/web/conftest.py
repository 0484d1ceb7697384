"""The WebAssembly build (`make wasm` -> web/itl.wasm), the Node runner, and tiny artifacts of both
embedding kinds (dense and factorised) with their binary tokenizer, saved as the pipeline saves them
(mixed precision, compact layout). The build is made here when emcc is installed (make does nothing
when it is up to date); the tests skip, saying why, only when emcc (with no current build) or node is
missing."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, tiny_config

WEB = REPO / "web"
NATIVE = REPO / "iteralite" / "runtime" / "native"
PROMPT = "Once upon a time"
# per kind: the model config's extra fields, the precision cycle of its units, the scale of its blocks'
# matrices and the seed (see save_tiny_artifact)
KINDS = {"dense": ({}, (2, 3, 4), 5.0, 1), "factorised": ({"embed_rank": 8}, (4, 8, 3, 16, 2), 5.0, 1)}


def _wasm_is_current() -> bool:
    wasm = WEB / "itl.wasm"
    if not wasm.is_file():
        return False
    newest = max(p.stat().st_mtime for p in [*NATIVE.glob("*.c"), *NATIVE.glob("*.h"), REPO / "Makefile"])
    return wasm.stat().st_mtime >= newest


@pytest.fixture(scope="session")
def node() -> str:
    """node, with a current web/itl.wasm beside web/itl-node.mjs."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (Debian's emscripten package brings it; .ci/run installs it)")
    if shutil.which(os.environ.get("EMCC", "emcc")):
        proc = subprocess.run(["make", "-s", "wasm"], cwd=REPO, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.fail(f"`make wasm` failed:\n{proc.stdout}\n{proc.stderr}")
    elif not _wasm_is_current():
        pytest.skip("emcc is not installed and web/itl.wasm is missing or older than the C sources: "
                    "install emscripten (Debian: apt-get install emscripten; .ci/run does) and run `make wasm`")
    return node


def run_node(node: str, *args, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([node, str(WEB / "itl-node.mjs"), *map(str, args)], capture_output=True, timeout=120,
                          env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"itl-node.mjs exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    return proc


def node_ids(node: str, artifact, tok_bin, *flags) -> list[int]:
    return [int(x) for x in run_node(node, artifact, tok_bin, *flags, "--ids").stdout.split()]


@pytest.fixture(scope="session")
def tok_bin(tok_dir, tmp_path_factory) -> Path:
    from iteralite.data.tokbin import write_tokbin
    from iteralite.data.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("webtok") / "tokenizer.bin"
    write_tokbin(load_tokenizer(tok_dir / "tokenizer.json"), path)
    return path


def save_tiny_artifact(path: Path, tok_json: Path, extra: dict, cycle, scale: float, seed: int) -> None:
    """A random tiny IteraLite, its units cycling through `cycle` precisions, saved as a compact mixed
    artifact. Its blocks' matrices are `scale` x their initial values (at init scale the residual token
    decides and a greedy story repeats one or two tokens) and its <|endoftext|> embedding row is zero
    (no early end). KINDS' seeds give varied greedy stories whose every step is also the eager model's
    argmax (elsewhere a random router's near-ties let int8 activation rounding pick other experts)."""
    from iteralite.core.model import IteraLite
    from iteralite.data.tokenizer import eot_id, file_sha256, load_tokenizer
    from iteralite.io.checkpoint import save_checkpoint
    from iteralite.quant.config import mixed_config
    from iteralite.quant.units import quantize_allocation, units

    torch.manual_seed(seed)
    model = IteraLite(tiny_config(**extra)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # at init scale, the blocks barely move the residual
            if name.startswith("layers.") and p.dim() >= 2:
                p.mul_(scale)
        model.embedding.weight[eot_id(load_tokenizer(tok_json))] = 0.0
    alloc = {u: cycle[i % len(cycle)] for i, u in enumerate(units(model))}
    q = quantize_allocation(copy.deepcopy(model), dict(alloc), 8)
    save_checkpoint(path, q, kind="mixed", tokenizer_sha256=file_sha256(tok_json),
                    quant=mixed_config(alloc, 8, model), layout="compact")


@pytest.fixture(scope="session")
def tiny_artifacts(tok_dir, tmp_path_factory) -> dict[str, Path]:
    """{kind: path} for each of KINDS."""
    root = tmp_path_factory.mktemp("webart")
    out = {}
    for kind, spec in KINDS.items():
        out[kind] = root / f"{kind}.safetensors"
        save_tiny_artifact(out[kind], tok_dir / "tokenizer.json", *spec)
    return out

"""The WebAssembly build under Node (web/itl-node.mjs): on tiny artifacts of both embedding kinds its
greedy ids are the Python native runtime's (NativeIteraLite.greedy, every code path) and the eager
model's; its seeded sampled ids are those of the native runtime with the C sampler, and itl-run's;
with --exact (float activations) its ids are NativeIteraLite(act="f32")'s and itl-run --exact's;
its output follows itl-run's contract (stdout the prompt then the story, or --ids; the timing line
last on stderr; one error line and exit 2 on bad input, 1 on a file it cannot read)."""
from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

from iteralite.runtime.native.runtime import ISAS
from tests.web.conftest import KINDS, PROMPT, node_ids, run_node

N = 60
SAMPLED = ("-t", "0.8", "-k", "40", "--top-p", "0.9", "-s", "7")
LINE = re.compile(r"itl-wasm: (\d+) tokens in [0-9.]+ ms, [0-9.]+ tok/s \(prompt (\d+) tokens, [0-9.]+ ms\)")


def prompt_ids(tok_dir, prompt: str = PROMPT) -> list[int]:
    from iteralite.data.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir / "tokenizer.json").encode(prompt, add_special_tokens=False).ids


def native_ids(path, ids: list[int], n: int, isa: str, temperature: float = 0.0, act: str = "int8",
               **sampling) -> list[int]:
    """The Python native runtime: greedy in C after prefilling the prompt, or the C sampler's draws."""
    from iteralite.io.checkpoint import load_model
    from iteralite.runtime.native.runtime import NativeIteraLite
    from iteralite.train.generate import generate_ids

    nat = NativeIteraLite.from_model(load_model(path)[0], isa=isa, act=act)
    if temperature:
        return list(generate_ids(nat, ids, n, temperature=temperature, sampler="c", **sampling))
    state = nat.init_state(1)
    if len(ids) > 1:
        _, _, state = nat.forward(torch.tensor([ids[:-1]]), state, return_state=True)
    return nat.greedy(ids[-1], n, state)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_ids_are_the_native_runtimes_and_the_eager_models(node, tiny_artifacts, tok_bin, tok_dir, kind):
    """Exactly the native runtime's ids (every code path); against the eager model (float activations,
    where the C step rounds them to int8 per block), teacher-forced: each id is the eager argmax, or
    within 2% of the eager top logit (as tests/runtime/test_factorised.py), and most are the argmax."""
    from iteralite.io.checkpoint import load_model

    path, ids = tiny_artifacts[kind], prompt_ids(tok_dir)
    got = node_ids(node, path, tok_bin, "-p", PROMPT, "-n", N, "-t", "0")
    assert len(got) == N and len(set(got)) >= 10  # a story, not a loop of one or two tokens
    for isa in ISAS:  # a path the CPU lacks runs the best one below it
        assert got == native_ids(path, ids, N, isa), isa
    model, worst, exact = load_model(path)[0], 0.0, 0
    with torch.no_grad():
        logits, _, state = model(torch.tensor([ids]), return_state=True)
        logits = logits[0, -1]
        for t in got:
            worst = max(worst, float((logits.max() - logits[t]) / logits.abs().max()))
            exact += int(logits.argmax()) == t
            logits, state = model.step(torch.tensor([t]), state)
            logits = logits[0]
    assert worst <= 0.02 and exact >= 0.9 * N, (worst, exact)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_ids_are_the_f32_native_runtimes_and_itl_runs(node, tiny_artifacts, tok_bin, tok_dir, kind):
    """--exact (float activations): greedy ids equal NativeIteraLite(act="f32")'s on every code path and
    itl-run --exact's; seeded sampling too."""
    from iteralite.runtime.native import itlrun

    path, ids = tiny_artifacts[kind], prompt_ids(tok_dir)
    got = node_ids(node, path, tok_bin, "-p", PROMPT, "-n", N, "-t", "0", "--exact")
    assert len(got) == N and len(set(got)) >= 10
    for isa in ISAS:
        assert got == native_ids(path, ids, N, isa, act="f32"), isa
    exe = itlrun.binary_path()
    if exe is None:
        pytest.fail("itl-run is not built: the README's setup builds it")
    for flags in [("-t", "0"), SAMPLED]:
        args = [path, tok_bin, "-p", PROMPT, "-n", N, *flags, "--exact"]
        proc = subprocess.run([exe, *map(str, args), "--ids"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert [int(x) for x in proc.stdout.split()] == node_ids(node, *args), flags
    assert node_ids(node, path, tok_bin, "-p", PROMPT, "-n", N, *SAMPLED, "--exact") == native_ids(
        path, ids, N, "scalar", temperature=0.8, act="f32", top_k=40, top_p=0.9, seed=7)
    assert b"--exact" in run_node(node, "--help").stdout


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_sampled_ids_are_the_c_samplers_on_the_native_runtime(node, tiny_artifacts, tok_bin, tok_dir, kind):
    path, ids = tiny_artifacts[kind], prompt_ids(tok_dir)
    got = node_ids(node, path, tok_bin, "-p", PROMPT, "-n", N, *SAMPLED)
    assert got == native_ids(path, ids, N, "scalar", temperature=0.8, top_k=40, top_p=0.9, seed=7)
    assert got != node_ids(node, path, tok_bin, "-p", PROMPT, "-n", N, *SAMPLED[:-1], "8")  # the seed counts


def test_the_story_and_the_timing_line(node, tiny_artifacts, tok_bin, tok_dir):
    """stdout: the prompt, then the bytes of the generated ids (pieces held back at an incomplete UTF-8
    sequence and flushed at the end add up to the whole), then a newline."""
    from iteralite.runtime.native.text import CTokenizer

    flags = (tiny_artifacts["dense"], tok_bin, "-p", PROMPT, "-n", N, "-t", "0")
    proc, ids = run_node(node, *flags), node_ids(node, *flags)
    assert proc.stdout == PROMPT.encode() + CTokenizer(tok_bin).decode(ids) + b"\n"
    last = proc.stderr.decode().strip().splitlines()[-1]
    m = LINE.fullmatch(last)
    assert m, last
    assert int(m.group(1)) == N and int(m.group(2)) == len(prompt_ids(tok_dir))


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_ids_are_itl_runs(node, tiny_artifacts, tok_bin, kind):
    """itl-run on its scalar path (as the wasm build), with its default sampling and with top-k, top-p and
    a seed above 2**32 (JavaScript passes the seed's two halves)."""
    from iteralite.runtime.native import itlrun

    exe = itlrun.binary_path()
    if exe is None:
        pytest.fail("itl-run is not built: the README's setup builds it")
    for flags in [(), ("-t", "1.3", "-k", "40", "--top-p", "0.8", "-s", str(2 ** 64 - 5))]:
        args = [tiny_artifacts[kind], tok_bin, "-p", PROMPT, "-n", N, *flags]
        proc = subprocess.run([exe, *map(str, args), "--ids"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "ITERALITE_NATIVE_ISA": "scalar"})
        assert proc.returncode == 0, proc.stderr
        assert [int(x) for x in proc.stdout.split()] == node_ids(node, *args), flags


def _error_line(proc) -> str:
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("itl-wasm: error: "), lines[0]
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(node, tiny_artifacts, tok_bin, tmp_path):
    data = bytearray(tiny_artifacts["dense"].read_bytes())
    data[len(data) // 2] ^= 0x40
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    art = tiny_artifacts["dense"]
    for args, where in [((bad, tok_bin), "flipped.safetensors: checksum mismatch"),
                        ((tok_bin, tok_bin), "tokenizer.bin: "),
                        ((art, art), "not a usable binary tokenizer"), ((art, tok_bin, "-n", "-1"), "-n must be >= 0"),
                        ((art, tok_bin, "--top-p", "2"), "--top-p must be in (0, 1]"),
                        ((art, tok_bin, "-t", "1000"), "-t must be 0 (greedy) or in [0.001, 100]"),
                        ((art, tok_bin, "-s", "-1"), "-s must be in [0, 2**64 - 1]"),
                        ((art, tok_bin, "-p", ""), "the prompt encodes to no tokens"),
                        ((art, tok_bin, "--bogus"), "unknown option '--bogus'"), ((art,), "missing TOKENIZER_BIN")]:
        proc = run_node(node, *args, check=False)
        assert proc.returncode == 2 and proc.stdout == b"", args
        assert where in _error_line(proc)


def test_a_tokenizer_of_another_vocabulary_is_one_line_and_exit_2(node, tok_dir, tok_bin, tmp_path):
    from tests.web.conftest import save_tiny_artifact

    path = tmp_path / "v301.safetensors"
    save_tiny_artifact(path, tok_dir / "tokenizer.json", {"vocab_size": 301}, (4,), 1.0, 0)
    proc = run_node(node, path, tok_bin, check=False)
    assert proc.returncode == 2 and proc.stdout == b""
    assert _error_line(proc) == (f"itl-wasm: error: {path}: the model's vocab_size is 301 but the tokenizer has 300 "
                                 "tokens; pass the tokenizer the model was trained with")


def test_a_missing_file_is_one_line_and_exit_1(node, tok_bin, tmp_path):
    proc = run_node(node, tmp_path / "none.safetensors", tok_bin, check=False)
    assert proc.returncode == 1 and "none.safetensors" in _error_line(proc)

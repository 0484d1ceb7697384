"""The standalone command-line runtime `itl-run` (itl_run.c + itl_gen.c + itl_artifact.c): its
greedy ids equal the Python native runtime's (NativeIteraLite.greedy) and are the eager packed
model's greedy choices (up to near-ties the int8 activation rounding decides) for several prompts on
tiny artifacts with a dense and a factorised embedding; with --exact (float activations) its ids are
NativeIteraLite(act="f32")'s and exactly the eager model's; sampling is seeded and repeatable; the
text it prints is the prompt and the ids' bytes; bad arguments and bad files exit 2 (1 for I/O) with
one line."""
from __future__ import annotations

import copy
import subprocess

import pytest
import torch
from tokenizers import Tokenizer

from iteralite.data.tokbin import read_tokbin
from iteralite.io.checkpoint import load_model
from iteralite.runtime.native import itlrun
from iteralite.runtime.native.runtime import NativeIteraLite
from tests.runtime.test_itl_artifact import RANK, tiny_artifact

PROMPTS = ["Once upon a time", "the cat saw a big red ball", "Lily said"]
N = 40


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    root = tmp_path_factory.mktemp("itl_run")
    return {"dense": tiny_artifact(root / "dense.safetensors", seed=5, boost=100),
            "factorised": tiny_artifact(root / "fact.safetensors", rank=RANK, seed=5, boost=100)}


@pytest.fixture(scope="module")
def tok(tok_dir):
    return tok_dir / "tokenizer.bin", Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([itlrun.binary_path(), *map(str, args)], capture_output=True, timeout=60)


def python_greedy(path, ids: list[int], n: int, got: list[int]) -> tuple[list[int], int, int]:
    """NativeIteraLite's greedy ids after prefilling `ids`, and the eager packed model and the native
    step teacher-forced along `got`: (native ids, steps where got's token is the eager argmax, steps
    where it is not but its eager logit is within twice that step's native-eager logit difference
    of the eager max: a near-tie the int8 activation rounding decides)."""
    q = load_model(path)[0]
    nat = NativeIteraLite.from_model(q)
    nst, est = nat.init_state(1), q.init_state(1)
    exact = close = 0
    with torch.no_grad():
        for t in ids[:-1]:
            nat.step(torch.tensor([t]), nst)
            _, est = q.step(torch.tensor([t]), est)
        native = nat.greedy(ids[-1], n, copy.deepcopy(nst))
        for prev, tok in zip([ids[-1]] + got[:-1], got):
            el, est = q.step(torch.tensor([prev]), est)
            nl, nst = nat.step(torch.tensor([prev]), nst)
            el, err = el[0], float((nl - el).abs().max())
            if int(el.argmax()) == tok:
                exact += 1
            elif el.max() - el[tok] <= 2 * err:
                close += 1
    return native, exact, close


def test_the_binary_is_built():
    """The README's setup links itl-run (CI runs this from a fresh clone)."""
    assert itlrun.binary_path() is not None, "itl-run was not built by the setup command"


@pytest.mark.parametrize("kind", ["dense", "factorised"])
def test_greedy_ids_equal_the_native_and_eager_runtimes(arts, tok, kind):
    path = arts[kind]
    for prompt in PROMPTS:
        ids = tok[1].encode(prompt).ids
        p = cli(path, tok[0], "-p", prompt, "-n", N, "-t", 0, "--ids")
        assert p.returncode == 0, p.stderr
        got = [int(x) for x in p.stdout.split()]
        stats = itlrun.parse_stats(p.stderr.decode())
        assert stats["tokens"] == N and stats["prompt_tokens"] == len(ids) and stats["tok_s"] > 0
        native, exact, close = python_greedy(path, ids, N, got)
        assert got == native, prompt
        # every token is the eager model's greedy choice, or a near-tie the int8 activations decide
        assert exact + close == N and exact >= 0.9 * N, (prompt, exact, close)
        assert len(set(got)) >= 5, got  # a sequence, not one token repeated


def test_sampling_is_seeded_and_repeatable(arts, tok):
    path = arts["factorised"]
    runs = {seed: itlrun.run(path, tok[0], "Once upon a time", 50, temperature=1.0, top_p=0.95, seed=seed)[0]
            for seed in (1, 2, 3)}
    assert itlrun.run(path, tok[0], "Once upon a time", 50, temperature=1.0, top_p=0.95, seed=1)[0] == runs[1]
    assert len({tuple(v) for v in runs.values()}) > 1  # the seed matters
    assert all(len(v) == 50 and all(0 <= i < 300 for i in v) for v in runs.values())
    greedy = itlrun.run(path, tok[0], "Once upon a time", 30, temperature=0)[0]
    assert itlrun.run(path, tok[0], "Once upon a time", 30, temperature=0.8, top_k=1, seed=9)[0] == greedy


def test_the_text_is_the_prompt_and_the_ids_bytes(arts, tok):
    path, table = arts["dense"], read_tokbin(tok[0]).tokens
    args = (path, tok[0], "-p", "Tom and Lily", "-n", 60, "-t", 0.9, "-s", 7)
    ids = [int(x) for x in cli(*args, "--ids").stdout.split()]
    p = cli(*args)
    assert p.returncode == 0
    assert p.stdout == b"Tom and Lily" + b"".join(table[i] for i in ids) + b"\n"
    assert itlrun.run(path, tok[0], "Tom and Lily", 60, temperature=0.9, seed=7, ids=False)[0] == \
        p.stdout.decode("utf-8", "replace")[:-1]
    p = cli(path, tok[0], "-n", 0)
    assert p.returncode == 0 and p.stdout == b"Once upon a time\n"
    assert itlrun.parse_stats(p.stderr.decode())["tokens"] == 0


@pytest.mark.parametrize("args,fragment", [
    (["-n", "-1"], "-n must be >= 0"),
    (["-n", "ten"], "-n must be an integer"),
    (["-t", "-0.5"], "-t must be >= 0 (0 = greedy) and finite"),
    (["-t", "nan"], "-t must be >= 0 (0 = greedy) and finite"),
    (["-t", "1e-9"], "-t must be 0 (greedy) or in [0.001, 100]"),
    (["-t", "500"], "-t must be 0 (greedy) or in [0.001, 100]"),
    (["-k", "-2"], "-k must be >= 0 (0 = no top-k filter)"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["-s", "-1"], "-s must be in [0, 2**64 - 1]"),
    (["-s", "18446744073709551616"], "-s must be in [0, 2**64 - 1]"),
    (["--temperature", "1"], "unknown option '--temperature'"),
    (["-p"], "-p needs a value"),
    (["extra"], "unexpected argument 'extra'"),
])
def test_bad_arguments_exit_2_with_one_line(arts, tok, args, fragment):
    p = cli(arts["dense"], tok[0], *args)
    err = p.stderr.decode()
    assert p.returncode == 2 and p.stdout == b""
    assert err.count("\n") == 1 and err.startswith("itl-run: error: ") and fragment in err, err


def test_missing_arguments_and_bad_files(arts, tok, tmp_path):
    p = cli()
    assert p.returncode == 2 and b"missing ARTIFACT and TOKENIZER_BIN" in p.stderr
    p = cli(arts["dense"])
    assert p.returncode == 2 and b"missing TOKENIZER_BIN" in p.stderr
    for args, code, fragment in (
            ((tmp_path / "none.safetensors", tok[0]), 1, "cannot open the artifact"),
            ((arts["dense"], tmp_path / "none.bin"), 1, "cannot read the tokenizer"),
            ((arts["dense"], arts["dense"]), 2, "not a usable binary tokenizer"),
            ((tok[0], tok[0]), 2, "not a safetensors file")):
        p = cli(*args)
        err = p.stderr.decode()
        assert p.returncode == code and err.count("\n") == 1 and fragment in err, err
    small = tiny_artifact(tmp_path / "v257.safetensors", vocab=257)
    p = cli(small, tok[0])
    assert p.returncode == 2 and b"vocab_size is 257 but the tokenizer has 300 tokens" in p.stderr
    data = bytearray(arts["dense"].read_bytes())
    data[-5] ^= 1
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    p = cli(bad, tok[0])
    assert p.returncode == 2 and b"checksum mismatch" in p.stderr and p.stderr.count(b"\n") == 1
    p = cli(arts["dense"], tok[0], "-p", "")
    assert p.returncode == 2 and b"the prompt encodes to no tokens" in p.stderr


def test_the_python_helper_raises_the_error_line(arts, tok, tmp_path, monkeypatch):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(arts["dense"].read_bytes()[:-3])
    with pytest.raises(itlrun.ItlRunError, match="^itl-run: error: .*truncated or padded"):
        itlrun.run(bad, tok[0], n=5)
    monkeypatch.setattr(itlrun, "binary_path", lambda: None)
    with pytest.raises(itlrun.ItlRunError, match="itl-run is not built here"):
        itlrun.run(arts["dense"], tok[0], n=5)


def test_help_exits_0():
    p = cli("--help")
    assert p.returncode == 0 and b"usage: itl-run ARTIFACT TOKENIZER_BIN" in p.stdout and b"--exact" in p.stdout


@pytest.mark.parametrize("kind", ["dense", "factorised"])
def test_exact_greedy_ids_are_the_f32_native_runtimes_and_the_eager_models(arts, tok, kind):
    """--exact (float activations): the ids of NativeIteraLite(act="f32") after its prefill, and the
    eager packed model's free-running greedy ids (no int8 near-ties to allow for)."""
    path = arts[kind]
    q = load_model(path)[0].eval()
    nat = NativeIteraLite.from_model(q, act="f32")
    for prompt in PROMPTS:
        ids = tok[1].encode(prompt).ids
        p = cli(path, tok[0], "-p", prompt, "-n", N, "-t", 0, "--ids", "--exact")
        assert p.returncode == 0, p.stderr
        got = [int(x) for x in p.stdout.split()]
        state = nat.init_state(1)
        if len(ids) > 1:
            _, _, state = nat.forward(torch.tensor([ids[:-1]]), state, return_state=True)
        assert got == nat.greedy(ids[-1], N, state), prompt
        with torch.no_grad():
            est = q.init_state(1)
            for t in ids[:-1]:
                _, est = q.step(torch.tensor([t]), est)
            tok_, eager = torch.tensor([ids[-1]]), []
            for _ in range(N):
                logits, est = q.step(tok_, est)
                tok_ = logits.argmax(-1)
                eager.append(int(tok_))
        assert got == eager, prompt
        assert len(set(got)) >= 5, got


def test_itlrun_helper_passes_exact():
    from iteralite.runtime.native import itlrun

    if itlrun.binary_path() is None:
        pytest.skip("itl-run is not built here")
    argv = itlrun.command("a.safetensors", "t.bin", exact=True)
    assert argv[-1] == "--exact" and "--exact" not in itlrun.command("a.safetensors", "t.bin")

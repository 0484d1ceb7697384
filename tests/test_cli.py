"""The `iteralite` command line: every bad input is one `iteralite: error: ...` line and exit
status 2, checked before anything is loaded; `evaluate` scores with params.yaml's `eval` settings;
Ctrl-C ends a story quietly with status 130."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from iteralite.cli import main
from iteralite.core.model import IteraLite
from iteralite.data.tokenizer import eot_id, file_sha256, load_tokenizer
from iteralite.io.checkpoint import load_model, save_checkpoint
from iteralite.train.evaluate import EvalConfig, Evaluator
from tests.conftest import REPO, tiny_config


@pytest.fixture
def ckpt(tok_dir, tmp_path):
    """A tiny fp32 checkpoint that records the test tokenizer. Its <|endoftext|> embedding row is
    zero, so greedy decoding never ends the story by itself (the Ctrl-C test needs a long one)."""
    torch.manual_seed(0)
    m = IteraLite(tiny_config())
    with torch.no_grad():
        m.embedding.weight[eot_id(load_tokenizer(tok_dir / "tokenizer.json"))] = 0.0
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, m, kind="fp32", tokenizer_sha256=file_sha256(tok_dir / "tokenizer.json"))
    return path


def _gen(ckpt, tok_dir, *extra):
    return ["generate", "--checkpoint", str(ckpt), "--tokenizer", str(tok_dir / "tokenizer.json"), *extra]


def _eval(ckpt, tok_dir, *extra):
    return ["evaluate", "--checkpoint", str(ckpt), "--tokenizer", str(tok_dir / "tokenizer.json"), *extra]


def _one_error_line(err: str) -> str:
    assert err.startswith("iteralite: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("args,msg", [
    (["--temperature", "nan"], "--temperature must be >= 0 (0 = greedy) and finite, got nan"),
    (["--temperature", "inf"], "--temperature must be >= 0 (0 = greedy) and finite, got inf"),
    (["--temperature=-inf"], "--temperature must be >= 0 (0 = greedy) and finite, got -inf"),
    (["--temperature", "1e-45"], "--temperature must be 0 (greedy) or in [0.001, 100], got 1e-45"),
    (["--temperature", "1000"], "--temperature must be 0 (greedy) or in [0.001, 100], got 1000"),
    (["--seed", "99999999999999999999999"], "--seed must be in [0, 2**64 - 1] = [0, 18446744073709551615]"),
    (["--seed", "-1"], "--seed must be in [0, 2**64 - 1]"),
    (["--threads", "-1"], "--threads must be in [0, "),
    (["--threads", "1000000"], "(0 = torch default; at most the"),
    (["--top-k", "-5"], "--top-k must be >= 0 (0 = no top-k filter), got -5"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
    (["--top-p", "0"], "--top-p must be in (0, 1] (1 = no top-p filter), got 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1] (1 = no top-p filter), got 1.5"),
    (["--top-p=-0.1"], "--top-p must be in (0, 1] (1 = no top-p filter), got -0.1"),
    (["--top-p", "nan"], "--top-p must be in (0, 1] (1 = no top-p filter), got nan"),
    (["--top-p", "inf"], "--top-p must be in (0, 1] (1 = no top-p filter), got inf"),
])
def test_bad_generate_arguments_are_one_line_before_loading(tmp_path, tok_dir, capsys, args, msg):
    """The checkpoint does not exist and the prompt comes from stdin: the argument error comes
    first, so nothing was loaded and stdin was not read (capsys's stdin raises when read)."""
    assert main(_gen(tmp_path / "missing.safetensors", tok_dir, *args, "--prompt-file", "-")) == 2
    captured = capsys.readouterr()
    assert msg in _one_error_line(captured.err) and captured.out == ""


def test_unparsable_argument_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--temperature", "warm"])
    assert e.value.code == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "argument --temperature: invalid float value: 'warm'" in err and "iteralite generate --help" in err


def test_edge_values_are_accepted(ckpt, tok_dir, capsys):
    assert main(_gen(ckpt, tok_dir, "--temperature", "0.001", "--top-k", "0", "--threads", "1",
                     "--seed", str(2**64 - 1), "--max-new-tokens", "5")) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")


def test_non_utf8_prompt_is_one_line(ckpt, tok_dir, capsys):
    """In-process (argv as Python decodes it: surrogate escapes) and from a real shell argv."""
    assert main(_gen(ckpt, tok_dir, "--prompt", "\udcff\udcfe")) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "the prompt is not valid UTF-8 (byte 0xff at character 0)" in err
    cmd = [sys.executable, "-m", "iteralite.cli", *_gen(ckpt, tok_dir), "--prompt", b"ok \xff\xfe"]
    r = subprocess.run(cmd, capture_output=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stdout == b""
    assert "the prompt is not valid UTF-8 (byte 0xff at character 3)" in _one_error_line(r.stderr.decode())


@pytest.mark.parametrize("which,msg", [("dir", "is a directory, not a tokenizer file"),
                                       ("missing", "no such tokenizer")])
def test_tokenizer_path_that_is_a_directory_or_missing(ckpt, tok_dir, tmp_path, capsys, which, msg):
    tok = tok_dir if which == "dir" else tmp_path / "nope.json"
    for cmd in ("generate", "evaluate"):
        assert main([cmd, "--checkpoint", str(ckpt), "--tokenizer", str(tok)]) == 2
        assert msg in _one_error_line(capsys.readouterr().err)


def test_checkpoint_without_tokenizer_id_or_other_vocab_is_refused(tok_dir, tmp_path, capsys):
    """check_tokenizer runs before the tokenizer is used: no silent text from unchecked ids."""
    sha = file_sha256(tok_dir / "tokenizer.json")
    for name, vocab, recorded, msg in (("none", 300, "", "records no tokenizer id"),
                                       ("vocab", 320, sha, "the model's vocab_size is 320")):
        path = tmp_path / f"{name}.safetensors"
        save_checkpoint(path, IteraLite(tiny_config(vocab_size=vocab)), kind="fp32", tokenizer_sha256=recorded)
        assert main(_gen(path, tok_dir)) == 2
        assert msg in _one_error_line(capsys.readouterr().err)


def test_ctrl_c_during_generation_ends_quietly(ckpt, tok_dir):
    """SIGINT while tokens stream: what was shown stays, one newline, no traceback, status 130."""
    cmd = [sys.executable, "-m", "iteralite.cli",
           *_gen(ckpt, tok_dir, "--temperature", "0", "--max-new-tokens", "1000000")]
    # SIGINT back to its default in the child: a test run started as a background job (`cmd &` in a
    # script) ignores SIGINT, children inherit that, and Python then installs no KeyboardInterrupt
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        head = p.stdout.read(len("Once upon a time") + 20)  # the prompt and some generated text
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=60)
    finally:
        p.kill()
    out = (head + rest).decode()
    assert p.returncode == 130, err.decode()
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time") + 20
    assert out.endswith("\n") and not out.endswith("\n\n") and err == b""


def test_ctrl_c_through_main_returns_130(ckpt, tok_dir, capsys, monkeypatch):
    """The same, in-process: the write raises KeyboardInterrupt after the prompt and two pieces."""
    real, calls = sys.stdout.write, []

    def write(s):
        calls.append(s)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(s)

    monkeypatch.setattr(sys.stdout, "write", write)
    assert main(_gen(ckpt, tok_dir, "--temperature", "0", "--max-new-tokens", "50")) == 130
    monkeypatch.undo()
    captured = capsys.readouterr()
    assert captured.out == calls[0] + calls[1] + "\n" and captured.err == ""


def _scores(ckpt, tok_dir, cfg):
    model, _ = load_model(ckpt)
    return Evaluator(cfg, tok_dir)(model)


def test_evaluate_uses_the_params_eval_section(ckpt, tok_dir, tmp_path, capsys):
    """Same numbers as the stages' Evaluator with params.yaml's eval settings; flags override one
    value each; the settings used are in the output."""
    params = tmp_path / "params.yaml"
    params.write_text("eval:\n  seq_len: 16\n  batch_size: 3\n  max_tokens: 200\n")
    assert main(_eval(ckpt, tok_dir, "--params", str(params))) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["eval"] == {"seq_len": 16, "batch_size": 3, "max_tokens": 200, "params": str(params)}
    assert {k: out[k] for k in ("val_loss", "wikitext2_ppl")} == \
        {k: _scores(ckpt, tok_dir, EvalConfig(16, 3, 200))[k] for k in ("val_loss", "wikitext2_ppl")}
    assert main(_eval(ckpt, tok_dir, "--params", str(params), "--max-tokens", "400", "--seq-len", "32")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["eval"] == {"seq_len": 32, "batch_size": 3, "max_tokens": 400, "params": str(params)}
    assert out["val_loss"] == _scores(ckpt, tok_dir, EvalConfig(32, 3, 400))["val_loss"]


def test_evaluate_without_params_file_uses_defaults_and_says_so(ckpt, tok_dir, tmp_path, capsys):
    assert main(_eval(ckpt, tok_dir, "--params", str(tmp_path / "none.yaml"), "--max-tokens", "512")) == 0
    captured = capsys.readouterr()
    assert "none.yaml not found; using the default eval settings" in captured.err
    assert json.loads(captured.out)["eval"] == {"seq_len": 256, "batch_size": 16, "max_tokens": 512,
                                               "params": None}


@pytest.mark.parametrize("args,msg", [
    (["--max-tokens", "-100"], "'eval.max_tokens' must be >= 0 (0 = all) (from --max-tokens -100)"),
    (["--seq-len", "1"], "'eval.seq_len' must be >= 2 (from --seq-len 1)"),
    (["--batch-size", "0"], "'eval.batch_size' must be >= 1 (from --batch-size 0)"),
])
def test_evaluate_rejects_bad_overrides_before_loading(tmp_path, tok_dir, capsys, args, msg):
    assert main(_eval(tmp_path / "missing.safetensors", tok_dir, *args)) == 2
    assert msg in _one_error_line(capsys.readouterr().err)


def test_evaluate_bad_params_section_is_one_line(tmp_path, tok_dir, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("eval:\n  seq_lenn: 16\n")
    assert main(_eval(tmp_path / "missing.safetensors", tok_dir, "--params", str(params))) == 2
    assert "unknown key 'eval.seq_lenn' (did you mean 'seq_len'?)" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("content,msg", [(None, "is a directory, not a params file"),
                                         (b"eval:\n  seq_len: \xff\n", "UTF-8")])
def test_evaluate_unusable_params_file_is_one_line(tmp_path, tok_dir, capsys, content, msg):
    params = tmp_path / "params.yaml"
    params.mkdir() if content is None else params.write_bytes(content)
    assert main(_eval(tmp_path / "missing.safetensors", tok_dir, "--params", str(params))) == 2
    assert msg in _one_error_line(capsys.readouterr().err)


def test_evaluate_with_too_few_tokens_is_one_line(ckpt, tok_dir, tmp_path, capsys):
    assert main(_eval(ckpt, tok_dir, "--params", str(tmp_path / "none.yaml"), "--seq-len", "100000")) == 2
    err = _one_error_line(capsys.readouterr().err.split("\n", 1)[1])  # after the defaults note
    assert "seq_len" in err and err.rstrip().endswith("(from --seq-len 100000)")


def test_evaluate_params_path_that_is_a_fifo_or_unreadable_is_one_line(ckpt, tok_dir, tmp_path, capsys, monkeypatch):
    fifo = tmp_path / "params.fifo"
    os.mkfifo(fifo)
    assert main(_eval(ckpt, tok_dir, "--params", str(fifo))) == 2  # refused without opening it: no hang
    assert "is not a regular file" in _one_error_line(capsys.readouterr().err)
    real_stat = os.stat

    def denied(path, *a, **k):
        if str(path).endswith("locked.yaml"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *a, **k)

    monkeypatch.setattr(os, "stat", denied)
    assert main(_eval(ckpt, tok_dir, "--params", str(tmp_path / "locked.yaml"))) == 2
    assert "cannot read the params file: Permission denied" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("runtime", ["eager", "auto"])  # a float model: auto falls back to eager
def test_generate_ends_with_a_timing_line_naming_the_runtime(ckpt, tok_dir, capsys, runtime):
    import re
    assert main(_gen(ckpt, tok_dir, "--temperature", "0", "--max-new-tokens", "5", "--runtime", runtime)) == 0
    err = capsys.readouterr().err
    pattern = (r"\[IteraLite\] prompt \d+ tokens in [\d.]+ ms \([\d,]+ tok/s\), "
               r"generated 4 tokens in [\d.]+ ms \([\d,]+ tok/s\)\n")
    assert re.fullmatch(pattern, err), err


def _packed(ckpt, tok_dir, tmp_path):
    from iteralite.quant.config import mixed_config
    from iteralite.quant.units import quantize_allocation, units

    model = load_model(ckpt)[0]
    alloc = {u: (2, 3, 4)[i % 3] for i, u in enumerate(units(model))}
    q = quantize_allocation(model, dict(alloc), 8)
    path = tmp_path / "packed.safetensors"
    save_checkpoint(path, q, kind="mixed", tokenizer_sha256=file_sha256(tok_dir / "tokenizer.json"),
                    quant=mixed_config(alloc, 8, load_model(ckpt)[0]), layout="compact")
    return path


def test_generate_runs_a_packed_artifact_on_the_native_step_by_default(ckpt, tok_dir, tmp_path, capsys):
    path = _packed(ckpt, tok_dir, tmp_path)
    assert main(_gen(path, tok_dir, "--temperature", "0", "--max-new-tokens", "6")) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Once upon a time") and err.startswith("[NativeIteraLite] prompt ")
    assert main(_gen(path, tok_dir, "--temperature", "0", "--max-new-tokens", "6", "--runtime", "eager")) == 0
    assert capsys.readouterr().err.startswith("[IteraLite] prompt ")


def test_native_runtime_on_a_float_model_is_one_line(ckpt, tok_dir, capsys):
    assert main(_gen(ckpt, tok_dir, "--runtime", "native", "--max-new-tokens", "3")) == 2
    assert "the native step runs packed artifacts" in _one_error_line(capsys.readouterr().err)


# --- --top-p on every runtime, --prompt-file and stdin ------------------------------------------

def _ref_story(runtime_model, tok, prompt: str, n: int, temperature: float, top_k: int, top_p: float,
               seed: int, sampler: str = "torch") -> str:
    """What `generate` prints, rebuilt on the runtime's own logits with the plain-Python sampler
    (sampler "torch") or with the C sampler called directly (sampler "c")."""
    from iteralite.train.generate import sampling_probs_ref

    gen, eot = torch.Generator().manual_seed(seed), eot_id(tok)

    def draw(logits):
        probs = torch.tensor(sampling_probs_ref(logits.tolist(), temperature, top_k, top_p))
        return int(torch.multinomial(probs, 1, generator=gen))

    if sampler == "c":
        from iteralite.runtime.native.text import Sampler

        c = Sampler(seed, temperature, top_k, top_p)
        draw = lambda logits: c.sample(logits.detach().float().numpy())  # noqa: E731

    ids = tok.encode(prompt, add_special_tokens=False).ids
    logits, _, state = runtime_model(torch.tensor([ids]), return_state=True)
    out = [draw(logits[0, -1])]
    while len(out) < n and out[-1] != eot:
        logits, state = runtime_model.step(torch.tensor([out[-1]]), state)
        out.append(draw(logits[0]))
    return prompt + tok.decode(out[:out.index(eot)] if eot in out else out) + "\n"


# What `generate --max-new-tokens 12 --seed 5` (temperature 0.8, top-k 40) prints for `_packed`'s
# artifact (an untrained model: bytes, not words) on every runtime. Without --top-p it was printed by
# the code before --top-p existed (e45726e^): the flag's default leaves seeded stories as they were.
GOLDEN_STORY = "Once upon a time\ufffd\ufffd\ufffdxDLg btleGWW\n"
GOLDEN_STORY_TOP_P_09 = "Once upon a time\ufffd\ufffd\ufffdxDL\x0f\ufffd\x15GWW\n"


@pytest.mark.parametrize("runtime", ["native", "fused", "eager", "auto"])
def test_top_p_on_every_runtime_matches_the_reference_sampler(ckpt, tok_dir, tmp_path, capsys, runtime):
    """A packed artifact on each runtime: the story equals the reference sampler's on that runtime's
    logits; the same seed repeats it; a tiny P is greedy; with P = 1 or no --top-p it is the story
    the code before --top-p printed."""
    from argparse import Namespace

    from iteralite.cli import RUNTIMES

    path = _packed(ckpt, tok_dir, tmp_path)

    def run(*extra, sampler="torch"):
        assert main(_gen(path, tok_dir, "--max-new-tokens", "12", "--runtime", runtime, "--sampler", sampler,
                         *extra)) == 0
        return capsys.readouterr().out

    story = run("--temperature", "1.3", "--top-k", "0", "--top-p", "0.9", "--seed", "3")
    model, ck = load_model(path)
    rt = RUNTIMES["native" if runtime == "auto" else runtime](model, ck, Namespace())
    tok = load_tokenizer(tok_dir / "tokenizer.json")
    assert story == _ref_story(rt, tok, "Once upon a time", 12, 1.3, 0, 0.9, 3)
    assert run("--temperature", "1.3", "--top-k", "0", "--top-p", "0.9", "--seed", "3") == story
    assert run("--temperature", "1.5", "--top-k", "5", "--top-p", "1e-9", "--seed", "7") == run("--temperature", "0")
    assert run("--seed", "5") == GOLDEN_STORY
    assert run("--seed", "5", "--top-p", "1") == GOLDEN_STORY
    assert run("--seed", "5", "--top-p", "0.9") == GOLDEN_STORY_TOP_P_09
    # the C sampler (itl-run's): its own draws on the same logits; auto picks it where it is built
    c_story = run("--temperature", "1.3", "--top-k", "0", "--top-p", "0.9", "--seed", "3", sampler="c")
    assert c_story == _ref_story(rt, tok, "Once upon a time", 12, 1.3, 0, 0.9, 3, sampler="c")
    assert run("--temperature", "1.3", "--top-k", "0", "--top-p", "0.9", "--seed", "3", sampler="auto") == c_story


def test_unparsable_top_p_and_two_prompts_are_one_argparse_line(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("Hi")
    for argv, msg in ((["--top-p", "most"], "argument --top-p: invalid float value: 'most'"),
                      (["--prompt", "Hi", "--prompt-file", str(f)],
                       "argument --prompt-file: not allowed with argument --prompt"),
                      (["--prompt-file", "-", "--prompt", "-"],
                       "argument --prompt: not allowed with argument --prompt-file")):
        with pytest.raises(SystemExit) as e:
            main(["generate", *argv])
        assert e.value.code == 2 and msg in _one_error_line(capsys.readouterr().err)


def test_generate_help_documents_the_new_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for text in ("--top-p P", "nucleus sampling", "0 < P <= 1", "--prompt-file PATH", "- = stdin",
                 "- reads it from stdin", "[--prompt TEXT | --prompt-file PATH]"):
        assert text in out, text


@pytest.mark.parametrize("content", [b"The cat saw \xe2\x98\x83", b"The cat saw \xe2\x98\x83\n",
                                     b"The cat saw \xe2\x98\x83\r\n", b"\xef\xbb\xbfThe cat saw \xe2\x98\x83\n"])
def test_prompt_file_equals_the_same_text_as_prompt(ckpt, tok_dir, tmp_path, capsys, content):
    """One trailing newline (echo's, an editor's, CRLF) and a UTF-8 BOM are not part of the prompt."""
    f = tmp_path / "prompt.txt"
    f.write_bytes(content)
    flags = ("--max-new-tokens", "8", "--top-p", "0.8", "--seed", "2")
    assert main(_gen(ckpt, tok_dir, "--prompt-file", str(f), *flags)) == 0
    from_file = capsys.readouterr()
    assert main(_gen(ckpt, tok_dir, "--prompt", "The cat saw ☃", *flags)) == 0
    assert from_file.out == capsys.readouterr().out and from_file.out.startswith("The cat saw ☃")
    assert from_file.err.startswith("[IteraLite] prompt ")  # the timing line, unchanged


def test_empty_prompt_file_is_an_empty_prompt(ckpt, tok_dir, tmp_path, capsys):
    """As `--prompt ""` does today: a fresh story from <|endoftext|>."""
    for i, content in enumerate((b"", b"\n")):
        f = tmp_path / f"empty{i}.txt"
        f.write_bytes(content)
        assert main(_gen(ckpt, tok_dir, "--prompt-file", str(f), "--max-new-tokens", "6", "--seed", "1")) == 0
        from_file = capsys.readouterr().out
        assert main(_gen(ckpt, tok_dir, "--prompt", "", "--max-new-tokens", "6", "--seed", "1")) == 0
        assert from_file == capsys.readouterr().out


def test_unusable_prompt_file_is_one_line_before_loading(tmp_path, tok_dir, capsys, monkeypatch):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    locked = tmp_path / "locked.txt"
    locked.write_text("Hi")
    missing_ckpt = tmp_path / "missing.safetensors"  # the prompt error comes first: nothing was loaded
    real_read = type(locked).read_bytes

    def denied(self):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(type(locked), "read_bytes", denied)  # root reads a chmod 000 file anyway
    for path, msg in ((tmp_path / "nope.txt", f"--prompt-file {tmp_path / 'nope.txt'}: no such file"),
                      (tmp_path, f"--prompt-file {tmp_path}: is a directory, not a prompt file"),
                      (bad, f"--prompt-file {bad}: not UTF-8 text (invalid byte 0xe9 at offset 3)"),
                      (locked, f"--prompt-file {locked}: cannot read the prompt file: Permission denied")):
        assert main(_gen(missing_ckpt, tok_dir, "--prompt-file", str(path))) == 2
        captured = capsys.readouterr()
        assert msg in _one_error_line(captured.err) and captured.out == ""


def _stdin(monkeypatch, data: bytes):
    import io
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


@pytest.mark.parametrize("flag", ["--prompt", "--prompt-file"])
def test_dash_reads_the_prompt_from_stdin(ckpt, tok_dir, capsys, monkeypatch, flag):
    flags = ("--max-new-tokens", "8", "--temperature", "1.1", "--top-p", "0.7", "--seed", "4")
    _stdin(monkeypatch, "Lily and Tom ☃\n".encode())
    assert main(_gen(ckpt, tok_dir, flag, "-", *flags)) == 0
    from_stdin = capsys.readouterr().out
    assert main(_gen(ckpt, tok_dir, "--prompt", "Lily and Tom ☃", *flags)) == 0
    assert from_stdin == capsys.readouterr().out
    _stdin(monkeypatch, b"ok \xff")
    assert main(_gen(ckpt, tok_dir, flag, "-")) == 2
    assert "stdin: not UTF-8 text (invalid byte 0xff at offset 3)" in _one_error_line(capsys.readouterr().err)


def test_stdin_prompt_through_the_real_command(ckpt, tok_dir, capsys):
    """`printf ... | python -m iteralite.cli generate --prompt -` (and --prompt-file -) prints what
    main() prints for the same text as --prompt, then the timing line on stderr."""
    flags = ("--max-new-tokens", "10", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.85",
             "--seed", "6", "--threads", "1", "--runtime", "eager")
    assert main(_gen(ckpt, tok_dir, "--prompt", "The sun was big", *flags)) == 0
    want = capsys.readouterr().out
    for flag in ("--prompt", "--prompt-file"):
        r = subprocess.run([sys.executable, "-m", "iteralite.cli", *_gen(ckpt, tok_dir, flag, "-", *flags)],
                           input=b"The sun was big\n", capture_output=True, cwd=REPO,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout.decode() == want and r.stderr.decode().startswith("[IteraLite] prompt ")


# --- unusable weights, the tokenizer passed, stdout, paths and token arrays (issue 26) ----------

def _save(model, tok_dir, path):
    save_checkpoint(path, model, kind="fp32", tokenizer_sha256=file_sha256(tok_dir / "tokenizer.json"))
    return path


def test_nan_weights_are_refused_by_every_command(tok_dir, tmp_path, capsys):
    """Was: greedy printed only the prompt (exit 0), evaluate printed NaN (exit 0), sampling died
    in torch.multinomial. Now the loader names the tensor, before anything is printed."""
    torch.manual_seed(0)
    m = IteraLite(tiny_config())
    with torch.no_grad():
        m.norm_f.weight[5] = float("nan")
    path = _save(m, tok_dir, tmp_path / "nan.safetensors")
    params = tmp_path / "params.yaml"
    params.write_text("eval:\n  max_tokens: 512\n")
    for argv in (_gen(path, tok_dir, "--temperature", "0"), _gen(path, tok_dir),
                 _eval(path, tok_dir, "--params", str(params))):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert "tensor 'norm_f.weight' holds 1 NaN/inf value" in _one_error_line(captured.err)
        assert captured.out == ""


def _overflowing_checkpoint(tok_dir, tmp_path):
    """Finite weights (the loader accepts them) whose logits overflow float32."""
    torch.manual_seed(0)
    m = IteraLite(tiny_config())
    with torch.no_grad():
        m.norm_f.weight.fill_(3e38)
    return _save(m, tok_dir, tmp_path / "overflow.safetensors")


def test_evaluate_never_prints_a_non_finite_score(tok_dir, tmp_path, capsys):
    """Finite weights whose logits overflow float32: the loss is NaN; one line, exit 2, no JSON."""
    path = _overflowing_checkpoint(tok_dir, tmp_path)
    assert main(_eval(path, tok_dir, "--params", str(tmp_path / "none.yaml"), "--max-tokens", "512")) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = _one_error_line(captured.err.split("\n", 1)[1])  # after the defaults note
    assert "the model's outputs are not finite on this data" in err and "val_loss is nan" in err


def test_generate_with_overflowing_logits_is_one_line(tok_dir, tmp_path, capsys):
    """The same finite weights: greedy printed garbage with exit 0, sampling died in torch."""
    path = _overflowing_checkpoint(tok_dir, tmp_path)
    for extra in (("--temperature", "0"), ()):
        assert main(_gen(path, tok_dir, "--max-new-tokens", "5", "--runtime", "eager", *extra)) == 2
        captured = capsys.readouterr()
        assert captured.out == "Once upon a time\n"
        assert "the model's logits are not finite (NaN/inf" in _one_error_line(captured.err)


def _decoy_tokenizer(tmp_path):
    """Another byte-level BPE of the same vocabulary size, trained on other stories."""
    from iteralite.data.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer_batches
    from tests.conftest import fake_stories

    decoy = train_tokenizer_batches(TokenizerConfig(vocab_size=300), [fake_stories(200, 9)[::-1]])
    path = tmp_path / "decoy.json"
    save_tokenizer(decoy, path)
    return path


def test_evaluate_uses_the_tokenizer_file_passed(ckpt, tok_dir, tmp_path, capsys):
    """tok2.json (the checkpoint's tokenizer) beside a tokenizer.json that is another tokenizer: the
    bytes per token, hence bits per byte, are tok2.json's. Was: tokenizer.json's, exit 0."""
    import shutil

    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(tok_dir / "tokenizer.json", folder / "tok2.json")
    for split in ("valid.npy", "wikitext2.npy"):
        shutil.copy(tok_dir / split, folder / split)
    cfg = EvalConfig(32, 4, 512)
    want = _scores(ckpt, tok_dir, cfg)
    params = tmp_path / "params.yaml"
    params.write_text("eval:\n  seq_len: 32\n  batch_size: 4\n  max_tokens: 512\n")
    argv = ["evaluate", "--checkpoint", str(ckpt), "--tokenizer", str(folder / "tok2.json"), "--params", str(params)]
    assert main(argv) == 0  # no tokenizer.json there at all: was "tokenizer.json: tokenizer not found"
    assert json.loads(capsys.readouterr().out)["val_bpb"] == want["val_bpb"]
    shutil.copy(_decoy_tokenizer(tmp_path), folder / "tokenizer.json")
    assert Evaluator(cfg, folder)(load_model(ckpt)[0])["val_bpb"] != want["val_bpb"]  # the decoy would differ
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["val_bpb"], out["wikitext2_bpb"]) == (want["val_bpb"], want["wikitext2_bpb"])


def _split_folder(tok_dir, tmp_path, valid: bytes):
    import shutil

    folder = tmp_path / "split"
    folder.mkdir()
    shutil.copy(tok_dir / "tokenizer.json", folder / "tokenizer.json")
    shutil.copy(tok_dir / "wikitext2.npy", folder / "wikitext2.npy")
    (folder / "valid.npy").write_bytes(valid)
    return folder


@pytest.mark.parametrize("case", ["truncated", "out-of-vocab", "not-npy", "2-D", "missing"])
def test_unusable_token_arrays_are_one_line(ckpt, tok_dir, tmp_path, capsys, case):
    import io

    import numpy as np

    good = (tok_dir / "valid.npy").read_bytes()
    buf = io.BytesIO()
    np.save(buf, {"out-of-vocab": np.array([1, 2, 300, 4] * 200, dtype=np.uint16),
                  "2-D": np.zeros((40, 20), dtype=np.uint16)}.get(case, np.zeros(1, dtype=np.uint16)))
    content = {"truncated": good[:len(good) // 2], "not-npy": b"hello", "missing": b""}.get(case, buf.getvalue())
    folder = _split_folder(tok_dir, tmp_path, content)
    if case == "missing":
        (folder / "valid.npy").unlink()
    msg = {"truncated": "truncated or padded token array: its header says", "not-npy": "not a token array (.npy)",
           "out-of-vocab": "holds token id 300, but tokenizer", "2-D": "not a 1-D array of token ids",
           "missing": "no such token array"}[case]
    assert main(["evaluate", "--checkpoint", str(ckpt), "--tokenizer", str(folder / "tokenizer.json"),
                 "--params", str(tmp_path / "none.yaml"), "--max-tokens", "512"]) == 2
    captured = capsys.readouterr()
    err = _one_error_line(captured.err.split("\n", 1)[1])  # after the defaults note
    assert f"{folder / 'valid.npy'}: " in err and msg in err and captured.out == ""


def test_default_paths_from_another_directory_name_where_they_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cmd in ("generate", "evaluate"):
        assert main([cmd]) == 2
        lines = capsys.readouterr().err.splitlines(keepends=True)
        if cmd == "evaluate":  # the params note names where it looked too
            assert lines[0].startswith(f"iteralite: params.yaml not found (looked for {tmp_path / 'params.yaml'})")
        err = _one_error_line(lines[-1])
        assert f"--checkpoint checkpoints/fp32.safetensors: no such file: looked for " \
               f"{tmp_path / 'checkpoints' / 'fp32.safetensors'}" in err
        assert "run iteralite from the repository root" in err


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "iteralite.cli", *args], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def test_stdout_full_or_closed_is_one_line_and_status_2(ckpt, tok_dir):
    """`> /dev/full` and `>&-`: was a traceback (and an 'Exception ignored' line at exit)."""
    flags = ("--max-new-tokens", "5", "--runtime", "eager")
    with open("/dev/full", "w") as full:
        r = _cli(_gen(ckpt, tok_dir, *flags), stdout=full, stderr=subprocess.PIPE)
    assert r.returncode == 2
    assert _one_error_line(r.stderr.decode()) == ("iteralite: error: cannot write to stdout: No space left on "
                                                  "device; the output was not written (redirect stdout to a "
                                                  "writable file)\n")
    r = _cli(_gen(ckpt, tok_dir, *flags), stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1))
    assert r.returncode == 2
    assert "iteralite: error: stdout is closed; the output was not written" in _one_error_line(r.stderr.decode())


def test_reader_gone_is_quiet_status_141(ckpt, tok_dir):
    """`iteralite generate ... | head -c 20`: the story stops when head stops reading; no traceback,
    no message, status 141 as for a command killed by SIGPIPE."""
    p = subprocess.Popen([sys.executable, "-m", "iteralite.cli",
                          *_gen(ckpt, tok_dir, "--temperature", "0", "--max-new-tokens", "100000")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert p.stdout.read(20).startswith(b"Once upon a time")
        p.stdout.close()
        err = p.stderr.read()
        p.wait(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 141 and err == b""

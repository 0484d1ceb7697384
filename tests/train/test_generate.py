import subprocess
import sys

import pytest

from iteralite.io.checkpoint import save_checkpoint
from iteralite.cli import main
from iteralite.core.model import IteraLite
from iteralite.data.tokenizer import file_sha256
from tests.conftest import REPO, tiny_config


@pytest.fixture
def ckpt(tok_dir, tmp_path):
    import torch

    torch.manual_seed(0)
    m = IteraLite(tiny_config())
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, m, kind="fp32", tokenizer_sha256=file_sha256(tok_dir / "tokenizer.json"))
    return path


def _gen(ckpt, tok_dir, *extra):
    return ["generate", "--checkpoint", str(ckpt), "--tokenizer", str(tok_dir / "tokenizer.json"), *extra]


def test_generate_streams_text(ckpt, tok_dir, capsys):
    lengths = []
    for seed in range(5):  # an untrained model may sample <|endoftext|> first for some seeds
        assert main(_gen(ckpt, tok_dir, "--max-new-tokens", "15", "--seed", str(seed))) == 0
        out = capsys.readouterr().out
        assert out.startswith("Once upon a time") and out.endswith("\n")
        lengths.append(len(out))
    assert max(lengths) > len("Once upon a time") + 5


def test_greedy_is_reproducible(ckpt, tok_dir, capsys):
    main(_gen(ckpt, tok_dir, "--temperature", "0", "--max-new-tokens", "10"))
    a = capsys.readouterr().out
    main(_gen(ckpt, tok_dir, "--temperature", "0", "--max-new-tokens", "10", "--seed", "9"))
    assert capsys.readouterr().out == a


@pytest.mark.parametrize("args,msg", [(["--max-new-tokens", "-1"], "max-new-tokens must be >= 0"),
                                      (["--temperature", "-0.5"], "temperature must be >= 0")])
def test_bad_arguments_are_clear(ckpt, tok_dir, capsys, args, msg):
    assert main(_gen(ckpt, tok_dir, *args)) == 2
    assert msg in capsys.readouterr().err


def test_zero_new_tokens_and_odd_prompts(ckpt, tok_dir, capsys):
    assert main(_gen(ckpt, tok_dir, "--max-new-tokens", "0", "--prompt", "Hi")) == 0
    assert capsys.readouterr().out == "Hi\n"
    assert main(_gen(ckpt, tok_dir, "--max-new-tokens", "5", "--prompt", "☃ Ωmega 日本 \x07")) == 0
    assert main(_gen(ckpt, tok_dir, "--max-new-tokens", "5", "--prompt", "")) == 0


def test_wrong_tokenizer_is_detected(ckpt, tmp_path, tok_dir, capsys):
    other = tmp_path / "tok.json"
    other.write_text((tok_dir / "tokenizer.json").read_text().replace('"cat"', '"cat"', 1) + " ")
    assert main(["generate", "--checkpoint", str(ckpt), "--tokenizer", str(other)]) == 2
    assert "another tokenizer" in capsys.readouterr().err


def test_console_script_entry_point(ckpt, tok_dir):
    r = subprocess.run([sys.executable, "-m", "iteralite.cli", *_gen(ckpt, tok_dir, "--max-new-tokens", "3")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("kind", ["mixed", "fused"])
def test_generate_works_on_mixed_and_fused_artifacts(tok_dir, tmp_path, capsys, kind):
    """The same greedy story from the FP32-free mixed artifact and from its fused twin."""
    import copy

    import torch

    from iteralite.quant.config import mixed_config
    from iteralite.quant.units import quantize_allocation, units

    torch.manual_seed(0)
    m = IteraLite(tiny_config())
    alloc = {u: (2, 3, 4, 8, 16)[i % 5] for i, u in enumerate(units(m))}
    q = quantize_allocation(copy.deepcopy(m), alloc, 8)
    sha = file_sha256(tok_dir / "tokenizer.json")
    paths = {}
    for k in ("mixed", "fused"):
        paths[k] = tmp_path / f"{k}.safetensors"
        save_checkpoint(paths[k], q, kind=k, tokenizer_sha256=sha, quant=mixed_config(alloc, 8, m),
                        meta={"runtime": {"backend": "eager"}} if k == "fused" else None)
    outs = {}
    for k, p in paths.items():
        assert main(_gen(p, tok_dir, "--temperature", "0", "--max-new-tokens", "12")) == 0
        outs[k] = capsys.readouterr().out
    assert outs[kind].startswith("Once upon a time") and outs["mixed"] == outs["fused"]

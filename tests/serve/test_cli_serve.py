"""`iteralite serve`'s arguments: a bad one is one `iteralite: error:` line before anything loads."""
import pytest

from iteralite.cli import main


@pytest.mark.parametrize("args,msg", [
    (["--workers", "0"], "--workers must be in [1, 256], got 0"),
    (["--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["--queue", "-1"], "--queue must be in [0, 100000], got -1"),
    (["--max-tokens", "100", "--context", "50"], "--max-tokens (100) must be <= --context (50)"),
])
def test_bad_serve_arguments_are_one_line_before_loading(tmp_path, capsys, args, msg):
    # The checkpoint does not exist: the argument error must come first.
    assert main(["serve", "--checkpoint", str(tmp_path / "none.safetensors"), *args]) == 2
    err = capsys.readouterr().err
    assert err == f"iteralite: error: {msg}\n"


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "none.safetensors"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("iteralite: error: ") and err.count("\n") == 1


def test_serve_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--tokenizer", "--host", "--port", "--workers", "--queue", "--runtime"):
        assert flag in out

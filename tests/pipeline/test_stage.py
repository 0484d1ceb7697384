"""The stage runner: a user error is one line on stderr and exit 2; an interrupt exits 130; other
exceptions are bugs and keep their traceback."""
from __future__ import annotations

import json
import sys

import pytest

from iteralite.io.errors import CheckpointError, ParamsError
from iteralite.pipeline.stage import ratio_arg, run, write_metrics


@pytest.mark.parametrize("err", [ParamsError("params: 'train.lr' must be > 0"), CheckpointError("x.safetensors: truncated")])
def test_user_error_is_one_line_and_exit_2(capsys, err):
    def main():
        raise err

    with pytest.raises(SystemExit) as exit_:
        run("train", main)
    assert exit_.value.code == 2
    out = capsys.readouterr()
    assert out.err == f"[train] error: {err}\n" and "done" not in out.out


def test_interrupt_exits_130_quietly(capsys):
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        run("qat", main)
    assert exit_.value.code == 130 and capsys.readouterr().err == "[qat] interrupted\n"


def test_a_bug_is_not_hidden():
    def main():
        raise ZeroDivisionError("bug")

    with pytest.raises(ZeroDivisionError):
        run("int4", main)


def test_success_prints_done_and_metrics_are_json(tmp_path, capsys):
    path = tmp_path / "m.json"
    run("data", lambda: write_metrics(str(path), {"a": 1.5}))
    assert json.loads(path.read_text()) == {"a": 1.5}
    assert capsys.readouterr().out.splitlines()[-1].startswith("[data] done in ")


def test_ratio_arg(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["stages/prune.py", "0.4"])
    assert ratio_arg([0.1, 0.4], "stages/prune.py") == ("0.4", 0.4)
    for argv, match in ((["s"], "usage: python stages/prune.py RATIO"), (["s", "x"], "'x' is not a number"),
                        (["s", "0.3"], "0.3 is not in prune.ratios")):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(ParamsError, match=match):
            ratio_arg([0.1, 0.4], "stages/prune.py")

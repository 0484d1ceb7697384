"""The stage runner: a user error is one line on stderr and exit 2; an interrupt exits 130; other
exceptions are bugs and keep their traceback. Before the stage's main, its output folders (from
dvc.yaml) are created and checked for writability; a disk refusing a write is one line too."""
from __future__ import annotations

import errno
import json
import os
import sys

import pytest

from iteralite.io.atomic import atomic_path, write_text
from iteralite.io.errors import CheckpointError, ParamsError
from iteralite.pipeline import stage
from iteralite.pipeline.stage import output_dirs, ratio_arg, run, write_metrics

DVC_YAML = """\
stages:
  train:
    cmd: python stages/train.py
    outs:
      - checkpoints/fp32.safetensors
    metrics:
      - metrics/train.json:
          cache: false
    plots:
      - plots/train_curve.csv:
          cache: false
  tokenizer:
    cmd: python stages/tokenizer.py
    outs:
      - data/tokenizer
  prune:
    matrix:
      ratio: [0.1, 0.4]
    cmd: python stages/prune.py ${item.ratio}
    outs:
      - checkpoints/prune/${item.ratio}.safetensors
    metrics:
      - metrics/prune_${item.ratio}.json:
          cache: false
"""


def _assert_one_error_line(capsys, main, msg: str) -> None:
    """`run("train", main)` exits 2 printing exactly `[train] error: <msg>` and no "done"."""
    with pytest.raises(SystemExit) as exit_:
        run("train", main)
    assert exit_.value.code == 2
    out = capsys.readouterr()
    assert out.err == f"[train] error: {msg}\n" and "done" not in out.out


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Every test runs in an empty folder: run() never touches the repository's output folders."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def repo(in_tmp):
    (in_tmp / "dvc.yaml").write_text(DVC_YAML)
    return in_tmp


@pytest.mark.parametrize("err", [ParamsError("params: 'train.lr' must be > 0"), CheckpointError("x.safetensors: truncated")])
def test_user_error_is_one_line_and_exit_2(capsys, err):
    def main():
        raise err

    _assert_one_error_line(capsys, main, str(err))


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


def test_output_folders_are_created_before_main(repo):
    seen = []
    run("train", lambda: seen.append(sorted(p.name for p in repo.iterdir() if p.is_dir())))
    assert seen == [["checkpoints", "metrics", "plots"]]
    # a templated output counts by the folder before its template
    assert output_dirs("prune") == [stage.Path("checkpoints/prune"), stage.Path("metrics")]
    run("prune", lambda: None)
    assert (repo / "checkpoints" / "prune").is_dir()
    assert not [p for p in repo.rglob("*") if p.is_file() and p.name != "dvc.yaml"]  # the probe left nothing


def test_an_existing_output_folder_is_checked_too(repo):
    (repo / "data" / "tokenizer").mkdir(parents=True)
    assert output_dirs("tokenizer") == [stage.Path("data"), stage.Path("data/tokenizer")]


def test_no_dvc_yaml_skips_the_check(in_tmp):
    run("train", lambda: None)
    assert list(in_tmp.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_stops_the_stage_before_main(repo, capsys):
    (repo / "metrics").mkdir()
    (repo / "metrics").chmod(0o555)
    called = []
    try:
        with pytest.raises(SystemExit) as exit_:
            run("train", lambda: called.append(1))
    finally:
        (repo / "metrics").chmod(0o755)
    assert exit_.value.code == 2 and not called
    assert capsys.readouterr().err == "[train] error: cannot write metrics: permission denied (read-only file system?)\n"


@pytest.mark.parametrize("fault", ["no_access", "read_only_mount"])
def test_unwritable_output_folder_is_one_line_even_as_root(repo, capsys, monkeypatch, fault):
    """As root, os.access says yes even on a read-only mount: creating a probe file is what tells."""
    if fault == "no_access":
        monkeypatch.setattr(stage.os, "access", lambda path, mode: not str(path).endswith("plots"))
    else:
        def read_only(*a, dir=None, **k):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        monkeypatch.setattr(stage.tempfile, "TemporaryFile", read_only)
    called = []
    with pytest.raises(SystemExit) as exit_:
        run("train", lambda: called.append(1))
    assert exit_.value.code == 2 and not called
    bad = "plots" if fault == "no_access" else "checkpoints"
    assert capsys.readouterr().err == f"[train] error: cannot write {bad}: permission denied (read-only file system?)\n"


@pytest.mark.parametrize("code,msg", [(errno.ENOSPC, "cannot write checkpoints/fp32.safetensors: No space left on device"),
                                      (errno.EDQUOT, "cannot write checkpoints/fp32.safetensors: Disk quota exceeded"),
                                      (errno.EROFS, "cannot write checkpoints/fp32.safetensors: Read-only file system"),
                                      (errno.EACCES, "cannot access checkpoints/fp32.safetensors: Permission denied")])
def test_disk_errors_during_main_are_one_line(capsys, code, msg):
    def main():
        raise OSError(code, os.strerror(code), "checkpoints/fp32.safetensors")

    _assert_one_error_line(capsys, main, msg)


class SafetensorError(Exception):
    """Stands in for safetensors' Rust error type (same name, same message format)."""


@pytest.mark.parametrize("fault", [
    OSError(errno.ENOSPC, "No space left on device"),  # a write(): the OS names no file
    OSError("100000 requested and 8176 written"),  # numpy's np.save on a full disk: no errno
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
])
def test_full_disk_inside_an_atomic_write_names_the_output(capsys, fault):
    def main():
        with atomic_path("checkpoints/fp32.safetensors") as tmp:
            assert tmp.exists()
            raise fault

    with pytest.raises(SystemExit) as exit_:
        run("train", main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "[train] error: cannot write checkpoints/fp32.safetensors: No space left on device\n"
    assert os.listdir("checkpoints") == []  # atomic_path removed its temporary file


def test_full_disk_in_write_text(capsys, monkeypatch):
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(stage.Path, "write_text", full)
    with pytest.raises(SystemExit):
        run("train", lambda: write_text("metrics/train.json", "{}"))
    assert capsys.readouterr().err == "[train] error: cannot write metrics/train.json: No space left on device\n"


def test_full_disk_at_fsync_names_the_output(capsys, monkeypatch):
    """A full disk can surface only when the data is flushed, inside atomic_path itself."""
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(SystemExit):
        run("train", lambda: write_text("plots/train_curve.csv", "step\n"))
    assert capsys.readouterr().err == "[train] error: cannot write plots/train_curve.csv: No space left on device\n"


def test_other_os_errors_are_bugs_with_a_traceback():
    def main():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x.json")

    with pytest.raises(FileNotFoundError):
        run("train", main)


def test_under_torchrun_rank_0_says_done_and_another_rank_names_itself(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    run("data", lambda: None)
    assert "[data] done in" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "1")
    run("data", lambda: None)
    assert capsys.readouterr().out == ""  # one "done" line per run, from rank 0

    def bad():
        raise ParamsError("params: 'train.lr' must be > 0")
    with pytest.raises(SystemExit) as e:
        run("data", bad)
    assert e.value.code == 2 and capsys.readouterr().err == "[data rank 1] error: params: 'train.lr' must be > 0\n"


def test_a_rank_whose_peer_left_stops_with_one_line_and_rank_0_keeps_a_bugs_traceback(monkeypatch, capsys):
    def peer_left():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:123")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        run("data", peer_left)
    assert e.value.code == 1
    assert capsys.readouterr().err == "[data rank 1] stopped: another process of the run failed\n"
    monkeypatch.setenv("RANK", "0")  # rank 0 has no peer to blame: a bug keeps its traceback
    with pytest.raises(RuntimeError, match="Connection closed"):
        run("data", peer_left)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ZeroDivisionError):  # and so does a plain bug on any rank
        run("data", lambda: 1 / 0)


# --- output locations and stale temporaries, checked before any work -----------------------------

@pytest.mark.parametrize("stage_name,make,msg", [
    # a folder output replaced by a file: the stage used to fail at its first write into it, after its work
    ("tokenizer", lambda r: (r / "data").mkdir() or (r / "data" / "tokenizer").write_text("x"),
     "cannot write data/tokenizer: data/tokenizer is a file, not a folder; move it away or delete it"),
    # a file output that is a folder: os.replace failed at the very end
    ("train", lambda r: (r / "checkpoints" / "fp32.safetensors").mkdir(parents=True),
     "cannot write checkpoints/fp32.safetensors: it is a folder, not a file; move it away or delete it"),
    ("prune", lambda r: (r / "checkpoints").write_text("x"),
     "cannot write checkpoints/prune/${item.ratio}.safetensors: checkpoints is a file, not a folder; "
     "move it away or delete it"),
])
def test_a_file_or_folder_in_an_outputs_place_stops_the_stage_before_main(repo, capsys, stage_name, make, msg):
    make(repo)
    called = []
    with pytest.raises(SystemExit) as exit_:
        run(stage_name, lambda: called.append(1))
    assert exit_.value.code == 2 and not called
    assert capsys.readouterr().err == f"[{stage_name}] error: {msg}\n"


def test_an_output_folder_linked_out_of_the_repository_stops_the_stage_before_main(repo, tmp_path_factory, capsys):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (repo / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    called = []
    with pytest.raises(SystemExit) as exit_:
        run("train", lambda: called.append(1))
    assert exit_.value.code == 2 and not called
    assert capsys.readouterr().err == (
        "[train] error: cannot write checkpoints/fp32.safetensors: checkpoints leads to "
        f"{elsewhere.resolve()}, outside the repository (DVC tracks outputs inside it only); "
        "make checkpoints a folder in the repository\n")
    assert list(elsewhere.iterdir()) == []


def test_a_link_inside_the_repository_is_accepted(repo):
    (repo / "store").mkdir()
    (repo / "checkpoints").symlink_to(repo / "store", target_is_directory=True)
    run("train", lambda: None)


def test_temporaries_of_killed_writes_are_removed_before_main(repo, capsys):
    """SIGKILL in atomic_path leaves `.<name>.<random>.tmp`: in a folder output DVC would hash it.
    Only the stage's own outputs' temporaries go; other files stay."""
    tok = repo / "data" / "tokenizer"
    (tok / "sub").mkdir(parents=True)
    (repo / "checkpoints").mkdir()
    (repo / "metrics").mkdir()
    stale = [tok / ".train.npy.k3j_x9.tmp", tok / "sub" / ".a.json.q1.tmp",
             repo / "checkpoints" / ".fp32.safetensors.abc123.tmp", repo / "metrics" / ".train.json.zz9.tmp"]
    kept = [tok / "tokenizer.json", repo / "data" / ".other.json.x1.tmp",  # not an output of tokenizer
            repo / "checkpoints" / ".qat.safetensors.abc123.tmp",  # another stage's output
            repo / "checkpoints" / "notes.tmp"]
    for f in stale + kept:
        f.write_text("x")
    seen = []
    run("tokenizer", lambda: seen.append(sorted(p.name for p in tok.rglob("*") if p.is_file())))
    assert seen == [["tokenizer.json"]]
    run("train", lambda: None)
    assert [f for f in stale if f.exists()] == [] and all(f.exists() for f in kept)
    assert "removed checkpoints/.fp32.safetensors.abc123.tmp (the temporary file of a write that was killed)" \
        in capsys.readouterr().out


def test_templated_outputs_temporaries_are_removed(repo):
    (repo / "checkpoints" / "prune").mkdir(parents=True)
    stale = repo / "checkpoints" / "prune" / ".0.4.safetensors.r4nd0m.tmp"
    stale.write_text("x")
    run("prune", lambda: None)
    assert not stale.exists()


# --- timing-free quality records -------------------------------------------------------------

def test_write_metrics_quality_record_drops_timings(tmp_path):
    metrics = {"val_ppl": 13.5, "size_bytes": 10, "train_seconds": 788.9, "threads": 2, "resumed_from_step": 3,
               "speed": {"decode_tok_s_fp32": 470.2}, "finetune": {"seconds": 1.0, "steps": 4},
               "methods": {"gptq": {"val_ppl": 14.0, "prefill_ms_128": 2.9}}}
    write_metrics(str(tmp_path / "train.json"), metrics)
    assert not (tmp_path / "quality").exists()  # only on request
    write_metrics("metrics/train.json", metrics, quality=True)
    assert json.loads(open("metrics/train.json").read()) == metrics
    assert json.loads(open("metrics/quality/train.json").read()) == {
        "val_ppl": 13.5, "size_bytes": 10, "finetune": {"steps": 4}, "methods": {"gptq": {"val_ppl": 14.0}}}


def test_a_write_killed_by_sigkill_leaves_a_temporary_that_the_next_run_removes(repo):
    import subprocess

    from tests.conftest import REPO

    code = ("import os, signal\nfrom iteralite.io.atomic import atomic_path\n"
            "with atomic_path('data/tokenizer/train.npy') as tmp:\n"
            "    tmp.write_bytes(b'half')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=repo, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == -9
    left = list((repo / "data" / "tokenizer").iterdir())
    assert len(left) == 1 and left[0].name.startswith(".train.npy.")
    run("tokenizer", lambda: None)
    assert list((repo / "data" / "tokenizer").iterdir()) == []

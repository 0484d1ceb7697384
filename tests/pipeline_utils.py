"""Temporary clones of the repository for tests that run the real stages and `dvc repro`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def raw_data() -> Path:
    for cand in (REPO / "data" / "raw", REPO.parent / "shared" / "data"):
        if (cand / "tinystories" / "train.txt").exists():
            return cand
    pytest.fail("no raw data: run `dvc pull` (make test does) or put ../shared beside the repository")


def clone_env(dst: Path) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(dst), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def run(args, cwd, env, check=True):
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def make_clone(dst: Path, params: str) -> Path:
    """Copy the tracked (and new, unignored) files to `dst`, make it a git repo, add the raw data
    (as `dvc pull` would) and the built native library (as `make setup` would) and write `params` as params.yaml. Committed results are left out."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file() and not f.startswith(("data/raw/", "metrics/", "plots/")) and f != "dvc.lock":
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    (dst / "params.yaml").write_text(params)
    env = clone_env(dst)
    run(["git", "init", "-q"], dst, env)
    run(["git", "add", "-A"], dst, env)
    run(["git", "commit", "-q", "-m", "test clone"], dst, env)
    shutil.copytree(raw_data(), dst / "data" / "raw", dirs_exist_ok=True)
    from iteralite.runtime.native.runtime import library_path
    lib = library_path()  # the setup's build of the native step (ignored by git), as a clone's setup builds it
    if lib is not None:
        shutil.copy2(lib, dst / Path(lib).resolve().relative_to(REPO.resolve()))
    return dst


def tiny_clone(tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the repository (tracked and new files), a git repo, the raw data, the tiny params
    (tests/tiny_params.yaml), and the environment to run its stages in."""
    dst = make_clone(tmp_path_factory.mktemp("clone") / "repo", (REPO / "tests" / "tiny_params.yaml").read_text())
    return dst, clone_env(dst)

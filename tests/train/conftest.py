"""Fixtures for the training tests: a dvclive folder that cannot reach the network or a repository."""
from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest


def offline_live(tmp_path: Path, monkeypatch) -> Path:
    """A folder for dvclive loggers, with the current directory moved there (no DVC or Git
    repository above it: dvclive looks for one from the current directory), DVC Studio off, and
    every network connection refused, so a test fails if dvclive tries one."""
    root = tmp_path / "live"
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("DVC_STUDIO_OFFLINE", "true")
    for var in ("DVC_STUDIO_TOKEN", "STUDIO_TOKEN", "DVC_ROOT", "DVC_EXP_BASELINE_REV", "DVC_EXP_NAME",
                "DVCLIVE_TEST", "DVCLIVE_RESUME"):
        monkeypatch.delenv(var, raising=False)

    def refuse(self, address, *a, **k):
        raise AssertionError(f"dvclive tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    return root


@pytest.fixture
def live_root(tmp_path, monkeypatch) -> Path:
    """`offline_live` as a fixture."""
    return offline_live(tmp_path, monkeypatch)


def read_tsv(path: Path) -> list[tuple[int, float]]:
    """(step, value) rows of a dvclive plots/metrics/*.tsv file."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0][0] == "step", rows[0]
    return [(int(r[0]), float(r[1])) for r in rows[1:]]


def read_live(directory: Path) -> tuple[dict, dict]:
    """({relative tsv path: rows}, metrics.json) of a dvclive folder."""
    plots = directory / "plots" / "metrics"
    tsvs = {p.relative_to(plots).as_posix(): read_tsv(p) for p in sorted(plots.rglob("*.tsv"))}
    return tsvs, json.loads((directory / "metrics.json").read_text())

"""The standalone command-line runtime `itl-run` (itl_run.c, linked by setup.py next to this file)
from Python: where it is, and one run's output and speed, for the tests and the benchmark.

`run` calls the binary with the given flags and returns (the generated ids, or the text it printed,
and tok/s from its stderr stats line); a nonzero exit raises ItlRunError with its one-line message."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from iteralite.io.errors import IteraliteError

_HERE = Path(__file__).resolve().parent
NAME = "itl-run.exe" if os.name == "nt" else "itl-run"
STATS = re.compile(r"^itl-run: (\d+) tokens in ([0-9.]+) ms, ([0-9.]+) tok/s \(prompt (\d+) tokens, ([0-9.]+) ms\)$")


class ItlRunError(IteraliteError):
    """itl-run is not built, or exited nonzero (the message is its error line)."""


def binary_path() -> str | None:
    """The built itl-run executable next to this module, or None when setup did not build it."""
    path = _HERE / NAME
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def parse_stats(stderr: str) -> dict:
    """itl-run's last stderr line -> {"tokens", "ms", "tok_s", "prompt_tokens", "prompt_ms"}."""
    lines = stderr.strip().splitlines()
    m = STATS.match(lines[-1]) if lines else None
    if m is None:
        raise ItlRunError(f"itl-run printed no stats line (stderr: {stderr.strip()[-200:]!r})")
    return {"tokens": int(m[1]), "ms": float(m[2]), "tok_s": float(m[3]), "prompt_tokens": int(m[4]),
            "prompt_ms": float(m[5])}


def command(artifact, tokenizer, prompt: str = "Once upon a time", n: int = 200, *, temperature: float = 0.8,
            top_k: int = 0, top_p: float = 0.9, seed: int = 1, ids: bool = True, exact: bool = False) -> list[str]:
    """The argv of one itl-run call (exact: `--exact`, float activations)."""
    path = binary_path()
    if path is None:
        raise ItlRunError(f"itl-run is not built here (no {NAME} in {_HERE}); run the README's setup "
                          "(`make setup`, needs a C compiler)")
    argv = [path, str(artifact), str(tokenizer), "-p", prompt, "-n", str(n), "-t", repr(float(temperature)),
            "-k", str(top_k), "--top-p", repr(float(top_p)), "-s", str(seed)]
    return argv + (["--ids"] if ids else []) + (["--exact"] if exact else [])


def run(artifact, tokenizer, prompt: str = "Once upon a time", n: int = 200, *, temperature: float = 0.8,
        top_k: int = 0, top_p: float = 0.9, seed: int = 1, ids: bool = True, exact: bool = False,
        timeout: float | None = None) -> tuple[list[int] | str, float]:
    """(the generated ids, or with ids=False the printed text: prompt + story, and tok/s)."""
    argv = command(artifact, tokenizer, prompt, n, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, ids=ids, exact=exact)
    p = subprocess.run(argv, capture_output=True, timeout=timeout)
    err = p.stderr.decode("utf-8", "replace")
    if p.returncode != 0:
        line = (err.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        raise ItlRunError(line)
    tok_s = parse_stats(err)["tok_s"]
    out = p.stdout.decode("utf-8", "replace")
    out = out[:-1] if out.endswith("\n") else out
    if not ids:
        return out, tok_s
    return [int(x) for x in out.split()], tok_s

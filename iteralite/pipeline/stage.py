"""Shared plumbing for the thin scripts in stages/: clean error exits and metric files."""
from __future__ import annotations

import sys
import time
from typing import Callable

from iteralite.io.errors import IteraliteError
from iteralite.io.atomic import write_json


def run(name: str, main: Callable[[], dict | None]) -> None:
    """Run a stage's main; an IteraliteError prints one clear line and exits with status 2."""
    t0 = time.perf_counter()
    try:
        main()
    except IteraliteError as e:
        print(f"[{name}] error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"[{name}] interrupted", file=sys.stderr)
        sys.exit(130)
    print(f"[{name}] done in {time.perf_counter() - t0:.1f}s")


def write_metrics(path: str, metrics: dict) -> None:
    write_json(path, metrics)
    print(f"wrote {path}")


def ratio_arg(ratios: list[float], script: str) -> tuple[str, float]:
    """The matrix item from the command line: the ratio as written (it names the outputs) and its value."""
    import sys

    from iteralite.io.errors import ParamsError

    if len(sys.argv) != 2:
        raise ParamsError(f"usage: python {script} RATIO (one of prune.ratios {ratios})")
    text = sys.argv[1]
    try:
        value = float(text)
    except ValueError:
        raise ParamsError(f"ratio {text!r} is not a number") from None
    if value not in ratios:
        raise ParamsError(f"ratio {text} is not in prune.ratios {ratios}")
    return text, value

"""Atomic file writes: a stage interrupted at any moment leaves either the old file or the new
one, never a half-written artifact that DVC could cache. The new file gets the mode any new file
gets (0o666 minus the umask), not the 0600 of `tempfile.mkstemp`."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator


def new_file_mode() -> int:
    """The permission bits `open(path, "w")` gives a new file: 0o666 without the process umask.

    Reads the umask from /proc (Linux) so no other thread ever sees a changed umask; elsewhere
    falls back to setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it gets the normal new-file mode, is fsynced
    and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), new_file_mode())  # mkstemp made it 0600; DVC outputs need normal modes
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj) -> None:
    """Strict JSON (no NaN or Infinity, which JSON does not have): a non-finite number means a
    diverged run, and nothing is written."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    except ValueError:
        from iteralite.io.errors import DivergedError
        raise DivergedError(f"{path}: a value is NaN or infinite (the run diverged); nothing was written") from None
    write_text(path, text + "\n")

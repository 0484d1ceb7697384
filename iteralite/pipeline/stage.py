"""Shared plumbing for the thin scripts in stages/: clean error exits, an early check that the
stage can write its outputs, and metric files."""
from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from iteralite.io.errors import IteraliteError
from iteralite.io.atomic import write_json
from iteralite.pipeline import headline
from iteralite.pipeline.dvcfile import DVC_YAML, stage_outputs

# OS errors that mean "the disk refuses this write": one line for the user, not a traceback.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_WRITE_ONLY_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # never raised by a read
# safetensors (Rust) reports an I/O failure as "... (os error 28)" inside its own exception type.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# numpy's np.save on a full disk: a short write, "OSError: 100000 requested and 8176 written", no errno.
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
# atomic_path's temporary file: tempfile.mkstemp(prefix=".<name>.", suffix=".tmp"); the random part has no dot.
_ATOMIC_TMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


def run(name: str, main: Callable[[], dict | None]) -> None:
    """Run a stage's main; an IteraliteError, or a disk that refuses a write (full, read-only,
    no permission), prints one clear line and exits with status 2. Before `main`, the folders of
    the stage's outputs (as dvc.yaml lists them) are created and checked for writability, so a
    read-only folder stops the stage before its expensive work. Under torchrun (RANK set) the
    "done" line comes from rank 0 only and another rank's error line names its rank."""
    t0 = time.perf_counter()
    rank = os.environ.get("RANK", "0")
    label = name if rank == "0" else f"{name} rank {rank}"
    try:
        check_outputs_writable(name)
        main()
    except IteraliteError as e:
        _fail(label, str(e))
    except KeyboardInterrupt:
        print(f"[{label}] interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        message = disk_error_message(e)
        if message is None and rank != "0" and _peer_gone(e):
            # another process of the data-parallel run stopped first and said why in its own line
            print(f"[{label}] stopped: another process of the run failed", file=sys.stderr)
            sys.exit(1)
        if message is None:
            raise  # a bug: keep its traceback
        _fail(label, message)
    if rank == "0":
        print(f"[{label}] done in {time.perf_counter() - t0:.1f}s")


def _peer_gone(e: BaseException) -> bool:
    """A collective that failed because a peer process left (torch.distributed's errors, gloo's
    "Connection closed by peer")."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"DistError", "DistNetworkError", "DistBackendError", "DistStoreError"}) or \
        "Connection closed by peer" in str(e) or "Connection reset by peer" in str(e)


def _fail(name: str, message: str) -> None:
    print(f"[{name}] error: {message}", file=sys.stderr)
    sys.exit(2)


def output_dirs(name: str, dvc_yaml: str | Path = DVC_YAML) -> list[Path]:
    """The folders stage `name` writes into: each output's parent and each existing output folder.
    A templated output (`checkpoints/prune/${item.ratio}.safetensors`) counts by the folder before
    its template. [] when there is no dvc.yaml (a stage function run outside the repository)."""
    if not Path(dvc_yaml).exists():
        return []
    dirs: list[Path] = []
    for out in stage_outputs(name, dvc_yaml):
        templated = "${" in out
        path = Path(out.split("${", 1)[0] + "x") if templated else Path(out)
        cands = [path.parent] + ([path] if not templated and path.is_dir() else [])
        dirs.extend(d for d in cands if d not in dirs)
    return dirs


def check_outputs_writable(name: str, dvc_yaml: str | Path = DVC_YAML) -> None:
    """Create the stage's output folders if missing and make sure a file can be created in each;
    an IteraliteError "cannot write <dir>: ..." otherwise."""
    for d in output_dirs(name, dvc_yaml):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if not os.access(d, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(d))
            with tempfile.TemporaryFile(dir=d, prefix=".iteralite-write-check."):
                pass  # root passes os.access even on a read-only mount: only creating a file tells
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                reason = "permission denied (read-only file system?)"
            else:
                reason = os.strerror(e.errno) if e.errno else str(e)
            raise IteraliteError(f"cannot write {d}: {reason}") from None


def disk_error_message(e: BaseException) -> str | None:
    """'cannot write <file>: No space left on device' when `e` is a disk refusing a write (an
    OSError with a disk errno, numpy's short write, safetensors' "(os error N)"); else None."""
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        code = e.errno
    elif isinstance(e, OSError) and e.errno is None and _SHORT_WRITE.search(str(e)):
        code = errno.ENOSPC  # numpy's short write: the disk took fewer bytes than written
    elif type(e).__name__ == "SafetensorError" and (m := _RUST_OS_ERROR.search(str(e))) \
            and int(m.group(1)) in DISK_ERRNOS:
        code = int(m.group(1))
    else:
        return None
    written = _file_being_written(e)
    target = written or getattr(e, "filename", None) or getattr(e, "filename2", None)
    verb = "write" if written or code in _WRITE_ONLY_ERRNOS else "access"
    return f"cannot {verb} {target or 'an output'}: {os.strerror(code)}"


def _file_being_written(e: BaseException) -> str | None:
    """The output a failed write was for. OS write errors rarely carry a file name, but every stage
    output goes through `io.atomic.atomic_path`, whose temporary file `.<name>.<random>.tmp` is a
    local of some frame of the traceback: the innermost one names the output."""
    found = None
    tb = e.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, (str, os.PathLike)) and (m := _ATOMIC_TMP.match(os.path.basename(value))):
                found = os.path.join(os.path.dirname(value), m.group("name"))
        tb = tb.tb_next
    if found is not None and os.path.isabs(found):  # mkstemp gives absolute paths; dvc.yaml's are relative
        rel = os.path.relpath(found)
        found = found if rel.startswith("..") else rel
    return found


def write_metrics(path: str, metrics: dict) -> None:
    """The stage's whole result to `path` (its contract) and, for a stage in the headline registry,
    the numbers people compare to `metrics/headline/<name>` (what dvc.yaml declares as metrics)."""
    write_json(path, metrics)
    print(f"wrote {path}")
    top = headline.select(headline.stage_of(path), metrics)
    if top is not None:
        target = headline.headline_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json(target, top)


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

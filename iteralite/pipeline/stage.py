"""Shared plumbing for the thin scripts in stages/: clean error exits, an early check of the places
the stage writes its outputs (and removal of temporaries a killed write left there), and metric
files, with timing-free quality records for the stages downstream."""
from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

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

# Timing-free copies of stage results (`write_metrics(..., quality=True)`): what later stages read.
# A full metrics file holds measurements of one run (seconds, tokens/s, memory, threads), so a forced
# rerun with nothing changed rewrites it; a stage that depended on it would then be out of date.
# Every metrics file a stage may depend on lies here (`holds_timings`).
QUALITY_DIR = "metrics/quality"
PARAMS_CHECKED = f"{QUALITY_DIR}/check_params.json"  # the check_params stage's output; `data` depends on it
TRAIN_QUALITY = f"{QUALITY_DIR}/train.json"  # the FP32 baseline's val_ppl, size_bytes, ... (load_baseline)
# Key names of such measurements, at any depth; `quality_record` drops them (and what is under them).
TIMING_KEY = re.compile(r"(^|_)(seconds|ms|tok_s|per_s|speed|speedup|threads?|rss|mb|mib|hotspots)(_|$)"
                        r"|^resumed_from_step$|^\d*threads?$")


def run(name: str, main: Callable[[], dict | None]) -> None:
    """Run a stage's main; an IteraliteError, or a disk that refuses a write (full, read-only,
    no permission), prints one clear line and exits with status 2. Before `main`, the places of
    the stage's outputs (as dvc.yaml lists them) are checked (`check_outputs`), so a read-only
    folder, a file in a folder's place or a link out of the repository stops the stage before its
    expensive work. Under torchrun (RANK set) the
    "done" line comes from rank 0 only and another rank's error line names its rank."""
    t0 = time.perf_counter()
    rank = os.environ.get("RANK", "0")
    label = name if rank == "0" else f"{name} rank {rank}"
    try:
        check_outputs(name)
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


def _out_pattern(out: str) -> re.Pattern:
    """An output as dvc.yaml writes it, as a regex over paths (a `${...}` template: any name)."""
    return re.compile("[^/]+".join(re.escape(part) for part in re.split(r"\$\{[^}]*\}", out)))


def check_outputs(name: str, dvc_yaml: str | Path = DVC_YAML) -> None:
    """Before any work: every output of the stage must lie inside the repository (no folder on its
    way a link out of it) with folders, not files, on its way; its folders are created and must take
    a new file (`check_outputs_writable`); temporaries that a killed write left among its outputs are
    removed (DVC would hash them into a folder output). An IteraliteError names the path otherwise."""
    if not Path(dvc_yaml).exists():
        return
    root = Path(dvc_yaml).resolve().parent
    outs = stage_outputs(name, dvc_yaml)
    for out in outs:
        templated = "${" in out
        path = Path(out.split("${", 1)[0] + "x").parent if templated else Path(out)
        # dvc.yaml does not say which outputs are folders: here a name without a suffix is one
        # (data/tokenizer, checkpoints/int4), one with a suffix a file (metrics/train.json).
        is_file = not templated and bool(path.suffix)
        for part in reversed([path, *path.parents][:-1]):  # checkpoints, then checkpoints/int4, ...
            if part.is_symlink() and not (part == path and is_file):  # a file may link into DVC's cache
                target = part.resolve()
                if not target.is_relative_to(root):
                    raise IteraliteError(f"cannot write {out}: {part} leads to {target}, outside the repository "
                                         f"(DVC tracks outputs inside it only); make {part} a folder in the repository")
            if part.exists() and not part.is_dir() and not (part == path and is_file):
                raise IteraliteError(f"cannot write {out}: {part} is a file, not a folder; move it away or delete it")
        if is_file and path.is_dir() and not path.is_symlink():
            raise IteraliteError(f"cannot write {out}: it is a folder, not a file; move it away or delete it")
    check_outputs_writable(name, dvc_yaml)
    if os.environ.get("RANK", "0") == "0":  # one process cleans (another rank may already be writing)
        remove_stale_temporaries(outs, output_dirs(name, dvc_yaml))


def remove_stale_temporaries(outs: list[str], dirs: list[Path]) -> list[Path]:
    """Delete atomic_path's temporaries (`.<name>.<random>.tmp`) of these outputs (in their folders,
    and anywhere inside a folder output): what a write killed by SIGKILL leaves. Others' files stay."""
    pats = [_out_pattern(o.rstrip("/")) for o in outs]
    removed = []
    for d in dirs:
        inside = any(p.fullmatch(d.as_posix()) for p in pats)  # a folder output: every temporary in it
        for f in (d.rglob(".*.tmp") if inside else d.glob(".*.tmp")):
            m = _ATOMIC_TMP.match(f.name)
            if m is None or not f.is_file():
                continue
            target = (f.parent / m.group("name")).as_posix()
            if inside or any(p.fullmatch(target) for p in pats):
                f.unlink()
                removed.append(f)
                print(f"removed {f} (the temporary file of a write that was killed)")
    return removed


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


def holds_timings(output: str) -> bool:
    """Whether a stage output, as dvc.yaml names it, may hold measurements of one run, so that no
    stage may depend on it: every metrics file (headline ones too) but the quality records, and
    dvclive's step logs (tokens/s)."""
    return output.startswith(("metrics/", "dvclive/")) and not output.startswith(QUALITY_DIR + "/")


def quality_path(path: str | Path) -> Path:
    """metrics/train.json -> metrics/quality/train.json."""
    return Path(QUALITY_DIR) / Path(path).name


def quality_record(metrics):
    """`metrics` without its measurements of one run (TIMING_KEY names, at any depth)."""
    if isinstance(metrics, dict):
        return {k: quality_record(v) for k, v in metrics.items() if not TIMING_KEY.search(str(k))}
    if isinstance(metrics, list):
        return [quality_record(v) for v in metrics]
    return metrics


def write_metrics(path: str, metrics: dict, *, quality: bool = False) -> None:
    """The stage's whole result to `path` (its contract) and, for a stage in the headline registry,
    the numbers people compare to `metrics/headline/<name>` (what dvc.yaml declares as metrics).
    quality=True: also its timing-free record at `quality_path(path)`, the file later stages read
    (and depend on): a forced rerun that changes only timings leaves it byte-identical."""
    write_json(path, metrics)
    print(f"wrote {path}")
    if quality:
        write_json(quality_path(path), quality_record(metrics))
    top = headline.select(headline.stage_of(path), metrics)
    if top is not None:
        target = headline.headline_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json(target, top)


def target_arg(targets, script: str) -> str:
    """The student target named on the command line (default: the headline)."""
    import sys

    from iteralite.io.errors import ParamsError

    if len(sys.argv) > 2:
        raise ParamsError(f"usage: python {script} [TARGET] (one of student.targets: {', '.join(targets)})")
    name = sys.argv[1] if len(sys.argv) == 2 else "headline"
    if name not in targets:
        raise ParamsError(f"target {name!r} is not in student.targets ({', '.join(targets)})")
    return name


def run_for_target(stage: str, script: str, targets: Callable[[], Iterable[str]],
                   main: Callable[[str], None]) -> None:
    """Run `main(target)` as the stage of the student target named on the command line
    (`<stage>` for the headline, `<stage>_<target>` otherwise); a bad target is one line, exit 2."""
    from iteralite.pipeline.paths import target_stage

    try:
        target = target_arg(targets(), script)
    except IteraliteError as e:
        _fail(stage, str(e))
    run(target_stage(stage, target), lambda: main(target))


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

"""`python -m iteralite.train.torchrun ARGS`: torchrun, with our failure report.

The same launcher as the `torchrun` command (`torch.distributed.run`: the same arguments, the same
`--standalone` rendezvous, the same environment for the workers), called as a function, so that a
worker that failed with our one-line error is reported by that line alone. The `torchrun` command
follows it with an error log line, its own Python traceback and a ChildFailedError box, and turns
the worker's exit status 2 into 1. Here the status of the first failed worker is passed on; a
worker that died of anything else gets one line naming its rank and status.

`dvc.yaml`'s train stage runs `python -m iteralite.train.torchrun --standalone --nproc-per-node
${train.nproc} stages/train.py`.
"""
from __future__ import annotations

import logging
import os
import sys

STAGE_ERROR = 2  # `pipeline.stage.run`'s status after printing its one-line error


def _quiet_elastic_logs() -> None:
    """torch.distributed's loggers each carry their own level: silence every one of them (the
    agent's failure and signal lines; the worker's own line says why)."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _threads_per_worker(nproc: int) -> None:
    """torchrun gives each of several workers OMP_NUM_THREADS=1 (and prints a banner saying so):
    split the cores between them instead, unless the caller chose."""
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from iteralite.train.dist import LAUNCHER_PID

    args = parse_args(argv)
    nproc = args.nproc_per_node
    if str(nproc).lstrip("-").isdigit() and int(nproc) < 1:  # torch's launcher would fail a bare assert
        print(f"[train] error: params: 'train.nproc' must be >= 1 (the processes torchrun starts), got {nproc}",
              file=sys.stderr)
        return STAGE_ERROR
    _threads_per_worker(int(nproc) if str(nproc).isdigit() else 1)
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the workers' parent: they die with it
    _quiet_elastic_logs()
    try:
        run(args)
        return 0
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code != STAGE_ERROR:
            print(f"[torchrun] worker rank {rank} failed with exit status {code}", file=sys.stderr)
        if code < 0:  # killed by signal -code
            return 128 - code
        return code if 0 < code < 256 else 1
    except SignalException as e:  # Ctrl-C or a kill reached the launcher; the workers were stopped
        print(f"[torchrun] stopped by {e.sigval.name}", file=sys.stderr)
        return 128 + int(e.sigval)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

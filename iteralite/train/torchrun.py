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
import sys

STAGE_ERROR = 2  # `pipeline.stage.run`'s status after printing its one-line error


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    elastic = logging.getLogger("torch.distributed.elastic")
    elastic.setLevel(logging.CRITICAL)  # its "failed (exitcode: 2)" line; the worker said why
    try:
        run(args)
        return 0
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code != STAGE_ERROR:
            print(f"[torchrun] worker rank {rank} failed with exit status {code}", file=sys.stderr)
        return code if 0 < code < 256 else 1
    except SignalException as e:  # Ctrl-C or a kill reached the launcher; the workers were stopped
        print(f"[torchrun] stopped by {e.sigval.name}", file=sys.stderr)
        return 128 + int(e.sigval)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Data-parallel plumbing for the train stage: the process's place in the world, its device, the
process group.

torchrun (`dvc.yaml`'s train cmd) starts one worker per device and gives each
RANK, WORLD_SIZE and LOCAL_RANK in its environment. A plain `python stages/train.py` has none of
them and runs as a world of one without any process group, so the single-process path is the code
it always was. With more than one process, `session` joins the group (gloo on CPU, nccl on CUDA)
and always leaves it, also on an error.

Devices (`train.device`): auto = CUDA when available, else CPU; each worker takes cuda:LOCAL_RANK.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

from iteralite.io.errors import ParamsError

DEVICES = ("auto", "cpu", "cuda")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistEnv:
    """This process's place: rank among world_size processes, local_rank on its machine, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """Whether a launcher (torchrun, `launch`) started this process: WORLD_SIZE is set."""
    return "WORLD_SIZE" in os.environ


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the environment torchrun sets; (0, 1, 0) without it."""
    if not launched():
        return 0, 1, 0
    try:
        rank, world, local = (int(os.environ.get(k, "0")) for k in _ENV)
    except ValueError:
        raise ParamsError("the environment's " + ", ".join(f"{k}={os.environ.get(k)!r}" for k in _ENV)
                          + " are not integers; start the stage with torchrun or plain python") from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise ParamsError(f"the environment's RANK={rank}, WORLD_SIZE={world} do not describe a process "
                          "of the world; start the stage with torchrun or plain python")
    return rank, world, local


def check_world(nproc: int, key: str = "train.nproc") -> None:
    """One line when the processes started are not the `nproc` the params ask for."""
    world = env_ranks()[1]
    if world != nproc:
        how = f"torchrun started {world}" if launched() else "this is a single process (no torchrun)"
        raise ParamsError(f"params: '{key}' = {nproc} but {how}; launch with "
                          f"`torchrun --standalone --nproc-per-node {nproc} ...` or set {key} to {world}")


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1, key: str = "train.device") -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> this process's torch.device; a ParamsError when CUDA is asked
    for and missing, or when there are fewer CUDA devices than processes."""
    if name not in DEVICES:
        raise ParamsError(f"params: '{key}' must be one of {', '.join(DEVICES)}; got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ParamsError(f"params: '{key}' is cuda but this machine has no usable CUDA device "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); set it to auto or cpu")
    count = torch.cuda.device_count()
    if world_size > count:
        raise ParamsError(f"params: '{key}' is cuda with {world_size} processes but the machine has {count} "
                          "CUDA device(s); one process per device: lower the process count")
    return torch.device("cuda", local_rank)


LAUNCHER_PID = "ITERALITE_LAUNCHER_PID"  # set by iteralite.train.torchrun for its workers


def die_with_launcher() -> None:
    """A torchrun worker runs in a session of its own, so killing the launcher (kill -9 of `dvc
    repro`'s process group) would leave it training on and writing outputs behind the next run's
    back. On Linux ask the kernel to SIGKILL this process when its parent dies, and stop at once if
    the parent is no longer the launcher (it died before the request took hold). Elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    launcher = os.environ.get(LAUNCHER_PID)
    if ok and launcher and os.getppid() != int(launcher):
        print("[train] the launcher is gone; stopping", file=sys.stderr)
        os._exit(1)


@contextmanager
def session(device: str = "auto") -> Iterator[DistEnv]:
    """This process's DistEnv; joins the process group for the `with` block when there is more
    than one process (backend gloo on CPU, nccl on CUDA) and destroys it on the way out."""
    rank, world, local = env_ranks()
    if launched():
        die_with_launcher()
    dev = resolve_device(device, local, world)
    if world > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    try:
        yield DistEnv(rank, world, local, dev)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def mean_over_ranks(values: list[torch.Tensor], env: DistEnv) -> list[float]:
    """Scalar tensors -> their mean over all processes as floats (one all-reduce); with one
    process just `.item()` of each."""
    if not env.distributed:
        return [v.item() for v in values]
    t = torch.stack([v.detach().float() for v in values])
    dist.all_reduce(t)
    return (t / env.world_size).tolist()


def broadcast_float(value: float, env: DistEnv, src: int = 0) -> float:
    """Rank `src`'s value on every process (float64, so it arrives exactly)."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.broadcast(t, src)
    return float(t.item())

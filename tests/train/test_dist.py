"""Data parallelism: the process's place from the environment, the device and its one-line errors,
two gloo processes against one process with the same global batch, and resuming under two processes."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from iteralite.io.errors import ParamsError
from iteralite.train import dist
from iteralite.train.evaluate import EvalConfig
from iteralite.train.loop import TrainConfig, train
from tests.conftest import tiny_config

pytestmark = pytest.mark.early  # compiles or spawns for a minute or more: handed out early (tests/conftest.py)

TINY = dict(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=6,
            eval_tokens=512, checkpoint_every=4, threads=1, device="cpu")
EVAL = EvalConfig(seq_len=32, batch_size=8, max_tokens=2048)
RUNS = {"aux": {}, "no_aux": {"aux_loss_coef": 0.0}}  # name -> TrainConfig overrides


def test_the_environment_gives_the_place_and_a_plain_process_is_a_world_of_one(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert not dist.launched() and dist.env_ranks() == (0, 1, 0)
    dist.check_world(1)
    with pytest.raises(ParamsError, match=r"'train.nproc' = 2 but this is a single process \(no torchrun\)"):
        dist.check_world(2)
    with dist.session("cpu") as env:
        assert env == dist.DistEnv() and env.is_main and not env.distributed
        assert not torch.distributed.is_initialized()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.launched() and dist.env_ranks() == (1, 2, 1)
    with pytest.raises(ParamsError, match=r"'train.nproc' = 4 but torchrun started 2; launch with"):
        dist.check_world(4)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ParamsError, match="RANK=2, WORLD_SIZE=2 do not describe"):
        dist.env_ranks()


def test_devices_resolve_and_missing_cuda_is_one_line():
    assert dist.resolve_device("cpu") == torch.device("cpu")
    assert dist.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ParamsError, match="'train.device' must be one of auto, cpu, cuda"):
        dist.resolve_device("tpu")
    if torch.cuda.is_available():
        with pytest.raises(ParamsError, match="CUDA device"):
            dist.resolve_device("cuda", world_size=torch.cuda.device_count() + 1)
    else:
        with pytest.raises(ParamsError, match=r"^params: 'train.device' is cuda but this machine has no usable CUDA "
                                              r"device .*; set it to auto or cpu$"):
            dist.resolve_device("cuda")


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tok_dir, tmp_path):
    env = dist.DistEnv(rank=0, world_size=3)
    with pytest.raises(ParamsError, match=r"'train.batch_size' = 4 must be divisible by the 3 processes"):
        train(tiny_config(), TrainConfig(**TINY), EVAL, tok_dir=tok_dir, resume_path=tmp_path / "r.st",
              progress=False, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save(out: Path, name: str, model, stats: dict) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.safetensors"))
    (out / f"{name}.json").write_text(json.dumps(stats))


def _worker(rank: int, world: int, port: int, tok_dir: str, out: str) -> None:
    """One of `world` gloo processes: each run of RUNS from scratch, then `aux` again resumed from
    the step-8 resume file its first run left behind; rank 0 saves weights and stats."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    out = Path(out)
    with dist.session("cpu") as env:
        for name, over in [*RUNS.items(), ("aux_resumed", RUNS["aux"])]:
            resume = out / f"{name.removesuffix('_resumed')}.st"
            cfg = TrainConfig(**{**TINY, **over, "nproc": world})
            model, stats = train(tiny_config(), cfg, EVAL, tok_dir=tok_dir, resume_path=resume, progress=False,
                                 env=env)
            if env.is_main:
                _save(out, name, model, stats)


def test_two_processes_train_what_one_process_trains(tok_dir, tmp_path):
    """Two gloo processes of 2 windows each against one process of 4, same global batches, 12 steps.

    Without the MoE balance loss the two differ only in the order of float sums (the gradient mean
    over processes, the CE mean over shards): measured 0 on the losses (rounded to 5 decimals) and
    3e-7 on the weights; bounds 1e-4 and 1e-5. With it (aux_loss_coef 0.01) each process computes
    the balance loss on its own 2 windows, a product of per-shard means rather than the batch's, so
    the gradients differ a little by design: measured <= 2e-5 on the losses (3e-3 on single weights,
    Adam's normalisation amplifies tiny gradients); bound 1e-3 on the losses. A sharding bug (both
    processes reading rank 0's windows) moves the losses by 0.04 to 0.16. Resuming under two
    processes from the step-8 file gives the weights of the uninterrupted run bit for bit."""
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(tok_dir), str(out)), nprocs=2, join=True)
    for name, loss_tol, weight_tol in (("no_aux", 1e-4, 1e-5), ("aux", 1e-3, None)):
        one, stats1 = train(tiny_config(), TrainConfig(**{**TINY, **RUNS[name]}), EVAL, tok_dir=tok_dir,
                            resume_path=tmp_path / f"{name}1.st", progress=False)
        stats2 = json.loads((out / f"{name}.json").read_text())
        for key in ("final_train_loss", "train_loss_final", "dev_loss"):
            assert stats2[key] == pytest.approx(stats1[key], abs=loss_tol), (name, key)
        if weight_tol is not None:
            two = load_file(str(out / f"{name}.safetensors"))
            for k, v in one.state_dict().items():
                torch.testing.assert_close(two[k], v, atol=weight_tol, rtol=0, msg=f"{name} {k}")
    resumed = load_file(str(out / "aux_resumed.safetensors"))
    assert json.loads((out / "aux_resumed.json").read_text())["resumed_from_step"] == 8
    for k, v in load_file(str(out / "aux.safetensors")).items():
        assert torch.equal(resumed[k], v), k


def test_the_launcher_passes_a_worker_error_on_as_its_own_line(tmp_path):
    """`python -m iteralite.train.torchrun` (dvc.yaml's train launcher): a worker that prints its
    one-line error and exits 2 gives status 2, and the workers' lines are the whole output (the
    torchrun command adds a traceback and a ChildFailedError box, and exits 1)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = tmp_path / "fail.py"
    # one write per line: two workers share the terminal. Each waits (60 s at most) until both have
    # written before it exits: the launcher stops the other workers once one has failed, and a worker
    # still starting on a busy machine would be stopped before its line.
    script.write_text("import os, pathlib, sys, time\n"
                      "os.write(2, f\"[train] error: rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}\\n\".encode())\n"
                      "sync = pathlib.Path(sys.argv[1])\n"
                      "(sync / os.environ['RANK']).touch()\n"
                      "deadline = time.monotonic() + 60\n"
                      "while len(list(sync.iterdir())) < int(os.environ['WORLD_SIZE']) and time.monotonic() < deadline:\n"
                      "    time.sleep(0.01)\n"
                      "sys.exit(2)\n")
    (tmp_path / "sync").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "iteralite.train.torchrun", "--standalone", "--nproc-per-node", "2", str(script),
           str(tmp_path / "sync")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert sorted((p.stdout + p.stderr).splitlines()) == ["[train] error: rank 0 of 2", "[train] error: rank 1 of 2"]
    script.write_text("import sys\nsys.exit(3)\n")  # a worker that failed without our line: one line names it
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 3 and "Traceback" not in p.stderr
    assert any(line.startswith("[torchrun] worker rank") for line in p.stderr.splitlines()), p.stderr
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")  # killed: 128 + 9, as a shell says
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 137 and "Traceback" not in p.stderr, p.stderr


def test_a_worker_dies_with_its_launcher(tmp_path):
    """torchrun starts workers in sessions of their own: when the launcher is killed (-9), the
    worker must not train on behind the next run's back."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    pidfile = tmp_path / "worker.pid"
    script = tmp_path / "worker.py"
    script.write_text("import os, sys, time\n"
                      "from iteralite.train import dist\n"
                      "with dist.session('cpu'):\n"
                      f"    open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
                      "    time.sleep(60)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen([sys.executable, "-m", "iteralite.train.torchrun", "--standalone",
                                 "--nproc-per-node", "1", str(script)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline and launcher.poll() is None, "the worker never started"
        time.sleep(0.05)
    worker = int(pidfile.read_text())
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break  # gone
        try:  # a zombie awaiting its reaper is gone too
            if open(f"/proc/{worker}/stat").read().split(")")[1].split()[0] == "Z":
                break
        except FileNotFoundError:
            break
        if time.monotonic() > deadline:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker outlived its killed launcher")
        time.sleep(0.05)


@pytest.mark.parametrize("nproc", ["0", "-1"])
def test_the_launcher_refuses_no_processes_with_one_line(tmp_path, nproc):
    """`train.nproc: 0` reached torch's launcher, which failed a bare `assert` before any stage
    code could check the params."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = tmp_path / "never.py"
    script.write_text("raise SystemExit('the worker must not start')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "iteralite.train.torchrun", "--standalone", "--nproc-per-node", nproc,
                        str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stdout + p.stderr == (f"[train] error: params: 'train.nproc' must be >= 1 (the processes torchrun "
                                   f"starts), got {nproc}\n")

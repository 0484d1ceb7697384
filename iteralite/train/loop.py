"""Language-model training: AdamW, linear warm-up + cosine decay, gradient clipping, fixed seed,
periodic validation, step metrics through dvclive (`train.live`), resumption after an interruption,
and data parallelism over processes (`train.dist`).

Resumption: every `checkpoint_every` steps the model, optimizer moments, step, elapsed time, the
loss averages and the logged curve so far go atomically to a resume file. A restarted run with the
same params, data and code (the stage passes a digest of its code deps) continues from it, first
replaying the stored curve into its fresh dvclive logger; otherwise it starts over. Batches depend
only on (seed, step), so a resumed run sees the same data and logs the same history as an
uninterrupted one.

Data parallelism: the global batch of a step is still `get_batch(seed, step)`; process r of w takes
windows r::w, DDP averages the gradients, the logged losses are averaged over the processes, rank 0
scores the periodic validation and sends the value to the others, and rank 0 alone writes. With
one process nothing of this runs: the arithmetic is that of the single-process loop, operation for
operation. With several, the result differs from one process in the last float bits (sums in
another order) and through the MoE balance loss, computed per process on its own windows.

Divergence: every loop (this one and `distill`) stops at the first non-finite loss or gradient
norm with a `DivergedError` naming the step, before the model or its metrics are written (the
step metrics logged so far stay, as a record of the run).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from iteralite.core.config import ModelConfig
from iteralite.train.dist import DEVICES, DistEnv, broadcast_float, mean_over_ranks, resolve_device
from iteralite.train.evaluate import EvalConfig, Evaluator, evaluate_tokens, get_batch
from iteralite.train.live import Throughput, log_point, log_summary, should_log
from iteralite.train.losses import next_token_loss
from iteralite.io.errors import DataError, DivergedError, ParamsError
from iteralite.io.stfile import save_tensors
from iteralite.core.model import IteraLite
from iteralite.io.params import check
from iteralite.data.tokenizer import load_tokens


@dataclass
class ScheduleConfig:
    """The optimizer schedule every training loop shares (training and distillation): batches,
    linear warm-up then cosine decay from lr to min_lr, gradient clipping, the MoE auxiliary loss."""

    seed: int = 1337
    steps: int = 1500
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    threads: int = 0  # 0 = all cores

    def validate(self, section: str) -> None:
        check(self.steps >= 1, section, "steps", "must be >= 1")
        check(self.batch_size >= 1, section, "batch_size", "must be >= 1")
        check(self.seq_len >= 2, section, "seq_len", "must be >= 2")
        check(self.lr > 0, section, "lr", "must be > 0")
        check(0 <= self.min_lr <= self.lr, section, "min_lr", "must be in [0, lr]")
        check(0 <= self.warmup_steps < self.steps, section, "warmup_steps", "must be in [0, steps)")
        check(self.grad_clip > 0, section, "grad_clip", "must be > 0")
        check(self.aux_loss_coef >= 0, section, "aux_loss_coef", "must be >= 0")
        check(self.threads >= 0, section, "threads", "must be >= 0 (0 = all cores)")


@dataclass
class TrainConfig(ScheduleConfig):
    weight_decay: float = 0.1
    eval_every: int = 250
    eval_tokens: int = 65536  # validation tokens scored at each periodic evaluation
    checkpoint_every: int = 100
    device: str = "cpu"  # cpu | cuda (bf16 autocast) | auto (CUDA when available): the artifact depends on it
    nproc: int = 1  # data-parallel processes (torchrun --nproc-per-node); each takes batch_size / nproc windows

    def validate(self, section: str = "train") -> None:
        super().validate(section)
        for key in ("eval_every", "checkpoint_every"):
            check(getattr(self, key) >= 1, section, key, "must be >= 1")
        check(self.weight_decay >= 0, section, "weight_decay", "must be >= 0")
        check(self.device in DEVICES, section, "device", f"must be one of {', '.join(DEVICES)}; got {self.device!r}")
        check(self.nproc >= 1, section, "nproc", "must be >= 1")
        check(self.batch_size % self.nproc == 0, section, "batch_size",
              f"= {self.batch_size} must be divisible by '{section}.nproc' = {self.nproc} (each process takes "
              "an equal share of every batch)")


def lr_at(cfg, step: int) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup_steps, then cosine decay to cfg.min_lr at cfg.steps
    (any config with those four fields: training, QAT, fine-tuning)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def check_finite(where: str, step: int, steps: int, loss: float, grad_norm: float, lr: float,
                 lr_key: str = "its params section's lr") -> None:
    """Stop a training loop at its first non-finite loss or gradient norm (step is 0-based)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what = f"loss is {loss:g}" if not math.isfinite(loss) else f"gradient norm is {grad_norm:g}"
    raise DivergedError(
        f"{where} diverged at step {step + 1} of {steps}: {what} (learning rate {lr:g}); likely cause: "
        f"{lr_key} too high or too short a warm-up; lower it and rerun (nothing was written)")


def check_finite_model(model: torch.nn.Module, where: str) -> None:
    """Refuse to write a model holding NaN or infinite floats (the last line of defence)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DivergedError(f"{where}: tensor {name} holds NaN or infinite values; the run diverged "
                                "(nothing was written)")


def check_stream(data: torch.Tensor, seq_len: int, where: str, key: str, split: str = "training") -> None:
    """A token stream must hold more than one window of seq_len + 1 tokens to sample batches from:
    a DataError naming `key` before any work, rather than a torch error after it."""
    if len(data) <= seq_len + 1:
        raise DataError(f"{where}: the {split} split has {len(data)} tokens, too few for windows of "
                        f"'{key}' = {seq_len} (+1); add data or lower {key}")


def set_threads(threads: int) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Weight decay on matrices only (not on norms, biases, A_log, D)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def _run_hash(*objs) -> str:
    return hashlib.sha256(json.dumps(objs, sort_keys=True).encode()).hexdigest()[:16]


def save_resume(path: Path, model, opt, step: int, elapsed: float, curve: list, run_hash: str,
                loss_ema: float | None = None, recent: list | None = None) -> None:
    """The run so far: weights, AdamW moments, and in the metadata the step, elapsed seconds, the
    logged curve and the loss averages (so the resumed run logs what an uninterrupted one would)."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        st = opt.state.get(p)
        if st:
            tensors[f"opt.{i}.exp_avg"] = st["exp_avg"].contiguous().cpu()
            tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"].contiguous().cpu()
            tensors[f"opt.{i}.step"] = st["step"].reshape(1).float().cpu()
    meta = {"step": str(step), "elapsed": repr(elapsed), "curve": json.dumps(curve), "run_hash": run_hash,
            "loss_ema": json.dumps(loss_ema), "recent": json.dumps(list(recent or []))}
    save_tensors(path, tensors, meta)


def load_resume(path: Path, model, opt, run_hash: str, verbose: bool = True):
    """(step, elapsed, curve, loss_ema, recent) from a matching resume file, or None to start fresh.
    Tensors go to the device of the parameters they belong to."""
    if not path.exists():
        return None
    say = print if verbose else (lambda *a: None)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("run_hash") != run_hash:
                say(f"[train] {path} belongs to other params, data or code: starting fresh")
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a damaged resume file is not fatal: start over
        say(f"[train] ignoring unreadable resume file {path}: {e}")
        return None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {"step": tensors[f"opt.{i}.step"][0].clone(),
                            "exp_avg": tensors[f"opt.{i}.exp_avg"].to(p.device),
                            "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(p.device)}
    return (int(meta["step"]), float(meta["elapsed"]), json.loads(meta["curve"]),
            json.loads(meta.get("loss_ema", "null")), json.loads(meta.get("recent", "[]")))


def autocast(device: torch.device):
    """bf16 autocast on CUDA; on CPU no context at all, so the FP32 arithmetic is untouched."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(model_cfg: ModelConfig, cfg: TrainConfig, eval_cfg: EvalConfig, *, tok_dir="data/tokenizer",
          resume_path="checkpoints/train_resume.safetensors", progress: bool = True, code: str = "",
          live=None, env: DistEnv | None = None):
    """Train from scratch (or resume); returns (model on the CPU, stats). `code`: a digest of the
    code the run depends on, part of the resume key (a resume file of other code is never resumed).
    `live`: a dvclive logger (rank 0's; None logs nothing). `env`: this process's place among the
    data-parallel processes (`dist.session`); None = one process on `cfg.device`. Every process
    returns the trained model; stats hold the dev metrics on rank 0 only."""
    env = env or DistEnv(device=resolve_device(cfg.device))
    if cfg.batch_size % env.world_size:
        raise ParamsError(f"params: 'train.batch_size' = {cfg.batch_size} must be divisible by the "
                          f"{env.world_size} processes (each takes an equal share of every batch)")
    threads = set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokens = load_tokens(Path(tok_dir) / "train.npy")
    data = torch.from_numpy(tokens.astype("int64"))
    check_stream(data, cfg.seq_len, "train", "train.seq_len")
    model = IteraLite(model_cfg).to(env.device)  # same seed, same initial weights on every process
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    evaluator = Evaluator(eval_cfg, tok_dir)
    evaluator.check_window("valid", len(evaluator.valid), cfg.eval_tokens, "train.eval_tokens")
    resume_path = Path(resume_path)
    data_sha = hashlib.sha256(tokens.tobytes()).hexdigest()
    # the device and process count actually used: 'auto' on another machine is another run
    run_hash = _run_hash(model_cfg.to_dict(), asdict(cfg), asdict(eval_cfg), data_sha, code, env.device.type,
                         env.world_size)
    start, elapsed, curve, loss_ema, recent = 0, 0.0, [], None, []
    resumed = load_resume(resume_path, model, opt, run_hash, verbose=env.is_main)
    if resumed:
        start, elapsed, curve, loss_ema, recent = resumed
        if env.is_main:
            print(f"[train] resuming at step {start} from {resume_path}")
    if broadcast_float(float(start), env) != start:  # every rank must take rank 0's decision
        raise DataError(f"process {env.rank} read {resume_path} differently from process 0 (step {start}); "
                        "delete it and rerun")
    for point in curve:  # the declared dvclive outputs were deleted before the run: log the history again
        log_point(live, point["step"], point)
    net = model
    if env.distributed:  # after the resume load: DDP starts from rank 0's weights, which all ranks share
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (progress and env.is_main),
               desc="train", dynamic_ncols=True)
    t0 = time.perf_counter() - elapsed
    recent = deque(recent, maxlen=cfg.eval_every)  # training CE of the last eval interval
    step_tokens = cfg.batch_size * cfg.seq_len  # the global batch, all processes together
    speed = Throughput(start, step_tokens)
    for step in bar:
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = get_batch(data, cfg.batch_size, cfg.seq_len, cfg.seed, step)  # (batch_size, seq_len + 1)
        if env.distributed:
            batch = batch[env.rank::env.world_size]  # (batch_size / world, seq_len + 1)
        batch = batch.to(env.device)
        with autocast(env.device):
            ce, aux = next_token_loss(net, batch)
            loss = ce + cfg.aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP: gradients averaged over the processes here
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        loss_v, ce_v = mean_over_ranks([loss, ce], env)  # one process: loss.item(), ce.item()
        check_finite("training", step, cfg.steps, loss_v, norm.item(), lr, "'train.lr'")
        opt.step()
        loss_ema = ce_v if loss_ema is None else 0.95 * loss_ema + 0.05 * ce_v
        recent.append(ce_v)
        done = step + 1
        val = None
        if done % cfg.eval_every == 0 or done == cfg.steps:
            # rank 0 scores; the others wait for its value, so every process stops alike on a bad one
            val = broadcast_float(evaluator.valid_loss(model, cfg.eval_tokens) if env.is_main else math.nan, env)
            check_finite("training", step, cfg.steps, val, 0.0, lr, "'train.lr'")
            model.train()
        if should_log(done, cfg.steps) or val is not None:
            point = {"step": done, "train_loss": loss_ema, "val_loss": val, "lr": lr,
                     "tokens_per_s": speed.since_last(done)}
            curve.append(point)
            log_point(live, done, point)
        bar.set_postfix(loss=f"{loss_ema:.3f}", **({"val": f"{val:.3f}"} if val is not None else {}))
        if done % cfg.checkpoint_every == 0 and done < cfg.steps and env.is_main:
            save_resume(resume_path, model, opt, done, time.perf_counter() - t0, curve, run_hash, loss_ema,
                        list(recent))
    bar.close()
    train_seconds = time.perf_counter() - t0
    tokens_seen = cfg.steps * cfg.batch_size * cfg.seq_len
    stats = {"steps": cfg.steps, "tokens_seen": tokens_seen, "train_tokens": int(len(data)),
             "epochs": round(tokens_seen / len(data), 3), "threads": threads,
             "train_seconds": round(train_seconds, 1),
             "train_tokens_per_s": round((cfg.steps - start) * cfg.batch_size * cfg.seq_len
                                         / max(1e-9, train_seconds - elapsed), 1),
             "final_train_loss": round(loss_ema, 5), "resumed_from_step": start,
             # where and how it trained: the FP32 artifact depends on it
             "device": env.device.type, "precision": "bf16-autocast" if env.device.type == "cuda" else "fp32",
             "world_size": env.world_size}
    if recent:
        stats["train_loss_final"] = round(sum(recent) / len(recent), 5)
    model = model.cpu()  # every later use (scoring, checkpoint) is on the CPU
    dev_path = Path(tok_dir) / "dev.npy"
    if env.is_main and dev_path.exists():  # the held-out slice of the training source: the train/dev gap
        dev = evaluate_tokens(model, load_tokens(dev_path), evaluator.nbytes, eval_cfg.seq_len, eval_cfg.batch_size)
        stats["dev_loss"], stats["dev_bpb"] = round(dev["loss"], 5), round(dev["bpb"], 5)
    check_finite_model(model, "training")
    model.eval()
    # losses only: dvc exp show lists this summary; timings stay in metrics/train.json
    log_summary(live, {k: stats[k] for k in ("final_train_loss", "train_loss_final", "dev_loss", "dev_bpb")
                       if k in stats})
    return model, stats

"""Language-model training: AdamW, linear warm-up + cosine decay, gradient clipping, fixed seed,
periodic validation, a CSV training curve, and resumption after an interruption.

Resumption: every `checkpoint_every` steps the model, optimizer moments, step, elapsed time and
curve so far go atomically to a resume file. A restarted run with the same params, data and code
(the stage passes a digest of its code deps) continues from it; otherwise it starts over. Batches
depend only on (seed, step), so a resumed run sees the same data as an uninterrupted one.

Divergence: every loop (this one and `distill`) stops at the first non-finite loss or gradient
norm with a `DivergedError` naming the step, before anything is written.
"""
from __future__ import annotations

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
from iteralite.train.evaluate import EvalConfig, Evaluator, evaluate_tokens
from iteralite.train.losses import next_token_loss
from iteralite.io.atomic import write_text
from iteralite.io.errors import DataError, DivergedError
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

    def validate(self, section: str = "train") -> None:
        super().validate(section)
        for key in ("eval_every", "checkpoint_every"):
            check(getattr(self, key) >= 1, section, key, "must be >= 1")
        check(self.weight_decay >= 0, section, "weight_decay", "must be >= 0")


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


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    """(batch_size, seq_len + 1) random windows; a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    ix = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=g)
    return torch.stack([data[i:i + seq_len + 1] for i in ix.tolist()])


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Weight decay on matrices only (not on norms, biases, A_log, D)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def _run_hash(*objs) -> str:
    return hashlib.sha256(json.dumps(objs, sort_keys=True).encode()).hexdigest()[:16]


def save_resume(path: Path, model, opt, step: int, elapsed: float, curve: list, run_hash: str) -> None:
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        st = opt.state.get(p)
        if st:
            tensors[f"opt.{i}.exp_avg"] = st["exp_avg"].contiguous()
            tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            tensors[f"opt.{i}.step"] = st["step"].reshape(1).float()
    meta = {"step": str(step), "elapsed": repr(elapsed), "curve": json.dumps(curve), "run_hash": run_hash}
    save_tensors(path, tensors, meta)


def load_resume(path: Path, model, opt, run_hash: str):
    """(step, elapsed, curve) from a matching resume file, or None to start fresh."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("run_hash") != run_hash:
                print(f"[train] {path} belongs to other params, data or code: starting fresh")
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a damaged resume file is not fatal: start over
        print(f"[train] ignoring unreadable resume file {path}: {e}")
        return None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {"step": tensors[f"opt.{i}.step"][0].clone(),
                            "exp_avg": tensors[f"opt.{i}.exp_avg"], "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"]}
    return int(meta["step"]), float(meta["elapsed"]), json.loads(meta["curve"])


def write_curve(path: Path, curve: list) -> None:
    def fmt(v):
        return "" if v is None else f"{v:.5f}"
    lines = ["step,train_loss,val_loss,lr"] + [
        f"{r['step']},{r['train_loss']:.5f},{fmt(r['val_loss'])},{r['lr']:.6g}" for r in curve]
    write_text(path, "\n".join(lines) + "\n")


def train(model_cfg: ModelConfig, cfg: TrainConfig, eval_cfg: EvalConfig, *, tok_dir="data/tokenizer",
          resume_path="checkpoints/train_resume.safetensors", curve_path="plots/train_curve.csv",
          progress: bool = True, code: str = ""):
    """Train from scratch (or resume); returns (model, stats). `code`: a digest of the code the run
    depends on, part of the resume key (a resume file of other code is never resumed)."""
    threads = set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokens = load_tokens(Path(tok_dir) / "train.npy")
    data = torch.from_numpy(tokens.astype("int64"))
    check_stream(data, cfg.seq_len, "train", "train.seq_len")
    model = IteraLite(model_cfg)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    evaluator = Evaluator(eval_cfg, tok_dir)
    evaluator.check_window("valid", len(evaluator.valid), cfg.eval_tokens, "train.eval_tokens")
    resume_path, curve_path = Path(resume_path), Path(curve_path)
    data_sha = hashlib.sha256(tokens.tobytes()).hexdigest()
    run_hash = _run_hash(model_cfg.to_dict(), asdict(cfg), asdict(eval_cfg), data_sha, code)
    start, elapsed, curve = 0, 0.0, []
    resumed = load_resume(resume_path, model, opt, run_hash)
    if resumed:
        start, elapsed, curve = resumed
        print(f"[train] resuming at step {start} from {resume_path}")
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
               desc="train", dynamic_ncols=True)
    t0 = time.perf_counter() - elapsed
    loss_ema = None
    recent = deque(maxlen=cfg.eval_every)  # training CE of the last eval interval
    for step in bar:
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = get_batch(data, cfg.batch_size, cfg.seq_len, cfg.seed, step)
        ce, aux = next_token_loss(model, batch)
        loss = ce + cfg.aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        check_finite("training", step, cfg.steps, loss.item(), norm.item(), lr, "'train.lr'")
        opt.step()
        loss_ema = ce.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * ce.item()
        recent.append(ce.item())
        done = step + 1
        val = None
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val = evaluator.valid_loss(model, cfg.eval_tokens)
            check_finite("training", step, cfg.steps, val, 0.0, lr, "'train.lr'")
            model.train()
        if done % 10 == 0 or val is not None:
            curve.append({"step": done, "train_loss": loss_ema, "val_loss": val, "lr": lr})
        bar.set_postfix(loss=f"{loss_ema:.3f}", **({"val": f"{val:.3f}"} if val is not None else {}))
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            save_resume(resume_path, model, opt, done, time.perf_counter() - t0, curve, run_hash)
    bar.close()
    train_seconds = time.perf_counter() - t0
    write_curve(curve_path, curve)
    tokens_seen = cfg.steps * cfg.batch_size * cfg.seq_len
    stats = {"steps": cfg.steps, "tokens_seen": tokens_seen, "train_tokens": int(len(data)),
             "epochs": round(tokens_seen / len(data), 3), "threads": threads,
             "train_seconds": round(train_seconds, 1),
             "train_tokens_per_s": round((cfg.steps - start) * cfg.batch_size * cfg.seq_len
                                         / max(1e-9, train_seconds - elapsed), 1),
             "final_train_loss": round(loss_ema, 5), "resumed_from_step": start}
    if recent:  # after a resume at the very end there is no step to average
        stats["train_loss_final"] = round(sum(recent) / len(recent), 5)
    dev_path = Path(tok_dir) / "dev.npy"
    if dev_path.exists():  # the held-out slice of the training source: the train/dev gap
        dev = evaluate_tokens(model, load_tokens(dev_path), evaluator.nbytes, eval_cfg.seq_len, eval_cfg.batch_size)
        stats["dev_loss"], stats["dev_bpb"] = round(dev["loss"], 5), round(dev["bpb"], 5)
    check_finite_model(model, "training")
    model.eval()
    return model, stats

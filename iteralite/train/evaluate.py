"""Held-out quality: perplexity and bits per byte on the TinyStories validation split, and
perplexity on WikiText-2 test, all with the pipeline's own tokenizer.

Text is cut into non-overlapping windows of `seq_len` tokens; inside each window every token but
the first is predicted from the ones before it. bits per byte = summed negative log-likelihood
(in bits) / summed UTF-8 bytes of the predicted tokens, so it does not depend on the tokenizer.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from iteralite.io.errors import DataError, ParamsError
from iteralite.io.params import check
from iteralite.train.losses import next_token_loss
from iteralite.data.tokenizer import load_tokenizer, load_tokens, token_bytes


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    """(batch_size, seq_len + 1) random windows; a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    ix = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=g)
    return torch.stack([data[i:i + seq_len + 1] for i in ix.tolist()])


def windows(data: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """n random windows (n, seq_len) of the token stream, a pure function of seed (the dev-split
    windows that calibration, allocation and the student's cuts are scored on)."""
    return get_batch(data, n, seq_len - 1, seed, 0)


def tiles(data: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The token stream cut into consecutive, non-overlapping windows (n, seq_len), the tail that
    fills no window dropped: every token scored once (a held-out check set, not a sample)."""
    n = len(data) // seq_len
    return data[: n * seq_len].reshape(n, seq_len)


@torch.no_grad()
def mean_loss(model, wins: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats/token) over windows (n, l), in batches."""
    total, count = 0.0, 0
    for i in range(0, len(wins), batch_size):
        w = wins[i:i + batch_size]
        total += next_token_loss(model, w, reduction="sum")[0].item()
        count += w[:, 1:].numel()
    return total / count


@dataclass
class EvalConfig:
    seq_len: int = 256
    batch_size: int = 16
    max_tokens: int = 0  # 0 = the whole split

    def validate(self, section: str = "eval") -> None:
        check(self.seq_len >= 2, section, "seq_len", "must be >= 2")
        check(self.batch_size >= 1, section, "batch_size", "must be >= 1")
        check(self.max_tokens >= 0, section, "max_tokens", "must be >= 0 (0 = all)")


def _device_of(model) -> torch.device:
    """Where a torch model's weights live (its windows go there); CPU for any other scorer (the
    native C step, an ONNX Runtime session)."""
    if isinstance(model, torch.nn.Module):
        return next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    return torch.device("cpu")


@torch.no_grad()
def evaluate_tokens(model, tokens: np.ndarray, nbytes: np.ndarray, seq_len: int, batch_size: int,
                    max_tokens: int = 0) -> dict:
    """NLL over `tokens` (1-D) in windows; returns loss (nats/token), ppl, bpb, tokens scored."""
    if max_tokens:
        tokens = tokens[:max_tokens]
    n_win = len(tokens) // seq_len
    if n_win == 0:
        raise DataError(f"evaluation needs at least one window of {seq_len} tokens, got {len(tokens)} "
                        f"tokens{f' (max_tokens={max_tokens})' if max_tokens else ''}")
    windows = torch.from_numpy(tokens[: n_win * seq_len].astype(np.int64)).view(n_win, seq_len)
    nb = torch.from_numpy(nbytes)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    nll, count, nbyte = 0.0, 0, 0
    for i in range(0, n_win, batch_size):
        w = windows[i:i + batch_size]
        tgt = w[:, 1:]
        nll += next_token_loss(model, w.to(device), reduction="sum")[0].item()  # a CPU model: w itself
        count += tgt.numel()
        nbyte += int(nb[tgt].sum())
    model.train(was_training)
    loss = nll / count
    return {"loss": loss, "ppl": math.exp(loss), "bpb": nll / math.log(2) / nbyte, "tokens": count}


class Evaluator:
    """Loads the validation and WikiText-2 token arrays once; `__call__` scores a model."""

    def __init__(self, cfg: EvalConfig, tok_dir: str | Path = "data/tokenizer"):
        tok_dir = Path(tok_dir)
        self.cfg = cfg
        self.nbytes = token_bytes(load_tokenizer(tok_dir / "tokenizer.json"))
        self.valid = load_tokens(tok_dir / "valid.npy")
        self.wiki = load_tokens(tok_dir / "wikitext2.npy")
        # Both splits are scored after training: a window that does not fit must stop the stage now.
        for split, tokens in (("valid", self.valid), ("wikitext2", self.wiki)):
            self.check_window(split, len(tokens), cfg.max_tokens, "eval.max_tokens")

    def check_window(self, split: str, n_tokens: int, max_tokens: int, max_key: str) -> None:
        """A ParamsError unless `split` (n_tokens long, cut to max_tokens when > 0) holds at least
        one full window of eval.seq_len tokens. `max_key` names the setting max_tokens came from."""
        seq_len = self.cfg.seq_len
        if n_tokens < seq_len:
            raise ParamsError(
                f"params: 'eval.seq_len' = {seq_len} is longer than the {split} split, which has {n_tokens} "
                f"tokens: evaluation needs at least one full window; lower eval.seq_len to <= {n_tokens} "
                f"or use more {split} data")
        if max_tokens and max_tokens < seq_len:
            raise ParamsError(
                f"params: '{max_key}' = {max_tokens} leaves less than one window of 'eval.seq_len' = {seq_len} "
                f"tokens of the {split} split ({n_tokens} tokens); set it to >= {seq_len} (or 0 = the whole split)")

    def valid_loss(self, model, max_tokens: int | None = None) -> float:
        mt = self.cfg.max_tokens if max_tokens is None else max_tokens
        return evaluate_tokens(model, self.valid, self.nbytes, self.cfg.seq_len, self.cfg.batch_size, mt)["loss"]

    def __call__(self, model) -> dict:
        c = self.cfg
        v = evaluate_tokens(model, self.valid, self.nbytes, c.seq_len, c.batch_size, c.max_tokens)
        w = evaluate_tokens(model, self.wiki, self.nbytes, c.seq_len, c.batch_size, c.max_tokens)
        return {"val_loss": round(v["loss"], 5), "val_ppl": round(v["ppl"], 4), "val_bpb": round(v["bpb"], 5),
                "wikitext2_ppl": round(w["ppl"], 3), "wikitext2_bpb": round(w["bpb"], 5)}


def storage_bits(model) -> int:
    """Bits of every tensor the model stores (packed codes, scales, zero-points, float tensors)."""
    return sum(t.numel() * t.element_size() * 8 for t in model.state_dict().values())


def artifact_metrics(model, path, fp32: dict, quality: dict) -> dict:
    """The common keys every model-producing stage reports.

    fp32: metrics/train.json of the baseline; quality: Evaluator output for `model`.
    `params` counts the logical weights (those of the float architecture with the same shapes),
    and bits_per_weight divides all stored tensor bits by it.
    """
    from iteralite.core.model import IteraLite

    size = Path(path).stat().st_size
    params = IteraLite(model.cfg).num_params()
    return {
        "size_bytes": size,
        "params": params,
        "bits_per_weight": round(storage_bits(model) / params, 4),
        "compression_vs_fp32": round(fp32["size_bytes"] / size, 3),
        **quality,
        "val_ppl_delta_pct": round(100.0 * (quality["val_ppl"] / fp32["val_ppl"] - 1.0), 3),
    }

"""A dev-split probe of student shapes: cut the fine-tuned pruned model as the student stage does
(`pipeline.student.make_student`), distil it for a few steps and report the dev loss, for a list of
shapes. It is how the student targets' shapes and the embedding rank were chosen (issue 24); its
records go to `metrics/options/` and are not part of the DAG (each probe costs minutes).

    python -m iteralite.pipeline.probe --steps 600 --out metrics/options/embed_rank.json \\
        48,3,32,0,0 48,3,24,0,0 48,3,0,0,0

A shape is d_model,n_layers,embed_rank,max_heads,max_ff (0: dense embedding / no cap).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from iteralite.io.atomic import write_json
from iteralite.io.errors import IteraliteError


def parse_shape(text: str) -> dict:
    parts = text.split(",")
    if len(parts) != 5 or not all(p.strip().isdigit() for p in parts):
        raise IteraliteError(f"probe: shape {text!r} must be d_model,n_layers,embed_rank,max_heads,max_ff (integers)")
    return dict(zip(("d_model", "n_layers", "embed_rank", "max_heads", "max_ff"), map(int, parts)))


def probe(shapes: list[dict], steps: int, from_ratio: float = 0.4, progress: bool = False,
          lr: float = 0.002, warmup: int = 20) -> list[dict]:
    """One row per shape: parameters, dev loss of the teacher, the cut model and the distilled student."""
    import torch

    from iteralite.io.checkpoint import load_model
    from iteralite.pipeline import paths
    from iteralite.pipeline.baseline import load_baseline
    from iteralite.pipeline.stage import TRAIN_QUALITY
    from iteralite.pipeline.student import StudentConfig, make_student
    from iteralite.quant.swap import dequantize_model

    base = load_baseline(train_metrics=TRAIN_QUALITY)
    rows = []
    for shape in shapes:
        cfg = StudentConfig(**shape, tokens=steps * 16 * 256, lr=lr, min_lr=lr / 10,
                            warmup_steps=min(warmup, steps - 1))
        cfg.validate("probe")
        t0 = time.perf_counter()
        start = dequantize_model(load_model(paths.ratio_ckpt("finetune", from_ratio))[0])
        with torch.random.fork_rng(devices=[]):
            model, info = make_student(base.model, start, base.train_tokens, base.dev_tokens, cfg, progress)
        rows.append({**shape, "params": model.num_params(), "steps": steps, "lr": lr, "warmup_steps": min(warmup, steps - 1),
                     "dev_loss_teacher": info["dev_loss_teacher"],
                     "dev_loss_cut": info["dev_loss_cut"], "dev_loss_student": info["dev_loss_student"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m iteralite.pipeline.probe", description=__doc__.splitlines()[0])
    ap.add_argument("shapes", nargs="+", help="d_model,n_layers,embed_rank,max_heads,max_ff")
    ap.add_argument("--steps", type=int, default=600, help="distillation steps per shape (16 x 256 tokens each)")
    ap.add_argument("--from-ratio", type=float, default=0.4)
    ap.add_argument("--lr", type=float, default=0.002, help="peak learning rate (min_lr = lr / 10)")
    ap.add_argument("--warmup", type=int, default=20, help="warmup steps (the stage's student.warmup_steps is 50)")
    ap.add_argument("--out", help="write the rows here as JSON")
    a = ap.parse_args(argv)
    try:
        shapes = [parse_shape(s) for s in a.shapes]
        if a.steps < 2:
            raise IteraliteError("probe: --steps must be >= 2")
        if not 0 < a.lr < 1:
            raise IteraliteError(f"probe: --lr must be in (0, 1), got {a.lr}")
        if a.warmup < 0:
            raise IteraliteError(f"probe: --warmup must be >= 0, got {a.warmup}")
        rows = probe(shapes, a.steps, a.from_ratio, progress=True, lr=a.lr, warmup=a.warmup)
    except IteraliteError as e:
        print(str(e), file=sys.stderr)
        return 2
    if a.out:
        args = sys.argv[1:] if argv is None else argv
        write_json(a.out, {"command": "python -m iteralite.pipeline.probe " + " ".join(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

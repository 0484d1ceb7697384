"""A dev-split probe of student shapes: cut the fine-tuned pruned model as the student stage does
(`pipeline.student.make_student`), distil it for a few steps and report the dev loss, for a list of
shapes. It is how the student targets' shapes and the embedding rank were chosen (issue 24); its
records go to `metrics/options/` and are not part of the DAG (each probe costs minutes).

    python -m iteralite.pipeline.probe --steps 600 --out metrics/options/embed_rank.json \\
        48,3,32,0,0 48,3,24,0,0 48,3,0,0,0

A shape is d_model,n_layers,embed_rank,max_heads,max_ff (0: dense embedding / no cap).
`--teacher` distils from another float checkpoint than FP32 (the headline student as a teacher
assistant for the tiny shape), `--temperature` at another distillation temperature.
"""
from __future__ import annotations

import argparse
import json
import os
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
          lr: float = 0.002, warmup: int = 20, teacher: str | None = None, temperature: float = 1.0) -> list[dict]:
    """One row per shape: parameters, dev loss of the teacher, the cut model and the distilled student.
    `teacher`: a float checkpoint that teaches instead of FP32 (e.g. checkpoints/student.safetensors,
    the headline student as a teacher assistant); `temperature`: the distillation temperature."""
    import torch

    from iteralite.io.checkpoint import load_model
    from iteralite.pipeline import paths
    from iteralite.pipeline.baseline import load_baseline
    from iteralite.pipeline.stage import TRAIN_QUALITY
    from iteralite.pipeline.student import StudentConfig, make_student
    from iteralite.quant.swap import dequantize_model

    base = load_baseline(train_metrics=TRAIN_QUALITY)
    teach = base.model if teacher is None else load_model(teacher)[0].eval()
    rows = []
    for shape in shapes:
        cfg = StudentConfig(**shape, tokens=steps * 16 * 256, lr=lr, min_lr=lr / 10,
                            warmup_steps=min(warmup, steps - 1), temperature=temperature)
        cfg.validate("probe")
        t0 = time.perf_counter()
        start = dequantize_model(load_model(paths.ratio_ckpt("finetune", from_ratio))[0])
        with torch.random.fork_rng(devices=[]):
            model, info = make_student(teach, start, base.train_tokens, base.dev_tokens, cfg, progress)
        rows.append({**shape, "params": model.num_params(), "steps": steps, "lr": lr, "warmup_steps": min(warmup, steps - 1),
                     "teacher": teacher or paths.FP32_CKPT, "temperature": temperature,
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
    ap.add_argument("--teacher", help="a float checkpoint that teaches instead of FP32 "
                    "(checkpoints/student.safetensors: the headline student as a teacher assistant)")
    ap.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (student.temperature)")
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
        if not a.temperature > 0:
            raise IteraliteError(f"probe: --temperature must be > 0, got {a.temperature}")
        if a.teacher is not None and not os.path.isfile(a.teacher):
            raise IteraliteError(f"probe: --teacher {a.teacher}: no such file")
        rows = probe(shapes, a.steps, a.from_ratio, progress=True, lr=a.lr, warmup=a.warmup, teacher=a.teacher,
                     temperature=a.temperature)
    except IteraliteError as e:
        print(str(e), file=sys.stderr)
        return 2
    if a.out:
        args = sys.argv[1:] if argv is None else argv
        write_json(a.out, {"command": "python -m iteralite.pipeline.probe " + " ".join(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

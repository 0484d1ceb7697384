"""Stage `mixed_precision` (`mixed_precision_<target>` for a student target other than the
headline): the smallest allocation of per-tensor precisions inside a quality budget, fine-tuned,
packed and entropy-coded (compact checkpoint layout), beside uniform precisions and the plan's
manual map for comparison (stored the same way); the fine-tunes' step metrics in dvclive/<stage>."""
import dataclasses
import math
import os

from iteralite.io.checkpoint import load_model, save_checkpoint
from iteralite.io.params import load_section
from iteralite.pipeline import paths
from iteralite.pipeline.artifacts import coding_metrics, publish
from iteralite.pipeline.baseline import load_baseline
from iteralite.pipeline.mixed import MixedConfig, run_mixed
from iteralite.pipeline.mixed_report import plot_allocation, write_pareto
from iteralite.pipeline.stage import TRAIN_QUALITY, run_for_target, write_metrics
from iteralite.pipeline.student import StudentConfig
from iteralite.quant.allocate import sizes_table, summarize
from iteralite.quant.config import mixed_config
from iteralite.quant.qat import QATConfig
from iteralite.quant.swap import dequantize_model
from iteralite.train.live import stage_live


def main(target: str):
    cfg = load_section(MixedConfig, "mixed_precision").for_target(target)
    stage = paths.target_stage("mixed_precision", target)
    out = lambda path: paths.for_target(path, target)  # noqa: E731 - this target's output paths
    src = out(paths.STUDENT_CKPT)
    ft = load_section(QATConfig, "finetune")
    lr = cfg.finetune_lr or ft.lr
    qcfg = dataclasses.replace(ft, steps=cfg.finetune_steps, seed=cfg.seed, lr=lr, min_lr=ft.min_lr * lr / ft.lr,
                               warmup_steps=min(ft.warmup_steps, cfg.finetune_steps - 1),
                               learned_range=cfg.learned_range)
    base = load_baseline(train_metrics=TRAIN_QUALITY)
    start = dequantize_model(load_model(src)[0])
    with stage_live(paths.live_dir(stage)) as live:
        res = run_mixed(base.model, start, base.train_tokens, cfg, qcfg, dev=base.dev_tokens, live=live)
    sizes = sizes_table(start, cfg.precisions, cfg.group_size, cfg.scale_bits)
    meta = {"stage": stage, "parent": src}

    rows = []
    for name, (model, alloc) in res.candidates.items():
        path = paths.mixed_candidate(name, target)
        save_checkpoint(path, model, kind=f"mixed-{name}", tokenizer_sha256=base.ckpt.tokenizer_sha256,
                        quant=mixed_config(alloc, cfg.group_size, start), meta=meta, layout="compact")
        rows.append({"name": name, "size_bytes": os.path.getsize(path),
                     "val_ppl": math.exp(base.evaluator.valid_loss(model)), **summarize(alloc, sizes, start)})
    quant = mixed_config(res.allocation, cfg.group_size, start)
    ckpt = out(paths.MIXED_CKPT)
    loaded, metrics = publish(ckpt, res.model, base, kind=f"mixed-{cfg.policy}", quant=quant, meta=meta,
                              layout="compact")
    metrics.update(coding_metrics(ckpt, loaded, out(paths.MIXED_CODING_CSV), kind=f"mixed-{cfg.policy}",
                                  tokenizer_sha256=base.ckpt.tokenizer_sha256, quant=quant, meta=meta))
    headline = f"mixed_{cfg.policy}"
    rows.append({"name": headline, "size_bytes": metrics["size_bytes"], "val_ppl": metrics["val_ppl"]})
    write_pareto(rows, out(paths.MIXED_PARETO_PNG), out(paths.MIXED_PARETO_CSV), base.metrics["val_ppl"], headline)
    plot_allocation(res.allocation, res.info["profile"], out(paths.MIXED_ALLOCATION_PNG),
                    f"{headline} ({target}): precision per unit (from the student)")
    write_metrics(out(paths.MIXED_METRICS), {
        **metrics, "target": target, "policy": cfg.policy, "objective": cfg.objective,
        "max_ppl_delta_pct": cfg.max_ppl_delta_pct, "from": src, **summarize(res.allocation, sizes, start),
        "allocation": res.allocation, "pareto": {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in rows},
        **res.info}, quality=True)


if __name__ == "__main__":
    run_for_target("mixed_precision", "stages/mixed_precision.py",
                   lambda: load_section(StudentConfig, "student").targets, main)

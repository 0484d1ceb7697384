"""Stage `mixed_precision`: the smallest allocation of per-tensor precisions inside a quality budget,
fine-tuned and packed, beside uniform precisions and the plan's manual map for comparison."""
import dataclasses
import math
import os

from iteralite.pipeline.baseline import load_baseline
from iteralite.io.checkpoint import header_bytes, load_model, save_checkpoint
from iteralite.io.errors import ParamsError
from iteralite.train.evaluate import artifact_metrics
from iteralite.quant.mixed import mixed_config, to_float
from iteralite.pipeline.mixed_report import plot_allocation, write_pareto
from iteralite.io.params import load_section
from iteralite.quant.precision import MixedConfig, run_mixed, sizes_table, summarize
from iteralite.quant.qat import QATConfig
from iteralite.pipeline.stage import run, write_metrics

OUT = "checkpoints/mixed.safetensors"


def main():
    cfg = load_section(MixedConfig, "mixed_precision")
    src = f"checkpoints/finetune/{cfg.from_ratio}.safetensors"
    if not os.path.exists(src):  # prune.ratios is not a param of this stage: a ratio sweep must not rerun it
        raise ParamsError(f"params: 'mixed_precision.from_ratio' {cfg.from_ratio}: {src} does not exist; "
                          "use a ratio from prune.ratios (its finetune stage writes that file)")
    ft = load_section(QATConfig, "finetune")
    qcfg = dataclasses.replace(ft, steps=cfg.finetune_steps, seed=cfg.seed,
                               warmup_steps=min(ft.warmup_steps, cfg.finetune_steps - 1))
    base = load_baseline()
    evaluator, fp32 = base.evaluator, base.metrics
    start = to_float(load_model(src)[0])
    res = run_mixed(base.model, start, base.train_tokens, cfg, qcfg)
    sizes = sizes_table(start, cfg.precisions, cfg.group_size)

    def save(path, model, alloc, kind):
        save_checkpoint(path, model, kind=kind, tokenizer_sha256=base.ckpt.tokenizer_sha256,
                        quant=mixed_config(alloc, cfg.group_size, start), meta={"stage": "mixed_precision", "parent": src})

    rows = []
    for name, (model, alloc) in res.candidates.items():
        path = f"checkpoints/mixed/{name}.safetensors"
        save(path, model, alloc, f"mixed-{name}")
        rows.append({"name": name, "size_bytes": os.path.getsize(path), "val_ppl": math.exp(evaluator.valid_loss(model)),
                     **summarize(alloc, sizes, start)})
    save(OUT, res.model, res.allocation, f"mixed-{cfg.policy}")
    model, _ = load_model(OUT)  # score what is on disk
    metrics = artifact_metrics(model, OUT, fp32, evaluator(model))
    headline = f"mixed_{cfg.policy}"
    rows.append({"name": headline, "size_bytes": metrics["size_bytes"], "val_ppl": metrics["val_ppl"]})
    write_pareto(rows, "plots/mixed_pareto.png", "plots/mixed_pareto.csv", fp32["val_ppl"], headline)
    plot_allocation(res.allocation, res.info["profile"], "plots/mixed_allocation.png",
                    f"{headline}: precision per unit (from finetune@{cfg.from_ratio})")
    write_metrics("metrics/mixed_precision.json", {
        **metrics, "policy": cfg.policy, "objective": cfg.objective, "max_ppl_delta_pct": cfg.max_ppl_delta_pct,
        "from": src, "header_bytes": header_bytes(OUT), **summarize(res.allocation, sizes, start),
        "allocation": res.allocation, "pareto": {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in rows},
        **res.info})


if __name__ == "__main__":
    run("mixed_precision", main)

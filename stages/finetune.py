"""Stage `finetune@<ratio>`: recovery fine-tuning of a pruned model (QAT on, distilled from FP32);
step metrics in dvclive/finetune_<ratio>."""
import json

from iteralite.io.checkpoint import load_model
from iteralite.io.params import load_section
from iteralite.pipeline import paths
from iteralite.pipeline.artifacts import publish
from iteralite.pipeline.baseline import load_baseline
from iteralite.pipeline.stage import TRAIN_QUALITY, quality_path, ratio_arg, run, write_metrics
from iteralite.prune.config import PruneConfig
from iteralite.quant.config import quant_config
from iteralite.quant.qat import QATConfig, qat
from iteralite.quant.spec import QuantSpec
from iteralite.quant.swap import dequantize_model
from iteralite.train.live import stage_live


def main():
    text, _ = ratio_arg(load_section(PruneConfig, "prune").ratios, "stages/finetune.py")
    cfg = load_section(QATConfig, "finetune")
    base = load_baseline(train_metrics=TRAIN_QUALITY)
    src = paths.ratio_ckpt("prune", text)
    pruned, _ = load_model(src)
    spec = QuantSpec(bits=4, group_size=cfg.group_size, symmetric=cfg.symmetric, method="rtn")
    with stage_live(paths.live_dir("finetune", text)) as live:
        model, stats = qat(base.model, spec, base.train_tokens, cfg, student=dequantize_model(pruned),
                           desc=f"finetune {text}", live=live)
    _, metrics = publish(paths.ratio_ckpt("finetune", text), model, base, kind="int4-pruned-finetuned",
                         quant=quant_config(model), meta={"stage": "finetune", "parent": src, **stats})
    with open(quality_path(paths.ratio_metrics("prune", text))) as f:
        pm = json.load(f)
    write_metrics(paths.ratio_metrics("finetune", text), {
        **metrics, "ratio": pm["ratio"], "prunable_params_removed_frac": pm["prunable_params_removed_frac"],
        "layers": pm["layers"], **stats}, quality=True)


if __name__ == "__main__":
    run("finetune", main)

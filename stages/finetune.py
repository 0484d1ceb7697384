"""Stage `finetune@<ratio>`: recovery fine-tuning of a pruned model (QAT on, distilled from FP32)."""
import json

from iteralite.pipeline.baseline import load_baseline
from iteralite.io.checkpoint import load_model, save_checkpoint
from iteralite.train.evaluate import artifact_metrics
from iteralite.io.params import load_section
from iteralite.prune.prune import PruneConfig
from iteralite.quant.qat import QATConfig, qat
from iteralite.quant.quantize import QuantSpec
from iteralite.quant.qmodules import dequantize_model, quant_config
from iteralite.pipeline.stage import ratio_arg, run, write_metrics


def main():
    text, _ = ratio_arg(load_section(PruneConfig, "prune").ratios, "stages/finetune.py")
    cfg = load_section(QATConfig, "finetune")
    base = load_baseline()
    src = f"checkpoints/prune/{text}.safetensors"
    pruned, _ = load_model(src)
    spec = QuantSpec(bits=4, group_size=cfg.group_size, symmetric=cfg.symmetric, method="rtn")
    model, stats = qat(base.model, spec, base.train_tokens, cfg, student=dequantize_model(pruned),
                       desc=f"finetune {text}")
    out = f"checkpoints/finetune/{text}.safetensors"
    save_checkpoint(out, model, kind="int4-pruned-finetuned", tokenizer_sha256=base.ckpt.tokenizer_sha256,
                    quant=quant_config(model), meta={"stage": "finetune", "parent": src, **stats})
    model, _ = load_model(out)  # score what is on disk
    with open(f"metrics/prune_{text}.json") as f:
        pm = json.load(f)
    write_metrics(f"metrics/finetune_{text}.json", {
        **artifact_metrics(model, out, base.metrics, base.evaluator(model)), "ratio": pm["ratio"],
        "prunable_params_removed_frac": pm["prunable_params_removed_frac"], "layers": pm["layers"], **stats})


if __name__ == "__main__":
    run("finetune", main)

"""Stage `finetune@<ratio>`: recovery fine-tuning of a pruned model (QAT on, distilled from FP32)."""
import json

import torch

from iteralite.checkpoint import load_model, save_checkpoint
from iteralite.evaluate import EvalConfig, Evaluator, artifact_metrics
from iteralite.params import load_section
from iteralite.prune import PruneConfig
from iteralite.qat import QATConfig, qat
from iteralite.quantize import QuantSpec
from iteralite.qmodules import dequantize_model, quant_config
from iteralite.stage import ratio_arg, run, write_metrics
from iteralite.tokenizer import load_tokens

FP32 = "checkpoints/fp32.safetensors"


def main():
    text, _ = ratio_arg(load_section(PruneConfig, "prune").ratios, "stages/finetune.py")
    cfg = load_section(QATConfig, "finetune")
    evaluator = Evaluator(load_section(EvalConfig, "eval"))
    teacher, ckpt = load_model(FP32)
    src = f"checkpoints/prune/{text}.safetensors"
    pruned, _ = load_model(src)
    data = torch.from_numpy(load_tokens("data/tokenizer/train.npy").astype("int64"))
    spec = QuantSpec(bits=4, group_size=cfg.group_size, symmetric=cfg.symmetric, method="rtn")
    model, stats = qat(teacher, spec, data, cfg, student=dequantize_model(pruned), desc=f"finetune {text}")
    out = f"checkpoints/finetune/{text}.safetensors"
    save_checkpoint(out, model, kind="int4-pruned-finetuned", tokenizer_sha256=ckpt.tokenizer_sha256,
                    quant=quant_config(model), meta={"stage": "finetune", "parent": src, **stats})
    model, _ = load_model(out)
    fp32 = json.load(open("metrics/train.json"))
    pm = json.load(open(f"metrics/prune_{text}.json"))
    write_metrics(f"metrics/finetune_{text}.json", {
        **artifact_metrics(model, out, fp32, evaluator(model)), "ratio": pm["ratio"],
        "prunable_params_removed_frac": pm["prunable_params_removed_frac"], "layers": pm["layers"], **stats})


if __name__ == "__main__":
    run("finetune", main)

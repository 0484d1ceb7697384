"""Stage `qat`: quantization-aware training from FP32 (fake quant + distillation), packed export."""
import json

import torch

from iteralite.checkpoint import load_model, save_checkpoint
from iteralite.evaluate import EvalConfig, Evaluator, artifact_metrics
from iteralite.params import load_section
from iteralite.qat import QATConfig, qat
from iteralite.quantize import QuantSpec
from iteralite.qmodules import quant_config
from iteralite.stage import run, write_metrics
from iteralite.tokenizer import load_tokens

FP32 = "checkpoints/fp32.safetensors"
OUT = "checkpoints/qat.safetensors"


def main():
    cfg = load_section(QATConfig, "qat")
    evaluator = Evaluator(load_section(EvalConfig, "eval"))
    fp32_model, ckpt = load_model(FP32)
    fp32 = json.load(open("metrics/train.json"))
    data = torch.from_numpy(load_tokens("data/tokenizer/train.npy").astype("int64"))
    spec = QuantSpec(bits=4, group_size=cfg.group_size, symmetric=cfg.symmetric, method="rtn")
    model, stats = qat(fp32_model, spec, data, cfg)
    save_checkpoint(OUT, model, kind="int4-qat", tokenizer_sha256=ckpt.tokenizer_sha256, quant=quant_config(model),
                    meta={"stage": "qat", "parent": FP32, **stats})
    model, _ = load_model(OUT)
    write_metrics("metrics/qat.json", {**artifact_metrics(model, OUT, fp32, evaluator(model)), **stats,
                                       "group_size": cfg.group_size, "symmetric": cfg.symmetric})


if __name__ == "__main__":
    run("qat", main)

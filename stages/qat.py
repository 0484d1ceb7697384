"""Stage `qat`: quantization-aware training from FP32 (fake quant + distillation), packed export."""
from iteralite.pipeline.baseline import FP32, load_baseline
from iteralite.io.checkpoint import load_model, save_checkpoint
from iteralite.train.evaluate import artifact_metrics
from iteralite.io.params import load_section
from iteralite.quant.qat import QATConfig, qat
from iteralite.quant.quantize import QuantSpec
from iteralite.quant.qmodules import quant_config
from iteralite.pipeline.stage import run, write_metrics

OUT = "checkpoints/qat.safetensors"


def main():
    cfg = load_section(QATConfig, "qat")
    base = load_baseline()
    spec = QuantSpec(bits=4, group_size=cfg.group_size, symmetric=cfg.symmetric, method="rtn")
    model, stats = qat(base.model, spec, base.train_tokens, cfg)
    save_checkpoint(OUT, model, kind="int4-qat", tokenizer_sha256=base.ckpt.tokenizer_sha256,
                    quant=quant_config(model), meta={"stage": "qat", "parent": FP32, **stats})
    model, _ = load_model(OUT)  # score what is on disk
    write_metrics("metrics/qat.json", {**artifact_metrics(model, OUT, base.metrics, base.evaluator(model)), **stats,
                                       "group_size": cfg.group_size, "symmetric": cfg.symmetric})


if __name__ == "__main__":
    run("qat", main)

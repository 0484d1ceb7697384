"""Stage `qat`: quantization-aware training from FP32 (fake quant + distillation), packed export;
step metrics in dvclive/qat."""
from iteralite.io.params import load_section
from iteralite.pipeline import paths
from iteralite.pipeline.artifacts import publish
from iteralite.pipeline.baseline import load_baseline
from iteralite.pipeline.stage import TRAIN_QUALITY, run, write_metrics
from iteralite.quant.config import quant_config
from iteralite.quant.qat import QATConfig, qat
from iteralite.quant.spec import QuantSpec
from iteralite.train.live import stage_live


def main():
    cfg = load_section(QATConfig, "qat")
    base = load_baseline(train_metrics=TRAIN_QUALITY)
    spec = QuantSpec(bits=4, group_size=cfg.group_size, symmetric=cfg.symmetric, method="rtn")
    with stage_live(paths.live_dir("qat")) as live:
        model, stats = qat(base.model, spec, base.train_tokens, cfg, live=live)
    _, metrics = publish(paths.QAT_CKPT, model, base, kind="int4-qat", quant=quant_config(model),
                         meta={"stage": "qat", "parent": paths.FP32_CKPT, **stats})
    write_metrics(paths.QAT_METRICS, {**metrics, **stats, "group_size": cfg.group_size, "symmetric": cfg.symmetric},
                  quality=True)


if __name__ == "__main__":
    run("qat", main)

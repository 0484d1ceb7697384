"""Stage `prune@<ratio>`: iterative structured pruning of the QAT model with recovery, 4-bit export;
the recoveries' step metrics in dvclive/prune_<ratio>."""
from iteralite.io.checkpoint import load_model
from iteralite.io.params import load_section
from iteralite.pipeline import paths
from iteralite.pipeline.artifacts import publish
from iteralite.pipeline.baseline import load_baseline
from iteralite.pipeline.stage import TRAIN_QUALITY, ratio_arg, run, write_metrics
from iteralite.prune.config import PruneConfig
from iteralite.prune.recovery import prune_with_recovery
from iteralite.quant.config import quant_config
from iteralite.quant.qat import QATConfig
from iteralite.quant.spec import QuantSpec
from iteralite.quant.swap import make_spec_for, quantize
from iteralite.train.live import stage_live


def main():
    cfg = load_section(PruneConfig, "prune")
    text, ratio = ratio_arg(cfg.ratios, "stages/prune.py")
    ft = load_section(QATConfig, "finetune")
    base = load_baseline(train_metrics=TRAIN_QUALITY)
    qat_model, _ = load_model(paths.QAT_CKPT)
    spec = QuantSpec(bits=4, group_size=ft.group_size, symmetric=ft.symmetric, method="rtn")
    with stage_live(paths.live_dir("prune", text)) as live:
        model, report, history = prune_with_recovery(qat_model, base.model, base.train_tokens, ratio, cfg, spec, ft,
                                                     dev=base.dev_tokens, live=live)
    packed = quantize(model, make_spec_for(spec, tuple(ft.keep_float)))
    _, metrics = publish(paths.ratio_ckpt("prune", text), packed, base, kind="int4-pruned", quant=quant_config(packed),
                         meta={"stage": "prune", "parent": paths.QAT_CKPT, "ratio": ratio})
    write_metrics(paths.ratio_metrics("prune", text), {
        **metrics, "ratio": ratio, "prunable_params_removed_frac": round(report["prunable_params_removed_frac"], 5),
        "prunable_params": report["base_prunable"], "prunable_params_kept": report["prunable_after"],
        "layers": report["layers"], "sparsity": report["sparsity"], "schedule": history}, quality=True)


if __name__ == "__main__":
    run("prune", main)

"""Stage `prune@<ratio>`: iterative structured pruning of the QAT model with recovery, 4-bit export."""
from iteralite.pipeline.baseline import load_baseline
from iteralite.io.checkpoint import load_model, save_checkpoint
from iteralite.train.evaluate import artifact_metrics
from iteralite.prune.recovery import prune_with_recovery
from iteralite.io.params import load_section
from iteralite.prune.prune import PruneConfig
from iteralite.quant.qat import QATConfig
from iteralite.quant.quantize import QuantSpec
from iteralite.quant.qmodules import make_spec_for, quant_config, quantize_model
from iteralite.pipeline.stage import ratio_arg, run, write_metrics

QAT = "checkpoints/qat.safetensors"


def main():
    cfg = load_section(PruneConfig, "prune")
    text, ratio = ratio_arg(cfg.ratios, "stages/prune.py")
    ft = load_section(QATConfig, "finetune")
    base = load_baseline()
    qat_model, _ = load_model(QAT)
    spec = QuantSpec(bits=4, group_size=ft.group_size, symmetric=ft.symmetric, method="rtn")
    model, report, history = prune_with_recovery(qat_model, base.model, base.train_tokens, ratio, cfg, spec, ft)
    packed = quantize_model(model, make_spec_for(spec, tuple(ft.keep_float)))
    out = f"checkpoints/prune/{text}.safetensors"
    save_checkpoint(out, packed, kind="int4-pruned", tokenizer_sha256=base.ckpt.tokenizer_sha256,
                    quant=quant_config(packed), meta={"stage": "prune", "parent": QAT, "ratio": ratio})
    packed, _ = load_model(out)  # score what is on disk
    write_metrics(f"metrics/prune_{text}.json", {
        **artifact_metrics(packed, out, base.metrics, base.evaluator(packed)), "ratio": ratio,
        "prunable_params_removed_frac": round(report["prunable_params_removed_frac"], 5),
        "prunable_params": report["base_prunable"], "prunable_params_kept": report["prunable_after"],
        "layers": report["layers"], "sparsity": report["sparsity"], "schedule": history})


if __name__ == "__main__":
    run("prune", main)

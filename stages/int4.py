"""Stage `int4`: every 4-bit method as a packed artifact, its quality, size and decode speed."""
from iteralite.pipeline.baseline import FP32, load_baseline
from iteralite.bench.benchmark import decode_tok_s
from iteralite.quant.calibrate import load_stats
from iteralite.io.checkpoint import load_model, save_checkpoint
from iteralite.train.evaluate import artifact_metrics
from iteralite.pipeline.int4 import Int4Config, quantize_int4
from iteralite.io.params import load_section
from iteralite.quant.qmodules import quant_config, set_int4_kernel
from iteralite.pipeline.stage import run, write_metrics


def main():
    cfg = load_section(Int4Config, "int4")
    base = load_baseline(train_tokens=False)
    evaluator, fp32_model, fp32_ckpt, fp32 = base.evaluator, base.model, base.ckpt, base.metrics
    stats = {kind: load_stats("checkpoints/calibration.safetensors", kind)[0] for kind in ("act_sq_mean", "hessian")}
    rows = {}
    for method in cfg.methods():
        model = quantize_int4(fp32_model, method, cfg, stats)
        path = f"checkpoints/int4/{method}.safetensors"
        save_checkpoint(path, model, kind=f"int4-{method}", tokenizer_sha256=fp32_ckpt.tokenizer_sha256,
                        quant=quant_config(model), meta={"stage": "int4", "parent": FP32})
        model, _ = load_model(path)  # score what is on disk
        rows[method] = artifact_metrics(model, path, fp32, evaluator(model))
        print(f"[int4] {method}: {rows[method]}")
    out = {**rows[cfg.method], "method": cfg.method, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
           "embedding": cfg.embedding, "methods": rows}
    if cfg.act_int8:
        model = quantize_int4(fp32_model, cfg.method, cfg, stats, act_int8=True)
        q = evaluator(model)
        out["act_int8"] = {**q, "val_ppl_delta_pct": round(100 * (q["val_ppl"] / fp32["val_ppl"] - 1), 3)}
    if cfg.speed_tokens:
        # Same process, same thread count: FP32 vs the 4-bit artifact with weights dequantized once at
        # load (what iteralite runs) vs torch's packed int4 CPU matmul on every eligible linear.
        model, _ = load_model(f"checkpoints/int4/{cfg.method}.safetensors")
        speed = {"decode_tok_s_fp32": decode_tok_s(fp32_model, cfg.speed_tokens),
                 "decode_tok_s_int4_dequantized": decode_tok_s(model, cfg.speed_tokens)}
        n = set_int4_kernel(model, True)
        speed["decode_tok_s_int4_kernel"] = decode_tok_s(model, cfg.speed_tokens)
        speed["int4_kernel_linears"] = n
        out["speed"] = {k: round(v, 1) for k, v in speed.items()}
    write_metrics("metrics/int4.json", out)


if __name__ == "__main__":
    run("int4", main)

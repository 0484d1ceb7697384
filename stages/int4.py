"""Stage `int4`: every 4-bit method as a packed artifact, its quality, size and decode speed."""
from iteralite.bench.timing import decode_tok_s
from iteralite.io.checkpoint import load_model
from iteralite.io.params import load_section
from iteralite.pipeline import paths
from iteralite.pipeline.artifacts import publish
from iteralite.pipeline.baseline import load_baseline
from iteralite.pipeline.int4 import Int4Config, quantize_int4
from iteralite.pipeline.stage import TRAIN_QUALITY, run, write_metrics
from iteralite.quant.calibrate import load_stats
from iteralite.quant.config import quant_config
from iteralite.quant.kernels import set_int4_kernel


def main():
    cfg = load_section(Int4Config, "int4")
    base = load_baseline(train_tokens=False, train_metrics=TRAIN_QUALITY)
    fp32_model, fp32 = base.model, base.metrics
    stats = {kind: load_stats(paths.CALIBRATION, kind)[0] for kind in ("act_sq_mean", "hessian")}
    rows = {}
    for method in cfg.methods():
        model = quantize_int4(fp32_model, method, cfg, stats)
        _, rows[method] = publish(paths.int4_ckpt(method), model, base, kind=f"int4-{method}",
                                  quant=quant_config(model), meta={"stage": "int4", "parent": paths.FP32_CKPT})
        print(f"[int4] {method}: {rows[method]}")
    out = {**rows[cfg.method], "method": cfg.method, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
           "embedding": cfg.embedding, "methods": rows}
    if cfg.act_int8:
        model = quantize_int4(fp32_model, cfg.method, cfg, stats, act_int8=True)
        q = base.evaluator(model)
        out["act_int8"] = {**q, "val_ppl_delta_pct": round(100 * (q["val_ppl"] / fp32["val_ppl"] - 1), 3)}
    if cfg.speed_tokens:
        # Same process, same thread count: FP32 vs the 4-bit artifact with weights dequantized once at
        # load (what iteralite runs) vs torch's packed int4 CPU matmul on every eligible linear.
        model, _ = load_model(paths.int4_ckpt(cfg.method))
        speed = {"decode_tok_s_fp32": decode_tok_s(fp32_model, cfg.speed_tokens),
                 "decode_tok_s_int4_dequantized": decode_tok_s(model, cfg.speed_tokens)}
        n = set_int4_kernel(model, True)
        speed["decode_tok_s_int4_kernel"] = decode_tok_s(model, cfg.speed_tokens)
        speed["int4_kernel_linears"] = n
        out["speed"] = {k: round(v, 1) for k, v in speed.items()}
    write_metrics(paths.INT4_METRICS, out, quality=True)


if __name__ == "__main__":
    run("int4", main)

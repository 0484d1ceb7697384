"""Stage `fuse`: the mixed-precision model as a fused, compiled CPU model; checks that it decodes
exactly what the unfused model decodes, scores it, and times both in this process."""
import time

import torch

from iteralite.pipeline.baseline import load_baseline
from iteralite.bench.memory import peak_rss
from iteralite.bench.timing import decode_tok_s, prefill_ms
from iteralite.io.checkpoint import load_model
from iteralite.runtime.deploy import FuseConfig, fuse, save_fused
from iteralite.train.evaluate import artifact_metrics
from iteralite.train.generate import generate_ids
from iteralite.io.params import load_section
from iteralite.bench.memory import state_bytes
from iteralite.pipeline import paths
from iteralite.pipeline.stage import TRAIN_QUALITY, run, write_metrics
from iteralite.data.tokenizer import load_tokenizer

SRC, OUT = paths.MIXED_CKPT, paths.FUSED_CKPT


def main():
    cfg = load_section(FuseConfig, "fuse")
    base = load_baseline(train_tokens=False, train_metrics=TRAIN_QUALITY)
    unfused, ckpt = load_model(SRC)
    save_fused(OUT, unfused, ckpt, cfg, SRC)
    t0 = time.perf_counter()
    fused = fuse(load_model(OUT)[0], cfg.backend, cfg.prefill_lens)
    compile_s = time.perf_counter() - t0
    prompt = load_tokenizer(paths.TOKENIZER_JSON).encode(cfg.prompt, add_special_tokens=False).ids
    greedy = [list(generate_ids(m, prompt, cfg.greedy_tokens, temperature=0)) for m in (unfused, fused)]
    with torch.no_grad():
        idx = torch.tensor([prompt])
        logit_diff = float((fused(idx)[0] - unfused(idx)[0]).abs().max())
    speed = {"decode_tok_s_1thread": decode_tok_s(fused, cfg.speed_tokens, repeats=cfg.repeats, threads=1),
             "decode_tok_s_1thread_unfused": decode_tok_s(unfused, cfg.speed_tokens, repeats=cfg.repeats, threads=1),
             "decode_tok_s_1thread_fp32_eager": decode_tok_s(base.model, cfg.speed_tokens, repeats=cfg.repeats, threads=1),
             "prefill_ms_128": prefill_ms(fused, 128, repeats=cfg.repeats, threads=1),
             "prefill_ms_128_unfused": prefill_ms(unfused, 128, repeats=cfg.repeats, threads=1)}
    speed = {k: round(v, 3) for k, v in speed.items()}
    write_metrics(paths.FUSE_METRICS, {
        **artifact_metrics(unfused, OUT, base.metrics, base.evaluator(fused)), **speed,
        "decode_speedup_vs_fp32_eager": round(speed["decode_tok_s_1thread"] / speed["decode_tok_s_1thread_fp32_eager"], 2),
        "decode_speedup_vs_unfused": round(speed["decode_tok_s_1thread"] / speed["decode_tok_s_1thread_unfused"], 2),
        "greedy_tokens": cfg.greedy_tokens, "greedy_match_unfused": greedy[0] == greedy[1],
        "greedy_first_mismatch": next((i for i, (a, b) in enumerate(zip(*greedy)) if a != b), None),
        "max_abs_logit_diff_prompt": round(logit_diff, 7), "compile_seconds": round(compile_s, 1),
        "backend": cfg.backend, "resident_weight_bytes": state_bytes(fused), **peak_rss("fused", OUT)},
        quality=True)


if __name__ == "__main__":
    run("fuse", main)

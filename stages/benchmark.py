"""Stage `benchmark`: every artifact and its peers side by side in one process: size, quality,
decode and prefill speed, peak memory, decode hotspots; the final report. The stages' quality comes
from their timing-free records (metrics/quality/), never from a file a forced rerun rewrites."""
import json
import types

from iteralite.pipeline.baseline import load_baseline
from iteralite.bench.report import write_bench_report
from iteralite.bench.suite import BenchmarkConfig, Prompt, plan, rounded, run_benchmark
from iteralite.data.tokenizer import load_tokenizer
from iteralite.pipeline.int4 import Int4Config
from iteralite.io.params import load_section
from iteralite.prune.config import PruneConfig
from iteralite.pipeline import paths
from iteralite.pipeline.stage import TRAIN_QUALITY, quality_path, run, write_metrics


def quality_paths() -> types.SimpleNamespace:
    """`pipeline.paths` with every stage metrics file replaced by its quality record."""
    names = {k: getattr(paths, k) for k in dir(paths) if not k.startswith("_")}
    names |= {k: str(quality_path(v)) for k, v in names.items() if k.endswith("_METRICS")}
    names["ratio_metrics"] = lambda stage, ratio: str(quality_path(paths.ratio_metrics(stage, ratio)))
    return types.SimpleNamespace(**names)


def main():
    cfg = load_section(BenchmarkConfig, "benchmark")
    ratios = load_section(PruneConfig, "prune").ratios
    base = load_baseline(train_tokens=False, train_metrics=TRAIN_QUALITY)
    variants = plan(ratios, Int4Config.methods(load_section(Int4Config, "int4")), cfg.peers, quality_paths(),
                    cfg.programs)
    ids = load_tokenizer(paths.TOKENIZER_JSON).encode(cfg.prompt, add_special_tokens=False).ids
    prompt = Prompt(cfg.prompt, ids, f"{paths.TOKENIZER_DIR}/tokenizer.bin")
    results, hotspots = run_benchmark(variants, cfg, base.evaluator, base.metrics, prompt)
    with open(quality_path(paths.FUSE_METRICS)) as f:
        fuse = json.load(f)
    results["fused"].update({k: fuse[k] for k in ("greedy_match_unfused", "greedy_tokens")})
    results = rounded(results)
    write_metrics(paths.BENCH_METRICS, results)
    write_bench_report(results, paths.BENCH_REPORT, paths.BENCH_PARETO_PNG, paths.BENCH_SPEED_PNG,
                       paths.BENCH_PARETO_CSV, hotspots, title="iteralite: every variant side by side")


if __name__ == "__main__":
    run("benchmark", main)

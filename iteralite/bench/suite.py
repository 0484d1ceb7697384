"""The benchmark stage's plan: which variants, where their quality numbers come from, and the
side-by-side measurement of all of them in one process.

Variants are the pipeline's artifacts (fp32, int4 per method, qat, prune and finetune per ratio,
mixed, fused) and peers built from the FP32 checkpoint (FP32 under torch.compile, a bitsandbytes
NF4 swap, torch int8 weight-only). Quality of an artifact is read from the metrics file of the
stage that wrote it (the same file scored by the same deterministic evaluation; `quality_from`
names the file), so it is not recomputed; peers are scored here. A peer with FP32's weights and
math (torch.compile) takes FP32's quality only if its logits match FP32's on a probe within
`SAME_WEIGHTS_ATOL`; otherwise it is scored here like the other peers, and its row says why.
Speed and peak memory are measured here for every variant, in this process (speed) and in a
fresh process each (memory). Speed is measured twice per row, like for like (`loops`): the same
Python step loop for every runtime, and the runtime's own best loop; the programs (`programs`:
itl-run, the wasm build) are rows of their own, timed by their own loop.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch

from iteralite.bench.loops import agreement, best_loop, greedy_ids, measure_loops, speedups
from iteralite.bench.memory import peak_rss
from iteralite.bench.memory import state_bytes
from iteralite.bench.programs import PROGRAMS, instructions_per_token, program_row
from iteralite.bench.timing import profile_hotspots
from iteralite.bench.variants import PEER_KINDS, load_variant, resolve, variant_kind
from iteralite.io.params import check

SAME_WEIGHTS_ATOL = 1e-3  # max |logit difference| from FP32 for a same-weights peer to take FP32's quality
QUALITY_KEYS = ("params", "bits_per_weight", "compression_vs_fp32", "val_ppl", "val_bpb", "val_ppl_delta_pct",
                "wikitext2_ppl")


@dataclass
class BenchmarkConfig:
    decode_tokens: int = 64  # greedy tokens timed per repeat
    repeats: int = 3
    rss_tokens: int = 32  # tokens decoded in the memory probe
    profile_tokens: int = 32  # decode steps under the profiler (fp32 eager and fused)
    hotspots_top: int = 10
    peers: list[str] = field(default_factory=lambda: ["compiled", "bnb_nf4", "int8_weight_only"])
    peer_eval_tokens: int = 0  # tokens of each split scored for a peer (0 = the whole split, as the stages)
    prompt: str = "Once upon a time"  # every decode loop starts after this prompt
    agreement_tokens: int = 1000  # greedy steps compared with the eager model of the same artifact
    programs: list[str] = field(default_factory=lambda: ["itl_run", "itl_run_exact", "wasm", "wasm_exact"])
    callgrind_tokens: list[int] = field(default_factory=lambda: [32, 160])  # N1, N2 of instructions_per_token

    def validate(self, section: str = "benchmark") -> None:
        for key in ("decode_tokens", "repeats", "rss_tokens", "profile_tokens", "hotspots_top", "agreement_tokens"):
            check(getattr(self, key) >= 1, section, key, "must be >= 1")
        check(self.peer_eval_tokens >= 0, section, "peer_eval_tokens", "must be >= 0 (0 = whole split)")
        unknown = sorted(set(self.peers) - set(PEER_KINDS))
        check(not unknown, section, "peers", f"has unknown peers {unknown}; allowed: {', '.join(PEER_KINDS)}")
        unknown = sorted(set(self.programs) - set(PROGRAMS))
        check(not unknown, section, "programs", f"has unknown programs {unknown}; allowed: {', '.join(PROGRAMS)}")
        n = self.callgrind_tokens
        check(len(n) == 2 and 1 <= n[0] < n[1], section, "callgrind_tokens",
              f"must be [N1, N2] with 1 <= N1 < N2; got {n}")
        check(bool(self.prompt), section, "prompt", "must not be empty")


@dataclass
class Prompt:
    """The prompt every decode loop starts after: its text, its ids, and the binary tokenizer
    the programs encode it with (None: programs and instruction counts are not run)."""
    text: str = ""
    ids: list[int] = field(default_factory=lambda: [0])
    tokenizer_bin: str | None = None


@dataclass
class Variant:
    name: str
    kind: str  # a variants.VARIANTS key
    path: str  # the checkpoint it is loaded from (a peer: the FP32 checkpoint)
    quality: dict | None = None  # read from a stage's metrics (None: score it here)
    quality_from: str = ""
    reference: str = "mixed"  # a runtime row's artifact row (its scorer compares against it as "mixed")
    program: str | None = None  # a programs.PROGRAMS row: run by that program, not loaded here


def _read(path: str, *keys) -> dict:
    with open(path) as f:
        d = json.load(f)
    for k in keys:
        d = d[k]
    return {k: d[k] for k in QUALITY_KEYS if k in d}


def _stage_output(name: str, kind: str, ckpt: str, metrics: str, *keys) -> Variant:
    """A pipeline artifact whose quality is read from its stage's metrics file (at `keys`)."""
    return Variant(name, kind, ckpt, _read(metrics, *keys), metrics)


def plan(ratios: list[float], int4_methods: list[str], peers: list[str], paths, programs=()) -> list[Variant]:
    """Every variant in report order. `paths` names the pipeline's files (the attributes and
    functions of `iteralite.pipeline.paths`: FP32_CKPT, TRAIN_METRICS, int4_ckpt(method), ...);
    `programs` (programs.PROGRAMS names) run the headline artifact, listed after its native row."""
    v = [_stage_output("fp32", "artifact", paths.FP32_CKPT, paths.TRAIN_METRICS)]
    v += [_stage_output(f"int4_{m}", "artifact", paths.int4_ckpt(m), paths.INT4_METRICS, "methods", m)
          for m in int4_methods]
    v.append(_stage_output("qat", "artifact", paths.QAT_CKPT, paths.QAT_METRICS))
    v += [_stage_output(f"{stage}_{r}", "artifact", paths.ratio_ckpt(stage, r), paths.ratio_metrics(stage, r))
          for r in ratios for stage in ("prune", "finetune")]
    v.append(_stage_output("student", "artifact", paths.STUDENT_CKPT, paths.STUDENT_METRICS))
    v.append(_stage_output("mixed", "artifact", paths.MIXED_CKPT, paths.MIXED_METRICS))
    v.append(_stage_output("fused", "fused", paths.FUSED_CKPT, paths.FUSE_METRICS))
    v.append(Variant("native", "native", paths.MIXED_CKPT))  # the headline artifact on the C step
    v.append(Variant("native_exact", "native_exact", paths.MIXED_CKPT))  # ... with float activations
    v += [Variant(p, "program", paths.MIXED_CKPT, program=p) for p in programs]  # ... by a program
    v.append(Variant("peer_onnxruntime", "onnxruntime", paths.MIXED_CKPT))  # ... on ONNX Runtime
    for target in getattr(paths, "EXTRA_TARGETS", ()):  # the other student targets: artifact and C step
        mixed = f"mixed_{target}"
        v.append(_stage_output(f"student_{target}", "artifact", paths.for_target(paths.STUDENT_CKPT, target),
                               paths.for_target(paths.STUDENT_METRICS, target)))
        v.append(_stage_output(mixed, "artifact", paths.for_target(paths.MIXED_CKPT, target),
                               paths.for_target(paths.MIXED_METRICS, target)))
        v.append(Variant(f"native_{target}", "native", paths.for_target(paths.MIXED_CKPT, target), reference=mixed))
    v += [Variant(f"peer_{p}", p, paths.FP32_CKPT) for p in peers]
    return v


class _ReferenceIds:
    """Greedy ids after the prompt of an artifact run by a reference kind ("artifact": the
    eager model; "native": the C step's greedy loop), computed once per (kind, artifact)."""

    def __init__(self, prompt: Prompt, n: int):
        self.prompt, self.n, self._ids = prompt, n, {}

    def __call__(self, path: str, kind: str = "artifact") -> list[int]:
        if (kind, path) not in self._ids:
            self._ids[kind, path] = greedy_ids(load_variant(kind, path), kind, self.prompt.ids, self.n)
        return self._ids[kind, path]


PROGRAM_REFERENCES = ("eager", "native")  # a program's ids are compared with these runs' ids


def _program_row(v: Variant, cfg: BenchmarkConfig, prompt: Prompt, reference_ids: _ReferenceIds) -> dict:
    if prompt.tokenizer_bin is None:
        return {"kind": "program", "best_loop": PROGRAMS[v.program].label, "available": False,
                "reason": "no binary tokenizer given to the benchmark"}
    kinds = {"eager": "artifact", "native": PROGRAMS[v.program].native}  # the C step in the program's mode
    refs = {name: reference_ids(v.path, kinds[name]) for name in PROGRAM_REFERENCES}
    return program_row(v.program, v.path, prompt.tokenizer_bin, prompt.text, cfg.decode_tokens, cfg.repeats,
                       refs, agreement)


def _instructions(kind: str, path: str, cfg: BenchmarkConfig, prompt: Prompt) -> dict:
    program = best_loop(kind).counted_by
    if program is None:
        return {}
    if prompt.tokenizer_bin is None:
        return {"instructions_available": False, "instructions_reason": "no binary tokenizer given to the benchmark"}
    return instructions_per_token(path, prompt.tokenizer_bin, prompt.text, *cfg.callgrind_tokens, program=program)


def run_benchmark(variants: list[Variant], cfg: BenchmarkConfig, evaluator, fp32_metrics: dict,
                  prompt: Prompt | None = None) -> tuple[dict, dict]:
    """-> ({variant: metrics}, {label: hotspot rows}). Speed of every variant is measured in this
    process, one after another, with the same thread settings, after the same prompt."""
    results, hotspots = {}, {}
    prompt = prompt or Prompt()
    reference_ids = _ReferenceIds(prompt, cfg.agreement_tokens)
    fp32_logits = None
    # (1, 128): the prefill shape every compiled variant is warmed up for, so no new compile here
    probe = torch.randint(0, 100, (1, 128), generator=torch.Generator().manual_seed(0))
    for v in variants:
        if v.program is not None:
            results[v.name] = _program_row(v, cfg, prompt, reference_ids)
            continue
        t0 = time.perf_counter()
        model = load_variant(v.kind, v.path)
        with torch.no_grad():
            model.step(torch.zeros(1, dtype=torch.long), model.init_state(1))
        row: dict = {"kind": v.kind, "load_to_first_token_ms": round(1000 * (time.perf_counter() - t0), 1),
                     "resident_weight_bytes": getattr(model, "resident_weight_bytes", None) or state_bytes(model)}
        with torch.no_grad():
            logits = model(probe)[0]
        if fp32_logits is None:
            fp32_logits = logits
        diff = float((logits - fp32_logits).abs().max())
        scorer = variant_kind(v.kind).scorer
        if scorer is not None:
            seen = {**results, "mixed": results[v.reference]} if v.reference in results else results
            row.update(resolve(scorer)(model, v.path, evaluator, fp32_metrics, seen))
        elif v.quality is not None:
            row.update(v.quality, size_bytes=os.path.getsize(v.path), size_kind="file", quality_from=v.quality_from)
        elif variant_kind(v.kind).same_weights_as_fp32 and diff <= SAME_WEIGHTS_ATOL:
            fp32 = results["fp32"]
            row.update({k: fp32[k] for k in QUALITY_KEYS if k in fp32}, size_bytes=state_bytes(model),
                       size_kind="memory", quality_from=f"{fp32['quality_from']} (same weights as fp32; "
                                                        f"probe logits within {SAME_WEIGHTS_ATOL:g} of fp32's)")
        else:
            why = (f" (logits differ from fp32's by {diff:.3g} > {SAME_WEIGHTS_ATOL:g}: not fp32's quality)"
                   if variant_kind(v.kind).same_weights_as_fp32 else "")
            row.update(_score_peer(load_variant(v.kind, v.path, for_scoring=True), evaluator, cfg, fp32_metrics),
                       size_bytes=state_bytes(model), size_kind="memory", quality_from="benchmark" + why)
        if "bits_per_weight" not in row:  # fp32's training metrics predate the size keys
            from iteralite.train.evaluate import storage_bits
            row["bits_per_weight"] = round(storage_bits(model) / row["params"], 4)
            row["compression_vs_fp32"] = round(fp32_metrics["size_bytes"] / row["size_bytes"], 3)
        row["max_abs_logit_diff_vs_fp32"] = round(diff, 6)
        row.update(measure_loops(v.name, v.kind, model, prompt.ids, cfg.decode_tokens, cfg.repeats))
        if best_loop(v.kind).agree:
            row.update(agreement(greedy_ids(model, v.kind, prompt.ids, cfg.agreement_tokens), reference_ids(v.path)))
        row.update(_instructions(v.kind, v.path, cfg, prompt))
        row.update(peak_rss(v.kind, v.path, cfg.rss_tokens))
        if "peak_minus_baseline_mb" in row:  # the probe's MB are MiB (kB / 1024)
            row["rss_over_baseline_mib"] = row["peak_minus_baseline_mb"]
        if v.name in ("fp32", "fused"):
            hotspots[f"{v.name} (1 thread, {cfg.profile_tokens} decode steps)"] = profile_hotspots(
                model, cfg.profile_tokens, cfg.hotspots_top)
        results[v.name] = row
        del model
    speedups(results)
    return results, hotspots


def _score_peer(model, evaluator, cfg: BenchmarkConfig, fp32: dict) -> dict:
    from iteralite.core.model import IteraLite

    old = evaluator.cfg.max_tokens
    evaluator.cfg.max_tokens = cfg.peer_eval_tokens
    try:
        q = evaluator(model)
    finally:
        evaluator.cfg.max_tokens = old
    params = IteraLite(model.cfg).num_params()
    return {**q, "params": params, "bits_per_weight": round(8 * state_bytes(model) / params, 4),
            "compression_vs_fp32": round(fp32["size_bytes"] / state_bytes(model), 3),
            "val_ppl_delta_pct": round(100 * (q["val_ppl"] / fp32["val_ppl"] - 1), 3),
            "eval_tokens": cfg.peer_eval_tokens or "all"}


def rounded(results: dict) -> dict:
    def r(x):
        return round(x, 4) if isinstance(x, float) else x
    return {k: {kk: r(vv) for kk, vv in v.items()} for k, v in results.items()}

"""The benchmark plan and run: paths come from the `paths` object given to `plan`, and peer
behaviour (quality shared with FP32, a separate model for scoring) comes from the registry."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from iteralite.bench import suite, variants
from iteralite.io.checkpoint import save_checkpoint


def _paths(root):
    """A stand-in for iteralite.pipeline.paths that puts every file under `root`."""
    return SimpleNamespace(
        FP32_CKPT=f"{root}/ck/fp32.st", TRAIN_METRICS=f"{root}/m/train.json", INT4_METRICS=f"{root}/m/int4.json",
        QAT_CKPT=f"{root}/ck/qat.st", QAT_METRICS=f"{root}/m/qat.json", MIXED_CKPT=f"{root}/ck/mixed.st",
        STUDENT_CKPT=f"{root}/ck/student.st", STUDENT_METRICS=f"{root}/m/student.json",
        MIXED_METRICS=f"{root}/m/mixed.json", FUSED_CKPT=f"{root}/ck/fused.st", FUSE_METRICS=f"{root}/m/fuse.json",
        int4_ckpt=lambda m: f"{root}/ck/int4-{m}.st",
        ratio_ckpt=lambda stage, r: f"{root}/ck/{stage}-{r}.st",
        ratio_metrics=lambda stage, r: f"{root}/m/{stage}-{r}.json")


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_plan_takes_every_path_from_the_paths_object(tmp_path):
    p = _paths(tmp_path)
    q = {"val_ppl": 16.0, "params": 10, "not_a_quality_key": 1}
    for f in (p.TRAIN_METRICS, p.QAT_METRICS, p.MIXED_METRICS, p.FUSE_METRICS, p.STUDENT_METRICS,
              p.ratio_metrics("prune", 0.3), p.ratio_metrics("finetune", 0.3)):
        _write(tmp_path / f, q)
    _write(tmp_path / p.INT4_METRICS, {"methods": {"rtn": {"val_ppl": 17.0}, "gptq": {"val_ppl": 16.5}}})
    plan = suite.plan([0.3], ["rtn", "gptq"], ["int8_weight_only", "compiled"], p)
    got = [(v.name, v.kind, v.path, v.quality_from) for v in plan]
    assert got == [
        ("fp32", "artifact", p.FP32_CKPT, p.TRAIN_METRICS),
        ("int4_rtn", "artifact", p.int4_ckpt("rtn"), p.INT4_METRICS),
        ("int4_gptq", "artifact", p.int4_ckpt("gptq"), p.INT4_METRICS),
        ("qat", "artifact", p.QAT_CKPT, p.QAT_METRICS),
        ("prune_0.3", "artifact", p.ratio_ckpt("prune", 0.3), p.ratio_metrics("prune", 0.3)),
        ("finetune_0.3", "artifact", p.ratio_ckpt("finetune", 0.3), p.ratio_metrics("finetune", 0.3)),
        ("student", "artifact", p.STUDENT_CKPT, p.STUDENT_METRICS),
        ("mixed", "artifact", p.MIXED_CKPT, p.MIXED_METRICS),
        ("fused", "fused", p.FUSED_CKPT, p.FUSE_METRICS),
        ("native", "native", p.MIXED_CKPT, ""),
        ("native_exact", "native_exact", p.MIXED_CKPT, ""),
        ("peer_onnxruntime", "onnxruntime", p.MIXED_CKPT, ""),
        ("peer_int8_weight_only", "int8_weight_only", p.FP32_CKPT, ""),
        ("peer_compiled", "compiled", p.FP32_CKPT, ""),
    ]
    assert plan[0].quality == {"val_ppl": 16.0, "params": 10}  # quality keys only
    assert plan[2].quality == {"val_ppl": 16.5}  # the method's own entry
    assert plan[-1].quality is None  # peers are measured, not read


class _Evaluator:
    """Records the models it scores; returns fixed quality numbers."""

    def __init__(self):
        self.cfg = SimpleNamespace(max_tokens=123)
        self.scored = []

    def __call__(self, model):
        self.scored.append((model, self.cfg.max_tokens))
        return {"val_ppl": 20.0, "val_bpb": 1.3}


def test_run_benchmark_takes_peer_behaviour_from_the_registry(model, tmp_path, monkeypatch):
    path = tmp_path / "fp32.safetensors"
    save_checkpoint(path, model, kind="fp32", tokenizer_sha256="x")
    # a kind with FP32's weights that costs no compile: its quality must be FP32's, not scored
    monkeypatch.setitem(variants.VARIANTS, "twin",
                        variants.VariantKind("copy:deepcopy", from_fp32=True, same_weights_as_fp32=True))
    monkeypatch.setattr(suite, "peak_rss", lambda kind, p, n: {"peak_rss_mb": 1.0})  # no child knows "twin"
    fp32_quality = {"params": model.num_params(), "val_ppl": 16.0, "val_bpb": 1.1}
    plan = [suite.Variant("fp32", "artifact", str(path), fp32_quality, "m/train.json"),
            suite.Variant("peer_twin", "twin", str(path)),
            suite.Variant("peer_int8_weight_only", "int8_weight_only", str(path))]
    cfg = suite.BenchmarkConfig(decode_tokens=2, repeats=1, profile_tokens=2, hotspots_top=3)
    evaluator = _Evaluator()
    results, hotspots = suite.run_benchmark(plan, cfg, evaluator, {"size_bytes": path.stat().st_size, "val_ppl": 16.0})

    twin = results["peer_twin"]
    assert twin["val_ppl"] == 16.0
    assert twin["quality_from"] == "m/train.json (same weights as fp32; probe logits within 0.001 of fp32's)"
    assert twin["max_abs_logit_diff_vs_fp32"] == 0.0
    int8 = results["peer_int8_weight_only"]
    assert int8["quality_from"] == "benchmark" and int8["val_ppl_delta_pct"] == pytest.approx(25.0)
    [(scored, max_tokens)] = evaluator.scored  # only the int8 peer is scored ...
    assert {m.kernel for m in scored.modules() if hasattr(m, "kernel")} == {False}  # ... on its scoring twin
    assert max_tokens == 0 and evaluator.cfg.max_tokens == 123
    assert results["fp32"]["decode_speedup_vs_fp32_eager"] == 1.0
    assert list(hotspots) == ["fp32 (1 thread, 2 decode steps)"]


def _fake_scorer(model, path, evaluator, fp32, results):
    return {"val_ppl": 99.0, "params": 1, "size_bytes": 5, "quality_from": "scorer", "seen": sorted(results)}


def test_a_kind_with_a_scorer_is_scored_by_it_with_the_rows_so_far(model, tmp_path, monkeypatch):
    path = tmp_path / "fp32.safetensors"
    save_checkpoint(path, model, kind="fp32", tokenizer_sha256="x")
    monkeypatch.setitem(variants.VARIANTS, "scored", variants.VariantKind(
        "iteralite.bench.variants:load_artifact", scorer="tests.bench.test_suite:_fake_scorer"))
    monkeypatch.setattr(suite, "peak_rss", lambda kind, p, n: {"peak_rss_mb": 1.0})
    plan = [suite.Variant("fp32", "artifact", str(path), {"params": model.num_params(), "val_ppl": 16.0}, "m"),
            suite.Variant("s", "scored", str(path))]
    cfg = suite.BenchmarkConfig(decode_tokens=2, repeats=1, profile_tokens=2, hotspots_top=3)
    results, _ = suite.run_benchmark(plan, cfg, _Evaluator(), {"size_bytes": path.stat().st_size, "val_ppl": 16.0})
    row = results["s"]
    assert row["val_ppl"] == 99.0 and row["quality_from"] == "scorer" and row["seen"] == ["fp32"]
    assert row["load_to_first_token_ms"] > 0 and row["resident_weight_bytes"] > 0


def _perturbed_twin(model):
    """Claims FP32's weights but changes them: its logits no longer match FP32's."""
    import copy

    import torch

    m = copy.deepcopy(model)
    with torch.no_grad():
        m.norm_f.weight.mul_(1.5)
    return m


def test_a_same_weights_peer_whose_logits_differ_is_scored_not_given_fp32_quality(model, tmp_path, monkeypatch):
    path = tmp_path / "fp32.safetensors"
    save_checkpoint(path, model, kind="fp32", tokenizer_sha256="x")
    monkeypatch.setitem(variants.VARIANTS, "twin", variants.VariantKind(
        "tests.bench.test_suite:_perturbed_twin", from_fp32=True, same_weights_as_fp32=True))
    monkeypatch.setattr(suite, "peak_rss", lambda kind, p, n: {"peak_rss_mb": 1.0})
    plan = [suite.Variant("fp32", "artifact", str(path), {"params": model.num_params(), "val_ppl": 16.0}, "m"),
            suite.Variant("peer_twin", "twin", str(path))]
    cfg = suite.BenchmarkConfig(decode_tokens=2, repeats=1, profile_tokens=2, hotspots_top=3)
    evaluator = _Evaluator()
    results, _ = suite.run_benchmark(plan, cfg, evaluator, {"size_bytes": path.stat().st_size, "val_ppl": 16.0})
    twin = results["peer_twin"]
    assert twin["max_abs_logit_diff_vs_fp32"] > suite.SAME_WEIGHTS_ATOL
    assert twin["val_ppl"] == 20.0 and len(evaluator.scored) == 1  # scored here, not FP32's 16.0
    assert twin["quality_from"].startswith("benchmark (logits differ from fp32's by")


def test_runtime_and_program_rows_are_timed_like_for_like(model, tmp_path, monkeypatch):
    """A native row gets both loops, agreement with the eager artifact and the instruction count;
    a program row (the fake itl-run) its own loop and agreement with eager and with native; the
    ratios divide like by like."""
    import copy

    from iteralite.bench import loops, programs
    from iteralite.quant.config import mixed_config
    from iteralite.quant.units import quantize_allocation, units
    from iteralite.runtime.native.runtime import load_native

    fp32_path, mixed_path = tmp_path / "fp32.safetensors", tmp_path / "mixed.safetensors"
    save_checkpoint(fp32_path, model, kind="fp32", tokenizer_sha256="x")
    alloc = {u: (4, 8)[i % 2] for i, u in enumerate(units(model))}
    save_checkpoint(mixed_path, quantize_allocation(copy.deepcopy(model), alloc, 8), kind="mixed",
                    tokenizer_sha256="x", quant=mixed_config(alloc, 8, model))
    prompt = suite.Prompt("Once", [1, 2, 3], "tok.bin")
    native_ids = loops.greedy_ids(load_native(mixed_path), "native", prompt.ids, 12)
    (tmp_path / "ids.txt").write_text(" ".join(map(str, native_ids)))
    monkeypatch.setenv("FAKE_IDS", str(tmp_path / "ids.txt"))
    monkeypatch.setitem(programs.PROGRAMS, "itl_run",
                        programs.Program("fake loop", "itl-run", "tests.bench.test_programs:_fake_argv"))
    monkeypatch.setattr(suite, "peak_rss", lambda kind, p, n: {"peak_rss_mb": 1.0})
    counted = []
    monkeypatch.setattr(suite, "instructions_per_token",
                        lambda *a, **k: counted.append((a, k)) or {"instructions_per_token": 5.0})
    quality = {"params": model.num_params(), "val_ppl": 16.0, "bits_per_weight": 6.0}
    plan = [suite.Variant("fp32", "artifact", str(fp32_path), quality, "m"),
            suite.Variant("mixed", "artifact", str(mixed_path), quality, "m"),
            suite.Variant("native", "native", str(mixed_path)),
            suite.Variant("itl_run", "program", str(mixed_path), program="itl_run")]
    cfg = suite.BenchmarkConfig(decode_tokens=4, repeats=1, profile_tokens=2, hotspots_top=3, agreement_tokens=12,
                                callgrind_tokens=[2, 5])
    fp32_metrics = {"size_bytes": fp32_path.stat().st_size, "val_ppl": 16.0}
    results, _ = suite.run_benchmark(plan, cfg, _Evaluator(), fp32_metrics, prompt)
    nat, prog, fp32 = results["native"], results["itl_run"], results["fp32"]
    assert nat["best_loop"] == loops.BEST_LOOPS["native"].label and nat["decode_tok_s_step_loop"] > 0
    assert nat["greedy_agreement_steps"] == 12 and 0 <= nat["greedy_agreement_with_eager"] <= 1
    assert nat["instructions_per_token"] == 5.0
    [(args, kw)] = counted  # only the native row is counted, on its artifact, with N1 and N2
    assert args == (str(mixed_path), "tok.bin", "Once", 2, 5) and kw == {"program": "itl_run"}
    assert prog["available"] and prog["greedy_agreement_with_native"] == 1.0 and prog["generated_tokens"] == 12
    assert "decode_tok_s_step_loop" not in prog and "decode_speedup_vs_fused_step_loop" not in prog
    assert nat["decode_speedup_vs_fp32_eager"] == round(nat["decode_tok_s_best_loop"] / fp32["decode_tok_s_best_loop"], 2)
    assert nat["decode_speedup_vs_fp32_eager_step_loop"] == round(
        nat["decode_tok_s_step_loop"] / fp32["decode_tok_s_step_loop"], 2)
    assert list(results) == ["fp32", "mixed", "native", "itl_run"]


def test_plan_lists_the_programs_after_the_native_row(tmp_path):
    p = _paths(tmp_path)
    q = {"val_ppl": 16.0}
    for f in (p.TRAIN_METRICS, p.QAT_METRICS, p.MIXED_METRICS, p.FUSE_METRICS, p.STUDENT_METRICS):
        _write(tmp_path / f, q)
    _write(tmp_path / p.INT4_METRICS, {"methods": {}})
    names = [(v.name, v.program, v.path) for v in suite.plan([], [], [], p, ["itl_run", "wasm"])]
    i = names.index(("native", None, p.MIXED_CKPT))
    assert names[i + 1] == ("native_exact", None, p.MIXED_CKPT)  # the C step with float activations
    assert names[i + 2:i + 4] == [("itl_run", "itl_run", p.MIXED_CKPT), ("wasm", "wasm", p.MIXED_CKPT)]


def test_an_exact_program_is_compared_with_the_exact_native_run(monkeypatch):
    """`--exact` programs must reproduce the C step with float activations, the others the int8 one."""
    seen = {}
    monkeypatch.setattr(suite, "program_row", lambda name, path, tb, text, n, r, refs, agree: refs)
    for name in ("itl_run", "itl_run_exact", "wasm_exact"):
        v = suite.Variant(name, "program", "a.safetensors", program=name)
        refs = suite._program_row(v, suite.BenchmarkConfig(), suite.Prompt("hi", [1], "t.bin"),
                                  lambda path, kind="artifact": kind)
        seen[name] = refs
    assert seen["itl_run"] == {"eager": "artifact", "native": "native"}
    assert seen["itl_run_exact"] == seen["wasm_exact"] == {"eager": "artifact", "native": "native_exact"}
    assert suite.PROGRAMS["itl_run_exact"].flags == ("--exact",) and not suite.PROGRAMS["itl_run"].flags


def test_config_checks_the_new_keys():
    from iteralite.io.errors import IteraliteError

    suite.BenchmarkConfig().validate()
    for bad in (dict(programs=["nope"]), dict(callgrind_tokens=[5, 5]), dict(callgrind_tokens=[3]),
                dict(agreement_tokens=0), dict(prompt="")):
        with pytest.raises((IteraliteError, ValueError)):
            suite.BenchmarkConfig(**bad).validate()

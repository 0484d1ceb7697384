"""Benchmark library and report: measurements return sane values and restore the thread count,
the memory probe works in a fresh process, the report shows every variant. No speed is asserted:
a benchmark is not a timed test."""
from __future__ import annotations

import csv

import pytest
import torch

from iteralite.bench import benchmark
from iteralite.bench import report as bench_report
from iteralite.io.checkpoint import save_checkpoint


@pytest.fixture
def odd_threads():
    """Run with a thread count nobody would pick, to see that measurements put it back."""
    old = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(old)


def test_measure_variant_positive_and_restores_threads(model, odd_threads):
    out = benchmark.measure_variant("tiny", model, n_tokens=4, repeats=2, prefill_len=16)
    assert set(out) == {"decode_tok_s_1thread", "decode_tok_s_all_threads", "prefill_ms_16", "threads_all"}
    assert all(v > 0 for v in out.values())
    assert out["threads_all"] == benchmark.all_threads()
    assert torch.get_num_threads() == odd_threads


def test_num_threads_restores_after_an_error(odd_threads):
    with pytest.raises(RuntimeError):
        with benchmark.num_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == odd_threads


def test_decode_and_prefill_keep_their_signatures(model):
    assert benchmark.decode_tok_s(model, 4, warmup=1, repeats=1) > 0
    assert benchmark.prefill_ms(model, seq_len=8, repeats=1) > 0


def test_profile_hotspots_sorted_rows(model, odd_threads):
    rows = benchmark.profile_hotspots(model, n_tokens=4, top=5, warmup=1)
    assert 0 < len(rows) <= 5
    assert {"op", "self_cpu_ms_total", "self_cpu_us_per_token", "calls", "pct"} <= set(rows[0])
    times = [r["self_cpu_ms_total"] for r in rows]
    assert times == sorted(times, reverse=True)
    assert 0 < sum(r["pct"] for r in rows) <= 100.01
    assert torch.get_num_threads() == odd_threads


def test_load_variant_by_kind(model, tmp_path):
    path = tmp_path / "fp32.safetensors"
    save_checkpoint(path, model, kind="fp32", tokenizer_sha256="x")
    idx = torch.randint(0, model.cfg.vocab_size, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(benchmark.load_variant("artifact", path)(idx)[0], model(idx)[0])
        assert benchmark.load_variant("int8_weight_only", path)(idx)[0].shape == (1, 6, model.cfg.vocab_size)
    with pytest.raises(KeyError, match="unknown variant kind"):
        benchmark.load_variant("nope", path)


def test_register_variant_rejects_main_module_loaders():
    def loader(path):
        return None
    loader.__module__ = "__main__"
    with pytest.raises(ValueError, match="importable module"):
        benchmark.register_variant("scratch", loader)
    assert "scratch" not in benchmark.VARIANT_KINDS


def test_peak_rss_in_a_fresh_process(model, tmp_path):
    path = tmp_path / "fp32.safetensors"
    save_checkpoint(path, model, kind="fp32", tokenizer_sha256="x")
    out = benchmark.peak_rss("artifact", path, n_tokens=4)
    assert out["baseline_rss_mb"] > 0
    assert out["peak_rss_mb"] >= out["baseline_rss_mb"]
    assert out["peak_minus_baseline_mb"] == pytest.approx(out["peak_rss_mb"] - out["baseline_rss_mb"], abs=0.2)


def test_peak_rss_ignores_the_parents_memory(model, tmp_path):
    path = tmp_path / "fp32.safetensors"
    save_checkpoint(path, model, kind="fp32", tokenizer_sha256="x")
    ballast = torch.ones(300 * 2**20, dtype=torch.uint8)  # 300 MiB resident in this process
    out = benchmark.peak_rss("artifact", path, n_tokens=2)
    del ballast
    assert out["baseline_rss_mb"] < benchmark._maxrss_mb()


def test_peak_rss_reports_a_failing_child(tmp_path):
    with pytest.raises(RuntimeError, match="memory probe of 'artifact' failed"):
        benchmark.peak_rss("artifact", tmp_path / "missing.safetensors", n_tokens=1)


RESULTS = {
    "fp32": {"size_bytes": 6_995_904, "params": 1_747_424, "bits_per_weight": 32.0, "compression_vs_fp32": 1.0,
             "val_ppl": 16.21, "val_bpb": 1.1005, "wikitext2_ppl": 1158.0, "decode_tok_s_1thread": 254.0,
             "decode_tok_s_all_threads": 300.0, "prefill_ms_128": 12.5, "peak_rss_mb": 410.0},
    "int4 gptq": {"size_bytes": 979_056, "params": 1_747_424, "bits_per_weight": 4.42, "compression_vs_fp32": 7.15,
                  "val_ppl": 16.46, "val_bpb": 1.1064, "decode_tok_s_1thread": 318.0},
    "bnb_nf4": {"size_bytes": 1_888_768, "val_ppl": 16.6, "decode_tok_s_1thread": 47.0,
                "decode_tok_s_all_threads": 3.0},
}


def test_report_writes_plots_csv_and_markdown(tmp_path):
    report = tmp_path / "metrics" / "report.md"
    pareto, speed, table = (tmp_path / "plots" / n for n in ("bench_pareto.png", "bench_speed.png", "bench_pareto.csv"))
    hot = {"fp32 eager": [{"op": "aten::addmm", "self_cpu_ms_total": 3.0, "self_cpu_us_per_token": 93.7,
                           "calls": 40, "pct": 41.0}],
           "fused": [{"op": "aten::mm", "self_cpu_ms_total": 1.0, "self_cpu_us_per_token": 31.2,
                      "calls": 8, "pct": 20.0}]}
    bench_report.write_bench_report(RESULTS, report, pareto, speed, table, hotspots=hot)
    for png in (pareto, speed):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(table.open()))
    assert [r["name"] for r in rows] == list(RESULTS)
    assert rows[1]["decode_tok_s_1thread"] == "318.0" and rows[1]["size_bytes"] == "979056"
    text = report.read_text()
    assert all(f"| {name} |" in text for name in RESULTS)
    int4_row = next(ln for ln in text.splitlines() if ln.startswith("| int4 gptq |"))
    assert bench_report.MISSING in int4_row  # wikitext2_ppl, all-threads speed, prefill, RSS
    assert "](../plots/bench_pareto.png)" in text and "](../plots/bench_speed.png)" in text
    assert "Decode hotspots: fp32 eager" in text and "`aten::mm`" in text
    assert "effective compression" in text  # the how-to-read paragraph says it is never computed
    assert not list(tmp_path.rglob("*.tmp"))


def test_report_with_nothing_measured_still_renders(tmp_path):
    bench_report.write_bench_report({"only": {}}, tmp_path / "r.md", tmp_path / "a.png", tmp_path / "b.png",
                                    tmp_path / "c.csv")
    row = next(ln for ln in (tmp_path / "r.md").read_text().splitlines() if ln.startswith("| only |"))
    assert row.count(bench_report.MISSING) == len(bench_report.COLUMNS)

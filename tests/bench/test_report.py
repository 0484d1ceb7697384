"""The benchmark report: every variant in the table, each value in its own column ("—" when a
variant lacks it), the plots, the Pareto CSV and the hotspot tables."""
from __future__ import annotations

import csv

from iteralite.bench import report as bench_report


RESULTS = {
    "fp32": {"size_bytes": 6_995_904, "params": 1_747_424, "bits_per_weight": 32.0, "compression_vs_fp32": 1.0,
             "val_ppl": 16.21, "val_bpb": 1.1005, "wikitext2_ppl": 1158.0, "decode_tok_s_1thread": 254.0,
             "decode_tok_s_step_loop": 254.0, "decode_tok_s_best_loop": 254.0, "best_loop": "the step loop",
             "decode_tok_s_all_threads": 300.0, "prefill_ms_128": 12.5, "peak_rss_mb": 410.0},
    "int4 gptq": {"size_bytes": 979_056, "params": 1_747_424, "bits_per_weight": 4.42, "compression_vs_fp32": 7.15,
                  "val_ppl": 16.46, "val_bpb": 1.1064, "decode_tok_s_1thread": 318.0},
    "bnb_nf4": {"size_bytes": 1_888_768, "val_ppl": 16.6, "decode_tok_s_1thread": 47.0,
                "decode_tok_s_all_threads": 3.0},
    "native": {"decode_tok_s_step_loop": 15000.0, "decode_tok_s_best_loop": 24000.0, "best_loop": "C greedy loop",
               "greedy_agreement_with_eager": 0.099, "greedy_first_divergence_from_eager": 55,
               "greedy_top1_agreement": 0.991, "instructions_per_token": 123456.7,
               "decode_speedup_vs_fused_step_loop": 1.5, "decode_speedup_vs_fused": 2.4},
    "wasm": {"kind": "program", "best_loop": "wasm", "available": False, "reason": "web/itl.wasm is missing | x"},
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
    assert rows[1]["val_bpb"] == "1.1064" and rows[2]["val_bpb"] == ""
    text = report.read_text()
    assert all(f"| {name} |" in text for name in RESULTS)
    int4_row = next(ln for ln in text.splitlines() if ln.startswith("| int4 gptq |"))
    assert bench_report.MISSING in int4_row  # wikitext2_ppl, all-threads speed, prefill, RSS
    assert "](../plots/bench_pareto.png)" in text and "](../plots/bench_speed.png)" in text
    assert "Decode hotspots: fp32 eager" in text and "`aten::mm`" in text
    assert bench_report.HOW_TO_READ in text
    assert "## Decode loops" in text
    assert not list(tmp_path.rglob("*.tmp"))


def test_report_with_nothing_measured_still_renders(tmp_path):
    bench_report.write_bench_report({"only": {}}, tmp_path / "r.md", tmp_path / "a.png", tmp_path / "b.png",
                                    tmp_path / "c.csv")
    row = next(ln for ln in (tmp_path / "r.md").read_text().splitlines() if ln.startswith("| only |"))
    assert row.count(bench_report.MISSING) == len(bench_report.COLUMNS)


def _table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """{variant: {column header: cell}} from the report's first markdown table."""
    return _tables(markdown)[0]


def _tables(markdown: str) -> list[dict[str, dict[str, str]]]:
    """Every markdown table of the page as {first cell: {column header: cell}}."""
    tables, lines = [], markdown.splitlines() + [""]
    block: list[str] = []
    for ln in lines:
        if ln.startswith("| "):
            block.append(ln)
            continue
        if block:
            headers = [c.strip() for c in block[0].strip("|").split(" | ")]
            rows = {}
            for row in block[2:]:
                cells = [c.strip() for c in row.strip("|").split(" | ")]
                assert len(cells) == len(headers), row
                rows[cells[0]] = dict(zip(headers[1:], cells[1:]))
            tables.append(rows)
            block = []
    return tables


def test_variant_table_puts_each_value_in_its_column():
    rows = _table_rows(bench_report.render_report(RESULTS, "p.png", "s.png"))
    assert list(rows) == list(RESULTS)
    fp32, int4, nf4 = rows["fp32"], rows["int4 gptq"], rows["bnb_nf4"]
    assert fp32["params"] == "1,747,424" and fp32["size (bytes)"] == "6,995,904"
    assert fp32["compression"] == "1.00x" and int4["compression"] == "7.15x"
    assert fp32["val bpb"] == "1.1005" and fp32["WikiText-2 ppl"] == "1158"
    assert fp32["decode tok/s, step loop (1 thread)"] == "254" and fp32["best loop (all threads)"] == "300"
    assert fp32["prefill 128 (ms)"] == "12.5" and fp32["peak RSS (MiB)"] == "410"
    assert int4["WikiText-2 ppl"] == int4["peak RSS (MiB)"] == bench_report.MISSING
    assert nf4["best loop (all threads)"] == "3" and nf4["bits/weight"] == bench_report.MISSING
    nat = rows["native"]
    assert nat["vs fused, step loops"] == "1.50x" and nat["vs fused, best loops"] == "2.40x"


def test_loops_table_lists_runtimes_and_programs_with_their_loop():
    loops = _tables(bench_report.render_report(RESULTS, "p.png", "s.png"))[1]
    assert list(loops) == ["fp32", "native", "wasm"]  # the rows that have a best loop
    nat = loops["native"]
    assert nat["best loop"] == "C greedy loop"
    assert nat["step loop tok/s"] == "15000" and nat["best loop tok/s"] == "24000"
    assert nat["greedy ids = eager's"] == "9.9%" and nat["first id != eager's"] == "55"
    assert nat["top-1 = eager's (teacher-forced)"] == "99.1%" and nat["instructions/token"] == "123,457"
    assert loops["wasm"]["best loop"] == "not measured: web/itl.wasm is missing \\| x"
    assert loops["wasm"]["best loop tok/s"] == bench_report.MISSING


def test_frontier_holds_only_saved_artifacts():
    """Peers are in-memory builds: the size frontier leaves them out (and points without a size)."""
    results = {**RESULTS, "peer_bnb_nf4": {"size_bytes": 1_888_768, "val_ppl": 16.6, "val_bpb": 1.1},
               "unsized": {"val_ppl": 3.0}}
    assert [n for n, _ in bench_report.frontier_points(results)] == ["fp32", "int4 gptq", "bnb_nf4"]

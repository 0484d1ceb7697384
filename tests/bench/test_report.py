"""The benchmark report: every variant in the table, each value in its own column ("—" when a
variant lacks it), the plots, the Pareto CSV and the hotspot tables."""
from __future__ import annotations

import csv

from iteralite.bench import report as bench_report


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
    assert rows[1]["val_bpb"] == "1.1064" and rows[2]["val_bpb"] == ""
    text = report.read_text()
    assert all(f"| {name} |" in text for name in RESULTS)
    int4_row = next(ln for ln in text.splitlines() if ln.startswith("| int4 gptq |"))
    assert bench_report.MISSING in int4_row  # wikitext2_ppl, all-threads speed, prefill, RSS
    assert "](../plots/bench_pareto.png)" in text and "](../plots/bench_speed.png)" in text
    assert "Decode hotspots: fp32 eager" in text and "`aten::mm`" in text
    assert bench_report.HOW_TO_READ in text
    assert not list(tmp_path.rglob("*.tmp"))


def test_report_with_nothing_measured_still_renders(tmp_path):
    bench_report.write_bench_report({"only": {}}, tmp_path / "r.md", tmp_path / "a.png", tmp_path / "b.png",
                                    tmp_path / "c.csv")
    row = next(ln for ln in (tmp_path / "r.md").read_text().splitlines() if ln.startswith("| only |"))
    assert row.count(bench_report.MISSING) == len(bench_report.COLUMNS)


def _table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """{variant: {column header: cell}} from the report's first markdown table."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("| ")]
    headers = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        if ln.startswith("| op |"):  # the hotspot tables begin
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(headers[1:], cells[1:]))
    return rows


def test_variant_table_puts_each_value_in_its_column():
    rows = _table_rows(bench_report.render_report(RESULTS, "p.png", "s.png"))
    assert list(rows) == list(RESULTS)
    fp32, int4, nf4 = rows["fp32"], rows["int4 gptq"], rows["bnb_nf4"]
    assert fp32["params"] == "1,747,424" and fp32["size (bytes)"] == "6,995,904"
    assert fp32["compression"] == "1.00x" and int4["compression"] == "7.15x"
    assert fp32["val bpb"] == "1.1005" and fp32["WikiText-2 ppl"] == "1158"
    assert fp32["decode tok/s (1 thread)"] == "254" and fp32["decode tok/s (all threads)"] == "300"
    assert fp32["prefill 128 (ms)"] == "12.5" and fp32["peak RSS (MiB)"] == "410"
    assert int4["WikiText-2 ppl"] == int4["peak RSS (MiB)"] == bench_report.MISSING
    assert nf4["decode tok/s (all threads)"] == "3" and nf4["bits/weight"] == bench_report.MISSING


def test_frontier_holds_only_saved_artifacts():
    """Peers are in-memory builds: the size frontier leaves them out (and points without a size)."""
    results = {**RESULTS, "peer_bnb_nf4": {"size_bytes": 1_888_768, "val_ppl": 16.6, "val_bpb": 1.1},
               "unsized": {"val_ppl": 3.0}}
    assert [n for n, _ in bench_report.frontier_points(results)] == ["fp32", "int4 gptq", "bnb_nf4"]

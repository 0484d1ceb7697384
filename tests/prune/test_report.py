"""The pruning sweep summary: rows from the stages' metrics, a CSV table and two PNG charts."""
from __future__ import annotations

import json

from iteralite.prune.report import load_sweep, write_sweep


def test_sweep_rows_table_and_charts(tmp_path):
    for r in (0.2, 0.1):
        sparsity = {str(i): {"heads": r, "d_ff": r / 2, "experts": 0.0, "prunable_params": r} for i in range(2)}
        (tmp_path / f"prune_{r}.json").write_text(json.dumps(
            {"prunable_params_removed_frac": r, "val_ppl": 10 + r, "sparsity": sparsity}))
        (tmp_path / f"finetune_{r}.json").write_text(json.dumps(
            {"params": 1000, "size_bytes": 500, "compression_vs_fp32": 3.5, "val_ppl": 9 + r,
             "val_ppl_delta_pct": r}))
    rows = load_sweep([0.2, 0.1], tmp_path)
    assert [row["ratio"] for row in rows] == [0.1, 0.2]
    assert rows[1]["prune_val_ppl"] == 10.2 and rows[1]["finetune_val_ppl"] == 9.2
    out = tmp_path / "out"
    out.mkdir()
    write_sweep(rows, 9.0, out / "sweep.csv", out / "curve.png", out / "sparsity.png")
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("ratio,removed_frac,params") and len(lines) == 3
    assert lines[1].split(",")[:2] == ["0.1", "0.1"]
    for png in ("curve.png", "sparsity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["curve.png", "sparsity.png", "sweep.csv"]  # no temp files

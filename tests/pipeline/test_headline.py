"""The headline metrics: each stage's few comparable numbers, written beside its full metrics file,
and the only files dvc.yaml declares as metrics (so `dvc exp show` stays readable)."""
import fnmatch
import json

import yaml

from iteralite.pipeline import headline
from iteralite.pipeline.stage import write_metrics
from tests.conftest import REPO


def test_stage_of_strips_the_matrix_suffix():
    assert headline.stage_of("metrics/prune_0.1.json") == "prune"
    assert headline.stage_of("metrics/finetune_0.25.json") == "finetune"
    assert headline.stage_of("metrics/mixed_precision.json") == "mixed_precision"
    assert str(headline.headline_path("metrics/train.json")) == "metrics/headline/train.json"


def test_select_keeps_the_registry_keys_nested_and_skips_missing_ones():
    full = {"size_bytes": 10, "val_ppl": 2.5, "layers": {"0": {"d_ff": 3}}, "seconds": 4.0,
            "compression_vs_fp32": 7.0}
    assert headline.select("qat", full) == {"size_bytes": 10, "val_ppl": 2.5, "compression_vs_fp32": 7.0}
    bench = {"native": {"decode_tok_s_1thread": 5.0, "decode_speedup_vs_fused": 2.5, "peak_rss_mb": 9},
             "fused": {"decode_tok_s_1thread": 2.0, "profile": {"a": 1}}, "int4_rtn": {"decode_tok_s_1thread": 1}}
    assert headline.select("benchmark", bench) == {"native": {"decode_tok_s_1thread": 5.0,
                                                              "decode_speedup_vs_fused": 2.5},
                                                   "fused": {"decode_tok_s_1thread": 2.0}}
    assert headline.select("calibrate", {"a": 1}) is None


def test_write_metrics_writes_the_full_file_and_its_headline(tmp_path):
    path = tmp_path / "metrics" / "finetune_0.2.json"
    path.parent.mkdir()
    full = {"size_bytes": 5, "val_ppl": 3.0, "layers": {"0": {"n_heads": 2}}, "seconds": 1.5}
    write_metrics(str(path), full)
    assert json.loads(path.read_text()) == full
    assert json.loads((tmp_path / "metrics" / "headline" / "finetune_0.2.json").read_text()) == \
        {"size_bytes": 5, "val_ppl": 3.0}
    write_metrics(str(tmp_path / "metrics" / "calibrate.json"), {"a": 1})
    assert not (tmp_path / "metrics" / "headline" / "calibrate.json").exists()


def _dvc_yaml():
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_dvc_yaml_declares_only_headline_files_as_metrics_and_keeps_the_full_files_as_outputs():
    stages = _dvc_yaml()["stages"]
    declared = []
    for name, st in stages.items():
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in st.get("outs", [])]
        for m in st.get("metrics", []):
            path = next(iter(m)) if isinstance(m, dict) else m
            declared.append(path)
            if path.startswith("metrics/headline/"):
                assert path.replace("headline/", "") in outs, (name, path)  # the full file stays an output
            else:
                assert path.startswith("dvclive/"), (name, path)
        assert "plots" not in st, f"stage {name}: plots are defined once, at the top level"
    assert any(p.startswith("metrics/headline/") for p in declared)
    for stage in headline.HEADLINE:
        assert stage in {headline.stage_of(p.replace("${item.ratio}", "0.1")) for p in declared
                         if p.startswith("metrics/headline/")}, stage


def test_every_top_level_plot_has_a_title_and_reads_a_stage_output():
    doc = _dvc_yaml()
    outs = set()
    for st in doc["stages"].values():
        for o in st.get("outs", []):
            path = next(iter(o)) if isinstance(o, dict) else o
            outs.add(path.replace("${item.ratio}", "*"))
    for plot in doc["plots"]:
        if isinstance(plot, str):  # an image, shown as it is
            assert plot.endswith(".png") and plot in outs, plot
            continue
        (name, spec), = plot.items()
        assert spec.get("title") and spec.get("template") and spec.get("x_label") and spec.get("y_label"), name
        for path in spec["y"]:
            assert any(fnmatch.fnmatch(path, o) or fnmatch.fnmatch(path, o.rstrip("/") + "/*") for o in outs), \
                (name, path)

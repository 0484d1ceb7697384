"""The memory probe: a fresh process per variant, blind to the parent's memory, loud on failure."""
from __future__ import annotations

import pytest
import torch

from iteralite.bench import memory
from iteralite.io.checkpoint import save_checkpoint


@pytest.fixture
def fp32_path(model, tmp_path):
    path = tmp_path / "fp32.safetensors"
    save_checkpoint(path, model, kind="fp32", tokenizer_sha256="x")
    return path


def test_peak_rss_in_a_fresh_process(fp32_path):
    out = memory.peak_rss("artifact", fp32_path, n_tokens=4)
    assert out["baseline_rss_mb"] > 0
    assert out["peak_rss_mb"] >= out["baseline_rss_mb"]
    assert out["peak_minus_baseline_mb"] == pytest.approx(out["peak_rss_mb"] - out["baseline_rss_mb"], abs=0.2)


def test_peak_rss_ignores_the_parents_memory(fp32_path):
    ballast = torch.ones(300 * 2**20, dtype=torch.uint8)  # 300 MiB resident in this process
    out = memory.peak_rss("artifact", fp32_path, n_tokens=2)
    del ballast
    assert out["baseline_rss_mb"] < memory._maxrss_mb()


def test_peak_rss_loads_a_peer_through_the_registry(fp32_path):
    """The child builds a peer by kind name, as the parent would (here int8 weight-only)."""
    out = memory.peak_rss("int8_weight_only", fp32_path, n_tokens=2)
    assert out["peak_rss_mb"] >= out["baseline_rss_mb"] > 0


def test_peak_rss_reports_a_failing_child(tmp_path):
    with pytest.raises(RuntimeError, match="memory probe of 'artifact' failed"):
        memory.peak_rss("artifact", tmp_path / "missing.safetensors", n_tokens=1)


def test_peak_rss_rejects_an_unknown_kind_before_spawning(fp32_path):
    with pytest.raises(KeyError, match="unknown variant kind 'nope'"):
        memory.peak_rss("nope", fp32_path, n_tokens=1)


def test_the_probe_imports_this_package_not_a_copy_in_the_working_folder(fp32_path, tmp_path, monkeypatch):
    """A queued DVC experiment runs in a temporary checkout (sources, no built native library):
    the probe child must import the package the parent runs, whatever the working folder holds."""
    fake = tmp_path / "iteralite"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('the copy in the working folder was imported')\n")
    monkeypatch.chdir(tmp_path)
    out = memory.peak_rss("artifact", fp32_path, n_tokens=2)
    assert out["peak_rss_mb"] >= out["baseline_rss_mb"] > 0

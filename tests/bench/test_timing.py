"""Speed measurements: sane values, the thread count restored, and a light import (a stage that
only times its own model must not pull in the peers or the fused runtime). No speed is asserted:
a benchmark is not a timed test."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from iteralite.bench import timing
from tests.conftest import REPO


@pytest.fixture
def odd_threads():
    """Run with a thread count nobody would pick, to see that measurements put it back."""
    old = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(old)


def test_measure_variant_positive_and_restores_threads(model, odd_threads):
    out = timing.measure_variant("tiny", model, n_tokens=4, repeats=2, prefill_len=16)
    assert set(out) == {"decode_tok_s_1thread", "decode_tok_s_all_threads", "prefill_ms_16", "threads_all"}
    assert all(v > 0 for v in out.values())
    assert out["threads_all"] == timing.all_threads()
    assert torch.get_num_threads() == odd_threads


def test_num_threads_restores_after_an_error(odd_threads):
    with pytest.raises(RuntimeError):
        with timing.num_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == odd_threads


def test_decode_and_prefill_keep_their_signatures(model):
    assert timing.decode_tok_s(model, 4, warmup=1, repeats=1) > 0
    assert timing.prefill_ms(model, seq_len=8, repeats=1) > 0


def test_profile_hotspots_sorted_rows(model, odd_threads):
    rows = timing.profile_hotspots(model, n_tokens=4, top=5, warmup=1)
    assert 0 < len(rows) <= 5
    assert {"op", "self_cpu_ms_total", "self_cpu_us_per_token", "calls", "pct"} <= set(rows[0])
    times = [r["self_cpu_ms_total"] for r in rows]
    assert times == sorted(times, reverse=True)
    assert 0 < sum(r["pct"] for r in rows) <= 100.01
    assert torch.get_num_threads() == odd_threads


@pytest.mark.parametrize("module", ["iteralite.bench.timing", "iteralite.bench.memory", "iteralite.bench.variants"])
def test_timing_and_memory_import_neither_peers_nor_the_fused_runtime(module):
    """The int4 and fuse stages import decode_tok_s, prefill_ms and peak_rss: that must not import
    the peers (and bitsandbytes) or the deploy module (checked in a fresh interpreter). The
    registry names its loaders as strings and imports one only to load that kind."""
    heavy = ["iteralite.bench.peers", "iteralite.runtime.deploy", "iteralite.runtime.fused", "bitsandbytes"]
    code = (f"import sys, {module}\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout

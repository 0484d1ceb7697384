"""PruneConfig validation and defaults, and the cumulative iterative schedule."""
from __future__ import annotations

import pytest

from iteralite.io.errors import ParamsError
from iteralite.io.params import from_dict
from iteralite.prune.config import PruneConfig, iterative_schedule


def test_prune_config_defaults_and_validation():
    cfg = from_dict(PruneConfig, {}, "prune")
    assert cfg.ratios == [0.1, 0.2, 0.4] and cfg.importance == "taylor" and cfg.protected == ["embedding"]
    assert from_dict(PruneConfig, {"ratios": [0.3], "layer_ratios": {0: 0.2}}, "prune").ratios == [0.3]
    bad = [({"ratios": [1.0]}, r"'prune\.ratios'.*1\.0"), ({"ratios": [-0.1]}, r"'prune\.ratios'.*-0\.1"),
           ({"ratios": []}, r"'prune\.ratios' must list"),
           ({"importance": "random"}, r"'prune\.importance'.*taylor, magnitude.*'random'"),
           ({"allocation": "greedy"}, r"'prune\.allocation'.*uniform, sensitivity"),
           ({"steps": 0}, r"'prune\.steps'"), ({"layer_ratios": {0: 1.5}}, r"'prune\.layer_ratios'"),
           ({"protected": [" "]}, r"'prune\.protected'"), ({"ratio": 0.1}, "did you mean 'ratios'")]
    for raw, msg in bad:
        with pytest.raises(ParamsError, match=msg):
            from_dict(PruneConfig, raw, "prune")


def test_iterative_schedule_is_cumulative_and_even():
    assert iterative_schedule(0.4, 4) == [0.1, 0.2, 0.3, 0.4]
    assert iterative_schedule(0.4, 2, start=0.2) == [0.3, 0.4]
    with pytest.raises(ParamsError, match=r"prune\.steps"):
        iterative_schedule(0.4, 0)


def test_duplicate_ratios_are_refused():
    with pytest.raises(ParamsError, match=r"'prune\.ratios' lists 0\.1 more than once; give each ratio once"):
        from_dict(PruneConfig, {"ratios": [0.1, 0.4, 0.1]}, "prune")


def test_a_single_ratio_must_still_be_a_list():
    """`dvc exp run -S prune.ratios=0.3` writes a scalar (DVC then fails on its matrix before any
    stage runs); a stage run directly says how to write it."""
    with pytest.raises(ParamsError, match=r"'prune\.ratios' must be a list of ratios, e.g\. \[0\.3\] "
                                          r"\(with dvc exp run: -S 'prune\.ratios=\[0\.3\]'\)"):
        from_dict(PruneConfig, {"ratios": 0.3}, "prune")
    assert from_dict(PruneConfig, {"ratios": [0.3]}, "prune").ratios == [0.3]

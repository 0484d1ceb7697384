"""Importance scores: Taylor vs magnitude, router statistics, and the scorer registry."""
from __future__ import annotations

import pytest
import torch

from iteralite.io.errors import ParamsError
from iteralite.prune.apply import prune
from iteralite.prune.config import IMPORTANCES
from iteralite.prune.importance import SCORERS, importance_scores, magnitude_scores, routing_stats, taylor_scores
from tests.prune.helpers import batches, bigger


def test_taylor_scores_are_finite_and_differ_from_magnitude():
    model = bigger()
    tay, mag = taylor_scores(model, batches()), magnitude_scores(model)
    for kind in ("heads", "channels", "experts"):
        for i in range(2):
            t, m = getattr(tay, kind)[i], getattr(mag, kind)[i]
            assert t.shape == m.shape and torch.isfinite(t).all() and (t >= 0).all()
    assert not torch.allclose(tay.heads[0] / tay.heads[0].sum(), mag.heads[0] / mag.heads[0].sum())
    assert not torch.allclose(tay.channels[0] / tay.channels[0].sum(), mag.channels[0] / mag.channels[0].sum())
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind
    rep = prune(model, 0.2, "taylor", batches=batches())
    assert rep["importance"] == "taylor" and abs(rep["prunable_params_removed_frac"] - 0.2) < 0.01
    with pytest.raises(ValueError, match="batches"):
        prune(bigger(), 0.2, "taylor")


def test_routing_stats_are_distributions():
    stats = routing_stats(bigger(), batches())
    assert sorted(stats) == [0, 1]
    for st in stats.values():
        assert st["routed"].sum() == pytest.approx(1.0) and st["prob"].sum() == pytest.approx(1.0)


def test_importance_scores_dispatches_every_configurable_name():
    assert set(SCORERS) == set(IMPORTANCES)
    model, b = bigger(), batches(2)
    by_name = {"magnitude": magnitude_scores(model), "taylor": taylor_scores(model, b)}
    for name in IMPORTANCES:
        got, want = importance_scores(model, name, batches=b), by_name[name]
        assert got.kind == name
        for kind in ("heads", "channels", "experts"):
            for i in range(2):
                assert torch.equal(getattr(got, kind)[i], getattr(want, kind)[i])
    with pytest.raises(ParamsError, match="importance"):
        importance_scores(model, "random")

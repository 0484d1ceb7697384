"""The shared checks of the model-global cuts: index validation, refusal of quantized models and
the config-vs-tensors comparison."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from iteralite.io.errors import IteraliteError
from iteralite.prune.depth import prune_layers
from iteralite.prune.rebuild import check_indices, check_rebuilds
from iteralite.prune.width import prune_residual
from iteralite.quant.spec import QuantSpec
from iteralite.quant.swap import dequantize_model, make_spec_for, quantize
from tests.prune.helpers import build


def test_check_indices_sorts_and_accepts_tensors():
    assert check_indices(torch.tensor([5, 1, 3]), 8, "units", "cut") == [1, 3, 5]
    assert check_indices([], 8, "units", "cut") == []
    with pytest.raises(IteraliteError, match=r"cut: units \[8, 9\] are out of range; the model has 8"):
        check_indices([9, 8, 0], 8, "units", "cut")
    with pytest.raises(IteraliteError, match="integer indices"):
        check_indices([True], 8, "units", "cut")


def test_check_rebuilds_names_the_disagreeing_tensors():
    model = build()
    check_rebuilds(model)
    model.cfg = dataclasses.replace(model.cfg, d_model=30)
    with pytest.raises(IteraliteError, match=r"embedding.weight: \(300, 32\) vs config \(300, 30\)"):
        check_rebuilds(model)


def test_quantized_model_is_refused_until_dequantized():
    model = build()
    quantize(model, make_spec_for(QuantSpec(bits=8, group_size=8)))
    with pytest.raises(IteraliteError, match="dequantize"):
        prune_residual(model, [0])
    with pytest.raises(IteraliteError, match="dequantize"):
        prune_layers(model, [0])
    dequantize_model(model)
    prune_layers(prune_residual(model, [0]), [0])
    assert (model.cfg.d_model, model.cfg.n_layers) == (31, 1)

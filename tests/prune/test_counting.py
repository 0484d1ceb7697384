"""Prunable-parameter accounting and the refusal of quantized models."""
from __future__ import annotations

import pytest

from iteralite.io.errors import IteraliteError
from iteralite.prune.apply import prune
from iteralite.prune.counting import head_params, prunable_params
from iteralite.quant.spec import QuantSpec
from iteralite.quant.swap import dequantize_model, make_spec_for, quantize
from tests.prune.helpers import bigger


def test_prunable_params_counts_every_mixer_and_moe_parameter():
    model = bigger()
    cfg = model.cfg
    fixed = model.embedding.weight.numel() + sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert prunable_params(model) == model.num_params() - fixed
    d = cfg.d_model
    per_layer = cfg.n_heads * head_params(cfg) + cfg.n_experts * (2 * d * cfg.d_ff + d)
    assert prunable_params(model) == cfg.n_layers * per_layer


def test_quantized_model_is_refused_until_dequantized():
    model = bigger()
    quantize(model, make_spec_for(QuantSpec(bits=8, group_size=8)))
    with pytest.raises(IteraliteError, match="dequantize_model"):
        prune(model, 0.2, "magnitude")
    dequantize_model(model)
    rep = prune(model, 0.2, "magnitude")
    assert abs(rep["prunable_params_removed_frac"] - 0.2) < 0.01

"""Counting what pruning can remove, and reading the current per-layer sizes.

"Prunable" parameters are every parameter of the SSM mixers and of the MoE blocks: each belongs
to exactly one head or one expert, so all of them can be removed. A pruning ratio is the fraction
of them removed, measured against the unpruned model's count (`base_prunable`), so pruning can be
called repeatedly with cumulative ratios between recovery training steps.

Parameters per unit (p headdim, d d_model, n d_state, r dt_rank, K d_conv, f d_ff):
  SSM head        p * (3d + K + 1 + r + 2n) + r + 3
  expert channel  2d (a w1 row and a w2 column)
  expert          2 d f + d (w1[e], w2[e] and its router row)
"""
from __future__ import annotations

from torch import nn

from iteralite.core.moe import Experts
from iteralite.io.errors import IteraliteError


def head_params(cfg) -> int:
    """Parameters one SSM head owns (see the module docstring)."""
    p, d = cfg.headdim, cfg.d_model
    return p * (3 * d + cfg.d_conv + 1 + cfg.dt_rank + 2 * cfg.d_state) + cfg.dt_rank + 3


def layer_count(cfg, shape: dict) -> int:
    """Prunable parameters of a layer with `shape` {"n_heads", "n_experts", "d_ff"}."""
    d = cfg.d_model
    moe = shape["n_experts"] * (2 * d * shape["d_ff"] + d)
    return shape["n_heads"] * head_params(cfg) + moe


def layer_shapes(model) -> dict[int, dict[str, int]]:
    """Current per-layer sizes, read from the modules: {i: {"n_heads", "n_experts", "d_ff"}}."""
    return {i: {"n_heads": layer.mixer.n_heads, "n_experts": layer.moe.experts.w1.shape[0],
                "d_ff": layer.moe.experts.w1.shape[1]}
            for i, layer in enumerate(model.layers)}


def prunable_params(model) -> int:
    """Number of prunable parameters: every SSM-mixer and MoE parameter, over all layers."""
    return sum(p.numel() for layer in model.layers
               for p in (*layer.mixer.parameters(), *layer.moe.parameters()))


def require_float(model) -> None:
    """Pruning cuts float tensors; a quantized artifact must be dequantized first."""
    for i, layer in enumerate(model.layers):
        pieces = {"mixer.in_proj": layer.mixer.in_proj, "mixer.x_proj": layer.mixer.x_proj,
                  "mixer.out_proj": layer.mixer.out_proj, "moe.router": layer.moe.router,
                  "moe.experts": layer.moe.experts}
        for name, m in pieces.items():
            if type(m) not in (nn.Linear, Experts):
                raise IteraliteError(
                    f"prune needs a plain float model, but 'layers.{i}.{name}' is a {type(m).__name__}; "
                    "dequantize it first with iteralite.quant's dequantize_model (and remove QAT "
                    "fake-quant with strip_fake_quant)")

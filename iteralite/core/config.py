"""The model configuration: one dataclass that carries every shape, including per-layer sizes
that pruning makes uneven. A checkpoint stores it, and loading rebuilds the model from it.

Dimension glossary (used in shape comments across the package):
  b  batch            l  sequence length      d  d_model
  h  SSM heads        p  head dim (headdim)   n  d_state
  e  experts          f  expert hidden (d_ff) k  experts active per token
  V  vocabulary       q  chunk length         c  number of chunks
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from iteralite.io.params import check


@dataclass
class ModelConfig:
    vocab_size: int = 2000
    d_model: int = 128
    n_layers: int = 4
    d_state: int = 16
    d_conv: int = 4
    headdim: int = 32
    n_heads: int = 8
    dt_rank: int = 8
    n_experts: int = 4
    top_k: int = 2
    d_ff: int = 256
    chunk_size: int = 32
    # Rank of the factorised embedding: 0 = a dense tied (V, d) table; r > 0 = a tied (V, r) table with
    # its own projections in (r -> d, `embed_in`) and out (d -> r, `head_proj`), so the LM head costs
    # V x r multiply-adds a token instead of V x d.
    embed_rank: int = 0
    # Per-layer sizes; None means every layer uses the uniform value above. Pruning fills them.
    layer_n_heads: list[int] | None = None
    layer_n_experts: list[int] | None = None
    layer_d_ff: list[int] | None = None

    def validate(self, section: str = "model") -> None:
        for key in ("vocab_size", "d_model", "n_layers", "d_state", "d_conv", "headdim",
                    "n_heads", "dt_rank", "n_experts", "top_k", "d_ff", "chunk_size"):
            check(getattr(self, key) >= 1, section, key, "must be >= 1")
        check(0 <= self.embed_rank < self.d_model, section, "embed_rank",
              f"must be 0 (a dense embedding) or in [1, d_model={self.d_model}); got {self.embed_rank}")
        check(self.top_k <= self.n_experts, section, "top_k", f"must be <= n_experts ({self.n_experts})")
        for key in ("layer_n_heads", "layer_n_experts", "layer_d_ff"):
            val = getattr(self, key)
            if val is not None:
                check(len(val) == self.n_layers, section, key, f"needs {self.n_layers} entries, got {len(val)}")
                check(all(v >= 1 for v in val), section, key, "entries must be >= 1")
        for i in range(self.n_layers):
            check(self.experts(i) >= self.top_k, section, "layer_n_experts",
                  f"layer {i} has {self.experts(i)} experts, fewer than top_k={self.top_k}")

    def heads(self, i: int) -> int:
        return self.layer_n_heads[i] if self.layer_n_heads else self.n_heads

    def d_inner(self, i: int) -> int:
        return self.heads(i) * self.headdim

    def experts(self, i: int) -> int:
        return self.layer_n_experts[i] if self.layer_n_experts else self.n_experts

    def ff(self, i: int) -> int:
        return self.layer_d_ff[i] if self.layer_d_ff else self.d_ff

    @property
    def embed_width(self) -> int:
        """Columns of the tied table: embed_rank when factorised, else d_model."""
        return self.embed_rank or self.d_model

    def num_weights(self) -> int:
        """Weights of the float model this config describes (= IteraLite(cfg).num_params()),
        counted without building it: the model as it computes, factors included."""
        d = self.d_model
        total = self.vocab_size * self.embed_width + 2 * d * self.embed_rank + d  # table, projections, norm_f
        for i in range(self.n_layers):
            h, e, f = self.heads(i), self.experts(i), self.ff(i)
            di = h * self.headdim
            total += (2 * d + d * 2 * di + di * (self.d_conv + 1) + di * (self.dt_rank + 2 * self.d_state)
                      + self.dt_rank * h + h + 2 * h + di * d + d * e + 2 * e * f * d)
        return total

    def to_dict(self) -> dict:
        """The stored config; a dense model's omits embed_rank, so its files are what they were."""
        d = dataclasses.asdict(self)
        if not d["embed_rank"]:
            del d["embed_rank"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        from iteralite.io.params import from_dict
        return from_dict(cls, d, "model")

"""Itera-Lite: embedding -> N x [RMSNorm -> SSM -> +; RMSNorm -> MoE -> +] -> RMSNorm -> tied head.

With `cfg.embed_rank = r > 0` the embedding is factorised: a tied (V, r) table, `embed_in` (r -> d)
after the lookup and `head_proj` (d -> r) before the head, so the head is (V, r) @ (r,) a token.

Two execution paths share the parameters: `forward` (parallel chunked scan, for training and
prefill) and `step` (recurrent, O(1) per token, for generation).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from iteralite.core.config import ModelConfig
from iteralite.core.moe import MoE, init_scaled_
from iteralite.core.ssm import SSM


class TiedEmbedding(nn.Module):
    """Token embedding whose weight is also the LM head (quantized twins keep both methods)."""

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, d_model) * 0.02)

    def forward(self, idx):
        return F.embedding(idx, self.weight)

    def attend(self, h):
        return F.linear(h, self.weight)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.mixer = SSM(cfg.d_model, cfg.heads(i), cfg.headdim, cfg.d_state, cfg.d_conv,
                         cfg.dt_rank, cfg.chunk_size)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.moe = MoE(cfg.d_model, cfg.experts(i), cfg.ff(i), cfg.top_k)

    def forward(self, x, state=None, return_state=False):
        if return_state:
            m, state = self.mixer(self.norm1(x), state, return_state=True)
        else:
            m = self.mixer(self.norm1(x))
        x = x + m
        f, aux = self.moe(self.norm2(x))
        return x + f, aux, state

    def step(self, x, state):
        m, state = self.mixer.step(self.norm1(x), state)
        x = x + m
        f, _ = self.moe(self.norm2(x))
        return x + f, state


class IteraLite(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embedding = TiedEmbedding(cfg.vocab_size, cfg.embed_width)
        if cfg.embed_rank:
            self.embed_in = nn.Linear(cfg.embed_rank, cfg.d_model, bias=False)
            self.head_proj = nn.Linear(cfg.d_model, cfg.embed_rank, bias=False)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        for layer in self.layers:
            for lin in (layer.mixer.in_proj, layer.mixer.x_proj, layer.mixer.out_proj, layer.moe.router):
                nn.init.normal_(lin.weight, std=0.02)
            layer.mixer.out_proj.weight.mul_(1.0 / math.sqrt(2 * self.cfg.n_layers))
            init_scaled_(layer.moe, self.cfg.n_layers)
        if self.cfg.embed_rank:
            for lin in (self.embed_in, self.head_proj):
                nn.init.normal_(lin.weight, std=self.cfg.embed_rank ** -0.5)

    def embed(self, idx):
        """Token ids -> residual stream (.., d)."""
        x = self.embedding(idx)
        return self.embed_in(x) if self.cfg.embed_rank else x

    def head(self, h):
        """Normed residual (.., d) -> logits (.., V) through the tied table."""
        return self.embedding.attend(self.head_proj(h) if self.cfg.embed_rank else h)

    def features(self, idx, state=None, return_state: bool = False):
        """idx (b, l) -> the normed residual the head reads (b, l, d), mean balance loss, per-layer
        states (None unless return_state): `forward` is `head` of this."""
        x = self.embed(idx)
        aux_total = x.new_zeros(())
        states = []
        for i, layer in enumerate(self.layers):
            x, aux, st = layer(x, None if state is None else state[i], return_state)
            aux_total = aux_total + aux
            states.append(st)
        return self.norm_f(x), aux_total / len(self.layers), states

    def forward(self, idx, state=None, return_state: bool = False):
        """idx (b, l) -> logits (b, l, V), mean balance loss; with return_state also per-layer states."""
        h, aux_total, states = self.features(idx, state, return_state)
        logits = self.head(h)
        if return_state:
            return logits, aux_total, states
        return logits, aux_total

    def init_state(self, batch: int = 1):
        return [layer.mixer.init_state(batch) for layer in self.layers]

    def step(self, token, state):
        """token (b,) -> logits (b, V), new state."""
        x = self.embed(token)
        new_state = []
        for layer, st in zip(self.layers, state):
            x, st = layer.step(x, st)
            new_state.append(st)
        return self.head(self.norm_f(x)), new_state

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

"""Top-k mixture of experts with per-expert dispatch.

Experts are held as 3-D weights (e, f, d) and (e, d, f). Tokens are grouped by the expert they
were routed to and each expert runs one matmul over its own tokens only; `moe_dense_ref` is the
reference twin that runs every expert on every token and weights the results by the gates.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    """E two-layer SiLU MLPs stored as stacked weights; quantized twins implement `expert_weights`."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, d_ff, d_model))  # up:   (e, f, d)
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, d_ff))  # down: (e, d, f)
        nn.init.normal_(self.w1, std=0.02)
        nn.init.normal_(self.w2, std=0.02)

    @property
    def n_experts(self) -> int:
        return self.w1.shape[0]

    def expert_weights(self, e: int):
        return self.w1[e], self.w2[e]

    def run(self, e: int, x):
        """x (t, d) -> (t, d) through expert e."""
        w1, w2 = self.expert_weights(e)
        return F.linear(F.silu(F.linear(x, w1)), w2)


class MoE(nn.Module):
    def __init__(self, d_model: int, n_experts: int, d_ff: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = Experts(n_experts, d_model, d_ff)

    def route(self, x):
        """x (t, d) -> gates (t, k), expert ids (t, k), router probs (t, e)."""
        probs = F.softmax(self.router(x), dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = top_p / top_p.sum(-1, keepdim=True)
        return gates, top_i, probs

    def forward(self, x):
        """x (..., d) -> output (..., d) and the load-balancing loss (scalar)."""
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (t, d)
        gates, top_i, probs = self.route(xf)
        n_exp = probs.shape[-1]
        flat_e = top_i.reshape(-1)  # (t*k)
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=n_exp)
        flat_gates = gates.reshape(-1)
        out = torch.zeros_like(xf)
        start = 0
        for e, cnt in enumerate(counts.tolist()):
            if cnt == 0:
                continue
            idx = order[start:start + cnt]
            start += cnt
            tok = idx // self.top_k
            y = self.experts.run(e, xf.index_select(0, tok))
            out.index_add_(0, tok, (y * flat_gates[idx, None]).to(out.dtype))  # bf16 under autocast
        # Switch-Transformer balance loss: e * sum_i (fraction routed to i) * (mean prob of i)
        frac = counts.to(xf.dtype) / flat_e.numel()
        aux = n_exp * (frac * probs.mean(0)).sum()
        return out.reshape(shape), aux


def moe_dense_ref(moe: MoE, x):
    """Reference twin: every expert on every token, weighted by the (sparse) gates."""
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    gates, top_i, _ = moe.route(xf)
    dense_gates = torch.zeros(xf.shape[0], moe.experts.n_experts, dtype=xf.dtype)
    dense_gates.scatter_(1, top_i, gates)
    out = sum(dense_gates[:, e:e + 1] * moe.experts.run(e, xf) for e in range(moe.experts.n_experts))
    return out.reshape(shape)


def init_scaled_(moe: MoE, n_layers: int) -> None:
    """GPT-2 style: scale residual-output projections by 1/sqrt(2 * n_layers)."""
    with torch.no_grad():
        moe.experts.w2.mul_(1.0 / math.sqrt(2 * n_layers))

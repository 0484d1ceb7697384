"""`_ref` twins of the native step: plain PyTorch over the dequantized resident weights, with the
same int8 activation rounding (per block of the weight's group, round half to even) and a
dense-gated MoE (every expert computed, gates zero outside the top-k), so the tests show the C
step's sparse top-k MoE equals the dense-gated reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from iteralite.runtime.native.layout import NativeMat, NativeWeights


def act_int8_ref(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (in,) float32 -> its int8 quantization per block of `block`, dequantized."""
    xb = x.reshape(-1, block)
    s = (xb.abs().amax(-1, keepdim=True) / 127.0).clamp(min=1e-12)
    return (torch.round(xb / s).clamp(-127, 127) * s).reshape(-1)


class RefModel:
    """The native step in PyTorch (float64 accumulation is not used: float32 like the C side)."""

    def __init__(self, w: NativeWeights, int8_acts: bool = True):
        """int8_acts=False: float activations (no rounding), i.e. the eager model's math on the
        resident weights; the tests use it to tie the twin to `IteraLite.step`."""
        self.w, self.int8_acts = w, int8_acts
        self._deq = {id(m): m.dequantize() for m in w.all_mats()}
        self.vec = [{k: torch.from_numpy(v) for k, v in L.vecs.items()} for L in w.layers]

    def matvec_ref(self, m: NativeMat, x: torch.Tensor) -> torch.Tensor:
        return self._deq[id(m)] @ (act_int8_ref(x, m.group) if self.int8_acts else x)

    def init_state(self):
        return [(torch.zeros(L.d_inner, L.d_conv), torch.zeros(L.h, L.p, L.n)) for L in self.w.layers]

    @staticmethod
    def _rms(x, w, eps):
        return x * torch.rsqrt(x.pow(2).mean() + eps) * w

    def mixer_ref(self, i: int, x, conv, S):
        L, v = self.w.layers[i], self.vec[i]
        xz = self.matvec_ref(L.mats["in_proj"], self._rms(x, v["norm1"], L.eps1))
        xs, z = xz[:L.d_inner], xz[L.d_inner:]
        conv = torch.cat([conv[:, 1:], xs[:, None]], 1)
        xc = F.silu((conv * v["conv_w"]).sum(-1) + v["conv_b"])
        dbc = self.matvec_ref(L.mats["x_proj"], xc)
        dt = F.softplus(self.matvec_ref(L.mats["dt_proj"], dbc[:L.r]) + v["dt_b"])  # (h)
        B, C = dbc[L.r:L.r + L.n], dbc[L.r + L.n:]
        xh = xc.view(L.h, L.p)
        S = S * torch.exp(dt * v["A"])[:, None, None] + (xh * dt[:, None])[..., None] * B
        y = (S @ C + xh * v["D"][:, None]).reshape(-1) * F.silu(z)
        return x + self.matvec_ref(L.mats["out_proj"], y), conv, S

    def moe_dense_ref(self, i: int, x):
        L, v = self.w.layers[i], self.vec[i]
        xn = self._rms(x, v["norm2"], L.eps2)
        probs = F.softmax(self.matvec_ref(L.mats["router"], xn), -1)
        top_p, top_i = probs.topk(L.k)
        gates = torch.zeros_like(probs).scatter(0, top_i, top_p / top_p.sum())
        out = torch.zeros_like(x)
        for e in range(len(L.w1)):  # dense: every expert, weighted by its (possibly zero) gate
            out = out + gates[e] * self.matvec_ref(L.w2[e], F.silu(self.matvec_ref(L.w1[e], xn)))
        return x + out

    @torch.no_grad()
    def step_ref(self, token: int, state):
        """One token -> logits (vocab,), new state (a list of (conv, ssm) per layer)."""
        emb = self._deq[id(self.w.emb)]
        x = emb[token].clone()
        if self.w.rank:  # factorised: (rank,) row -> (d,)
            x = self.matvec_ref(self.w.embed_in, x)
        new = []
        for i, (conv, S) in enumerate(state):
            x, conv, S = self.mixer_ref(i, x, conv, S)
            x = self.moe_dense_ref(i, x)
            new.append((conv, S))
        xf = self._rms(x, torch.from_numpy(self.w.norm_f), self.w.eps_f)
        if self.w.rank:
            xf = self.matvec_ref(self.w.head_proj, xf)
        return self.matvec_ref(self.w.emb, xf), new

"""Selective state-space mixer (Mamba names, Mamba-2 scalar decay per head).

Per head h the state S (p, n) evolves as
    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T,      y_t = S_t C_t + D_h x_t
with dt, B, C computed from the input. `ssd_scan` evaluates this in chunks (matmuls inside a
chunk, a short recurrence across chunks); `ssd_scan_ref` is the plain sequential twin.
`SSM.step` is the O(1)-per-token recurrent form used for generation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def ssd_scan(x, dt, A, B, C, chunk_size: int, initial_state=None):
    """Chunked selective scan.

    x (b, l, h, p), dt (b, l, h) > 0, A (h) < 0, B and C (b, l, n), initial_state (b, h, p, n).
    Returns y (b, l, h, p) without the D skip term, and the final state (b, h, p, n).
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    q = chunk_size
    pad = (-l) % q
    if pad:  # dt = 0 in the padding: decay 1 and no input, so the final state is unchanged
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, pad))
    c = x.shape[1] // q
    x = x.reshape(b, c, q, h, p)
    dt = dt.reshape(b, c, q, h)
    B = B.reshape(b, c, q, n)
    C = C.reshape(b, c, q, n)

    xdt = x * dt.unsqueeze(-1)  # (b, c, q, h, p)
    Lc = (dt * A).cumsum(dim=2)  # (b, c, q, h) cumulative log-decay inside each chunk

    # Within a chunk: y_t = sum_{s<=t} exp(L_t - L_s) (C_t . B_s) xdt_s
    seg = Lc.unsqueeze(3) - Lc.unsqueeze(2)  # (b, c, t, s, h)
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal[:, :, None], float("-inf")))
    CB = torch.einsum("bctn,bcsn->bcts", C, B)  # (b, c, t, s)
    y = torch.einsum("bctsh,bcshp->bcthp", CB.unsqueeze(-1) * decay, xdt)

    # Each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(Lc[:, :, -1:, :] - Lc)  # (b, c, q, h)
    chunk_states = torch.einsum("bcsn,bcshp->bchpn", B, xdt * decay_to_end.unsqueeze(-1))
    chunk_decay = torch.exp(Lc[:, :, -1, :])  # (b, c, h)

    S = x.new_zeros(b, h, p, n) if initial_state is None else initial_state
    entering = []
    for ci in range(c):  # c = l / q is small (4 for l=128, q=32)
        entering.append(S)
        S = S * chunk_decay[:, ci, :, None, None] + chunk_states[:, ci]
    entering = torch.stack(entering, dim=1)  # (b, c, h, p, n)
    y = y + torch.einsum("bctn,bchpn->bcthp", C, entering) * torch.exp(Lc).unsqueeze(-1)
    return y.reshape(b, c * q, h, p)[:, :l], S


def ssd_scan_ref(x, dt, A, B, C, initial_state=None):
    """Sequential reference twin of `ssd_scan` (same arguments, one timestep at a time)."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    S = x.new_zeros(b, h, p, n) if initial_state is None else initial_state
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        S = S * decay[:, :, None, None] + (x[:, t] * dt[:, t, :, None]).unsqueeze(-1) * B[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", S, C[:, t]))
    return torch.stack(ys, dim=1), S


class SSM(nn.Module):
    """Mamba-style mixer: in_proj -> causal depthwise conv1d -> x_proj (dt, B, C) -> dt_proj ->
    selective scan -> gate with silu(z) -> out_proj."""

    def __init__(self, d_model: int, n_heads: int, headdim: int, d_state: int, d_conv: int,
                 dt_rank: int, chunk_size: int):
        super().__init__()
        self.n_heads, self.headdim, self.d_state, self.d_conv = n_heads, headdim, d_state, d_conv
        self.dt_rank, self.chunk_size = dt_rank, chunk_size
        d_inner = n_heads * headdim
        self.d_inner = d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, n_heads, bias=True)
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.ones(n_heads))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 1e-1):
        self.A_log.copy_(torch.log(torch.empty(self.n_heads).uniform_(1.0, 16.0)))
        self.D.fill_(1.0)
        dt = torch.exp(torch.empty(self.n_heads).uniform_(math.log(dt_min), math.log(dt_max)))
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)

    def _dt_B_C(self, xc):
        dbc = self.x_proj(xc)
        dt, B, C = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt)), B, C

    def forward(self, u, state=None, return_state: bool = False):
        """u (b, l, d) -> (b, l, d); with return_state also the (conv, ssm) state after the last token."""
        b, l, _ = u.shape
        xs, z = self.in_proj(u).chunk(2, dim=-1)  # (b, l, d_inner) each
        xt = xs.transpose(1, 2)  # (b, d_inner, l)
        if state is not None:  # continue from a previous segment's conv window
            xt = torch.cat([state[0][..., 1:], xt], dim=-1)
            xc = F.conv1d(xt, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)
        else:
            xc = self.conv1d(xt)[..., :l]
        xc = F.silu(xc).transpose(1, 2)  # (b, l, d_inner)
        dt, B, C = self._dt_B_C(xc)  # (b, l, h), (b, l, n), (b, l, n)
        A = -torch.exp(self.A_log)  # (h)
        xh = xc.reshape(b, l, self.n_heads, self.headdim)
        y, S = ssd_scan(xh, dt, A, B, C, self.chunk_size, None if state is None else state[1])
        y = y + xh * self.D[:, None]
        y = y.reshape(b, l, self.d_inner) * F.silu(z)
        out = self.out_proj(y)
        if not return_state:
            return out
        full = xs.transpose(1, 2) if state is None else xt
        conv_state = F.pad(full, (max(0, self.d_conv - full.shape[-1]), 0))[..., -self.d_conv:]
        return out, (conv_state, S)

    def init_state(self, batch: int, device=None, dtype=torch.float32):
        conv = torch.zeros(batch, self.d_inner, self.d_conv, device=device, dtype=dtype)
        ssm = torch.zeros(batch, self.n_heads, self.headdim, self.d_state, device=device, dtype=dtype)
        return conv, ssm

    def step(self, u, state):
        """One token: u (b, d), state (conv (b, d_inner, d_conv), ssm (b, h, p, n)) -> (b, d), state."""
        conv_state, S = state
        xs, z = self.in_proj(u).chunk(2, dim=-1)  # (b, d_inner)
        conv_state = torch.cat([conv_state[..., 1:], xs.unsqueeze(-1)], dim=-1)
        xc = (conv_state * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias
        xc = F.silu(xc)
        dt, B, C = self._dt_B_C(xc)  # (b, h), (b, n), (b, n)
        A = -torch.exp(self.A_log)
        xh = xc.reshape(-1, self.n_heads, self.headdim)  # (b, h, p)
        S = S * torch.exp(dt * A)[:, :, None, None] + (xh * dt[:, :, None]).unsqueeze(-1) * B[:, None, None, :]
        y = torch.einsum("bhpn,bn->bhp", S, C) + xh * self.D[:, None]
        y = y.reshape(-1, self.d_inner) * F.silu(z)
        return self.out_proj(y), (conv_state, S)

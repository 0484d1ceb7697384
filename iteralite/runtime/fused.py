"""Fast CPU inference path: the same math as `IteraLite`, laid out for batch-1 decode.

A decode step of the default model is ~1.7 M multiply-adds spread over ~25 modules per layer, so
eager time is almost all per-op dispatch. This module removes it:
  - weights are prepared once (`from_model`): A = -exp(A_log), conv taps as (d_inner, d_conv),
    the router and every expert's up-projection concatenated into one matrix and the expert
    down-projections laid side by side, so the whole MoE is two matrix-vector products;
  - the MoE is dense-gated: all experts run, weighted by a gate vector that is zero outside the
    top-k. Shapes never depend on the routing, so one static graph covers every token (no
    bincount, no .tolist(), no Python per expert); top-k selection is the one of `MoE.route`;
  - a factorised embedding (`cfg.embed_rank` > 0) keeps its (V, r) table and the projections as
    buffers `embed_in` (d, r) and `head_proj` (r, d); a dense model has neither (same buffers as before);
  - the state is a flat tuple (conv_0, ssm_0, conv_1, ssm_1, ...) of dense tensors;
  - `compile()` turns step and prefill into one inductor C++ graph each, by default as
    AOTInductor packages called without Dynamo's per-call guard check.
Once compiled, the step is bound by streaming the fp32 weights (~7 MB for the default model),
which is why the decode matmuls are written as reductions inductor generates itself (`_linear`).
Every fused op keeps a plain `_ref` twin with the same arguments; the tests compare them, and
compare the whole model against `IteraLite.step` / `IteraLite.forward`.
Dimensions follow the glossary in config.py.
"""
from __future__ import annotations

import copy
import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from iteralite.core.ssm import ssd_scan, ssd_scan_ref


# Inductor options, chosen by measurement: cpp_wrapper launches the kernels from C++ instead of
# Python (inherent to AOTInductor); realize_opcount_threshold=1 stores elementwise results (silu,
# gates, norms) before the matmul reductions that read them, which otherwise recompute them once
# per output row (-12% per step). max_autotune and freezing measured no gain and compile slower.
COMPILE_OPTIONS = {"cpp_wrapper": True, "realize_opcount_threshold": 1}
GEMV_MAX_ROWS = 4  # inputs with up to this many rows use the reduction form of `_linear`


class FusedBlock(nn.Module):
    """Precomputed weights of one layer (buffers only: inference, no gradients)."""

    def __init__(self, layer):
        super().__init__()
        mx, moe = layer.mixer, layer.moe
        self.h, self.p, self.n, self.r = mx.n_heads, mx.headdim, mx.d_state, mx.dt_rank
        self.d_inner, self.d_conv, self.chunk_size = mx.d_inner, mx.d_conv, mx.chunk_size
        self.eps1, self.eps2 = layer.norm1.eps, layer.norm2.eps
        self.e, self.k = moe.experts.n_experts, moe.top_k
        w1, w2 = moe.experts.w1.detach(), moe.experts.w2.detach()  # (e, f, d), (e, d, f)
        self.f = w1.shape[1]
        buf = {
            "norm1": layer.norm1.weight, "norm2": layer.norm2.weight,
            "in_proj": mx.in_proj.weight,  # (2 d_inner, d)
            "conv_w": mx.conv1d.weight[:, 0, :], "conv_b": mx.conv1d.bias,  # (d_inner, d_conv), (d_inner)
            "x_proj": mx.x_proj.weight,  # (r + 2n, d_inner)
            "dt_w": mx.dt_proj.weight, "dt_b": mx.dt_proj.bias,  # (h, r), (h)
            "A": -torch.exp(mx.A_log), "D": mx.D,  # (h), (h)
            "out_proj": mx.out_proj.weight,  # (d, d_inner)
            # router rows first, then expert e's up rows at e + [e*f, (e+1)*f)
            "up": torch.cat([moe.router.weight, w1.reshape(-1, w1.shape[2])]),  # (e + e f, d)
            "down": w2.permute(1, 0, 2).reshape(w2.shape[1], -1),  # (d, e f)
        }
        for name, t in buf.items():
            self.register_buffer(name, t.detach().float().contiguous().clone())


def _rms(x, w, eps: float):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _linear(x, w):
    """x (..., i) @ w (o, i)^T. For a compiled decode step (a few rows) it is written as a
    broadcast-multiply-sum, which inductor turns into one C++ reduction that streams w once:
    measured ~2x faster than the MKL sgemv call for these weight-read-bound shapes. Otherwise
    (eager, an ONNX export: Gemm, or a prefill with many rows) F.linear, which needs no (rows, o, i)
    temporary."""
    if torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export() \
            and x.numel() <= GEMV_MAX_ROWS * x.shape[-1]:
        return (x.unsqueeze(-2) * w).sum(-1)
    return F.linear(x, w)


def ssm_step(blk: FusedBlock, x, conv, S):
    """One token through norm1 + mixer. x (b, d), conv (b, d_inner, d_conv), S (b, h, p, n) ->
    mixer output (b, d), new conv, new S."""
    b = x.shape[0]
    xs, z = _linear(_rms(x, blk.norm1, blk.eps1), blk.in_proj).split(blk.d_inner, -1)  # (b, d_inner) x2
    conv = torch.cat([conv[:, :, 1:], xs.unsqueeze(-1)], -1)  # (b, d_inner, d_conv)
    xc = F.silu((conv * blk.conv_w).sum(-1) + blk.conv_b)  # (b, d_inner)
    dtr, B, C = _linear(xc, blk.x_proj).split([blk.r, blk.n, blk.n], -1)
    dt = F.softplus(_linear(dtr, blk.dt_w) + blk.dt_b)  # (b, h)
    xh = xc.view(b, blk.h, blk.p)  # (b, h, p)
    decay = torch.exp(dt * blk.A)[:, :, None, None]  # (b, h, 1, 1)
    S = S * decay + (xh * dt[:, :, None]).unsqueeze(-1) * B[:, None, None, :]  # (b, h, p, n)
    y = (S @ C[:, None, :, None]).squeeze(-1) + xh * blk.D[:, None]  # (b, h, p)
    return _linear(y.reshape(b, -1) * F.silu(z), blk.out_proj), conv, S


def ssm_step_ref(blk: FusedBlock, x, conv, S):
    """Reference twin of `ssm_step`: library RMSNorm, a grouped conv1d over the window and the
    sequential scan `ssd_scan_ref` over one timestep."""
    b = x.shape[0]
    xs, z = F.linear(F.rms_norm(x, (x.shape[-1],), blk.norm1, blk.eps1), blk.in_proj).chunk(2, -1)
    conv = torch.cat([conv[:, :, 1:], xs.unsqueeze(-1)], -1)
    xc = F.silu(F.conv1d(conv, blk.conv_w.unsqueeze(1), blk.conv_b, groups=blk.d_inner)[..., 0])
    dbc = F.linear(xc, blk.x_proj)
    dt = F.softplus(F.linear(dbc[:, :blk.r], blk.dt_w, blk.dt_b))
    B, C = dbc[:, blk.r:blk.r + blk.n], dbc[:, blk.r + blk.n:]
    xh = xc.reshape(b, blk.h, blk.p)
    y, S = ssd_scan_ref(xh[:, None], dt[:, None], blk.A, B[:, None], C[:, None], S)
    y = y[:, 0] + xh * blk.D[:, None]
    return F.linear(y.reshape(b, -1) * F.silu(z), blk.out_proj), conv, S


def ssm_prefill(blk: FusedBlock, x, conv, S):
    """A sequence through norm1 + mixer with the chunked scan. x (b, l, d), conv (b, d_inner,
    d_conv) and S (b, h, p, n) the state before the sequence (zeros for a fresh one) ->
    output (b, l, d), conv and S after its last token."""
    b, l, _ = x.shape
    xs, z = F.linear(_rms(x, blk.norm1, blk.eps1), blk.in_proj).split(blk.d_inner, -1)  # (b, l, d_inner)
    # The window's first d_conv-1 columns are the previous tokens; a zero window is a fresh start.
    xt = torch.cat([conv[:, :, 1:], xs.transpose(1, 2)], -1)  # (b, d_inner, d_conv - 1 + l)
    xc = F.silu(F.conv1d(xt, blk.conv_w.unsqueeze(1), blk.conv_b, groups=blk.d_inner)).transpose(1, 2)
    dtr, B, C = F.linear(xc, blk.x_proj).split([blk.r, blk.n, blk.n], -1)  # (b, l, r), (b, l, n) x2
    dt = F.softplus(F.linear(dtr, blk.dt_w, blk.dt_b))  # (b, l, h)
    xh = xc.reshape(b, l, blk.h, blk.p)
    y, S = ssd_scan(xh, dt, blk.A, B, C, blk.chunk_size, S)  # (b, l, h, p)
    y = (y + xh * blk.D[:, None]).reshape(b, l, -1) * F.silu(z)
    return F.linear(y, blk.out_proj), xt[:, :, -blk.d_conv:], S


def ssm_prefill_ref(blk: FusedBlock, x, conv, S):
    """Reference twin of `ssm_prefill`: `ssm_step_ref` one token at a time."""
    ys = []
    for t in range(x.shape[1]):
        y, conv, S = ssm_step_ref(blk, x[:, t], conv, S)
        ys.append(y)
    return torch.stack(ys, 1), conv, S


def moe_dense_gated(blk: FusedBlock, x):
    """norm2 + MoE with every expert run and weighted by a dense gate. x (t, d) -> (t, d)."""
    t = x.shape[0]
    up = _linear(_rms(x, blk.norm2, blk.eps2), blk.up)  # (t, e + e f)
    probs = F.softmax(up[:, :blk.e], -1)  # (t, e)
    top_p, top_i = probs.topk(blk.k, -1)  # (t, k)
    gates = torch.zeros_like(probs).scatter(1, top_i, top_p / top_p.sum(-1, keepdim=True))  # (t, e)
    hid = F.silu(up[:, blk.e:]).view(t, blk.e, blk.f) * gates[:, :, None]  # (t, e, f)
    return _linear(hid.view(t, -1), blk.down)  # gated sum over experts inside one matmul


def moe_ref(blk: FusedBlock, x):
    """Reference twin of `moe_dense_gated`: library RMSNorm and per-expert dispatch (each expert
    runs only on the tokens routed to it)."""
    xn = F.rms_norm(x, (x.shape[-1],), blk.norm2, blk.eps2)
    probs = F.softmax(F.linear(xn, blk.up[:blk.e]), -1)
    top_p, top_i = probs.topk(blk.k, -1)
    gates = top_p / top_p.sum(-1, keepdim=True)
    w1 = blk.up[blk.e:].view(blk.e, blk.f, -1)  # (e, f, d)
    w2 = blk.down.view(-1, blk.e, blk.f)  # (d, e, f)
    out = torch.zeros_like(x)
    for e in range(blk.e):
        tok, slot = (top_i == e).nonzero(as_tuple=True)
        y = F.linear(F.silu(F.linear(xn[tok], w1[e])), w2[:, e])
        out.index_add_(0, tok, y * gates[tok, slot, None])
    return out


class FusedIteraLite(nn.Module):
    """Inference-only IteraLite with fused ops; same `forward` / `init_state` / `step` contract,
    so `generate_ids`, `decode_tok_s` and `prefill_ms` take it unchanged."""

    def __init__(self, model):
        super().__init__()
        self.cfg = model.cfg
        self.register_buffer("emb", model.embedding.weight.detach().float().contiguous().clone())  # (V, d) or (V, r)
        self.rank = getattr(model.cfg, "embed_rank", 0) or 0
        if self.rank:  # factorised: lookup -> embed_in (d, r); head_proj (r, d) -> tied head
            for name in ("embed_in", "head_proj"):
                self.register_buffer(name, getattr(model, name).weight.detach().float().contiguous().clone())
        self.register_buffer("norm_f", model.norm_f.weight.detach().float().clone())
        self.eps_f = model.norm_f.eps
        self.blocks = nn.ModuleList(FusedBlock(layer) for layer in model.layers)
        self._step_c, self._step_batch = None, None  # compiled step and its batch size
        self._forward_c = {}  # (b, l) -> compiled prefill

    @classmethod
    @torch.no_grad()
    def from_model(cls, model) -> "FusedIteraLite":
        """Build from a float or stored `IteraLite` (any format: uniform, mixed, fp16); stored weights
        are dequantized once here, on a copy."""
        from iteralite.quant.registry import is_stored
        from iteralite.quant.swap import dequantize_model

        if any(is_stored(m) for m in model.modules()):
            model = dequantize_model(copy.deepcopy(model))
        return cls(model).eval()

    def init_state(self, batch: int = 1):
        """Zero state: flat tuple (conv_0 (b, d_inner, d_conv), ssm_0 (b, h, p, n), conv_1, ...)."""
        state = []
        for blk in self.blocks:
            state += [self.emb.new_zeros(batch, blk.d_inner, blk.d_conv),
                      self.emb.new_zeros(batch, blk.h, blk.p, blk.n)]
        return tuple(state)

    def _embed(self, idx):
        """Token ids (...) -> residual stream (..., d)."""
        x = F.embedding(idx, self.emb)
        return _linear(x, self.embed_in) if self.rank else x

    def _head(self, x):
        xn = _rms(x, self.norm_f, self.eps_f)
        return _linear(_linear(xn, self.head_proj) if self.rank else xn, self.emb)

    def _step_eager(self, token, *state):
        x = self._embed(token)  # (b, d)
        new = []
        for i, blk in enumerate(self.blocks):
            m, conv, S = ssm_step(blk, x, state[2 * i], state[2 * i + 1])
            x = x + m
            x = x + moe_dense_gated(blk, x)
            new += [conv, S]
        return (self._head(x), *new)

    def _forward_eager(self, idx, *state):
        b, l = idx.shape
        x = self._embed(idx)  # (b, l, d)
        new = []
        for i, blk in enumerate(self.blocks):
            m, conv, S = ssm_prefill(blk, x, state[2 * i], state[2 * i + 1])
            x = x + m
            x = x + moe_dense_gated(blk, x.reshape(b * l, -1)).view(b, l, -1)
            new += [conv.contiguous(), S.contiguous()]  # compiled steps assume dense strides
        return (self._head(x), *new)

    @torch.no_grad()
    def step(self, token, state):
        """token (b,) -> logits (b, V), new state (flat tuple, see `init_state`)."""
        fn = self._step_c if token.shape[0] == self._step_batch else self._step_eager
        logits, *new = fn(token, *state)
        return logits, tuple(new)

    @torch.no_grad()
    def forward(self, idx, state=None, return_state: bool = False):
        """idx (b, l) -> logits (b, l, V), aux (zero: no balance loss at inference); with
        return_state also the state after the last token, ready for `step`."""
        fn = self._forward_c.get(tuple(idx.shape), self._forward_eager)
        logits, *new = fn(idx, *(state if state is not None else self.init_state(idx.shape[0])))
        aux = logits.new_zeros(())
        return (logits, aux, tuple(new)) if return_state else (logits, aux)

    def compile(self, batch: int = 1, prefill_lens=(128,), backend: str = "aoti",
                options: dict | None = None) -> "FusedIteraLite":
        """Compile `step` at batch `batch` and the prefill at (batch, l) for each l in prefill_lens,
        one inductor C++ graph each, and warm them up. Returns self.

        backend "aoti": AOTInductor packages called directly (no Dynamo guard check per call:
        measured ~0.1 ms/token faster); "inductor": torch.compile(fullgraph=True). Shapes are
        static: any other batch size or prompt length runs the eager fused path instead of
        recompiling in the middle of a generation loop."""
        opts = dict(COMPILE_OPTIONS if options is None else options)
        state = self.init_state(batch)
        token = torch.zeros(batch, dtype=torch.long)
        shapes = [(batch, l) for l in prefill_lens]
        with torch.no_grad():
            if backend == "aoti":
                self._step_c = _aoti(_Entry(self, "_step_eager"), (token, *state), opts)
                self._forward_c = {s: _aoti(_Entry(self, "_forward_eager"),
                                            (torch.zeros(s, dtype=torch.long), *state), opts) for s in shapes}
            elif backend == "inductor":
                self._step_c = torch.compile(self._step_eager, fullgraph=True, dynamic=False, options=opts)
                fwd = torch.compile(self._forward_eager, fullgraph=True, dynamic=False, options=opts)
                self._forward_c = dict.fromkeys(shapes, fwd)
            else:
                raise ValueError(f"backend must be 'aoti' or 'inductor', got {backend!r}")
            self._step_batch = batch
            for s in shapes:
                self(torch.zeros(s, dtype=torch.long))
            for _ in range(2):
                self.step(token, state)
        return self


class _Entry(nn.Module):
    """One entry point of a FusedIteraLite as a module's forward, so torch.export can trace it."""

    def __init__(self, fused: FusedIteraLite, method: str):
        super().__init__()
        self.fused, self.method = fused, method

    def forward(self, *args):
        return getattr(self.fused, self.method)(*args)


def _aoti(entry: _Entry, args: tuple, options: dict):
    """Export `entry` at the shapes of `args`, build an AOTInductor package and load it.
    Returns fn(*tensors) -> list of output tensors."""
    with tempfile.TemporaryDirectory() as tmp:
        program = torch.export.export(entry, args, strict=True)
        path = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(tmp, "graph.pt2"),
                                                        inductor_configs=options)
        run = torch._inductor.aoti_load_package(path).loader.boxed_run
    # Inputs and outputs are flat tensor lists already; calling the loader directly skips the
    # package wrapper's per-call pytree spec parsing (measured 0.268 -> 0.228 ms per step).
    return lambda *tensors: run(list(tensors))

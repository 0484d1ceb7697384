"""Baseline peers: the FP32 model made smaller or faster by off-the-shelf means, so the
pipeline's own artifacts are compared against what a library call would have given.

- `bnb_nf4`: bitsandbytes NF4 (`Linear4bit`, blocks of 64 with an fp32 absmax) on every linear
  and expert, the way `load_in_4bit` is used in practice; embedding / LM head FP32.
- `int8_weight_only`: int8 weights with one fp32 scale per output channel (tied embedding / LM
  head included), run through torch's `_weight_int8pack_mm` CPU kernel (the gpt-fast / torchao
  int8 weight-only recipe); `kernel=False` runs the same weights through F.linear.
- `compiled`: the FP32 model with `step` and `forward` wrapped by `torch.compile` (inductor),
  the MoE dispatch left eager over sequences.

Each peer is a module swap on a deep copy, so it keeps IteraLite's interface (`model(idx)`,
`model(idx, return_state=True)`, `init_state`, `step`) and the same quality and speed code runs
on all of them. `dt_proj` stays FP32 everywhere: its input dim is dt_rank (4-8), too small for a
quantization block, and it feeds exp(dt * A), where errors grow (the int4 stage's policy too).
Peers are never written to disk, so their size is `memory.state_bytes`: in-memory bytes of the tensors
holding their weights (packed codes, scales and absmax included), not a file size. The
benchmark loads peers by kind name through `variants.VARIANTS`, which lists every peer here.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from iteralite.core.model import TiedEmbedding
from iteralite.core.moe import Experts, MoE
from iteralite.quant.swap import kind_of, replace_module

KEEP_FLOAT = ("dt_proj",)


def _swap(model: nn.Module, on_linear, on_experts, on_embedding=None) -> nn.Module:
    """Replace Linear / Experts / TiedEmbedding submodules in place with the given builders' output."""
    build = {"linear": on_linear, "experts": on_experts, "embedding": on_embedding}
    targets = [(n, m) for n, m in model.named_modules() if n]
    for name, module in targets:
        kind = kind_of(module)
        if kind is None or build[kind] is None or (kind == "linear" and name.rsplit(".", 1)[-1] in KEEP_FLOAT):
            continue
        replace_module(model, name, build[kind](module))
    return model


# --------------------------------------------------------------------------- bitsandbytes NF4


def _nf4(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """A bitsandbytes NF4 Linear4bit holding `weight` (out, in).

    bitsandbytes quantizes only inside `.to(device)`: constructing or loading a Linear4bit leaves
    FP32 data, so the no-op `.to("cpu")` is what packs it. compress_statistics=False keeps the
    absmax in fp32 (transformers' default; double quantization would save 0.4 bit/weight but
    dequantize the absmax again on every call).

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks the weight into a CPU-specific layout at
    the first no-grad forward; that layout needs out % 32 == 0 and in >= 64 (our router, 4 outputs,
    fails it) and changes what `weight.data` holds. We keep its portable NF4 layout on every CPU
    (`support_avx512bf16_for_cpu`), so the peer runs, and is measured, the same code path
    everywhere."""
    import bitsandbytes as bnb

    out_f, in_f = weight.shape
    q = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=torch.float32,
                          compress_statistics=False, quant_type="nf4")
    q.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        q.weight.data = weight.detach().float().contiguous().clone()
        if bias is not None:
            q.bias.copy_(bias)
    return q.to("cpu").eval()


def _nf4_dequantize(q) -> torch.Tensor:
    import bitsandbytes.functional as bf

    return bf.dequantize_4bit(q.weight.data, q.weight.quant_state).float()


class NF4Experts(nn.Module):
    """Drop-in for moe.Experts: one bitsandbytes Linear4bit per expert for w1 and for w2."""

    def __init__(self, ex: Experts):
        super().__init__()
        self.w1 = nn.ModuleList(_nf4(ex.w1[e]) for e in range(ex.n_experts))  # (f, d) each
        self.w2 = nn.ModuleList(_nf4(ex.w2[e]) for e in range(ex.n_experts))  # (d, f) each

    @property
    def n_experts(self) -> int:
        return len(self.w1)

    def expert_weights(self, e: int):
        """-> w1 (f, d), w2 (d, f) float32, dequantized."""
        return _nf4_dequantize(self.w1[e]), _nf4_dequantize(self.w2[e])

    def run(self, e: int, x):
        """x (t, d) -> (t, d) through expert e."""
        return self.w2[e](F.silu(self.w1[e](x)))


@torch.no_grad()
def bnb_nf4(model: nn.Module) -> nn.Module:
    """A copy with every linear (but dt_proj) and every expert in bitsandbytes NF4.

    The tied embedding / LM head stays FP32, as transformers' `load_in_4bit` leaves lm_head and
    embeddings: bitsandbytes has no tied lookup-and-head module. On a CPU without AVX512-BF16
    bitsandbytes 0.50 dequantizes the whole weight to fp32 on every call and then runs F.linear,
    so this peer buys memory, not speed."""
    return _swap(copy.deepcopy(model).eval(), lambda lin: _nf4(lin.weight, lin.bias), NF4Experts)


# --------------------------------------------------------------------------- int8 weight-only


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., N, K) float -> int8 codes (..., N, K), fp32 scales (..., N): symmetric, one scale
    per output row, w ~= q * scale."""
    scale = w.detach().abs().amax(-1).float().clamp(min=1e-12) / 127.0
    q = torch.round(w.detach().float() / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, kernel: bool = True) -> torch.Tensor:
    """x (..., K) float32 @ int8 weight q (N, K) with scales (N,) -> (..., N).

    kernel=True: torch's `_weight_int8pack_mm` (wants a 2-D input contiguous in its last dim and
    scales of x's dtype). kernel=False: the same product as F.linear on q converted to float,
    then the scales, i.e. the same quantized model by another route (for scoring quality fast)."""
    if not kernel:
        return F.linear(x, q.to(x.dtype)) * scale
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), q, scale)
    return y.reshape(*x.shape[:-1], q.shape[0])


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear: buffers weight_int8 (N, K), weight_scale (N,) (+ float bias)."""

    def __init__(self, lin: nn.Linear, kernel: bool = True):
        super().__init__()
        self.kernel = kernel
        q, s = quantize_rows_int8(lin.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", s)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        y = int8_mm(x, self.weight_int8, self.weight_scale, self.kernel)
        return y if self.bias is None else y + self.bias


class Int8Experts(nn.Module):
    """Drop-in for moe.Experts: w1_int8 (e, f, d), w2_int8 (e, d, f) with per-row scales."""

    def __init__(self, ex: Experts, kernel: bool = True):
        super().__init__()
        self.kernel = kernel
        for name in ("w1", "w2"):
            q, s = quantize_rows_int8(getattr(ex, name))
            self.register_buffer(f"{name}_int8", q)
            self.register_buffer(f"{name}_scale", s)

    @property
    def n_experts(self) -> int:
        return self.w1_int8.shape[0]

    def expert_weights(self, e: int):
        """-> w1 (f, d), w2 (d, f) float32, dequantized."""
        return (self.w1_int8[e].float() * self.w1_scale[e, :, None],
                self.w2_int8[e].float() * self.w2_scale[e, :, None])

    def run(self, e: int, x):
        """x (t, d) -> (t, d) through expert e."""
        h = F.silu(int8_mm(x, self.w1_int8[e], self.w1_scale[e], self.kernel))
        return int8_mm(h, self.w2_int8[e], self.w2_scale[e], self.kernel)


class Int8Embedding(nn.Module):
    """Drop-in for TiedEmbedding: one int8 (V, d) table with a scale per row, which is both the
    lookup's per-token scale and the LM head's per-output-channel scale, so tying costs nothing."""

    def __init__(self, emb: TiedEmbedding, kernel: bool = True):
        super().__init__()
        self.kernel = kernel
        q, s = quantize_rows_int8(emb.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", s)

    def forward(self, idx):
        return self.weight_int8[idx].float() * self.weight_scale[idx].unsqueeze(-1)

    def attend(self, h):
        return int8_mm(h, self.weight_int8, self.weight_scale, self.kernel)


@torch.no_grad()
def int8_weight_only(model: nn.Module, kernel: bool = True) -> nn.Module:
    """A copy with every linear (but dt_proj), every expert and the tied embedding / LM head as
    int8 weights with fp32 per-output-channel scales; activations stay fp32.

    kernel=False computes the same quantized model through F.linear (see int8_mm): on CPUs
    where torch's int8 kernel has no fast path (this one: AVX2, no AVX-512) it costs ~0.2 ms per
    input row, which makes scoring quality on many tokens far too slow; speed is measured with
    kernel=True."""
    return _swap(copy.deepcopy(model).eval(), lambda m: Int8Linear(m, kernel), lambda m: Int8Experts(m, kernel),
                 lambda m: Int8Embedding(m, kernel))


def int8_weight_only_for_scoring(model: nn.Module) -> nn.Module:
    """The int8 peer's exact weights through F.linear (`int8_weight_only(model, kernel=False)`),
    the model its quality is scored on: torch's int8 kernel has no fast path on this CPU (~0.2 ms
    per input row), so scoring ~900k tokens through it would take over an hour; the two agree to
    1e-5 (tests/bench/test_peers.py). Its speed is measured with the kernel."""
    return int8_weight_only(model, kernel=False)


# --------------------------------------------------------------------------- torch.compile


def _eager_for_sequences(forward):
    """MoE.forward compiled for single tokens (b, d), eager for sequences (b, l, d).

    The dispatch reads per-expert token counts with `.tolist()` and dynamo specialises on them.
    In `step` at batch 1 there are only C(e, k) routing patterns (6 for the default), which
    warm-up meets; over sequences the counts change with every batch and dynamo would recompile
    until its limit. x.dim() is static, so dynamo resolves the branch while tracing."""
    eager = torch.compiler.disable(forward)

    def dispatch(x):
        return forward(x) if x.dim() == 2 else eager(x)

    return dispatch


@torch.no_grad()
def compiled(model: nn.Module, prefill_len: int = 128, warm_steps: int = 32) -> nn.Module:
    """A copy whose `step` and `forward` are wrapped by torch.compile (inductor, dynamic=False),
    warmed up on `warm_steps` batch-1 steps of random tokens (to meet the routing patterns) and
    a (1, prefill_len) prefill (0: skip). The MoE dispatch stays eager inside `forward` (see
    _eager_for_sequences). Each new input shape compiles again: cold, tens of seconds on 2 cores
    (inductor caches compiled code on disk for later processes)."""
    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        if isinstance(mod, MoE):
            mod.forward = _eager_for_sequences(mod.forward)
    m.step = torch.compile(m.step, dynamic=False)
    m.forward = torch.compile(m.forward, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    state = m.init_state(1)
    for _ in range(warm_steps):
        _, state = m.step(torch.randint(0, m.cfg.vocab_size, (1,), generator=gen), state)
    if prefill_len:
        m(torch.zeros(1, prefill_len, dtype=torch.long))
    return m


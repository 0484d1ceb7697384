"""The native step's weights: a packed IteraLite laid out as the C structs of `itl_step.c`.

Every stored matrix becomes one `NativeMat`, read from the artifact's packed tensors and never
expanded to float:
  - integer codes (rtn/gptq, 2/3/4/8-bit, ternary) are kept as codes, re-packed row by row at a
    SIMD-friendly width: 2-bit as 2-bit, 3-bit as 4-bit nibbles (+1 bit a weight; 3-bit rows do not
    split into bytes), 4-bit as nibbles, 8-bit as bytes; fp16 scales as they are and zero-points one
    byte per group (a symmetric code's implied zero written out), both group-major (in / group,
    out) so the kernel reads eight rows' scales with one load;
  - fp16 matrices (precision 16) stay fp16;
  - the float leftovers (norms, conv taps, dt bias, A = -exp(A_log), D) are float32 vectors.
A factorised embedding (`cfg.embed_rank` r > 0) is a (V, r) table plus the two projections
`embed_in` (d, r) and `head_proj` (r, d), stored matrices like any other; a projection left a float
nn.Linear goes in as fp16 only when its weights are fp16 values (then exactly), else it is refused.
`NativeWeights.resident_bytes` counts every byte the native model holds.

Activations are quantized to int8 per block of `group` inputs (the weight's group size; for an
fp16 matrix the largest divisor of its input dim up to 64). `_ref` twins live in `native.ref`.
"""
from __future__ import annotations

import copy
import ctypes
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from iteralite.io.errors import IteraliteError
from iteralite.quant import registry
from iteralite.quant.intcodes import QTensor
from iteralite.quant.modules import MixedExperts
from iteralite.quant.packing import pack_bits, unpack_bits
from iteralite.quant.spec import fit_group_size

INT, F16 = 0, 1
RESIDENT_BITS = {2: 2, 3: 4, 4: 4, 8: 8}
F16_BLOCK = 64
MAX_EXPERTS = 64  # the router's stack arrays in itl_step.c (ITL_MAX_EXPERTS)


class NativeUnsupported(IteraliteError):
    """The model holds a tensor format the native step does not read."""


@dataclass
class NativeMat:
    kind: int
    out: int
    in_: int
    group: int
    bits: int = 16
    codes: np.ndarray | None = None  # uint8 (out, rowbytes)
    scales: np.ndarray | None = None  # uint16 fp16 bits (in / group, out): group-major
    zeros: np.ndarray | None = None  # uint8 (in / group, out)
    w16: np.ndarray | None = None  # uint16 fp16 bits (out, in)

    def arrays(self) -> list[np.ndarray]:
        return [a for a in (self.codes, self.scales, self.zeros, self.w16) if a is not None]

    def unpacked_codes(self) -> torch.Tensor:
        """uint8 (out, in) codes from the resident rows."""
        rows = torch.from_numpy(self.codes)
        padded = rows.shape[1] * 8 // self.bits
        return unpack_bits(rows.reshape(-1), self.bits, self.out * padded).view(self.out, padded)[:, :self.in_]

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in): what the stored codes stand for (the `_ref` twins' weight)."""
        if self.kind == F16:
            return torch.from_numpy(self.w16.view(np.float16).astype(np.float32))
        q = self.unpacked_codes().float().view(self.out, -1, self.group)
        s = torch.from_numpy(self.scales.view(np.float16).astype(np.float32)).T[..., None]
        z = torch.from_numpy(self.zeros.astype(np.float32)).T[..., None]
        return ((q - z) * s).reshape(self.out, self.in_)

    def struct(self) -> "Mat":
        def ptr(a):
            return None if a is None else a.ctypes.data
        rowbytes = 0 if self.codes is None else self.codes.shape[1]
        return Mat(self.kind, self.bits, self.out, self.in_, self.group, rowbytes, ptr(self.codes),
                   ptr(self.scales), ptr(self.zeros), ptr(self.w16))


def _repack_rows(codes: torch.Tensor, bits: int) -> np.ndarray:
    """uint8 codes (out, in) -> (out, ceil(in * bits / 8)): `packing.pack_bits` of the rows, each
    padded with zero codes to whole bytes, so every row starts on a byte."""
    out, n = codes.shape
    padded = torch.nn.functional.pad(codes, (0, (-n) % (8 // bits)))
    return np.ascontiguousarray(pack_bits(padded, bits).view(out, -1).numpy())


def _fp16_bits(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float16).contiguous().numpy().view(np.uint16))


def _from_qtensor(qt, name: str) -> NativeMat:
    if qt.in_scale is not None:
        raise NativeUnsupported(f"'{name}' is stored with AWQ input scales; the native step reads plain "
                                "round-to-nearest codes (rtn, gptq, the mixed-precision artifacts)")
    out, in_ = qt.codes.shape
    rb = RESIDENT_BITS[qt.bits]
    zeros = (torch.full(qt.scales.shape, 2 ** (qt.bits - 1)) if qt.symmetric else qt.zeros.float()).to(torch.uint8)
    return NativeMat(INT, out, in_, qt.group_size, rb, _repack_rows(qt.codes, rb), _fp16_bits(qt.scales.T),
                     np.ascontiguousarray(zeros.T.numpy()))


def _from_half(w16: torch.Tensor) -> NativeMat:
    out, in_ = w16.shape
    return NativeMat(F16, out, in_, fit_group_size(in_, F16_BLOCK), w16=_fp16_bits(w16))


def _source(module, name: str, slot: str = "weight_"):
    """What the registry says the native step reads of a stored module's slot: a QTensor of
    integer codes, or an fp16 weight. NativeUnsupported for a float module or another format."""
    fmt = registry.module_format(module)
    if fmt is None or fmt.native is None:
        what = type(module).__name__ + ("" if fmt is None else f" ({fmt.name})")
        raise NativeUnsupported(f"'{name}' is a {what}; the native step runs packed artifacts "
                                "(integer codes or fp16 weights)")
    return fmt.native(module, slot)


def _to_mat(src, name: str) -> NativeMat:
    return _from_qtensor(src, name) if isinstance(src, QTensor) else _from_half(src)


def _mat(module, name: str) -> NativeMat:
    """A stored linear/embedding -> NativeMat."""
    return _to_mat(_source(module, name), name)


def _projection(module, name: str) -> NativeMat:
    """A factorised embedding's projection (bias-free) -> NativeMat. A stored one as any stored
    linear; a float nn.Linear as fp16 when that is exact for its weights (the mixed stage may leave
    the projections float, rounded to fp16 values), else NativeUnsupported: the native step holds
    no float32 matrices."""
    if getattr(module, "bias", None) is not None:
        raise NativeUnsupported(f"'{name}' has a bias; the native step's embedding projections are bias-free")
    if registry.module_format(module) is None and isinstance(module, torch.nn.Linear):
        w = module.weight.detach().float()
        if not torch.equal(w.to(torch.float16).float(), w):
            raise NativeUnsupported(f"'{name}' is a float Linear whose weights are not fp16 values; the native "
                                    "step runs packed artifacts (store it as integer codes or fp16)")
        return _from_half(w)
    return _mat(module, name)


def _experts(moe, name: str) -> tuple[list[NativeMat], list[NativeMat]]:
    ex = moe.experts
    if isinstance(ex, MixedExperts):  # one stored linear per expert and matrix
        return ([_mat(m, f"{name}.w1[{e}]") for e, m in enumerate(ex.w1)],
                [_mat(m, f"{name}.w2[{e}]") for e, m in enumerate(ex.w2)])

    def per_expert(slot: str) -> list[NativeMat]:
        src = _source(ex, name, slot)  # stacked over experts: unpacked once for all, then sliced
        if not isinstance(src, QTensor):
            return [_to_mat(src[e], f"{name}.{slot[:2]}[{e}]") for e in range(ex.n_experts)]
        return [_from_qtensor(QTensor(src.codes[e], src.scales[e], None if src.zeros is None else src.zeros[e],
                                      None if src.in_scale is None else src.in_scale[e], src.bits,
                                      src.group_size, src.symmetric), f"{name}.{slot[:2]}[{e}]")
                for e in range(ex.n_experts)]
    return per_expert("w1_"), per_expert("w2_")


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().contiguous().numpy().copy())


@dataclass
class NativeLayer:
    d_inner: int
    d_conv: int
    h: int
    p: int
    n: int
    r: int
    k: int
    eps1: float
    eps2: float
    vecs: dict  # norm1, norm2, conv_w (d_inner, d_conv), conv_b, dt_b, A, D: float32
    mats: dict  # in_proj, x_proj, dt_proj, out_proj, router: NativeMat
    w1: list
    w2: list


@dataclass
class NativeWeights:
    vocab: int
    d: int
    eps_f: float
    norm_f: np.ndarray
    emb: NativeMat  # (vocab, d); (vocab, rank) when factorised
    layers: list
    rank: int = 0  # 0: dense embedding; r > 0: factorised, with the two projections below
    embed_in: NativeMat | None = None  # (d, rank)
    head_proj: NativeMat | None = None  # (rank, d)
    _keep: list = field(default_factory=list, repr=False)  # ctypes objects the C side points into
    _model: "Model | None" = field(default=None, repr=False)  # the structs, built once

    def __deepcopy__(self, memo):
        """The arrays copied; the C structs (raw pointers into the originals) built afresh."""
        fresh = NativeWeights.__new__(NativeWeights)
        memo[id(self)] = fresh
        for f in fields(self):
            value = [] if f.name == "_keep" else None if f.name == "_model" else copy.deepcopy(getattr(self, f.name), memo)
            setattr(fresh, f.name, value)
        return fresh

    def all_mats(self) -> list[NativeMat]:
        out = [self.emb] + [m for m in (self.embed_in, self.head_proj) if m is not None]
        for L in self.layers:
            out += list(L.mats.values()) + L.w1 + L.w2
        return out

    @property
    def resident_bytes(self) -> int:
        """Every byte the native model holds: codes, scales, zero-points, fp16 and float vectors."""
        n = sum(a.nbytes for m in self.all_mats() for a in m.arrays()) + self.norm_f.nbytes
        return n + sum(v.nbytes for L in self.layers for v in L.vecs.values())

    def struct(self) -> "Model":
        """The C structs over these arrays, built on the first call and shared by every runtime."""
        if self._model is not None:
            return self._model
        layers = (Layer * len(self.layers))()
        for i, L in enumerate(self.layers):
            w1, w2 = (Mat * len(L.w1))(*[m.struct() for m in L.w1]), (Mat * len(L.w2))(*[m.struct() for m in L.w2])
            self._keep += [w1, w2]
            v = L.vecs
            layers[i] = Layer(L.d_inner, L.d_conv, L.h, L.p, L.n, L.r, len(L.w1), L.k, L.w1[0].out, L.eps1, L.eps2,
                              *[v[k].ctypes.data for k in ("norm1", "norm2", "conv_w", "conv_b", "dt_b", "A", "D")],
                              *[L.mats[k].struct() for k in ("in_proj", "x_proj", "dt_proj", "out_proj", "router")],
                              ctypes.cast(w1, ctypes.c_void_p), ctypes.cast(w2, ctypes.c_void_p))
        self._keep.append(layers)
        max_in = max(max(m.in_, m.out) for m in self.all_mats())
        max_in = max(max_in, *(2 * L.d_inner for L in self.layers))
        proj = [Mat() if m is None else m.struct() for m in (self.embed_in, self.head_proj)]
        model = Model(self.vocab, self.d, len(self.layers), max_in, self.eps_f, self.norm_f.ctypes.data,
                      self.emb.struct(), ctypes.cast(layers, ctypes.c_void_p), self.rank, *proj)
        self._keep.append(model)
        self._model = model
        return model


@torch.no_grad()
def native_weights(model) -> NativeWeights:
    """A packed IteraLite (as `load_model` returns it) -> NativeWeights; NativeUnsupported names the
    first tensor in a format the native step does not read."""
    emb = _mat(model.embedding, "embedding")
    rank = getattr(model.cfg, "embed_rank", 0) or 0
    proj = [_projection(getattr(model, k), k) for k in ("embed_in", "head_proj")] if rank else [None, None]
    layers = []
    for i, layer in enumerate(model.layers):
        mx, moe = layer.mixer, layer.moe
        pre = f"layers.{i}"
        w1, w2 = _experts(moe, f"{pre}.moe.experts")
        if len(w1) > MAX_EXPERTS:
            raise NativeUnsupported(f"'{pre}.moe' has {len(w1)} experts; the native step routes at most "
                                    f"{MAX_EXPERTS} (MAX_EXPERTS in itl_step.c)")
        layers.append(NativeLayer(
            mx.d_inner, mx.d_conv, mx.n_heads, mx.headdim, mx.d_state, mx.dt_rank, moe.top_k,
            layer.norm1.eps, layer.norm2.eps,
            {"norm1": _f32(layer.norm1.weight), "norm2": _f32(layer.norm2.weight),
             "conv_w": _f32(mx.conv1d.weight[:, 0, :]), "conv_b": _f32(mx.conv1d.bias),
             "dt_b": _f32(mx.dt_proj.bias), "A": _f32(-torch.exp(mx.A_log.double())), "D": _f32(mx.D)},
            {k: _mat(getattr(mx, k), f"{pre}.mixer.{k}") for k in ("in_proj", "x_proj", "dt_proj", "out_proj")}
            | {"router": _mat(moe.router, f"{pre}.moe.router")}, w1, w2))
    return NativeWeights(model.cfg.vocab_size, model.cfg.d_model, model.norm_f.eps, _f32(model.norm_f.weight),
                         emb, layers, rank, *proj)


# --------------------------------------------------------------------------- C structs (itl_step.c)

class Mat(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("bits", ctypes.c_int32), ("out", ctypes.c_int32),
                ("in_", ctypes.c_int32), ("group", ctypes.c_int32), ("rowbytes", ctypes.c_int32),
                ("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p),
                ("w16", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int32) for n in ("d_inner", "d_conv", "h", "p", "n", "r", "e", "k", "f")]
                + [("eps1", ctypes.c_float), ("eps2", ctypes.c_float)]
                + [(n, ctypes.c_void_p) for n in ("norm1", "norm2", "conv_w", "conv_b", "dt_b", "A", "D")]
                + [(n, Mat) for n in ("in_proj", "x_proj", "dt_proj", "out_proj", "router")]
                + [("w1", ctypes.c_void_p), ("w2", ctypes.c_void_p)])


class Model(ctypes.Structure):
    _fields_ = [("vocab", ctypes.c_int32), ("d", ctypes.c_int32), ("n_layers", ctypes.c_int32),
                ("max_in", ctypes.c_int32), ("eps_f", ctypes.c_float), ("norm_f", ctypes.c_void_p),
                ("emb", Mat), ("layers", ctypes.c_void_p), ("rank", ctypes.c_int32), ("embed_in", Mat),
                ("head_proj", Mat)]

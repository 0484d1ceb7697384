"""torch's packed int4 CPU matmul as an opt-in path for 4-bit `QuantLinear`s (measured slower
than FP32 at our sizes on this CPU; kept for the int4 stage's speed comparison)."""
from __future__ import annotations

import torch
from torch import nn

from iteralite.quant.spec import INT4_KERNEL_GROUPS, QuantSpec


def int4_eligible(spec: QuantSpec, out_features: int) -> bool:
    """torch's CPU int4 kernel needs 4-bit codes, out % 16 == 0 and groups of 32..256."""
    from iteralite.quant.registry import format_of  # the registry imports the modules that import this

    return (format_of(spec.method).integer and spec.bits == 4 and spec.group_size in INT4_KERNEL_GROUPS
            and out_features % 16 == 0)


def int4_pack(qt):
    """QTensor 4-bit (N, K) -> (packed weight for torch's CPU int4 mm, scales_and_zeros (K/g, N, 2)).

    torch dequantizes (q - 8) * scale + zero; ours is (q - z) * s, so zero = (8 - z) * s (exact in
    fp32). An AWQ in_scale is not folded here; int4_linear divides the input by it instead."""
    q = qt.codes.to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    s = qt.scales.float()
    z = torch.full_like(s, 8.0) if qt.zeros is None else qt.zeros.float()
    sz = torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1).contiguous()
    in_scale = None if qt.in_scale is None else qt.in_scale.float()
    return packed, sz, in_scale


def int4_linear(x, weight, group_size: int, bias=None):
    """x (..., K) float32 through an `int4_pack`ed weight -> (..., N)."""
    packed, sz, in_scale = weight
    if in_scale is not None:
        x = x / in_scale
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, sz)
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


def set_int4_kernel(model: nn.Module, enabled: bool) -> int:
    """Turn the int4 kernel on/off for every eligible QuantLinear; returns how many use it."""
    n = 0
    for m in model.modules():
        if hasattr(m, "use_int4_kernel"):
            m.use_int4_kernel = enabled
            n += int(enabled and m.int4_eligible())
    return n


"""The int4 stage's logic: every 4-bit method on the FP32 model, each a real packed artifact.

Methods: `rtn` (plain round to nearest, min/max per group), `awq` (activation-aware
per-input-channel scaling from calibrate's mean x^2, plus a per-group range search), `gptq`
(error feedback with calibrate's X^T X), `nf4` (bitsandbytes NormalFloat4, its own packed form).
Integer methods store two codes per byte, an fp16 scale and (asymmetric) a 4-bit integer
zero-point per group of `group_size` input columns.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from iteralite.io.params import check
from iteralite.quant.registry import QUANT_METHODS, format_of
from iteralite.quant.spec import QuantSpec
from iteralite.quant.swap import make_spec_for, quantize


@dataclass
class Int4Config:
    method: str = "gptq"  # the headline artifact and the top-level metrics
    compare: list[str] = field(default_factory=lambda: ["rtn", "nf4", "awq", "gptq"])
    group_size: int = 64
    symmetric: bool = False
    clip: bool = True  # per-group range search for awq (no storage cost)
    embedding: str = "int4"  # tied embedding + LM head: "int4" or "float"
    keep_float: list[str] = field(default_factory=lambda: ["dt_proj"])
    act_int8: bool = True  # also measure int8 dynamic per-token activations on `method`
    speed_tokens: int = 64  # decode tokens timed per variant (0 = skip the speed probe)

    def validate(self, section: str = "int4") -> None:
        allowed = ", ".join(QUANT_METHODS)
        check(self.method in QUANT_METHODS, section, "method", f"must be one of {allowed}; got {self.method!r}")
        for m in self.compare:
            check(m in QUANT_METHODS, section, "compare", f"entries must be from {allowed}; got {m!r}")
        check(self.embedding in ("int4", "float"), section, "embedding", f"must be 'int4' or 'float'; got {self.embedding!r}")
        check(self.group_size >= 1, section, "group_size", "must be >= 1")
        check(self.speed_tokens >= 0, section, "speed_tokens", "must be >= 0")
        if self.method == "nf4" or "nf4" in self.compare:
            QuantSpec(4, 64, method="nf4").validate(section)
        QuantSpec(4, self.group_size, self.symmetric, "rtn").validate(section)

    def methods(self) -> list[str]:
        return list(dict.fromkeys([*self.compare, self.method]))

    def spec(self, method: str, act_int8: bool = False) -> QuantSpec:
        if method == "nf4":  # bitsandbytes' blocks of 64 with an fp32 absmax each
            return QuantSpec(bits=4, group_size=64, method="nf4", act_int8=act_int8)
        # rtn stays plain round-to-nearest (min/max per group): the baseline the others must beat
        return QuantSpec(bits=4, group_size=self.group_size, symmetric=self.symmetric, method=method,
                         clip=self.clip and method == "awq", act_int8=act_int8)

    def keep(self) -> tuple[str, ...]:
        return tuple(self.keep_float) + (("embedding",) if self.embedding == "float" else ())


def quantize_int4(fp32_model, method: str, cfg: Int4Config, stats: dict, act_int8: bool = False):
    """A quantized copy of `fp32_model`. stats: {'act_sq_mean': {...}, 'hessian': {...}}."""
    model = copy.deepcopy(fp32_model)
    spec_for = make_spec_for(cfg.spec(method, act_int8), keep_float=cfg.keep())
    kind = format_of(method).stat  # rtn and nf4 need none (rtn's clip search is off here)
    return quantize(model, spec_for, stats.get(kind) if kind else None)

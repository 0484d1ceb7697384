"""How a tensor is quantized: `QuantSpec`, its validation, and group-size rules.

A spec's `method` names its format in `quant.registry.FORMATS` (integer codes "rtn", "awq",
"gptq"; bitsandbytes' "nf4"; "fp16"), whose entry holds that format's own validation rules.
A mixed-precision allocation is a spec per unit.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from iteralite.io.errors import ParamsError

NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4 matmul accepts
CONFIG_FORMAT, CONFIG_VERSION = "iteralite-quant", 1
SCALE_BITS = (0, 2, 3, 4, 5, 6, 7, 8)  # 0: fp16 scales; else the bits of a per-tensor log grid (io.grid)

class QuantSpecError(ParamsError, ValueError):
    """A quantization setting is invalid. Both a ParamsError (the CLI prints it plainly) and a
    ValueError (what a direct caller of the functions expects)."""



@dataclass
class QuantSpec:
    """How one tensor is quantized. JSON-able (`to_dict`), and with the tensor shape it fully
    determines the stored buffers."""

    bits: int = 4
    group_size: int = 32  # along the input dim (last dim); for nf4 the bitsandbytes blocksize
    symmetric: bool = False
    method: str = "rtn"  # rtn | awq | gptq | nf4
    clip: bool = False  # rtn/awq: search a per-group range shrink (no storage cost)
    act_int8: bool = False  # at run time, quantize the module's inputs per token to int8
    scale_bits: int = 0  # integer methods: 0 = fp16 scales; b = scales on a per-tensor b-bit log grid (io.grid)

    def validate(self, section: str = "quantize") -> None:
        def bad(key: str, msg: str):
            raise QuantSpecError(f"params: '{section}.{key}' {msg}")

        from iteralite.quant.registry import FORMATS  # the registry's entries hold each format's rules

        fmt = FORMATS.get(self.method)
        if fmt is None:
            bad("method", f"must be one of {', '.join(FORMATS)}; got {self.method!r}")
        fmt.check(self, bad)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not d["scale_bits"]:
            del d["scale_bits"]  # fp16 scales, the default: configs written before the field read the same
        return d

    @classmethod
    def from_dict(cls, d: dict, section: str = "quantize") -> "QuantSpec":
        from iteralite.io.params import from_dict
        return from_dict(cls, d, section)  # unknown keys / wrong types -> ParamsError



def valid_group_sizes(in_dim: int) -> list[int]:
    """All group sizes that divide `in_dim`."""
    return [g for g in range(1, in_dim + 1) if in_dim % g == 0]


def fit_group_size(in_dim: int, group_size: int) -> int:
    """Largest divisor of `in_dim` that is <= `group_size` (for layers with small input dims)."""
    return max(g for g in valid_group_sizes(in_dim) if g <= max(1, group_size))


def check_group_size(name: str, in_dim: int, group_size: int) -> None:
    """Raise QuantSpecError naming the tensor unless `group_size` divides its input dim."""
    if in_dim % group_size:
        raise QuantSpecError(
            f"quantize: group_size={group_size} does not divide the input dim {in_dim} of '{name}'; "
            f"valid group sizes for it: {', '.join(map(str, valid_group_sizes(in_dim)))}"
        )



def fitted(spec: QuantSpec, in_dim: int) -> QuantSpec:
    """`spec` with an integer format's group size shrunk to the largest divisor of `in_dim`."""
    from iteralite.quant.registry import format_of  # the registry imports the modules that import this

    if not format_of(spec.method).integer:
        return spec
    return dataclasses.replace(spec, group_size=fit_group_size(in_dim, spec.group_size))

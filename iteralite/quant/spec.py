"""How a tensor is quantized: `QuantSpec`, its validation, and group-size rules.

A spec's `method` names its format in the registry (`quant.methods.METHODS`): the integer
methods "rtn", "awq", "gptq" share one storage format (codes, fp16 scales, zero-points packed at
the code width; see `quant.intcodes`), "nf4" is bitsandbytes' NormalFloat, and "fp16" stores the
weight as IEEE half precision (bits 16). A mixed-precision allocation is a spec per unit.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from iteralite.io.errors import ParamsError
from iteralite.quant.packing import ALLOWED_BITS

INT_METHODS = ("rtn", "awq", "gptq")
ALL_METHODS = INT_METHODS + ("nf4",)
FLOAT_METHODS = ("fp16",)
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

        if self.method not in ALL_METHODS + FLOAT_METHODS:
            bad("method", f"must be one of {', '.join(ALL_METHODS)}; got {self.method!r}")
        if self.method == "fp16":
            if self.bits != 16:
                bad("bits", f"must be 16 for method fp16; got {self.bits!r}")
            return
        if self.method == "nf4":
            if self.bits != 4:
                bad("bits", f"must be 4 for method nf4; got {self.bits!r}")
            if self.group_size not in NF4_BLOCKSIZES:
                bad("group_size", f"for method nf4 is the bitsandbytes blocksize and must be one of "
                                  f"{', '.join(map(str, NF4_BLOCKSIZES))}; got {self.group_size!r}")
            return
        if isinstance(self.bits, bool) or self.bits not in ALLOWED_BITS:
            bad("bits", f"must be one of {', '.join(map(str, ALLOWED_BITS))}; got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            bad("group_size", f"must be an integer >= 1; got {self.group_size!r}")
        if isinstance(self.scale_bits, bool) or self.scale_bits not in SCALE_BITS:
            bad("scale_bits", f"must be 0 (fp16 scales) or 2..{SCALE_BITS[-1]} (a log grid); got {self.scale_bits!r}")
        if self.scale_bits and self.method != "rtn":
            bad("scale_bits", f"(a scale grid) is supported by method rtn only; got method {self.method!r}")

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
    """`spec` with an integer method's group size shrunk to the largest divisor of `in_dim`."""
    if spec.method not in INT_METHODS:
        return spec
    return dataclasses.replace(spec, group_size=fit_group_size(in_dim, spec.group_size))

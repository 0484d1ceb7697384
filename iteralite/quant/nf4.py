"""bitsandbytes' 4-bit NormalFloat (NF4) in its own packed form, with a plain-torch twin."""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch

from iteralite.quant.intcodes import take_layout
from iteralite.quant.spec import QuantSpec


def _bnb_functional():
    """Import bitsandbytes.functional lazily (only nf4 needs it). Its CPU backend logs a warning
    about an optional GEMV kernel package we do not use; silence just that logger."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    with warnings.catch_warnings():  # torch-internal deprecation noise triggered by its import
        warnings.simplefilter("ignore", DeprecationWarning)
        import bitsandbytes.functional as bnbf
    return bnbf


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """bitsandbytes nibbles (high first) -> codes uint8 (2 * bytes,)."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of `unpack_nibbles` (codes (2k,) -> (k,) bytes)."""
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


@dataclass
class NF4Tensor:
    """bitsandbytes NF4 in its own packed form, as plain tensors plus scalars.

    packed uint8 (ceil(numel/2),): bitsandbytes nibble order, FIRST code in the HIGH nibble
    (the opposite of packing.pack_bits). absmax float32 (ceil(numel/blocksize),).
    Blocks run over the row-major flattened weight: when the input dim is not a multiple of
    the blocksize a block spans two rows, and the last block may be partial. (bitsandbytes'
    native CPU dequantizer assumes row-aligned blocks for 2-D shapes and returns wrong values
    when in % blocksize != 0, so we always quantize and dequantize the flat 1-D view.)
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    blocksize: int = 64
    quant_type: str = "nf4"

    def meta(self) -> dict:
        """The scalars bitsandbytes' QuantState needs besides the tensors (JSON-able)."""
        return {"quant_type": self.quant_type, "blocksize": self.blocksize,
                "shape": list(self.shape), "dtype": "float32"}

    def dequantize(self) -> torch.Tensor:
        return dequantize_nf4(self)

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + "codes": self.packed, prefix + "absmax": self.absmax}

    @staticmethod
    def layout(shape, spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        n = math.prod(shape)
        return {"codes": (((n + 1) // 2,), torch.uint8),
                "absmax": ((-(-n // spec.group_size),), torch.float32)}

    @classmethod
    def from_tensors(cls, d: dict, prefix: str, shape, spec: QuantSpec) -> "NF4Tensor":
        t = take_layout(d, prefix, cls.layout(shape, spec))
        return cls(t["codes"], t["absmax"], tuple(shape), spec.group_size)

    def storage_bits(self) -> int:
        return 8 * self.packed.numel() + 32 * self.absmax.numel()


def quantize_nf4(w: torch.Tensor, blocksize: int = 64) -> NF4Tensor:
    """w float (any shape) -> NF4Tensor via bitsandbytes.functional.quantize_4bit on CPU."""
    bnbf = _bnb_functional()
    flat = w.detach().float().contiguous().reshape(-1)
    packed, state = bnbf.quantize_4bit(flat, blocksize=blocksize, quant_type="nf4")
    return NF4Tensor(packed.reshape(-1), state.absmax.float(), tuple(w.shape), blocksize)


def dequantize_nf4(t: NF4Tensor) -> torch.Tensor:
    """NF4Tensor -> float32 of t.shape, through bitsandbytes.functional.dequantize_4bit."""
    bnbf = _bnb_functional()
    n = math.prod(t.shape)
    state = bnbf.QuantState(absmax=t.absmax.float(), shape=torch.Size([n]), blocksize=t.blocksize,
                            quant_type=t.quant_type, dtype=torch.float32,
                            code=bnbf.get_4bit_type(t.quant_type, device="cpu"))
    # bitsandbytes expects packed as (bytes, 1); for <= 2 codes it transposes its output, hence reshape.
    out = bnbf.dequantize_4bit(t.packed.reshape(-1, 1), state)
    return out.reshape(t.shape).float()


def dequantize_nf4_ref(t: NF4Tensor) -> torch.Tensor:
    """Plain-torch twin of `dequantize_nf4`: table lookup times the block absmax."""
    code = _bnb_functional().get_4bit_type(t.quant_type, device="cpu")
    n = math.prod(t.shape)
    idx = torch.stack([t.packed >> 4, t.packed & 0xF], dim=1).reshape(-1)[:n].long()
    block = torch.arange(n) // t.blocksize
    return (code[idx] * t.absmax[block]).reshape(t.shape)

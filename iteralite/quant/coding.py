"""Which stored tensors of a quantized model are integer codes, and how to entropy-code them.

A built model's packed modules (`QuantLinear`, `QuantExperts`, `QuantEmbedding`, and the
QuantLinears inside `MixedExperts`) hold their codes as packed uint8 buffers. Their bit width and
code count follow from the module's spec and weight shape alone (each format's `code_fields` in
`quant.registry`), so a reader that rebuilt the model from its config knows them without storing
anything:

    integer methods (rtn, awq, gptq; `quant.intcodes.QTensor`)
        <prefix>codes   prod(shape) codes of spec.bits bits, `packing.pack_bits` layout
        <prefix>zeros   prod(groups) zero-points at the same width (asymmetric specs only)
    nf4 (`quant.nf4.NF4Tensor`)
        <prefix>codes   bitsandbytes nibbles, first code in the HIGH nibble; every nibble of the
                        buffer (pad nibble included) is one of 16 symbols

Scales, absmax, fp16 weights and float leftovers are not codes. `code_tensors(model)` maps each
code buffer's state_dict key to a `CodeView` (bits, count, packing); `CodeView.encode` turns the
packed tensor into an rANS blob (`quant.entropy`) and `CodeView.decode` turns a blob back into
the identical packed tensor. `coding_report(model)` lists, per code tensor, its packed, coded and
empirical-entropy sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from iteralite.io.errors import CheckpointError
from iteralite.quant import entropy, registry


@dataclass(frozen=True)
class CodeView:
    """One packed code buffer: `count` codes of `bits` bits stored in the `packing` layout."""

    name: str  # state_dict key
    bits: int
    count: int
    packing: str  # name of its `registry.Packing`

    @property
    def n_symbols(self) -> int:
        return 1 << self.bits

    @property
    def packed_bytes(self) -> int:
        return registry.PACKINGS[self.packing].nbytes(self.count, self.bits)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """packed uint8 (packed_bytes,) -> codes uint8 (count,)."""
        return registry.PACKINGS[self.packing].unpack(packed, self.bits, self.count)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """codes uint8 (count,) -> packed uint8 (packed_bytes,)."""
        return registry.PACKINGS[self.packing].pack(codes, self.bits)

    def encode(self, packed: torch.Tensor) -> bytes | None:
        """The rANS blob of a packed tensor, or None when its codes do not give back these exact
        bytes (nonzero pad bits: only a raw copy is lossless then)."""
        packed = packed.detach().cpu().reshape(-1)
        if packed.dtype != torch.uint8 or packed.numel() != self.packed_bytes:
            return None
        codes = self.unpack(packed)
        if not torch.equal(self.pack(codes), packed):
            return None
        return entropy.encode(codes.numpy(), self.n_symbols)

    def decode(self, blob: bytes) -> torch.Tensor:
        """rANS blob -> packed uint8 (packed_bytes,), bit-identical to what `encode` was given.
        Raises CheckpointError (naming the tensor) on a corrupt, truncated or foreign blob."""
        try:
            codes = entropy.decode(blob, self.count)
        except CheckpointError as e:
            raise CheckpointError(f"'{self.name}': {e}") from None
        if codes.size and int(codes.max()) >= self.n_symbols:  # a blob made for a wider alphabet
            raise CheckpointError(f"'{self.name}': entropy blob holds a code {int(codes.max())}, "
                                  f"but the tensor stores {self.bits}-bit codes")
        return self.pack(torch.from_numpy(np.ascontiguousarray(codes)))


# --------------------------------------------------------------------------- which buffers


def code_tensors(model: nn.Module) -> dict[str, CodeView]:
    """state_dict key -> CodeView for every packed code buffer of `model`, in state_dict order.
    Works on an empty (just rebuilt) model as well as a filled one: only specs and shapes count."""
    views = {}
    for name, m in model.named_modules():
        fmt = registry.module_format(m)
        fields = None if fmt is None else fmt.code_fields
        if fields is None:  # a float module, MixedExperts (its linears come on their own), fp16
            continue
        for prefix, shape in m._shapes.items():  # prefix -> weight shape, as laid out by the module
            for field, bits, count, packing in fields(shape, m.spec):
                key = f"{name}.{prefix}{field}" if name else f"{prefix}{field}"
                views[key] = CodeView(key, bits, count, packing)
    order = list(model.state_dict())
    return {k: views[k] for k in order if k in views}


def coding_report(model: nn.Module) -> list[dict]:
    """One row per code tensor of `model`: name, bits, symbols (codes), raw_bytes (packed),
    coded_bytes (rANS blob, or None when the packing is not reproducible), entropy_bytes (the
    codes' empirical entropy / 8, the floor for any static per-tensor table) and stored ("rans"
    when the blob is smaller than the packed bytes, as the compact checkpoint layout keeps it,
    else "raw")."""
    state = model.state_dict()
    rows = []
    for key, view in code_tensors(model).items():
        packed = state[key].detach().cpu().reshape(-1)
        blob = view.encode(packed)
        codes = view.unpack(packed).numpy()
        coded = None if blob is None else len(blob)
        rows.append({"name": key, "bits": view.bits, "symbols": view.count, "raw_bytes": packed.numel(),
                     "coded_bytes": coded,
                     "entropy_bytes": entropy.empirical_entropy_bits(codes, view.n_symbols) / 8,
                     "stored": "rans" if coded is not None and coded < packed.numel() else "raw"})
    return rows


def report_totals(rows: list[dict]) -> dict:
    """Sums over `coding_report` rows: raw_bytes, stored_bytes (coded where kept coded, else raw),
    entropy_bytes, and the counts of tensors kept coded / raw."""
    stored = sum(r["coded_bytes"] if r["stored"] == "rans" else r["raw_bytes"] for r in rows)
    return {"tensors": len(rows), "coded": sum(r["stored"] == "rans" for r in rows),
            "raw_bytes": sum(r["raw_bytes"] for r in rows), "stored_bytes": stored,
            "entropy_bytes": sum(r["entropy_bytes"] for r in rows)}

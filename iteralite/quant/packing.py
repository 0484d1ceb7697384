"""Dense bit packing of small integer codes, so a b-bit weight costs b bits on disk.

Layout (the same for every width): the codes form one little-endian bitstream. Code i occupies
stream bits [i*bits, (i+1)*bits), least significant bit first, and stream bit j is bit j % 8 of
byte j // 8. So 4-bit packs two codes per byte with the first code in the low nibble, 2-bit
packs four codes per byte starting at the low bits, 8-bit is the identity and 3-bit packs 8
codes into 3 bytes. The tail byte is padded with zero bits.

`pack_bits` / `unpack_bits` are the vectorized forms; `pack_bits_ref` / `unpack_bits_ref` are
bit-by-bit reference twins used by the tests.

Ternary codes {0, 1, 2} have their own base-3 layout, five codes per byte: `pack_ternary` /
`unpack_ternary` and their plain-Python twins `pack_ternary_ref` / `unpack_ternary_ref`.
"""
from __future__ import annotations

import math

import torch

ALLOWED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    """Raise ValueError unless `bits` is a supported code width."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        allowed = ", ".join(str(b) for b in ALLOWED_BITS)
        raise ValueError(f"bits must be one of {allowed}; got {bits!r}")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed to hold `numel` codes of `bits` bits: ceil(numel * bits / 8)."""
    check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel must be >= 0; got {numel}")
    return (numel * bits + 7) // 8


def _group_sizes(bits: int) -> tuple[int, int]:
    """Smallest whole unit of the stream: (codes, bytes) with codes * bits == bytes * 8."""
    unit = math.lcm(bits, 8)  # 8 bits for 2/4/8-bit codes, 24 bits for 3-bit codes
    return unit // bits, unit // 8


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be a uint8 tensor; got dtype {codes.dtype}")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(
            f"codes must be < 2**bits = {1 << bits} for bits={bits}; got a code {int(codes.max())}"
        )


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 (any shape, each < 2**bits) -> packed uint8 (packed_nbytes(codes.numel(), bits),).

    Codes are taken in row-major (flattened) order.
    """
    check_bits(bits)
    _check_codes(codes, bits)
    flat = codes.reshape(-1)
    n = flat.numel()
    if bits == 8:
        return flat.clone()
    cpu, bpu = _group_sizes(bits)  # codes per unit, bytes per unit
    pad = (-n) % cpu
    # int32 holds one unit (at most 24 bits) without overflow.
    units = torch.nn.functional.pad(flat.to(torch.int32), (0, pad)).reshape(-1, cpu)
    code_shift = torch.arange(cpu, dtype=torch.int32, device=codes.device) * bits
    value = (units << code_shift).sum(dim=1, dtype=torch.int32)  # (units,) bits are disjoint: sum == or
    byte_shift = torch.arange(bpu, dtype=torch.int32, device=codes.device) * 8
    out = ((value[:, None] >> byte_shift) & 0xFF).to(torch.uint8).reshape(-1)
    # Whole padded units may end in bytes that hold only pad bits; drop them.
    return out[: packed_nbytes(n, bits)]


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """packed uint8 (packed_nbytes(numel, bits),) -> codes uint8 (numel,)."""
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor; got dtype {packed.dtype}")
    want = packed_nbytes(numel, bits)
    flat = packed.reshape(-1)
    if flat.numel() != want:
        raise ValueError(
            f"packed holds {flat.numel()} bytes but {numel} codes of {bits} bits need {want}"
        )
    if bits == 8:
        return flat.clone()
    cpu, bpu = _group_sizes(bits)
    pad = (-flat.numel()) % bpu
    units = torch.nn.functional.pad(flat.to(torch.int32), (0, pad)).reshape(-1, bpu)
    byte_shift = torch.arange(bpu, dtype=torch.int32, device=packed.device) * 8
    value = (units << byte_shift).sum(dim=1, dtype=torch.int32)  # (units,)
    code_shift = torch.arange(cpu, dtype=torch.int32, device=packed.device) * bits
    codes = (value[:, None] >> code_shift) & ((1 << bits) - 1)  # (units, cpu)
    return codes.reshape(-1)[:numel].to(torch.uint8)


def pack_bits_ref(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference twin of `pack_bits`: writes the bitstream one bit at a time."""
    check_bits(bits)
    _check_codes(codes, bits)
    vals = codes.reshape(-1).tolist()
    out = [0] * packed_nbytes(len(vals), bits)
    for i, v in enumerate(vals):
        for k in range(bits):
            j = i * bits + k
            out[j // 8] |= ((v >> k) & 1) << (j % 8)
    return torch.tensor(out, dtype=torch.uint8)


def unpack_bits_ref(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Reference twin of `unpack_bits`: reads the bitstream one bit at a time."""
    check_bits(bits)
    data = packed.reshape(-1).tolist()
    out = []
    for i in range(numel):
        v = 0
        for k in range(bits):
            j = i * bits + k
            v |= ((data[j // 8] >> (j % 8)) & 1) << k
        out.append(v)
    return torch.tensor(out, dtype=torch.uint8)


# Ternary codes {0, 1, 2} (e.g. a zero/±1 weight): 5 per byte in base 3, since 3**5 = 243 <= 256
# (1.6 bits per code against 2 for 2-bit packing). Byte j holds codes 5j..5j+4 as the digits of
# sum_t codes[5j + t] * 3**t, so the first code is the least significant digit; the tail byte is
# padded with zero digits. A byte >= 243 or a nonzero padding digit is not a valid packing.

TERNARY_PER_BYTE = 5
_TERNARY_POW = (1, 3, 9, 27, 81)


def ternary_nbytes(numel: int) -> int:
    """Bytes needed to hold `numel` ternary codes: ceil(numel / 5)."""
    if numel < 0:
        raise ValueError(f"numel must be >= 0; got {numel}")
    return -(-numel // TERNARY_PER_BYTE)


def _check_ternary_codes(codes: torch.Tensor) -> None:
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be a uint8 tensor; got dtype {codes.dtype}")
    if codes.numel() and int(codes.max()) > 2:
        raise ValueError(f"ternary codes must be 0, 1 or 2; got a code {int(codes.max())}")


def _check_ternary_packed(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """-> the packed bytes as a flat int32 tensor, after checking dtype, length and digits."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor; got dtype {packed.dtype}")
    want = ternary_nbytes(numel)
    flat = packed.reshape(-1)
    if flat.numel() != want:
        raise ValueError(f"packed holds {flat.numel()} bytes but {numel} ternary codes need {want}")
    v = flat.to(torch.int32)
    if v.numel() and int(v.max()) >= 3 ** TERNARY_PER_BYTE:
        raise ValueError(f"packed ternary bytes must be < 243; got {int(v.max())}")
    tail = numel % TERNARY_PER_BYTE
    if tail and int(v[-1]) >= 3 ** tail:  # the padding digits above the last code must be zero
        raise ValueError(f"the last packed ternary byte holds {tail} codes but is {int(v[-1])} >= {3 ** tail}")
    return v


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 (any shape, each in {0, 1, 2}) -> packed uint8 (ternary_nbytes(numel),).

    Codes are taken in row-major (flattened) order.
    """
    _check_ternary_codes(codes)
    flat = codes.reshape(-1).to(torch.int32)
    pad = (-flat.numel()) % TERNARY_PER_BYTE
    digits = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, TERNARY_PER_BYTE)  # (bytes, 5)
    pow3 = torch.tensor(_TERNARY_POW, dtype=torch.int32, device=codes.device)
    return (digits * pow3).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """packed uint8 (ternary_nbytes(numel),) -> codes uint8 (numel,)."""
    v = _check_ternary_packed(packed, numel)
    pow3 = torch.tensor(_TERNARY_POW, dtype=torch.int32, device=packed.device)
    digits = (v[:, None] // pow3) % 3  # (bytes, 5)
    return digits.reshape(-1)[:numel].to(torch.uint8)


def pack_ternary_ref(codes: torch.Tensor) -> torch.Tensor:
    """Reference twin of `pack_ternary`: Horner's rule on each group of five, in plain Python."""
    _check_ternary_codes(codes)
    vals = codes.reshape(-1).tolist()
    out = []
    for j in range(0, len(vals), TERNARY_PER_BYTE):
        byte = 0
        for c in reversed(vals[j:j + TERNARY_PER_BYTE]):
            byte = byte * 3 + c
        out.append(byte)
    return torch.tensor(out, dtype=torch.uint8)


def unpack_ternary_ref(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Reference twin of `unpack_ternary`: repeated divmod by 3, in plain Python."""
    _check_ternary_packed(packed, numel)
    out = []
    for byte in packed.reshape(-1).tolist():
        for _ in range(TERNARY_PER_BYTE):
            byte, digit = divmod(byte, 3)
            out.append(digit)
    return torch.tensor(out[:numel], dtype=torch.uint8)

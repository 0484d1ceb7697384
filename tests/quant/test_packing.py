import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iteralite.quant.packing import (pack_bits, pack_bits_ref, packed_nbytes, unpack_bits,
                               unpack_bits_ref)
from iteralite.quant.packing import (pack_ternary, pack_ternary_ref, ternary_nbytes, unpack_ternary,
                                     unpack_ternary_ref)

BITS = (2, 3, 4, 8)


def random_codes(n, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** bits, (n,), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 23, 24, 25, 100, 1001])
def test_round_trip_and_size(bits, n):
    codes = random_codes(n, bits, seed=n)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("bits", BITS)
def test_matches_bitwise_reference(bits):
    codes = random_codes(37, bits, seed=bits)
    packed = pack_bits(codes, bits)
    assert torch.equal(packed, pack_bits_ref(codes, bits))
    assert torch.equal(unpack_bits_ref(packed, bits, 37), codes)


def test_any_shape_is_packed_row_major():
    codes = random_codes(6 * 7, 3, seed=1).reshape(6, 7)
    packed = pack_bits(codes, 3)
    assert torch.equal(unpack_bits(packed, 3, 42).reshape(6, 7), codes)


def test_layout_low_bits_first():
    # 4-bit: low nibble holds the first code
    assert pack_bits(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    # 2-bit: four codes per byte, first code in bits 0-1
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    # 3-bit: 8 codes in 3 bytes, one little-endian bitstream
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    value = sum(c << (3 * i) for i, c in enumerate(codes.tolist()))
    assert pack_bits(codes, 3).tolist() == [value & 255, value >> 8 & 255, value >> 16 & 255]
    # 8-bit: identity
    assert pack_bits(torch.tensor([0, 200, 255], dtype=torch.uint8), 8).tolist() == [0, 200, 255]


def test_tail_is_padded_with_zero_bits():
    # 3 codes of 3 bits = 9 bits -> 2 bytes, bits 9..15 must be zero
    packed = pack_bits(torch.tensor([7, 7, 7], dtype=torch.uint8), 3)
    assert packed.tolist() == [0xFF, 0x01]


@pytest.mark.parametrize("bits", [0, 1, 5, 6, 7, 16])
def test_bad_bits_are_rejected(bits):
    with pytest.raises(ValueError, match=r"bits must be one of 2, 3, 4, 8; got " + str(bits)):
        pack_bits(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 8"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), bits, 4)
    with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 8"):
        packed_nbytes(4, bits)


def test_codes_out_of_range_are_rejected():
    with pytest.raises(ValueError, match=r"codes must be < 2\*\*bits = 16 for bits=4; got a code 16"):
        pack_bits(torch.tensor([0, 16, 3], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=r"codes must be < 2\*\*bits = 8 for bits=3"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)


def test_wrong_dtype_and_length_are_rejected():
    with pytest.raises(ValueError, match="codes must be a uint8 tensor"):
        pack_bits(torch.tensor([1, 2], dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="packed holds 3 bytes but 4 codes of 4 bits need 2"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 4)


@pytest.mark.parametrize("seed", range(40))
def test_round_trip_random_cases(seed):
    g = torch.Generator().manual_seed(seed)
    bits = BITS[seed % len(BITS)]
    n = int(torch.randint(0, 70, (1,), generator=g))
    codes = torch.randint(0, 2 ** bits, (n,), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert torch.equal(packed, pack_bits_ref(codes, bits))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


# ---- ternary: five base-3 codes per byte ----

def random_ternary(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n,), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 15, 16, 99, 1000, 1003])
def test_ternary_round_trip_every_length_mod_5(n):
    codes = random_ternary(n, seed=n)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == ternary_nbytes(n) == (n + 4) // 5
    assert torch.equal(packed, pack_ternary_ref(codes))
    assert torch.equal(unpack_ternary(packed, n), codes)
    assert torch.equal(unpack_ternary_ref(packed, n), codes)


def test_ternary_layout_first_code_is_least_significant_digit():
    assert pack_ternary(torch.tensor([1, 2, 0, 0, 1], dtype=torch.uint8)).tolist() == [1 + 2 * 3 + 81]
    assert pack_ternary(torch.full((5,), 2, dtype=torch.uint8)).tolist() == [242]
    # tail byte padded with zero digits: [2, 1] -> 2 + 1 * 3
    assert pack_ternary(torch.tensor([0, 0, 0, 0, 0, 2, 1], dtype=torch.uint8)).tolist() == [0, 5]


def test_ternary_any_shape_is_packed_row_major():
    codes = random_ternary(6 * 7, seed=3).reshape(6, 7)
    assert torch.equal(unpack_ternary(pack_ternary(codes), 42).reshape(6, 7), codes)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2), max_size=64))
def test_ternary_matches_reference_on_random_inputs(vals):
    codes = torch.tensor(vals, dtype=torch.uint8)
    packed = pack_ternary(codes)
    assert torch.equal(packed, pack_ternary_ref(codes))
    assert torch.equal(unpack_ternary(packed, len(vals)), codes)
    assert torch.equal(unpack_ternary_ref(packed, len(vals)), codes)


def test_ternary_bad_codes_and_bytes_are_rejected():
    with pytest.raises(ValueError, match="ternary codes must be 0, 1 or 2; got a code 3"):
        pack_ternary(torch.tensor([0, 3], dtype=torch.uint8))
    with pytest.raises(ValueError, match="codes must be a uint8 tensor"):
        pack_ternary(torch.tensor([0, 1], dtype=torch.int64))
    with pytest.raises(ValueError, match="packed holds 1 bytes but 6 ternary codes need 2"):
        unpack_ternary(torch.zeros(1, dtype=torch.uint8), 6)
    for unpack in (unpack_ternary, unpack_ternary_ref):
        with pytest.raises(ValueError, match="packed ternary bytes must be < 243; got 243"):
            unpack(torch.tensor([243], dtype=torch.uint8), 5)
        # 2 codes in the tail byte: digits 2..4 are padding and must be zero (9 = 1 * 3**2)
        with pytest.raises(ValueError, match="holds 2 codes but is 9 >= 9"):
            unpack(torch.tensor([9], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="numel must be >= 0"):
        ternary_nbytes(-1)

import pytest
import torch

from iteralite.quant.packing import (pack_bits, pack_bits_ref, packed_nbytes, unpack_bits,
                               unpack_bits_ref)

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

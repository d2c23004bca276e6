import pytest
import torch

from vllm_seqkv.codec.packing import pack_bits, packed_nbytes, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 13, 1001])
def test_roundtrip_on_odd_lengths(bits, count):
    gen = torch.Generator().manual_seed(bits * 1000 + count)
    codes = torch.randint(0, 1 << bits, (count,), generator=gen, dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(count, bits) == -(-count * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, count).long(), codes)


def test_layout_is_little_endian_bit_stream():
    # codes 1, 2, 3 at 2 bits -> bits 10 01 11 (LSB first) -> byte 0b00111001
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [0b00111001]
    # 3-bit codes straddle bytes: 5 (101) then 6 (011 LSB first) -> 0b00110101
    assert pack_bits(torch.tensor([5, 6]), 3).tolist() == [0b00110101]


def test_out_of_range_codes_are_refused():
    with pytest.raises(ValueError, match="must lie in"):
        pack_bits(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="must lie in"):
        pack_bits(torch.tensor([-1]), 3)


def test_wrong_byte_count_is_refused():
    with pytest.raises(ValueError, match="take 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 4)


@pytest.mark.parametrize("bits", [0, 9])
def test_bit_width_outside_1_to_8_is_refused(bits):
    with pytest.raises(ValueError, match="1..8"):
        pack_bits(torch.tensor([0]), bits)

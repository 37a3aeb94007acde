"""Code packing against a bit-by-bit reference, and the quantizer's codes against its fake quantization."""
import pytest
import torch

from moqae.serve.packing import pack_codes, packed_bytes, unpack_codes
from moqae.quantizer import dequantize_codes, group_codes, quantize_groups


def reference_pack(codes, bits):
    """One code at a time into a Python integer bit stream."""
    stream = 0
    for i, code in enumerate(codes):
        stream |= int(code) << (i * bits)
    return list(stream.to_bytes(packed_bytes(len(codes), bits), "little"))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 5, 8, 13, 64, 67])   # whole bytes and odd tails
def test_packing_round_trips_and_matches_the_bit_stream(bits, count):
    generator = torch.Generator().manual_seed(bits * 100 + count)
    codes = torch.randint(0, 2**bits, (3, count), generator=generator, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, packed_bytes(count, bits))
    for row in range(3):
        assert packed[row].tolist() == reference_pack(codes[row].tolist(), bits)
    assert torch.equal(unpack_codes(packed, bits, count), codes)


def test_int4_and_int2_are_two_and_four_codes_per_byte():
    assert pack_codes(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    with pytest.raises(ValueError, match="hold 5 codes of 3 bits only as 2"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_codes_dequantize_to_the_fake_quantized_values_bit_for_bit(bits):
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 32, 16, generator=generator) * 3
    x[0, :, 3] = 1.25                                    # a constant group: scale 0, codes 0
    codes, scale, low = group_codes(x, bits, dim=-2)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert scale.dtype == low.dtype == torch.float16 and scale.shape == (4, 1, 16)
    assert (codes[0, :, 3] == 0).all() and scale[0, 0, 3] == 0
    assert torch.equal(dequantize_codes(codes, scale, low, x.dtype), quantize_groups(x, bits, dim=-2))
    packed = pack_codes(codes.transpose(-1, -2), bits)  # a channel's 32 codes side by side
    assert torch.equal(unpack_codes(packed, bits, 32).transpose(-1, -2), codes)

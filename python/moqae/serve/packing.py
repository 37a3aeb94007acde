"""Bit-packing of quantization codes, as a cache stores them: `bits` bits per code, codes laid one after
another into a little-endian bit stream (code i at bits i·b … i·b + b − 1, bit 0 the least significant of
byte 0). int4 is two codes per byte (low nibble first), int2 four per byte, int8 one; other widths
straddle byte boundaries, and the last byte is padded with zero bits.

Widths that divide 8 (1, 2, 4, 8) are packed and unpacked byte-wise with shifts on uint8 (the serving
cache's hot path); the others go through the bit stream, one int64 per bit.
"""
import torch


def packed_bytes(count, bits):
    """Bytes that hold `count` codes of `bits` bits."""
    return (count * bits + 7) // 8


def pack_codes(codes, bits):
    """codes (..., n) uint8 in 0..2^bits − 1 → (..., packed_bytes(n, bits)) uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codes of {bits} bits cannot be packed (expected 1..8)")
    if bits == 8:
        return codes.to(torch.uint8).clone()
    n = codes.shape[-1]
    if 8 % bits == 0:
        per_byte = 8 // bits
        padded = torch.nn.functional.pad(codes.to(torch.uint8), (0, packed_bytes(n, bits) * per_byte - n))
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return (padded.unflatten(-1, (-1, per_byte)) << shifts).sum(-1, dtype=torch.uint8)
    shifts = torch.arange(bits, device=codes.device)
    stream = ((codes.to(torch.int64)[..., None] >> shifts) & 1).flatten(-2)          # (..., n·bits)
    padding = packed_bytes(n, bits) * 8 - n * bits
    stream = torch.nn.functional.pad(stream, (0, padding))
    weights = 1 << torch.arange(8, device=codes.device)
    return (stream.unflatten(-1, (-1, 8)) * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed, bits, count):
    """The `count` codes of `bits` bits in `packed` (..., packed_bytes(count, bits)) → (..., count) uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codes of {bits} bits cannot be unpacked (expected 1..8)")
    if packed.shape[-1] != packed_bytes(count, bits):
        raise ValueError(f"{packed.shape[-1]} bytes hold {count} codes of {bits} bits only as {packed_bytes(count, bits)}")
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = packed[..., None] >> shifts
        return codes.bitwise_and_(2**bits - 1).flatten(-2)[..., :count]
    stream = ((packed.to(torch.int64)[..., None] >> torch.arange(8, device=packed.device)) & 1).flatten(-2)
    stream = stream[..., : count * bits].unflatten(-1, (count, bits))
    return (stream << torch.arange(bits, device=packed.device)).sum(-1).to(torch.uint8)

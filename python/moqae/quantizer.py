"""The KV quantizer of the store format (asymmetric round-to-nearest), shared by the dumper and the evaluator.

A unit is one layer, one KV head and one chunk of N tokens. Keys are quantized per channel (a group is
the N values of one channel in the chunk), values per token (a group is `value_group` consecutive
channels of one token). 16 bits means unquantized, stored as IEEE binary16, or as bfloat16 for a bfloat16
model (`sixteen_bit_dtype`). Tokens after the last whole chunk are never quantized. Scales and minima are
binary16 for every model: rounding to binary16 errs by at most 2⁻¹¹ relative, below bfloat16's own 2⁻⁸, and
a group beyond binary16's range (65,504) is refused rather than stored as infinity.
"""
import torch

from . import MoqaeError

BINARY16_MAX = 65504.0


def sixteen_bit_dtype(dtype):
    """The dtype 16-bit values are kept in for a model computing in `dtype`: bfloat16 for a bfloat16 model (its
    own values, exactly), IEEE binary16 otherwise (the store format's 16 bits)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def at_sixteen_bits(x):
    """x as 16-bit storage holds it, in x's dtype."""
    return x.to(sixteen_bit_dtype(x.dtype)).to(x.dtype)


def group_codes(x, bits, dim):
    """Asymmetric RTN of `x` over groups along `dim` (bits < 16), as a cache stores it: the codes (uint8,
    x's shape, in 0..2^bits − 1), and each group's scale and minimum as binary16 (size 1 along `dim`).
    A group whose values are all equal has scale 0 and codes 0."""
    levels = 2**bits - 1
    low = x.amin(dim=dim, keepdim=True)
    high = x.amax(dim=dim, keepdim=True)
    largest = torch.maximum(low.abs().amax(), high.abs().amax()).item()
    if not largest <= BINARY16_MAX:
        raise MoqaeError(f"a {bits}-bit group holds a value of magnitude {largest:.4g}, beyond the range of binary16 "
                         f"scales and minima ({BINARY16_MAX:.0f}); keep this model's KV at 16 bits")
    scale = ((high - low) / levels).to(torch.float16)
    low = low.to(torch.float16)
    scale_x, low_x = scale.to(x.dtype), low.to(x.dtype)
    safe_scale = torch.where(scale_x == 0, torch.ones_like(scale_x), scale_x)
    q = torch.clamp(torch.round((x - low_x) / safe_scale), 0, levels)
    return torch.where(scale_x == 0, torch.zeros_like(q), q).to(torch.uint8), scale, low


def dequantize_codes(codes, scale, low, dtype):
    """codes · scale + minimum in `dtype`: the values a cache's attention reads."""
    return codes.to(dtype) * scale.to(dtype) + low.to(dtype)


def quantize_groups(x, bits, dim):
    """Asymmetric RTN of `x` over groups along `dim`: min and scale rounded to binary16 before use."""
    if bits >= 16:
        return at_sixteen_bits(x)
    return dequantize_codes(*group_codes(x, bits, dim), x.dtype)


def quantize_keys(k, bits, chunk):
    """k: (..., T, D). Each whole chunk is quantized per channel; tail tokens stay binary16."""
    return _per_chunk(k, chunk, lambda c: quantize_groups(c, bits, dim=-2))


def quantize_values(v, bits, chunk, value_group):
    """v: (..., T, D). Each token of each whole chunk is quantized in groups of `value_group` channels."""
    def per_token(c):
        shape = c.shape
        grouped = c.reshape(*shape[:-1], shape[-1] // value_group, value_group)
        return quantize_groups(grouped, bits, dim=-1).reshape(shape)
    return _per_chunk(v, chunk, per_token)


def _per_chunk(x, chunk, quantize):
    T, D = x.shape[-2], x.shape[-1]
    C = T // chunk
    body = x[..., : C * chunk, :].reshape(*x.shape[:-2], C, chunk, D)
    out = quantize(body).reshape(*x.shape[:-2], C * chunk, D)
    tail = at_sixteen_bits(x[..., C * chunk:, :])
    return torch.cat([out, tail], dim=-2)


def unit_storage_bits(expert, chunk, head_dim, value_group):
    """Bits of one unit at `expert`, with a binary16 scale and minimum per quantized group."""
    bits = chunk * head_dim * (expert.key_bits + expert.value_bits)
    if expert.key_bits < 16:
        bits += 32 * head_dim
    if expert.value_bits < 16:
        bits += 32 * chunk * head_dim // value_group
    return bits

"""The KV quantizer of the store format (asymmetric round-to-nearest), shared by the dumper and the evaluator.

A unit is one layer, one KV head and one chunk of N tokens. Keys are quantized per channel (a group is
the N values of one channel in the chunk), values per token (a group is `value_group` consecutive
channels of one token). 16 bits means unquantized, stored as IEEE binary16. Tokens after the last whole
chunk are never quantized.
"""
import torch


def quantize_groups(x, bits, dim):
    """Asymmetric RTN of `x` over groups along `dim`: min and scale rounded to binary16 before use."""
    if bits >= 16:
        return x.to(torch.float16).to(x.dtype)
    levels = 2**bits - 1
    low = x.amin(dim=dim, keepdim=True)
    scale = ((x.amax(dim=dim, keepdim=True) - low) / levels).to(torch.float16).to(x.dtype)
    low = low.to(torch.float16).to(x.dtype)
    safe_scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round((x - low) / safe_scale), 0, levels)
    return torch.where(scale == 0, low.expand_as(x), q * scale + low)


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
    tail = x[..., C * chunk:, :].to(torch.float16).to(x.dtype)
    return torch.cat([out, tail], dim=-2)


def unit_storage_bits(expert, chunk, head_dim, value_group):
    """Bits of one unit at `expert`, with a binary16 scale and minimum per quantized group."""
    bits = chunk * head_dim * (expert.key_bits + expert.value_bits)
    if expert.key_bits < 16:
        bits += 32 * head_dim
    if expert.value_bits < 16:
        bits += 32 * chunk * head_dim // value_group
    return bits

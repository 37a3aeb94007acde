"""Decode attention on a MoQAECache layer's packed units (kernels/packed_attention.cpp), registered with
transformers as the attention implementation "moqae".

A cache built with `packed_attention=True` answers a decode step's `update` (one new token) with a
`PackedLayer` in place of the dequantized keys and values; the "moqae" attention function then runs the
kernel on the layer's parts. Anything else (prefill, several new tokens, a mask that hides a cached
position, keys that are plain tensors) goes to transformers' SDPA, so prefill keeps the path `eval`
scores. Reading every unit once, the step needs no float copy of the cache.
"""
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .kernels import packed_attention

NAME = "moqae"


@dataclass
class PackedLayer:
    """What a packed cache layer's decode `update` returns for both keys and values."""
    layer: object    # MoQAELayer


def kernel_arguments(layer):
    """The layer's stored parts as the kernel reads them: bits, data, scales, minima and each unit's row b·H + h."""
    arguments = [[] for _ in range(9)]
    for (key_part, value_part), (_, rows), count in zip(layer.parts, layer.places, layer.counts):
        if not count:
            continue
        empty = torch.empty(0, dtype=torch.float16)
        for index, value in enumerate((key_part.bits, value_part.bits)):
            arguments[index].append(value)
        for part, first in ((key_part, 2), (value_part, 5)):
            tensors = part.tensors if part.bits < 16 else [part.tensors[0], empty, empty]
            for offset, tensor in enumerate(tensors):
                arguments[first + offset].append(tensor.contiguous())
        arguments[8].append(rows.to(torch.int64).contiguous())
    return arguments


def packed_decode(layer, query, scaling, portable=False):
    """Attention output (B, 1, Hq, D) of one query token per row (B, Hq, 1, D) over the packed layer."""
    B, Hq, _, D = query.shape
    _, H, _ = layer.shape
    residual_keys, residual_values = (r.reshape(B * H, -1, D).contiguous() for r in layer.residual)
    out = packed_attention(portable).packed_decode_attention(
        query[:, :, 0].float().contiguous(), *kernel_arguments(layer), residual_keys, residual_values, H,
        layer.cache.chunk_size, layer.cache.value_group, float(scaling))
    return out[:, None].to(query.dtype)


def hides_a_position(attention_mask):
    """Whether a decode step's mask (bool: True attends; float: 0 attends) hides any cached position."""
    if attention_mask is None:
        return False
    return not bool(attention_mask.all()) if attention_mask.dtype == torch.bool else bool((attention_mask != 0).any())


def moqae_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The "moqae" attention implementation: the packed kernel for a packed decode step, SDPA otherwise."""
    if isinstance(key, PackedLayer):
        if not hides_a_position(attention_mask):
            return packed_decode(key.layer, query, module.scaling if scaling is None else scaling), None
        key, value = key.layer.read()
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(NAME, moqae_attention)

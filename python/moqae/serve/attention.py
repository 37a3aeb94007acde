"""Decode attention on a MoQAECache layer's packed units: kernels/packed_attention.cpp on the CPU,
triton_attention.py on a GPU.

A cache built with packed attention answers a decode step's `update` (one new token) with a
`PackedLayer` (a `capture.DeferredKV`) in place of the dequantized keys and values; the "moqae"
attention implementation then asks it to attend, and it runs the kernel on the layer's parts. Where the
step's mask hides a cached position (padding in a batch), a hook is recording, or the model soft-caps
("moqae-eager"), the layer is dequantized and attended as before. Prefill keeps the path `eval` scores.
Reading every unit once, a packed step makes no float copy of the cache.
"""
import torch

from ..capture import DeferredKV
from .kernels import packed_attention


class PackedLayer(DeferredKV):
    """What a packed cache layer's decode `update` returns for both keys and values."""

    def __init__(self, layer):
        self.layer = layer    # MoQAELayer

    def attend(self, module, query, attention_mask, scaling):
        if hides_a_position(attention_mask):
            return None
        scaling = module.scaling if scaling is None else scaling
        if query.is_cuda:
            from .triton_attention import packed_decode_triton   # python/requirements-triton.txt
            return packed_decode_triton(self.layer, query, scaling)
        return packed_decode(self.layer, query, scaling)

    def materialize(self):
        return self.layer.read()


def kernel_arguments(layer):
    """The layer's stored parts as the kernel reads them: bits, data, scales, minima and each unit's row b·H + h;
    kept on the layer until it stores a chunk."""
    if layer.kernel_parts is None:
        layer.kernel_parts = stored_parts(layer)
    return layer.kernel_parts


def stored_parts(layer):
    """Kernel arguments with one part per block of stored units (cache.PackedPart)."""
    arguments = [[] for _ in range(9)]
    empty = torch.empty(0, dtype=torch.float16)
    for (key_part, value_part), (_, rows) in zip(layer.parts, layer.places):
        for (start, key_tensors), (_, value_tensors) in zip(key_part.segments(), value_part.segments()):
            for index, value in enumerate((key_part.bits, value_part.bits)):
                arguments[index].append(value)
            for part, tensors, first in ((key_part, key_tensors, 2), (value_part, value_tensors, 5)):
                tensors = tensors if part.bits < 16 else [tensors[0], empty, empty]
                for offset, tensor in enumerate(tensors):
                    arguments[first + offset].append(tensor.contiguous())
            arguments[8].append(rows[start: start + key_tensors[0].shape[0]].to(torch.int64).contiguous())
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

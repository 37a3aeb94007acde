"""Chunk statistics a router can read beside each token's key (router input `key+chunk`).

Each is a function of one whole chunk's own keys and values, so a server computes it when it stores
the chunk, as it quantizes the chunk anyway. For a chunk of keys K and values V (N, D), in order:

    key error int4, key error int2        ‖Q_b(K) − K‖ / ‖K‖ with the store's key quantizer at b bits
    value error int4, value error int2    ‖Q_b(V) − V‖ / ‖V‖ with the store's value quantizer
    log key norm, log value norm          log of the mean token norm ‖k_t‖, ‖v_t‖ (+1e-6)
    key range ratio                       log(max_c r_c / mean_c r_c), r_c = max_t K[t, c] − min_t K[t, c]

Every token of a whole chunk carries its chunk's statistics; tokens after the last whole chunk (never
routed) carry zeros.
"""
import torch

from .quantizer import quantize_keys, quantize_values
from .router_inputs import CHUNK_FEATURES
EPS = 1e-6


def chunk_statistics(key, value, chunk, value_group):
    """The statistics of every whole chunk: key, value (..., T, D) → (..., C, len(CHUNK_FEATURES)) float32."""
    C = key.shape[-2] // chunk
    k, v = key[..., : C * chunk, :].float(), value[..., : C * chunk, :].float()

    def per_chunk(x):                                      # (..., C·N, D) → (..., C, N, D)
        return x.reshape(*x.shape[:-2], C, chunk, x.shape[-1])

    def relative_error(x, quantized):                      # per chunk: ‖x̂ − x‖ / ‖x‖
        error = per_chunk(quantized - x).square().sum((-1, -2)).sqrt()
        return error / (per_chunk(x).square().sum((-1, -2)).sqrt() + EPS)

    columns = [relative_error(k, quantize_keys(k, bits, chunk)) for bits in (4, 2)]
    columns += [relative_error(v, quantize_values(v, bits, chunk, value_group)) for bits in (4, 2)]
    columns += [(per_chunk(x).norm(dim=-1).mean(-1) + EPS).log() for x in (k, v)]
    ranges = per_chunk(k).amax(-2) - per_chunk(k).amin(-2)                       # (..., C, D)
    columns.append(((ranges.amax(-1) + EPS) / (ranges.mean(-1) + EPS)).log())
    return torch.stack(columns, dim=-1)


def key_with_chunk_statistics(key, value, chunk, value_group):
    """Each token's key followed by its chunk's statistics: (..., T, D) → (..., T, D + 7)."""
    statistics = chunk_statistics(key, value, chunk, value_group).repeat_interleave(chunk, dim=-2)
    tail = key.shape[-2] - statistics.shape[-2]
    statistics = torch.cat([statistics, statistics.new_zeros(*statistics.shape[:-2], tail, statistics.shape[-1])], dim=-2)
    return torch.cat([key.float(), statistics], dim=-1).to(key.dtype)

"""Chunk statistics (router input key+chunk) against a float64 loop over chunks written from their definitions."""
import math

import torch

from moqae.features import CHUNK_FEATURES, chunk_statistics, key_with_chunk_statistics
from moqae.quantizer import quantize_keys, quantize_values


def test_chunk_statistics_follow_their_definitions():
    torch.manual_seed(0)
    H, T, D, N, G = 2, 100, 8, 16, 4          # 6 whole chunks and a tail of 4 tokens
    key, value = torch.randn(H, T, D) * 3, torch.randn(H, T, D)
    key[0, 40, 5] = 30.0                        # an outlier channel in chunk 2 of head 0
    statistics = chunk_statistics(key, value, N, G)
    assert statistics.shape == (H, T // N, len(CHUNK_FEATURES))
    for h in range(H):
        for c in range(T // N):
            k, v = key[h, c * N: (c + 1) * N].double(), value[h, c * N: (c + 1) * N].double()
            expected = []
            for bits in (4, 2):
                error = quantize_keys(key[h, c * N: (c + 1) * N], bits, N).double() - k
                expected.append(error.norm().item() / (k.norm().item() + 1e-6))
            for bits in (4, 2):
                error = quantize_values(value[h, c * N: (c + 1) * N], bits, N, G).double() - v
                expected.append(error.norm().item() / (v.norm().item() + 1e-6))
            expected.append(math.log(sum(k[t].norm().item() for t in range(N)) / N + 1e-6))
            expected.append(math.log(sum(v[t].norm().item() for t in range(N)) / N + 1e-6))
            ranges = [(k[:, d].max() - k[:, d].min()).item() for d in range(D)]
            expected.append(math.log((max(ranges) + 1e-6) / (sum(ranges) / D + 1e-6)))
            torch.testing.assert_close(statistics[h, c].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    assert statistics[0, 2, 6] > statistics[1, 2, 6] + 0.4   # the outlier widens one channel's range


def test_every_token_of_a_chunk_carries_its_statistics_and_the_tail_zeros():
    key, value = torch.randn(1, 40, 4), torch.randn(1, 40, 4)
    inputs = key_with_chunk_statistics(key, value, 16, 4)
    assert inputs.shape == (1, 40, 4 + len(CHUNK_FEATURES)) and torch.equal(inputs[..., :4], key)
    statistics = chunk_statistics(key, value, 16, 4)
    assert torch.equal(inputs[0, :16, 4:], statistics[0, 0].expand(16, -1))
    assert torch.equal(inputs[0, 16:32, 4:], statistics[0, 1].expand(16, -1))
    assert (inputs[0, 32:, 4:] == 0).all()

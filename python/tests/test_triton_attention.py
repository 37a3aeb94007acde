"""The Triton kernel of packed attention (serve/triton_attention.py), run on the CPU by Triton's
interpreter, against a float64 brute force and the C++ kernel. Needs python/requirements-triton.txt
(`make test-triton`); skipped without it."""
import pytest
import torch

pytest.importorskip("triton")

from moqae.model import load_model                                   # noqa: E402
from moqae.router import random_export                               # noqa: E402
from moqae.serve.attention import packed_decode                      # noqa: E402
from moqae.serve.cache import MoQAECache                             # noqa: E402
from moqae.serve.triton_attention import packed_decode_triton        # noqa: E402  (TRITON_INTERPRET: conftest.py)


def brute_force(layer, query, scaling):
    """softmax(q Kᵀ · scaling) V in float64 over the units as `read` dequantizes them: (B, 1, Hq, D)."""
    keys, values = (x.double() for x in layer.read())
    G = query.shape[1] // keys.shape[1]
    keys, values = (x.repeat_interleave(G, dim=1) for x in (keys, values))
    weights = torch.softmax(query.double() @ keys.transpose(-1, -2) * scaling, dim=-1)
    return (weights @ values).transpose(1, 2)


@pytest.mark.parametrize("fixture, batch, experts", [
    ("tiny_llama", 1, "fp16,int8,int4,int2"), ("tiny_llama", 2, "int4,k4v2,k2v4,int3"), ("tiny_mqa_llama", 2, "fp16,int4,int2,int5")])
def test_triton_partials_equal_a_float64_brute_force(request, fixture, batch, experts):
    model_dir = request.getfixturevalue(fixture)
    model = load_model(model_dir, "cpu", None, "float32")
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    cache = MoQAECache.from_export(random_export(layers, heads, 16, experts=experts, seed=6, scale=2.0), model,
                                   model_dir=model_dir, packed_attention=False)
    with torch.no_grad():
        model(torch.randint(0, 256, (batch, 83), generator=torch.Generator().manual_seed(7)), past_key_values=cache)
    query = torch.randn(batch, 4, 1, 16, generator=torch.Generator().manual_seed(8))
    for layer in cache.layers:
        assert len(layer.expert_map.unique()) >= 2
        expected = brute_force(layer, query, 0.25)
        result = packed_decode_triton(layer, query, 0.25)
        assert result.shape == expected.shape
        assert ((result.double() - expected).norm() / expected.norm()).item() <= 1e-5
        assert ((result - packed_decode(layer, query, 0.25)).norm() / result.norm()).item() <= 1e-5

"""The captured KV cache and the router inputs made from it, against K and V recomputed from the
model's weights and RoPE in float64."""
import pytest
import torch

from conftest import REFERENCE_MODEL, VALID_TXT
from moqae.capture import KVHook, RouterInputs, undo_rope
from moqae.model import load_model


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@pytest.fixture(scope="module")
def captured():
    """The model, its hook after one forward over 160 bytes of valid.txt, and per layer the key before
    RoPE (k_proj's output), the RoPE'd key and the value, recomputed from the weights."""
    model = load_model(REFERENCE_MODEL, "cpu", None, "float32")
    with open(VALID_TXT, "rb") as f:
        ids = torch.tensor(list(f.read(160)), dtype=torch.long)[None]
    hook = KVHook(record=True)
    with torch.no_grad(), hook.active():
        hidden = model(ids, output_hidden_states=True).hidden_states
    config = model.config
    head_dim, kv_heads, T = config.head_dim, config.num_key_value_heads, ids.shape[1]
    theta = config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    recomputed = []
    for layer, block in enumerate(model.model.layers):
        with torch.no_grad():
            normed = block.input_layernorm(hidden[layer])
            k = block.self_attn.k_proj(normed).view(1, T, kv_heads, head_dim).transpose(1, 2).double()
            v = block.self_attn.v_proj(normed).view(1, T, kv_heads, head_dim).transpose(1, 2)
        recomputed.append((k, k * cos + rotate_half(k) * sin, v))
    return model, hook, recomputed


def test_captured_keys_equal_keys_recomputed_from_weights_and_rope(captured):
    _, hook, recomputed = captured
    for layer, (_, roped, v) in enumerate(recomputed):
        assert hook.keys[layer].shape == roped.shape
        torch.testing.assert_close(hook.keys[layer].double(), roped, rtol=1e-4, atol=5e-5)  # float32 RoPE in the model
        torch.testing.assert_close(hook.values[layer], v)


def test_router_inputs_are_the_cached_key_the_key_before_rope_and_key_with_value(captured):
    model, hook, recomputed = captured
    for layer, (before_rope, _, v) in enumerate(recomputed):
        key, value = hook.keys[layer], hook.values[layer]
        assert RouterInputs("key", model, REFERENCE_MODEL)(key, value) is key
        torch.testing.assert_close(RouterInputs("key-prerope", model, REFERENCE_MODEL)(key, value).double(), before_rope,
                                   rtol=1e-4, atol=5e-5)
        pair = RouterInputs("key+value", model, REFERENCE_MODEL)(key, value)
        assert pair.shape[-1] == 2 * key.shape[-1]
        assert torch.equal(pair[..., : key.shape[-1]], key) and torch.equal(pair[..., key.shape[-1]:], value)


def test_undo_rope_handles_attention_scaling_and_partial_rotation():
    """A rotary embedding that scales cos and sin by s (as YaRN does) and rotates the first 6 of 10 channels."""
    torch.manual_seed(0)
    T, D, R, s = 7, 10, 6, 1.3
    x = torch.randn(2, 3, T, D, dtype=torch.float64)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * torch.tensor([1.0, 0.1, 0.01], dtype=torch.float64)
    cos, sin = s * torch.cat([angles, angles], -1).cos()[None], s * torch.cat([angles, angles], -1).sin()[None]
    roped = torch.cat([x[..., :R] * cos[:, None] + rotate_half(x[..., :R]) * sin[:, None], x[..., R:]], -1)
    torch.testing.assert_close(undo_rope(roped, lambda _, positions: (cos, sin)).double(), x, rtol=1e-6, atol=1e-6)


def test_a_model_without_rotary_embedding_is_named():
    from moqae import MoqaeError
    with pytest.raises(MoqaeError, match="somewhere: router input key-prerope needs the model's rotary embedding"):
        RouterInputs("key-prerope", torch.nn.Linear(1, 1), "somewhere")

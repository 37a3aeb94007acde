import torch

from conftest import REFERENCE_MODEL, VALID_TXT
from moqae_calib.capture import KVHook
from moqae_calib.dump import load_model


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def test_captured_keys_equal_keys_recomputed_from_weights_and_rope():
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
    for layer, block in enumerate(model.model.layers):
        with torch.no_grad():
            normed = block.input_layernorm(hidden[layer])
            k = block.self_attn.k_proj(normed).view(1, T, kv_heads, head_dim).transpose(1, 2).double()
            v = block.self_attn.v_proj(normed).view(1, T, kv_heads, head_dim).transpose(1, 2)
        expected = k * cos + rotate_half(k) * sin
        assert hook.keys[layer].shape == (1, kv_heads, T, head_dim)
        torch.testing.assert_close(hook.keys[layer].double(), expected, rtol=1e-4, atol=5e-5)  # float32 RoPE in the model
        torch.testing.assert_close(hook.values[layer], v)

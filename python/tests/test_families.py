"""Model families, as tiny random models built from the pinned transformers configs (nothing downloaded):
capturing leaves the logits those of transformers' eager attention, the K and V it sees are the ones the
model's own cache holds, the pre-RoPE key is the one the model computed before applying RoPE, and
dump → train → export → eval runs end to end. Windows longer than a sliding window: test_sliding_dump.py."""
import json
import os
import subprocess

import pytest
import torch

from conftest import run_moqae, train_on
from moqae import MoqaeError
from moqae.capture import KVHook, RouterInputs
from moqae.model import first_held_chunks, load_model, model_shape, sliding_window_layers, window_length

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def family_configs():
    """Family → (config, what it exercises). Sliding windows are the full 256 positions except where a test
    asks for a shorter one."""
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)
    return {
        "mistral": (MistralConfig(num_hidden_layers=2, sliding_window=256, **COMMON), "sliding window on every layer"),
        "qwen2": (Qwen2Config(num_hidden_layers=2, **COMMON), "biased q/k/v projections"),
        "qwen3": (Qwen3Config(num_hidden_layers=2, head_dim=16, **COMMON), "q/k norm"),
        "gemma2": (Gemma2Config(num_hidden_layers=2, head_dim=24, sliding_window=256, **COMMON),
                   "alternating sliding and global layers, attention and final logit soft-capping, head_dim 24 ≠ 64/4"),
        "gemma3": (Gemma3TextConfig(num_hidden_layers=3, head_dim=24, sliding_window=256,
                                    layer_types=["sliding_attention", "full_attention", "sliding_attention"], **COMMON),
                   "q/k norm, a RoPE per layer type, head_dim 24 ≠ 64/4"),
        "phi3": (Phi3Config(num_hidden_layers=2, partial_rotary_factor=0.5, **COMMON), "fused qkv, RoPE on half the head"),
        "llama-head-dim-12-yarn": (LlamaConfig(num_hidden_layers=2, **dict(COMMON, hidden_size=48), rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 128}),
            "head_dim 12 (not a multiple of 8), YaRN RoPE scaling (attention scaling ≠ 1)"),
    }


FAMILIES = list(family_configs())


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """Family name → the directory of its tiny random model, saved once."""
    from transformers import AutoModelForCausalLM
    made = {}

    def make(name, **changes):
        key = (name, tuple(sorted(changes.items())))
        if key not in made:
            config = family_configs()[name][0]
            for field, value in changes.items():
                setattr(config, field, value)
            torch.manual_seed(0)
            made[key] = str(tmp_path_factory.mktemp(name))
            AutoModelForCausalLM.from_config(config).save_pretrained(made[key])
        return made[key]
    return make


def pre_rope_key_hook(attention, keys):
    """Records into `keys` the layer's key as the model computes it before RoPE: after the k norm where there is
    one, else the k projection (or the key part of a fused qkv projection), as (B, kv heads, T, D)."""
    heads, head_dim = attention.config.num_key_value_heads, attention.head_dim

    def record(module, inputs, output):
        if hasattr(attention, "qkv_proj") and module is attention.qkv_proj:
            query_size = attention.config.num_attention_heads * head_dim
            output = output[..., query_size: query_size + heads * head_dim]
        if output.dim() == 4:   # a k norm sees (B, T, kv heads, D), or (B, kv heads, T, D) after the transpose (Gemma 3)
            keys.append(output if output.shape[1] == heads else output.transpose(1, 2))
        else:
            keys.append(output.reshape(*output.shape[:2], heads, head_dim).transpose(1, 2))
    producer = next(getattr(attention, name) for name in ("k_norm", "k_proj", "qkv_proj") if hasattr(attention, name))
    return producer.register_forward_hook(record)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_sees_the_cache_and_undoes_rope(family, family_dir):
    directory = family_dir(family)
    model = load_model(directory, "cpu", None, "float32")
    layers, heads, head_dim, _ = model_shape(model.config)
    ids = torch.randint(3, 256, (2, 96), generator=torch.Generator().manual_seed(1))   # 96 tokens: never mistaken for heads
    pre_rope = {layer: [] for layer in range(layers)}
    handles = [pre_rope_key_hook(model.model.layers[layer].self_attn, pre_rope[layer]) for layer in range(layers)]
    with KVHook(record=True).active() as hook, torch.no_grad():
        output = model(ids, use_cache=True)
    cache = output.past_key_values
    for handle in handles:
        handle.remove()
    from transformers import AutoModelForCausalLM
    eager = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():   # capturing changes nothing: the logits are transformers' own eager attention's
        assert torch.allclose(output.logits, eager(ids).logits, atol=1e-4, rtol=1e-4)
    prerope = RouterInputs("key-prerope", model, directory)
    for layer in range(layers):
        key, value = hook.keys[layer], hook.values[layer]
        assert key.shape == (2, heads, 96, head_dim)
        assert torch.equal(key, cache.layers[layer].keys) and torch.equal(value, cache.layers[layer].values), layer
        expected = pre_rope[layer][0]
        assert torch.allclose(prerope(key, value, layer=layer), expected, atol=1e-5, rtol=1e-4), layer
        # Later positions: RoPE undone at positions 32.. of the same tokens.
        assert torch.allclose(prerope(key[..., 32:, :], value, start=32, layer=layer), expected[..., 32:, :],
                              atol=1e-5, rtol=1e-4), layer


@pytest.mark.parametrize("family", FAMILIES)
def test_dump_train_export_and_eval(family, family_dir, small_corpus, tmp_path, moqae_train):
    directory = family_dir(family)
    store, run_dir, router = str(tmp_path / "store"), str(tmp_path / "run"), str(tmp_path / "router.bin")
    dumped = run_moqae("dump", "--model", directory, "--corpus", small_corpus, "--out", store, "--tokenizer", "bytes",
                       "--seq-len", "128", "--fraction", "0.3", "--router-input", "key-prerope")
    assert dumped.returncode == 0, dumped.stderr
    train = train_on(moqae_train, store, run_dir, "data.calibration_fraction=0.15", "data.validation_fraction=0.15", max_steps=2)
    assert train.returncode == 0, train.stderr
    export = subprocess.run([moqae_train, "export", run_dir, "--out", router], capture_output=True, text=True)
    assert export.returncode == 0, export.stderr
    evaluated = run_moqae("eval", "--model", directory, "--text", small_corpus, "--router", router, "--tokenizer", "bytes",
                          "--seq-len", "128", "--max-windows", "2", "--no-baselines", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    router_row = next(r for r in json.loads(evaluated.stdout)["results"] if r["name"] == "router")
    assert torch.isfinite(torch.tensor(router_row["nll"])) and router_row["bits_with_constants"] <= 16


def test_sliding_window_layers_come_from_the_config(family_dir):
    """Which layers attend through a sliding window (dump, eval and serving hold only their last chunks), and the
    default window length, which no longer stops at a sliding window."""
    from transformers import AutoConfig
    directory = family_dir("mistral", sliding_window=64)
    config = AutoConfig.from_pretrained(directory)
    assert sliding_window_layers(config) == {0: 64, 1: 64}
    assert window_length(config, directory) == 256 and first_held_chunks(config, 256, 32) == [6, 6]
    with pytest.raises(MoqaeError, match="--seq-len 512 exceeds the model's max_position_embeddings 256"):
        window_length(config, directory, 512)
    gemma = AutoConfig.from_pretrained(family_dir("gemma3"))
    assert sliding_window_layers(gemma) == {0: 256, 2: 256}   # only the sliding layers
    assert first_held_chunks(gemma, 256, 32) == [0, 0, 0]     # a window that fits holds every chunk
    assert sliding_window_layers(AutoConfig.from_pretrained(family_dir("qwen2"))) == {}

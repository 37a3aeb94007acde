"""MoQAECache against the evaluator's fake quantization (prefill, bit for bit), against the quantizer
chunk by chunk through decoding, against DynamicCache at 16 bits, and its bytes against the formula."""
import os
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import DynamicCache, LlamaConfig

from conftest import PASSKEY_MODEL, ROOT, VALID_TXT, run_moqae
from moqae import MoqaeError
from moqae.serve.cache import FROZEN, TARGET_TRANSFORMERS, MoQAECache, PackedPart, RouterPolicy
from moqae.capture import KVHook, RouterInputs
from moqae.corpus import ByteTokenizer, read_texts, windows
from moqae.model import load_model, model_shape
from moqae.evaluate.plans import Layout, LayerPlan, RouterPlan, apply_plan
from moqae.experts import parse_expert
from moqae.features import CHUNK_FEATURES
from moqae.router import random_export, route_chunks, write_export


def text_ids(tokens, count=1):
    return windows(read_texts([VALID_TXT]), ByteTokenizer(), tokens)[:count]


def attention_kv(model, ids, cache=None, transform=None):
    """Logits and the K, V every layer's attention read, for one forward over ids."""
    hook = KVHook(record=True, transform=transform)
    with torch.no_grad(), hook.active():
        logits = model(ids, past_key_values=cache, use_cache=cache is not None).logits
    return logits, hook.keys, hook.values


@pytest.fixture(scope="module")
def passkey_model():
    return load_model(PASSKEY_MODEL, "cpu", None, "float32")


def evaluator_kv(model, ids, export, value_group):
    """The evaluator's fake-quantized K, V for the window ids under the export's routers."""
    layers, heads, head_dim, _ = model_shape(model.config)
    layout = Layout(ids.shape[1], export.chunk_size, int(export.freeze_first_chunk), layers, heads, head_dim, value_group)
    plan = RouterPlan(export, RouterInputs(export.router_input, model, "model", export.chunk_size, value_group))
    return attention_kv(model, ids, transform=lambda layer, k, v: apply_plan(
        k, v, plan.decide(layer, k, v, [0], layout), plan.experts, layout, layer))


@pytest.mark.parametrize("router_input, freeze, group, experts", [
    ("key", True, 1, "fp16,int4,int2"), ("key", False, 2, "fp16,k4v2,int3,int2"), ("key-prerope", True, 1, "fp16,int4,int2"),
    ("key+value", True, 1, "fp16,int8,int4,int2"), ("key+chunk", True, 1, "fp16,int4,int2")])
def test_prefill_kv_equal_the_evaluators_fake_quantization_bit_for_bit(passkey_model, router_input, freeze, group, experts):
    head_dim = 64
    width = {"key+value": 2 * head_dim, "key+chunk": head_dim + len(CHUNK_FEATURES)}.get(router_input, head_dim)
    export = random_export(4, 2, width, experts, group, freeze, router_input, scale=0.5)
    ids = text_ids(300)                                          # 9 whole chunks and a tail of 12
    cache = MoQAECache.from_export(export, passkey_model, value_group=32)
    logits, keys, values = attention_kv(passkey_model, ids, cache)
    expected_logits, expected_keys, expected_values = evaluator_kv(passkey_model, ids, export, 32)
    for layer in range(4):
        assert torch.equal(keys[layer], expected_keys[layer]) and torch.equal(values[layer], expected_values[layer])
    assert torch.equal(logits, expected_logits)
    counts = sum(layer.unit_counts() for layer in cache.layers)
    assert (counts[:-1] > 0).sum() >= 2, "the random routers should mix experts"
    assert counts[-1] == (8 if freeze else 0)                    # chunk 0 of 4 layers × 2 heads, frozen
    assert cache.routing_seconds > 0


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_mqa_llama"])
def test_gqa_and_mqa_models_serve_the_evaluators_kv(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    model = load_model(model_dir, "cpu", None, "float32")
    layers, heads, head_dim, _ = model_shape(model.config)
    export = random_export(layers, heads, head_dim, "fp16,int4,int2", scale=2.0)
    ids = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(1))     # a batch of two
    logits, keys, values = attention_kv(model, ids, MoQAECache.from_export(export, model))
    expected_logits, expected_keys, expected_values = evaluator_kv(model, ids, export, head_dim)
    assert all(torch.equal(keys[l], expected_keys[l]) and torch.equal(values[l], expected_values[l]) for l in range(layers))
    assert torch.equal(logits, expected_logits)


def test_layer_plan_cache_equals_the_evaluators_layer_plan(passkey_model):
    experts = [parse_expert(name) for name in ("int3", "int2", "k8v4", "fp16")]   # int3: codes straddle bytes
    ids = text_ids(260)
    cache = MoQAECache.from_layer_plan(experts, passkey_model.config, 32, True)
    logits, keys, values = attention_kv(passkey_model, ids, cache)
    layout = Layout(260, 32, 1, 4, 2, 64, 64)
    plan = LayerPlan(experts, list(range(4)))
    expected_logits, expected_keys, _ = attention_kv(passkey_model, ids, transform=lambda layer, k, v: apply_plan(
        k, v, plan.decide(layer, k, v, [0], layout), experts, layout, layer))
    assert torch.equal(logits, expected_logits) and all(torch.equal(keys[l], expected_keys[l]) for l in range(4))


def small_config(layers=2, kv_heads=2, head_dim=16):
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim)


@pytest.mark.parametrize("freeze", [True, False])
def test_decoding_crosses_chunk_boundaries_and_never_requantizes(freeze):
    """Prefill 40 tokens, then one at a time to 130: after every step each layer returns what the
    quantizer makes of its stored states, chunk by chunk as each filled. Tokens past the prefill's last
    whole chunk waited in the binary16 residual, so their chunk is quantized from binary16 values."""
    export = random_export(2, 2, 16, "fp16,int4,int2", group=2, freeze=freeze, scale=2.0)
    cache = MoQAECache(RouterPolicy(export, RouterInputs("key", None, "model", 32, 8)), small_config(), 32, freeze, 8)
    generator = torch.Generator().manual_seed(3)
    states = [(torch.randn(1, 2, 130, 16, generator=generator) * 3, torch.randn(1, 2, 130, 16, generator=generator))
              for _ in range(2)]
    stored = [(k.clone(), v.clone()) for k, v in states]
    for k, v in stored:                                          # what reaches a chunk through the residual
        k[:, :, 32:], v[:, :, 32:] = k[:, :, 32:].half().float(), v[:, :, 32:].half().float()
    decisions = []                                               # per chunk, the leader layer's routing (B, H)
    steps = [(0, 40)] + [(t, t + 1) for t in range(40, 130)]
    for start, end in steps:
        for layer in range(2):
            keys, values = cache.update(states[layer][0][:, :, start:end], states[layer][1][:, :, start:end], layer)
            whole = end // 32
            while len(decisions) < whole:
                c = len(decisions)
                leader = stored[0][0][:, :, 32 * c: 32 * c + 32]
                decisions.append(route_chunks(export, 0, leader)[..., 0])
            layout = Layout(end, 32, int(freeze), 2, 2, 16, 8)
            routed = torch.stack(decisions[layout.first: whole], dim=-1) if whole > layout.first else None
            expected = apply_plan(stored[layer][0][:, :, :end], stored[layer][1][:, :, :end],
                                  routed if routed is not None else torch.zeros(1, 2, 0, dtype=torch.long),
                                  export.experts, layout, layer)
            assert torch.equal(keys, expected[0]) and torch.equal(values, expected[1]), (start, end, layer)
    for layer in cache.layers:                                   # every unit stored exactly once
        assert layer.expert_map.shape == (4, 2) and int(layer.unit_counts().sum()) == 8
        assert layer.residual[0].shape[-2] == 130 - 128 and layer.get_seq_length() == 130
        assert (layer.chunk_experts()[0, :, 0] == 3).all() == freeze          # storage 3 = FROZEN
    assert cache.storage_experts[-1] == FROZEN


@pytest.mark.parametrize("bits, per", [(16, "channel"), (2, "channel"), (4, "token"), (3, "token")])
def test_packed_parts_grow_in_blocks_and_never_copy_what_they_hold(bits, per):
    """A prefill of 64 units, then 30 small appends as decode makes them: every block keeps its address,
    the blocks read back what one part packed from all the units at once, and the room reserved beyond
    the stored units is at most the last block's (1/GROWTH of the units) and, in each earlier block, less
    than the append that did not fit."""
    generator = torch.Generator().manual_seed(0)
    sizes = [64] + [1, 3, 2, 4, 1] * 6
    batches = [torch.randn(n, 32, 16, generator=generator) * 3 for n in sizes]
    part, addresses = PackedPart(bits, per, 8), {}
    for units in batches:
        part.append(units)
        addresses.setdefault(len(part.blocks) - 1, [t.data_ptr() for t in part.blocks[-1]])
    assert all([t.data_ptr() for t in block] == addresses[i] for i, block in enumerate(part.blocks))
    assert 1 < len(part.blocks) < len(sizes), "appends should share blocks"
    whole = PackedPart(bits, per, 8)
    whole.append(torch.cat(batches))
    (_, expected), = whole.segments()
    read = torch.cat([part.read(tensors, (tensors[0].shape[0],), 32, 16, torch.float32) for _, tensors in part.segments()])
    assert torch.equal(read, whole.read(expected, (sum(sizes),), 32, 16, torch.float32))
    reserved = sum(t.numel() * t.element_size() for block in part.blocks for t in block)
    unit_bytes = part.nbytes() / sum(sizes)
    bound = part.nbytes() * (1 + 1 / PackedPart.GROWTH) + (len(part.blocks) - 1) * (max(sizes[1:]) - 1) * unit_bytes
    assert part.nbytes() == whole.nbytes() and reserved <= bound


def test_a_router_that_keeps_16_bits_generates_the_tokens_of_dynamic_cache(tiny_llama):
    """Zero weights tie every expert, and a tie goes to fp16: in a binary16 model every value is stored
    exactly, so tokens and scores equal DynamicCache's; attending on the packed units (in float32, then
    rounded to binary16), the tokens too and the scores within binary16's rounding."""
    model = load_model(tiny_llama, "cpu", None, "float16")
    layers, heads, head_dim, _ = model_shape(model.config)
    export = random_export(layers, heads, head_dim, scale=0.0)
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(2))

    def run(cache):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=60,
                                  do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)

    served, dynamic = run(MoQAECache.from_export(export, model, packed_attention=False)), run(DynamicCache())
    assert torch.equal(served.sequences, dynamic.sequences)
    assert all(torch.equal(a, b) for a, b in zip(served.scores, dynamic.scores))
    packed = run(MoQAECache.from_export(export, model))
    assert torch.equal(packed.sequences, dynamic.sequences)
    assert max(((a - b).norm() / b.norm()).item() for a, b in zip(packed.scores, dynamic.scores)) < 1e-2


def test_bytes_held_match_the_storage_formula(passkey_model):
    export = random_export(4, 2, 64, "fp16,int4,int2", scale=0.5)
    cache = MoQAECache.from_export(export, passkey_model)
    with torch.no_grad():
        passkey_model.generate(text_ids(300), past_key_values=cache, max_new_tokens=45, do_sample=False, pad_token_id=0)
    units = sum(int(layer.unit_counts().sum()) for layer in cache.layers)
    assert units == 4 * 2 * (345 // 32)
    assert cache.nbytes() == cache.formula_bytes() + units              # plus one byte per unit: the expert map
    assert abs(cache.nbytes() / cache.formula_bytes() - 1) < 0.01
    # A uniform int4 cache by hand: per unit 32·64·4/8 bytes of codes for keys and for values, a binary16 scale
    # and minimum per key channel (64) and per value group of 32 channels per token (2·32); 16 bits for the tail.
    uniform = MoQAECache.from_layer_plan([parse_expert("int4")] * 4, passkey_model.config, 32, False, 32)
    for layer in range(4):
        uniform.update(torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64), layer)
    per_unit = 2 * 32 * 64 * 4 // 8 + 64 * 4 + 2 * 32 * 4
    assert uniform.nbytes() == 4 * (3 * 2 * (per_unit + 1) + 2 * 2 * 4 * 64 * 2)
    assert uniform.fp16_bytes() == 4 * 2 * 2 * 100 * 64 * 2


def test_mismatched_and_damaged_exports_are_refused_with_one_line(tmp_path, passkey_model, tiny_llama):
    with pytest.raises(MoqaeError, match=r"export is for 3 layers × 2 KV heads × 16 dims \(key\), the model has 4 × 2 × 64"):
        MoQAECache.from_export(random_export(3, 2, 16), passkey_model)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The pass key is 12345. " * 4)
    router = tmp_path / "router.bin"
    write_export(str(router), random_export(3, 2, 16, scale=2.0))
    good = run_moqae("generate", "--model", tiny_llama, "--router", str(router), "--prompt-file", str(prompt),
                     "--tokenizer", "bytes", "--max-new-tokens", "40")
    assert good.returncode == 0, good.stderr
    assert "layer 2 head 1: " in good.stdout and "KV cache: " in good.stdout and "bytes held" in good.stdout
    data = bytearray(router.read_bytes())
    data[40] ^= 1
    router.write_bytes(bytes(data))
    bad = run_moqae("generate", "--model", tiny_llama, "--router", str(router), "--prompt-file", str(prompt),
                    "--tokenizer", "bytes")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [f"error: {router}: CRC-32 mismatch: the file is damaged"]
    other = tmp_path / "other.bin"
    write_export(str(other), random_export(4, 2, 64))
    wrong = run_moqae("generate", "--model", tiny_llama, "--router", str(other), "--prompt-file", str(prompt),
                      "--tokenizer", "bytes")
    assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1 and "export is for 4 layers" in wrong.stderr


def test_a_fifo_prompt_corpus_or_task_is_refused_without_blocking(tmp_path, tiny_llama):
    fifo = tmp_path / "input.txt"
    os.mkfifo(fifo)
    router = tmp_path / "router.bin"
    write_export(str(router), random_export(3, 2, 16))
    commands = [["generate", "--model", tiny_llama, "--router", str(router), "--prompt-file", str(fifo), "--tokenizer", "bytes"],
                ["dump", "--model", tiny_llama, "--corpus", str(fifo), "--out", str(tmp_path / "store"), "--tokenizer", "bytes"]]
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "moqae", *command], capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")))
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode == 1 and errors == [f"error: {fifo}: is a FIFO, expected a regular file"], result.stderr


def test_a_transformers_outside_the_tested_range_gets_one_warning():
    from moqae.serve.cache import SUPPORTED_TRANSFORMERS, warn_if_untested
    assert SUPPORTED_TRANSFORMERS[0] == TARGET_TRANSFORMERS
    with pytest.warns(UserWarning, match="tested on transformers 5.23.0 to 5.25.0, not 9.0.0"):
        warn_if_untested("9.0.0")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_untested("9.0.0")            # once only
        warn_if_untested("5.24.0")


def test_the_pinned_transformers_is_the_version_the_cache_targets():
    """MoQAECache follows transformers' per-layer cache API of one version; requirements.txt pins it."""
    assert transformers.__version__ == TARGET_TRANSFORMERS
    with open(os.path.join(ROOT, "python", "requirements.txt")) as f:
        assert f"transformers=={TARGET_TRANSFORMERS}\n" in f.read()

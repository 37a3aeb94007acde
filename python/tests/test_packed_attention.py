"""Decode attention on packed units (serve/attention.py, kernels/packed_attention.cpp) against the cache's
dequantize-then-SDPA path and a float64 brute force."""
import pytest
import torch

from moqae.experts import parse_expert
from moqae.model import load_model
from moqae.router import random_export
from moqae.capture import IMPLEMENTATION, KVHook
from moqae.serve.attention import packed_decode
from moqae.serve.cache import MoQAECache
from moqae.serve.kernels import packed_attention


def decode_logits(model, cache, prompt, steps):
    """Logits (steps + 1, B, V) of the prompt's last token and of `steps` greedy tokens after it."""
    with torch.no_grad():
        out = model(prompt, past_key_values=cache)
        logits = [out.logits[:, -1]]
        for _ in range(steps):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache)
            logits.append(out.logits[:, -1])
    return torch.stack(logits)


def relative(a, b):
    return ((a - b).norm() / a.norm()).item()


PLANS = [["fp16", "int8", "int4"], ["int2", "k4v2", "k2v4"], ["int3", "int5", "k3v6"], ["int7", "int1", "int6"]]


@pytest.mark.parametrize("plan", PLANS)
def test_every_expert_decodes_the_logits_of_dequantize_then_sdpa(tiny_llama, plan):
    """100 prompt tokens and 40 decoded: chunks 3 and 4 fill during decode; GQA (4 query heads, 2 KV heads)."""
    model = load_model(tiny_llama, "cpu", None, "float32")
    experts = [parse_expert(name) for name in plan]
    prompt = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    reference = decode_logits(model, MoQAECache.from_layer_plan(experts, model.config), prompt, 40)
    packed = MoQAECache.from_layer_plan(experts, model.config, model=model, packed_attention=True)
    logits = decode_logits(model, packed, prompt, 40)
    assert relative(reference, logits) <= 1e-5
    assert torch.equal(reference.argmax(-1), logits.argmax(-1))
    assert packed.layers[0].expert_map.shape[0] == 140 // 32   # the packed path stored the chunks it filled


@pytest.mark.parametrize("fixture, batch", [("tiny_llama", 2), ("tiny_mqa_llama", 1), ("tiny_mqa_llama", 2)])
def test_mixed_units_of_a_router_decode_as_dequantize_then_sdpa(request, fixture, batch):
    model_dir = request.getfixturevalue(fixture)
    model = load_model(model_dir, "cpu", None, "float32")
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    export = random_export(layers, heads, 16, experts="fp16,int4,int2,k4v2", seed=3, scale=2.0)
    prompt = torch.randint(0, 256, (batch, 90), generator=torch.Generator().manual_seed(1))
    reference = decode_logits(model, MoQAECache.from_export(export, model, model_dir=model_dir, packed_attention=False), prompt, 30)
    packed = MoQAECache.from_export(export, model, model_dir=model_dir, packed_attention=True)
    logits = decode_logits(model, packed, prompt, 30)
    assert len(packed.layers[0].expert_map.unique()) >= 3, "the routers should mix experts inside a layer"
    assert relative(reference, logits) <= 1e-5
    assert torch.equal(reference.argmax(-1), logits.argmax(-1))


def test_chunks_filled_into_a_blocks_room_decode_as_dequantize_then_sdpa(tiny_llama):
    """A 700-token prompt, then 100 decoded: the chunks that fill during decode go into the room of blocks
    (cache.PackedPart) that the kernel reads as parts of their own."""
    model = load_model(tiny_llama, "cpu", None, "float32")
    export = random_export(3, 2, 16, experts="fp16,int4,int2", seed=4, scale=2.0)
    prompt = torch.randint(0, 256, (1, 700), generator=torch.Generator().manual_seed(6))
    reference = decode_logits(model, MoQAECache.from_export(export, model, model_dir=tiny_llama, packed_attention=False), prompt, 100)
    packed = MoQAECache.from_export(export, model, model_dir=tiny_llama, packed_attention=True)
    logits = decode_logits(model, packed, prompt, 100)
    parts = [part for pair in packed.layers[0].parts for part in pair if part.count]
    assert any(len(part.blocks) < 1 + (800 // 32 - 700 // 32) and part.filled[-1] > part.filled[0] // 8 for part in parts), \
        "decode's chunks should share a block"
    assert relative(reference, logits) <= 1e-5
    assert torch.equal(reference.argmax(-1), logits.argmax(-1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_kernel_equals_a_float64_attention_over_the_dequantized_units(tiny_llama, dtype):
    """One layer's step, brute force: softmax(q Kᵀ · scaling) V in float64 over the units as `read` dequantizes them;
    in a bfloat16 model the 16-bit units, chunk 0 and the residual are bfloat16."""
    model = load_model(tiny_llama, "cpu", None, dtype)
    export = random_export(3, 2, 16, experts="fp16,int4,int2,int3", seed=5, scale=2.0)
    cache = MoQAECache.from_export(export, model, model_dir=tiny_llama, packed_attention=False)
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 77), generator=torch.Generator().manual_seed(2)), past_key_values=cache)
    layer = cache.layers[1]
    assert layer.residual[0].dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float16)
    assert layer.parts[-1][0].count == 4 and layer.residual[0].shape[-2] == 13   # chunk 0 of 2 rows × 2 heads at 16 bits
    layer.dtype = torch.float32               # dequantized in float32, as the kernel does (a bfloat16 read rounds)
    keys, values = (x.double() for x in layer.read())                     # (B, H, T, D)
    query = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(3))
    scaling = 16 ** -0.5
    expanded = [x.repeat_interleave(2, dim=1) for x in (keys, values)]     # query head g reads KV head g // 2
    weights = torch.softmax(query.double() @ expanded[0].transpose(-1, -2) * scaling, dim=-1)
    expected = (weights @ expanded[1]).transpose(1, 2)                     # (B, 1, Hq, D)
    for portable in (False, True):
        result = packed_decode(layer, query, scaling, portable=portable)
        assert result.shape == expected.shape and relative(expected, result.double()) <= 1e-6
    assert packed_attention(portable=True).vector_path() == "portable"


def test_a_mask_that_hides_a_position_goes_to_sdpa(tiny_llama):
    """Left padding in a batch: the decode mask hides the padded positions, so the step is not packed."""
    model = load_model(tiny_llama, "cpu", None, "float32")
    experts = [parse_expert("int4")] * 3
    prompt = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :5] = 0

    def generate(cache):
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=mask, past_key_values=cache, max_new_tokens=8, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        return torch.stack(out.logits)

    reference = generate(MoQAECache.from_layer_plan(experts, model.config))
    packed = generate(MoQAECache.from_layer_plan(experts, model.config, model=model, packed_attention=True))
    assert relative(reference, packed) <= 1e-6


def test_a_model_of_another_attention_gets_moqaes_and_hooks_see_the_dequantized_cache(tiny_llama):
    """A model loaded with SDPA is given moqae's attention implementation; while a KVHook records, a packed
    step hands its layer over dequantized, so the hook sees what `read` gives."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").float()
    cache = MoQAECache.from_layer_plan([parse_expert("int4")] * 3, model.config, model=model)
    assert model.config._attn_implementation == IMPLEMENTATION
    with torch.no_grad():
        out = model(torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(5)), past_key_values=cache)
        hook = KVHook(record=True)
        with hook.active():
            model(out.logits[:, -1:].argmax(-1), past_key_values=cache)
    assert torch.equal(hook.keys[0], cache.layers[0].read()[0]) and hook.keys[0].shape[-2] == 71
    assert packed_attention().vector_path() in ("avx2", "portable")


def test_pass_key_answers_are_the_tokens_of_dequantized_attention(tmp_path):
    """Greedy pass-key answers through the packed kernel and through dequantize-then-SDPA, by plan."""
    from conftest import PASSKEY_MODEL, ROOT
    from moqae.router import write_export
    from moqae.serve.passkey import serve_passkey
    router = tmp_path / "router.bin"
    write_export(str(router), random_export(4, 2, 64, "fp16,int4,int2", scale=0.5, seed=9))
    text = f"{ROOT}/models/wikitext-2/test.txt"
    runs = [serve_passkey(PASSKEY_MODEL, str(router), text, windows=4, packed_attention=packed) for packed in (True, False)]
    assert [s["answers"] for s in runs[0]] == [s["answers"] for s in runs[1]]
    assert sum(s["correct"] for s in runs[0]) > 0

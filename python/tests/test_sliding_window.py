"""MoQAECache on models whose layers attend through a sliding window (Mistral: every layer; Gemma 2: every other
one, with soft-capping; Gemma 3: two of three here), at 4× the window: a sliding layer holds only the chunks its next
query sees, drops the others and never requantizes, and its logits equal the model's own eager attention over the
whole sequence with the same plan, where a sliding layer's chunks that its cache no longer holds stay in 16 bits."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from test_families import family_configs
from moqae import MoqaeError
from moqae.capture import EAGER_IMPLEMENTATION, KVHook, attention_implementation
from moqae.calibrate.sensitivity import mean_nll
from moqae.evaluate.plans import Layout, LayerPlan, apply_plan
from moqae.evaluate.scoring import evaluate_plan
from moqae.experts import parse_expert
from moqae.model import first_held_chunks, model_shape, sliding_window_layers
from moqae.quantizer import at_sixteen_bits
from moqae.router import random_export
from moqae.serve.cache import MoQAECache

CHUNK = 32
WINDOWS = {"mistral": 80, "gemma2": 64, "gemma3": 64}   # 80: a window that is not whole chunks
PLAN = ("int4", "k4v2", "int2")                         # layer l at PLAN[l % 3]


def sliding_model(family, dtype=torch.float32):
    config = family_configs()[family][0]
    config.sliding_window, config.max_position_embeddings = WINDOWS[family], 1024
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention_implementation(config), dtype=dtype)
    return model.eval().requires_grad_(False)


def first_seen_chunk(position, window):
    return max(0, position - window + 1) // CHUNK


def plan_experts(model):
    return [parse_expert(PLAN[layer % len(PLAN)]) for layer in range(model.config.num_hidden_layers)]


def reference_logits(model, ids, prompt_length):
    """Logits of the prompt ids[:, :prompt_length], then of each later token decoded one at a time, through the
    model's own eager attention on a cache of every token in full precision (DynamicCache; the mask applies the
    windows), each attention reading K, V fake-quantized by the layer plan as `eval` does: whole chunks at the
    layer's expert, chunk 0 and the tail in 16 bits. Tokens after the prompt's last whole chunk are quantized from
    16 bits, as the cache's residual held them, except a decoded token that completes its chunk (it never waits). In the prompt's forward, a sliding layer's chunks that the next
    query no longer sees stay in 16 bits (its cache never stores them); later, what a query does not see is masked."""
    layers, heads, head_dim, _ = model_shape(model.config)
    experts, windows = plan_experts(model), sliding_window_layers(model.config)
    plan, tail, prefill = LayerPlan(experts, list(range(layers))), prompt_length // CHUNK * CHUNK, [True]

    def transform(layer, key, value):
        layout = Layout(key.shape[-2], CHUNK, 1, layers, heads, head_dim, head_dim)
        positions = torch.arange(key.shape[-2])
        waited = (positions >= tail) & ~((positions >= prompt_length) & (positions % CHUNK == CHUNK - 1))
        key, value = (torch.where(waited[:, None], at_sixteen_bits(x), x) for x in (key, value))
        out_k, out_v = apply_plan(key, value, plan.decide(layer, key, value, [0], layout), experts, layout, layer)
        if layer in windows and prefill[0]:
            cut = first_seen_chunk(prompt_length, windows[layer]) * CHUNK
            out_k[:, :, :cut], out_v[:, :, :cut] = at_sixteen_bits(key[:, :, :cut]), at_sixteen_bits(value[:, :, :cut])
        return out_k, out_v

    eager = copy.deepcopy(model)
    eager.set_attn_implementation(EAGER_IMPLEMENTATION)
    cache = DynamicCache()
    with torch.no_grad(), KVHook(transform=transform).active():
        logits = [eager(ids[:, :prompt_length], past_key_values=cache, use_cache=True).logits]
        prefill[0] = False
        for position in range(prompt_length, ids.shape[1]):
            logits.append(eager(ids[:, position: position + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    return logits


@pytest.mark.parametrize("family", list(WINDOWS))
def test_prefill_and_decode_at_four_windows_equal_eager_attention_with_the_same_plan(family):
    model = sliding_model(family)
    model.set_attn_implementation(EAGER_IMPLEMENTATION)    # the reference's attention arithmetic, to the last bit
    window, windows = WINDOWS[family], sliding_window_layers(model.config)
    assert windows and len(windows) < model.config.num_hidden_layers or family == "mistral"
    T = 4 * window
    ids = torch.randint(3, 256, (1, T + 40), generator=torch.Generator().manual_seed(1))
    cache = MoQAECache.from_layer_plan(plan_experts(model), model.config, CHUNK, True, model=model)
    expected = reference_logits(model, ids, T)
    with torch.no_grad():
        prefill = model(ids[:, :T], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(prefill, expected[0], rtol=1e-5, atol=1e-6)
    for layer, held in enumerate(cache.layers):
        if layer in windows:   # it holds the chunks from the first one the next query sees, each stored once
            assert held.dropped == first_seen_chunk(T, window) and held.expert_map.shape[0] == T // CHUNK - held.dropped
        else:
            assert held.dropped == 0 and held.expert_map.shape[0] == T // CHUNK
    for position in range(T, T + 40):   # decode crosses chunk boundaries and drops chunks as the window moves on
        with torch.no_grad():
            step = model(ids[:, position: position + 1], past_key_values=cache, use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, expected[position - T + 1], rtol=1e-5, atol=1e-6)
    for layer in windows:
        held = cache.layers[layer]
        assert held.dropped >= first_seen_chunk(T + 39, window) and held.tokens_held() < window + CHUNK
    assert cache.nbytes() == cache.formula_bytes() + sum(layer.expert_map.numel() for layer in cache.layers)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_a_16_bit_router_generates_dynamic_caches_tokens_on_sliding_layers(family):
    """In a binary16 model every value is stored exactly: the tokens of DynamicCache's sliding layers (and its scores
    within float16's sums), from a prompt of 3 windows through 40 decoded tokens; in a padded batch of two prompts,
    each row's tokens of its prompt alone."""
    model = sliding_model(family, torch.float16)
    export = random_export(*model_shape(model.config)[:3], scale=0.0)
    window = WINDOWS[family]
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 256, (1, length), generator=generator) for length in (3 * window, 3 * window - 45)]

    def run(ids, mask, cache):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=40, do_sample=False,
                                  output_scores=True, return_dict_in_generate=True, pad_token_id=0)

    for ids in prompts:
        mask = torch.ones_like(ids)
        served = run(ids, mask, MoQAECache.from_export(export, model, packed_attention=False))
        packed = run(ids, mask, MoQAECache.from_export(export, model))   # the kernel where the mask hides nothing
        dynamic = run(ids, mask, DynamicCache(config=model.config))
        assert torch.equal(served.sequences, dynamic.sequences) and torch.equal(packed.sequences, dynamic.sequences)
        # the cache holds whole chunks, DynamicCache the window's last tokens: SDPA sums over the masked ones too
        assert max(((a - b).norm() / b.norm()).item() for a, b in zip(served.scores, dynamic.scores)) < 1e-2
    ids = torch.zeros(2, prompts[0].shape[1], dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, ids.shape[1] - prompt.shape[1]:], mask[row, ids.shape[1] - prompt.shape[1]:] = prompt[0], 1
    batch = run(ids, mask, MoQAECache.from_export(export, model, attention_mask=mask)).sequences[:, ids.shape[1]:]
    for row, prompt in enumerate(prompts):
        alone = run(prompt, torch.ones_like(prompt), MoQAECache.from_export(export, model)).sequences[0, prompt.shape[1]:]
        assert torch.equal(batch[row, : alone.numel()], alone) and not batch[row, alone.numel():].any(), row   # 0: padding after EOS


@pytest.mark.parametrize("family", list(WINDOWS))
def test_eval_at_four_windows_scores_eager_attention_with_the_same_plan(family):
    """`eval`'s forward on windows of 4 W: each window's loss is the model's own eager attention's with the layer plan,
    where a sliding layer's chunks that its cache does not hold at the window's end stay in 16 bits (the reference's
    cut, written from the serving rule), and only the held chunks are counted."""
    model = sliding_model(family)
    layers, heads, head_dim, _ = model_shape(model.config)
    window, windows = WINDOWS[family], sliding_window_layers(model.config)
    T = 4 * window
    ids = torch.randint(3, 256, (2, T), generator=torch.Generator().manual_seed(4))
    held = first_held_chunks(model.config, T, CHUNK)
    assert held == [first_seen_chunk(T, window) if layer in windows else 0 for layer in range(layers)] and any(held)
    layout = Layout(T, CHUNK, 1, layers, heads, head_dim, head_dim, held)
    result = evaluate_plan(model, ids, LayerPlan(plan_experts(model), list(range(layers))), layout, 2, "tiny", progress=False)
    expected = torch.stack([mean_nll(reference_logits(model, ids[row: row + 1], T)[0], ids[row: row + 1])[0] for row in range(2)])
    torch.testing.assert_close(torch.tensor(result.window_nll, dtype=torch.float64), expected.double(), rtol=1e-5, atol=1e-6)
    for layer in range(layers):
        assert result.counts[layer].sum() == 2 * heads * (T // CHUNK - max(1, held[layer])), layer
    # what the caches hold: a sliding layer from its first held chunk, a global layer all but chunk 0 routed
    held_elements = sum(2 * heads * (T - first * CHUNK) * head_dim for first in held)
    routed_bits = sum(2 * heads * (T // CHUNK - max(1, held[layer])) * CHUNK * head_dim
                      * (plan_experts(model)[layer].key_bits + plan_experts(model)[layer].value_bits) / 2 for layer in range(layers))
    sixteen = held_elements - sum(2 * heads * (T // CHUNK - max(1, first)) * CHUNK * head_dim for first in held)
    assert result.summary()["payload_bits"] == pytest.approx((routed_bits + 16 * sixteen) / held_elements, rel=1e-12)


def test_a_sliding_layer_cannot_crop_back_past_what_it_dropped():
    model = sliding_model("mistral")
    cache = MoQAECache.from_layer_plan(plan_experts(model), model.config, CHUNK, True, model=model)
    ids = torch.randint(3, 256, (1, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.dropped == first_seen_chunk(300, 80)
    cache.crop(-10)                                   # inside what it holds
    assert layer.get_seq_length() == 290
    with pytest.raises(MoqaeError, match=r"sliding window has dropped the tokens before 192, so it cannot go back to 100"):
        cache.crop(-190)


def test_the_sliding_memory_table_measures_both_choices(capsys):
    """`moqae.harness.sliding_memory` at 1,100 tokens (one window and a bit): the routed sliding layers hold fewer
    bytes than the same plan with the sliding layers at fp16, and every MoQAECache row is what its cache holds."""
    from moqae.harness import sliding_memory
    sliding_memory.main([1100], experts=("int2",))
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[1] for row in rows] == ["DynamicCache (float32)", "MoQAECache int2, sliding layers int2",
                                        "MoQAECache int2, sliding layers fp16"]
    routed, kept = (int(row[2].replace(",", "")) for row in rows[1:])
    assert routed < kept and rows[2][4].startswith(f"{kept / routed:.2f}×")

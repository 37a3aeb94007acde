"""MoQAECache under what `generate()` asks of a cache beyond one prompt decoded greedily: rows that move in beam
search (reorder_cache, batch_select_indices, batch_repeat_interleave), tokens dropped from the end (crop, which
assisted and prompt-lookup decoding use) and a prompt prefilled in pieces (prefill_chunk_size), against the states
the cache was given, against one prefill, and against DynamicCache at 16 bits."""
import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from moqae import MoqaeError
from moqae.capture import RouterInputs
from moqae.model import load_model, model_shape
from moqae.router import random_export
from moqae.serve.cache import MoQAECache, RouterPolicy

LAYERS, HEADS, HEAD_DIM, CHUNK, GROUP = 2, 2, 16, 32, 8


def routed_cache(freeze=True):
    """A cache of random routers over fp16, int4 and int2 for a 2-layer model of 2 KV heads of 16 channels."""
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=HEADS, head_dim=HEAD_DIM)
    export = random_export(LAYERS, HEADS, HEAD_DIM, "fp16,int4,int2", group=2, freeze=freeze, scale=2.0)
    return MoQAECache(RouterPolicy(export, RouterInputs("key", None, "model", CHUNK, GROUP)), config, CHUNK, freeze, GROUP)


def random_states(batch, tokens, seed):
    """Per layer, keys and values (batch, H, tokens, D)."""
    generator = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(batch, HEADS, tokens, HEAD_DIM, generator=generator) * 3 for _ in range(2))
            for _ in range(LAYERS)]


def feed(cache, states, start, end):
    """Updates every layer with positions start..end−1 of `states`; returns what each layer attends to."""
    return [cache.update(k[:, :, start:end], v[:, :, start:end], layer) for layer, (k, v) in enumerate(states)]


def test_selected_rows_carry_their_units_and_decode_as_a_cache_of_those_rows_alone():
    """A batch of 3 prefilled with 100 tokens (3 chunks and 4 residual tokens), rows [2, 0, 2] selected: each
    layer reads exactly the selected rows of what it read, and decoding on to 140 tokens (a chunk fills after
    the selection) gives the states, units and bytes of a cache fed those rows from the start."""
    states, rows = random_states(3, 140, seed=1), torch.tensor([2, 0, 2])
    cache, alone = routed_cache(), routed_cache()
    before = feed(cache, states, 0, 100)
    experts_before = [layer.chunk_experts() for layer in cache.layers]
    cache.reorder_cache(rows)
    selected = [(k[rows], v[rows]) for k, v in states]
    for layer, (keys, values) in zip(cache.layers, before):
        read = layer.read()
        assert torch.equal(read[0], keys[rows]) and torch.equal(read[1], values[rows])
        assert torch.equal(layer.chunk_experts(), experts_before[layer.layer][rows])
    feed(alone, selected, 0, 100)
    for t in range(100, 140):
        got, expected = feed(cache, selected, t, t + 1), feed(alone, selected, t, t + 1)
        for (k, v), (k_alone, v_alone) in zip(got, expected):
            assert torch.equal(k, k_alone) and torch.equal(v, v_alone), t
    assert cache.nbytes() == alone.nbytes() and cache.formula_bytes() == alone.formula_bytes()
    for layer, other in zip(cache.layers, alone.layers):
        assert torch.equal(layer.unit_counts(), other.unit_counts())


def test_repeat_interleave_and_select_indices_are_row_selections():
    states = random_states(2, 70, seed=2)
    cache = routed_cache()
    before = feed(cache, states, 0, 70)
    cache.batch_repeat_interleave(2)                      # rows 0, 0, 1, 1
    cache.batch_select_indices(torch.tensor([3, 0]))      # rows 1, 0
    for layer, (keys, values) in zip(cache.layers, before):
        assert torch.equal(layer.read()[0], keys[[1, 0]]) and torch.equal(layer.read()[1], values[[1, 0]])


@pytest.mark.parametrize("freeze", [True, False])
def test_crop_drops_tokens_and_returns_a_cut_chunks_kept_tokens_to_the_residual(freeze):
    """100 tokens, then crops of 2 (residual only), 30 (chunk 2 cut: its 4 kept tokens come back from its
    units) and 68 (down to nothing); after each, the layer reads what it read before, to the new length, with the
    cut chunk's tokens rounded to binary16; and it fills again, routing the cut chunk anew."""
    states = random_states(1, 130, seed=3)
    cache = routed_cache(freeze)
    full = feed(cache, states, 0, 100)
    for removed, length in ((2, 98), (30, 68), (68, 0)):
        cache.crop(-removed)
        for layer, (keys, values) in zip(cache.layers, full):
            read, whole = layer.read(), length // CHUNK * CHUNK
            assert layer.get_seq_length() == length and read[0].shape[-2] == length
            for got, was in zip(read, (keys, values)):
                assert torch.equal(got[:, :, :whole], was[:, :, :whole])
                assert torch.equal(got[:, :, whole:], was[:, :, whole:length].half().float())
            assert layer.expert_map.shape[0] == length // CHUNK
            assert int(layer.unit_counts().sum()) == HEADS * (length // CHUNK)
    assert cache.nbytes() == 0 or cache.nbytes() == cache.formula_bytes()
    refilled, fresh = feed(cache, states, 0, 130), feed(routed_cache(freeze), states, 0, 130)
    for (k, v), (k_fresh, v_fresh) in zip(refilled, fresh):
        assert torch.equal(k, k_fresh) and torch.equal(v, v_fresh)


def test_crop_refuses_a_positive_count_and_more_tokens_than_held():
    cache = routed_cache()
    feed(cache, random_states(1, 40, seed=4), 0, 40)
    with pytest.raises(MoqaeError, match="negative number"):
        cache.crop(10)
    with pytest.raises(MoqaeError, match="holds only 40 tokens"):
        cache.crop(-41)


def generated(model, ids, cache, **settings):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, do_sample=False,
                              pad_token_id=0, **settings)


@pytest.mark.parametrize("packed_attention", [False, True])
def test_beam_search_with_a_16_bit_router_finds_dynamic_caches_beams(tiny_llama, packed_attention):
    """In a binary16 model a router that keeps 16 bits stores every value exactly: 4 beams over 30 tokens give
    DynamicCache's sequences (packed attention: float32 sums, rounded to binary16) and, without packed attention,
    its scores too."""
    model = load_model(tiny_llama, "cpu", None, "float16")
    export = random_export(*model_shape(model.config)[:3], scale=0.0)
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(5))
    settings = dict(num_beams=4, num_return_sequences=4, max_new_tokens=30, output_scores=True,
                    return_dict_in_generate=True)
    served = generated(model, ids, MoQAECache.from_export(export, model, packed_attention=packed_attention), **settings)
    dynamic = generated(model, ids, DynamicCache(), **settings)
    assert torch.equal(served.sequences, dynamic.sequences)
    if not packed_attention:
        assert torch.equal(served.sequences_scores, dynamic.sequences_scores)


@pytest.mark.parametrize("settings", [{"prompt_lookup_num_tokens": 4}, {"assistant": True}])
def test_rolled_back_decoding_with_a_16_bit_router_gives_greedy_tokens(tiny_llama, settings):
    """Prompt-lookup and assisted decoding propose several tokens a step and crop those the model rejects: with a
    router that keeps 16 bits, the tokens of plain greedy decoding with DynamicCache."""
    model = load_model(tiny_llama, "cpu", None, "float16")
    export = random_export(*model_shape(model.config)[:3], scale=0.0)
    ids = torch.randint(0, 8, (1, 60), generator=torch.Generator().manual_seed(6))   # few symbols: lookups hit
    if settings.pop("assistant", False):           # the same model, perturbed, so that it is sometimes wrong
        assistant, generator = load_model(tiny_llama, "cpu", None, "float16"), torch.Generator().manual_seed(7)
        with torch.no_grad():
            for parameter in assistant.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator).half() * 0.5 * parameter.std())
        settings["assistant_model"] = assistant
    cache = MoQAECache.from_export(export, model, packed_attention=False)
    crops = []
    crop = cache.crop
    cache.crop = lambda tokens: (crops.append(tokens), crop(tokens))
    served = generated(model, ids, cache, max_new_tokens=50, **settings)
    assert torch.equal(served, generated(model, ids, DynamicCache(), max_new_tokens=50))
    assert any(tokens < 0 for tokens in crops), "no proposal was rejected: the test would not see crop"
    assert cache.layers[0].get_seq_length() == served.shape[1] - 1


def test_a_prompt_prefilled_in_pieces_of_whole_chunks_is_stored_as_in_one_forward(tiny_llama):
    """Pieces of 64 tokens (two chunks): every chunk is stored before a query attends to it, as in one forward,
    so the cache holds the same units at the same experts and generates the same tokens; pieces of 50 cut chunks
    (a piece's last queries see their chunk's first tokens at 16 bits) and still store every chunk once."""
    model = load_model(tiny_llama, "cpu", None, "float32")
    export = random_export(*model_shape(model.config)[:3], scale=2.0)
    ids = torch.randint(0, 256, (1, 230), generator=torch.Generator().manual_seed(8))
    caches = {piece: MoQAECache.from_export(export, model) for piece in (None, 64, 50)}
    tokens = {piece: generated(model, ids, cache, max_new_tokens=20, prefill_chunk_size=piece)
              for piece, cache in caches.items()}
    assert torch.equal(tokens[64], tokens[None])
    for whole, pieces in zip(caches[None].layers, caches[64].layers):
        assert torch.equal(whole.expert_map, pieces.expert_map)
        for a, b in zip(whole.read(), pieces.read()):   # a piece's float sums may round a value to the next binary16
            assert torch.allclose(a, b, rtol=2**-10, atol=1e-6)
    for layer in caches[50].layers:
        assert layer.expert_map.shape[0] == 249 // 32 and layer.get_seq_length() == 249
    units = sum(int(layer.unit_counts().sum()) for layer in caches[50].layers)
    assert caches[50].nbytes() == caches[50].formula_bytes() + units        # plus the expert map's byte per unit


def test_a_batch_of_prompts_of_different_lengths_serves_each_row_as_that_prompt_alone(tiny_llama):
    """4 prompts of 100, 77, 64 and 33 tokens padded on the left, with the batch's attention mask: each row
    stores its own chunks from its first real token (padding is never stored, routed or counted), so each gives
    the tokens, experts and bytes of its prompt served alone."""
    model = load_model(tiny_llama, "cpu", None, "float32")
    export = random_export(*model_shape(model.config)[:3], scale=2.0)
    generator = torch.Generator().manual_seed(9)
    prompts = [torch.randint(1, 256, (1, length), generator=generator) for length in (100, 77, 64, 33)]
    ids = torch.zeros(4, 100, dtype=torch.long)
    mask = torch.zeros(4, 100, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 100 - prompt.shape[1]:], mask[row, 100 - prompt.shape[1]:] = prompt[0], 1
    cache = MoQAECache.from_export(export, model, attention_mask=mask)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=30, do_sample=False,
                               pad_token_id=0)[:, 100:]
    alone_bytes = 0
    for row, prompt in enumerate(prompts):
        alone = MoQAECache.from_export(export, model)
        assert torch.equal(batch[row], generated(model, prompt, alone, max_new_tokens=30)[0, prompt.shape[1]:]), row
        for layer, other in zip(cache.layers, alone.layers):
            assert torch.equal(layer.rows[row].chunk_experts(), other.chunk_experts())
        alone_bytes += alone.nbytes()
    assert cache.nbytes() == alone_bytes
    assert cache.fp16_bytes() == 2 * 2 * 3 * 2 * 64 // 4 * sum(p.shape[1] + 29 for p in prompts)


def test_a_mask_padded_on_the_right_or_a_row_of_padding_is_refused():
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    from moqae.experts import parse_expert
    for mask in (torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.tensor([[0, 0, 0], [1, 1, 1]])):
        with pytest.raises(MoqaeError, match="padding on the left"):
            MoQAECache.from_layer_plan([parse_expert("int4")] * 2, config, attention_mask=mask)

"""Bytes a cache holds for a model whose layers mostly attend through a sliding window: a tiny random Gemma 3 of
Gemma 3's pattern (6 layers, 5 sliding with a window of 1,024 tokens, 1 global; 2 KV heads of 64, float32), after
a random prompt of T tokens prefilled in pieces of 1,024. MoQAECache quantizes a sliding layer's chunks like a
global layer's and drops those that leave its window; the alternative keeps the sliding layers at 16 bits.

    PYTHONPATH=python python/.venv/bin/python -m moqae.harness.sliding_memory [CONTEXT ...]
"""
import sys

import torch
from transformers import DynamicCache

from ..experts import parse_expert
from ..model import sliding_window_layers
from ..serve.cache import MoQAECache
from .serve_benchmark import cache_bytes

WINDOW, PIECE = 1024, 1024


def tiny_random_gemma3(max_positions):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=WINDOW,
                              layer_types=["sliding_attention"] * 5 + ["full_attention"],
                              max_position_embeddings=max_positions)
    return Gemma3ForCausalLM(config).eval()


def plans(model, experts):
    """Cache name → a factory: `experts` on every layer, and `experts` on the global layers with fp16 on the sliding."""
    sliding, layers = sliding_window_layers(model.config), model.config.num_hidden_layers
    every = [parse_expert(experts)] * layers
    kept = [parse_expert("fp16") if layer in sliding else parse_expert(experts) for layer in range(layers)]
    return {f"MoQAECache {experts}, sliding layers {experts}": lambda: MoQAECache.from_layer_plan(every, model.config, model=model),
            f"MoQAECache {experts}, sliding layers fp16": lambda: MoQAECache.from_layer_plan(kept, model.config, model=model)}


def prefill(model, ids, cache):
    """The prompt's forward in pieces of PIECE tokens, the cache filling as it goes."""
    with torch.no_grad():
        for start in range(0, ids.shape[1], PIECE):
            model(ids[:, start: start + PIECE], past_key_values=cache, use_cache=True)
    return cache


def main(contexts, experts=("int4", "int2")):
    print("| T | cache | bytes held | bits per value held | bytes / those of every layer at the same expert |")
    print("|---|---|---|---|---|")
    model = tiny_random_gemma3(max(contexts))
    for context in contexts:
        ids = torch.randint(0, 256, (1, context), generator=torch.Generator().manual_seed(context))
        dynamic = prefill(model, ids, DynamicCache(config=model.config))
        print(f"| {context:,} | DynamicCache (float32) | {cache_bytes(dynamic):,} | 32.00 | - |", flush=True)
        for name in experts:
            caches = {label: prefill(model, ids, factory()) for label, factory in plans(model, name).items()}
            base = next(iter(caches.values())).nbytes()
            for label, cache in caches.items():
                values = cache.fp16_bytes() / 2
                print(f"| {context:,} | {label} | {cache.nbytes():,} | {8 * cache.nbytes() / values:.2f} | "
                      f"{cache.nbytes() / base:.2f}× |", flush=True)


if __name__ == "__main__":
    main([int(c) for c in sys.argv[1:]] or [8192, 32768])

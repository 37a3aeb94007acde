"""Peak resident memory of a long prompt's prefill, with DynamicCache, MoQAECache in one forward, and MoQAECache
prefilled in pieces (transformers' `prefill_chunk_size`: the model's forward over slices of the prompt, the cache
filling as it goes). Each measurement runs in a process of its own, on the tiny random Llama of the serving
benchmark (8 layers, 4 KV heads of 64, float32) with a random router, and generates one token after the prompt.

    PYTHONPATH=python python/.venv/bin/python -m moqae.harness.prefill_memory [CONTEXT ...]

Peak: the largest resident set sampled every millisecond during `generate`, less the resident set before it
(the model and the prompt).
"""
import json
import subprocess
import sys

import torch
from transformers import DynamicCache

from ..model import model_shape
from ..router import random_export
from ..serve.cache import MoQAECache
from .serve_benchmark import PeakMemory, release_freed_memory, resident_bytes, tiny_random_llama

PIECE = 1024
KINDS = ("DynamicCache", "MoQAECache, one forward", f"MoQAECache, pieces of {PIECE}")


def measure(context, kind):
    """Peak growth and bytes the cache holds after a prefill of `context` random tokens with cache `kind`."""
    model = tiny_random_llama(context + 1)
    ids = torch.randint(0, 256, (1, context), generator=torch.Generator().manual_seed(context))
    export = random_export(*model_shape(model.config)[:3])
    cache = DynamicCache() if kind == "DynamicCache" else MoQAECache.from_export(export, model)
    pieces = {"prefill_chunk_size": PIECE} if kind.endswith(f"pieces of {PIECE}") else {}
    release_freed_memory()
    before = resident_bytes()
    with torch.no_grad(), PeakMemory() as memory:
        model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=1,
                       do_sample=False, pad_token_id=0, **pieces)
    held = cache.nbytes() if isinstance(cache, MoQAECache) else sum(
        layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return {"peak": memory.peak - before, "held": held}


def main(contexts):
    print("| T | cache | peak RSS growth during prefill | bytes held after | peak / DynamicCache's |")
    print("|---|---|---|---|---|")
    for context in contexts:
        results = {}
        for kind in KINDS:
            run = subprocess.run([sys.executable, "-m", "moqae.harness.prefill_memory", "--one", str(context), kind],
                                 capture_output=True, text=True, check=True)
            results[kind] = json.loads(run.stdout.strip().splitlines()[-1])
        for kind in KINDS:
            r = results[kind]
            print(f"| {context:,} | {kind} | {r['peak'] / 2**20:.0f} MiB | {r['held'] / 2**20:.1f} MiB | "
                  f"{r['peak'] / results['DynamicCache']['peak']:.2f}× |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(measure(int(sys.argv[2]), sys.argv[3])))
    else:
        main([int(c) for c in sys.argv[1:]] or [8192, 32768])

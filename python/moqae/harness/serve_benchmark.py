"""`serve-benchmark`: prefill time, decode tokens/s and cache bytes of MoQAECache (decode attention on the
packed units; the router also with today's dequantize-then-SDPA attention) against DynamicCache and
transformers' QuantizedCache (quanto backend, int4), on CPU, for the pass-key model and a tiny random Llama
(which alone also runs the longest contexts).

Each round measures every cache once, side by side, on the same prompt; ratios are taken within a round
(this machine's speed drifts) and the report gives their median over the rounds.
"""
import ctypes
import os
import statistics
import sys
import threading
import time

import torch
from transformers import DynamicCache

from ..experts import parse_expert
from ..model import check_model_dir, load_model, model_shape
from ..router import random_export, read_export
from ..serve.cache import MoQAECache
from ..serve.kernels import packed_attention
from .report import write_section


def tiny_random_llama(max_positions):
    """A random Llama of 8 layers (hidden 512, 8 query heads, 4 KV heads of 64), float32."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, max_position_embeddings=max_positions)
    return LlamaForCausalLM(config).eval()


def quantized_cache_factory(config):
    """transformers' QuantizedCache with the quanto backend at int4 (its defaults otherwise: groups of 64,
    a residual of 128 tokens at the model's dtype), or None and the reason when quanto cannot run here."""
    from transformers import QuantizedCache
    try:
        _, heads, head_dim, _ = model_shape(config)
        states = torch.zeros(1, heads, 4, head_dim)
        QuantizedCache("quanto", config, nbits=4).update(states, states, 0)
    except Exception as error:  # noqa: BLE001 - ImportError, or a failed build of quanto's C++ extension
        return None, f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return (lambda: QuantizedCache("quanto", config, nbits=4)), None


def cache_bytes(cache):
    """Bytes a cache holds: MoQAECache.nbytes, QuantizedCache's packed data, scales, shifts and residual,
    DynamicCache's tensors."""
    if isinstance(cache, MoQAECache):
        return cache.nbytes()

    def tensor_bytes(t):
        if t is None:
            return 0
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(tensor_bytes(getattr(t, name)) for name in names)
        return t.numel() * t.element_size()

    total = 0
    for layer in cache.layers:
        total += tensor_bytes(layer.keys) + tensor_bytes(layer.values)
        total += tensor_bytes(getattr(layer, "_quantized_keys", None)) + tensor_bytes(getattr(layer, "_quantized_values", None))
    return total


def resident_bytes():
    """This process's resident set size, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Samples the resident set every millisecond in a thread while active; `peak` is the largest seen."""

    def __enter__(self):
        self.peak, self.running = resident_bytes(), True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def release_freed_memory():
    """Hands memory that glibc holds after frees back to the system (malloc_trim), so that a resident set
    measured next counts what is live."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(model, ids, cache, decode_tokens):
    """Prefill seconds, routing seconds within them, decode tokens/s (greedy, one token per forward), bytes
    held, and the resident set's growth during decode over what it was without a cache: the model and the
    cache's bytes after prefill, with freed memory released first."""
    release_freed_memory()
    without_cache = resident_bytes()
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        prefill = time.perf_counter() - start
        routing = cache.routing_seconds if isinstance(cache, MoQAECache) else 0.0
        token = logits.argmax(-1, keepdim=True)
        del logits
        release_freed_memory()
        with PeakMemory() as memory:
            start = time.perf_counter()
            for _ in range(decode_tokens):
                token = model(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            decode = decode_tokens / (time.perf_counter() - start)
    return {"prefill_s": prefill, "routing_s": routing, "decode_tok_s": decode, "bytes": cache_bytes(cache),
            "formula_bytes": cache.formula_bytes() if isinstance(cache, MoQAECache) else None,
            "decode_peak_bytes": memory.peak - without_cache}


def serve_benchmark(model_dir: str, router: str | None = None, *, contexts: list[int] = (2048, 8192),
                    tiny_contexts: list[int] = (32768,), decode_tokens: int = 160, rounds: int = 2,
                    out: str | None = None) -> list[dict]:
    """Measures every cache on each model and context (the tiny Llama also at `tiny_contexts`); writes the
    "Serving" section of `out`."""
    check_model_dir(model_dir)
    passkey = load_model(model_dir, "cpu", None, "float32")
    passkey_export = read_export(router) if router else random_export(*model_shape(passkey.config)[:3])
    tiny = tiny_random_llama(max([*contexts, *tiny_contexts]))
    models = [(f"{model_dir.rstrip('/').split('/')[-1]} ({'router ' + router if router else 'random router'})",
               passkey, passkey_export, list(contexts)),
              ("tiny random Llama (8 layers, 4 KV heads of 64; random router)", tiny,
               random_export(*model_shape(tiny.config)[:3]), [*contexts, *tiny_contexts])]
    rows, notes = [], []
    for label, model, export, model_contexts in models:
        quantized, reason = quantized_cache_factory(model.config)
        if quantized is None:
            notes.append(f"QuantizedCache (quanto) cannot run here ({reason})")
        layers = model_shape(model.config)[0]

        def uniform(name):
            return lambda: MoQAECache.from_layer_plan([parse_expert(name)] * layers, model.config, export.chunk_size,
                                                      export.freeze_first_chunk, model=model)

        caches = {"DynamicCache": DynamicCache}
        if quantized is not None:
            caches["QuantizedCache quanto int4"] = quantized
        caches.update({"MoQAECache uniform int4": uniform("int4"), "MoQAECache uniform int2": uniform("int2"),
                       "MoQAECache router": lambda: MoQAECache.from_export(export, model),
                       "MoQAECache router, dequantized attention": lambda: MoQAECache.from_export(export, model, packed_attention=False)})
        for factory in caches.values():   # warm-up, not recorded: builds quanto's and the packed kernel's extensions
            measure(model, torch.zeros(1, 2 * export.chunk_size + 1, dtype=torch.long), factory(), 2)
        for context in model_contexts:
            ids = torch.randint(0, 256, (1, context), generator=torch.Generator().manual_seed(context))
            measured = {name: [] for name in caches}
            for round_index in range(rounds):
                for name, factory in caches.items():
                    measured[name].append(measure(model, ids, factory(), decode_tokens))
                    m = measured[name][-1]
                    print(f"{label}, T = {context}, round {round_index + 1}: {name}: prefill {m['prefill_s']:.3f} s, "
                          f"decode {m['decode_tok_s']:.1f} tok/s, {m['bytes']:,} bytes", file=sys.stderr, flush=True)

            def ratio(runs, reference):
                if reference not in measured:
                    return None
                return statistics.median(r["decode_tok_s"] / q["decode_tok_s"] for r, q in zip(runs, measured[reference]))

            for name in caches:
                runs = measured[name]
                rows.append({
                    "model": label, "context": context, "cache": name,
                    "prefill_s": statistics.median(r["prefill_s"] for r in runs),
                    "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                    "vs_dynamic": ratio(runs, "DynamicCache"), "vs_quanto": ratio(runs, "QuantizedCache quanto int4"),
                    "routing_share": statistics.median(r["routing_s"] / r["prefill_s"] for r in runs),
                    "bytes": runs[-1]["bytes"], "formula_bytes": runs[-1]["formula_bytes"],
                    "peak_vs_held": statistics.median(r["decode_peak_bytes"] / r["bytes"] for r in runs),
                    "bits_per_value": 8 * runs[-1]["bytes"] / (2 * layers * model_shape(model.config)[1]
                                                               * model_shape(model.config)[2] * (context + decode_tokens))})
    report = format_report(rows, notes, decode_tokens, rounds)
    print(report)
    if out:
        write_section(out, "Performance", "Serving: MoQAECache against DynamicCache and QuantizedCache", report)
        print(f"wrote {out}")
    return rows


def format_report(rows, notes, decode_tokens, rounds):
    lines = [f"Written by `python -m moqae serve-benchmark {' '.join(sys.argv[2:])}` (`make serve-benchmark`), "
             f"{time.strftime('%Y-%m-%d')}.", "",
             f"CPU, float32 models, batch 1, a random prompt of T tokens, then {decode_tokens} greedy decode steps "
             f"(one forward per token). MoQAECache decodes with its packed-attention kernel ({packed_attention().vector_path()} "
             f"path here) unless the row says otherwise. Medians over {rounds} rounds; every ratio is taken within a round. Bits per "
             "value: bytes held after decoding × 8 / (2 · layers · KV heads · head dim · tokens). DynamicCache holds "
             "float32; QuantizedCache keeps its scales, shifts and 128-token residual in the model's dtype (float32 "
             "here, so half of that in a 16-bit model). QuantizedCache's prefill attends to unquantized K/V, and it "
             "requantizes its whole cache each time its residual fills; MoQAECache's prefill attends to the quantized "
             "chunks, and never requantizes. Decode peak: the largest resident set sampled every millisecond during "
             "decode, less the resident set before prefill (the model; freed memory handed back with malloc_trim "
             "before each), over the bytes the cache holds at the end: 1.00× would be the cache and nothing else.", ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    lines += ["| model | T | cache | prefill s | routing / prefill | decode tok/s | vs DynamicCache | vs quanto int4 | "
              "bytes held | bits/value | bytes / formula | decode peak RSS − model, / bytes held |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def times(value):
        return "-" if value is None else f"{value:.2f}×"

    for r in rows:
        formula = f"{r['bytes'] / r['formula_bytes']:.4f}" if r["formula_bytes"] else "-"
        routing = f"{100 * r['routing_share']:.2f}%" if r["cache"].startswith("MoQAECache router") else "-"
        lines.append(f"| {r['model']} | {r['context']:,} | {r['cache']} | {r['prefill_s']:.3f} | {routing} | "
                     f"{r['decode_tok_s']:.1f} | {times(r['vs_dynamic'])} | {times(r['vs_quanto'])} | {r['bytes']:,} | "
                     f"{r['bits_per_value']:.2f} | {formula} | {r['peak_vs_held']:.2f}× |")
    return "\n".join(lines) + "\n"

"""Generating with a `MoQAECache`: the `generate` command (a prompt, a router, the text and what the cache
held), and `serve-passkey`: greedy pass-key answers by plan, each with its own cache."""
import time
from dataclasses import dataclass

import torch
from transformers import AutoConfig

from . import CalibError
from .cache import FROZEN, MoQAECache
from .capture import check_export_fits
from .corpus import ByteTokenizer, HFTokenizer, read_texts
from .dump import check_model_dir, load_model, model_shape, resolve_device
from .experts import parse_expert
from .files import read_text_file
from .passkey import passkey_windows, wilson_interval
from .router import read_export


def greedy(model, cache, ids, new_tokens):
    """Greedy continuation of ids (1, T) by `new_tokens` tokens with `cache`: (new_tokens,) int64."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:]


def glyph(expert):
    """One character per storage expert: * a frozen chunk, F fp16, the digit of intB, kXvY as 'X/Y' → its key bits."""
    if expert == FROZEN:
        return "*"
    if expert.is_unquantized:
        return "F"
    return str(expert.key_bits) if expert.key_bits == expert.value_bits else "abcdefgh"[expert.key_bits - 1]


def format_chunk_experts(cache):
    """Per layer and KV head of batch row 0, one character per stored chunk, with the legend."""
    legend = ", ".join(f"{glyph(e)} {e.name}" + (f" (key {e.key_bits}, value {e.value_bits} bits)"
                                                   if e.key_bits != e.value_bits else "") for e in cache.storage_experts)
    lines = [f"experts per chunk of {cache.chunk_size} tokens ({legend}); the last {cache.layers[0].residual[0].shape[-2]} "
             "token(s) wait at 16 bits for their chunk to fill:"]
    for index, layer in enumerate(cache.layers):
        for head, row in enumerate(layer.chunk_experts()[0]):
            lines.append(f"  layer {index} head {head}: " + "".join(glyph(cache.storage_experts[e]) for e in row.tolist()))
    return "\n".join(lines)


def format_bytes(cache):
    held, fp16 = cache.nbytes(), cache.fp16_bytes()
    values = fp16 // 2
    return (f"KV cache: {held:,} bytes held, {100 * held / fp16:.1f}% of {fp16:,} at 16 bits ({fp16 - held:,} saved; "
            f"{8 * held / values:.3f} bits per value with scales, minima and the expert map)")


def run_generate(model_dir, router, prompt_file, max_new_tokens=64, tokenizer="auto", device="auto",
                 model_dtype="auto", value_group=None):
    """The generate command: prints the continuation of the prompt, the experts per chunk and the bytes held."""
    export = read_export(router)
    check_model_dir(model_dir)
    try:
        check_export_fits(export, AutoConfig.from_pretrained(model_dir, local_files_only=True))
    except CalibError as error:
        raise CalibError(f"{router}: {error}") from None
    prompt = read_text_file(prompt_file, "the prompt")
    if max_new_tokens < 1:
        raise CalibError(f"--max-new-tokens {max_new_tokens}: expected at least 1")
    encoder = ByteTokenizer() if tokenizer == "bytes" else HFTokenizer(model_dir)
    ids = encoder.encode(prompt)
    if not ids:
        raise CalibError(f"{prompt_file}: the prompt is empty")
    model = load_model(model_dir, resolve_device(device), None, model_dtype)
    cache = MoQAECache.from_export(export, model, value_group, model_dir)
    start = time.perf_counter()
    tokens = greedy(model, cache, torch.tensor([ids], device=model.device), max_new_tokens)
    seconds = time.perf_counter() - start
    print(prompt + encoder.decode(tokens.tolist()))
    print(f"\n{len(ids)} prompt and {len(tokens)} generated tokens in {seconds:.2f} s "
          f"(routing {1000 * cache.routing_seconds:.1f} ms)")
    print(format_chunk_experts(cache))
    print(format_bytes(cache))
    return cache


@dataclass
class PasskeyPlan:
    name: str
    make_cache: object       # () → MoQAECache


def passkey_plans(model, export, value_group, layer_plans, uniform=("fp16", "int4", "int2")):
    """The router, uniform experts (frozen chunk 0 as the router's) and per-layer plans, each as a cache factory."""
    layers = model_shape(model.config)[0]
    plans = [PasskeyPlan("router", lambda: MoQAECache.from_export(export, model, value_group))]

    def layer_plan(name, experts):
        return PasskeyPlan(name, lambda: MoQAECache.from_layer_plan(
            experts, model.config, export.chunk_size, export.freeze_first_chunk, value_group))

    plans += [layer_plan(f"uniform {name}", [parse_expert(name)] * layers) for name in uniform]
    for text in layer_plans:
        experts = [parse_expert(name) for name in text.split(",")]
        if len(experts) != layers:
            raise CalibError(f"--layer-plan {text}: {len(experts)} experts for {layers} layers")
        plans.append(layer_plan(f"layer plan ({', '.join(e.name for e in experts)})", experts))
    return plans


def run_serve_passkey(model_dir, router, text, windows=50, seq_len=2048, seed=0, layer_plans=(), value_group=None,
                      device="auto"):
    """Greedy generation of the pass key after each window's question, by plan: accuracy (Wilson 95%) and
    the bytes each cache held at the end, against 16 bits. Returns one summary dict per plan."""
    export = read_export(router)
    check_model_dir(model_dir)
    task = passkey_windows(read_texts([text])[0], ByteTokenizer(), seq_len, windows, seed)
    model = load_model(model_dir, resolve_device(device), None, "float32")
    summaries = []
    print(f"{text}: {windows} pass-key windows of {seq_len} bytes (seed {seed}); prompt up to the answer, "
          f"{task.answer_positions.shape[1]} tokens generated greedily; {router}")
    print(f"{'plan':<40} {'accuracy (95% CI)':>24} {'KV bytes / 16-bit':>18} {'bits/value':>10} {'routing time':>13}")
    for plan in passkey_plans(model, export, value_group, layer_plans):
        correct, held, fp16, routing, elapsed = 0, 0, 0, 0.0, 0.0
        for row in range(windows):
            first = int(task.answer_positions[row, 0])
            cache = plan.make_cache()
            start = time.perf_counter()
            answer = greedy(model, cache, task.ids[row: row + 1, :first].to(model.device), task.answer_positions.shape[1])
            elapsed += time.perf_counter() - start
            correct += bool((answer.cpu() == task.ids[row, task.answer_positions[row]]).all())
            held, fp16, routing = held + cache.nbytes(), fp16 + cache.fp16_bytes(), routing + cache.routing_seconds
        low, high = wilson_interval(correct, windows)
        summary = {"name": plan.name, "correct": correct, "windows": windows, "accuracy": correct / windows,
                   "wilson95": [low, high], "bytes_fraction_of_fp16": held / fp16, "bits_per_value": 16 * held / fp16,
                   "routing_fraction": routing / elapsed}
        summaries.append(summary)
        print(f"{plan.name:<40} {100 * summary['accuracy']:7.1f}% ({100 * low:4.1f}–{100 * high:5.1f}%) "
              f"{100 * summary['bytes_fraction_of_fp16']:17.1f}% {summary['bits_per_value']:10.3f} "
              f"{100 * summary['routing_fraction']:12.2f}%", flush=True)
    return summaries

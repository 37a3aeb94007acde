"""`generate`: a prompt's greedy continuation through a `MoQAECache`, the experts of its chunks and the
bytes the cache held."""
import time

import torch
from transformers import AutoConfig

from .. import MoqaeError
from ..corpus import tokenizer_for
from ..files import read_text_file
from ..model import check_export_fits, check_model_dir, load_model, resolve_device
from ..router import read_export
from .cache import FROZEN, MoQAECache, router_in


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


def generate(model_dir: str, router: str | None, prompt_file: str, *, max_new_tokens: int = 64, tokenizer: str = "auto",
             device: str = "auto", model_dtype: str = "auto", value_group: int | None = None) -> MoQAECache:
    """Prints the continuation of the prompt, the experts per chunk and the bytes held; returns the cache. Without
    `router`, the export the model directory carries (`router_in`)."""
    router = router or router_in(model_dir)
    export = read_export(router)
    check_model_dir(model_dir)
    try:
        check_export_fits(export, AutoConfig.from_pretrained(model_dir, local_files_only=True))
    except MoqaeError as error:
        raise MoqaeError(f"{router}: {error}") from None
    prompt = read_text_file(prompt_file, "the prompt")
    if max_new_tokens < 1:
        raise MoqaeError(f"--max-new-tokens {max_new_tokens}: expected at least 1")
    encoder = tokenizer_for(tokenizer, model_dir)
    ids = encoder.encode(prompt)
    if not ids:
        raise MoqaeError(f"{prompt_file}: the prompt is empty")
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

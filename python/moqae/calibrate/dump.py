"""`dump`: a local Hugging Face causal LM plus a text corpus → a calibration store."""
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from .. import MoqaeError
from ..capture import RouterInputs
from ..corpus import read_texts, tokenizer_for, windows
from ..experts import parse_experts
from ..model import check_model_dir, first_held_chunks, load_model, model_shape, resolve_device, window_length
from ..selection import selected, unit_value
from ..tasks import passkey_windows
from .distributed import Torchrun
from .background import Background, background_delta
from .sensitivity import exact_delta, weighted_taylor_delta
from .writer import StoreWriter


def with_needles(corpus, haystack, tokenizer, fraction, seed, answer_weight=1.0):
    """The corpus windows (N, T) with those whose u(index, seed) < fraction replaced by pass-key windows
    of the same length, built from the corpus text with that seed; the token weights (N, T − 1) of
    the loss the sensitivities measure: 1, and `answer_weight` for the answer tokens of pass-key windows
    (weight i is that of predicting token i + 1); and, per pass-key window, its answer slots (the weight
    indices of its answer tokens)."""
    needles = passkey_windows(haystack, tokenizer, corpus.shape[1], corpus.shape[0], seed)
    chosen = torch.tensor([unit_value(i, seed) < fraction for i in range(corpus.shape[0])])
    weights = torch.ones(corpus.shape[0], corpus.shape[1] - 1, dtype=torch.float64)
    answer_slots = {row: needles.answer_positions[row] - 1 for row in chosen.nonzero().flatten().tolist()}
    for row, slots in answer_slots.items():
        weights[row, slots] = answer_weight
    return torch.where(chosen[:, None], needles.ids, corpus), weights, answer_slots


def dump(model: str, corpus: list[str], out: str, *, tokenizer: str = "auto", seq_len: int | None = None,
         fraction: float = 0.10, seed: int = 0, passkey: float = 0.0, passkey_seed: int = 1, answer_weight: float = 1.0,
         chunk_size: int = 32, value_group: int | None = None, experts: str = "fp16,int4,int2",
         sensitivity: str = "taylor", background: str | None = None, exact_answers: bool = False, router_input: str = "key", inputs_dtype: str = "float16", shard_size: int = 1 << 30,
         resume: bool = False, device: str = "auto", device_map: str | None = None, model_dtype: str = "auto",
         num_shards: int = 1, shard_index: int = 0) -> tuple[int, float]:
    """Dumps the store `out`, or this process's part of it (`num_shards`, `shard_index`); under torchrun each rank
    dumps its part and rank 0 joins them into `out` (distributed.py). With `background` (an expert, or one per
    layer) the sensitivities are Taylor around that plan, and with `exact_answers` the answer tokens' part is
    exact (background.py). Returns (sequences in the store or part, seconds per sequence dumped)."""
    from transformers import AutoConfig
    check_model_dir(model)
    if os.path.exists(out) and not os.path.isdir(out):
        raise MoqaeError(f"{out}: exists and is not a directory (--out names a store directory to create)")
    expert_set = parse_experts(experts)
    config = AutoConfig.from_pretrained(model, local_files_only=True)
    layers, kv_heads, head_dim, _ = model_shape(config)
    seq_len = window_length(config, model, seq_len)
    value_group = value_group or head_dim
    if head_dim % value_group:
        raise MoqaeError(f"--value-group {value_group} must divide the head dimension {head_dim}")
    if seq_len // chunk_size < 2:
        raise MoqaeError(f"--seq-len {seq_len} holds fewer than two chunks of --chunk-size {chunk_size}")
    if not 0 < fraction <= 1:
        raise MoqaeError(f"--fraction must be in (0, 1], got {fraction}")
    if not 0 <= shard_index < num_shards:
        raise MoqaeError(f"--shard-index must be in 0..{num_shards - 1}, got {shard_index}")
    torchrun = Torchrun.from_environment()
    if torchrun:
        if num_shards != 1:
            raise MoqaeError("--num-shards/--shard-index split a dump by hand; under torchrun the ranks split it: pass neither")
        if os.path.isdir(out) and os.listdir(out):
            raise MoqaeError(f"{out}: exists and is not empty; torchrun dumps a new store")
        num_shards, shard_index = torchrun.world, torchrun.rank
        device = torchrun.device(device, device_map)

    if not 0 <= passkey <= 1:
        raise MoqaeError(f"--passkey must be in [0, 1], got {passkey}")
    if not (math.isfinite(answer_weight) and answer_weight > 0):
        raise MoqaeError(f"--answer-weight must be a positive number, got {answer_weight}")
    if answer_weight != 1 and not passkey:
        raise MoqaeError("--answer-weight weighs the answers of pass-key windows: it needs --passkey")
    if background is not None and sensitivity != "taylor":
        raise MoqaeError(f"--background is measured with the taylor sensitivity, not {sensitivity}")
    if exact_answers and not (background and passkey):
        raise MoqaeError("--exact-answers measures the answers of pass-key windows around a plan: it needs --passkey "
                         "and --background")
    held = first_held_chunks(config, seq_len, chunk_size)
    plan = Background(background, expert_set, layers, chunk_size, value_group, first_held=held) if background else None
    encoder = tokenizer_for(tokenizer, model)
    texts = read_texts(corpus)
    corpus_windows, weights, answer_slots = windows(texts, encoder, seq_len), None, {}
    if passkey:
        corpus_windows, weights, answer_slots = with_needles(corpus_windows, "".join(texts), encoder, passkey, passkey_seed,
                                               answer_weight)
    chosen = [i for i in range(corpus_windows.shape[0]) if selected(i, seed, fraction)]
    if not chosen:
        raise MoqaeError(f"--fraction {fraction} selects none of the corpus's {corpus_windows.shape[0]} windows")
    mine = chosen[shard_index:: num_shards]

    header = {
        "format": "moqae-calibration", "version": 3 if any(held) else 2 if plan else 1,
        "model": {"name": os.path.basename(os.path.normpath(model)), "num_layers": layers,
                  "num_kv_heads": kv_heads, "head_dim": head_dim},
        "router_input": router_input, "chunk_size": chunk_size, "value_group": value_group,
        "experts": [{"name": e.name, "key_bits": e.key_bits, "value_bits": e.value_bits} for e in expert_set],
        "sensitivity": "taylor+exact-answers" if exact_answers else sensitivity,
        **({"background": plan.manifest_field} if plan else {}),
        **({"first_held_chunks": held} if any(held) else {}), "selection": {"seed": seed, "fraction": fraction},
        "corpus": {"source": ", ".join(os.path.basename(p) for p in corpus), "tokenizer": encoder.name,
                   "seq_len": seq_len, "num_sequences": int(corpus_windows.shape[0]),
                   **({"passkey": {"fraction": passkey, "seed": passkey_seed, "answer_weight": answer_weight}}
                      if passkey else {})},
    }
    settings = dict(header, inputs_dtype=inputs_dtype, shard_size=shard_size,
                    part={"index": shard_index, "count": num_shards})
    if torchrun:
        torchrun.start()
    writer = StoreWriter(torchrun.part_directory(out) if torchrun else out, header, settings, shard_size, resume=resume)
    todo = [i for i in mine if i not in writer.done_ids]

    lm = load_model(model, resolve_device(device), device_map, model_dtype)
    router_inputs = RouterInputs(router_input, lm, model, chunk_size, value_group)
    width = router_inputs.width(head_dim)
    store_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[inputs_dtype]
    # A context manager, so that the bar is closed before an error is reported on its own line.
    with tqdm(total=len(mine), initial=len(mine) - len(todo), unit="seq", desc=f"dump {sensitivity}",
              dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10,
              disable=bool(torchrun and torchrun.rank)) as progress:
        started, exact_windows = time.perf_counter(), 0
        for seq_id in todo:
            ids = corpus_windows[seq_id].to(lm.device)
            token_weights = None if weights is None else weights[seq_id]
            if plan:
                slots = answer_slots.get(seq_id) if exact_answers else None
                nll, keys, values, delta, exact = background_delta(lm, ids, expert_set, chunk_size, value_group, model,
                                                                   plan, token_weights, slots)
                exact_windows += exact
                if exact_answers:
                    progress.set_postfix_str(f"answers measured exactly in {exact_windows} windows", refresh=False)
            elif sensitivity == "exact":
                nll, keys, values, delta = exact_delta(lm, ids, expert_set, chunk_size, value_group, model,
                                                       token_weights)
            else:
                nll, keys, values, delta = weighted_taylor_delta(lm, ids, expert_set, chunk_size, value_group, model,
                                                                 token_weights, rule=sensitivity)
            for layer, first in enumerate(held):   # a sliding layer's chunks that its cache no longer holds
                delta[layer, :, :first] = 0
            inputs = torch.stack([router_inputs(k, v, layer=layer).cpu()   # layers may sit on several GPUs (--device-map)
                                  for layer, (k, v) in enumerate(zip(keys, values))])
            if tuple(inputs.shape) != (layers, kv_heads, seq_len, width):
                raise MoqaeError(f"{model}: router inputs ({router_input}) of shape {tuple(inputs.shape)}, the config "
                                 f"implies {(layers, kv_heads, seq_len, width)}")
            writer.add(seq_id, inputs.to(store_dtype), nll, delta)
            progress.update(1)
    part = {"index": shard_index, "count": num_shards} if num_shards > 1 else None
    writer.finish(part=part)
    seconds = (time.perf_counter() - started) / max(1, len(todo))
    return (torchrun.join(out) if torchrun else len(mine)), seconds

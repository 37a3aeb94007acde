"""`dump`: a local Hugging Face causal LM plus a text corpus → a calibration store."""
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from . import CalibError
from .capture import IMPLEMENTATION, RouterInputs
from .corpus import ByteTokenizer, HFTokenizer, read_texts, windows
from .experts import parse_experts
from .passkey import passkey_windows
from .selection import selected, unit_value
from .sensitivity import exact_delta, weighted_taylor_delta
from .store import StoreWriter

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def model_shape(config):
    """(layers, kv heads, head dim, max positions) from a transformers config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, kv_heads, head_dim, getattr(config, "max_position_embeddings", None)


def check_model_dir(model_dir):
    if not os.path.isdir(model_dir):
        raise CalibError(f"{model_dir}: model directory not found")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CalibError(f"{model_dir}/config.json: missing (expected a Hugging Face model directory)")
    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in WEIGHT_FILES):
        raise CalibError(f"{model_dir}: no weights (expected one of {', '.join(WEIGHT_FILES)})")


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CalibError(f"--device {name}: CUDA is not available on this machine")
    return name


def load_model(model_dir, device, device_map, dtype_name):
    from transformers import AutoModelForCausalLM
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, attn_implementation=IMPLEMENTATION, dtype=dtype,
            **({"device_map": device_map} if device_map else {}))
    except (OSError, ValueError) as error:
        raise CalibError(f"{model_dir}: cannot load the model ({str(error).splitlines()[0]})") from None
    if not device_map:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def with_needles(corpus, haystack, tokenizer, fraction, seed, answer_weight=1.0):
    """The corpus windows (N, T) with those whose u(index, seed) < fraction replaced by pass-key windows
    of the same length, built from the corpus text with that seed; and the token weights (N, T − 1) of
    the loss the sensitivities measure: 1, and `answer_weight` for the answer tokens of pass-key windows
    (weight i is that of predicting token i + 1)."""
    needles = passkey_windows(haystack, tokenizer, corpus.shape[1], corpus.shape[0], seed)
    chosen = torch.tensor([unit_value(i, seed) < fraction for i in range(corpus.shape[0])])
    weights = torch.ones(corpus.shape[0], corpus.shape[1] - 1, dtype=torch.float64)
    for row in chosen.nonzero().flatten().tolist():
        weights[row, needles.answer_positions[row] - 1] = answer_weight
    return torch.where(chosen[:, None], needles.ids, corpus), weights


def dump(args):
    from transformers import AutoConfig
    check_model_dir(args.model)
    experts = parse_experts(args.experts)
    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    layers, kv_heads, head_dim, max_positions = model_shape(config)
    if max_positions is None and not args.seq_len:
        raise CalibError(f"{args.model}/config.json: no max_position_embeddings; pass --seq-len")
    seq_len = args.seq_len or min(max_positions, 4096)
    if max_positions is not None and seq_len > max_positions:
        raise CalibError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {max_positions}")
    value_group = args.value_group or head_dim
    if head_dim % value_group:
        raise CalibError(f"--value-group {value_group} must divide the head dimension {head_dim}")
    if seq_len // args.chunk_size < 2:
        raise CalibError(f"--seq-len {seq_len} holds fewer than two chunks of --chunk-size {args.chunk_size}")
    if not 0 < args.fraction <= 1:
        raise CalibError(f"--fraction must be in (0, 1], got {args.fraction}")
    if not 0 <= args.shard_index < args.num_shards:
        raise CalibError(f"--shard-index must be in 0..{args.num_shards - 1}, got {args.shard_index}")

    if not 0 <= args.passkey <= 1:
        raise CalibError(f"--passkey must be in [0, 1], got {args.passkey}")
    if not (math.isfinite(args.answer_weight) and args.answer_weight > 0):
        raise CalibError(f"--answer-weight must be a positive number, got {args.answer_weight}")
    if args.answer_weight != 1 and not args.passkey:
        raise CalibError("--answer-weight weighs the answers of pass-key windows: it needs --passkey")
    tokenizer = ByteTokenizer() if args.tokenizer == "bytes" else HFTokenizer(args.model)
    texts = read_texts(args.corpus)
    corpus, weights = windows(texts, tokenizer, seq_len), None
    if args.passkey:
        corpus, weights = with_needles(corpus, "".join(texts), tokenizer, args.passkey, args.passkey_seed,
                                       args.answer_weight)
    chosen = [i for i in range(corpus.shape[0]) if selected(i, args.seed, args.fraction)]
    if not chosen:
        raise CalibError(f"--fraction {args.fraction} selects none of the corpus's {corpus.shape[0]} windows")
    mine = chosen[args.shard_index:: args.num_shards]

    header = {
        "format": "moqae-calibration", "version": 1,
        "model": {"name": os.path.basename(os.path.normpath(args.model)), "num_layers": layers,
                  "num_kv_heads": kv_heads, "head_dim": head_dim},
        "router_input": args.router_input, "chunk_size": args.chunk_size, "value_group": value_group,
        "experts": [{"name": e.name, "key_bits": e.key_bits, "value_bits": e.value_bits} for e in experts],
        "sensitivity": args.sensitivity, "selection": {"seed": args.seed, "fraction": args.fraction},
        "corpus": {"source": ", ".join(os.path.basename(p) for p in args.corpus), "tokenizer": tokenizer.name,
                   "seq_len": seq_len, "num_sequences": int(corpus.shape[0]),
                   **({"passkey": {"fraction": args.passkey, "seed": args.passkey_seed, "answer_weight": args.answer_weight}}
                      if args.passkey else {})},
    }
    settings = dict(header, inputs_dtype=args.inputs_dtype, shard_size=args.shard_size,
                    part={"index": args.shard_index, "count": args.num_shards})
    writer = StoreWriter(args.out, header, settings, args.shard_size, resume=args.resume)
    todo = [i for i in mine if i not in writer.done_ids]

    device = resolve_device(args.device)
    model = load_model(args.model, device, args.device_map, args.model_dtype)
    router_inputs = RouterInputs(args.router_input, model, args.model, args.chunk_size, value_group)
    width = router_inputs.width(head_dim)
    store_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.inputs_dtype]
    # A context manager, so that the bar is closed before an error is reported on its own line.
    with tqdm(total=len(mine), initial=len(mine) - len(todo), unit="seq", desc=f"dump {args.sensitivity}",
              dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10) as progress:
        started = time.perf_counter()
        for seq_id in todo:
            ids = corpus[seq_id].to(model.device)
            token_weights = None if weights is None else weights[seq_id]
            if args.sensitivity == "exact":
                nll, keys, values, delta = exact_delta(model, ids, experts, args.chunk_size, value_group, args.model,
                                                       token_weights)
            else:
                nll, keys, values, delta = weighted_taylor_delta(model, ids, experts, args.chunk_size, value_group, args.model,
                                                                 token_weights, rule=args.sensitivity)
            inputs = torch.stack([router_inputs(k, v) for k, v in zip(keys, values)])
            if tuple(inputs.shape) != (layers, kv_heads, seq_len, width):
                raise CalibError(f"{args.model}: router inputs ({args.router_input}) of shape {tuple(inputs.shape)}, the config "
                                 f"implies {(layers, kv_heads, seq_len, width)}")
            writer.add(seq_id, inputs.to(store_dtype), nll, delta)
            progress.update(1)
    part = {"index": args.shard_index, "count": args.num_shards} if args.num_shards > 1 else None
    writer.finish(part=part)
    return len(mine), (time.perf_counter() - started) / max(1, len(todo))

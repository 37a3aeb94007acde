"""The causal LM: its shape from a transformers config, its directory checked, loaded locally (never
downloaded) with the `moqae` attention implementation (capture.py) on a device."""
import os

import torch

from . import MoqaeError
from .capture import attention_implementation, router_input_width

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def model_shape(config) -> tuple[int, int, int, int | None]:
    """(layers, kv heads, head dim, max positions) from a transformers config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, kv_heads, head_dim, getattr(config, "max_position_embeddings", None)


def sliding_window_layers(config) -> dict[int, int]:
    """Layer → the tokens its attention window holds, for the layers that attend through a sliding window
    (per `layer_types` where the config has them, as in Gemma and Qwen2; every layer for Mistral)."""
    config = config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return {}
    types = getattr(config, "layer_types", None)
    layers = range(config.num_hidden_layers) if types is None else [i for i, t in enumerate(types) if t == "sliding_attention"]
    return {layer: window for layer in layers}


def window_length(config, model_dir: str, seq_len: int | None = None) -> int:
    """Tokens per window: `seq_len`, or by default the model's max positions up to 4096 and its shortest
    sliding window. Refused past the max positions, and past a sliding window: such a layer's cache holds
    only the last `window` tokens, while chunk routing (training, accounting, evaluation) holds every
    chunk. Within its window a sliding layer attends like a global one, so there a chunk router means
    what it means on any layer, and every token is counted."""
    _, _, _, max_positions = model_shape(config)
    windows = sliding_window_layers(config)
    if seq_len is None:
        if max_positions is None:
            raise MoqaeError(f"{model_dir}/config.json: no max_position_embeddings; pass --seq-len")
        seq_len = min([max_positions, 4096, *windows.values()])
    if max_positions is not None and seq_len > max_positions:
        raise MoqaeError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {max_positions}")
    shorter = sorted(layer for layer, window in windows.items() if window < seq_len)
    if shorter:
        window = min(windows[layer] for layer in shorter)
        raise MoqaeError(f"--seq-len {seq_len}: layer(s) {shorter} of {model_dir} attend through a sliding window of "
                         f"{window} tokens and cache only those; chunk routing needs every token cached: use --seq-len "
                         f"{window} or less")
    return seq_len


def check_model_dir(model_dir: str) -> None:
    """Raises unless `model_dir` holds a config.json and weights."""
    if not os.path.isdir(model_dir):
        raise MoqaeError(f"{model_dir}: model directory not found")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise MoqaeError(f"{model_dir}/config.json: missing (expected a Hugging Face model directory)")
    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in WEIGHT_FILES):
        raise MoqaeError(f"{model_dir}: no weights (expected one of {', '.join(WEIGHT_FILES)})")


def resolve_device(name: str) -> str:
    """`auto` → cuda when available, else cpu; refuses cuda where there is none."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MoqaeError(f"--device {name}: CUDA is not available on this machine")
    return name


def load_model(model_dir: str, device: str, device_map: str | None, dtype_name: str):
    """The model in eval mode with frozen weights; `dtype_name` auto is float32 on CPU, bfloat16 on CUDA."""
    from transformers import AutoConfig, AutoModelForCausalLM
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, config=config, local_files_only=True, attn_implementation=attention_implementation(config), dtype=dtype,
            # straight onto the GPU: K torchrun ranks need not each hold a copy in host memory first
            device_map=device_map or ({"": device} if device.startswith("cuda") else None))
    except (OSError, ValueError) as error:
        raise MoqaeError(f"{model_dir}: cannot load the model ({str(error).splitlines()[0]})") from None
    if not device_map:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def check_export_fits(export, config) -> None:
    """Raises unless the export's routers are for the model's layers, KV heads and router input width."""
    layers, heads, head_dim, _ = model_shape(config)
    width = router_input_width(export.router_input, head_dim)
    if (export.num_layers, export.num_kv_heads, export.input_dim) != (layers, heads, width):
        raise MoqaeError(f"the router export is for {export.num_layers} layers × {export.num_kv_heads} KV heads × "
                         f"{export.input_dim} dims ({export.router_input}), the model has {layers} × {heads} × {width}")

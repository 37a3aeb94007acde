"""The causal LM: its shape from a transformers config, its directory checked, loaded locally (never
downloaded) with the `moqae` attention implementation (capture.py) on a device."""
import os

import torch

from . import MoqaeError
from .capture import attention_implementation
from .router_inputs import router_input_width

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


def first_held_chunk(tokens: int, window: int | None, chunk_size: int) -> int:
    """The first chunk a layer's cache holds after `tokens` tokens: the first one its next query (at position
    `tokens`, which sees positions tokens − window + 1 … tokens) sees; 0 without a sliding window."""
    return 0 if window is None else max(0, tokens - window + 1) // chunk_size


def first_held_chunks(config, tokens: int, chunk_size: int) -> list[int]:
    """Per layer, the first chunk its cache holds at the end of a window of `tokens` tokens (docs/FORMATS.md,
    Sliding-window layers): a sliding layer's older chunks are not part of its cache, so they are never
    routed, quantized or counted."""
    windows = sliding_window_layers(config)
    return [first_held_chunk(tokens, windows.get(layer), chunk_size)
            for layer in range(config.get_text_config(decoder=True).num_hidden_layers)]


def window_length(config, model_dir: str, seq_len: int | None = None) -> int:
    """Tokens per window: `seq_len`, or by default the model's max positions up to 4096. Refused past the max
    positions. A window may be longer than a sliding layer's window: that layer's cache then holds only its
    last chunks (`first_held_chunks`), and only those are routed and counted."""
    _, _, _, max_positions = model_shape(config)
    if seq_len is None:
        if max_positions is None:
            raise MoqaeError(f"{model_dir}/config.json: no max_position_embeddings; pass --seq-len")
        seq_len = min(max_positions, 4096)
    if max_positions is not None and seq_len > max_positions:
        raise MoqaeError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {max_positions}")
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

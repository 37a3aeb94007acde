"""The causal LM: its shape from a transformers config, its directory checked, loaded locally (never
downloaded) with the `moqae` attention implementation (capture.py) on a device."""
import os

import torch

from . import MoqaeError
from .capture import IMPLEMENTATION, router_input_width

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def model_shape(config) -> tuple[int, int, int, int | None]:
    """(layers, kv heads, head dim, max positions) from a transformers config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, kv_heads, head_dim, getattr(config, "max_position_embeddings", None)


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
    from transformers import AutoModelForCausalLM
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, attn_implementation=IMPLEMENTATION, dtype=dtype,
            **({"device_map": device_map} if device_map else {}))
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

"""Capturing and editing the KV cache through transformers' attention interface.

`moqae` is registered as an attention implementation: it sees each layer's post-RoPE key and value
states (before any grouped-query repetition: exactly what the KV cache holds), lets a `KVHook` record
or replace them, then runs transformers' own SDPA attention; a cache that attends itself (`DeferredKV`:
MoQAECache's decode on packed units) does so while no hook is active. `moqae-eager` does the same, then runs the
model's own eager attention, for models whose attention SDPA cannot compute (logit soft-capping,
Gemma 2). No model code is edited.
"""
import contextlib
import inspect
import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from . import MoqaeError
from .features import key_with_chunk_statistics
from .router_inputs import ROUTER_INPUTS, router_input_width

IMPLEMENTATION = "moqae"
EAGER_IMPLEMENTATION = "moqae-eager"
_active_hooks = []


class KVHook:
    """What to do with the KV states of each layer during the forward passes inside `active()`.

    `record`: keep every layer's (key, value), each (batch, kv_heads, T, head_dim), in `keys`/`values`.
    `transform(layer, key, value) -> (key, value)`: replace them (for example fake-quantize a unit).
    A sliding layer's K and V hold every token; the model's mask keeps each query within its window.
    """

    def __init__(self, record=False, transform=None):
        self.record = record
        self.transform = transform
        self.keys, self.values = {}, {}
        self.layers_seen = set()

    @contextlib.contextmanager
    def active(self):
        _active_hooks.append(self)
        try:
            yield self
        finally:
            _active_hooks.pop()


def attention_implementation(config) -> str:
    """The implementation to load a model with: `moqae-eager` where its attention soft-caps its logits."""
    return EAGER_IMPLEMENTATION if getattr(config.get_text_config(decoder=True), "attn_logit_softcapping", None) \
        else IMPLEMENTATION


def captured(module, key, value):
    """The active hook's view of one layer's K and V (B, H, T, D): recorded, or replaced by its transform."""
    if not _active_hooks:
        return key, value
    layer, hook = module.layer_idx, _active_hooks[-1]
    hook.layers_seen.add(layer)
    if hook.transform is not None:
        key, value = hook.transform(layer, key, value)
    if hook.record:
        hook.keys[layer], hook.values[layer] = key, value
    return key, value


class DeferredKV:
    """What a cache layer's `update` may return in place of its K and V tensors (as both): the cache attends
    itself (`attend`: the output (B, q, Hq, D), or None where it cannot), or hands over its K and V
    (`materialize`). MoQAECache's packed decode (serve/attention.py) is one. A hook's transform may return
    one too (as both key and value); its `attend` must then give the output."""

    def attend(self, module, query, attention_mask, scaling):
        raise NotImplementedError

    def materialize(self):
        raise NotImplementedError


def moqae_attention_forward(module, query, key, value, attention_mask, **kwargs):
    if isinstance(key, DeferredKV):
        attended = None if _active_hooks else key.attend(module, query, attention_mask, kwargs.get("scaling"))
        if attended is not None:
            return attended, None
        key, value = key.materialize()
    key, value = captured(module, key, value)
    if isinstance(key, DeferredKV):   # a hook's transform that attends itself (calibrate/background.py's RaisedChunks)
        return key.attend(module, query, attention_mask, kwargs.get("scaling")), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def moqae_eager_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """Capture, then the eager attention of the module's own modeling file (which soft-caps)."""
    if isinstance(key, DeferredKV):
        key, value = key.materialize()
    key, value = captured(module, key, value)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise MoqaeError(f"{type(module).__module__} has no eager_attention_forward, which a model that soft-caps its "
                         "attention logits needs (this model family is not supported)")
    return eager(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(IMPLEMENTATION, moqae_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
AttentionInterface.register(EAGER_IMPLEMENTATION, moqae_eager_attention_forward)
AttentionMaskInterface.register(EAGER_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def check_all_layers_seen(hook, num_layers, model_dir):
    """Raises when some layer's attention did not go through the interface."""
    missing = sorted(set(range(num_layers)) - hook.layers_seen)
    if missing:
        raise MoqaeError(
            f"{model_dir}: attention of layer(s) {missing} does not go through transformers' attention interface, "
            "so its KV cache cannot be captured (this model family is not supported)")


class RouterInputs:
    """What a router reads for each token of a layer, from the layer's post-RoPE key and value
    (B, H, T, D) as the attention interface sees them:
    - key: the key as the cache holds it, (B, H, T, D);
    - key-prerope: the key with RoPE undone by the model's own rotary embedding (the layer's, where
      layer types have their own RoPE, as in Gemma 3) at the tokens' positions;
    - key+value: key and value side by side, (B, H, T, 2D);
    - key+chunk: the key, then its chunk's statistics (`features.CHUNK_FEATURES`), (B, H, T, D + 7).
    """

    def __init__(self, kind, model, model_dir, chunk_size=None, value_group=None):
        if kind not in ROUTER_INPUTS:
            raise MoqaeError(f"router input {kind!r} is unknown (expected one of {', '.join(ROUTER_INPUTS)})")
        self.kind, self.rotary, self.chunk_size, self.value_group = kind, None, chunk_size, value_group
        self.layer_types = None   # per layer, the `layer_type` the rotary embedding takes, when it takes one
        if kind == "key-prerope":
            self.rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
            if self.rotary is None:
                raise MoqaeError(f"{model_dir}: router input key-prerope needs the model's rotary embedding "
                                 "(model.model.rotary_emb), which this model does not have")
            if "layer_type" in inspect.signature(self.rotary.forward).parameters:
                self.layer_types = model.config.get_text_config(decoder=True).layer_types

    def width(self, head_dim):
        return router_input_width(self.kind, head_dim)

    def __call__(self, key, value, start=0, layer=0):
        """The inputs of layer `layer`'s tokens at positions start, start + 1, … (key-prerope undoes RoPE at
        those positions; key+chunk needs `start` and T to be whole chunks)."""
        if self.kind == "key":
            return key
        if self.kind == "key+value":
            return torch.cat([key, value], dim=-1)
        if self.kind == "key+chunk":
            return key_with_chunk_statistics(key, value, self.chunk_size, self.value_group)
        return undo_rope(key, self.rotary, start, None if self.layer_types is None else self.layer_types[layer])


def undo_rope(key, rotary, start=0, layer_type=None):
    """The key (..., T, D) before RoPE. RoPE maps each pair (x1, x2) = (x[i], x[i + R/2]) of the first R channels to
    s·(x1 cos − x2 sin, x2 cos + x1 sin) with s the embedding's attention scaling (1 for plain RoPE);
    with the scaled cos and sin the inverse is (y·cos − rotate_half(y)·sin) / (cos² + sin²). The key's tokens
    sit at positions start … start + T − 1; `layer_type` picks the RoPE of rotary embeddings that have one per
    layer type."""
    buffers = list(rotary.buffers()) if isinstance(rotary, torch.nn.Module) else []
    device = buffers[0].device if buffers else key.device   # under a device map, not necessarily the key's
    probe = key[..., :1, :].to(device)                       # the embedding reads its dtype and device
    positions = torch.arange(start, start + key.shape[-2], device=device)[None]
    embedded = rotary(probe, positions) if layer_type is None else rotary(probe, positions, layer_type)
    cos, sin = (t.float().reshape(t.shape[-2:]).to(key.device) for t in embedded)   # (T, R)
    R = cos.shape[-1]
    y = key[..., :R].float()
    rotated_half = torch.cat([-y[..., R // 2:], y[..., : R // 2]], dim=-1)
    x = (y * cos - rotated_half * sin) / (cos * cos + sin * sin)
    return torch.cat([x.to(key.dtype), key[..., R:]], dim=-1)

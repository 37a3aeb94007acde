"""Capturing and editing the KV cache through transformers' attention interface.

`moqae` is registered as an attention implementation: it sees each layer's post-RoPE key and value
states (before any grouped-query repetition: exactly what the KV cache holds), lets a `KVHook` record
or replace them, then runs transformers' own SDPA attention. No model code is edited.
"""
import contextlib

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from . import CalibError

IMPLEMENTATION = "moqae"
_active_hooks = []


class KVHook:
    """What to do with the KV states of each layer during the forward passes inside `active()`.

    `record`: keep every layer's (key, value), each (batch, kv_heads, T, head_dim), in `keys`/`values`.
    `transform(layer, key, value) -> (key, value)`: replace them (for example fake-quantize a unit).
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


def moqae_attention_forward(module, query, key, value, attention_mask, **kwargs):
    if _active_hooks:
        hook = _active_hooks[-1]
        layer = module.layer_idx
        hook.layers_seen.add(layer)
        if hook.transform is not None:
            key, value = hook.transform(layer, key, value)
        if hook.record:
            hook.keys[layer], hook.values[layer] = key, value
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(IMPLEMENTATION, moqae_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def check_all_layers_seen(hook, num_layers, model_dir):
    """Raises when some layer's attention did not go through the interface."""
    missing = sorted(set(range(num_layers)) - hook.layers_seen)
    if missing:
        raise CalibError(
            f"{model_dir}: attention of layer(s) {missing} does not go through transformers' attention interface, "
            "so its KV cache cannot be captured (this model family is not supported)")

"""Plans: which expert every unit (layer, KV head, routed chunk) of every window gets, and `apply_plan`,
which fake-quantizes K and V accordingly.

The first chunk (when the router freezes it) and the tail tokens stay at 16 bits, as does everything a
plan leaves unquantized (rounded to binary16, which is how a cache stores 16 bits).
"""
import torch

from ..quantizer import at_sixteen_bits, quantize_keys, quantize_values
from ..router import decisions_of_logits, keep_probability, routed_logits


class Layout:
    """Which tokens are routed: chunks `first..C-1` of every window of `tokens` tokens, where a plan decides
    (B, H, routed) units per layer. A layer whose cache holds only its last chunks at the window's end (a sliding
    layer, `first_held[layer]` its first held chunk; docs/FORMATS.md, Sliding-window layers) keeps the decisions
    of the chunks it holds: the `skipped(layer)` first routed chunks, and every token before its first held
    chunk, stay at 16 bits and are not counted."""

    def __init__(self, tokens, chunk_size, first, num_layers, num_heads, head_dim, value_group, first_held=None):
        self.tokens, self.chunk_size, self.first = tokens, chunk_size, first
        self.chunks = tokens // chunk_size
        self.routed = self.chunks - first
        self.num_layers, self.num_heads, self.head_dim, self.value_group = num_layers, num_heads, head_dim, value_group
        self.first_held = list(first_held) if first_held is not None else [0] * num_layers

    def skipped(self, layer):
        """Routed chunks of `layer` (from `first`) that its cache does not hold."""
        return min(max(0, self.first_held[layer] - self.first), self.routed)

    def region(self, layer):
        """The tokens of `layer` that are routed and held."""
        return slice((self.first + self.skipped(layer)) * self.chunk_size, self.chunks * self.chunk_size)

    def held_elements(self):
        """K and V elements the cache holds at a window's end, over every layer."""
        return sum(2 * self.num_heads * (self.tokens - first * self.chunk_size) * self.head_dim for first in self.first_held)

    def held_mask(self):
        """(L, routed) bool: which routed chunks each layer's cache holds."""
        mask = torch.ones(self.num_layers, self.routed, dtype=torch.bool)
        for layer in range(self.num_layers):
            mask[layer, : self.skipped(layer)] = False
        return mask


class Plan:
    """Decides experts per unit. `decide(layer, key, value, windows, layout)` returns (B, H, routed chunks)
    indices into `experts`, or None for all at expert 0; `windows` are the batch's window indices.
    A plan with a `note` is a diagnostic that no inference-time router could be: the note says why."""
    name = "plan"
    note = None

    def __init__(self, experts):
        self.experts = experts

    def decide(self, layer, key, value, windows, layout):
        raise NotImplementedError


class UniformPlan(Plan):
    def __init__(self, expert, name=None):
        super().__init__([expert])
        self.name = name or f"uniform {expert.name}"

    def decide(self, layer, key, value, windows, layout):
        return None   # everything at expert 0


class LayerPlan(Plan):
    """One expert per layer (KVTuner-style)."""

    def __init__(self, experts, per_layer, name="layer-wise"):
        super().__init__(experts)
        self.per_layer, self.name = per_layer, name

    def decide(self, layer, key, value, windows, layout):
        return torch.full((*key.shape[:2], layout.routed), self.per_layer[layer], dtype=torch.long)


class StaticPlan(Plan):
    """One expert per (layer, head, chunk position), the same for every window: it reads no content."""

    def __init__(self, experts, per_position, name="static"):
        super().__init__(experts)
        self.per_position, self.name = per_position, name   # (L, H, routed chunks)

    def decide(self, layer, key, value, windows, layout):
        return self.per_position[layer].expand(key.shape[0], -1, -1)


class RouterPlan(Plan):
    """The export's routers: router r runs on its leader layer's inputs (the export's router input, from
    that layer's K and V); the decision holds for its group."""
    name = "router"

    def __init__(self, export, inputs):
        super().__init__(export.experts)
        self.export, self.inputs, self.cached = export, inputs, None
        self.keep_scores = None   # (B, H, routed) the last decisions' probability of more than 2 bits

    def decide(self, layer, key, value, windows, layout):
        router = self.export.router_of_layer(layer)
        if layer == self.export.leader(router):
            logits = routed_logits(self.export, router, self.inputs(key, value, layer=layer))   # one pass for both
            self.cached = decisions_of_logits(self.export, logits).cpu()
            self.keep_scores = keep_probability(self.export, logits).float().cpu()
        return self.cached


class UnitPlan(Plan):
    """Fixed decisions per window: `decisions[window]` is (L, H, routed chunks)."""

    def __init__(self, experts, decisions, name, note=None):
        super().__init__(experts)
        self.decisions, self.name, self.note = decisions, name, note

    def decide(self, layer, key, value, windows, layout):
        return torch.stack([self.decisions[w][layer] for w in windows])


def apply_plan(key, value, decisions, experts, layout, layer):
    """Fake-quantizes K, V (B, H, T, D) of `layer` by per-unit decisions (B, H, routed) (None: all at expert 0);
    the routed chunks the layer's cache does not hold stay at 16 bits, as chunk 0 and the tail do."""
    out_k, out_v = at_sixteen_bits(key), at_sixteen_bits(value)
    region, N = layout.region(layer), layout.chunk_size
    if decisions is not None:
        decisions = decisions[..., layout.skipped(layer):]
    for m, expert in enumerate(experts):
        if expert.is_unquantized:
            continue
        mask = None if decisions is None else (decisions == m).to(key.device)
        if mask is not None and not mask.any():
            continue
        qk = quantize_keys(key[:, :, region], expert.key_bits, N)
        qv = quantize_values(value[:, :, region], expert.value_bits, N, layout.value_group)
        if mask is None:
            out_k[:, :, region], out_v[:, :, region] = qk, qv
        else:
            tokens = mask.repeat_interleave(N, dim=-1)[..., None]
            out_k[:, :, region] = torch.where(tokens, qk, out_k[:, :, region])
            out_v[:, :, region] = torch.where(tokens, qv, out_v[:, :, region])
    return out_k, out_v

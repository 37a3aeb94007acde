"""Serving: `MoQAECache`, a KV cache for transformers 5.23.0 (its per-layer `Cache` API, so that
`model.generate(past_key_values=cache)` uses it) that stores every chunk of N tokens at the expert its
router picks, packed.

Each layer holds
- whole chunks as units (one KV head, one chunk) at one expert each: keys as codes packed bit by bit with a
  binary16 scale and minimum per channel per chunk, values as codes with a binary16 scale and minimum per
  group of `value_group` channels per token (the quantizer of quantizer.py); a 16-bit part in 16 bits;
- chunk 0 in 16 bits when the router export freezes it;
- the tokens after the last whole chunk in 16 bits (the residual).

16 bits are binary16, or bfloat16 in a bfloat16 model (quantizer.sixteen_bit_dtype): its values exactly.

Prefill cuts the prompt into chunks. Each router reads its leader layer's inputs (the router input the
export names) and decides for every layer of its group. Whole chunks are quantized from the states as the
model computed them, and the prompt's own queries then attend to the quantized chunks: what `eval` does
to a window, so prefill's K/V equal the evaluator's fake-quantized K/V bit for bit. In decoding each new
token joins the residual; when the residual fills a chunk, that chunk (its 16-bit values) is routed,
quantized and packed, and never requantized. A layer that attends through a sliding window holds only the
chunks its next query sees (MoQAELayer), dropping the others.

A decode step attends on the packed units themselves (serve/attention.py, the attention implementation
"moqae"), reading each once; prefill, and a cache built with `packed_attention=False`, attend to the
layer's whole cache dequantized to the model's dtype, rebuilt at that update (docs/PERFORMANCE.md).
"""
import copy
import os
import time
import warnings

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import MoqaeError
from ..capture import EAGER_IMPLEMENTATION, IMPLEMENTATION, RouterInputs, attention_implementation
from ..experts import Expert
from ..model import check_export_fits, first_held_chunk, model_shape, sliding_window_layers
from ..quantizer import group_codes, sixteen_bit_dtype, unit_storage_bits
from ..router import read_export, route_chunks
from .attention import PackedLayer
from .packing import pack_codes, unpack_codes

TARGET_TRANSFORMERS = "5.23.0"                     # pinned in requirements.txt: CI's tests run on it
SUPPORTED_TRANSFORMERS = ("5.23.0", "5.25.0")      # the releases the serving tests pass on (make test-newest-transformers)
FROZEN = Expert("frozen fp16", 16, 16)   # storage of a frozen chunk 0


def use_packed_attention(model, packed):
    """When `packed`, gives `model` moqae's attention implementation (capture.py: SDPA, or its eager attention
    where it soft-caps), unless it has one; returns `packed`."""
    if packed:
        if model is None:
            raise MoqaeError("packed attention needs the model, whose attention implementation becomes \"moqae\"")
        if model.config._attn_implementation not in (IMPLEMENTATION, EAGER_IMPLEMENTATION):
            model.set_attn_implementation(attention_implementation(model.config))
    return packed


class RouterPolicy:
    """The export's routers: router r reads its leader layer's chunks and decides for its group."""

    def __init__(self, export, inputs):
        self.export, self.inputs, self.experts = export, inputs, export.experts
        self.decided = {}          # (router, row) → (first chunk, decisions (B, H, C))
        self.seconds = 0.0         # time spent routing

    def decide(self, layer, keys, values, first_chunk, row=None):
        """Experts (B, H, C) of whole chunks keys, values (B, H, C·N, D) starting at chunk `first_chunk`, of batch
        row `row` alone where a batch's rows are chunked apart (RaggedLayer), else of the whole batch."""
        router = self.export.router_of_layer(layer)
        if layer == self.export.leader(router):
            start = time.perf_counter()
            inputs = self.inputs(keys, values, first_chunk * self.export.chunk_size, layer=layer)
            self.decided[router, row] = (first_chunk, route_chunks(self.export, router, inputs))
            self.seconds += time.perf_counter() - start
        first, decisions = self.decided.get((router, row), (None, None))
        if first != first_chunk or decisions.shape[-1] != keys.shape[-2] // self.export.chunk_size:
            raise MoqaeError(f"layer {layer} stores chunks its leader layer {self.export.leader(router)} did not route")
        return decisions


class LayerPolicy:
    """One expert per layer for every chunk (a uniform plan when all are equal): reads no content."""

    def __init__(self, experts, per_layer, chunk_size):
        self.experts, self.per_layer, self.chunk_size, self.seconds = experts, per_layer, chunk_size, 0.0

    def decide(self, layer, keys, values, first_chunk, row=None):
        return torch.full((*keys.shape[:2], keys.shape[-2] // self.chunk_size), self.per_layer[layer], dtype=torch.long)


class PackedPart:
    """The keys (`per="channel"`) or values (`per="token"`) of the units stored at one width: 16-bit
    (U, N, D) at 16 bits (`sixteen_bit_dtype` of the units' dtype); otherwise codes packed unit by unit, (U, packed_bytes(N·D, bits)), with a
    binary16 scale and minimum per group: (U, 1, D) per channel, (U, N, D / value_group, 1) per token.

    Units lie in blocks that are never copied: a chunk stored during decode goes into the last block's free
    room, or into a new block of at least 1/GROWTH of the units stored so far, so that growing the cache
    makes no second copy of it and reserves at most about 1/GROWTH more than it holds."""

    GROWTH = 8

    def __init__(self, bits, per, value_group):
        self.bits, self.per, self.value_group = bits, per, value_group
        self.blocks = []     # per block, its tensors (16 bits: [values]; otherwise [codes, scale, minimum]), (capacity, ...)
        self.filled = []     # units stored in each block

    def append(self, units):
        """Stores units (U, N, D)."""
        if self.bits == 16:
            new = [units.to(sixteen_bit_dtype(units.dtype))]
        else:
            grouped = units if self.per == "channel" else units.unflatten(-1, (-1, self.value_group))
            codes, scale, low = group_codes(grouped, self.bits, dim=-2 if self.per == "channel" else -1)
            new = [pack_codes(codes.flatten(1), self.bits), scale, low]
        U = units.shape[0]
        if self.blocks and self.blocks[-1][0].shape[0] - self.filled[-1] >= U:
            start = self.filled[-1]
            for block, tensor in zip(self.blocks[-1], new):
                block[start: start + U].copy_(tensor)
            self.filled[-1] += U
        else:
            capacity = max(U, self.count // self.GROWTH)
            if capacity > U:
                block = [tensor.new_empty(capacity, *tensor.shape[1:]) for tensor in new]
                for room, tensor in zip(block, new):
                    room[:U].copy_(tensor)
                new = block
            self.blocks.append(new)
            self.filled.append(U)

    @property
    def count(self):
        """Units stored."""
        return sum(self.filled)

    def segments(self):
        """(first unit, the block's tensors of stored units) per block, in storage order."""
        first = 0
        for block, filled in zip(self.blocks, self.filled):
            yield first, [tensor[:filled] for tensor in block]
            first += filled

    def read(self, tensors, units, N, D, dtype, out=None):
        """The units of one segment's `tensors` in `dtype`, shaped (*units, N, D) with prod(units) = their count
        (for example (C, B·H) for units in chunk-major order), into `out` when given (it may be a strided view)."""
        if out is None:
            out = torch.empty(*units, N, D, dtype=dtype, device=tensors[0].device)
        if self.bits == 16:
            return out.copy_(tensors[0].view(*units, N, D))
        packed, scale, low = tensors
        per_byte = 8 // self.bits
        if 8 % self.bits == 0 and D % per_byte == 0:     # each byte's codes straight into their places in `out`
            codes = packed.view(*units, N, D // per_byte)
            places = out.unflatten(-1, (-1, per_byte))
            for k in range(per_byte):
                places[..., k].copy_((codes >> k * self.bits) & (2**self.bits - 1))
        else:
            out.copy_(unpack_codes(packed, self.bits, N * D).view(*units, N, D))
        # dequantize_codes in place: codes · scale + minimum, in `dtype`
        grouped = out if self.per == "channel" else out.unflatten(-1, (-1, self.value_group))
        grouped.mul_(scale.view(*units, *scale.shape[1:]))
        grouped.add_(low.view(*units, *low.shape[1:]))
        return out

    def nbytes(self):
        """Bytes of the stored units (room reserved in the blocks is not counted)."""
        return sum(tensor.numel() * tensor.element_size() for _, tensors in self.segments() for tensor in tensors)

    def take(self, indices):
        """The stored tensors of the units at `indices` (storage order, any order or repeats), in that order;
        None when there are none."""
        pieces, where = [], []
        for first, tensors in self.segments():
            inside = ((indices >= first) & (indices < first + tensors[0].shape[0])).nonzero().squeeze(-1)
            if inside.numel():
                pieces.append([tensor.index_select(0, indices[inside] - first) for tensor in tensors])
                where.append(inside)
        if not pieces:
            return None
        order = torch.cat(where).argsort()
        return [torch.cat(tensors)[order] for tensors in zip(*pieces)]

    def replace(self, tensors):
        """Holds exactly the units of `tensors` (as `take` gives them; None for none), in one block."""
        self.blocks, self.filled = ([tensors], [tensors[0].shape[0]]) if tensors is not None else ([], [])

    def drop_front(self, count):
        """Drops the first `count` units (a sliding layer's oldest chunks). A block is freed with its last unit; until
        then its dropped rows stay allocated, uncounted."""
        while count and self.filled:
            if count >= self.filled[0]:
                count -= self.filled.pop(0)
                self.blocks.pop(0)
            else:
                self.blocks[0] = [tensor[count:] for tensor in self.blocks[0]]
                self.filled[0] -= count
                count = 0

    def keep(self, count):
        """Drops every unit after the first `count`."""
        for index, filled in enumerate(self.filled):
            self.filled[index] = min(filled, max(0, count))
            count -= filled
        while self.filled and not self.filled[-1]:
            self.blocks.pop(), self.filled.pop()


class GrowingLayer(CacheLayerMixin):
    """What MoQAELayer and RaggedLayer share: a length that grows as tokens are added (crop takes them back), beam
    search's row moves through `select_rows`, and for a layer that attends through a sliding window of `window`
    tokens (None: full attention), the first position attention reads (`held_start`)."""

    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, window):
        super().__init__()
        self.window = window
        self.is_sliding = window is not None   # the masks of sliding layers come from the first one's sizes

    def get_mask_sizes(self, query_length):
        """(tokens attention reads, the position of the first): every held token, then the new ones."""
        start = self.held_start()
        return self.length + query_length - start, start

    def get_seq_length(self):
        return self.length

    def get_max_length(self):
        return -1

    def reorder_cache(self, beam_idx):
        """Beam search: row b takes the states of row beam_idx[b]."""
        self.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats):
        self.select_rows(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices):
        self.select_rows(torch.as_tensor(indices))


class MoQAELayer(GrowingLayer):
    """One layer's cache: packed units per storage expert (the experts, then `FROZEN`), the expert of every
    unit (C, B·H) uint8 in chunk-major order (which is also the order each expert's units are stored in),
    and the 16-bit residual (B, H, r < N, D).

    A sliding layer (`window` W) holds the chunks from the first one its next query sees (that query, at position
    p, sees positions p − W + 1 … p): older chunks are dropped, never requantized, and `dropped` counts them, so
    that held chunk i is the layer's chunk `dropped` + i. Whole chunks that have left the window by the end of the
    update that brings them (a long prompt) are not stored: that update's queries read them in 16 bits."""

    def __init__(self, layer, cache, row=None):
        super().__init__(cache.sliding_windows.get(layer))
        self.layer, self.cache, self.row = layer, cache, row   # row: the batch row this layer holds alone (RaggedLayer)
        self.reset()

    def reset(self):
        self.parts = [(PackedPart(e.key_bits, "channel", self.cache.value_group),
                       PackedPart(e.value_bits, "token", self.cache.value_group)) for e in self.cache.storage_experts]
        self.expert_map = None     # (C, B·H) uint8
        self.kernel_parts = None   # the packed-attention kernel's view of the parts (serve/attention.py)
        self.residual = None       # (keys, values), each (B, H, r, D) in 16 bits
        self.length = 0
        self.dropped = 0           # chunks a sliding window has left behind
        self.is_initialized = False

    def first_seen_chunk(self, position):
        """The first chunk the query at `position` sees (0 without a sliding window)."""
        return first_held_chunk(position, self.window, self.cache.chunk_size)

    def held_start(self):
        """The first position this layer's attention reads at its next update: its first held chunk once the chunks
        the next query does not see are dropped."""
        if not self.is_initialized:
            return 0
        held = self.dropped + self.expert_map.shape[0]
        return min(max(self.dropped, self.first_seen_chunk(self.length)), held) * self.cache.chunk_size

    def forget_unseen(self):
        """Drops the held chunks that the next query (at position `length`) does not see."""
        if self.is_initialized and self.window is not None:
            self._drop_chunks(self.held_start() // self.cache.chunk_size - self.dropped)

    def _drop_chunks(self, count):
        """Drops the first `count` held chunks."""
        if count <= 0:
            return
        for index, pair in enumerate(self.parts):
            units = int((self.expert_map[:count] == index).sum())
            for part in pair:
                part.drop_front(units)
        self.dropped += count
        self._index_units(self.expert_map[count:])

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        self.shape = (B, H, D)
        self.expert_map = torch.empty(0, B * H, dtype=torch.uint8, device=self.device)
        nowhere = torch.empty(0, dtype=torch.long, device=self.device)
        self.places, self.spans = [(nowhere, nowhere)] * len(self.parts), [None] * len(self.parts)
        empty = key_states.new_empty(B, H, 0, D, dtype=sixteen_bit_dtype(self.dtype))
        self.residual = (empty, empty)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Adds the new states (B, H, t, D) and returns the layer's whole cache as attention reads it."""
        self.forget_unseen()
        passing = self.append(key_states, value_states)
        if passing is None and self.cache.packed_attention and key_states.shape[-2] == 1:
            return PackedLayer(self), PackedLayer(self)    # the "moqae" attention reads the packed units
        states = self.read() if passing is None else passing
        self.forget_unseen()
        return states

    def append(self, key_states, value_states):
        """Adds the new states (B, H, t, D): whole chunks are routed, quantized and packed, the rest waits. Returns
        None, or in a sliding layer whose new whole chunks leave the window before they are stored, the keys and
        values (B, H, T, D) this update's attention reads: the held chunks, those chunks in 16 bits, then the rest."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        N = self.cache.chunk_size
        keys = torch.cat([self.residual[0].to(key_states.dtype), key_states], dim=-2)
        values = torch.cat([self.residual[1].to(value_states.dtype), value_states], dim=-2)
        whole = keys.shape[-2] // N
        first = self.dropped + self.expert_map.shape[0]                 # the layer's chunk index of the first new one
        passing = min(max(self.first_seen_chunk(self.length + key_states.shape[-2]) - first, 0), whole)
        held = None
        if passing:                     # every held chunk is older than the passing ones: it leaves too
            C = self.expert_map.shape[0]
            held = [states[:, :, : C * N] for states in self.read()]
            self._drop_chunks(C)
        if whole:
            self._store(keys[:, :, : whole * N], values[:, :, : whole * N], skip=passing)
        sixteen = sixteen_bit_dtype(self.dtype)
        self.residual = (keys[:, :, whole * N:].to(sixteen), values[:, :, whole * N:].to(sixteen))
        self.length += key_states.shape[-2]
        if not passing:
            return None
        return tuple(torch.cat([before, states[:, :, : passing * N].to(sixteen).to(self.dtype), after], dim=-2)
                     for before, states, after in zip(held, (keys, values), self.read()))

    def _store(self, keys, values, skip=0):
        """Routes whole chunks keys, values (B, H, C·N, D), then quantizes and packs all but the first `skip` (which a
        sliding window has already left behind: counted as dropped)."""
        B, H, D = self.shape
        N, first = self.cache.chunk_size, self.dropped + self.expert_map.shape[0]
        C = keys.shape[-2] // N
        experts = torch.empty(C, B * H, dtype=torch.uint8, device=self.device)
        frozen = 1 if self.cache.freeze_first_chunk and first == 0 else 0
        experts[:frozen] = len(self.cache.storage_experts) - 1
        if C > frozen:
            decisions = self.cache.policy.decide(self.layer, keys[:, :, frozen * N:], values[:, :, frozen * N:], first + frozen,
                                                 self.row)
            experts[frozen:] = decisions.reshape(B * H, C - frozen).t().to(torch.uint8)
        experts, self.dropped, C = experts[skip:], self.dropped + skip, C - skip
        key_units = keys[:, :, skip * N:].reshape(B * H, C, N, D).transpose(0, 1)        # (C, B·H, N, D)
        value_units = values[:, :, skip * N:].reshape(B * H, C, N, D).transpose(0, 1)
        for index in experts.unique().tolist():
            mask = experts == index
            key_part, value_part = self.parts[index]
            key_part.append(key_units[mask])
            value_part.append(value_units[mask])
        self._index_units(torch.cat([self.expert_map, experts]))

    def _index_units(self, expert_map):
        """Takes `expert_map` (C, B·H) as the stored units' and derives where each part's units lie."""
        B, H, _ = self.shape
        self.expert_map, self.kernel_parts = expert_map, None
        self.places = [(self.expert_map == index).nonzero().unbind(-1) for index in range(len(self.parts))]   # (chunk, head) of each stored unit
        self.spans = [(int(chunk[0]), int(chunk[-1])) if len(chunk) and len(chunk) == (chunk[-1] - chunk[0] + 1) * B * H else None
                      for chunk, _ in self.places]

    def _storage_index(self, index):
        """Each unit's position among its part's stored units: (C, B·H) int64 (−1 where the part holds none)."""
        held = self.expert_map == index
        return torch.where(held, held.flatten().cumsum(0).view(held.shape) - 1, -1)

    def select_rows(self, rows):
        """Keeps the batch rows `rows` (B',) of this layer, in that order (repeats allowed): each row's packed
        units, expert map and residual move with it, copied once; nothing is requantized."""
        if not self.is_initialized:
            return
        rows = rows.to(self.device)
        B, H, D = self.shape
        heads = (rows[:, None] * H + torch.arange(H, device=self.device)).flatten()    # (B'·H,) old unit rows
        selected = self.expert_map[:, heads]                                              # (C, B'·H)
        for index, pair in enumerate(self.parts):
            indices = self._storage_index(index)[:, heads][selected == index]           # chunk-major, as stored
            for part in pair:
                part.replace(part.take(indices))
        self.residual = tuple(r.index_select(0, rows) for r in self.residual)
        self.shape = (rows.numel(), H, D)
        self._index_units(selected)

    def crop(self, tokens_to_remove):
        """Drops the last −tokens_to_remove tokens (transformers' convention: a negative count). Whole chunks past
        the new length are dropped; a chunk that keeps some of its tokens returns them to the residual as stored
        (dequantized, then in 16 bits), to be quantized again with the tokens that refill it."""
        if tokens_to_remove > 0:
            raise MoqaeError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove, as transformers does")
        removed = -tokens_to_remove
        if not removed or not self.is_initialized:
            return
        if removed > self.length:
            raise MoqaeError(f"crop({tokens_to_remove}): the layer holds only {self.length} tokens")
        N, kept = self.cache.chunk_size, self.length - removed
        if removed <= self.residual[0].shape[-2]:
            self.residual = tuple(r[:, :, : r.shape[-2] - removed] for r in self.residual)
        else:
            whole = kept // N - self.dropped       # held chunks that stay whole
            if whole < 0:
                raise MoqaeError(f"crop({tokens_to_remove}): layer {self.layer}'s sliding window has dropped the tokens "
                                 f"before {self.dropped * N}, so it cannot go back to {kept}")
            partial = self._chunk_states(whole) if kept % N else None
            for index, pair in enumerate(self.parts):
                for part in pair:
                    part.keep(int((self.expert_map[:whole] == index).sum()))
            self._index_units(self.expert_map[:whole])
            if partial is None:
                self.residual = tuple(r[:, :, :0] for r in self.residual)
            else:
                self.residual = tuple(states[:, :, : kept % N].to(sixteen_bit_dtype(self.dtype)) for states in partial)
        self.length = kept

    def _chunk_states(self, chunk):
        """Keys and values (B, H, N, D) of held chunk `chunk`, dequantized to the model's dtype."""
        B, H, D = self.shape
        N = self.cache.chunk_size
        out = [torch.empty(B * H, N, D, dtype=self.dtype, device=self.device) for _ in range(2)]
        for index, pair in enumerate(self.parts):
            heads = (self.expert_map[chunk] == index).nonzero().squeeze(-1)
            if heads.numel():
                indices = self._storage_index(index)[chunk, heads]
                for side, part in zip(out, pair):
                    side[heads] = part.read(part.take(indices), (heads.numel(),), N, D, self.dtype)
        return tuple(x.view(B, H, N, D) for x in out)

    def read(self):
        """Keys and values (B, H, T, D) in the model's dtype, from the first held chunk: every unit dequantized, then
        the residual. They are
        views of a buffer (B·H, slots, N, D) whose last slot holds the residual, so that each unit is one
        contiguous row of it."""
        B, H, D = self.shape
        N, C, r = self.cache.chunk_size, self.expert_map.shape[0], self.residual[0].shape[-2]
        slots = C + (1 if r else 0)
        out = []
        for side, residual in enumerate(self.residual):
            buffer = torch.empty(B * H, slots, N, D, dtype=self.dtype, device=self.device)
            rows = buffer.view(B * H * slots, N, D)
            for part, (chunk, head), span in zip(self.parts, self.places, self.spans):
                for start, tensors in part[side].segments():
                    count = tensors[0].shape[0]
                    if span and start % (B * H) == 0 and count % (B * H) == 0:   # every unit of some chunks, chunk-major
                        first = span[0] + start // (B * H)
                        part[side].read(tensors, (count // (B * H), B * H), N, D, self.dtype,
                                        out=buffer[:, first: first + count // (B * H)].transpose(0, 1))
                    else:
                        units = slice(start, start + count)
                        rows.index_copy_(0, head[units] * slots + chunk[units], part[side].read(tensors, (count,), N, D, self.dtype))
            if r:
                buffer[:, C, :r] = residual.reshape(B * H, r, D)
            out.append(buffer.view(B, H, slots * N, D)[:, :, : C * N + r])
        return tuple(out)

    def nbytes(self):
        """Bytes held: packed codes, scales and minima, 16-bit parts, the residual and the expert map."""
        if not self.is_initialized:
            return 0
        held = sum(part.nbytes() for pair in self.parts for part in pair)
        return held + sum(r.numel() * 2 for r in self.residual) + self.expert_map.numel()

    def unit_counts(self):
        """Units stored at each storage expert: (len(storage_experts),) int64."""
        return torch.tensor([key_part.count for key_part, _ in self.parts], dtype=torch.long)

    @property
    def batch_size(self):
        return self.shape[0] if self.is_initialized else 0

    def residual_count(self):
        """Values (keys and values) waiting in the residual."""
        return sum(r.numel() for r in self.residual) if self.is_initialized else 0

    def tokens_held(self):
        """Tokens held, summed over the batch rows."""
        return (self.length - self.dropped * self.cache.chunk_size) * self.shape[0] if self.is_initialized else 0

    def chunk_experts(self):
        """Storage expert of every unit: (B, H, C) int64."""
        B, H, _ = self.shape
        return self.expert_map.t().reshape(B, H, -1).long()

    def copy(self):
        """An independent copy of this layer (its own tensors), for a beam that takes this row twice."""
        twin = copy.copy(self)
        twin.parts = [(copy.copy(keys), copy.copy(values)) for keys, values in self.parts]
        for pair in twin.parts:
            for part in pair:
                part.blocks, part.filled = list(part.blocks), list(part.filled)
        twin.select_rows(torch.arange(self.shape[0]) if self.is_initialized else torch.arange(0))
        return twin


class RaggedLayer(GrowingLayer):
    """One layer of a batch whose rows begin at different positions (left padding): each row is a MoQAELayer of its
    own, chunked from the row's first real token, so that its chunks, routing and bytes are those of the row
    alone; padding is never stored, routed or counted. Attention reads the rows' caches dequantized, padding as
    zeros (the mask hides it). In a sliding layer it reads from the earliest position a row holds; a row that holds
    less reads zeros there, where the window hides them."""

    def __init__(self, layer, cache, padding):
        super().__init__(cache.sliding_windows.get(layer))
        self.layer, self.cache, self.padding = layer, cache, list(padding)   # padding: each row's leading pad tokens
        self.reset()

    def reset(self):
        self.rows = [MoQAELayer(self.layer, self.cache, row) for row in range(len(self.padding))]
        self.length = 0
        self.is_initialized = False

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        """Adds the new states (B, H, t, D), the first update's padding left out, and returns every row's cache
        (B, H, T, D) as attention reads it."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            if key_states.shape[0] % len(self.padding) == 0:   # generate() repeats each prompt for beams and return sequences
                repeats = key_states.shape[0] // len(self.padding)
                self.padding = [padding for padding in self.padding for _ in range(repeats)]
                self.rows = [MoQAELayer(self.layer, self.cache, row) for row in range(len(self.padding))]
        if key_states.shape[0] != len(self.rows):
            raise MoqaeError(f"the cache was built for a batch of {len(self.rows)} rows (its attention_mask) but is given "
                             f"{key_states.shape[0]}")
        start = self.held_start()
        passing = [None] * len(self.rows)
        for index, row in enumerate(self.rows):
            row.forget_unseen()
            skip = min(max(self.padding[index] - self.length, 0), key_states.shape[-2])   # this update's padding
            if skip < key_states.shape[-2]:
                passing[index] = row.append(key_states[index: index + 1, :, skip:], value_states[index: index + 1, :, skip:])
        self.length += key_states.shape[-2]
        states = self.read(start, passing)
        for row in self.rows:
            row.forget_unseen()
        return states

    def held_start(self):
        """The earliest position a row's attention reads at the next update (padding counted)."""
        if self.window is None:
            return 0
        return min([self.length] + [padding + row.held_start() for padding, row in zip(self.padding, self.rows)
                                    if row.is_initialized])

    def read(self, start=0, passing=None):
        """Keys and values (B, H, T − start, D) of positions start … T − 1: each row's states right-aligned (`passing`:
        a row's own, where its append gave them), zeros where it has none (its padding)."""
        B, H, D = len(self.rows), self.cache.num_kv_heads, self.cache.head_dim
        out = [torch.zeros(B, H, self.length - start, D, dtype=self.dtype, device=self.device) for _ in range(2)]
        for index, row in enumerate(self.rows):
            if row.is_initialized and row.length:
                for side, states in zip(out, (passing and passing[index]) or row.read()):
                    side[index, :, side.shape[-2] - states.shape[-2]:] = states[0]
        return tuple(out)

    def select_rows(self, rows):
        """Keeps the batch rows `rows` (B',), in that order; a row taken twice is copied."""
        taken, kept = set(), []
        for row in rows.tolist():
            kept.append(self.rows[row].copy() if row in taken else self.rows[row])
            taken.add(row)
        self.rows, self.padding = kept, [self.padding[row] for row in rows.tolist()]
        for index, row in enumerate(self.rows):
            row.row = index

    def crop(self, tokens_to_remove):
        """Drops the last −tokens_to_remove tokens of every row (MoQAELayer.crop)."""
        for row in self.rows:
            row.crop(tokens_to_remove)
        self.length += min(tokens_to_remove, 0)

    @property
    def batch_size(self):
        return len(self.rows)

    def nbytes(self):
        return sum(row.nbytes() for row in self.rows)

    def unit_counts(self):
        return sum(row.unit_counts() for row in self.rows)

    def residual_count(self):
        return sum(row.residual_count() for row in self.rows)

    def tokens_held(self):
        return sum(row.tokens_held() for row in self.rows)


ROUTER_FILE = "moqae-router.bin"    # where `moqae-train export RUN --into MODEL_DIR` writes


def router_in(model_dir):
    """The router export a model directory carries, MODEL_DIR/moqae-router.bin; raises when there is none."""
    path = os.path.join(os.fspath(model_dir), ROUTER_FILE)
    if not os.path.isfile(path):
        raise MoqaeError(f"{path}: no router export here (write one with `moqae-train export RUN --into {model_dir}`)")
    return path


def warn_if_untested(version):
    """Warns once when the installed transformers lies outside SUPPORTED_TRANSFORMERS."""
    low, high = (Version(v) for v in SUPPORTED_TRANSFORMERS)
    if not low <= Version(version) <= high and version not in _warned:
        _warned.add(version)
        warnings.warn(f"MoQAECache is tested on transformers {low} to {high}, not {version}; its cache API may differ")


_warned = set()


def left_padding(attention_mask):
    """Each row's leading padding (list of B ints) of a prompt's attention mask (B, T) padded on the left, or None."""
    if attention_mask is None:
        return None
    mask = torch.as_tensor(attention_mask).bool()
    if mask.dim() != 2:
        raise MoqaeError(f"attention_mask must be (batch, tokens), as generate() takes it; got shape {tuple(mask.shape)}")
    real = mask.sum(-1)
    padding = mask.shape[1] - real
    padded_on_the_left = torch.arange(mask.shape[1], device=mask.device) >= padding[:, None]
    if not torch.equal(mask, padded_on_the_left) or (real == 0).any():
        raise MoqaeError("attention_mask: every row must be padding, then at least one real token (padding on the left: "
                         "tokenizer.padding_side = \"left\")")
    return padding.tolist()


class MoQAECache(Cache):
    """A KV cache whose chunks of `chunk_size` tokens are stored at the experts `policy` picks
    (`RouterPolicy` or `LayerPolicy`); build it with `from_export` or `from_layer_plan`."""

    def __init__(self, policy, config, chunk_size, freeze_first_chunk, value_group=None, packed_attention=False,
                 attention_mask=None):
        config = config.get_text_config(decoder=True)
        self.sliding_windows = sliding_window_layers(config)   # layer → its window, for the sliding layers
        layers, self.num_kv_heads, self.head_dim, _ = model_shape(config)
        self.value_group = value_group or self.head_dim
        if self.head_dim % self.value_group:
            raise MoqaeError(f"value group {self.value_group} does not divide the head dimension {self.head_dim}")
        warn_if_untested(transformers.__version__)
        self.policy, self.chunk_size, self.freeze_first_chunk = policy, chunk_size, freeze_first_chunk
        self.packed_attention = packed_attention
        self.storage_experts = list(policy.experts) + [FROZEN]
        padding = left_padding(attention_mask)
        if padding is not None and any(padding):
            super().__init__(layers=[RaggedLayer(layer, self, padding) for layer in range(layers)])
        else:
            super().__init__(layers=[MoQAELayer(layer, self) for layer in range(layers)])

    @classmethod
    def from_export(cls, export, model, value_group=None, model_dir="model", packed_attention=True, attention_mask=None):
        """The routers of `export` (a RouterExport or the path of an MQAE file) for `model`. With
        `packed_attention` (the default), decode steps attend on the packed units (serve/attention.py): the
        model's attention implementation becomes moqae's (capture.py), which is SDPA for everything else; without it,
        every step attends to the layer's cache dequantized. `attention_mask` (B, T), the prompt's as `generate`
        gets it: a batch padded on the left, whose rows are then chunked from their own first real token."""
        if isinstance(export, (str, os.PathLike)):
            export = read_export(os.fspath(export))
        check_export_fits(export, model.config)
        head_dim = model_shape(model.config)[2]
        inputs = RouterInputs(export.router_input, model, model_dir, export.chunk_size, value_group or head_dim)
        return cls(RouterPolicy(export, inputs), model.config, export.chunk_size, export.freeze_first_chunk, value_group,
                   use_packed_attention(model, packed_attention), attention_mask)

    @classmethod
    def from_pretrained(cls, model, model_dir=None, **options):
        """The routers that travel with the model: `model_dir`/moqae-router.bin (by default the directory `model` was
        loaded from), checked against the model as `from_export` checks; `options` as `from_export` takes them."""
        model_dir = model_dir or model.config._name_or_path
        if not model_dir or not os.path.isdir(model_dir):
            raise MoqaeError(f"{model_dir or 'the model'}: not a model directory; pass the one holding moqae-router.bin")
        return cls.from_export(router_in(model_dir), model, model_dir=model_dir, **options)

    @classmethod
    def from_layer_plan(cls, experts, config, chunk_size=32, freeze_first_chunk=True, value_group=None, model=None,
                        packed_attention=None, attention_mask=None):
        """Expert `experts[l]` for every chunk of layer l (a list of Expert, one per layer); packed attention as
        in `from_export`, by default when the `model` is given; `attention_mask` as in `from_export`."""
        packed_attention = model is not None if packed_attention is None else packed_attention
        distinct = list(dict.fromkeys(experts))
        policy = LayerPolicy(distinct, [distinct.index(e) for e in experts], chunk_size)
        return cls(policy, config, chunk_size, freeze_first_chunk, value_group, use_packed_attention(model, packed_attention),
                   attention_mask)

    def nbytes(self):
        """Bytes the cache holds (see `MoQAELayer.nbytes`)."""
        return sum(layer.nbytes() for layer in self.layers)

    def formula_bytes(self):
        """Bytes by the storage formula: `unit_storage_bits` per unit at its expert, 16 bits per residual value."""
        bits = 0
        for layer in self.layers:
            counts = layer.unit_counts()
            bits += sum(int(count) * unit_storage_bits(expert, self.chunk_size, self.head_dim, self.value_group)
                        for count, expert in zip(counts, self.storage_experts))
            bits += 16 * layer.residual_count()
        return bits / 8

    def fp16_bytes(self):
        """Bytes of the same tokens in a binary16 cache."""
        return sum(2 * 2 * layer.tokens_held() * self.num_kv_heads * self.head_dim for layer in self.layers)

    @property
    def routing_seconds(self):
        return self.policy.seconds

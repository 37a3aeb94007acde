"""Sensitivities around a background plan (`dump --background`): `delta_nll[l, h, c, j]` is the change of
the sequence's loss when unit (l, h, c) alone is set to expert j while every other unit sits at its
background expert, so that the signal is measured where the deployed plan puts the model, not at fp16.

The background gives one expert per layer to chunks `frozen..C-1`; the chunks before `frozen` (the one
a router config freezes) and the tail tokens stay at 16 bits. The store's `nll` is then the background's
loss, and a unit's own background expert has delta 0: the trainer's `L_nll = nll + Σ_u delta_u[R_u]`
takes the background as its zero point (docs/FORMATS.md, Sensitivities around a background).

Two estimates:
- `background_taylor_delta`: Taylor at the background point. One forward with every layer's K, V
  replaced by its background value (straight through: the gradient reaches earlier layers as if the
  quantizer were the identity), one backward per weight class; e = Q_j(x) − Q_b(x) for the unit's raw K, V
  x and background expert b, then the taylor rule of sensitivity.py.
- `exact_answer_delta`: the answer tokens' part of the loss measured exactly, every head of a chunk
  raised together (retrieval is redundant across heads, so one head alone barely moves it), split evenly
  over the heads. Taylor is blind there: at fp16 the answer's loss and its gradient are near zero, and
  around a 2-bit background a first-order step of a 2-bit error is far from the real change.
  `background_delta` combines the two: the exact answer part where the answer is at risk, Taylor for
  every other token.
"""
import torch

from .. import MoqaeError
from ..capture import DeferredKV, KVHook, check_all_layers_seen
from ..experts import parse_expert
from ..quantizer import at_sixteen_bits, quantize_keys, quantize_values
from .sensitivity import (RESUMABLE_FAMILIES, _embed, keeping_layer_inputs, loss_weights, resumable_decoder, resumed_layers,
                          taylor_delta, token_nll)

# Below this summed answer NLL (nats) of the background, no unit can lower the answer's loss by more
# (an NLL is never negative): the answer part is left to Taylor and the window costs no extra forwards.
AT_RISK_NATS = 0.01
# Chunks whose raised rows share one resumed pass (from the first one's position): batches of rows.
CHUNKS_PER_PASS = 4


class Background:
    """One expert per layer for chunks `frozen..C-1` (indices into the store's `experts`); earlier chunks
    and the tail at 16 bits, as are a sliding layer's chunks before `first_held[layer]` (not in its cache).
    `spec` is one expert name for every layer or a comma-separated list of one per layer (`int2`,
    `int4,int2,int2,int2`)."""

    def __init__(self, spec, experts, num_layers, chunk, value_group, frozen=1, first_held=None):
        names = spec.split(",")
        if len(names) == 1:
            names = names * num_layers
        if len(names) != num_layers:
            raise MoqaeError(f"--background {spec}: {len(names)} experts for {num_layers} layers")
        per_layer = []
        for name in names:
            expert = parse_expert(name)
            if expert not in experts:
                raise MoqaeError(f"--background {spec}: expert {name} is not one of the store's "
                                 f"({', '.join(e.name for e in experts)})")
            per_layer.append(experts.index(expert))
        self.experts, self.per_layer = experts, per_layer
        self.chunk, self.value_group, self.frozen = chunk, value_group, frozen
        self.first_held = first_held or [0] * num_layers

    @property
    def manifest_field(self):
        return {"experts": [self.experts[m].name for m in self.per_layer], "frozen_chunks": self.frozen}

    def quantized(self, x, expert, is_key):
        e = self.experts[expert]
        return quantize_keys(x, e.key_bits, self.chunk) if is_key else \
            quantize_values(x, e.value_bits, self.chunk, self.value_group)

    def attended(self, layer, key, value):
        """K, V (B, H, T, D) as the background stores them: the layer's expert on the routed chunks."""
        start = max(self.frozen, self.first_held[layer]) * self.chunk
        out = []
        for x, is_key in ((key, True), (value, False)):
            q = self.quantized(x, self.per_layer[layer], is_key)
            out.append(torch.cat([at_sixteen_bits(x[..., :start, :]), q[..., start:, :]], dim=-2))
        return tuple(out)


def background_forward(model, ids, model_dir, background, with_graph=False):
    """One forward over ids (T,) at the background (`with_graph`: keeping the graph for backwards): the NLL
    of every prediction (T − 1,), the raw K, V of every layer (1, H, T, D) and the K, V
    attention read, straight-through so that gradients pass to the raw values."""
    num_layers = model.config.num_hidden_layers
    raw_keys, raw_values, seen_keys, seen_values = {}, {}, {}, {}

    def transform(layer, key, value):
        attended_key, attended_value = background.attended(layer, key.detach(), value.detach())
        raw_keys[layer], raw_values[layer] = key.detach(), value.detach()
        seen_keys[layer] = key + (attended_key - key).detach()
        seen_values[layer] = value + (attended_value - value).detach()
        return seen_keys[layer], seen_values[layer]

    hook = KVHook(transform=transform)
    embeds = _embed(model, ids[None]).detach().requires_grad_(with_graph)
    with hook.active(), torch.set_grad_enabled(with_graph):
        logits = model(inputs_embeds=embeds).logits
    check_all_layers_seen(hook, num_layers, model_dir)
    nll = token_nll(logits[0, :-1], ids[1:].to(logits.device)).double()   # (T − 1,)
    layers = range(num_layers)
    return (nll, [raw_keys[l] for l in layers], [raw_values[l] for l in layers],
            [seen_keys[l] for l in layers], [seen_values[l] for l in layers])


def taylor_by_class(model, ids, experts, chunk, value_group, model_dir, background, weights=None):
    """Taylor around the background, per weight class: the background's loss (weighted mean NLL), every
    layer's raw K and V (H, T, D), and for each distinct weight w the Taylor delta (L, H, C, M) of the
    summed NLL of the tokens of weight w alone (one forward for them all, one backward each)."""
    w = loss_weights(ids.numel(), weights, "cpu")
    nll, keys, values, seen_keys, seen_values = background_forward(model, ids, model_dir, background, with_graph=True)
    L = len(keys)
    raw_keys, raw_values = [k[0].float() for k in keys], [v[0].float() for v in values]
    attended = tuple(zip(*(tuple(x[0].float() for x in background.attended(l, keys[l], values[l])) for l in range(L))))
    by_class, loss, classes = {}, 0.0, w.unique().tolist()
    for index, weight in enumerate(classes):
        summed = (nll * (w == weight).double().to(nll.device)).sum()
        loss += weight * summed.item()
        grads = torch.autograd.grad(summed, seen_keys + seen_values, retain_graph=index + 1 < len(classes))
        by_class[weight] = taylor_delta(raw_keys, raw_values, [g[0].float() for g in grads[:L]],
                                        [g[0].float() for g in grads[L:]], experts, chunk, value_group, 1.0,
                                        attended=attended).double()
    return loss / w.sum().item(), raw_keys, raw_values, by_class


def background_taylor_delta(model, ids, experts, chunk, value_group, model_dir, background, weights=None):
    """Taylor around the background: the background's loss, every layer's raw K and V (H, T, D), and
    delta_nll (L, H, C, M) relative to the background."""
    loss, keys, values, by_class = taylor_by_class(model, ids, experts, chunk, value_group, model_dir, background,
                                                   weights)
    total = loss_weights(ids.numel(), weights, "cpu").sum().item()
    return loss, keys, values, (sum(w * d for w, d in by_class.items()) / total).float()


@torch.no_grad()
def exact_answer_delta(model, ids, experts, chunk, value_group, model_dir, background, answer_slots):
    """The exact change of the summed NLL of the answer predictions `answer_slots` (logit positions, each
    predicting token slot + 1) when chunk c of layer l, in every head together, goes from its background
    expert to expert j: (L, C, M), 0 at the background expert and for chunks before `frozen`; None when
    the background's summed answer NLL is below AT_RISK_NATS (no unit can lower it by more).

    As `exact_delta` does, one background forward keeps every layer's input hidden states and raw K, V;
    the rows (c, j) of CHUNKS_PER_PASS chunks resume together at layer l from the first one's position N·c,
    the last layer attends from the answer positions alone, and only they reach the LM head."""
    decoder = resumable_decoder(model, ids.numel())
    if decoder is None:
        raise MoqaeError(f"{model_dir}: exact answer sensitivities resume the decoder mid-way, which needs a "
                         f"{' or '.join(RESUMABLE_FAMILIES)} model with full attention over the window")
    L, T = model.config.num_hidden_layers, ids.numel()
    with keeping_layer_inputs(decoder, L) as layer_inputs:   # layer → (1, T, hidden): the background's, entering it
        base_nll, keys, values, _, _ = background_forward(model, ids, model_dir, background)
    slots = torch.as_tensor(answer_slots, device=base_nll.device).sort().values
    if base_nll[slots].sum().item() < AT_RISK_NATS:
        return None
    H, C, M = keys[0].shape[1], T // chunk, len(experts)
    targets = ids[1:].to(base_nll.device)
    delta = torch.zeros(L, C, M, dtype=torch.float64)
    for first_layer in range(L):
        own = background.per_layer[first_layer]
        attended = background.attended(first_layer, keys[first_layer], values[first_layer])   # (1, H, T, D) each
        at_background = BackgroundAttention(attended[0][0], attended[1][0])
        for group in range(background.frozen, C, CHUNKS_PER_PASS):
            start = group * chunk
            rows = [(c, m) for c in range(group, min(group + CHUNKS_PER_PASS, C)) for m in range(M) if m != own]
            spans = [slice(c * chunk, (c + 1) * chunk) for c, _ in rows]

            def transform(layer, key, value):
                """Above first_layer, the rows' K, V: the background's earlier positions, then their own. At
                first_layer (below the last, whose answers-only pass needs K, V), the background's attention with
                each row's chunk in every head at the row's expert."""
                if layer == first_layer and layer < L - 1:
                    raw = [torch.stack([x[0][:, span] for span in spans]) for x in (keys[layer], values[layer])]
                    raised = [torch.stack([background.quantized(x[row], m, is_key) for row, (_, m) in enumerate(rows)])
                              for x, is_key in zip(raw, (True, False))]                 # (rows, H, N, D) each
                    old = [torch.stack([x[0][:, span] for span in spans]) for x in attended]
                    return (RaisedChunks(at_background, spans, old, raised),) * 2
                key = torch.cat([keys[layer][:, :, :start].expand(len(rows), -1, -1, -1), key], dim=-2)
                value = torch.cat([values[layer][:, :, :start].expand(len(rows), -1, -1, -1), value], dim=-2)
                attended_key, attended_value = background.attended(layer, key, value)
                if layer == first_layer:
                    for row, (c, m) in enumerate(rows):
                        span = spans[row]
                        attended_key[row, :, span] = background.quantized(key[row, :, span], m, True)
                        attended_value[row, :, span] = background.quantized(value[row, :, span], m, False)
                return attended_key, attended_value

            reached = slots[slots >= start]
            if not reached.numel():
                continue
            hidden = resumed_layers(decoder, layer_inputs[first_layer][:, start:].expand(len(rows), -1, -1), first_layer,
                                    L, start, T, transform, outputs=reached - start)       # (rows, answers, hidden)
            logits = model.lm_head(decoder.norm(hidden))                                     # (rows, answers, V)
            nll = token_nll(logits, targets[reached].expand(len(rows), -1)).double()
            change = (nll - base_nll[reached]).sum(-1)                                      # (rows,)
            for row, (c, m) in enumerate(rows):
                delta[first_layer, c, m] = change[row].item()
    return delta


class BackgroundAttention:
    """One layer's attention at the background, kept as online-softmax terms (float64) for the query positions
    `first..T-1`: each query's largest score m (Hq, n), its sum of exponentials Z (Hq, n) and the unnormalised
    output O (Hq, n, D), computed on first use from the layer's query (Hq, n, D) and attended K, V (H, T, D)."""

    QUERIES_PER_STEP = 256   # bounds the (Hq, step, T) float64 scores

    def __init__(self, key, value):
        self.key, self.value, self.terms, self.first = key, value, None, None

    def from_position(self, query, scaling):
        """(m, Z, O) of the queries at positions T − n..T − 1, query (Hq, n, D) being theirs."""
        T, n = self.key.shape[-2], query.shape[-2]
        if self.terms is None:
            self.first, self.terms = T - n, self._terms(query.double(), scaling, T - n)
        offset = T - n - self.first
        if offset < 0:
            raise MoqaeError(f"background attention kept from position {self.first} was asked from {T - n}")
        return tuple(t[:, offset:] for t in self.terms)

    def _terms(self, query, scaling, first):
        group = query.shape[0] // self.key.shape[0]
        key = self.key.double().repeat_interleave(group, dim=0)        # (Hq, T, D)
        value = self.value.double().repeat_interleave(group, dim=0)
        keys_seen = torch.arange(key.shape[-2])
        m, z, o = [], [], []
        for begin in range(0, query.shape[-2], self.QUERIES_PER_STEP):
            q = query[:, begin:begin + self.QUERIES_PER_STEP]
            sees = keys_seen <= first + begin + torch.arange(q.shape[-2])[:, None]          # (step, T)
            scores = (q @ key.transpose(-1, -2) * scaling).masked_fill(~sees, float("-inf"))  # (Hq, step, T)
            top = scores.amax(-1)
            weights = torch.exp(scores - top[..., None])
            m.append(top), z.append(weights.sum(-1)), o.append(weights @ value)
        return torch.cat(m, 1), torch.cat(z, 1), torch.cat(o, 1)


class RaisedChunks(DeferredKV):
    """What the first resumed layer's transform returns in `exact_answer_delta`: its attention for rows that
    each raise one chunk of N keys and values (every head) from the background, as the background's attention
    (`BackgroundAttention`) less that chunk's old online-softmax terms plus its new ones. Each row then costs
    N scores per query instead of T: the rows' queries are the background's, as their hidden states are."""

    def __init__(self, background_attention, spans, old, new):
        self.background_attention = background_attention
        self.spans = spans            # each row's raised positions
        self.old, self.new = old, new  # (K, V), each (rows, H, N, D): the chunks at the background, and raised

    def attend(self, module, query, attention_mask, scaling):
        """query (rows, Hq, n, D) at positions T − n..T − 1 → the output (rows, n, Hq, D)."""
        scaling = module.scaling if scaling is None else scaling
        top, total, output = self.background_attention.from_position(query[0], scaling)
        n, T = query.shape[-2], self.background_attention.key.shape[-2]
        queries = torch.arange(T - n, T)
        starts = torch.tensor([span.start for span in self.spans])
        sees = starts[:, None, None] + torch.arange(self.old[0].shape[-2]) <= queries[:, None]   # (rows, n, N)
        group = query.shape[1] // self.old[0].shape[1]
        q = query.double()
        for (key, value), sign in ((self.old, -1.0), (self.new, 1.0)):
            key, value = (x.double().repeat_interleave(group, dim=1) for x in (key, value))   # (rows, Hq, N, D)
            scores = q @ key.transpose(-1, -2) * scaling                                      # (rows, Hq, n, N)
            weights = torch.exp(scores - top[..., None]).masked_fill(~sees[:, None], 0.0)
            total = total + sign * weights.sum(-1)
            output = output + sign * (weights @ value)
        return (output / total[..., None]).to(query.dtype).transpose(1, 2).contiguous()

    def materialize(self):
        raise MoqaeError("a raised chunk's attention is computed in place, never handed over as K and V")


def background_delta(model, ids, experts, chunk, value_group, model_dir, background, weights, answer_slots=None):
    """delta_nll (L, H, C, M) around the background, with the background's loss and every layer's raw K
    and V: Taylor for every token, except that the answer tokens' part (the `answer_slots` predictions,
    which share one weight that no other token has) is exact where the answer is at risk (chunks before
    `frozen` keep Taylor: they are never raised). Returns (loss, keys, values, delta, whether the answer
    part is exact)."""
    w = loss_weights(ids.numel(), weights, "cpu")
    loss, keys, values, by_class = taylor_by_class(model, ids, experts, chunk, value_group, model_dir, background,
                                                   weights)
    exact = None
    if answer_slots is not None and len(answer_slots):
        answer = w[answer_slots].unique()
        if answer.numel() != 1 or (w == answer).sum() != len(answer_slots):
            raise MoqaeError("the answer tokens of a window must share one weight that no other token has")
        exact = exact_answer_delta(model, ids, experts, chunk, value_group, model_dir, background, answer_slots)
    if exact is not None:
        answer_weight, H, frozen = answer.item(), keys[0].shape[0], background.frozen
        measured = (exact / H)[:, None].expand(-1, H, -1, -1)                          # (L, H, C, M)
        by_class[answer_weight] = torch.cat([by_class[answer_weight][:, :, :frozen], measured[:, :, frozen:]], dim=2)
    delta = sum(weight * d for weight, d in by_class.items()) / w.sum().item()
    return loss, keys, values, delta.float(), exact is not None

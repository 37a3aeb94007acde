"""Per-unit sensitivities `delta_nll[L, H, C, M]` of one sequence.

The sequence's loss is the weighted mean of its T − 1 token NLLs, Σ_t w_t·nll_t / W with W = Σ_t w_t:
every w_t is 1 (the plain mean) unless the dump weights a task's answer tokens (`--answer-weight`).
With gK, gV the gradients of the summed NLL of the tokens of one weight w with respect to a layer's
post-RoPE K and V, and eK = K̂ − K, eV = V̂ − V over a unit's elements:
- taylor: (1/W) Σ_w w [Σ (gK⊙eK + gV⊙eV) + ½ Σ ((gK⊙eK)² + (gV⊙eV)²)]  (first order + diagonal
  empirical Fisher, per weight class, so that the estimate is linear in the weights as the loss is)
- fisher: the second-order term alone
- exact:  the loss with only that unit quantized, minus the unquantized loss
The 16/16 expert's column is 0 by definition.

Exact sensitivities have two implementations that give the same numbers: `exact_delta_full`, one full
forward per (unit, expert), the reference; and `exact_delta`, which recomputes only what quantizing a
unit changes (layers from the unit's own, positions from the unit's chunk) where the model's decoder is
a plain stack of full-attention layers, and falls back to the reference elsewhere.
"""
import contextlib

import torch
from torch.nn.attention.bias import causal_lower_right

from ..capture import KVHook, check_all_layers_seen
from ..quantizer import quantize_keys, quantize_values

def token_nll(logits, targets):
    """NLL of each target: logits (B, T, V), targets (B, T) → (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets[..., None]).squeeze(-1)


def mean_nll(logits, ids):
    """Mean next-token NLL per batch row: logits (B, T, V), ids (B, T) → (B,)."""
    return token_nll(logits[:, :-1], ids[:, 1:]).mean(dim=-1)


def loss_weights(tokens, weights, device):
    """The token weights w (T − 1,) in float64: all ones when `weights` is None."""
    if weights is None:
        return torch.ones(tokens - 1, dtype=torch.float64, device=device)
    return weights.to(device=device, dtype=torch.float64)


def _embed(model, ids):
    embeddings = model.get_input_embeddings()
    return embeddings(ids.to(embeddings.weight.device))


def forward_with_kv_gradients(model, ids, model_dir, weights=None):
    """One forward and one backward over ids (T,): the loss (the weighted mean NLL; `weights` (T − 1,)
    or None for the plain mean), every layer's K and V (H, T, D) and the gradients of the weighted
    summed NLL Σ_t w_t·nll_t with respect to them."""
    num_layers = model.config.num_hidden_layers
    hook = KVHook(record=True)
    embeds = _embed(model, ids[None]).detach().requires_grad_(True)   # builds the graph with frozen weights
    with hook.active():
        logits = model(inputs_embeds=embeds).logits
    check_all_layers_seen(hook, num_layers, model_dir)
    w = loss_weights(ids.numel(), weights, logits.device)
    weighted_sum = (token_nll(logits[0, :-1], ids[1:].to(logits.device)).double() * w).sum()
    keys = [hook.keys[layer] for layer in range(num_layers)]
    values = [hook.values[layer] for layer in range(num_layers)]
    gradients = torch.autograd.grad(weighted_sum, keys + values)
    return ((weighted_sum / w.sum()).item(), [k[0].detach().float() for k in keys], [v[0].detach().float() for v in values],
            [g[0].float() for g in gradients[:num_layers]], [g[0].float() for g in gradients[num_layers:]])


def weighted_taylor_delta(model, ids, experts, chunk, value_group, model_dir, weights=None, rule="taylor"):
    """The loss, every layer's K and V (H, T, D) and delta_nll (L, H, C, M) by the taylor or fisher rule
    under token weights (T − 1,) (None: the plain mean): one backward per distinct weight."""
    w = loss_weights(ids.numel(), weights, "cpu")
    delta, loss = 0, 0.0
    for weight in w.unique().tolist():
        tokens = (w == weight).double()
        nll, keys, values, grad_keys, grad_values = forward_with_kv_gradients(model, ids, model_dir, tokens)
        delta = delta + weight * taylor_delta(keys, values, grad_keys, grad_values, experts, chunk, value_group, 1.0, rule).double()
        loss += weight * nll * tokens.sum().item()
    total = w.sum().item()
    return loss / total, keys, values, (delta / total).float()


def taylor_delta(keys, values, grad_keys, grad_values, experts, chunk, value_group, total_weight, rule="taylor",
                 attended=None):
    """delta_nll (L, H, C, M) from one backward pass, by the taylor or fisher rule; `total_weight` is
    W = Σ_t w_t (T − 1 for the plain mean). The expansion point is the raw K, V (the 16/16 column is 0),
    or `attended`: the (keys, values) the forward read instead (a background plan's, background.py),
    so that e = K̂_j − attended for every expert."""
    L, (H, T, D) = len(keys), keys[0].shape
    C = T // chunk
    delta = torch.zeros(L, H, C, len(experts), dtype=torch.float64)

    def unit_sum(x):                      # (H, T, D) → (H, C): sums over each whole chunk
        return x[:, : C * chunk].reshape(H, C, chunk * D).double().sum(-1)

    for layer in range(L):
        k, v, gk, gv = keys[layer], values[layer], grad_keys[layer], grad_values[layer]
        point_k, point_v = (k, v) if attended is None else (attended[0][layer], attended[1][layer])
        for m, expert in enumerate(experts):
            if expert.is_unquantized and attended is None:
                continue
            tk = gk * (quantize_keys(k, expert.key_bits, chunk) - point_k)
            tv = gv * (quantize_values(v, expert.value_bits, chunk, value_group) - point_v)
            second = 0.5 * (unit_sum(tk * tk) + unit_sum(tv * tv))
            delta[layer, :, :, m] = second if rule == "fisher" else unit_sum(tk) + unit_sum(tv) + second
    return (delta / total_weight).float()


@torch.no_grad()
def exact_delta_full(model, ids, experts, chunk, value_group, model_dir, weights=None, batch_size=16):
    """One full forward pass per (unit, expert), batched: the loss (weighted mean NLL, `weights` as in
    `forward_with_kv_gradients`), every layer's K and V (H, T, D), and delta_nll (L, H, C, M)."""
    L = model.config.num_hidden_layers
    base_hook = KVHook(record=True)
    targets = ids[None, 1:]
    with base_hook.active():
        base_logits = model(ids[None]).logits
    base_token_nll = token_nll(base_logits[:, :-1], targets.to(base_logits.device))[0]   # (T-1,)
    w = loss_weights(ids.numel(), weights, base_logits.device)
    base = ((base_token_nll.double() * w).sum() / w.sum()).item()
    check_all_layers_seen(base_hook, L, model_dir)
    H, T = base_hook.keys[0].shape[1], ids.numel()
    C = T // chunk
    jobs = [(layer, head, c, m) for layer in range(L) for head in range(H) for c in range(C)
            for m, expert in enumerate(experts) if not expert.is_unquantized]
    delta = torch.zeros(L, H, C, len(experts))
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start: start + batch_size]

        def transform(layer, key, value, batch=batch):
            key, value = key.clone(), value.clone()
            for row, (job_layer, head, c, m) in enumerate(batch):
                if job_layer == layer:
                    span = slice(c * chunk, (c + 1) * chunk)
                    key[row, head, span] = quantize_keys(key[row, head, span], experts[m].key_bits, chunk)
                    value[row, head, span] = quantize_values(value[row, head, span], experts[m].value_bits, chunk, value_group)
            return key, value

        with KVHook(transform=transform).active():
            logits = model(ids[None].expand(len(batch), T)).logits
        change = token_nll(logits[:, :-1], targets.expand(len(batch), -1).to(logits.device)) - base_token_nll
        for row, (layer, head, c, m) in enumerate(batch):
            delta[layer, head, c, m] = ((change[row].double() * w).sum() / w.sum()).item()
    return (base, [base_hook.keys[layer][0].float() for layer in range(L)],
            [base_hook.values[layer][0].float() for layer in range(L)], delta)


# Families whose decoder `exact_delta` can resume at any layer: `model.model.layers` called as
# layer(hidden, attention_mask, position_ids, position_embeddings) → hidden, then `model.model.norm`
# and `model.lm_head`, with nothing else between them and the logits.
RESUMABLE_FAMILIES = ("llama", "qwen2")


def resumable_decoder(model, tokens):
    """The decoder stack when `exact_delta` may resume it mid-way on `tokens`-token sequences, else None.
    Sliding-window layers are full attention while a sequence fits their window."""
    config, decoder = model.config, getattr(model, "model", None)
    window = getattr(config, "sliding_window", None)
    if (config.model_type not in RESUMABLE_FAMILIES or decoder is None or not hasattr(decoder, "rotary_emb")
            or (window is not None and tokens > window and getattr(config, "use_sliding_window", True))):
        return None
    return decoder


@contextlib.contextmanager
def keeping_layer_inputs(decoder, num_layers):
    """Inside, forwards record each decoder layer's input hidden states: yields {layer: (B, T, hidden)}."""
    inputs = {}

    def keep(module, args, kwargs):
        inputs[module.self_attn.layer_idx] = args[0] if args else kwargs["hidden_states"]

    handles = [layer.register_forward_pre_hook(keep, with_kwargs=True) for layer in decoder.layers[:num_layers]]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


class _KeysTaken(Exception):
    """Raised by `layer_kv` once the layer's attention has been handed its K and V."""


def layer_kv(layer, hidden, positions, position_embeddings):
    """The post-RoPE K, V (rows, H, n, D) that a decoder layer computes from hidden (rows, n, hidden) at
    positions: its own projections, norms and rotary, stopped before it attends."""
    taken = {}

    def take(_, key, value):
        taken["kv"] = (key, value)
        raise _KeysTaken

    with KVHook(transform=take).active():
        try:
            layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=position_embeddings)
        except _KeysTaken:
            pass
    return taken["kv"]


def resumed_layers(decoder, hidden, first_layer, num_layers, start, total, transform, outputs=None):
    """Layers first_layer..num_layers−1 of the decoder over hidden (rows, total − start, hidden), the states of
    positions start..total−1, each layer's K, V through `transform` (which prepends the earlier positions'):
    the last layer's output, (rows, total − start, hidden), or with `outputs` (indices into those positions)
    only theirs, (rows, len(outputs), hidden): the last layer then attends from those queries alone."""
    positions = torch.arange(start, total, device=hidden.device)[None]
    position_embeddings = decoder.rotary_emb(hidden, positions)
    # Query i (position start + i) sees keys 0..start + i: causal aligned to the last key.
    mask = None if start == 0 else causal_lower_right(total - start, total)
    last = num_layers - 1 if outputs is not None else num_layers
    with KVHook(transform=transform).active():
        for layer in decoder.layers[first_layer:last]:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings)
    if outputs is None:
        return hidden
    layer = decoder.layers[last]
    attended = transform(last, *layer_kv(layer, hidden, positions, position_embeddings))
    queries = positions[:, outputs]
    sees = torch.arange(total, device=hidden.device) <= queries[0, :, None]            # (outputs, total)
    with KVHook(transform=lambda *_: attended).active():
        return layer(hidden[:, outputs], attention_mask=sees[None, None], position_ids=queries,
                     position_embeddings=tuple(e[:, outputs] for e in position_embeddings))


@torch.no_grad()
def exact_delta(model, ids, experts, chunk, value_group, model_dir, weights=None):
    """Exact delta_nll with only the changed part recomputed: the loss, every layer's K and V
    (H, T, D), and delta_nll (L, H, C, M), equal to `exact_delta_full`'s up to float rounding.

    Quantizing unit (l, h, c) changes nothing before layer l and nothing at positions before N·c, so
    one base forward keeps every layer's input hidden states and K, V; then, for each (l, c), the rows
    (h, m) of every head and quantized expert resume at layer l from the base hidden states of
    positions ≥ N·c. Attention reads the base K, V of earlier positions, and at layer l the base K, V
    with chunk c of the row's head quantized (the row's own K, V there equal the base ones). The
    unit's delta is the change of the weighted summed NLL of the recomputed positions over W.
    """
    decoder = resumable_decoder(model, ids.numel())
    if decoder is None:
        return exact_delta_full(model, ids, experts, chunk, value_group, model_dir, weights)
    L = model.config.num_hidden_layers
    base_hook = KVHook(record=True)
    with keeping_layer_inputs(decoder, L) as layer_inputs, base_hook.active():   # layer → (1, T, hidden) entering it
        base_logits = model(ids[None]).logits
    check_all_layers_seen(base_hook, L, model_dir)
    targets = ids[None, 1:].to(base_logits.device)
    base_token_nll = token_nll(base_logits[:, :-1], targets)[0]   # (T-1,)
    w = loss_weights(ids.numel(), weights, base_logits.device)
    keys = [base_hook.keys[layer] for layer in range(L)]      # (1, H, T, D) each
    values = [base_hook.values[layer] for layer in range(L)]
    H, T = keys[0].shape[1], ids.numel()
    C = T // chunk
    rows = [(head, m) for head in range(H) for m, expert in enumerate(experts) if not expert.is_unquantized]
    delta = torch.zeros(L, H, C, len(experts))
    for first_layer in range(L):
        for c in range(C):
            start, span = c * chunk, slice(c * chunk, (c + 1) * chunk)

            def transform(layer, key, value):
                """At first_layer: the base K, V with each row's unit quantized. Above it: the base K, V of
                positions < start, then the row's own."""
                if layer == first_layer:
                    key = keys[layer].expand(len(rows), -1, -1, -1).clone()
                    value = values[layer].expand(len(rows), -1, -1, -1).clone()
                    for row, (head, m) in enumerate(rows):
                        key[row, head, span] = quantize_keys(key[row, head, span], experts[m].key_bits, chunk)
                        value[row, head, span] = quantize_values(value[row, head, span], experts[m].value_bits,
                                                                 chunk, value_group)
                    return key, value
                return (torch.cat([keys[layer][:, :, :start].expand(len(rows), -1, -1, -1), key], dim=-2),
                        torch.cat([values[layer][:, :, :start].expand(len(rows), -1, -1, -1), value], dim=-2))

            hidden = resumed_layers(decoder, layer_inputs[first_layer][:, start:].expand(len(rows), -1, -1), first_layer,
                                    L, start, T, transform)
            logits = model.lm_head(decoder.norm(hidden))
            change = token_nll(logits[:, :-1], targets[:, start:].expand(len(rows), -1)) - base_token_nll[start:]
            for row, (head, m) in enumerate(rows):
                delta[first_layer, head, c, m] = ((change[row].double() * w[start:]).sum() / w.sum()).item()
    base = ((base_token_nll.double() * w).sum() / w.sum()).item()
    return (base, [k[0].float() for k in keys], [v[0].float() for v in values], delta)

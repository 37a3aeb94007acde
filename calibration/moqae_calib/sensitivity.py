"""Per-unit sensitivities `delta_nll[L, H, C, M]` of one sequence.

With gK, gV the gradients of the sequence's summed NLL with respect to a layer's post-RoPE K and V,
and eK = K̂ − K, eV = V̂ − V over a unit's elements:
- taylor: (1/(T−1)) [Σ (gK⊙eK + gV⊙eV) + ½ Σ ((gK⊙eK)² + (gV⊙eV)²)]  (first order + diagonal empirical Fisher)
- fisher: the second-order term alone
- exact:  mean NLL with only that unit quantized, minus the unquantized mean NLL
The 16/16 expert's column is 0 by definition.
"""
import torch

from .capture import KVHook, check_all_layers_seen
from .quantizer import quantize_keys, quantize_values

def mean_nll(logits, ids):
    """Mean next-token NLL per batch row: logits (B, T, V), ids (B, T) → (B,)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(dim=-1)


def _embed(model, ids):
    embeddings = model.get_input_embeddings()
    return embeddings(ids.to(embeddings.weight.device))


def forward_with_kv_gradients(model, ids, model_dir):
    """One forward and one backward over ids (T,): the mean NLL, every layer's K and V (H, T, D) and
    the gradients of the summed NLL with respect to them."""
    num_layers = model.config.num_hidden_layers
    hook = KVHook(record=True)
    embeds = _embed(model, ids[None]).detach().requires_grad_(True)   # builds the graph with frozen weights
    with hook.active():
        logits = model(inputs_embeds=embeds).logits
    check_all_layers_seen(hook, num_layers, model_dir)
    nll = mean_nll(logits, ids[None].to(logits.device))[0]
    keys = [hook.keys[layer] for layer in range(num_layers)]
    values = [hook.values[layer] for layer in range(num_layers)]
    gradients = torch.autograd.grad(nll * (ids.numel() - 1), keys + values)
    return (nll.item(), [k[0].detach().float() for k in keys], [v[0].detach().float() for v in values],
            [g[0].float() for g in gradients[:num_layers]], [g[0].float() for g in gradients[num_layers:]])


def taylor_delta(keys, values, grad_keys, grad_values, experts, chunk, value_group, tokens, rule="taylor"):
    """delta_nll (L, H, C, M) from one backward pass, by the taylor or fisher rule."""
    L, (H, T, D) = len(keys), keys[0].shape
    C = T // chunk
    delta = torch.zeros(L, H, C, len(experts), dtype=torch.float64)

    def unit_sum(x):                      # (H, T, D) → (H, C): sums over each whole chunk
        return x[:, : C * chunk].reshape(H, C, chunk * D).double().sum(-1)

    for layer in range(L):
        k, v, gk, gv = keys[layer], values[layer], grad_keys[layer], grad_values[layer]
        for m, expert in enumerate(experts):
            if expert.is_unquantized:
                continue
            tk = gk * (quantize_keys(k, expert.key_bits, chunk) - k)
            tv = gv * (quantize_values(v, expert.value_bits, chunk, value_group) - v)
            second = 0.5 * (unit_sum(tk * tk) + unit_sum(tv * tv))
            delta[layer, :, :, m] = second if rule == "fisher" else unit_sum(tk) + unit_sum(tv) + second
    return (delta / (tokens - 1)).float()


@torch.no_grad()
def exact_delta(model, ids, experts, chunk, value_group, model_dir, batch_size=16):
    """One forward pass per (unit, expert), batched: the mean NLL, every layer's K and V (H, T, D), and
    delta_nll (L, H, C, M)."""
    L = model.config.num_hidden_layers
    base_hook = KVHook(record=True)
    with base_hook.active():
        base = mean_nll(model(ids[None]).logits, ids[None].to(model.device))[0].item()
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
            batch_ids = ids[None].expand(len(batch), T)
            nll = mean_nll(model(batch_ids).logits, batch_ids.to(model.device))
        for row, (layer, head, c, m) in enumerate(batch):
            delta[layer, head, c, m] = nll[row].item() - base
    return (base, [base_hook.keys[layer][0].float() for layer in range(L)],
            [base_hook.values[layer][0].float() for layer in range(L)], delta)

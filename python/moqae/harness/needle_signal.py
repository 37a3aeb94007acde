"""`needle-signal`: does a pass-key store's `delta_nll` see the needle? Per store and layer, over the store's
needle windows of one split: how the gain of int4 over int2 (`delta_nll[int2] − delta_nll[int4]`, every
head) ranks the units that hold the key against the others (AUC), how often the window's largest gain
(summed over heads) is a key chunk, and, with the model, what that signal buys when deployed: every
routed unit at int2 but the top chunk of each layer at int4, the pass-key accuracy beside uniform int2.

The needle windows are rebuilt as the dump built them (the manifest's corpus.passkey seed and fraction),
so the key's position is known; nothing here is fitted.
"""
import os

import torch

from .. import MoqaeError
from ..calibrate.dump import with_needles
from ..corpus import read_texts, tokenizer_for, windows as split_windows
from ..experts import parse_expert
from ..files import read_json_file
from ..model import load_model, model_shape
from ..selection import unit_value
from ..store import MANIFEST, MANIFEST_LIMIT, Store
from ..tasks import TaskWindows, passkey_windows, wilson_interval
from ..evaluate.plans import Layout, UniformPlan, UnitPlan
from ..evaluate.scoring import auc, evaluate_plan


def needle_task(store, corpus, tokenizer, split):
    """The store's needle windows in `split` = (low, high) of u(id): their sequences and a TaskWindows."""
    root = read_json_file(os.path.join(store.directory, MANIFEST), MANIFEST_LIMIT)
    passkey = root.get("corpus", {}).get("passkey")
    if not passkey:
        raise MoqaeError(f"{store.directory}: not a pass-key store (its manifest has no corpus.passkey)")
    texts = read_texts([corpus])
    plain = split_windows(texts, tokenizer, store.manifest.seq_len)
    if plain.shape[0] != store.manifest.num_sequences:
        raise MoqaeError(f"{corpus}: {plain.shape[0]} windows of {store.manifest.seq_len} tokens, the store was dumped "
                         f"from a corpus of {store.manifest.num_sequences}: not its corpus")
    ids, _, slots = with_needles(plain, "".join(texts), tokenizer, passkey["fraction"], passkey["seed"])
    needles = passkey_windows("".join(texts), tokenizer, store.manifest.seq_len, plain.shape[0], passkey["seed"])
    seed = store.manifest.selection_seed
    sequences = [s for s in store.manifest.sequences
                 if s.id in slots and split[0] <= unit_value(s.id, seed) < split[1]]
    if not sequences:
        raise MoqaeError(f"{store.directory}: no needle window with u in [{split[0]}, {split[1]})")
    rows = torch.tensor([s.id for s in sequences])
    task = TaskWindows(ids[rows], needles.answer_positions[rows], needles.key_spans[rows], needles.depths[rows],
                       [needles.keys[r] for r in rows.tolist()])
    return sequences, task


def key_chunk_mask(span, chunks, chunk_size):
    mask = torch.zeros(chunks, dtype=torch.bool)
    mask[span[0] // chunk_size: (span[1] - 1) // chunk_size + 1] = True
    return mask


def needle_signal(stores, corpus, *, model=None, tokenizer="bytes", split=(0.0, 1.0), frozen=1):
    """The report for every store (a Markdown table), printed and returned."""
    lines = []
    for directory in stores:
        store = Store(directory)
        manifest = store.manifest
        experts = manifest.experts
        names = [e.name for e in experts]
        if "int4" not in names or "int2" not in names:
            raise MoqaeError(f"{directory}: needs experts int4 and int2, has {', '.join(names)}")
        high, low = names.index("int4"), names.index("int2")
        encoder = tokenizer_for(tokenizer, model or "")
        sequences, task = needle_task(store, corpus, encoder, split)
        L, H, N = manifest.model.num_layers, manifest.model.num_kv_heads, manifest.chunk_size
        C = manifest.seq_len // N
        key_gain, other_gain = [[] for _ in range(L)], [[] for _ in range(L)]
        top_is_key = torch.zeros(L)
        decisions = {}
        for w, sequence in enumerate(sequences):
            delta = store.tensor(sequence, "delta_nll").double()                 # (L, H, C, M)
            gain = (delta[..., low] - delta[..., high])[:, :, frozen:]           # (L, H, routed)
            keys = key_chunk_mask(task.key_spans[w].tolist(), C, N)[frozen:]
            top = gain.sum(1).argmax(-1)                                          # (L,)
            plan = torch.ones(L, H, C - frozen, dtype=torch.long)                 # 0 = int4, 1 = int2
            for layer in range(L):
                key_gain[layer] += gain[layer][:, keys].flatten().tolist()
                other_gain[layer] += gain[layer][:, ~keys].flatten().tolist()
                top_is_key[layer] += float(keys[top[layer]])
                plan[layer, :, top[layer]] = 0
            decisions[w] = plan
        lines += [f"### {directory} ({manifest.sensitivity}, around "
                  f"{','.join(manifest.background['experts']) if manifest.background else 'fp16'}): "
                  f"{len(sequences)} needle windows, u in [{split[0]}, {split[1]})", "",
                  "| layer | AUC key vs other units | window's top chunk is the key | median key gain / median other |",
                  "|---|---|---|---|"]
        for layer in range(L):
            ratio = torch.tensor(key_gain[layer]).median() / torch.tensor(other_gain[layer]).median()
            lines.append(f"| {layer} | {auc(key_gain[layer], other_gain[layer]):.3f} | "
                         f"{int(top_is_key[layer])}/{len(sequences)} | {ratio:.2f} |")
        if model:
            lm = load_model(model, "cpu", None, "float32")
            _, _, head_dim, _ = model_shape(lm.config)
            layout = Layout(manifest.seq_len, N, frozen, L, H, head_dim, manifest.value_group, manifest.first_held_chunks)
            pair = [parse_expert("int4"), parse_expert("int2")]
            for plan in (UniformPlan(pair[1]), UnitPlan(pair, decisions, "int2, the top chunk of each layer at int4")):
                result = evaluate_plan(lm, task.ids, plan, layout, 8, model, progress=False, task=task)
                correct = sum(result.correct)
                low_ci, high_ci = wilson_interval(correct, len(result.correct))
                lines.append(f"\n{plan.name}: {correct}/{len(result.correct)} keys ({100 * low_ci:.0f}–{100 * high_ci:.0f}%), "
                             f"{result.summary(1)['payload_bits']:.3f} payload bits")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    return text

"""Scoring a plan: forward passes over every evaluation window with K and V fake-quantized by the plan;
perplexity, the memory it holds (payload and with constants) and, for a task, its exact answers; and
the paired difference of two plans over the same windows.
"""
import math
import os

import torch
from tqdm import tqdm

from ..calibrate.sensitivity import mean_nll
from ..capture import KVHook, check_all_layers_seen
from ..quantizer import unit_storage_bits
from ..tasks import answer_correct, wilson_interval
from .plans import apply_plan


def kv_memory_bits(layout, experts, layer_units, windows):
    """Average bits per K and V element over `windows` windows, as (payload, with quantization constants):
    `layer_units[m]` routed (layer, head, chunk) units at `experts[m]`, every other element the cache holds at
    16 bits (a sliding layer's chunks before its first held one are not held: `Layout.held_elements`).
    The trainer's `BitsTally.memory` computes the same; python/tests/test_memory_accounting.py checks the two agree."""
    unit_elements = 2 * layout.chunk_size * layout.head_dim
    total_elements = windows * layout.held_elements()
    rest = (total_elements - sum(layer_units) * unit_elements) * 16
    payload = sum(units * unit_elements * (e.key_bits + e.value_bits) / 2 for units, e in zip(layer_units, experts))
    constants = sum(units * unit_storage_bits(e, layout.chunk_size, layout.head_dim, layout.value_group)
                    for units, e in zip(layer_units, experts))
    return (payload + rest) / total_elements, (constants + rest) / total_elements


class Result:
    """Perplexity and memory of one plan over the evaluation windows and, for a task, its answers."""

    def __init__(self, name, experts, layout, windows, note=None, task=None):
        self.name, self.experts, self.layout, self.windows, self.note, self.task = name, experts, layout, windows, note, task
        self.nll_sum, self.tokens = 0.0, 0
        self.window_nll = []   # mean NLL of each window, in window order
        self.correct = []      # task: whether each window's answer was exact, in window order
        self.key_bits = torch.full((windows,), 16.0)   # task: fewest average bits any unit holding the key got
        self.counts = torch.zeros(layout.num_layers, len(experts), dtype=torch.long)   # routed units per layer, expert
        # task: per layer, of the routed units holding the key and of every other routed unit of windows that
        # hold one: how many, how many above 2 bits, and the router's keep probabilities (RouterPlan only)
        self.content = [{"key": [0, 0], "other": [0, 0], "key_scores": [], "other_scores": []}
                        for _ in range(layout.num_layers)]

    @property
    def nll(self):
        return self.nll_sum / self.tokens

    def summary(self, bytes_per_token=None):
        units = self.counts.sum(0).double()
        payload_bits, bits_with_constants = kv_memory_bits(self.layout, self.experts, units.tolist(), self.windows)
        out = {"name": self.name, "perplexity": math.exp(self.nll), "nll": self.nll,
               "payload_bits": payload_bits, "bits_with_constants": bits_with_constants,
               "experts": [e.name for e in self.experts],
               "expert_fractions": (units / max(1.0, units.sum().item())).tolist(),
               "decisions_per_layer": self.counts.tolist()}
        out["kv_fraction_of_fp16"] = out["bits_with_constants"] / 16
        if bytes_per_token:
            out["bits_per_byte"] = self.nll / math.log(2) / bytes_per_token
        if self.note:
            out["diagnostic"], out["note"] = True, self.note
        if self.task is not None:
            out["task"] = self.task_summary()
        return out

    def task_summary(self):
        """Accuracy with its Wilson interval, by depth decile of the answer's source, and by whether the
        units holding the source went to 2 bits or fewer (windows whose answer has no source in the
        context count in neither)."""
        correct = torch.tensor(self.correct, dtype=torch.bool)
        located = self.task.key_spans[:, 0] >= 0

        def accuracy(mask):
            n, k = int(mask.sum()), int(correct[mask].sum())
            return {"windows": n, "correct": k, "accuracy": k / n if n else None, "wilson95": list(wilson_interval(k, n))}

        deciles = (self.task.depths.nan_to_num(-1) * 10).long().clamp(-1, 9)
        return {"name": self.task.name, **accuracy(torch.ones_like(correct)),
                "by_depth_decile": [accuracy(deciles == d) for d in range(10)],
                "key_at_2_bits_or_fewer": accuracy(located & (self.key_bits <= 2)),
                "key_above_2_bits": accuracy(located & (self.key_bits > 2)),
                "content_by_layer": [content_summary(layer) for layer in self.content]}


def auc(positive, negative):
    """P(a positive scores above a negative), ties counting half; None without both."""
    if not positive or not negative:
        return None
    pos, neg = torch.tensor(positive, dtype=torch.float64), torch.sort(torch.tensor(negative, dtype=torch.float64)).values
    below = torch.searchsorted(neg, pos, right=False).double()
    ties = torch.searchsorted(neg, pos, right=True).double() - below
    return ((below + 0.5 * ties).sum() / (pos.numel() * neg.numel())).item()


def content_summary(tally):
    """One layer's evidence of content: the shares of key and other units kept above 2 bits, and the AUC of
    the router's keep probability separating key units from the others."""
    def share(counts):
        return counts[1] / counts[0] if counts[0] else None
    return {"key_units": tally["key"][0], "key_above_2_bits": share(tally["key"]),
            "other_units": tally["other"][0], "other_above_2_bits": share(tally["other"]),
            "keep_auc": auc(tally["key_scores"], tally["other_scores"])}


def tally_content(result, layer, unit_bits, key_chunks, scores):
    """Adds one window's routed units of a layer to the content tally: unit_bits (H, routed), key_chunks a
    bool (routed,) mask of the chunks holding the key, scores (H, routed) or None."""
    tally = result.content[layer]
    for name, mask in (("key", key_chunks), ("other", ~key_chunks)):
        bits = unit_bits[:, mask]
        tally[name][0] += bits.numel()
        tally[name][1] += int((bits > 2).sum())
        if scores is not None:
            tally[f"{name}_scores"] += scores[:, mask].flatten().tolist()


def evaluate_plan(model, windows, plan, layout, batch_size, model_dir, progress=True, task=None):
    """Forward passes over every window with the plan applied; returns a Result. With a task (its `ids`
    are the windows), also whether each window's answer is exact and the bits the key was stored at."""
    result = Result(plan.name, plan.experts, layout, len(windows), plan.note, task)
    expert_bits = torch.tensor([(e.key_bits + e.value_bits) / 2 for e in plan.experts])
    state = {}

    def transform(layer, key, value):
        decisions = plan.decide(layer, key, value, state["windows"], layout)
        skipped = layout.skipped(layer)   # routed chunks the layer's cache does not hold: not counted
        held = layout.routed - skipped
        kept = None if decisions is None else decisions[..., skipped:].cpu()   # (B, H, held)
        if kept is None:
            result.counts[layer, 0] += key.shape[0] * key.shape[1] * held
        else:
            result.counts[layer] += torch.bincount(kept.flatten(), minlength=len(plan.experts))
        if task is not None:
            unit_bits = expert_bits[0].expand(key.shape[0], key.shape[1], held) if kept is None else expert_bits[kept]
            scores = getattr(plan, "keep_scores", None)
            for row, window in enumerate(state["windows"]):
                if task.key_spans[window, 0] < 0:
                    continue
                first, last = (task.key_spans[window] - torch.tensor([0, 1])) // layout.chunk_size - layout.first - skipped
                routed = unit_bits[row, :, max(first, 0): min(last + 1, held)]
                if routed.numel():
                    result.key_bits[window] = min(result.key_bits[window], routed.min())
                key_chunks = torch.zeros(held, dtype=torch.bool)
                key_chunks[max(first, 0): min(last + 1, held)] = True
                tally_content(result, layer, unit_bits[row], key_chunks,
                              None if scores is None else scores[row][..., skipped:])
        return apply_plan(key, value, decisions, plan.experts, layout, layer)

    hook = KVHook(transform=transform)
    bar = tqdm(total=len(windows), unit="window", desc=plan.name, disable=not progress, dynamic_ncols=True,
               mininterval=0.1 if os.isatty(2) else 30, leave=False)
    with torch.no_grad(), hook.active():
        for start in range(0, len(windows), batch_size):
            ids = windows[start: start + batch_size].to(model.device)
            state["windows"] = list(range(start, start + ids.shape[0]))
            logits = model(ids).logits
            nll = mean_nll(logits, ids)
            result.window_nll += nll.double().tolist()
            result.nll_sum += nll.double().sum().item() * (ids.shape[1] - 1)
            result.tokens += ids.numel() - ids.shape[0]
            if task is not None:
                result.correct += answer_correct(logits, ids, task.answer_positions[start: start + ids.shape[0]]).tolist()
            bar.update(ids.shape[0])
    bar.close()
    check_all_layers_seen(hook, layout.num_layers, model_dir)
    return result


def paired_difference(a, b, fp16_value, bytes_per_token=None):
    """`a` minus `b` over the same windows: the mean of per-window differences (bits per byte when
    `bytes_per_token` is given, else nats per token), its 95% confidence interval (normal
    approximation), and both as a percentage of fp16's figure `fp16_value` in the same unit."""
    scale = 1 / math.log(2) / bytes_per_token if bytes_per_token else 1.0
    differences = torch.tensor(a.window_nll, dtype=torch.float64) - torch.tensor(b.window_nll, dtype=torch.float64)
    differences *= scale
    n = differences.numel()
    mean = differences.mean().item()
    half = 1.96 * (differences.std().item() / math.sqrt(n) if n > 1 else 0.0)
    verdict = (f"{a.name} is better" if mean + half < 0 else f"{b.name} is better" if mean - half > 0
               else "no clear difference")
    return {"a": a.name, "b": b.name, "unit": "bits_per_byte" if bytes_per_token else "nll", "windows": n,
            "mean": mean, "ci95": [mean - half, mean + half], "percent_of_fp16": 100 * mean / fp16_value,
            "ci95_percent_of_fp16": [100 * (mean - half) / fp16_value, 100 * (mean + half) / fp16_value],
            "verdict": verdict}

"""Diagnostics no inference-time router could be, each with a note that says why: the prescient plan
(the evaluated text's own Taylor sensitivities) and the source-aware plan (where a task's answer lies).
"""
import os

import torch
from tqdm import tqdm

from ..calibrate.sensitivity import forward_with_kv_gradients, taylor_delta
from ..experts import parse_expert
from .allocation import held_allocation, routed_unit_bits
from .plans import UnitPlan


def taylor_sensitivities(model, windows, experts, layout, model_dir, progress=True):
    """Taylor delta_nll of every whole chunk of every window: (windows, L, H, C, M). Chunk 0 is kept,
    so that routers that freeze it and routers that route it can share them."""
    deltas = []
    bar = tqdm(total=len(windows), unit="window", desc="prescient sensitivities", disable=not progress,
               dynamic_ncols=True, mininterval=0.1 if os.isatty(2) else 30, leave=False)
    for ids in windows:
        nll, keys, values, grad_keys, grad_values = forward_with_kv_gradients(model, ids.to(model.device), model_dir)
        delta = taylor_delta(keys, values, grad_keys, grad_values, experts, layout.chunk_size, layout.value_group, ids.numel() - 1)
        deltas.append(delta[:, :, : layout.chunks])
        bar.update(1)
    bar.close()
    return torch.stack(deltas)


PRESCIENT_NOTE = ("prescient: picks per unit with the evaluated text's own Taylor sensitivities, which exist only "
                  "after that text has been scored with gradients; no router can see them (a diagnostic, not a target)")


def prescient_plan(deltas, experts, layout, budget_per_unit):
    """The best per-(layer, head, chunk) allocation under the sensitivities of the evaluation windows
    themselves, with mean unit bits (with constants) within `budget_per_unit`: it sees the answers, so
    it is a diagnostic. deltas: (windows, L, H, C, M) from `taylor_sensitivities`."""
    deltas = deltas[:, :, :, layout.first:]
    decisions = held_allocation(deltas, layout.held_mask()[:, None], routed_unit_bits(experts, layout), budget_per_unit)
    return UnitPlan(experts, {w: decisions[w] for w in range(deltas.shape[0])},
                    "prescient (gradients of the evaluated text)", note=PRESCIENT_NOTE)


SOURCE_AWARE_NOTE = ("source-aware: knows where each window's answer source (the key) lies, which only the task's "
                     "construction tells; it shows what reading content could buy (a diagnostic, not a target)")


def source_aware_plan(task, layout, high="int4", low="int2"):
    """Every unit at `low` but, in every layer and head, the chunks holding the answer's source and the
    last two routed chunks (the question) at `high`."""
    experts = [parse_expert(high), parse_expert(low)]
    decisions = {}
    for window in range(task.ids.shape[0]):
        plan = torch.ones(layout.num_layers, layout.num_heads, layout.routed, dtype=torch.long)
        plan[..., -2:] = 0
        first, end = task.key_spans[window].tolist()
        if first >= 0:
            chunks = slice(max(first // layout.chunk_size - layout.first, 0), max((end - 1) // layout.chunk_size - layout.first + 1, 0))
            plan[..., chunks] = 0
        decisions[window] = plan
    return UnitPlan(experts, decisions, f"source-aware ({high} on the key and question chunks, {low} elsewhere)",
                    note=SOURCE_AWARE_NOTE)

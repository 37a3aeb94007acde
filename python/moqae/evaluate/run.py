"""`eval`: real perplexity of a model whose KV cache follows a plan, for the router and the baselines.

A plan decides an expert for every unit (layer, KV head, routed chunk) of every window; the first chunk
(when the router freezes it) and the tail tokens stay at 16 bits, as does everything a plan leaves
unquantized (rounded to binary16, which is how a cache stores 16 bits). Every plan is scored by a
forward pass over every window of the evaluation text with its K and V fake-quantized by the shared
quantizer.
"""
import json
import math
import os

import torch
from safetensors import safe_open
from tqdm import tqdm

from . import CalibError
from .capture import KVHook, RouterInputs, check_all_layers_seen, check_export_fits
from .corpus import ByteTokenizer, HFTokenizer, read_texts, windows
from .dump import check_model_dir, load_model, model_shape, resolve_device
from .experts import Expert, parse_expert
from .quantizer import quantize_keys, quantize_values, unit_storage_bits
from .passkey import answer_correct, task_windows, wilson_interval
from .router import read_export, route
from .selection import unit_value
from .sensitivity import forward_with_kv_gradients, mean_nll, taylor_delta


class Layout:
    """Which tokens are routed: chunks `first..C-1` of every window of `tokens` tokens."""

    def __init__(self, tokens, chunk_size, first, num_layers, num_heads, head_dim, value_group):
        self.tokens, self.chunk_size, self.first = tokens, chunk_size, first
        self.chunks = tokens // chunk_size
        self.routed = self.chunks - first
        self.num_layers, self.num_heads, self.head_dim, self.value_group = num_layers, num_heads, head_dim, value_group
        self.region = slice(first * chunk_size, self.chunks * chunk_size)


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

    def decide(self, layer, key, value, windows, layout):
        router = self.export.router_of_layer(layer)
        if layer == self.export.leader(router):
            self.cached = route(self.export, router, self.inputs(key, value)).cpu()
        return self.cached


class UnitPlan(Plan):
    """Fixed decisions per window: `decisions[window]` is (L, H, routed chunks)."""

    def __init__(self, experts, decisions, name, note=None):
        super().__init__(experts)
        self.decisions, self.name, self.note = decisions, name, note

    def decide(self, layer, key, value, windows, layout):
        return torch.stack([self.decisions[w][layer] for w in windows])


def apply_plan(key, value, decisions, experts, layout):
    """Fake-quantizes K, V (B, H, T, D) by per-unit decisions (B, H, routed) (None: all at expert 0)."""
    out_k, out_v = key.half().to(key.dtype), value.half().to(value.dtype)
    region, N = layout.region, layout.chunk_size
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


class Result:
    """Perplexity and memory of one plan over the evaluation windows and, for a task, its answers."""

    def __init__(self, name, experts, layout, windows, note=None, task=None):
        self.name, self.experts, self.layout, self.windows, self.note, self.task = name, experts, layout, windows, note, task
        self.nll_sum, self.tokens = 0.0, 0
        self.window_nll = []   # mean NLL of each window, in window order
        self.correct = []      # task: whether each window's answer was exact, in window order
        self.key_bits = torch.full((windows,), 16.0)   # task: fewest average bits any unit holding the key got
        self.counts = torch.zeros(layout.num_layers, len(experts), dtype=torch.long)   # routed units per layer, expert

    @property
    def nll(self):
        return self.nll_sum / self.tokens

    def summary(self, bytes_per_token=None):
        lay = self.layout
        unit_elements = 2 * lay.chunk_size * lay.head_dim
        total_elements = self.windows * lay.num_layers * lay.num_heads * lay.tokens * lay.head_dim * 2
        units = self.counts.sum(0).double()
        routed_elements = units.sum().item() * unit_elements
        payload = sum(units[m].item() * unit_elements * (e.key_bits + e.value_bits) / 2 for m, e in enumerate(self.experts))
        constants = sum(units[m].item() * unit_storage_bits(e, lay.chunk_size, lay.head_dim, lay.value_group)
                        for m, e in enumerate(self.experts))
        rest = (total_elements - routed_elements) * 16
        out = {"name": self.name, "perplexity": math.exp(self.nll), "nll": self.nll,
               "payload_bits": (payload + rest) / total_elements, "bits_with_constants": (constants + rest) / total_elements,
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
                "key_above_2_bits": accuracy(located & (self.key_bits > 2))}


def evaluate_plan(model, windows, plan, layout, batch_size, model_dir, progress=True, task=None):
    """Forward passes over every window with the plan applied; returns a Result. With a task (its `ids`
    are the windows), also whether each window's answer is exact and the bits the key was stored at."""
    result = Result(plan.name, plan.experts, layout, len(windows), plan.note, task)
    expert_bits = torch.tensor([(e.key_bits + e.value_bits) / 2 for e in plan.experts])
    state = {}

    def transform(layer, key, value):
        decisions = plan.decide(layer, key, value, state["windows"], layout)
        if decisions is None:
            result.counts[layer, 0] += key.shape[0] * key.shape[1] * layout.routed
        else:
            result.counts[layer] += torch.bincount(decisions.flatten().cpu(), minlength=len(plan.experts))
        if task is not None:
            unit_bits = expert_bits[0].expand(key.shape[0], key.shape[1], layout.routed) if decisions is None \
                else expert_bits[decisions.cpu()]
            for row, window in enumerate(state["windows"]):
                if task.key_spans[window, 0] < 0:
                    continue
                first, last = (task.key_spans[window] - torch.tensor([0, 1])) // layout.chunk_size - layout.first
                routed = unit_bits[row, :, max(first, 0): min(last + 1, layout.routed)]
                if routed.numel():
                    result.key_bits[window] = min(result.key_bits[window], routed.min())
        return apply_plan(key, value, decisions, plan.experts, layout)

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


def lagrangian_allocation(costs, bits, budget):
    """Per item, the option minimising cost + μ·bits with the smallest μ ≥ 0 whose total bits fit the
    budget (100 steps of bisection); a tie goes to more bits, then to the lower index, and a budget no
    μ meets gets each item's fewest-bits option: the trainer's rule (`lagrangianAllocation` in
    Evaluation.swift). costs, bits: (items, M) → (items,) option indices."""
    costs, bits = costs.double(), bits.double()

    def allocate(mu):
        value = costs + mu * bits
        tied = value == value.min(-1, keepdim=True).values
        choice = torch.where(tied, bits, torch.full_like(bits, -math.inf)).argmax(-1)   # first of the most bits
        return choice, bits.gather(-1, choice[:, None]).sum().item()

    choice, total = allocate(0.0)
    if total <= budget:
        return choice
    low, high = 0.0, 1e-12
    choice, total = allocate(high)
    while total > budget:
        high *= 4
        if high > 1e30:
            return bits.argmin(-1)
        choice, total = allocate(high)
    for _ in range(100):
        middle = (low + high) / 2
        candidate, total = allocate(middle)
        if total <= budget:
            high, choice = middle, candidate
        else:
            low = middle
    return choice


def routed_unit_bits(experts, layout):
    return torch.tensor([unit_storage_bits(e, layout.chunk_size, layout.head_dim, layout.value_group) for e in experts],
                        dtype=torch.float64)


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
    costs = deltas.reshape(-1, len(experts))
    choice = lagrangian_allocation(costs, routed_unit_bits(experts, layout).expand(costs.shape[0], -1),
                                   budget_per_unit * costs.shape[0])
    decisions = choice.reshape(deltas.shape[:-1])
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


def random_plan(experts, fractions, layout, count, seed=0):
    """Every unit draws its expert independently from the router's expert mix."""
    generator = torch.Generator().manual_seed(seed)
    probabilities = torch.tensor(fractions, dtype=torch.double)
    draws = torch.multinomial(probabilities, count * layout.num_layers * layout.num_heads * layout.routed,
                              replacement=True, generator=generator)
    decisions = draws.reshape(count, layout.num_layers, layout.num_heads, layout.routed)
    return UnitPlan(experts, {w: decisions[w] for w in range(count)}, "random (router's mix)")


class CalibrationDeltas:
    """A store's calibration split, summed: `summed` is (L, H, C, M) delta_nll over its sequences, with
    columns in the order of `experts`, the store's."""

    def __init__(self, store, calibration_fraction, layout):
        manifest_path = os.path.join(store, "manifest.json")
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as error:
            raise CalibError(f"{manifest_path}: cannot read the calibration store ({error})") from None
        self.store = store
        self.experts = [Expert(e["name"], e["key_bits"], e["value_bits"]) for e in manifest["experts"]]
        if manifest["chunk_size"] != layout.chunk_size or manifest["model"]["num_layers"] != layout.num_layers:
            raise CalibError(f"{store}: chunk size or layer count differs from the router's")
        seed = manifest["selection"]["seed"]
        self.summed, self.sequences = None, 0
        for sequence in manifest["sequences"]:
            if unit_value(sequence["id"], seed) >= calibration_fraction:
                continue
            with safe_open(os.path.join(store, sequence["shard"]), framework="pt") as f:
                delta = f.get_tensor(f"seq.{sequence['id']}.delta_nll").double()
            self.summed = delta if self.summed is None else self.summed + delta
            self.sequences += 1
        if self.sequences == 0:
            raise CalibError(f"{store}: --calibration-fraction {calibration_fraction} selects no sequence")

    def columns(self, experts):
        """(L, H, C, len(experts)): the summed deltas of the given experts, by name."""
        names = [e.name for e in self.experts]
        missing = [e.name for e in experts if e.name not in names]
        if missing:
            raise CalibError(f"{self.store}: the router's expert(s) {', '.join(missing)} are not in the store "
                             f"(it has {', '.join(names)})")
        return self.summed[..., [names.index(e.name) for e in experts]]


def layerwise_plan(calibration, layout, budget_per_unit):
    """KVTuner-style: one expert of the store per layer, chosen on the store's calibration split to
    minimise the summed delta_nll under the budget of mean unit bits (with constants)."""
    cost = calibration.summed[:, :, layout.first: layout.chunks].sum(dim=(1, 2))
    bits = routed_unit_bits(calibration.experts, layout).expand(layout.num_layers, -1)
    choice = lagrangian_allocation(cost, bits, budget_per_unit * layout.num_layers)
    return LayerPlan(calibration.experts, choice.tolist())


def static_plan(summed, experts, layout, budget_per_unit):
    """The best content-blind plan: one of the router's experts per (layer, head, chunk position),
    minimising the calibration split's summed delta_nll `summed` (L, H, C_store, M) under the budget of
    mean unit bits (with constants), by the Lagrangian search. Positions the store's windows do not
    reach (longer evaluation windows) reuse the last fitted position."""
    fitted = summed[:, :, layout.first: layout.chunks]
    costs = fitted.reshape(-1, len(experts))
    choice = lagrangian_allocation(costs, routed_unit_bits(experts, layout).expand(costs.shape[0], -1),
                                   budget_per_unit * costs.shape[0]).reshape(fitted.shape[:-1])
    missing = layout.routed - choice.shape[-1]
    if missing > 0:
        choice = torch.cat([choice, choice[..., -1:].expand(-1, -1, missing)], dim=-1)
    return StaticPlan(experts, choice)


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


def format_difference(d):
    unit = "bits/byte" if d["unit"] == "bits_per_byte" else "nats/token"
    return (f"{d['a']} vs {d['b']} at the same bits: {d['mean']:+.4f} {unit} (95% CI {d['ci95'][0]:+.4f} to "
            f"{d['ci95'][1]:+.4f}), {d['percent_of_fp16']:+.2f}% of fp16 ({d['ci95_percent_of_fp16'][0]:+.2f}% to "
            f"{d['ci95_percent_of_fp16'][1]:+.2f}%) over {d['windows']} windows: {d['verdict']}")


BASELINE_EXPERTS = ("fp16", "int8", "int4", "int2", "k4v2")


class Evaluation:
    """The model, the evaluation windows and the router export, with every method scored on them."""

    def __init__(self, model, windows, export, value_group, model_dir, batch_size=8, progress=True, task=None):
        layers, heads, head_dim, _ = model_shape(model.config)
        check_export_fits(export, model.config)
        self.inputs = RouterInputs(export.router_input, model, model_dir, export.chunk_size, value_group)
        self.model, self.windows, self.export, self.model_dir, self.task = model, windows, export, model_dir, task
        self.batch_size, self.progress = batch_size, progress
        self.layout = Layout(windows.shape[1], export.chunk_size, 1 if export.freeze_first_chunk else 0,
                             layers, heads, head_dim, value_group)
        self.prescient_deltas = None

    def score(self, plan):
        return evaluate_plan(self.model, self.windows, plan, self.layout, self.batch_size, self.model_dir, self.progress,
                             self.task)

    def router(self):
        return self.score(RouterPlan(self.export, self.inputs))

    def uniform_names(self):
        """The baseline experts and every other expert of the router's."""
        return list(BASELINE_EXPERTS) + [e.name for e in self.export.experts if e.name not in BASELINE_EXPERTS]

    def uniform(self, names=None):
        return [self.score(UniformPlan(parse_expert(name))) for name in names or self.uniform_names()]

    def budget_per_unit(self, result):
        """Mean bits (with constants) of a routed unit under a result's decisions."""
        bits = routed_unit_bits(result.experts, self.layout)
        units = result.counts.sum(0).double()
        return (units * bits).sum().item() / units.sum().item()

    def prescient(self, router_result):
        if self.prescient_deltas is None:
            self.prescient_deltas = taylor_sensitivities(self.model, self.windows, self.export.experts, self.layout,
                                                         self.model_dir, self.progress)
        return self.score(prescient_plan(self.prescient_deltas, self.export.experts, self.layout,
                                         self.budget_per_unit(router_result)))

    def random(self, router_result):
        units = router_result.counts.sum(0).double()
        return self.score(random_plan(self.export.experts, (units / units.sum()).tolist(), self.layout, len(self.windows)))

    def layer_plan(self, names):
        """A per-layer plan given by expert names, one per layer."""
        if len(names) != self.layout.num_layers:
            raise CalibError(f"--layer-plan {','.join(names)}: {len(names)} experts for {self.layout.num_layers} layers")
        experts = [parse_expert(name) for name in names]
        distinct = list(dict.fromkeys(experts))
        return self.score(LayerPlan(distinct, [distinct.index(e) for e in experts], f"layer plan ({', '.join(names)})"))

    def layerwise(self, router_result, calibration):
        return self.score(layerwise_plan(calibration, self.layout, self.budget_per_unit(router_result)))

    def static(self, router_result, calibration):
        return self.score(static_plan(calibration.columns(self.export.experts), self.export.experts, self.layout,
                                      self.budget_per_unit(router_result)))


def format_table(summaries):
    task = any("task" in s for s in summaries)
    lines = [f"{'method':<44} {'ppl':>9} {'bits/byte':>9} {'payload bits':>12} {'bits+consts':>11} {'KV/fp16':>8}"
             + (f" {'accuracy (95% CI)':>24}" if task else "")]
    for s in summaries:
        bpb = f"{s['bits_per_byte']:9.4f}" if "bits_per_byte" in s else f"{'-':>9}"
        line = (f"{s['name']:<44} {s['perplexity']:9.4f} {bpb} {s['payload_bits']:12.3f} "
                f"{s['bits_with_constants']:11.3f} {100 * s['kv_fraction_of_fp16']:7.1f}%")
        if "task" in s:
            t = s["task"]
            line += f" {100 * t['accuracy']:7.1f}% ({100 * t['wilson95'][0]:4.1f}–{100 * t['wilson95'][1]:5.1f}%)"
        lines.append(line)
    lines += [s["note"] for s in summaries if s.get("note")]
    return "\n".join(lines)


def format_task(summaries):
    """Accuracy by needle depth decile and by the bits the key was stored at, per method."""
    def cell(group):
        return f"{group['correct']}/{group['windows']}".rjust(8)

    lines = [f"{summaries[0]['task']['name']}: windows correct by needle depth (deciles of the window) and by the fewest "
             "bits any unit holding the key got",
             f"{'method':<44} " + " ".join(f"{f'{10 * d}-{10 * d + 10}%':>8}" for d in range(10))
             + f" {'key≤2 bits':>10} {'key>2 bits':>10}"]
    for s in summaries:
        t = s["task"]
        lines.append(f"{s['name']:<44} " + " ".join(cell(g) for g in t["by_depth_decile"])
                     + f" {cell(t['key_at_2_bits_or_fewer']):>10} {cell(t['key_above_2_bits']):>10}")
    return "\n".join(lines)


def format_decisions(summary):
    lines = ["router decisions per layer (share of routed units):"]
    for layer, counts in enumerate(summary["decisions_per_layer"]):
        total = max(1, sum(counts))
        shares = ", ".join(f"{name} {100 * c / total:.1f}%" for name, c in zip(summary["experts"], counts))
        lines.append(f"  layer {layer}: {shares}")
    return "\n".join(lines)


def run_eval(args):
    """The eval command: the router and every baseline on every window of --text."""
    from transformers import AutoConfig

    export = read_export(args.router)
    check_model_dir(args.model)
    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    _, _, head_dim, max_positions = model_shape(config)
    seq_len = args.seq_len or min(max_positions or 4096, 4096)
    if max_positions is not None and seq_len > max_positions:
        raise CalibError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {max_positions}")
    tokenizer = ByteTokenizer() if args.tokenizer == "bytes" else HFTokenizer(args.model)
    task = None
    if args.task:
        task = task_windows(args.task, args.text, tokenizer, seq_len, args.max_windows, args.task_seed)
        text_windows = task.ids
    else:
        text_windows = windows(read_texts([args.text]), tokenizer, seq_len)
        if args.max_windows:
            text_windows = text_windows[: args.max_windows]
    value_group = args.value_group or head_dim
    if args.store:
        with open(os.path.join(args.store, "manifest.json")) as f:
            value_group = json.load(f)["value_group"]
    model = load_model(args.model, resolve_device(args.device), args.device_map, args.model_dtype)
    try:
        evaluation = Evaluation(model, text_windows, export, value_group, args.model, args.batch_size,
                                progress=not args.json, task=task)
    except CalibError as error:
        raise CalibError(f"{args.router}: {error}") from None
    bytes_per_token = 1 if args.tokenizer == "bytes" else None

    router = evaluation.router()
    results, comparison = [router], None
    results += [evaluation.layer_plan(plan.split(",")) for plan in args.layer_plan or []]
    if not args.no_baselines:
        uniform = evaluation.uniform()
        results += uniform
        if args.store:
            calibration = CalibrationDeltas(args.store, args.calibration_fraction, evaluation.layout)
            static = evaluation.static(router, calibration)
            results += [static, evaluation.layerwise(router, calibration)]
            fp16 = uniform[0].summary(bytes_per_token)
            comparison = paired_difference(router, static, fp16["bits_per_byte" if bytes_per_token else "nll"], bytes_per_token)
        results.append(evaluation.random(router))
        results.append(evaluation.prescient(router))
        if task is not None:
            results.append(evaluation.score(source_aware_plan(task, evaluation.layout)))
    summaries = [r.summary(bytes_per_token) for r in results]
    if args.json:
        print(json.dumps({"windows": len(text_windows), "seq_len": seq_len, "results": summaries,
                          "router_vs_static": comparison}))
    else:
        what = (f"{args.text}: {len(text_windows)} pass-key windows (seed {args.task_seed})" if args.task == "passkey"
                else f"{args.task}: {len(text_windows)} records" if task else f"{args.text}: {len(text_windows)} windows")
        print(f"{what} of {seq_len} tokens; {args.router}: "
              f"{export.num_routers} router(s), experts {', '.join(e.name for e in export.experts)}")
        print(format_table(summaries))
        if task:
            print(format_task(summaries))
        if comparison:
            print(format_difference(comparison))
        elif not args.no_baselines:
            print("router vs static: give --store (the static plan is fitted on its calibration split)")
        print(format_decisions(summaries[0]))
    return summaries

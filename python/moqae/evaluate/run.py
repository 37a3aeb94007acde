"""`eval`: real perplexity of a model whose KV cache follows a plan, for the router and the baselines.

`Evaluation` holds the model, the evaluation windows and the router export, and scores every method on
them (plans.py, allocation.py, oracles.py) by a forward pass over every window with K and V
fake-quantized by the shared quantizer (scoring.py); `evaluate` is the command.
"""
from dataclasses import dataclass

from .. import MoqaeError
from ..capture import RouterInputs
from ..corpus import tokenizer_for
from ..experts import parse_expert
from ..model import (check_export_fits, check_model_dir, first_held_chunks, load_model, model_shape, resolve_device,
                     window_length)
from ..router import read_export
from ..store import Store
from ..tasks import scored_windows
from .allocation import CalibrationDeltas, layerwise_plan, random_plan, routed_unit_bits, static_plan
from .oracles import prescient_plan, source_aware_plan, taylor_sensitivities
from .plans import Layout, LayerPlan, RouterPlan, UniformPlan
from .scoring import evaluate_plan, paired_difference

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
                             layers, heads, head_dim, value_group,
                             first_held_chunks(model.config, windows.shape[1], export.chunk_size))
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
            raise MoqaeError(f"--layer-plan {','.join(names)}: {len(names)} experts for {self.layout.num_layers} layers")
        experts = [parse_expert(name) for name in names]
        distinct = list(dict.fromkeys(experts))
        return self.score(LayerPlan(distinct, [distinct.index(e) for e in experts], f"layer plan ({', '.join(names)})"))

    def layerwise(self, router_result, calibration):
        return self.score(layerwise_plan(calibration, self.layout, self.budget_per_unit(router_result)))

    def static(self, router_result, calibration):
        return self.score(static_plan(calibration.columns(self.export.experts), self.export.experts, self.layout,
                                      self.budget_per_unit(router_result)))


@dataclass
class EvalReport:
    """What `evaluate` scored: one summary per plan (the router's first) and the router against static."""
    heading: str                    # what was scored, of how many tokens, under which export
    windows: int
    seq_len: int
    results: list                   # Result.summary() of every plan scored
    router_vs_static: dict | None   # paired_difference, with a store
    baselines: bool

    def as_json(self) -> dict:
        return {"windows": self.windows, "seq_len": self.seq_len, "results": self.results,
                "router_vs_static": self.router_vs_static}


def evaluate(model: str, text: str, router: str, *, tokenizer: str = "auto", seq_len: int | None = None,
             store: str | None = None, calibration_fraction: float = 0.05, value_group: int | None = None,
             batch_size: int = 8, max_windows: int | None = None, task: str | None = None, task_seed: int = 0,
             baselines: bool = True, layer_plans: list[str] = (), device: str = "auto", device_map: str | None = None,
             model_dtype: str = "auto", progress: bool = True) -> EvalReport:
    """The router of the export `router` and every baseline on every window of `text` (or of a task)."""
    from transformers import AutoConfig

    export = read_export(router)
    check_model_dir(model)
    config = AutoConfig.from_pretrained(model, local_files_only=True)
    _, _, head_dim, _ = model_shape(config)
    seq_len = window_length(config, model, seq_len)
    encoder = tokenizer_for(tokenizer, model)
    text_windows, task_set = scored_windows(text, encoder, seq_len, max_windows, task, task_seed)
    calibration_store = Store(store) if store else None
    value_group = calibration_store.manifest.value_group if calibration_store else value_group or head_dim
    if head_dim % value_group:
        raise MoqaeError(f"--value-group {value_group} must divide the head dimension {head_dim} of {model}")
    lm = load_model(model, resolve_device(device), device_map, model_dtype)
    try:
        evaluation = Evaluation(lm, text_windows, export, value_group, model, batch_size, progress=progress, task=task_set)
    except MoqaeError as error:
        raise MoqaeError(f"{router}: {error}") from None
    bytes_per_token = 1 if tokenizer == "bytes" else None

    routed = evaluation.router()
    results, comparison = [routed], None
    results += [evaluation.layer_plan(plan.split(",")) for plan in layer_plans]
    if baselines:
        uniform = evaluation.uniform()
        results += uniform
        if calibration_store:
            calibration = CalibrationDeltas(calibration_store, calibration_fraction, evaluation.layout)
            static = evaluation.static(routed, calibration)
            results += [static, evaluation.layerwise(routed, calibration)]
            fp16 = uniform[0].summary(bytes_per_token)
            comparison = paired_difference(routed, static, fp16["bits_per_byte" if bytes_per_token else "nll"], bytes_per_token)
        results.append(evaluation.random(routed))
        results.append(evaluation.prescient(routed))
        if task_set is not None:
            results.append(evaluation.score(source_aware_plan(task_set, evaluation.layout)))
    what = (f"{text}: {len(text_windows)} pass-key windows (seed {task_seed})" if task == "passkey"
            else f"{task}: {len(text_windows)} records" if task_set else f"{text}: {len(text_windows)} windows")
    heading = (f"{what} of {seq_len} tokens; {router}: "
               f"{export.num_routers} router(s), experts {', '.join(e.name for e in export.experts)}")
    partial = [f"layer {layer} from chunk {first}" for layer, first in enumerate(evaluation.layout.first_held) if first]
    if partial:
        heading += (f"\nsliding layers' caches hold only their last chunks at a window's end ({', '.join(partial)}): "
                    "only those are routed and counted")
    return EvalReport(heading, len(text_windows), seq_len, [r.summary(bytes_per_token) for r in results], comparison,
                      baselines)

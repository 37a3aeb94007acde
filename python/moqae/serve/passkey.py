"""`serve-passkey`: greedy pass-key answers by plan (the router, uniform experts, per-layer plans), each
window with a fresh `MoQAECache`: accuracy and the bytes each cache held."""
import time
from dataclasses import dataclass

from .. import MoqaeError
from ..corpus import ByteTokenizer, read_texts
from ..experts import parse_expert
from ..model import check_model_dir, load_model, model_shape, resolve_device
from ..router import read_export
from ..tasks import passkey_windows, wilson_interval
from .cache import MoQAECache
from .generate import greedy


@dataclass
class PasskeyPlan:
    name: str
    make_cache: object       # () → MoQAECache


def passkey_plans(model, export, value_group, layer_plans, uniform=("fp16", "int4", "int2"), packed_attention=True):
    """The router, uniform experts (frozen chunk 0 as the router's) and per-layer plans, each as a cache factory."""
    layers = model_shape(model.config)[0]
    plans = [PasskeyPlan("router", lambda: MoQAECache.from_export(export, model, value_group, packed_attention=packed_attention))]

    def layer_plan(name, experts):
        return PasskeyPlan(name, lambda: MoQAECache.from_layer_plan(
            experts, model.config, export.chunk_size, export.freeze_first_chunk, value_group, model=model,
            packed_attention=packed_attention))

    plans += [layer_plan(f"uniform {name}", [parse_expert(name)] * layers) for name in uniform]
    for text in layer_plans:
        experts = [parse_expert(name) for name in text.split(",")]
        if len(experts) != layers:
            raise MoqaeError(f"--layer-plan {text}: {len(experts)} experts for {layers} layers")
        plans.append(layer_plan(f"layer plan ({', '.join(e.name for e in experts)})", experts))
    return plans


def serve_passkey(model_dir: str, router: str, text: str, *, windows: int = 50, seq_len: int = 2048, seed: int = 0,
                  layer_plans: list[str] = (), value_group: int | None = None, device: str = "auto",
                  packed_attention: bool = True) -> list[dict]:
    """Greedy generation of the pass key after each window's question, by plan: accuracy (Wilson 95%) and
    the bytes each cache held at the end, against 16 bits. Returns one summary dict per plan, with the
    tokens generated for each window (`answers`)."""
    export = read_export(router)
    check_model_dir(model_dir)
    task = passkey_windows(read_texts([text])[0], ByteTokenizer(), seq_len, windows, seed)
    model = load_model(model_dir, resolve_device(device), None, "float32")
    summaries = []
    print(f"{text}: {windows} pass-key windows of {seq_len} bytes (seed {seed}); prompt up to the answer, "
          f"{task.answer_positions.shape[1]} tokens generated greedily; {router}")
    print(f"{'plan':<40} {'accuracy (95% CI)':>24} {'KV bytes / 16-bit':>18} {'bits/value':>10} {'routing time':>13}")
    for plan in passkey_plans(model, export, value_group, layer_plans, packed_attention=packed_attention):
        correct, held, fp16, routing, elapsed, answers = 0, 0, 0, 0.0, 0.0, []
        for row in range(windows):
            first = int(task.answer_positions[row, 0])
            cache = plan.make_cache()
            start = time.perf_counter()
            answer = greedy(model, cache, task.ids[row: row + 1, :first].to(model.device), task.answer_positions.shape[1])
            elapsed += time.perf_counter() - start
            correct += bool((answer.cpu() == task.ids[row, task.answer_positions[row]]).all())
            answers.append(answer.flatten().tolist())
            held, fp16, routing = held + cache.nbytes(), fp16 + cache.fp16_bytes(), routing + cache.routing_seconds
        low, high = wilson_interval(correct, windows)
        summary = {"name": plan.name, "correct": correct, "windows": windows, "accuracy": correct / windows,
                   "wilson95": [low, high], "bytes_fraction_of_fp16": held / fp16, "bits_per_value": 16 * held / fp16,
                   "routing_fraction": routing / elapsed, "answers": answers}
        summaries.append(summary)
        print(f"{plan.name:<40} {100 * summary['accuracy']:7.1f}% ({100 * low:4.1f}–{100 * high:5.1f}%) "
              f"{100 * summary['bytes_fraction_of_fp16']:17.1f}% {summary['bits_per_value']:10.3f} "
              f"{100 * summary['routing_fraction']:12.2f}%", flush=True)
    return summaries

"""`pareto`: routers trained at several λ with the paper's loss, and with any further configs (another
loss, a bits budget), each scored by real perplexity on evaluation text beside the baselines, drawn as
perplexity against average KV bits.

For each run, moqae-train trains a router on the store (continuing a run that exists) and exports it;
`moqae-train eval` gives its estimated perplexity on the store's validation split. The model then runs
over the evaluation windows under every method. The headline of each run is the router against the
static plan (the best content-blind plan at the router's bits), with a confidence interval from
per-window differences; the prescient row is a diagnostic (see `PRESCIENT_NOTE`). The uniform experts
are scored once for routers that freeze chunk 0 and once for routers that route it (named "…, chunk 0
quantized"); the prescient plan's sensitivities are computed once per expert set.
"""
import json
import os
import subprocess

from .. import MoqaeError
from ..corpus import tokenizer_for
from ..evaluate.allocation import CalibrationDeltas
from ..evaluate.oracles import PRESCIENT_NOTE, source_aware_plan
from ..evaluate.report import format_difference, format_table
from ..evaluate.run import Evaluation
from ..evaluate.scoring import paired_difference
from ..files import read_json_file
from ..model import load_model, resolve_device
from ..router import read_export
from ..store import Store
from ..tasks import scored_windows
from .layer_plan_search import frontier


class Run:
    """One router to train: a label, a moqae-train config and overrides (`KEY=VALUE`)."""

    def __init__(self, label, config, overrides):
        self.label, self.config, self.overrides = label, config, overrides

    @property
    def directory(self):
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in self.label.replace("λ", "lambda"))


def runs_of(config: str, lambdas: list[float], config_runs: list[str]) -> list[Run]:
    """The paper-loss runs of `config` at `lambdas`, then one run per config run `FILE[:KEY=VALUE,...]`,
    labelled by the file's name and its overrides."""
    runs = [Run(f"paper λ={lam}", config, [f"loss.lambda={lam}"]) for lam in lambdas]
    for spec in config_runs:
        path, _, settings = spec.partition(":")
        overrides = [s for s in settings.split(",") if s]
        if not os.path.isfile(path):
            raise MoqaeError(f"--config-run {spec}: no such config file {path}")
        if any("=" not in s for s in overrides):
            raise MoqaeError(f"--config-run {spec}: overrides after the colon must be KEY=VALUE, separated by commas")
        label = os.path.splitext(os.path.basename(path))[0]
        runs.append(Run(label + (f" ({', '.join(overrides)})" if overrides else ""), path, overrides))
    return runs


def train_router(moqae_train, run, store, run_dir, extra):
    """Trains (or finishes) a run and exports its router; returns (export path, estimated report)."""
    resume = ["--resume", "latest"] if os.path.isdir(run_dir) and any(n.startswith("ckpt-") for n in os.listdir(run_dir)) else []
    sets = [f"store={store}", f"run_dir={run_dir}", "train.eval_every=0", *run.overrides]
    command = [moqae_train, "train", "--config", run.config, *(a for s in sets for a in ("--set", s)), *resume, *extra]
    for step in (command, [moqae_train, "export", run_dir, "--out", os.path.join(run_dir, "router.bin")]):
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode != 0:
            raise MoqaeError(f"{' '.join(step[:2])} failed for {run.label}: {result.stderr.strip().splitlines()[-1:]}")
    estimate = subprocess.run([moqae_train, "eval", run_dir, "--json"], capture_output=True, text=True)
    if estimate.returncode != 0:
        raise MoqaeError(f"moqae-train eval failed for {run.label}: {estimate.stderr.strip()}")
    return os.path.join(run_dir, "router.bin"), json.loads(estimate.stdout)


METHODS = ("router", "static", "layer-wise", "random", "prescient")


def chosen_layer_plans(path):
    """The frontier of a `layer-plan-search` result (OUT/layer-plans.json): the best per-layer plan at each
    bits level on its own windows (a calibration text), as (plans, that text)."""
    try:
        search = read_json_file(path)
        rows, text = search["rows"], search["text"]
        plans = [list(r["plan"]) for r in frontier(rows)]
    except (MoqaeError, KeyError, TypeError) as error:
        raise MoqaeError(f"--layer-plans {path}: not a layer-plans.json of `moqae layer-plan-search` ({error})") from None
    if not plans or not all(plans) or not all(isinstance(n, str) for p in plans for n in p):
        raise MoqaeError(f"--layer-plans {path}: no plans in its rows")
    return plans, text


def plot(rows, shared, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = "task" in shared[0]
    figure, axes = plt.subplots(1, 2 if task else 1, figsize=(15 if task else 8, 5.5), squeeze=False)
    for axis, key in zip(axes[0], ["bits_per_byte" if "bits_per_byte" in shared[0] else "perplexity"] + (["accuracy"] if task else [])):
        draw(axis, rows, shared, key)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def draw(axis, rows, shared, key):
    """One panel: `key` of every method against payload bits."""
    def value(summary):
        return summary["task"]["accuracy"] if key == "accuracy" else summary[key]

    routers = sorted(rows, key=lambda r: r["router"]["payload_bits"])
    paper = [r for r in routers if r["label"].startswith("paper")]
    axis.plot([r["router"]["payload_bits"] for r in paper], [value(r["router"]) for r in paper], "o-",
              color="C3", label="router, paper loss (λ as labelled)")
    others = [r for r in routers if not r["label"].startswith("paper")]
    axis.scatter([r["router"]["payload_bits"] for r in others], [value(r["router"]) for r in others], marker="*", s=120,
                 color="C1", label="router, other configs (as labelled)")
    for r in routers:
        axis.annotate(r["label"].replace("paper ", ""), (r["router"]["payload_bits"], value(r["router"])),
                      textcoords="offset points", xytext=(4, 4), fontsize=8)
    for method, style, color, label in (
            ("static", "P", "C4", "static (per layer, head, chunk position; content-blind) at the router's bits"),
            ("layer-wise", "s", "C2", "layer-wise (KVTuner-style) at the router's bits"),
            ("random", "x", "C7", "random with the router's mix"),
            ("prescient", "^", "C0", "prescient (gradients of the evaluated text): a diagnostic, not reachable")):
        scored = [r for r in routers if method in r]
        if scored:
            axis.scatter([r[method]["payload_bits"] for r in scored], [value(r[method]) for r in scored], marker=style,
                         color=color, facecolors="none" if method == "prescient" else None, label=label)
    chosen = sorted((s for s in shared if s.get("chosen_on")), key=lambda s: s["payload_bits"])
    if chosen:
        axis.plot([s["payload_bits"] for s in chosen], [value(s) for s in chosen], "v--", color="C5",
                  label=f"best per-layer plan at each bits (chosen on {os.path.basename(chosen[0]['chosen_on'])}; content-blind)")
    for summary in (s for s in shared if not s.get("chosen_on")):
        axis.scatter([summary["payload_bits"]], [value(summary)], marker="D", color="k")
        axis.annotate(summary["name"].replace("uniform ", ""), (summary["payload_bits"], value(summary)),
                      textcoords="offset points", xytext=(4, -10), fontsize=8)
    axis.scatter([], [], marker="D", color="k", label="fp16 and uniform quantization")
    axis.set_xlabel("average KV bits (payload)")
    axis.set_ylabel({"bits_per_byte": "bits per byte", "perplexity": "perplexity"}.get(key, f"{shared[0].get('task', {}).get('name')} accuracy"))
    axis.set_title("Real quality against KV memory" if key != "accuracy" else "Task accuracy against KV memory")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def rise(value, fp16):
    return f"{100 * (value / fp16 - 1):+.2f}%"


def share(fraction):
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def accuracy(summary):
    t = summary["task"]
    return f"{100 * t['accuracy']:.1f}% ({100 * t['wilson95'][0]:.1f}–{100 * t['wilson95'][1]:.1f}%)"


def markdown(rows, shared):
    """The headline (router against static per run, with its confidence interval), then every method's
    real figures; for router and static also the trainer's estimate (on the store's validation split, a
    different text) as a rise over its own fp16 estimate, beside the real rise."""
    key = "bits_per_byte" if "bits_per_byte" in shared[0] else "perplexity"
    label = "bits/byte" if key == "bits_per_byte" else "ppl"
    unit = "bits/byte" if key == "bits_per_byte" else "nats/token"
    fp16_summary = next(s for s in shared if s["name"] == "uniform fp16")
    fp16, fp16_key = fp16_summary["perplexity"], fp16_summary[key]
    task = "task" in fp16_summary
    accuracy_header, accuracy_rule = (f" {fp16_summary['task']['name']} accuracy (Wilson 95%) |", "---|") if task else ("", "")
    lines = [f"Router against static at the same bits (router minus static; negative: the router is better; "
             f"95% confidence interval from per-window differences):", "",
             f"| run | payload bits | router {label} | static {label} | difference ({unit}) | 95% CI | % of fp16 | verdict "
             f"| trainer's estimate, % of fp16 |" + (" router accuracy | static accuracy |" if task else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if task else "")]
    for r in rows:
        d = r["router_vs_static"]
        lines.append(f"| {r['label']} | {r['router']['payload_bits']:.3f} | {r['router'][key]:.4f} | {r['static'][key]:.4f} | "
                     f"{d['mean']:+.4f} | {d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f} | {d['percent_of_fp16']:+.2f}% "
                     f"({d['ci95_percent_of_fp16'][0]:+.2f}% to {d['ci95_percent_of_fp16'][1]:+.2f}%) | {d['verdict']} "
                     f"| {r['estimated_router_vs_static']['percent_of_fp16']:+.2f}% |"
                     + (f" {accuracy(r['router'])} | {accuracy(r['static'])} |" if task else ""))
    if task:
        lines += ["", "Evidence of content: the router's units kept above 2 bits, those holding the key and the others, "
                      "and the AUC of its keep probability (key units against the others), per layer:", "",
                  "| run | layer | key units above 2 bits | other units above 2 bits | keep AUC |", "|---|---|---|---|---|"]
        for r in rows:
            for layer, c in enumerate(r["router"]["task"]["content_by_layer"]):
                lines.append(f"| {r['label']} | {layer} | {share(c['key_above_2_bits'])} of {c['key_units']} | "
                             f"{share(c['other_above_2_bits'])} of {c['other_units']} | "
                             f"{'-' if c['keep_auc'] is None else format(c['keep_auc'], '.3f')} |")
    lines += ["", f"| method | run | payload bits | bits+consts | {label} | {label} vs fp16 | ppl | ppl vs fp16 | "
                  f"estimated ppl vs fp16 |{accuracy_header}", "|---|---|---|---|---|---|---|---|---|" + accuracy_rule]

    def line(s, run, estimate=""):
        return (f"| {s['name']} | {run} | {s['payload_bits']:.3f} | {s['bits_with_constants']:.3f} | {s[key]:.4f} | "
                f"{rise(s[key], fp16_key)} | {s['perplexity']:.4f} | {rise(s['perplexity'], fp16)} | {estimate} |"
                + (f" {accuracy(s)} |" if task else ""))

    lines += [line(s, f"frontier, chosen on {os.path.basename(s['chosen_on'])}" if s.get("chosen_on") else "")
              for s in shared]
    for r in rows:
        for method in (m for m in METHODS if m in r):
            estimate = r["estimated"].get(method)
            lines.append(line(r[method], r["label"], rise(estimate, r["estimated"]["fp16"]) if estimate else ""))
    if any("prescient" in r for r in rows):
        lines += ["", f"*{PRESCIENT_NOTE}.*"]
    lines += [f"*{s['note']}.*" for s in shared if s.get("note")]
    return "\n".join(lines) + "\n"


def uniform_summaries(evaluation, bytes_per_token, with_fp16):
    """The uniform baselines at a run's layout, named "…, chunk 0 quantized" when chunk 0 is routed
    (fp16 is the same either way)."""
    names = [n for n in evaluation.uniform_names() if n != "fp16" or with_fp16]
    summaries = []
    for result in evaluation.uniform(names):
        summary = result.summary(bytes_per_token)
        if evaluation.layout.first == 0 and result.name != "uniform fp16":
            summary["name"] += ", chunk 0 quantized"
        summaries.append(summary)
    return summaries


def pareto(moqae_train: str, store: str, model: str, text: str, out: str, *, config: str = "configs/default.yaml",
           tokenizer: str = "auto", lambdas: list[float] = (0.1, 0.3, 0.5, 0.7, 0.9), config_runs: list[str] = (),
           diagnostics: bool = True, max_windows: int | None = None, task: str | None = None, task_seed: int = 0,
           calibration_fraction: float = 0.05, batch_size: int = 8, device: str = "auto",
           train_args: list[str] = (), layer_plans: str | None = None) -> dict:
    """Trains a router per run on `store`, scores each on `text` beside every baseline (with `layer_plans`,
    a `layer-plan-search` result, also the per-layer plans of its frontier); writes OUT/pareto.json,
    pareto.md and pareto.png and returns what pareto.json holds."""
    runs = runs_of(config, lambdas, config_runs)
    if not runs:
        raise MoqaeError("nothing to train: --lambdas is empty and no --config-run was given")
    plans, chosen_on = chosen_layer_plans(layer_plans) if layer_plans else ([], None)
    if chosen_on is not None and os.path.abspath(chosen_on) == os.path.abspath(text):
        raise MoqaeError(f"--layer-plans {layer_plans}: its plans were chosen on {text}, the evaluation text; "
                         "choose them on a calibration text (valid.txt)")
    calibration_store = Store(store)
    seq_len = calibration_store.manifest.seq_len
    os.makedirs(out, exist_ok=True)
    exports = {}
    for run in runs:
        exports[run.label] = train_router(moqae_train, run, store, os.path.join(out, run.directory), list(train_args))
        print(f"{run.label}: trained and exported", flush=True)
    encoder = tokenizer_for(tokenizer, model)
    text_windows, task_set = scored_windows(text, encoder, seq_len, max_windows, task, task_seed)
    lm = load_model(model, resolve_device(device), None, "auto")
    bytes_per_token = 1 if tokenizer == "bytes" else None

    calibration = None
    shared, uniform_layouts, prescient_deltas, rows = [], set(), {}, []
    for run in runs:
        path, estimate = exports[run.label]
        evaluation = Evaluation(lm, text_windows, read_export(path), calibration_store.manifest.value_group, model,
                                batch_size, progress=os.isatty(2), task=task_set)
        if calibration is None:
            calibration = CalibrationDeltas(calibration_store, calibration_fraction, evaluation.layout)
        expert_set = tuple(e.name for e in evaluation.export.experts)
        evaluation.prescient_deltas = prescient_deltas.get(expert_set)
        first = evaluation.layout.first
        if first not in uniform_layouts:
            uniform_layouts.add(first)
            shared += uniform_summaries(evaluation, bytes_per_token, with_fp16=not shared)
            if task_set is not None and diagnostics:
                shared.append(evaluation.score(source_aware_plan(task_set, evaluation.layout)).summary(bytes_per_token))
            if first == 1:   # layer-plan-search freezes chunk 0 as these routers do
                shared += [dict(evaluation.layer_plan(names).summary(bytes_per_token), chosen_on=chosen_on)
                           for names in plans]
        router = evaluation.router()
        static = evaluation.static(router, calibration)
        fp16 = next(s for s in shared if s["name"] == "uniform fp16")
        row = {"label": run.label,
               "estimated": {"fp16": next(u for u in estimate["uniform"] if u["name"] == "uniform fp16")["perplexity"],
                             "router": estimate["router"]["perplexity"], "static": estimate["static"]["perplexity"]},
               "estimated_router_vs_static": estimate["router_vs_static"],
               "router_vs_static": paired_difference(router, static, fp16["bits_per_byte" if bytes_per_token else "nll"],
                                                     bytes_per_token),
               "router": router.summary(bytes_per_token), "static": static.summary(bytes_per_token),
               "layer-wise": evaluation.layerwise(router, calibration).summary(bytes_per_token)}
        if diagnostics:
            row["random"] = evaluation.random(router).summary(bytes_per_token)
            row["prescient"] = evaluation.prescient(router).summary(bytes_per_token)
            prescient_deltas[expert_set] = evaluation.prescient_deltas
        rows.append(row)
        print(f"{run.label}:\n" + format_table([row[m] for m in METHODS if m in row]) + "\n"
              + format_difference(row["router_vs_static"]), flush=True)
    result = {"text": text, "task": task, "task_seed": task_seed if task_set else None,
              "windows": len(text_windows), "seq_len": int(text_windows.shape[1]),
              "shared": shared, "runs": rows}
    with open(os.path.join(out, "pareto.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "pareto.md"), "w") as f:
        f.write(markdown(rows, shared))
    plot(rows, shared, os.path.join(out, "pareto.png"))
    print(format_table(shared))
    print(f"wrote {out}/pareto.json, pareto.md, pareto.png")
    return result

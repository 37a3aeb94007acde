"""`layer-plan-search`: the content-blind frontier a router must beat. Every per-layer plan over a set of
experts (4 experts on 4 layers: 256 plans) is scored by real quantization on pass-key windows of a
calibration text (`valid.txt`, never the test text), chunk 0 at 16 bits as the routers freeze it; at
each bits level the best plan (most keys, then fewest bits per byte) is the yardstick.
"""
import itertools
import json
import os

from ..corpus import read_texts, tokenizer_for
from ..evaluate.plans import Layout, LayerPlan
from ..evaluate.scoring import evaluate_plan
from ..experts import parse_expert
from ..model import first_held_chunks, load_model, model_shape
from ..tasks import passkey_windows, wilson_interval


def frontier(rows):
    """The rows that no row of at most their payload bits beats (more keys, or as many at fewer bits per
    byte): the best plan at each bits level. Sorted by bits."""
    def score(row):
        return row["correct"], -row["bits_per_byte"]
    return sorted((r for r in rows if not any(o["payload_bits"] <= r["payload_bits"] and score(o) > score(r) for o in rows)),
                  key=lambda r: r["payload_bits"])


def layer_plan_search(model, text, out, *, experts="int4,int2,k4v2,k2v4", windows=40, task_seed=5, seq_len=2048,
                      batch_size=8):
    """Scores every per-layer plan; writes OUT/layer-plans.json and OUT/layer-plans.md; returns the rows."""
    lm = load_model(model, "cpu", None, "float32")
    layers, heads, head_dim, _ = model_shape(lm.config)
    expert_set = [parse_expert(name) for name in experts.split(",")]   # no 16/16 expert needed: nothing is measured against it
    task = passkey_windows(read_texts([text])[0], tokenizer_for("bytes", model), seq_len, windows, task_seed)
    layout = Layout(seq_len, 32, 1, layers, heads, head_dim, head_dim, first_held_chunks(lm.config, seq_len, 32))
    rows = []
    plans = list(itertools.product(range(len(expert_set)), repeat=layers))
    for number, per_layer in enumerate(plans):
        names = [expert_set[m].name for m in per_layer]
        result = evaluate_plan(lm, task.ids, LayerPlan(expert_set, list(per_layer), ",".join(names)), layout,
                               batch_size, model, progress=False, task=task)
        summary = result.summary(1)
        correct = sum(result.correct)
        rows.append({"plan": names, "payload_bits": summary["payload_bits"], "bits_per_byte": summary["bits_per_byte"],
                     "correct": correct, "windows": windows, "wilson95": list(wilson_interval(correct, windows))})
        print(f"[{number + 1}/{len(plans)}] {','.join(names)}: {summary['payload_bits']:.3f} bits, "
              f"{summary['bits_per_byte']:.4f} bits/byte, {correct}/{windows} keys", flush=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "layer-plans.json"), "w") as f:
        json.dump({"text": text, "windows": windows, "task_seed": task_seed, "rows": rows}, f, indent=1)
    lines = [f"Every per-layer plan over {experts} on {windows} pass-key windows of {os.path.basename(text)} "
             f"(task seed {task_seed}), chunk 0 at 16 bits: the frontier (no plan of at most its bits "
             f"keeps more keys, or as many at fewer bits per byte)", "",
             "| plan | payload bits | bits/byte | keys (95% CI) |", "|---|---|---|---|"]
    for r in frontier(rows):
        low, high = r["wilson95"]
        lines.append(f"| {','.join(r['plan'])} | {r['payload_bits']:.3f} | {r['bits_per_byte']:.4f} | "
                     f"{r['correct']}/{r['windows']} ({100 * low:.0f}–{100 * high:.0f}%) |")
    with open(os.path.join(out, "layer-plans.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows

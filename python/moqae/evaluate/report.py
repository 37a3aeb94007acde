"""The eval command's text: a table of every plan, task accuracy by needle depth, the router against
static, and the router's decisions per layer."""


def format_difference(d):
    unit = "bits/byte" if d["unit"] == "bits_per_byte" else "nats/token"
    return (f"{d['a']} vs {d['b']} at the same bits: {d['mean']:+.4f} {unit} (95% CI {d['ci95'][0]:+.4f} to "
            f"{d['ci95'][1]:+.4f}), {d['percent_of_fp16']:+.2f}% of fp16 ({d['ci95_percent_of_fp16'][0]:+.2f}% to "
            f"{d['ci95_percent_of_fp16'][1]:+.2f}%) over {d['windows']} windows: {d['verdict']}")


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


def format_content(summary):
    """Evidence of content, per layer: key and other units kept above 2 bits, and the keep AUC."""
    def percent(x):
        return f"{100 * x:5.1f}%" if x is not None else "    -"
    lines = [f"{summary['name']}: units kept above 2 bits, those holding the key and the others, per layer"
             " (keep AUC: the router's probability of more than 2 bits, key units against the others)"]
    for layer, c in enumerate(summary["task"]["content_by_layer"]):
        score = f"{c['keep_auc']:.3f}" if c["keep_auc"] is not None else "-"
        lines.append(f"  layer {layer}: key {percent(c['key_above_2_bits'])} of {c['key_units']}, "
                     f"other {percent(c['other_above_2_bits'])} of {c['other_units']}, keep AUC {score}")
    return "\n".join(lines)


def format_decisions(summary):
    lines = ["router decisions per layer (share of routed units):"]
    for layer, counts in enumerate(summary["decisions_per_layer"]):
        total = max(1, sum(counts))
        shares = ", ".join(f"{name} {100 * c / total:.1f}%" for name, c in zip(summary["experts"], counts))
        lines.append(f"  layer {layer}: {shares}")
    return "\n".join(lines)


def format_report(report) -> str:
    """The eval command's text for an EvalReport."""
    lines = [report.heading, format_table(report.results)]
    if any("task" in s for s in report.results):
        lines.append(format_task(report.results))
        lines.append(format_content(report.results[0]))
    if report.router_vs_static:
        lines.append(format_difference(report.router_vs_static))
    elif report.baselines:
        lines.append("router vs static: give --store (the static plan is fitted on its calibration split)")
    lines.append(format_decisions(report.results[0]))
    return "\n".join(lines)

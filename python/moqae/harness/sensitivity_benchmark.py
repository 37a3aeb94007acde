"""`sensitivity-benchmark`: how long each sensitivity of the dump takes per window, on the same windows.

Per window, in turn: Taylor (one forward and one backward), exact with resumed forwards (`exact_delta`)
and exact with one full forward per unit and expert (`exact_delta_full`, the reference). Ratios are
taken per window, side by side, because this machine's speed drifts; the report gives their median.
It also checks that the two exact paths agree, and gives the share of the full forwards' work that the
resumed path recomputes (layer-tokens), which bounds its speed-up.
"""
import statistics
import sys
import time

from . import CalibError
from .report import write_section
from .corpus import ByteTokenizer, HFTokenizer, read_texts, windows
from .dump import check_model_dir, load_model, model_shape
from .experts import parse_experts
from .selection import selected
from .sensitivity import exact_delta, exact_delta_full, forward_with_kv_gradients, resumable_decoder, taylor_delta


def resumed_work_share(layers, chunks):
    """Layer-tokens the resumed path computes for all units over those of one full forward per unit."""
    resumed = sum((layers - layer) * (chunks - c) for layer in range(layers) for c in range(chunks))
    return resumed / (layers * chunks * layers * chunks)


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def run_sensitivity_benchmark(args):
    check_model_dir(args.model)
    experts = parse_experts(args.experts)
    model = load_model(args.model, "cpu", None, "float32")
    layers, _, head_dim, max_positions = model_shape(model.config)
    seq_len = args.seq_len or max_positions
    tokenizer = ByteTokenizer() if args.tokenizer == "bytes" else HFTokenizer(args.model)
    corpus = windows(read_texts([args.corpus]), tokenizer, seq_len)
    chosen = [i for i in range(corpus.shape[0]) if selected(i, 0, 0.1)][: args.windows]
    if not chosen:
        raise CalibError(f"{args.corpus}: no window of {seq_len} tokens")
    if resumable_decoder(model, seq_len) is None:
        raise CalibError(f"{args.model}: exact sensitivities run full forwards for this model; nothing to compare")
    value_group = head_dim
    rows = []
    for seq_id in chosen:
        ids = corpus[seq_id]
        taylor_seconds, _ = timed(lambda: taylor_delta(*forward_with_kv_gradients(model, ids, args.model)[1:], experts,
                                                       args.chunk_size, value_group, seq_len - 1))
        resumed_seconds, resumed = timed(exact_delta, model, ids, experts, args.chunk_size, value_group, args.model)
        full_seconds, full = timed(exact_delta_full, model, ids, experts, args.chunk_size, value_group, args.model)
        disagreement = (resumed[3] - full[3]).abs().max().item() / full[3].abs().max().item()
        rows.append((taylor_seconds, resumed_seconds, full_seconds, disagreement))
        print(f"window {seq_id}: taylor {taylor_seconds:.3f} s, exact {resumed_seconds:.2f} s, full forwards "
              f"{full_seconds:.2f} s; largest difference {disagreement:.1e} of the largest |Δ|", flush=True)

    def median(index):
        return statistics.median(row[index] for row in rows)

    share = resumed_work_share(layers, seq_len // args.chunk_size)
    speedups = [row[2] / row[1] for row in rows]
    lines = [
        f"Written by `python -m moqae sensitivity-benchmark {' '.join(sys.argv[2:])}` "
        "(`make sensitivity-benchmark`).", "",
        f"- {len(rows)} windows of {seq_len} tokens, experts {args.experts}, chunks of {args.chunk_size}; CPU, float32", "",
        "| per window (median) | seconds | / Taylor |", "|---|---|---|",
        f"| Taylor (forward + backward) | {median(0):.3f} | 1 |",
        f"| exact, resumed forwards (`--sensitivity exact`) | {median(1):.2f} | {statistics.median(r[1] / r[0] for r in rows):.0f}× |",
        f"| exact, one full forward per unit (the reference) | {median(2):.2f} | {statistics.median(r[2] / r[0] for r in rows):.0f}× |",
        "",
        f"- resumed against full forwards: **{statistics.median(speedups):.2f}×** faster "
        f"(range {min(speedups):.2f}–{max(speedups):.2f}); largest difference "
        f"{max(r[3] for r in rows):.1e} of the largest |Δ| (tested bound 1e-5)",
        f"- the resumed path computes {100 * share:.1f}% of the full forwards' layer-tokens "
        f"({layers} layers, {seq_len // args.chunk_size} chunks), so its speed-up is at most about {1 / share:.1f}×", ""]
    report = "\n".join(lines)
    print(report)
    if args.out:
        write_section(args.out, "Performance", "Exact sensitivities", report)
        print(f"wrote {args.out}")

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

from .. import MoqaeError
from ..calibrate.sensitivity import exact_delta, exact_delta_full, forward_with_kv_gradients, resumable_decoder, taylor_delta
from ..corpus import read_texts, tokenizer_for, windows as split_windows
from ..experts import parse_experts
from ..model import check_model_dir, load_model, model_shape
from ..selection import selected
from .report import write_section


def resumed_work_share(layers, chunks):
    """Layer-tokens the resumed path computes for all units over those of one full forward per unit."""
    resumed = sum((layers - layer) * (chunks - c) for layer in range(layers) for c in range(chunks))
    return resumed / (layers * chunks * layers * chunks)


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def sensitivity_benchmark(model: str, corpus: str, *, tokenizer: str = "auto", seq_len: int | None = None,
                          chunk_size: int = 32, experts: str = "fp16,int4,int2", windows: int = 8,
                          out: str | None = None) -> str:
    """Times Taylor and both exact sensitivities on the same `windows` windows of `corpus`; prints the
    report, writes its section of `out` when given, and returns it."""
    check_model_dir(model)
    expert_set = parse_experts(experts)
    lm = load_model(model, "cpu", None, "float32")
    layers, _, head_dim, max_positions = model_shape(lm.config)
    seq_len = seq_len or max_positions
    corpus_windows = split_windows(read_texts([corpus]), tokenizer_for(tokenizer, model), seq_len)
    chosen = [i for i in range(corpus_windows.shape[0]) if selected(i, 0, 0.1)][: windows]
    if not chosen:
        raise MoqaeError(f"{corpus}: no window of {seq_len} tokens")
    if resumable_decoder(lm, seq_len) is None:
        raise MoqaeError(f"{model}: exact sensitivities run full forwards for this model; nothing to compare")
    value_group = head_dim
    rows = []
    for seq_id in chosen:
        ids = corpus_windows[seq_id]
        taylor_seconds, _ = timed(lambda: taylor_delta(*forward_with_kv_gradients(lm, ids, model)[1:], expert_set,
                                                       chunk_size, value_group, seq_len - 1))
        resumed_seconds, resumed = timed(exact_delta, lm, ids, expert_set, chunk_size, value_group, model)
        full_seconds, full = timed(exact_delta_full, lm, ids, expert_set, chunk_size, value_group, model)
        disagreement = (resumed[3] - full[3]).abs().max().item() / full[3].abs().max().item()
        rows.append((taylor_seconds, resumed_seconds, full_seconds, disagreement))
        print(f"window {seq_id}: taylor {taylor_seconds:.3f} s, exact {resumed_seconds:.2f} s, full forwards "
              f"{full_seconds:.2f} s; largest difference {disagreement:.1e} of the largest |Δ|", flush=True)

    def median(index):
        return statistics.median(row[index] for row in rows)

    share = resumed_work_share(layers, seq_len // chunk_size)
    speedups = [row[2] / row[1] for row in rows]
    lines = [
        f"Written by `python -m moqae sensitivity-benchmark {' '.join(sys.argv[2:])}` "
        "(`make sensitivity-benchmark`).", "",
        f"- {len(rows)} windows of {seq_len} tokens, experts {experts}, chunks of {chunk_size}; CPU, float32", "",
        "| per window (median) | seconds | / Taylor |", "|---|---|---|",
        f"| Taylor (forward + backward) | {median(0):.3f} | 1 |",
        f"| exact, resumed forwards (`--sensitivity exact`) | {median(1):.2f} | {statistics.median(r[1] / r[0] for r in rows):.0f}× |",
        f"| exact, one full forward per unit (the reference) | {median(2):.2f} | {statistics.median(r[2] / r[0] for r in rows):.0f}× |",
        "",
        f"- resumed against full forwards: **{statistics.median(speedups):.2f}×** faster "
        f"(range {min(speedups):.2f}–{max(speedups):.2f}); largest difference "
        f"{max(r[3] for r in rows):.1e} of the largest |Δ| (tested bound 1e-5)",
        f"- the resumed path computes {100 * share:.1f}% of the full forwards' layer-tokens "
        f"({layers} layers, {seq_len // chunk_size} chunks), so its speed-up is at most about {1 / share:.1f}×", ""]
    report = "\n".join(lines)
    print(report)
    if out:
        write_section(out, "Performance", "Exact sensitivities", report)
        print(f"wrote {out}")
    return report

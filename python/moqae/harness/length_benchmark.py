"""`length-benchmark`: dump time and peak memory against the window length T.

Each (model, T) is one `dump` of WINDOWS windows in a child process (Taylor sensitivities, the default),
timed per window after the model has loaded (the dump reports it); peak RSS is the child's. A tiny random Llama made here
with room for the longest T stands in for the lengths a small reference model cannot read.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

from .. import MoqaeError
from .report import write_section
from ..selection import unit_value


def tiny_llama(directory, max_positions):
    """A random 3-layer Llama (hidden 64, 2 KV heads of 16) that reads up to `max_positions` bytes."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=max_positions)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def fraction_for(count, corpus, seq_len):
    """A `--fraction` that selects exactly `count` of the corpus's byte windows (seed 0)."""
    total = os.path.getsize(corpus) // seq_len
    if total < count:
        raise MoqaeError(f"{corpus}: {total} windows of {seq_len} bytes, fewer than {count}")
    values = sorted(unit_value(i, 0) for i in range(total))
    return (values[count - 1] + values[count]) / 2 if count < total else 1.0


# Runs argv[1:] from a fresh, small interpreter (so that the peak is the dump's alone, see benchmark.py);
# prints its output, then its peak RSS (KB) on the last line.
LAUNCHER = """
import resource, subprocess, sys
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(result.stderr)
print(result.stdout + str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(result.returncode)
"""


def timed_dump(model, corpus, seq_len, windows, work):
    """(seconds per window after loading, peak RSS in MB) of a byte-level Taylor dump of `windows` windows."""
    out = os.path.join(work, f"store-{seq_len}")
    command = [sys.executable, "-m", "moqae", "dump", "--model", model, "--corpus", corpus, "--tokenizer", "bytes",
               "--seq-len", str(seq_len), "--device", "cpu", "--out", out, "--fraction", repr(fraction_for(windows, corpus, seq_len))]
    result = subprocess.run([sys.executable, "-c", LAUNCHER, *command], capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    match = re.search(r"\(([0-9.]+) s per sequence", result.stdout)
    if result.returncode != 0 or not match:
        raise MoqaeError(f"dump at --seq-len {seq_len} failed: {result.stderr.strip()[-2000:]}")
    return float(match.group(1)), int(result.stdout.split()[-1]) / 1024


def length_benchmark(model: str, corpus: str, *, lengths: list[int] = (512, 1024, 2048),
                     tiny_lengths: list[int] = (4096, 8192), windows: int = 4, out: str | None = None) -> list[tuple]:
    """Times a dump of `windows` windows at every length, on `model` and on a tiny random Llama; returns
    (model label, T, seconds per window, peak RSS MB) rows."""
    if not os.path.isfile(corpus):
        raise MoqaeError(f"{corpus}: corpus file not found")
    work = tempfile.mkdtemp(prefix="moqae-length-")
    tiny = tiny_llama(os.path.join(work, "tiny-llama"), max(tiny_lengths))
    rows = []
    for label, directory, seq_lens in ((os.path.basename(os.path.normpath(model)), model, lengths),
                                       ("tiny random Llama", tiny, tiny_lengths)):
        for seq_len in seq_lens:
            per_window, peak = timed_dump(directory, corpus, seq_len, windows, work)
            rows.append((label, seq_len, per_window, peak))
            print(f"{label}, T = {seq_len}: {per_window:.2f} s per window, peak RSS {peak:.0f} MB", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    lines = [f"Written by `python -m moqae length-benchmark {' '.join(sys.argv[2:])}` (`make length-benchmark`).", "",
             f"- Taylor dumps (one forward and one backward per window) of byte windows of `{os.path.basename(corpus)}`, "
             f"CPU, float32; {windows} windows per dump, seconds per window after the model has loaded; peak RSS of "
             "the whole dump process", "",
             "| model | T | seconds per window | peak RSS |", "|---|---|---|---|"]
    lines += [f"| {label} | {seq_len:,} | {per_window:.2f} | {peak:.0f} MB |" for label, seq_len, per_window, peak in rows]
    report = "\n".join(lines) + "\n"
    print(report)
    if out:
        write_section(out, "Performance", "Dumps at length", report)
        print(f"wrote {out}")
    return rows

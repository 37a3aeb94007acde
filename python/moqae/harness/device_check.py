"""`device-check`: the dump and the evaluation at Llama-2-7B shapes on a GPU, per window: time and peak GPU memory.

A random-initialised model of the shape is saved in bfloat16 (`llama2-7b`: 32 layers of 32 heads of 128,
hidden 4096; `tiny` is a smoke test that runs anywhere). Then, in this process so that torch's peak GPU
memory counts both: a Taylor dump (one forward and one backward per window) of WINDOWS byte windows of
SEQ_LEN tokens, timed per window after the model has loaded; and the evaluation of the same windows under
a random router (the router's plan alone: one forward per window with K and V fake-quantized), timed per
window after loading. Each step's peak GPU memory is measured on its own and includes the weights; each
mean includes the first window's warm-up.
"""
import os
import shutil
import sys
import tempfile
import time

import torch

from .. import MoqaeError
from ..calibrate.dump import dump
from ..corpus import ByteTokenizer, windows as cut_windows
from ..evaluate.run import Evaluation
from ..model import load_model, model_shape
from ..router import random_export
from .report import write_section

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=256),
}


def save_random_model(shape: str, seq_len: int, directory: str, device: str) -> str:
    """A random Llama of `shape` that reads `seq_len` positions, initialised on `device`, saved in bfloat16."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=seq_len, **SHAPES[shape])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    del model
    return directory


def peak_memory_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    """Torch's peak allocated GPU memory since the last reset, or None off the GPU."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30


def device_check(corpus: str, *, shape: str = "llama2-7b", windows: int = 4, seq_len: int = 4096, device: str = "cuda",
                 out: str | None = None) -> list[dict]:
    """Dumps and evaluates `windows` windows of `seq_len` bytes of `corpus` on a random model of `shape`;
    returns one row per step: seconds per window and peak GPU memory (GiB)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MoqaeError(f"--device {device}: CUDA is not available on this machine")
    if not os.path.isfile(corpus):
        raise MoqaeError(f"{corpus}: corpus file not found")
    work = tempfile.mkdtemp(prefix="moqae-device-")
    try:
        text = os.path.join(work, "text.txt")
        with open(corpus, "rb") as f:   # 3 bytes more complete a character the cut would split; none is a window
            head = f.read(windows * seq_len + 3).decode("utf-8", "ignore")
        if len(head.encode()) < windows * seq_len:
            raise MoqaeError(f"{corpus}: fewer than {windows} windows of {seq_len} bytes")
        with open(text, "w", encoding="utf-8") as f:
            f.write(head)
        started = time.perf_counter()
        model_dir = save_random_model(shape, seq_len, os.path.join(work, "model"), device)
        print(f"random {shape} saved in {time.perf_counter() - started:.0f} s", flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

        peak_memory_reset(device)
        _, dump_seconds = dump(model_dir, [text], os.path.join(work, "store"), tokenizer="bytes", seq_len=seq_len,
                               fraction=1.0, device=device, model_dtype="bfloat16")
        rows = [{"step": "dump (Taylor)", "seconds": dump_seconds, "peak_gib": peak_memory_gib(device)}]
        print(rows[-1], flush=True)

        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        peak_memory_reset(device)
        model = load_model(model_dir, device, None, "bfloat16")
        layers, heads, head_dim, _ = model_shape(model.config)
        export = random_export(layers, heads, head_dim, group=1)
        ids = cut_windows([head], ByteTokenizer(), seq_len)
        evaluation = Evaluation(model, ids, export, value_group=head_dim, model_dir=model_dir, batch_size=1, progress=False)
        started = time.perf_counter()
        evaluation.router()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rows.append({"step": "eval (router plan)", "seconds": (time.perf_counter() - started) / len(ids),
                     "peak_gib": peak_memory_gib(device)})
        print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    lines = [f"Written by `python -m moqae device-check {' '.join(sys.argv[2:])}`.", "",
             f"- A random {shape} Llama in bfloat16 on {name}; {windows} byte windows of {seq_len:,} tokens of "
             f"`{os.path.basename(corpus)}`; seconds per window after the model has loaded; torch's peak allocated GPU "
             "memory, weights included", "",
             "| step | seconds per window | peak GPU memory |", "|---|---|---|"]
    lines += [f"| {row['step']} | {row['seconds']:.3f} | "
              f"{'n/a' if row['peak_gib'] is None else format(row['peak_gib'], '.1f') + ' GiB'} |" for row in rows]
    report = "\n".join(lines) + "\n"
    print(report)
    if out:
        write_section(out, "Performance", "On a GPU", report)
        print(f"wrote {out}")
    return rows

"""Times `exact_answer_delta` on the needle windows of a calibration text whose answer the background puts
at risk: the last layer attending from the answer positions alone (as the dump does) against every
position, alternating on the same window, with the largest difference of their deltas.

    PYTHONPATH=python python/.venv/bin/python -m moqae.harness.answer_timing [WINDOWS]
"""
import sys
import time

import torch

from ..calibrate import background as background_module
from ..calibrate import sensitivity
from ..calibrate.background import Background, exact_answer_delta
from ..corpus import read_texts, tokenizer_for
from ..experts import parse_expert
from ..model import load_model
from ..tasks import passkey_windows

MODEL, TEXT, SEQ_LEN, CHUNK = "models/passkey-byte-llama", "models/wikitext-2/valid.txt", 2048, 32


def every_position(*args, outputs=None):
    """resumed_layers as it was: the last layer over every position, the answers' rows taken after."""
    hidden = sensitivity.resumed_layers(*args)
    return hidden if outputs is None else hidden[:, outputs]


def main(windows):
    model = load_model(MODEL, "cpu", None, "float32")
    experts = [parse_expert(name) for name in ("fp16", "int4", "int2")]
    head_dim = model.config.head_dim
    task = passkey_windows(read_texts([TEXT])[0], tokenizer_for("bytes", MODEL), SEQ_LEN, windows, 0)
    plan = Background("int2", experts, model.config.num_hidden_layers, CHUNK, head_dim)
    for row in range(windows):
        slots = torch.as_tensor(task.answer_positions[row]) - 1
        timed = {}
        for name, resumed in (("answers only", sensitivity.resumed_layers), ("every position", every_position)):
            background_module.resumed_layers = resumed
            start = time.perf_counter()
            delta = exact_answer_delta(model, task.ids[row], experts, CHUNK, head_dim, MODEL, plan, slots)
            timed[name] = (delta, time.perf_counter() - start)
        background_module.resumed_layers = sensitivity.resumed_layers
        (fast, fast_s), (slow, slow_s) = timed["answers only"], timed["every position"]
        if fast is None:
            print(f"window {row}: not at risk ({fast_s:.1f} s)", flush=True)
            continue
        print(f"window {row}: answers only {fast_s:.1f} s, every position {slow_s:.1f} s, {slow_s / fast_s:.2f}x; "
              f"largest difference {(fast - slow).abs().max().item():.1e} of {slow.abs().max().item():.3f}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 12)

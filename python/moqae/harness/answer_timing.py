"""Times `exact_answer_delta` on the needle windows of a calibration text whose answer the background puts
at risk, side by side on the same window: as the dump runs it, then without each of its two savings in
turn, with the largest difference of their deltas.

- "dump": the first resumed layer attends as the background less and plus each row's raised chunk
  (`RaisedChunks`), and the last layer from the answer positions alone;
- "every key": the first resumed layer's rows attend over all T keys (SDPA on the background's K, V with the
  row's chunk replaced);
- "every key and position": that, and the last layer over every position, the answers' rows taken after.

    PYTHONPATH=python python/.venv/bin/python -m moqae.harness.answer_timing [WINDOWS]
"""
import contextlib
import sys
import time

import torch
from torch.nn.attention.bias import causal_lower_right

from ..calibrate import background as background_module
from ..calibrate import sensitivity
from ..calibrate.background import Background, RaisedChunks, exact_answer_delta
from ..corpus import read_texts, tokenizer_for
from ..experts import parse_expert
from ..model import load_model
from ..tasks import passkey_windows

MODEL, TEXT, SEQ_LEN, CHUNK = "models/passkey-byte-llama", "models/wikitext-2/valid.txt", 2048, 32


def every_key(self, module, query, attention_mask, scaling):
    """RaisedChunks.attend as SDPA over every key: the background's K, V with each row's chunk raised."""
    background = self.background_attention
    key, value = (x.expand(query.shape[0], -1, -1, -1).clone() for x in (background.key[None], background.value[None]))
    for row, span in enumerate(self.spans):
        key[row, :, span], value[row, :, span] = self.new[0][row], self.new[1][row]
    group = query.shape[1] // key.shape[1]
    key, value = (x.repeat_interleave(group, dim=1) for x in (key, value))
    mask = causal_lower_right(query.shape[-2], key.shape[-2])
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()


def every_position(*args, outputs=None):
    """resumed_layers with the last layer over every position, the answers' rows taken after."""
    hidden = sensitivity.resumed_layers(*args)
    return hidden if outputs is None else hidden[:, outputs]


@contextlib.contextmanager
def variant(name):
    attend, resumed = RaisedChunks.attend, background_module.resumed_layers
    if name != "dump":
        RaisedChunks.attend = every_key
    if name == "every key and position":
        background_module.resumed_layers = every_position
    try:
        yield
    finally:
        RaisedChunks.attend, background_module.resumed_layers = attend, resumed


def main(windows):
    model = load_model(MODEL, "cpu", None, "float32")
    experts = [parse_expert(name) for name in ("fp16", "int4", "int2")]
    head_dim = model.config.head_dim
    task = passkey_windows(read_texts([TEXT])[0], tokenizer_for("bytes", MODEL), SEQ_LEN, windows, 0)
    plan = Background("int2", experts, model.config.num_hidden_layers, CHUNK, head_dim)
    for row in range(windows):
        slots = torch.as_tensor(task.answer_positions[row]) - 1
        timed = {}
        for name in ("dump", "every key", "every key and position"):
            with variant(name):
                start = time.perf_counter()
                timed[name] = (exact_answer_delta(model, task.ids[row], experts, CHUNK, head_dim, MODEL, plan, slots),
                               time.perf_counter() - start)
            if timed[name][0] is None:
                break
        fast, fast_s = timed["dump"]
        if fast is None:
            print(f"window {row}: not at risk ({fast_s:.1f} s)", flush=True)
            continue
        line = [f"window {row}: dump {fast_s:.1f} s"]
        for name in ("every key", "every key and position"):
            delta, seconds = timed[name]
            line.append(f"{name} {seconds:.1f} s ({seconds / fast_s:.2f}x, largest difference "
                        f"{(fast - delta).abs().max().item():.1e})")
        print("; ".join(line) + f"; largest delta {fast.abs().max().item():.3f}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 12)

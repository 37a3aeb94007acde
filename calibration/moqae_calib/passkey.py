"""Pass-key retrieval windows: a needle holding a random 5-digit key hidden in haystack text, and a
question at the end whose answer is the key.

A window of `seq_len` tokens is: haystack, the needle, more haystack, then the question, the answer (the
key's tokens) and a full stop,

    … haystack … " The pass key is 52817. Remember it. " … haystack … " What is the pass key? The pass key is 52817."

The answer's tokens are scored by teacher forcing: the window is correct when the argmax of the model's
prediction at every answer token, given everything before it, is that token (exact match). Windows
are deterministic in the seed; window i puts the needle at depth (i + 0.5) / count of the haystack
part, so depths are spread evenly over the window.
"""
import math
import random
from dataclasses import dataclass

import torch

from . import CalibError

NEEDLE_START, NEEDLE_END = " The pass key is ", ". Remember it. "
QUESTION = " What is the pass key? The pass key is "
END = "."


@dataclass
class PasskeyWindows:
    ids: torch.Tensor               # (windows, seq_len) int64
    answer_positions: torch.Tensor  # (windows, answer tokens): where each answer token sits in its window
    needle_spans: torch.Tensor      # (windows, 2): first and last + 1 token of the needle
    key_spans: torch.Tensor         # (windows, 2): first and last + 1 token of the key inside the needle
    depths: torch.Tensor            # (windows,) float: needle start / haystack tokens, in [0, 1)
    keys: list                      # the 5-digit keys, as strings
    name: str = "passkey"


def passkey_windows(haystack, tokenizer, seq_len, count, seed):
    """`count` windows of `seq_len` tokens from the haystack text (token slices at random offsets)."""
    hay = tokenizer.encode(haystack)
    generator = random.Random(seed)
    rows, answers, spans, key_spans, depths, keys = [], [], [], [], [], []
    for index in range(count):
        key = f"{generator.randrange(10 ** 5):05d}"
        question, answer, end = tokenizer.encode(QUESTION), tokenizer.encode(key), tokenizer.encode(END)
        needle_start = tokenizer.encode(NEEDLE_START)
        needle = needle_start + answer + tokenizer.encode(NEEDLE_END)
        room = seq_len - len(needle) - len(question) - len(answer) - len(end)
        if room < 1 or len(hay) < room:
            raise CalibError(f"pass-key windows of {seq_len} tokens need more than {seq_len - room} tokens and a "
                             f"haystack of at least {max(room, 1)} tokens (it has {len(hay)})")
        offset = generator.randrange(len(hay) - room + 1)
        filler = hay[offset: offset + room]
        at = int((index + 0.5) / count * room)
        rows.append(filler[:at] + needle + filler[at:] + question + answer + end)
        first_answer = seq_len - len(end) - len(answer)
        answers.append(list(range(first_answer, first_answer + len(answer))))
        spans.append([at, at + len(needle)])
        key_spans.append([at + len(needle_start), at + len(needle_start) + len(answer)])
        depths.append(at / room)
        keys.append(key)
    return PasskeyWindows(torch.tensor(rows, dtype=torch.long), torch.tensor(answers, dtype=torch.long),
                          torch.tensor(spans, dtype=torch.long), torch.tensor(key_spans, dtype=torch.long), torch.tensor(depths, dtype=torch.float64), keys)


def answer_correct(logits, ids, answer_positions):
    """Exact match per window: logits (B, T, V) of windows ids (B, T); the prediction for the token at
    position p is the argmax of logits[p - 1]. Returns (B,) bool."""
    predicted = logits[:, :-1].argmax(-1)                       # (B, T-1): prediction of token t+1
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
    targets = ids[rows, answer_positions]
    return (predicted[rows, answer_positions - 1] == targets).all(-1)


def wilson_interval(correct, total, z=1.96):
    """The Wilson score interval of a proportion correct / total (95% by default)."""
    if total == 0:
        return (0.0, 1.0)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))

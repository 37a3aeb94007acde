"""Task windows scored by exact match of an answer: pass-key retrieval (a needle holding a random 5-digit
key hidden in haystack text, and a question at the end whose answer is the key), and users' own
records of context, question and answer.

A window of `seq_len` tokens is: haystack, the needle, more haystack, then the question, the answer (the
key's tokens) and a full stop,

    … haystack … " The pass key is 52817. Remember it. " … haystack … " What is the pass key? The pass key is 52817."

The answer's tokens are scored by teacher forcing: the window is correct when the argmax of the model's
prediction at every answer token, given everything before it, is that token (exact match). Windows
are deterministic in the seed; window i puts the needle at depth (i + 0.5) / count of the haystack
part, so depths are spread evenly over the window.
"""
import math
import os
import random
from dataclasses import dataclass

import torch

from . import MoqaeError
from .corpus import read_jsonl, read_texts, windows

NEEDLE_START, NEEDLE_END = " The pass key is ", ". Remember it. "
QUESTION = " What is the pass key? The pass key is "
END = "."


@dataclass
class TaskWindows:
    ids: torch.Tensor               # (windows, seq_len) int64
    answer_positions: object        # per window, (answer tokens,) int64: where each answer token sits; a
                                    # (windows, 5) tensor for pass-key windows, a list of tensors for records
    key_spans: torch.Tensor         # (windows, 2): first and last + 1 token of the answer's source in the
                                    # context (the key in the needle); (-1, -1) where it does not appear
    depths: torch.Tensor            # (windows,) float: the source's start / context tokens, NaN where absent
    keys: list                      # the answers, as strings
    name: str = "passkey"


def passkey_windows(haystack, tokenizer, seq_len, count, seed):
    """`count` windows of `seq_len` tokens from the haystack text (token slices at random offsets)."""
    hay = tokenizer.encode(haystack)
    generator = random.Random(seed)
    rows, answers, key_spans, depths, keys = [], [], [], [], []
    for index in range(count):
        key = f"{generator.randrange(10 ** 5):05d}"
        question, answer, end = tokenizer.encode(QUESTION), tokenizer.encode(key), tokenizer.encode(END)
        needle_start = tokenizer.encode(NEEDLE_START)
        needle = needle_start + answer + tokenizer.encode(NEEDLE_END)
        room = seq_len - len(needle) - len(question) - len(answer) - len(end)
        if room < 1 or len(hay) < room:
            raise MoqaeError(f"pass-key windows of {seq_len} tokens need more than {seq_len - room} tokens and a "
                             f"haystack of at least {max(room, 1)} tokens (it has {len(hay)})")
        offset = generator.randrange(len(hay) - room + 1)
        filler = hay[offset: offset + room]
        at = int((index + 0.5) / count * room)
        rows.append(filler[:at] + needle + filler[at:] + question + answer + end)
        first_answer = seq_len - len(end) - len(answer)
        answers.append(torch.arange(first_answer, first_answer + len(answer)))
        key_spans.append([at + len(needle_start), at + len(needle_start) + len(answer)])
        depths.append(at / room)
        keys.append(key)
    return TaskWindows(torch.tensor(rows, dtype=torch.long), torch.stack(answers), torch.tensor(key_spans, dtype=torch.long),
                       torch.tensor(depths, dtype=torch.float64), keys)


def record_windows(path, tokenizer, seq_len):
    """Windows of a JSONL file of {"context", "question", "answer"} records: each is context, question
    and answer tokens, cut to its last `seq_len` tokens (the context loses its start). Where the answer's
    tokens appear in the kept context, their last occurrence is the source the depth is measured at."""
    rows, answers, key_spans, depths, keys = [], [], [], [], []
    try:
        records = read_jsonl(path, ("context", "question", "answer"))
    except (OSError, UnicodeDecodeError) as error:
        raise MoqaeError(f"{path}: cannot read the task file ({error})") from None
    for number, record in records:
        context, question, answer = (tokenizer.encode(record[k]) for k in ("context", "question", "answer"))
        keep = seq_len - len(question) - len(answer)
        if not answer or keep < 1 or len(context) < keep:
            raise MoqaeError(f"{path}:{number}: {len(context) + len(question) + len(answer)} tokens with a non-empty "
                             f"answer are needed to fill --seq-len {seq_len} with at least one context token")
        context = context[len(context) - keep:]
        source = next((i for i in range(keep - len(answer), -1, -1) if context[i: i + len(answer)] == answer), -1)
        rows.append(context + question + answer)
        answers.append(torch.arange(seq_len - len(answer), seq_len))
        key_spans.append([source, source + len(answer)] if source >= 0 else [-1, -1])
        depths.append(source / keep if source >= 0 else math.nan)
        keys.append(record["answer"])
    if not rows:
        raise MoqaeError(f"{path}: no records")
    return TaskWindows(torch.tensor(rows, dtype=torch.long), answers, torch.tensor(key_spans, dtype=torch.long),
                       torch.tensor(depths, dtype=torch.float64), keys, name=os.path.basename(path))


def answer_correct(logits, ids, answer_positions):
    """Exact match per window: logits (B, T, V) of windows ids (B, T), answer_positions B position
    tensors (a list, or the rows of a tensor); the prediction for the token at position p is the argmax
    of logits[p - 1]. Returns (B,) bool."""
    predicted = logits.argmax(-1)                                # (B, T): prediction of token t+1
    return torch.tensor([bool((predicted[row, positions - 1] == ids[row, positions]).all())
                         for row, positions in enumerate(answer_positions)], dtype=torch.bool)


def wilson_interval(correct, total, z=1.96):
    """The Wilson score interval of a proportion correct / total (95% by default)."""
    if total == 0:
        return (0.0, 1.0)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def task_windows(task, text, tokenizer, seq_len, count, seed):
    """`--task passkey`: `count` (default 200) pass-key windows of the haystack file `text`; `--task
    FILE.jsonl`: the file's records (the first `count` of them, when given)."""
    if task == "passkey":
        return passkey_windows(read_texts([text])[0], tokenizer, seq_len, count or 200, seed)
    if not task.endswith(".jsonl"):
        raise MoqaeError(f"--task {task}: expected passkey or a .jsonl file of context, question and answer records")
    records = record_windows(task, tokenizer, seq_len)
    if count:
        records = TaskWindows(records.ids[:count], records.answer_positions[:count], records.key_spans[:count],
                              records.depths[:count], records.keys[:count], records.name)
    return records


def scored_windows(text, tokenizer, seq_len, max_windows=None, task=None, task_seed=0):
    """The windows an evaluation scores, (windows, seq_len), and their TaskWindows: those of `task` (see
    `task_windows`), or without one the first `max_windows` (default all) windows of the text file and None."""
    if task:
        task_set = task_windows(task, text, tokenizer, seq_len, max_windows, task_seed)
        return task_set.ids, task_set
    text_windows = windows(read_texts([text]), tokenizer, seq_len)
    return (text_windows[:max_windows] if max_windows else text_windows), None

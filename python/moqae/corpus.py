"""Corpus reading and windowing: token ids split into consecutive windows of seq_len, last partial dropped."""
import json

import torch

from . import MoqaeError
from .files import read_text_file


def read_texts(paths):
    """The texts of .txt files (whole file) and .jsonl files (the "text" field of every line)."""
    texts = []
    for path in paths:
        if path.endswith(".jsonl"):
            texts += [record["text"] for _, record in read_jsonl(path, ("text",))]
        elif path.endswith(".txt"):
            texts.append(read_text_file(path, "the corpus"))
        else:
            raise MoqaeError(f"{path}: corpus files must end in .txt or .jsonl")
    return texts


def read_jsonl(path, fields, kind=str):
    """(line number, record) for every non-blank line of a JSONL file; each record must be an object
    whose value for every name in `fields` is a `kind` (strings by default; (int, float) for numbers)."""
    names = " and ".join(f'"{name}"' for name in fields)
    what = "string" if kind is str else "number"
    records = []
    for number, line in enumerate(read_text_file(path, "the JSONL file").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise MoqaeError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(name), kind) for name in fields):
            raise MoqaeError(f"{path}:{number}: expected an object with {what} {names} field{'s' * (len(fields) > 1)}")
        records.append((number, record))
    return records


class ByteTokenizer:
    """Raw UTF-8 bytes as token ids (vocabulary 256), for byte-level models."""
    name = "bytes"

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """The tokenizer saved in the model directory (never downloaded)."""

    def __init__(self, model_dir):
        from transformers import AutoTokenizer
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except Exception as error:  # noqa: BLE001 - transformers raises many kinds here
            raise MoqaeError(f"{model_dir}: no usable tokenizer in the model directory ({type(error).__name__}); "
                             "pass --tokenizer bytes for byte-level models") from None
        self.name = f"{model_dir} ({type(self.tokenizer).__name__})"

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids):
        return self.tokenizer.decode(ids)


def windows(texts, tokenizer, seq_len):
    """All texts tokenized and concatenated, cut into (num_windows, seq_len) int64 windows."""
    ids = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
    count = len(ids) // seq_len
    if count == 0:
        raise MoqaeError(f"the corpus holds {len(ids)} tokens, fewer than one window of --seq-len {seq_len}")
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).reshape(count, seq_len)


def tokenizer_for(kind: str, model_dir: str):
    """`--tokenizer bytes`: a ByteTokenizer; `auto`: the model directory's own."""
    return ByteTokenizer() if kind == "bytes" else HFTokenizer(model_dir)

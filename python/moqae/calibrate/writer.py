"""Writing `moqae-calibration` version 1 stores: shards of at most `shard_size` bytes, each written
atomically; the manifest last, atomically, so a directory with a manifest is always complete.

An interrupted dump leaves complete shards, `dump-state.json` (the settings) and no manifest; with
`resume=True` the writer checks the settings, keeps the complete shards and continues. A parallel
part (`--num-shards/--shard-index`) ends with `part.json` instead of a manifest; `merge` joins parts.
"""
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import MoqaeError
from ..files import read_json_file
from ..store import MANIFEST, JSONFields, check_manifest

STATE = "dump-state.json"
PART = "part.json"
HEADER_BYTES_PER_SEQUENCE = 512      # a generous bound on a sequence's three safetensors header entries


def atomic_write(path, write):
    """`write(temporary_path)`, then fsync, rename over `path`, and fsync of the directory. On failure
    the temporary file is removed and `path` is untouched."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        write(temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except Exception as error:  # noqa: BLE001 - OSError, or safetensors' own error for a failed write
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise MoqaeError(f"{path}: cannot write ({getattr(error, 'strerror', None) or error})") from None
    fsync_directory(os.path.dirname(path) or ".")


def atomic_write_bytes(path, data):
    def write(temporary):
        with open(temporary, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def fsync_directory(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path, value):
    atomic_write_bytes(path, (json.dumps(value, indent=1) + "\n").encode())


def shard_name(index):
    return f"shard-{index:05d}.safetensors"


def completed_shards(directory):
    """Sorted names of the shard files a dump finished (temporary files excluded)."""
    return sorted(n for n in os.listdir(directory) if n.startswith("shard-") and n.endswith(".safetensors"))


class StoreWriter:
    """Collects sequences into shards and writes the manifest (or a part file) at the end. A shard holds
    at least one sequence, so a sequence larger than `shard_size` gets a shard of its own.

    `header`: every manifest field but "sequences". `settings`: everything that must match on resume.
    """

    def __init__(self, directory, header, settings, shard_size, resume=False):
        self.directory, self.header, self.shard_size = directory, header, shard_size
        self.sequences, self.pending, self.pending_bytes = [], {}, 0
        self.pending_entries = []
        if os.path.exists(os.path.join(directory, MANIFEST)):
            raise MoqaeError(f"{directory}: already holds a complete store (manifest.json); choose another --out")
        if resume:
            self._resume(settings)
        else:
            if os.path.isdir(directory) and os.listdir(directory):
                raise MoqaeError(f"{directory}: exists and is not empty; pass --resume to continue an interrupted dump")
            os.makedirs(directory, exist_ok=True)
            atomic_write_json(os.path.join(directory, STATE), settings)
        self.next_shard = len(completed_shards(directory))

    def _resume(self, settings):
        state_path = os.path.join(self.directory, STATE)
        if not os.path.isfile(state_path):
            raise MoqaeError(f"{self.directory}: no interrupted dump to resume (no {STATE})")
        saved = read_json_file(state_path)
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if changed:
            raise MoqaeError(f"{self.directory}: cannot resume with different settings: {', '.join(changed)} changed")
        for name in os.listdir(self.directory):
            if ".tmp-" in name:
                os.unlink(os.path.join(self.directory, name))
        for name in completed_shards(self.directory):
            with safe_open(os.path.join(self.directory, name), framework="pt") as f:
                for key in f.keys():
                    if key.endswith(".inputs"):
                        seq_id = int(key.split(".")[1])
                        tokens = f.get_slice(key).get_shape()[2]
                        self.sequences.append({"id": seq_id, "shard": name, "tokens": tokens})

    @property
    def done_ids(self):
        return {s["id"] for s in self.sequences}

    def add(self, seq_id, inputs, nll, delta):
        """inputs (L, H, T, D) in the store dtype, nll a float, delta (L, H, C, M) float32."""
        size = inputs.numel() * inputs.element_size() + 4 + delta.numel() * 4 + HEADER_BYTES_PER_SEQUENCE
        if self.pending and self.pending_bytes + size > self.shard_size:
            self.flush()
        self.pending[f"seq.{seq_id}.inputs"] = inputs.contiguous().cpu()
        self.pending[f"seq.{seq_id}.nll"] = torch.tensor(nll, dtype=torch.float32)
        self.pending[f"seq.{seq_id}.delta_nll"] = delta.to(torch.float32).contiguous().cpu()
        self.pending_entries.append({"id": seq_id, "tokens": int(inputs.shape[2])})
        self.pending_bytes += size

    def flush(self):
        if not self.pending:
            return
        name = shard_name(self.next_shard)
        atomic_write(os.path.join(self.directory, name), lambda temporary: save_file(self.pending, temporary))
        self.sequences += [dict(entry, shard=name) for entry in self.pending_entries]
        self.next_shard += 1
        self.pending, self.pending_entries, self.pending_bytes = {}, [], 0

    def finish(self, part=None):
        """Writes the last shard, then the manifest (or, for a parallel part, `part.json`)."""
        self.flush()
        body = dict(self.header, sequences=sorted(self.sequences, key=lambda s: s["id"]))
        if part is None:
            atomic_write_json(os.path.join(self.directory, MANIFEST), body)
            os.unlink(os.path.join(self.directory, STATE))
        else:
            atomic_write_json(os.path.join(self.directory, PART), dict(body, part=part))


def read_part(directory):
    """A finished part's `part.json`, its part index and count and its sequences' shards checked."""
    path = os.path.join(directory, PART)
    if not os.path.isfile(path):
        raise MoqaeError(f"{directory}: not a finished dump part (no {PART}); finish it with --resume")
    fields = JSONFields(path, read_json_file(path))
    count = fields.integer("part.count", 1, 1 << 31)
    fields.integer("part.index", 0, count - 1)
    for item in fields.items("sequences", 0, 1 << 63):
        shard = item.string("shard")
        if "/" in shard or not os.path.isfile(os.path.join(directory, shard)):
            raise fields.error(f"{item.context}.shard", f'"{shard}" is not a shard file of this part')
    return fields.root


def merge(out: str, part_dirs: list[str]) -> int:
    """Joins the parts of a parallel dump into one store; returns its sequences. The merged manifest is
    checked as the trainer checks a manifest before any shard is copied, and written last."""
    parts = [(directory, read_part(directory)) for directory in part_dirs]
    first = parts[0][1]
    count = first["part"]["count"]
    for directory, part in parts:
        if part["part"]["count"] != count:
            raise MoqaeError(f"{directory}: part of a {part['part']['count']}-way dump, {parts[0][0]} of a {count}-way one")
    indices = sorted(p["part"]["index"] for _, p in parts)
    if indices != list(range(count)):
        raise MoqaeError(f"merge: expected parts 0..{count - 1} exactly once, got {indices}")
    for directory, part in parts:
        mismatched = [k for k in first if k not in ("sequences", "part") and part.get(k) != first[k]]
        if mismatched:
            raise MoqaeError(f"{directory}: part differs from {parts[0][0]} in {', '.join(mismatched)}")
    if os.path.exists(out) and os.listdir(out):
        raise MoqaeError(f"{out}: exists and is not empty")
    copies, sequences = [], []   # (part shard, store shard); the store's sequences
    for directory, part in sorted(parts, key=lambda p: p[1]["part"]["index"]):
        renamed = {}
        for name in sorted({s["shard"] for s in part["sequences"]}):
            renamed[name] = shard_name(len(copies))
            copies.append((os.path.join(directory, name), renamed[name]))
        sequences += [dict(s, shard=renamed[s["shard"]]) for s in part["sequences"]]
    header = {k: v for k, v in first.items() if k not in ("sequences", "part")}
    manifest = dict(header, sequences=sorted(sequences, key=lambda s: s["id"]))
    check_manifest(os.path.join(out, MANIFEST), manifest)
    os.makedirs(out, exist_ok=True)
    for source, name in copies:
        shutil.copyfile(source, os.path.join(out, name))
    fsync_directory(out)
    atomic_write_json(os.path.join(out, MANIFEST), manifest)
    return len(sequences)

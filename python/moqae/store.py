"""Reading `moqae-calibration` version 1 stores (docs/FORMATS.md, Calibration store): the one manifest
reader, with the trainer's checks and its one-line errors (`PATH/manifest.json: KEY: what was expected`),
and the tensors of a store's sequences. Writing stores is calibrate/writer.py's."""
import math
import os
from dataclasses import dataclass

from safetensors import safe_open

from . import MoqaeError
from .experts import Expert
from .files import read_json_file
from .router_inputs import ROUTER_INPUTS
from .selection import unit_value

MANIFEST = "manifest.json"
FORMAT, VERSIONS = "moqae-calibration", (1, 2, 3)   # 2: around a background plan; 3: sliding layers' held chunks
SENSITIVITIES = ("taylor", "fisher", "exact", "taylor+exact-answers")
MANIFEST_LIMIT = 256 << 20      # bytes: the trainer's cap


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int         # L
    num_kv_heads: int       # H
    head_dim: int           # D


@dataclass(frozen=True)
class Sequence:
    id: int
    shard: str              # file name of the shard holding its tensors, inside the store
    tokens: int


@dataclass(frozen=True)
class Manifest:
    """The fields of `manifest.json` the tools read, checked."""
    path: str               # the manifest file
    model: ModelShape
    router_input: str
    chunk_size: int         # N
    value_group: int
    experts: list[Expert]   # one per delta_nll column
    sensitivity: str
    selection_seed: int
    selection_fraction: float
    seq_len: int            # T
    num_sequences: int      # windows of the corpus
    sequences: list[Sequence]   # in manifest order
    background: dict | None = None   # versions 2 and 3: {"experts": one name per layer, "frozen_chunks": n}
    first_held_chunks: list[int] | None = None   # version 3: per layer, the first chunk its cache holds (sliding layers)

    def split(self, fraction: float) -> list[Sequence]:
        """The sequences with u(id, seed) < fraction: the calibration split at `fraction`."""
        return [s for s in self.sequences if unit_value(s.id, self.selection_seed) < fraction]


class JSONFields:
    """Typed access to dotted key paths of a JSON object, with errors that name the file and the path."""

    def __init__(self, path, root, context=""):
        self.path, self.root, self.context = path, root, context

    def error(self, key, reason):
        return MoqaeError(f"{self.path}: {key}: {reason}")

    def qualified(self, key):
        return f"{self.context}.{key}" if self.context else key

    def value(self, key):
        node = self.root
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise self.error(self.qualified(key), "missing")
            node = node[part]
        return node

    def string(self, key):
        value = self.value(key)
        if not isinstance(value, str):
            raise self.error(self.qualified(key), "expected a string")
        return value

    def integer(self, key, low, high):
        value = self.value(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self.error(self.qualified(key), f"expected an integer in {low}...{high}")
        return value

    def number(self, key):
        value = self.value(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise self.error(self.qualified(key), "expected a number")
        return value

    def items(self, key, low, high):
        value = self.value(key)
        if not isinstance(value, list) or not low <= len(value) <= high:
            raise self.error(key, f"expected a list of {low} to {high} items")
        return [JSONFields(self.path, item, f"{key}[{index}]") for index, item in enumerate(value)]


def read_manifest(directory: str) -> Manifest:
    """Reads and checks `directory/manifest.json` as the trainer does: every field present with the right
    type and range, experts valid and unique with a 16/16 one, sequence ids unique, inside the corpus and
    the store's selection, every sequence `seq_len` tokens in a plain shard file name."""
    if not os.path.exists(directory):
        raise MoqaeError(f"{directory}: no such store directory")
    if not os.path.isdir(directory):
        raise MoqaeError(f"{directory}: is a file, expected a store directory")
    path = os.path.join(directory, MANIFEST)
    return check_manifest(path, read_json_file(path, MANIFEST_LIMIT))


def check_manifest(path: str, root: dict) -> Manifest:
    """The manifest `root` (as JSON) checked as `read_manifest` checks it; errors name `path`."""
    fields = JSONFields(path, root)
    if fields.string("format") != FORMAT:
        raise fields.error("format", f'expected "{FORMAT}"')
    version = fields.integer("version", 0, 1 << 31)
    if version not in VERSIONS:
        raise fields.error("version", f"expected one of {', '.join(map(str, VERSIONS))}")
    model = ModelShape(fields.string("model.name"), fields.integer("model.num_layers", 1, 65535),
                       fields.integer("model.num_kv_heads", 1, 65535), fields.integer("model.head_dim", 1, 65535))
    router_input = fields.string("router_input")
    if router_input not in ROUTER_INPUTS:
        raise fields.error("router_input", f"expected one of {', '.join(ROUTER_INPUTS)}, got \"{router_input}\"")
    chunk_size = fields.integer("chunk_size", 1, 65535)
    value_group = fields.integer("value_group", 1, model.head_dim)
    if model.head_dim % value_group:
        raise fields.error("value_group", f"must divide head_dim {model.head_dim}, got {value_group}")
    experts = []
    for item in fields.items("experts", 1, 255):
        expert = Expert(item.string("name"), item.integer("key_bits", 1, 16), item.integer("value_bits", 1, 16))
        if not all(bits == 16 or bits <= 8 for bits in (expert.key_bits, expert.value_bits)):
            raise fields.error(item.context, f"bits must be 16 or in 1...8, got ({expert.key_bits}, {expert.value_bits})")
        if any(e.name == expert.name for e in experts):
            raise fields.error(item.context, f'duplicate expert name "{expert.name}"')
        experts.append(expert)
    if not any(e.is_unquantized for e in experts):
        raise fields.error("experts", "no expert has 16 key and 16 value bits; delta_nll is measured against one")
    sensitivity = fields.string("sensitivity")
    if sensitivity not in SENSITIVITIES:
        raise fields.error("sensitivity", f"expected one of {', '.join(SENSITIVITIES)}, got \"{sensitivity}\"")
    seed = fields.integer("selection.seed", 0, (1 << 64) - 1)
    fraction = fields.number("selection.fraction")
    if not 0 < fraction <= 1:
        raise fields.error("selection.fraction", f"expected a value in (0, 1], got {fraction}")
    for key in ("corpus.source", "corpus.tokenizer"):   # checked as the trainer checks them; read by no tool
        fields.string(key)
    seq_len = fields.integer("corpus.seq_len", 1, (1 << 31) - 1)
    background, first_held = None, None
    if version == 2 or (version == 3 and "background" in root):
        names = [item.root for item in fields.items("background.experts", model.num_layers, model.num_layers)]
        if not all(any(e.name == name for e in experts) for name in names):
            raise fields.error("background.experts", f"expected {model.num_layers} names of the store's experts")
        background = {"experts": names,
                      "frozen_chunks": fields.integer("background.frozen_chunks", 0, seq_len // chunk_size)}
    if version == 3:
        first_held = [item.root for item in fields.items("first_held_chunks", model.num_layers, model.num_layers)]
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= seq_len // chunk_size for v in first_held):
            raise fields.error("first_held_chunks", f"expected {model.num_layers} integers in 0...{seq_len // chunk_size}")
        if not any(first_held):
            raise fields.error("first_held_chunks", "expected a layer whose cache holds only its last chunks (version 3)")
    num_sequences = fields.integer("corpus.num_sequences", 0, 1 << 63)
    sequences, seen = [], set()
    for item in fields.items("sequences", 1, 1 << 63):
        sequence = Sequence(item.integer("id", 0, (1 << 64) - 1), item.string("shard"), item.integer("tokens", 1, (1 << 31) - 1))
        if not sequence.shard.endswith(".safetensors") or "/" in sequence.shard or sequence.shard.startswith(".") \
                or "\0" in sequence.shard:
            raise fields.error(f"{item.context}.shard",
                               f'expected a file name ending in .safetensors inside the store, got "{sequence.shard}"')
        if sequence.tokens != seq_len:
            raise fields.error(f"{item.context}.tokens", f"expected corpus.seq_len = {seq_len}, got {sequence.tokens}")
        if sequence.id >= num_sequences:
            raise fields.error(f"{item.context}.id", f"id {sequence.id} is outside the corpus of {num_sequences} sequences")
        if sequence.id in seen:
            raise fields.error(f"{item.context}.id", f"duplicate sequence id {sequence.id}")
        if unit_value(sequence.id, seed) >= fraction:
            raise fields.error(f"{item.context}.id", f"sequence {sequence.id} is not in the store's selection")
        seen.add(sequence.id)
        sequences.append(sequence)
    return Manifest(path, model, router_input, chunk_size, value_group, experts, sensitivity, seed, fraction, seq_len,
                    num_sequences, sequences, background, first_held)


class Store:
    """A store opened for reading: its checked manifest, and the tensors of its sequences by name
    (`inputs` (L, H, T, W), `nll` (), `delta_nll` (L, H, C, M)), each shard opened once."""

    def __init__(self, directory: str):
        self.directory = directory
        self.manifest = read_manifest(directory)
        self.shards = {}

    def tensor(self, sequence: Sequence, name: str):
        """The tensor `seq.ID.name` of a sequence of the manifest."""
        if sequence.shard not in self.shards:
            path = os.path.join(self.directory, sequence.shard)
            try:
                self.shards[sequence.shard] = safe_open(path, framework="pt")
            except Exception as error:  # noqa: BLE001 - OSError, or safetensors' own error for a damaged header
                raise MoqaeError(f"{path}: cannot read the shard ({error})") from None
        try:
            return self.shards[sequence.shard].get_tensor(f"seq.{sequence.id}.{name}")
        except Exception as error:  # noqa: BLE001 - a missing tensor, or a damaged shard
            raise MoqaeError(f"{os.path.join(self.directory, sequence.shard)}: tensor \"seq.{sequence.id}.{name}\": "
                             f"{error}") from None

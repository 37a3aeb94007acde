"""KV bit-width experts: `fp16` = (16, 16), `intB` = (B, B), `kXvY` = (X, Y); bits below 16 are 1..8."""
import re
from dataclasses import dataclass

from . import MoqaeError


@dataclass(frozen=True)
class Expert:
    name: str
    key_bits: int
    value_bits: int

    @property
    def is_unquantized(self):
        return self.key_bits == 16 and self.value_bits == 16


def _valid(bits):
    return bits == 16 or 1 <= bits <= 8


def parse_expert(name):
    name = name.strip()
    if name == "fp16":
        return Expert(name, 16, 16)
    match = re.fullmatch(r"int(\d+)", name)
    if match:
        key_bits = value_bits = int(match.group(1))
    else:
        match = re.fullmatch(r"k(\d+)v(\d+)", name)
        if not match:
            raise MoqaeError(f"--experts: unknown expert '{name}' (expected fp16, intB or kXvY, e.g. int4, k4v2)")
        key_bits, value_bits = int(match.group(1)), int(match.group(2))
    if not (_valid(key_bits) and _valid(value_bits)):
        raise MoqaeError(f"--experts: '{name}' has bits outside 1..8 (or 16)")
    return Expert(name, key_bits, value_bits)


def parse_experts(text):
    """A comma-separated expert set; it must hold a 16/16 expert and no duplicates."""
    experts = [parse_expert(part) for part in text.split(",") if part.strip()]
    if not any(e.is_unquantized for e in experts):
        raise MoqaeError(f"--experts: '{text}' has no 16/16 expert (add fp16): delta_nll is measured against it")
    if len({e.name for e in experts}) != len(experts):
        raise MoqaeError(f"--experts: '{text}' names an expert twice")
    if len(experts) > 255:
        raise MoqaeError("--experts: at most 255 experts")
    return experts

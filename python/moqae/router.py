"""Reading an MQAE router export and running its routers in torch (the evaluator's side of the trainer).

The export (little-endian, no padding; docs/FORMATS.md): a 32-byte header (magic "MQAE", u16 version,
u8 weight dtype 1 = binary16 / 2 = binary32, u8 M, u16 D, R, N, G, L, H, u8 flags with bit 0 = first
chunk frozen and bits 1–2 = router input (0 key, 1 key-prerope, 2 key+value, 3 key+chunk), then in version 2 a u8
router kind (the chunk pooling: 0 vote, 1 mean, 2 max; version 1 is vote) and a u16 hidden width H
(version 1: H = M), in version 3 also an f32 bits price at bytes 24–27, and zero bytes to 32), M (key_bits,
value_bits) pairs, per router W1 (D×H),
W2 (D×H), W3 (H×M) row-major, and a CRC-32 of everything before it.
"""
import math
import os
import struct
import zlib
from dataclasses import dataclass

import torch

from . import MoqaeError
from .experts import Expert, parse_expert
from .files import read_regular_file
from .router_inputs import ROUTER_INPUTS

HEADER = struct.Struct("<4sHBBHHHHHHB11s")
POOLINGS = ("vote", "mean", "max")                      # by their code in header byte 21 (version 2)


@dataclass
class RouterExport:
    experts: list           # Expert per column
    input_dim: int          # D
    chunk_size: int         # N
    group_size: int         # G
    num_layers: int         # L
    num_kv_heads: int       # H
    freeze_first_chunk: bool
    router_input: str       # "key", "key-prerope" or "key+value"
    pooling: str            # "vote" (the paper's), "mean" or "max"
    weights: list           # per router: (W1 (D, H), W2 (D, H), W3 (H, M)) float32 tensors
    bits_price: float = 0.0  # nats per average bit taken from every token logit (version 3; `calibrate-bits`)
    weight_dtype: torch.dtype = torch.float16   # as stored: binary16 or binary32

    @property
    def num_routers(self):
        return len(self.weights)

    def leader(self, router):
        return router * self.group_size

    def router_of_layer(self, layer):
        return layer // self.group_size


EXPORT_LIMIT = 64 << 20     # bytes: a thousand routers of D = 512, M = 8 in binary32 fit (the trainer's cap too)


def read_export(path):
    """Reads and checks an export: magic, version, dtype, exact size, CRC, header fields, finite weights."""
    data = read_regular_file(path, EXPORT_LIMIT, b"MQAE", "not a router export (magic is not MQAE)")
    if len(data) < HEADER.size + 4:
        raise MoqaeError(f"{path}: {len(data)} bytes, too small for a router export")
    magic, version, dtype, M, D, R, N, G, L, H, flags, reserved = HEADER.unpack_from(data)
    if magic != b"MQAE":
        raise MoqaeError(f"{path}: not a router export (magic is not MQAE)")
    if version not in (1, 2, 3):
        raise MoqaeError(f"{path}: export version {version} is not supported (expected 1, 2 or 3)")
    if dtype not in (1, 2):
        raise MoqaeError(f"{path}: weight dtype {dtype} is unknown (expected 1 = binary16 or 2 = binary32)")
    kind, hidden, reserved = (0, M, reserved) if version == 1 else (reserved[0], int.from_bytes(reserved[1:3], "little"), reserved[3:])
    price = 0.0
    if version == 3:
        price, reserved = struct.unpack_from("<f", reserved)[0], reserved[4:]
    if hidden < 1:
        raise MoqaeError(f"{path}: header holds a zero hidden width")
    width = 2 if dtype == 1 else 4
    expected = HEADER.size + 2 * M + R * (2 * D * hidden + hidden * M) * width + 4
    if len(data) != expected:
        raise MoqaeError(f"{path}: file is {len(data)} bytes, its header implies {expected}")
    if zlib.crc32(data[:-4]) != struct.unpack_from("<I", data, len(data) - 4)[0]:
        raise MoqaeError(f"{path}: CRC-32 mismatch: the file is damaged")
    if flags & ~7 or any(reserved):
        raise MoqaeError(f"{path}: reserved header bits are not zero")
    if kind >= len(POOLINGS):
        raise MoqaeError(f"{path}: router kind {kind} is unknown (expected 0 = vote, 1 = mean, 2 = max)")
    if min(M, D, N, G, L, H) < 1 or R != math.ceil(L / G):
        raise MoqaeError(f"{path}: inconsistent header (M={M}, D={D}, R={R}, N={N}, G={G}, L={L}, H={H})")
    router_input = ROUTER_INPUTS[flags >> 1]   # bits 1–2: every code is known
    if router_input == "key+value" and D % 2:
        raise MoqaeError(f"{path}: D = {D} is odd, but key+value inputs are two head vectors")
    experts = []
    for index in range(M):
        kb, vb = data[HEADER.size + 2 * index], data[HEADER.size + 2 * index + 1]
        if not all(b == 16 or 1 <= b <= 8 for b in (kb, vb)):
            raise MoqaeError(f"{path}: expert {index} has invalid bits ({kb}, {vb})")
        experts.append(Expert("fp16" if (kb, vb) == (16, 16) else (f"int{kb}" if kb == vb else f"k{kb}v{vb}"), kb, vb))
    count = R * (2 * D * hidden + hidden * M)
    values = torch.frombuffer(bytearray(data[HEADER.size + 2 * M: HEADER.size + 2 * M + count * width]),
                              dtype=torch.float16 if dtype == 1 else torch.float32).float()
    if not torch.isfinite(values).all():
        raise MoqaeError(f"{path}: holds a non-finite weight")
    if not math.isfinite(price):
        raise MoqaeError(f"{path}: holds a non-finite bits price")
    weights, offset = [], 0
    for _ in range(R):
        w1 = values[offset: offset + D * hidden].reshape(D, hidden)
        w2 = values[offset + D * hidden: offset + 2 * D * hidden].reshape(D, hidden)
        w3 = values[offset + 2 * D * hidden: offset + 2 * D * hidden + hidden * M].reshape(hidden, M)
        weights.append((w1, w2, w3))
        offset += 2 * D * hidden + hidden * M
    return RouterExport(experts, D, N, G, L, H, bool(flags & 1), router_input, POOLINGS[kind], weights, price,
                        torch.float16 if dtype == 1 else torch.float32)


def token_logits(x, weights):
    """z = (SiLU(x W1) ⊙ (x W2)) W3 for token vectors x (..., D), in float32."""
    w1, w2, w3 = (w.to(x.device) for w in weights)
    x = x.float()
    return (torch.nn.functional.silu(x @ w1) * (x @ w2)) @ w3


def export_logits(export, router, x):
    """One router's token logits as the export decides on them: z − price · bits_j (..., M), bits_j the
    average of expert j's key and value bits."""
    logits = token_logits(x, export.weights[router])
    if export.bits_price == 0:
        return logits
    bits = torch.tensor([(e.key_bits + e.value_bits) / 2 for e in export.experts], device=logits.device)
    return logits - export.bits_price * bits


def token_probabilities(x, weights):
    """p = softmax(z) for token vectors x (..., D), in float32."""
    return torch.softmax(token_logits(x, weights), dim=-1)


def pooled_probabilities(logits, chunk_size, pooling):
    """P_u = softmax over experts of the mean ("mean") or maximum ("max") over each chunk's tokens of
    log p: logits (..., C·N, M) → (..., C, M)."""
    log_p = torch.log_softmax(logits, dim=-1)
    log_p = log_p.reshape(*log_p.shape[:-2], -1, chunk_size, log_p.shape[-1])
    return torch.softmax(log_p.mean(-2) if pooling == "mean" else log_p.amax(-2), dim=-1)


def pooled_decisions(unit_probabilities, experts):
    """The expert of highest P_u; a tie goes to more bits, then to the lower index. (..., C, M) → (..., C)."""
    return best_expert((unit_probabilities == unit_probabilities.max(-1, keepdim=True).values).long(), experts)


def chunk_decisions(probabilities, experts, chunk_size):
    """Eq. 2: per chunk of N tokens, the expert that is the argmax of the most tokens; a tie goes to the
    expert with more bits, then to the lower index. probabilities (..., C·N, M) → (..., C)."""
    M = probabilities.shape[-1]
    tokens = probabilities.reshape(*probabilities.shape[:-2], -1, chunk_size, M)
    counts = torch.nn.functional.one_hot(tokens.argmax(-1), M).sum(-2)            # (..., C, M)
    return best_expert(counts, experts)


def best_expert(rank, experts):
    """Per row of `rank` (..., M) (vote counts, or 1 where P_u is highest), the expert of highest rank;
    a tie goes to more bits, then to the lower index: the one tie rule of every chunk decision."""
    M = rank.shape[-1]
    total_bits = torch.tensor([e.key_bits + e.value_bits for e in experts], device=rank.device)
    return (rank * 1_000_000 + total_bits * 1_000 - torch.arange(M, device=rank.device)).argmax(-1)


def routed_logits(export, router, inputs):
    """Token logits (..., routed C·N, M) of one router over its leader layer's input vectors (..., T, D),
    chunk 0 (when frozen) and the tail left out."""
    first = 1 if export.freeze_first_chunk else 0
    C = inputs.shape[-2] // export.chunk_size
    return export_logits(export, router, inputs[..., first * export.chunk_size: C * export.chunk_size, :])


def route(export, router, inputs):
    """Decisions of one router for its leader layer's input vectors (..., T, D) over the routed chunks:
    (..., C) with chunk 0 (when frozen) and the tail left out: returns decisions for chunks first..C-1."""
    return decisions_of_logits(export, routed_logits(export, router, inputs))


def route_chunks(export, router, inputs):
    """Decisions of one router for input vectors (..., C·N, D) of whole chunks: (..., C)."""
    return decisions_of_logits(export, export_logits(export, router, inputs))


def decisions_of_logits(export, logits):
    """Per chunk, the expert the export's pooling picks from token logits (..., C·N, M): (..., C)."""
    if export.pooling == "vote":
        return chunk_decisions(torch.softmax(logits, dim=-1), export.experts, export.chunk_size)
    return pooled_decisions(pooled_probabilities(logits, export.chunk_size, export.pooling), export.experts)


def keep_probability(export, logits):
    """The router's probability of keeping each chunk above 2 bits, from token logits (..., C·N, M):
    (..., C), the pooled probability of the experts of more than 2 average bits (vote pooling: the
    chunk's mean token probability of them)."""
    above = torch.tensor([(e.key_bits + e.value_bits) / 2 > 2 for e in export.experts], device=logits.device)
    if export.pooling == "vote":
        token_keep = (torch.softmax(logits, dim=-1) * above).sum(-1)
        return token_keep.reshape(*token_keep.shape[:-1], -1, export.chunk_size).mean(-1)
    return (pooled_probabilities(logits, export.chunk_size, export.pooling) * above).sum(-1)


def random_export(layers, heads, width, experts="fp16,int4,int2", group=1, freeze=True, router_input="key",
                  pooling="vote", seed=0, scale=1.0):
    """Routers of random weights, for tests and benchmarks of models that have no trained router: normal
    draws scaled by `scale` and rounded to binary16 (so an export round-trips them exactly); scale 0
    gives all-equal logits, so every tie goes to fp16."""
    generator = torch.Generator().manual_seed(seed)
    experts = [parse_expert(name) for name in experts.split(",")]
    M = len(experts)

    def weight(rows, columns):
        return (torch.randn(rows, columns, generator=generator) * scale).half().float()

    weights = [(weight(width, M), weight(width, M), weight(M, M)) for _ in range(math.ceil(layers / group))]
    return RouterExport(experts, width, 32, group, layers, heads, freeze, router_input, pooling, weights)


def write_export(path, export, dtype=None):
    """Writes `export` in the format `read_export` reads: version 1 for the paper's router (vote pooling,
    hidden width M), version 3 for one with a bits price, version 2 otherwise; weights as binary16
    (dtype 1) or binary32 (2), by default as read, the price as binary32."""
    dtype = dtype or export.weight_dtype
    M, hidden = len(export.experts), export.weights[0][2].shape[0]
    version = 3 if export.bits_price != 0 else 1 if export.pooling == "vote" and hidden == M else 2
    flags = int(export.freeze_first_chunk) | ROUTER_INPUTS.index(export.router_input) << 1
    extra = b"" if version == 1 else bytes([POOLINGS.index(export.pooling)]) + hidden.to_bytes(2, "little")
    if version == 3:
        extra += struct.pack("<f", export.bits_price)
    header = HEADER.pack(b"MQAE", version, 1 if dtype == torch.float16 else 2, M, export.input_dim, export.num_routers,
                         export.chunk_size, export.group_size, export.num_layers, export.num_kv_heads, flags,
                         extra.ljust(11, b"\0"))
    body = header + bytes(b for e in export.experts for b in (e.key_bits, e.value_bits))
    body += b"".join(w.to(dtype).contiguous().numpy().tobytes() for weights in export.weights for w in weights)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as f:
        f.write(body + zlib.crc32(body).to_bytes(4, "little"))
    os.replace(temporary, path)

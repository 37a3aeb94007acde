"""Decode attention on a MoQAECache layer's packed units for GPUs, in Triton: the same sums as the CPU
kernel (kernels/packed_attention.cpp), split by unit as flash decoding splits by block.

One program per quantized unit of a width that divides 8 reads the unit's key and value codes once, in
byte planes (plane k of a token's W = D / P bytes holds channels P·i + k), for all G query heads of its
KV head, and writes the unit's softmax maximum, total and weighted value sum. Binary16 units, units of
other widths, the residual, and shapes that are not powers of two (G, D, N) give the same three in torch; `merge` joins every row's partials with one
softmax. Tested for exactness on the CPU under TRITON_INTERPRET=1 (`make test-triton`).
"""
import torch
import triton
import triton.language as tl



@triton.jit
def unit_partials(query, rows, key_codes, key_scale, key_min, value_codes, value_scale, value_min,
                  maxima, totals, sums, scaling,
                  G: tl.constexpr, D: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr, VALUE_BITS: tl.constexpr,
                  GROUPS: tl.constexpr, VALUE_GROUP: tl.constexpr):
    unit = tl.program_id(0)
    row = tl.load(rows + unit)
    g = tl.arange(0, G)
    t = tl.arange(0, N)
    d = tl.arange(0, D)
    q = tl.load(query + (row * G + g)[:, None] * D + d[None, :]) * scaling                       # (G, D)
    # keys: scores (G, N) = Σ_d (q_d s_d) code_{t,d} + Σ_d q_d m_d
    s = tl.load(key_scale + unit * D + d).to(tl.float32)
    m = tl.load(key_min + unit * D + d).to(tl.float32)
    P: tl.constexpr = 8 // BITS
    W: tl.constexpr = D // P
    codes = unpacked(key_codes + unit * N * W, t, d, BITS, W)                                      # (N, D)
    scores = tl.sum((q * s[None, :])[:, None, :] * codes[None, :, :], axis=2) + tl.sum(q * m[None, :], axis=1)[:, None]
    top = tl.max(scores, axis=1)                                                                    # (G,)
    p = tl.exp(scores - top[:, None])                                                               # (G, N)
    # values: Σ_t p_t (code_t s_t + m_t), scale and minimum per token per group of channels
    VP: tl.constexpr = 8 // VALUE_BITS
    VW: tl.constexpr = D // VP
    values = unpacked(value_codes + unit * N * VW, t, d, VALUE_BITS, VW)                             # (N, D)
    groups = d // VALUE_GROUP
    vs = tl.load(value_scale + (unit * N + t)[:, None] * GROUPS + groups[None, :]).to(tl.float32)   # (N, D)
    vm = tl.load(value_min + (unit * N + t)[:, None] * GROUPS + groups[None, :]).to(tl.float32)
    weighted = tl.sum(p[:, :, None] * (values * vs + vm)[None, :, :], axis=1)                        # (G, D)
    tl.store(maxima + unit * G + g, top)
    tl.store(totals + unit * G + g, tl.sum(p, axis=1))
    tl.store(sums + (unit * G + g)[:, None] * D + d[None, :], weighted)


@triton.jit
def unpacked(codes, t, d, BITS: tl.constexpr, W: tl.constexpr):
    """Codes (N, D) as floats of a unit whose tokens are W bytes each: channel d is plane d % P of byte d // P."""
    P: tl.constexpr = 8 // BITS
    byte = tl.load(codes + t[:, None] * W + (d // P)[None, :]).to(tl.int32)
    return ((byte >> ((d % P) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)


def torch_partials(query, keys, values, scaling):
    """Partials of units or residual rows given as floats: query (U, G, D), keys and values (U, n, D) →
    maxima (U, G), totals (U, G), sums (U, G, D)."""
    scores = query @ keys.transpose(-1, -2) * scaling                                                # (U, G, n)
    top = scores.amax(-1)
    p = torch.exp(scores - top[..., None])
    return top, p.sum(-1), p @ values


def merge(rows, maxima, totals, sums, count):
    """One softmax over every partial of each row: (count, G, D) outputs."""
    G, D = sums.shape[1:]
    top = torch.full((count, G), -torch.inf, device=sums.device).scatter_reduce(0, rows[:, None].expand(-1, G), maxima, "amax")
    scale = torch.exp(maxima - top[rows])                                                            # (partials, G)
    total = torch.zeros(count, G, device=sums.device).index_add_(0, rows, scale * totals)
    weighted = torch.zeros(count, G, D, device=sums.device).index_add_(0, rows, scale[..., None] * sums)
    return weighted / total[..., None]


def packed_decode_triton(layer, query, scaling):
    """Attention output (B, 1, Hq, D) of one query token per row (B, Hq, 1, D) over the packed layer, as
    `attention.packed_decode` gives it on the CPU."""
    B, Hq, _, D = query.shape
    _, H, _ = layer.shape
    G, N, value_group = Hq // H, layer.cache.chunk_size, layer.cache.value_group
    per_row = query[:, :, 0].float().reshape(B * H, G, D).contiguous()                               # (B·H, G, D)
    shapes_fit = all(x & (x - 1) == 0 for x in (G, D, N))      # tl.arange takes powers of two
    partials = []
    for (key_part, value_part), (_, part_rows) in zip(layer.parts, layer.places):
        for (start, key_tensors), (_, value_tensors) in zip(key_part.segments(), value_part.segments()):
            count = key_tensors[0].shape[0]
            rows = part_rows[start: start + count].to(torch.int64).contiguous()
            if shapes_fit and all(bits < 16 and 8 % bits == 0 for bits in (key_part.bits, value_part.bits)):
                maxima = torch.empty(count, G, device=query.device)
                totals, sums = torch.empty_like(maxima), torch.empty(count, G, D, device=query.device)
                unit_partials[(count,)](per_row, rows, *key_tensors, *value_tensors, maxima, totals, sums, scaling,
                                        G=G, D=D, N=N, BITS=key_part.bits, VALUE_BITS=value_part.bits,
                                        GROUPS=D // value_group, VALUE_GROUP=value_group)
            else:   # 16-bit units and widths that straddle bytes
                keys = key_part.read(key_tensors, (count,), N, D, torch.float32)
                values = value_part.read(value_tensors, (count,), N, D, torch.float32)
                maxima, totals, sums = torch_partials(per_row[rows], keys, values, scaling)
            partials.append((rows, maxima, totals, sums))
    residual_keys, residual_values = (r.reshape(B * H, -1, D).float() for r in layer.residual)
    if residual_keys.shape[1]:
        partials.append((torch.arange(B * H, device=query.device), *torch_partials(per_row, residual_keys, residual_values, scaling)))
    rows, maxima, totals, sums = (torch.cat(column) for column in zip(*partials))
    return merge(rows, maxima, totals, sums, B * H).reshape(B, 1, Hq, D).to(query.dtype)


"""Golden values for the Swift trainer, computed independently in PyTorch float64.

Writes, next to this script:
  store/           a small calibration store (manifest.json + one shard), written with the
                   reference safetensors library, so the Swift reader is also checked against it;
  golden.safetensors  initial weights and decisions, then for each loss (paper, expected; tensor
                   names prefixed with it) the loss terms, every gradient, and the weights and
                   losses of 5 AdamW steps (torch.optim.AdamW) on the batch of all sequences; the
                   same for the pooled routers (`mean.`, `max.` before the names; the paper's
                   vote pooling has none), and for routers of hidden width 5 (`h5.` before those,
                   from their own initial weights `h5.init.*`);
  router-init.bin  the initial weights as an MQAE export (binary32), written here independently of
                   the Swift writer, so the two can be compared byte for byte and the Python
                   evaluator's decisions checked against the golden ones;
  router-h5-max.bin  the same for the hidden-width-5 weights of a max-pooling router (version 2).

Run: python Tests/MoQAETrainingTests/Golden/make_golden.py   (needs torch, numpy, safetensors)
"""
import json
import math
import os
import struct
import zlib

import numpy as np
import torch
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
L, H, D, T, N, G = 4, 2, 8, 96, 32, 3          # 3 chunks, chunk 0 frozen; routers at layers 0 and 3
EXPERTS = [("fp16", 16, 16), ("int4", 4, 4), ("int2", 2, 2)]
M = len(EXPERTS)
C = T // N
R = math.ceil(L / G)
LAMBDA = 0.5
SELECTION_SEED, FRACTION = 0, 0.5
MASK = (1 << 64) - 1


def u(seq_id, seed):
    """The split hash (docs/FORMATS.md, Split selection)."""
    phi = 0x9E3779B97F4A7C15
    z = ((seq_id ^ ((seed * phi) & MASK)) + phi) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return (z ^ (z >> 31)) / 2.0**64


def make_store(rng):
    ids = [i for i in range(64) if u(i, SELECTION_SEED) < FRACTION][:3]
    tensors, sequences = {}, []
    for seq_id in ids:
        inputs = rng.standard_normal((L, H, T, D)).astype(np.float32) * 2
        delta = rng.uniform(0, 0.05, (L, H, C, M)).astype(np.float32)
        delta[..., 0] = 0
        delta[..., 2] += 0.05                    # int2 hurts more than int4
        tensors[f"seq.{seq_id}.inputs"] = inputs
        tensors[f"seq.{seq_id}.nll"] = np.array(2.0 + 0.1 * len(sequences), dtype=np.float32)
        tensors[f"seq.{seq_id}.delta_nll"] = delta
        sequences.append({"id": seq_id, "shard": "shard-00000.safetensors", "tokens": T})
    os.makedirs(os.path.join(HERE, "store"), exist_ok=True)
    save_file(tensors, os.path.join(HERE, "store", "shard-00000.safetensors"))
    manifest = {
        "format": "moqae-calibration", "version": 1,
        "model": {"name": "golden", "num_layers": L, "num_kv_heads": H, "head_dim": D},
        "router_input": "key", "chunk_size": N, "value_group": D,
        "experts": [{"name": n, "key_bits": k, "value_bits": v} for n, k, v in EXPERTS],
        "sensitivity": "taylor", "selection": {"seed": SELECTION_SEED, "fraction": FRACTION},
        "corpus": {"source": "random (make_golden.py)", "tokenizer": "none", "seq_len": T, "num_sequences": 64},
        "sequences": sequences,
    }
    with open(os.path.join(HERE, "store", "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return [(tensors[f"seq.{i}.inputs"], float(tensors[f"seq.{i}.nll"]), tensors[f"seq.{i}.delta_nll"]) for i in ids]


def decisions_of(p):
    """Eq. 2: the expert that is the argmax of the most tokens; ties to more bits, then lower index."""
    counts = torch.nn.functional.one_hot(p.argmax(-1), M).sum(-2)          # (units, M)
    total_bits = torch.tensor([k + v for _, k, v in EXPERTS], dtype=torch.float64)
    order = torch.arange(M, dtype=torch.float64)
    score = counts.double() * 1e6 + total_bits * 1e3 - order                 # lexicographic
    return score.argmax(-1)


def pooled_decisions(P):
    """The expert of highest P_u; ties to more bits, then lower index."""
    total_bits = torch.tensor([k + v for _, k, v in EXPERTS], dtype=torch.float64)
    best = (P == P.max(-1, keepdim=True).values).double()
    return (best * 1e6 + total_bits * 1e3 - torch.arange(M, dtype=torch.float64)).argmax(-1)


def sequence_loss(kind, weights, inputs, nll, delta, pooling="vote"):
    """paper: docs/FORMATS.md, Losses. expected: λ Σ_u Σ_j P_u[j] D_u[j] + (1−λ) (1/U) Σ_u Σ_j P_u[j] B_j/16, with D_u[j]
    the unit's delta_nll summed over its router's layers. P_u: vote, the chunk mean of the token
    probabilities; mean or max, the softmax of the chunk mean or max of the token log-probabilities."""
    B = torch.tensor([(k + v) / 2 for _, k, v in EXPERTS], dtype=torch.float64)
    units_p, units_dec, units_delta, lnll = [], [], [], torch.tensor(nll, dtype=torch.float64)
    for r in range(R):
        w1, w2, w3 = weights[3 * r: 3 * r + 3]
        x = torch.from_numpy(inputs[r * G]).double()[:, N:C * N, :]          # (H, routed tokens, D)
        z = ((torch.nn.functional.silu(x @ w1) * (x @ w2)) @ w3).reshape(H, C - 1, N, M)
        if pooling == "vote":
            p = torch.softmax(z, -1)
            dec = decisions_of(p.detach())                                   # (H, C-1)
            unit_p = p.mean(2)
        else:
            log_p = torch.log_softmax(z, -1)
            unit_p = torch.softmax(log_p.mean(2) if pooling == "mean" else log_p.amax(2), -1)
            dec = pooled_decisions(unit_p.detach())
        group = torch.from_numpy(delta[r * G: min(L, (r + 1) * G), :, 1:, :]).double()   # (layers, H, C-1, M)
        lnll = lnll + group.gather(-1, dec[None, ..., None].expand(group.shape[0], -1, -1, 1)).sum()
        units_p.append(unit_p.reshape(-1, M))                               # P_u, (units, M)
        units_dec.append(dec.reshape(-1))
        units_delta.append(group.sum(0).reshape(-1, M))                     # D_u, (units, M)
    P = torch.cat(units_p)
    dec = torch.cat(units_dec)
    U = P.shape[0]
    if kind == "paper":
        chosen = P.gather(-1, dec[:, None]).squeeze(-1)                      # P_u[R_u]
        l_model = (chosen * lnll.detach() / B[dec]).sum() / U
        l_mem = (chosen * B[dec] / 16).sum() / U
    else:
        l_model = (P * torch.cat(units_delta)).sum()
        l_mem = (P * B / 16).sum() / U
    return LAMBDA * l_model + (1 - LAMBDA) * l_mem, l_model, l_mem, lnll, dec


def write_export(weights, path, pooling="vote", hidden=M):
    """docs/FORMATS.md: header, expert table, W1, W2, W3 per router as binary32, CRC-32. Version 1 for
    the paper's router; version 2 with the router kind and hidden width for others."""
    if pooling == "vote" and hidden == M:
        header = struct.pack("<4sHBBHHHHHHB11s", b"MQAE", 1, 2, M, D, R, N, G, L, H, 1, bytes(11))
    else:
        header = struct.pack("<4sHBBHHHHHHBBH8s", b"MQAE", 2, 2, M, D, R, N, G, L, H, 1,
                             ("vote", "mean", "max").index(pooling), hidden, bytes(8))
    body = header + bytes(b for _, k, v in EXPERTS for b in (k, v))
    body += b"".join(np.asarray(w, dtype="<f4").tobytes() for w in weights)
    with open(path, "wb") as f:
        f.write(body + struct.pack("<I", zlib.crc32(body)))


def initial_weights(rng, hidden):
    """torch.nn.Linear's initialisation for each router: W1, W2 (D, hidden), W3 (hidden, M), as float32."""
    weights = []
    for _ in range(R):
        weights += [rng.uniform(-1 / math.sqrt(D), 1 / math.sqrt(D), (D, hidden)),
                    rng.uniform(-1 / math.sqrt(D), 1 / math.sqrt(D), (D, hidden)),
                    rng.uniform(-1 / math.sqrt(hidden), 1 / math.sqrt(hidden), (hidden, M))]
    return [np.asarray(w, dtype=np.float32) for w in weights]   # the Swift side starts from these floats


def main():
    rng = np.random.default_rng(5)
    data = make_store(rng)
    init = initial_weights(rng, M)
    write_export(init, os.path.join(HERE, "router-init.bin"))
    names = [f"router.{r}.{n}" for r in range(R) for n in ("w1", "w2", "w3")]
    out = {f"init.{n}": w for n, w in zip(names, init)}
    init_h5 = initial_weights(rng, 5)
    write_export(init_h5, os.path.join(HERE, "router-h5-max.bin"), pooling="max", hidden=5)
    out.update({f"h5.init.{n}": w for n, w in zip(names, init_h5)})
    for width, pooling, kind in [(w, p, k) for w in (M, 5) for p in ("vote", "mean", "max") for k in ("paper", "expected")]:
        weights = [torch.tensor(w, dtype=torch.float64, requires_grad=True) for w in (init if width == M else init_h5)]
        pool = ("" if width == M else f"h{width}.") + ("" if pooling == "vote" else pooling + ".")

        def batch():
            results = [sequence_loss(kind, weights, *item, pooling=pooling) for item in data]
            loss = sum(r[0] for r in results) / len(results)
            return loss, results

        loss, results = batch()
        loss.backward()
        name = pool + kind
        out[f"{name}.loss"] = np.array(loss.item())
        out[f"{name}.l_model"] = np.array(sum(r[1].item() for r in results) / len(results))
        out[f"{name}.l_mem"] = np.array(sum(r[2].item() for r in results) / len(results))
        out[f"{pool}l_nll"] = np.array([r[3].item() for r in results])
        out[f"{pool}decisions"] = np.stack([r[4].numpy() for r in results]).astype(np.int64)
        for n, w in zip(names, weights):
            out[f"{name}.grad.{n}"] = w.grad.numpy().copy()

        optimizer = torch.optim.AdamW(weights, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        step_losses = []
        for _ in range(5):
            optimizer.zero_grad()
            loss, _ = batch()
            step_losses.append(loss.item())
            loss.backward()
            optimizer.step()
        out[f"{name}.step_losses"] = np.array(step_losses)
        for n, w in zip(names, weights):
            out[f"{name}.after5.{n}"] = w.detach().numpy().copy()
        print(name, "loss", out[f"{name}.loss"], "decisions", out[f"{pool}decisions"].tolist())
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, os.path.join(HERE, "golden.safetensors"))


if __name__ == "__main__":
    main()

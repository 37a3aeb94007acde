"""A straightforward PyTorch implementation of moqae-train's training step (docs/FORMATS.md: Router, Losses), for the
benchmark: per sequence, the leader layers' routed keys go through the routers, decisions and L_nll
are computed, and autograd takes the gradient of the paper's loss; AdamW as moqae-train's."""
import torch

from ..router import chunk_decisions, token_probabilities
from ..store import Store


class TorchTrainer:
    def __init__(self, store: str, group_size: int = 3, lam: float = 0.5, calibration_fraction: float = 0.05, seed: int = 0,
                 freeze_first_chunk: bool = True):
        self.store = Store(store)
        manifest = self.store.manifest
        self.L, self.H, self.D = manifest.model.num_layers, manifest.model.num_kv_heads, manifest.model.head_dim
        self.N = manifest.chunk_size
        self.experts = manifest.experts
        self.M, self.G, self.lam = len(self.experts), group_size, lam
        self.first = 1 if freeze_first_chunk else 0
        self.bits = torch.tensor([(e.key_bits + e.value_bits) / 2 for e in self.experts], dtype=torch.float32)
        self.sequences = manifest.split(calibration_fraction)
        generator = torch.Generator().manual_seed(seed)
        R = (self.L + self.G - 1) // self.G
        bound_d, bound_m = self.D ** -0.5, self.M ** -0.5
        self.weights = [
            [(torch.rand(self.D, self.M, generator=generator) * 2 - 1) * bound_d,
             (torch.rand(self.D, self.M, generator=generator) * 2 - 1) * bound_d,
             (torch.rand(self.M, self.M, generator=generator) * 2 - 1) * bound_m]
            for _ in range(R)]
        for router in self.weights:
            for w in router:
                w.requires_grad_(True)
        self.optimizer = torch.optim.AdamW([w for router in self.weights for w in router], lr=3e-4,
                                           betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def sequence_loss(self, sequence):
        """λ L_model + (1 − λ) L_mem of one sequence, and its number of routed token vectors."""
        T = sequence.tokens
        C = T // self.N
        inputs = self.store.tensor(sequence, "inputs")                     # (L, H, T, D), read lazily per layer
        chosen, choices = [], []
        for router, weights in enumerate(self.weights):
            x = inputs[router * self.G, :, self.first * self.N: C * self.N, :].float()   # (H, rows, D)
            p = token_probabilities(x, weights)                                       # (H, rows, M)
            decisions = chunk_decisions(p.detach(), self.experts, self.N)             # (H, units)
            P = p.reshape(self.H, -1, self.N, self.M).mean(2)                         # (H, units, M)
            chosen.append(P.gather(-1, decisions.unsqueeze(-1)).squeeze(-1))
            choices.append(decisions)
        delta = self.store.tensor(sequence, "delta_nll")                                     # (L, H, C, M)
        l_nll = self.store.tensor(sequence, "nll").double()
        for router, decisions in enumerate(choices):
            for layer in range(router * self.G, min(self.L, (router + 1) * self.G)):
                l_nll = l_nll + delta[layer, :, self.first:C, :].gather(-1, decisions.unsqueeze(-1)).double().sum()
        chosen, choices = torch.stack(chosen), torch.stack(choices)                    # (R, H, units)
        bits = self.bits[choices]
        U = chosen.numel()
        l_model = (chosen * float(l_nll) / bits).sum() / U
        l_mem = (chosen * bits / 16).sum() / U
        return self.lam * l_model + (1 - self.lam) * l_mem, U * self.N

    def step(self, batch):
        """One AdamW step on a batch of manifest sequences; returns (loss, token vectors)."""
        self.optimizer.zero_grad()
        total, vectors = 0.0, 0
        for sequence in batch:
            loss, count = self.sequence_loss(sequence)
            (loss / len(batch)).backward()
            total += float(loss.detach()) / len(batch)
            vectors += count
        self.optimizer.step()
        return total, vectors

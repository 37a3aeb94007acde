"""Allocations under a bits budget: the Lagrangian rule the trainer shares, and the content-blind plans
fitted with it on a store's calibration split (static: per layer, head and chunk position; layer-wise:
one expert per layer), beside the random plan with the router's expert mix.
"""
import math

import torch

from .. import MoqaeError
from ..quantizer import unit_storage_bits
from ..store import Store
from .plans import LayerPlan, StaticPlan, UnitPlan


def lagrangian_allocation(costs, bits, budget):
    """Per item, the option minimising cost + μ·bits with the smallest μ ≥ 0 whose total bits fit the
    budget (100 steps of bisection); a tie goes to more bits, then to the lower index, and a budget no
    μ meets gets each item's fewest-bits option: the trainer's rule (`lagrangianAllocation` in
    Evaluation.swift). costs, bits: (items, M) → (items,) option indices."""
    costs, bits = costs.double(), bits.double()

    def allocate(mu):
        value = costs + mu * bits
        tied = value == value.min(-1, keepdim=True).values
        choice = torch.where(tied, bits, torch.full_like(bits, -math.inf)).argmax(-1)   # first of the most bits
        return choice, bits.gather(-1, choice[:, None]).sum().item()

    choice, total = allocate(0.0)
    if total <= budget:
        return choice
    low, high = 0.0, 1e-12
    choice, total = allocate(high)
    while total > budget:
        high *= 4
        if high > 1e30:
            return bits.argmin(-1)
        choice, total = allocate(high)
    for _ in range(100):
        middle = (low + high) / 2
        candidate, total = allocate(middle)
        if total <= budget:
            high, choice = middle, candidate
        else:
            low = middle
    return choice


def held_allocation(costs, held, unit_bits, budget_per_unit):
    """`lagrangian_allocation` over the units a cache holds: costs (..., M), held (...) bool (a sliding layer's
    chunks before its first held one are False: they cost nothing, take no bits and get option 0, which no one
    reads), unit_bits (M,), and a budget of `budget_per_unit` mean bits over the held units → (...) choices."""
    held = held.expand(costs.shape[:-1]).reshape(-1, 1)
    flat = costs.reshape(-1, costs.shape[-1]).double() * held
    bits = unit_bits.expand(flat.shape[0], -1) * held
    return lagrangian_allocation(flat, bits, budget_per_unit * held.sum().item()).reshape(costs.shape[:-1])


def routed_unit_bits(experts, layout):
    return torch.tensor([unit_storage_bits(e, layout.chunk_size, layout.head_dim, layout.value_group) for e in experts],
                        dtype=torch.float64)


def random_plan(experts, fractions, layout, count, seed=0):
    """Every unit draws its expert independently from the router's expert mix."""
    generator = torch.Generator().manual_seed(seed)
    probabilities = torch.tensor(fractions, dtype=torch.double)
    draws = torch.multinomial(probabilities, count * layout.num_layers * layout.num_heads * layout.routed,
                              replacement=True, generator=generator)
    decisions = draws.reshape(count, layout.num_layers, layout.num_heads, layout.routed)
    return UnitPlan(experts, {w: decisions[w] for w in range(count)}, "random (router's mix)")


class CalibrationDeltas:
    """A store's calibration split, summed: `summed` is (L, H, C, M) delta_nll over its sequences, with
    columns in the order of `experts`, the store's."""

    def __init__(self, store: Store, calibration_fraction: float, layout):
        manifest = store.manifest
        self.store, self.experts = store.directory, manifest.experts
        if manifest.chunk_size != layout.chunk_size or manifest.model.num_layers != layout.num_layers:
            raise MoqaeError(f"{store.directory}: chunk size or layer count differs from the router's")
        split = manifest.split(calibration_fraction)
        if not split:
            raise MoqaeError(f"{store.directory}: --calibration-fraction {calibration_fraction} selects no sequence")
        self.summed = sum(store.tensor(sequence, "delta_nll").double() for sequence in split)
        self.sequences = len(split)

    def columns(self, experts):
        """(L, H, C, len(experts)): the summed deltas of the given experts, by name."""
        names = [e.name for e in self.experts]
        missing = [e.name for e in experts if e.name not in names]
        if missing:
            raise MoqaeError(f"{self.store}: the router's expert(s) {', '.join(missing)} are not in the store "
                             f"(it has {', '.join(names)})")
        return self.summed[..., [names.index(e.name) for e in experts]]


def layerwise_plan(calibration, layout, budget_per_unit):
    """KVTuner-style: one expert of the store per layer, chosen on the store's calibration split to
    minimise the summed delta_nll under the budget of mean unit bits (with constants)."""
    held = layout.held_mask()                                                        # (L, routed)
    fitted = calibration.summed[:, :, layout.first: layout.chunks]                   # (L, H, positions ≤ routed, M)
    cost = (fitted * held[:, None, : fitted.shape[2], None]).sum(dim=(1, 2))
    units = held.sum(-1, keepdim=True).double() * layout.num_heads                    # (L, 1) held units per layer
    bits = routed_unit_bits(calibration.experts, layout)[None] * units
    choice = lagrangian_allocation(cost, bits, budget_per_unit * units.sum().item())
    return LayerPlan(calibration.experts, choice.tolist())


def static_plan(summed, experts, layout, budget_per_unit):
    """The best content-blind plan: one of the router's experts per (layer, head, chunk position),
    minimising the calibration split's summed delta_nll `summed` (L, H, C_store, M) under the budget of
    mean unit bits (with constants), by the Lagrangian search. Positions the store's windows do not
    reach (longer evaluation windows) reuse the last fitted position."""
    fitted = summed[:, :, layout.first: layout.chunks]                               # (L, H, positions ≤ routed, M)
    held = layout.held_mask()[:, None, : fitted.shape[2]]
    choice = held_allocation(fitted, held, routed_unit_bits(experts, layout), budget_per_unit)
    missing = layout.routed - choice.shape[-1]
    if missing > 0:
        choice = torch.cat([choice, choice[..., -1:].expand(-1, -1, missing)], dim=-1)
    return StaticPlan(experts, choice)

"""Allocation: how many weights each layer keeps, given scores. Every allocation keeps
exactly round((1 - sparsity) * total) weights, never Bernoulli draws; ties go to the earlier
layer, then the lower flat index."""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Mapping

import torch

from ..config import ALLOCATIONS
from ..errors import UserError
from ..masks import Mask, kept_count, total_count

LAYERWISE_ALLOCATIONS = ("uniform", "erk", "er-balanced")


def allocate(scores: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor], sparsity: float,
             allocation: str) -> Mask:
    """The mask keeping exactly round((1 - sparsity) * total) weights, all of them kept by `mask`
    already, chosen by highest score: over all layers at once (global) or within each layer after
    `layer_keep_counts` (uniform, erk, er-balanced). Ties go to the earlier layer, then the
    lower flat index."""
    check_allocation(allocation)
    keep = target_keep(mask, sparsity)
    if allocation == "global":
        names = list(mask)
        device = scores[names[0]].device
        flat_scores = torch.cat([scores[n].detach().flatten().double() for n in names])
        flat_kept = torch.cat([mask[n].flatten().to(device) for n in names])
        chosen = _keep_top(flat_scores, flat_kept, keep).split([mask[n].numel() for n in names])
        return {n: c.view(mask[n].shape).to(mask[n].device) for n, c in zip(names, chosen)}
    shapes = {name: tuple(m.shape) for name, m in mask.items()}
    capacity = {name: int(m.sum()) for name, m in mask.items()}
    counts = layer_keep_counts(shapes, keep, allocation, capacity)
    return {name: _keep_top(scores[name].detach().flatten().double(), m.flatten().to(scores[name].device),
                            counts[name]).view(m.shape).to(m.device)
            for name, m in mask.items()}


def _keep_top(flat_scores: torch.Tensor, flat_kept: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool vector selecting the `keep` highest scores among the kept positions; scores tied
    with the lowest one kept go by position. A selection (kthvalue), not a sort: this runs in
    every SynFlow round over all the weights."""
    if keep == 0:
        return torch.zeros_like(flat_kept, dtype=torch.bool)
    # Pruned positions rank last; keep <= kept count, so the threshold is a kept score.
    values = flat_scores.masked_fill(~flat_kept, -math.inf)
    threshold = torch.kthvalue(values, len(values) - keep + 1).values  # the keep-th largest
    chosen = values > threshold
    ties = ((values == threshold) & flat_kept).nonzero().squeeze(1)
    chosen[ties[: keep - int(chosen.sum())]] = True
    return chosen


def target_keep(mask: Mapping[str, torch.Tensor], sparsity: float) -> int:
    """round((1 - sparsity) * total): the kept count at `sparsity`, which masks only shrink to."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity must be in [0, 1), got {sparsity!r}; 0.9 means 90 % of the weights pruned")
    total, kept = total_count(mask), kept_count(mask)
    keep = round((1.0 - sparsity) * total)
    if keep > kept:
        raise UserError(f"target sparsity {sparsity:g} is below the mask's current sparsity {1 - kept / total:.4g}; "
                        "masks only shrink: choose a higher sparsity")
    return keep


def erk_densities(shapes: Mapping[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities (Evci et al. 2020): density_l proportional to
    sum(shape_l) / prod(shape_l), scaled so that the kept total is density * total; a layer that
    would exceed density 1 is made dense and the others are re-scaled, until none exceeds."""
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    kept = _water_fill(_allocation_weights(shapes, "erk"), sizes, density * sum(sizes.values()))
    return {name: kept[name] / sizes[name] for name in shapes}


def layer_keep_counts(shapes: Mapping[str, tuple[int, ...]], keep: int, allocation: str,
                      capacity: Mapping[str, int] | None = None) -> dict[str, int]:
    """Exact per-layer kept counts summing to `keep` for a layer-wise allocation:
    uniform (every layer the same density), erk (Erdos-Renyi-Kernel densities) or er-balanced
    (every layer the same count). A layer never keeps more than its `capacity` (default: its
    size; pass the currently kept counts so masks only shrink); what it cannot take is shared
    among the others in the same proportions. Fractional counts are rounded by largest
    remainder, equal remainders going to the earlier layer."""
    check_allocation(allocation, LAYERWISE_ALLOCATIONS, "layer-wise allocation")
    caps = dict(capacity) if capacity is not None else {name: math.prod(s) for name, s in shapes.items()}
    if not 0 <= keep <= sum(caps.values()):
        raise UserError(f"cannot keep {keep} weights in layers that hold {sum(caps.values())}")
    fractional = _water_fill(_allocation_weights(shapes, allocation), caps, float(keep))
    return _largest_remainder(fractional, caps, keep)


def _allocation_weights(shapes: Mapping[str, tuple[int, ...]], allocation: str) -> dict[str, float]:
    """Kept count per layer is proportional to these weights (before capping)."""
    if allocation == "uniform":
        return {name: float(math.prod(shape)) for name, shape in shapes.items()}
    if allocation == "erk":
        # size * ERK factor: density proportional to sum(shape) / prod(shape).
        return {name: float(sum(shape)) for name, shape in shapes.items()}
    return {name: 1.0 for name in shapes}


def _water_fill(weights: Mapping[str, float], caps: Mapping[str, float], total: float) -> dict[str, float]:
    """count_l = min(cap_l, t * weight_l) with t such that the counts sum to `total`. Capping a
    layer raises t, so every layer over its cap is capped at once; repeat until none is."""
    capped: set[str] = set()
    while True:
        free = [name for name in weights if name not in capped]
        remaining = total - sum(caps[name] for name in capped)
        free_weight = sum(weights[name] for name in free)
        scale = remaining / free_weight if free_weight > 0 else 0.0
        over = {name for name in free if scale * weights[name] > caps[name]}
        if not over:
            return {name: float(caps[name]) if name in capped else scale * weights[name] for name in weights}
        capped |= over


def _largest_remainder(fractional: Mapping[str, float], caps: Mapping[str, int], total: int) -> dict[str, int]:
    counts = {name: min(int(math.floor(value)), caps[name]) for name, value in fractional.items()}
    short = total - sum(counts.values())
    # sorted() is stable: equal remainders keep layer order.
    by_remainder = sorted(fractional, key=lambda name: fractional[name] - counts[name], reverse=True)
    for name in itertools.cycle(by_remainder):
        if short == 0:
            return counts
        if counts[name] < caps[name]:
            counts[name] += 1
            short -= 1


def check_allocation(value: str, choices: tuple[str, ...] = ALLOCATIONS, what: str = "allocation") -> None:
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")

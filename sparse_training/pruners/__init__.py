"""Pruning: a criterion (how much each weight is worth keeping; registered by name) and an
allocation (how many weights each layer keeps), kept apart so that every criterion works with
every allocation.

`score` gives `{name: tensor}`, higher = more worth keeping; `allocate` turns scores into a
mask with an exact kept count; `prune` is the two together, round by round for a criterion
that re-scores the shrinking mask (SynFlow). A new criterion is one `Criterion` subclass and
one `register` call."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..errors import UserError
from ..masks import Mask, kept_count, total_count, validate_mask
from ..registry import Registry
from .allocation import allocate, check_allocation, erk_densities, layer_keep_counts, target_keep
from .base import Criterion, Scores, ScoringInputs
from .data_free import Magnitude, Random
from .gradient import Grasp, Snip
from .synflow import SynFlow

CRITERIA: Registry[Criterion] = Registry("pruner")
register, get, names = CRITERIA.register, CRITERIA.get, CRITERIA.names
for _criterion in (Random(), Magnitude(), Snip(), SynFlow(), Grasp()):
    register(_criterion)

__all__ = ["CRITERIA", "Criterion", "Scores", "ScoringInputs", "allocate", "erk_densities", "get",
           "layer_keep_counts", "magnitude_prune", "names", "prune", "register", "score"]


def score(criterion: str, model: nn.Module, mask: Mapping[str, torch.Tensor], *, data: Any = None,
          batch_size: int = 128, batches: int = 1, seed: int = 0, device: str | torch.device = "cpu",
          grasp_temperature: float = 200.0) -> Scores:
    """Per-weight scores of `model`'s prunable weights with `mask` applied; higher = more worth
    keeping. `data` (with `train_batches` and `input_shape`) is needed by the criteria that
    score on data (snip, grasp, synflow)."""
    chosen = get(criterion)
    _require_data(chosen, data)
    inputs = ScoringInputs(data, batch_size, batches, seed, device, grasp_temperature=grasp_temperature)
    return chosen.score(model, mask, inputs)


def prune(model: nn.Module, mask: Mapping[str, torch.Tensor], *, criterion: str, allocation: str, sparsity: float,
          data: Any = None, batch_size: int = 128, batches: int = 1, seed: int = 0,
          device: str | torch.device = "cpu", synflow_rounds: int = 100, grasp_temperature: float = 200.0) -> Mask:
    """The mask at `sparsity` (a subset of `mask`) chosen by `criterion` and `allocation`. A
    criterion of R rounds keeps density d0 * (d / d0) ** (r / R) in round r, d0 the mask's
    density (1 from a dense mask), re-scoring with the current mask each round. A layer left
    empty (layer collapse) is not an error here: the caller reports `masks.collapsed_layers`."""
    chosen = get(criterion)
    check_allocation(allocation)
    validate_mask(mask, model)
    _require_data(chosen, data)
    inputs = ScoringInputs(data, batch_size, batches, seed, device, synflow_rounds, grasp_temperature)
    rounds = chosen.rounds(inputs)
    if target_keep(mask, sparsity) == kept_count(mask):
        return {name: m.clone() for name, m in mask.items()}  # nothing to prune
    scorer = chosen.scorer(model, inputs)
    start = kept_count(mask) / total_count(mask)
    current = dict(mask)
    for r in range(1, rounds + 1):
        # The last round uses the target itself, so no rounding of the power can miss it.
        target = sparsity if r == rounds else 1.0 - start * ((1.0 - sparsity) / start) ** (r / rounds)
        current = allocate(scorer(current), current, target, allocation)
    validate_mask(current, model)
    return current


def magnitude_prune(model: nn.Module, mask: Mapping[str, torch.Tensor], sparsity: float,
                    allocation: str = "global") -> Mask:
    """Prune the smallest |w| among the kept weights to reach `sparsity` (IMP, LRR, SCULPT's
    cut, GMP)."""
    return prune(model, mask, criterion="magnitude", allocation=allocation, sparsity=sparsity)


def _require_data(criterion: Criterion, data: Any) -> None:
    if criterion.needs_data and data is None:
        raise UserError(f"pruner {criterion.name!r} needs the data set; pass the run's data")

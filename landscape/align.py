"""Permutation alignment by weight matching (Ainsworth et al. 2023, "Git Re-Basin").

Two networks trained from different seeds compute similar functions with their hidden units
in different orders, so the straight line between them crosses a barrier that says more about
the orders than about the landscape. Permuting the hidden units of B (rows of a layer's
weight, the matching columns of the next layer, BatchNorm entries, ...) leaves B's function
unchanged and can put its units in A's order; only then is the path between A and B a
statement about the two solutions. Which axes move together is `landscape.permutation_groups`.

Weight matching maximises sum over parameters <A, P(B)>, one group at a time (a linear
assignment problem with the other groups' permutations fixed), in a seeded random order,
until a sweep improves no group. Pruned weights are exact zeros in a sparse network's
state_dict, so matching the weights as stored is already correct for sparse networks: a
pruned weight contributes nothing to the objective. Masks move with their weights, so each
layer keeps the same number of weights and the sparsity is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import xarray as xr
from scipy.optimize import linear_sum_assignment
from torch import nn

from sparse_training.checkpoint import Checkpoint
from sparse_training.errors import UserError

from .permutation_groups import PermutationGroup, PermutationSpec, permutation_spec

__all__ = ["Alignment", "PermutationGroup", "PermutationSpec", "align", "align_checkpoint", "apply_permutations",
           "permutation_dataset", "permutation_spec", "weight_matching"]


@dataclass
class Alignment:
    """B moved into A's unit order. permutations[name][i] is the old unit of B that becomes
    unit i; `iterations` counts the sweeps, the last of which improved no group."""

    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    permutations: dict[str, np.ndarray]
    iterations: int
    spec: PermutationSpec


# ---------------------------------------------------------------- permuting

def _axes_by_key(spec: PermutationSpec) -> dict[str, list[tuple[int, str, int]]]:
    """key -> [(axis, group name, block)]: every permutation that acts on one tensor."""
    by_key: dict[str, list[tuple[int, str, int]]] = {}
    for group in spec.groups:
        for key, axis, block in group.axes:
            by_key.setdefault(key, []).append((axis, group.name, block))
    return by_key


def _permuted(tensor: torch.Tensor, axes: list[tuple[int, str, int]], perms: Mapping[str, torch.Tensor],
              skip: int | None = None) -> torch.Tensor:
    """`tensor` with the permutation of each of its axes applied (all but `skip`); a block
    axis moves runs of `block` contiguous entries together."""
    for axis, name, block in axes:
        if axis == skip or name not in perms:
            continue
        p = perms[name].to(tensor.device)
        index = (p[:, None] * block + torch.arange(block, device=tensor.device)).reshape(-1)
        tensor = tensor.index_select(axis, index)
    return tensor


def _as_index(perms: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(np.asarray(p), dtype=torch.long) for name, p in perms.items()}


def apply_permutations(state: Mapping[str, torch.Tensor], spec: PermutationSpec,
                       perms: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A new dict with every tensor of `state` permuted: new unit i of a group is old unit
    perms[group][i]. Works alike for a state_dict and a mask; keys the spec names but `state`
    lacks are skipped, groups missing from `perms` stay in place, tensors no group touches
    are shared with `state` (never modified)."""
    index = _as_index(perms)
    out = dict(state)
    for key, axes in _axes_by_key(spec).items():
        if key in out:
            out[key] = _permuted(out[key], axes, index)
    return out


# ---------------------------------------------------------------- matching

def _cost(group: PermutationGroup, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
          axes_of: Mapping[str, list[tuple[int, str, int]]], perms: Mapping[str, torch.Tensor]) -> np.ndarray:
    """C[i, j] = sum over the group's tensors of <A's unit i, B's unit j>, B's other axes in
    their current order."""
    cost = torch.zeros(group.size, group.size, dtype=torch.float64)
    for key, axis, _ in group.axes:
        if key not in a:  # a buffer: running statistics say nothing about which units match
            continue
        wa = a[key].movedim(axis, 0).reshape(group.size, -1)
        wb = _permuted(b[key], axes_of[key], perms, skip=axis).movedim(axis, 0).reshape(group.size, -1)
        cost += wa @ wb.T
    return cost.numpy()


def _match(spec: PermutationSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
           max_iter: int, seed: int, matched: set[str] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Coordinate ascent over the groups on the tensors named in `matched` (all the spec's
    tensors when None)."""
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    axes_of = _axes_by_key(spec)
    keys = [key for key in axes_of if matched is None or key in matched]
    a = {key: state_a[key].detach().to("cpu", torch.float64) for key in keys}
    b = {key: state_b[key].detach().to("cpu", torch.float64) for key in keys}
    perms = {group.name: torch.arange(group.size) for group in spec.groups}
    rng = np.random.default_rng(seed)
    for sweep in range(1, max_iter + 1):
        improved = False
        for index in rng.permutation(len(spec.groups)):
            group = spec.groups[index]
            cost = _cost(group, a, b, axes_of, perms)
            rows = np.arange(group.size)
            _, best = linear_sum_assignment(cost, maximize=True)
            before, after = cost[rows, perms[group.name].numpy()].sum(), cost[rows, best].sum()
            if after > before + 1e-12 * abs(before):
                perms[group.name] = torch.as_tensor(best, dtype=torch.long)
                improved = True
        if not improved:
            break
    return {name: p.numpy().astype(np.int64) for name, p in perms.items()}, sweep


def weight_matching(spec: PermutationSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                    *, max_iter: int = 100, seed: int = 0, matched: set[str] | None = None) -> dict[str, np.ndarray]:
    """Permutations of B's units that maximise sum <A, P(B)> over the spec's tensors (those
    in `matched`, when given), coordinate ascent over groups in a seeded random order (see
    the module docstring)."""
    return _match(spec, state_a, state_b, max_iter, seed, matched)[0]


def _check_layout(spec: PermutationSpec, state: Mapping[str, torch.Tensor], label: str, complete: bool = True) -> None:
    """UserError unless `state` has every tensor the spec permutes (a mask: those it has) with
    the spec's number of entries on each permuted axis."""
    for group in spec.groups:
        for key, axis, block in group.axes:
            if key not in state and not complete:
                continue
            if key not in state:
                raise UserError(f"{label} has no tensor {key!r}; align checkpoints of the model's architecture")
            if state[key].dim() <= axis or state[key].shape[axis] != group.size * block:
                raise UserError(f"{label}'s {key!r} has shape {tuple(state[key].shape)}, not {group.size * block} "
                                f"entries on axis {axis}; align checkpoints of the model's architecture")


def align(model: nn.Module, example_input: torch.Tensor, state_a: Mapping[str, torch.Tensor],
          state_b: Mapping[str, torch.Tensor], masks_b: Mapping[str, torch.Tensor], *, max_iter: int = 100,
          seed: int = 0) -> Alignment:
    """B's state_dict and masks permuted into A's unit order: the same function as B, as close
    to A in weight space as weight matching finds. `model` gives the architecture only (its
    own weights are not used, nor changed)."""
    spec = permutation_spec(model, example_input)
    _check_layout(spec, state_a, "model A")
    _check_layout(spec, state_b, "model B")
    _check_layout(spec, masks_b, "the mask of model B", complete=False)
    # Parameters only, as Ainsworth et al. match: running statistics are permuted, not matched.
    perms, sweeps = _match(spec, state_a, state_b, max_iter, seed, {name for name, _ in model.named_parameters()})
    return Alignment(apply_permutations(state_b, spec, perms), apply_permutations(masks_b, spec, perms),
                     perms, sweeps, spec)


# ---------------------------------------------------------------- checkpoints (what the analyses call)

def example_input(data: Any, device: str | torch.device) -> torch.Tensor:
    """Two training examples: what the tracer needs to know the shapes."""
    x, _ = next(iter(data.eval_batches("train", 2)))
    return x.to(device)


def align_checkpoint(model: nn.Module, reference: Checkpoint, other: Checkpoint, data: Any,
                     device: str | torch.device) -> tuple[Checkpoint, Alignment]:
    """`other` with its state_dict and masks permuted into `reference`'s unit order. Its
    running statistics are permuted with their channels, so it is still exactly the network it
    was; `--bn recompute` (the default of every path and surface) then recomputes them at
    every point, REPAIR's reset of the statistics after alignment."""
    alignment = align(model, example_input(data, device), reference.state_dict, other.state_dict, other.masks)
    return replace(other, state_dict=alignment.state_dict, masks=alignment.masks), alignment


def permutation_dataset(alignments: Sequence[Alignment], dim: str, labels: Sequence[str]) -> xr.Dataset:
    """The permutations of alignments of one architecture, one per label of `dim`:
    `permutation` over (`dim`, unit) holds every group's permutation, concatenated in the
    spec's order; `group_offset` and `group_size` over (`dim`, group) say where each lies."""
    from .store import described

    groups = alignments[0].spec.groups
    sizes = np.array([group.size for group in groups], dtype=np.int64)
    offsets = np.cumsum(sizes) - sizes
    values = np.stack([np.concatenate([one.permutations[group.name] for group in groups] or [np.zeros(0, np.int64)])
                       for one in alignments])
    per_label = (len(alignments), 1)
    return xr.Dataset(
        {
            "permutation": described(values, (dim, "unit"), "permutation of the second network's units", "1",
                                     "weight matching (Ainsworth et al. 2023): entry group_offset + i is the unit "
                                     "of the second network that became unit i of that group"),
            "group_size": described(np.tile(sizes, per_label), (dim, "group"), "units in the group", "1",
                                    "hidden units (channels) one permutation acts on"),
            "group_offset": described(np.tile(offsets, per_label), (dim, "group"), "offset of the group", "1",
                                      "where the group's entries start along unit"),
            "alignment_sweeps": described(np.array([one.iterations for one in alignments]), (dim,),
                                          "weight-matching sweeps", "1",
                                          "sweeps over the groups, the last of which improved none"),
        },
        coords={dim: list(labels), "group": [group.name for group in groups]},
    )

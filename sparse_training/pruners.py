"""Pruners: scoring (how much each weight is worth keeping) kept apart from allocation (how
many weights each layer keeps).

`score` gives `{name: tensor}`, higher = more worth keeping; `allocate` turns scores into a
mask with an exact kept count, never Bernoulli draws; `prune` is the two together (SynFlow
iteratively, as in Tanaka et al. 2020). Every criterion scores a deep copy of the model, so
the caller's weights, buffers (BatchNorm running statistics), dtype and train/eval mode are
never touched, whatever happens during scoring."""

from __future__ import annotations

import copy
import itertools
import math
import numbers
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import ALLOCATIONS, PRUNERS
from .errors import UserError
from .masks import Mask, apply_mask_, kept_count, prunable_parameters, total_count, validate_mask

Scores = dict[str, torch.Tensor]

LAYERWISE_ALLOCATIONS = ("uniform", "erk", "er-balanced")
GRASP_EPS = 1e-10  # keeps GraSP's normalisation finite, as in Tanaka et al.'s code


# ----------------------------------------------------------------------------- scoring


def score(criterion: str, model: nn.Module, mask: Mapping[str, torch.Tensor], *, data: Any = None,
          batch_size: int = 128, batches: int = 1, seed: int = 0, device: str | torch.device = "cpu",
          grasp_temperature: float = 200.0) -> Scores:
    """Per-weight scores of `model`'s prunable weights with `mask` applied; higher = more worth
    keeping. `data` (with `train_batches` and `input_shape`) is needed by snip, grasp and
    synflow."""
    _check_choice(criterion, PRUNERS, "pruner")
    _require_data(criterion, data)
    if criterion == "random":
        return _random_scores(mask, seed, device)
    if criterion == "magnitude":
        return _magnitude_scores(model, mask, device)
    if criterion == "synflow":
        return _synflow_round(_synflow_model(model, device), mask, _synflow_input(data, device))
    training = _training_batches(data, batch_size, batches, seed, device)
    if criterion == "snip":
        return _snip_scores(model, mask, training, device)
    return _grasp_scores(model, mask, training, device, grasp_temperature)


def _random_scores(mask: Mapping[str, torch.Tensor], seed: int, device: str | torch.device) -> Scores:
    # A CPU generator of its own: the same seed gives the same mask on every device, and the
    # global RNG (which training relies on) is left alone.
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(m.shape, generator=generator).to(device) for name, m in mask.items()}


def _magnitude_scores(model: nn.Module, mask: Mapping[str, torch.Tensor], device: str | torch.device) -> Scores:
    params = prunable_parameters(model)
    with torch.no_grad():
        return {name: (params[name].detach().abs() * m.to(params[name].device)).to(device)
                for name, m in mask.items()}


def _scoring_copy(model: nn.Module, mask: Mapping[str, torch.Tensor], device: str | torch.device) -> nn.Module:
    """A masked copy in training mode (BatchNorm on batch statistics, as SNIP and GraSP score),
    with dropout off so that scores are deterministic and draw nothing from the global RNG."""
    clone = copy.deepcopy(model).to(device)
    apply_mask_(clone, mask)
    clone.train()
    for module in clone.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()
    for weight in prunable_parameters(clone).values():
        weight.requires_grad_(True)
    return clone


def _training_batches(data: Any, batch_size: int, batches: int, seed: int,
                      device: str | torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    first = itertools.islice(data.train_batches(batch_size, seed, 0, augment=False), batches)
    return [(x.to(device), y.to(device)) for x, y in first]


def _snip_scores(model: nn.Module, mask: Mapping[str, torch.Tensor],
                 training: list[tuple[torch.Tensor, torch.Tensor]], device: str | torch.device) -> Scores:
    """SNIP (Lee et al. 2019): |g * w|, g the gradient of the mean loss over the batches."""
    clone = _scoring_copy(model, mask, device)
    weights = [prunable_parameters(clone)[name] for name in mask]
    grads = _mean_gradient(clone, weights, training, temperature=1.0)
    return {name: (g * w).detach().abs() for name, g, w in zip(mask, grads, weights)}


def _mean_gradient(model: nn.Module, weights: list[torch.Tensor], training: list[tuple[torch.Tensor, torch.Tensor]],
                   temperature: float, create_graph: bool = False) -> list[torch.Tensor]:
    total = [torch.zeros_like(w) for w in weights]
    for x, y in training:
        loss = F.cross_entropy(model(x) / temperature, y) / len(training)
        grads = torch.autograd.grad(loss, weights, create_graph=create_graph)
        total = [t + g for t, g in zip(total, grads)]
    return total


def _grasp_scores(model: nn.Module, mask: Mapping[str, torch.Tensor], training: list[tuple[torch.Tensor, torch.Tensor]],
                  device: str | torch.device, temperature: float) -> Scores:
    """GraSP (Wang et al. 2020) as in Tanaka et al.'s code: keep score w * (H g) of the loss of
    logits / temperature, g treated as a constant, normalised by |sum of all scores|. A high
    score means removing the weight would reduce the gradient flow the most."""
    clone = _scoring_copy(model, mask, device)
    weights = [prunable_parameters(clone)[name] for name in mask]
    stopped = [g.detach() for g in _mean_gradient(clone, weights, training, temperature)]
    hessian_g = [torch.zeros_like(w) for w in weights]
    # One batch at a time: the double-backward graph of all batches at once may not fit.
    for batch in training:
        grads = _mean_gradient(clone, weights, [batch], temperature, create_graph=True)
        product = sum((g * s).sum() for g, s in zip(grads, stopped))
        terms = torch.autograd.grad(product, weights)
        hessian_g = [h + t / len(training) for h, t in zip(hessian_g, terms)]
    scores = {name: (w * h).detach() for name, w, h in zip(mask, weights, hessian_g)}
    norm = sum(s.sum() for s in scores.values()).abs() + GRASP_EPS
    return {name: s / norm for name, s in scores.items()}


def _synflow_model(model: nn.Module, device: str | torch.device) -> nn.Module:
    """SynFlow's linearised copy: float64 (the path products overflow float32 in deep nets),
    every floating parameter and buffer replaced by its absolute value, BatchNorm in eval mode
    (Tanaka et al.'s `linearize`)."""
    clone = copy.deepcopy(model).to(device=device, dtype=torch.float64).eval()
    with torch.no_grad():
        for tensor in itertools.chain(clone.parameters(), clone.buffers()):
            if tensor.is_floating_point():
                tensor.abs_()
    for weight in prunable_parameters(clone).values():
        weight.requires_grad_(True)
    return clone


def _synflow_input(data: Any, device: str | torch.device) -> torch.Tensor:
    return torch.ones((1, *data.input_shape), dtype=torch.float64, device=device)


def _synflow_round(linearised: nn.Module, mask: Mapping[str, torch.Tensor], ones: torch.Tensor) -> Scores:
    """One SynFlow scoring: R = sum of the outputs of the linearised, masked network on an
    all-ones input; score |dR/dw * w|. Masks only shrink, so masking the copy in place each
    round is the same as masking fresh absolute weights."""
    apply_mask_(linearised, mask)
    weights = [prunable_parameters(linearised)[name] for name in mask]
    flow = linearised(ones).sum()
    grads = torch.autograd.grad(flow, weights)
    return {name: (g * w).detach().abs() for name, g, w in zip(mask, grads, weights)}


# ----------------------------------------------------------------------------- allocation


def allocate(scores: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor], sparsity: float,
             allocation: str) -> Mask:
    """The mask keeping exactly round((1 - sparsity) * total) weights, all of them kept by `mask`
    already, chosen by highest score: over all layers at once (global) or within each layer after
    `layer_keep_counts` (uniform, erk, er-balanced). Ties go to the earlier layer, then the
    lower flat index."""
    _check_choice(allocation, ALLOCATIONS, "allocation")
    keep = _target_keep(mask, sparsity)
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


def _target_keep(mask: Mapping[str, torch.Tensor], sparsity: float) -> int:
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
    _check_choice(allocation, LAYERWISE_ALLOCATIONS, "layer-wise allocation")
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


# ----------------------------------------------------------------------------- pruning


def prune(model: nn.Module, mask: Mapping[str, torch.Tensor], *, criterion: str, allocation: str, sparsity: float,
          data: Any = None, batch_size: int = 128, batches: int = 1, seed: int = 0,
          device: str | torch.device = "cpu", synflow_rounds: int = 100, grasp_temperature: float = 200.0) -> Mask:
    """The mask at `sparsity` (a subset of `mask`) chosen by `criterion` and `allocation`.
    SynFlow prunes iteratively: round r of R keeps density d0 * (d / d0) ** (r / R), d0 the
    mask's density (1 from a dense mask: Tanaka et al.'s exponential schedule), re-scoring with
    the current mask each round. A layer left empty (layer collapse) is not an error here: the
    caller reports `masks.collapsed_layers`."""
    _check_choice(criterion, PRUNERS, "pruner")
    _check_choice(allocation, ALLOCATIONS, "allocation")
    validate_mask(mask, model)
    _require_data(criterion, data)
    if criterion == "synflow" and synflow_rounds < 1:
        raise UserError(f"synflow_rounds must be at least 1, got {synflow_rounds}")
    if _target_keep(mask, sparsity) == kept_count(mask):
        return {name: m.clone() for name, m in mask.items()}  # nothing to prune
    if criterion == "synflow":
        new_mask = _iterative_synflow(model, mask, allocation, sparsity, data, device, synflow_rounds)
    else:
        scores = score(criterion, model, mask, data=data, batch_size=batch_size, batches=batches, seed=seed,
                       device=device, grasp_temperature=grasp_temperature)
        new_mask = allocate(scores, mask, sparsity, allocation)
    validate_mask(new_mask, model)
    return new_mask


def _iterative_synflow(model: nn.Module, mask: Mapping[str, torch.Tensor], allocation: str, sparsity: float,
                       data: Any, device: str | torch.device, rounds: int) -> Mask:
    linearised = _synflow_model(model, device)
    ones = _synflow_input(data, device)
    start = kept_count(mask) / total_count(mask)
    current = dict(mask)
    for r in range(1, rounds + 1):
        # The last round uses the target itself, so no rounding of the power can miss it.
        target = sparsity if r == rounds else 1.0 - start * ((1.0 - sparsity) / start) ** (r / rounds)
        current = allocate(_synflow_round(linearised, current, ones), current, target, allocation)
    return current


def magnitude_prune(model: nn.Module, mask: Mapping[str, torch.Tensor], sparsity: float,
                    allocation: str = "global") -> Mask:
    """Prune the smallest |w| among the kept weights to reach `sparsity` (IMP, LRR, SCULPT's
    cut, GMP)."""
    return prune(model, mask, criterion="magnitude", allocation=allocation, sparsity=sparsity)


def _require_data(criterion: str, data: Any) -> None:
    if criterion not in ("random", "magnitude") and data is None:
        raise UserError(f"pruner {criterion!r} needs the data set; pass the run's data")


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")

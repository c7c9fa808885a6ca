"""Masks that move during training: gradual magnitude pruning (GMP, Zhu & Gupta 2017) and
RigL (Evci et al. 2020). Both act after an optimizer step (RunSession.after_step), at steps
that are a pure function of the clock, and keep no state beyond the mask and the optimizer
(both already in state.pt), so a resumed run equals an uninterrupted one.

`t` is the number of steps the cycle has done (1 after its first update)."""

from __future__ import annotations

import math
import torch
from torch import nn

from .config import PruneConfig
from .masks import Mask, apply_mask_, prunable_parameters


class GradualMagnitudePruning:
    """Sparsity s(t) = s_f (1 - (1 - (t - t0) / (t1 - t0))^3) from dense at t0 to the target
    s_f at t1 (Zhu & Gupta's cubic schedule with s_i = 0), magnitude pruning every
    `update_every` steps and at t1; fixed after t1. t0 and t1 are `update_start` and
    `update_end` of the cycle's steps."""

    needs_dense_gradient = False

    def __init__(self, prune: PruneConfig, total_steps: int):
        self.target, self.every, self.allocation = prune.sparsity, prune.update_every, prune.allocation
        self.start = min(round(prune.update_start * total_steps), total_steps - 1)
        self.end = min(max(round(prune.update_end * total_steps), self.start + 1), total_steps)

    def sparsity_at(self, t: int) -> float:
        if t <= self.start:
            return 0.0
        if t >= self.end:
            return self.target
        return self.target * (1.0 - (1.0 - (t - self.start) / (self.end - self.start)) ** 3)

    def is_update_step(self, t: int) -> bool:
        return t == self.end or (self.start < t < self.end and (t - self.start) % self.every == 0)

    def update(self, model: nn.Module, mask: Mask, optimizer: torch.optim.Optimizer, t: int) -> Mask:
        from .pruners import magnitude_prune

        new = magnitude_prune(model, mask, self.sparsity_at(t), self.allocation)
        apply_mask_(model, new)
        return new


class RigL:
    """Every `update_every` steps until `update_end` of the cycle, each layer drops the
    fraction f(t) = alpha/2 (1 + cos(pi t / T_end)) of its kept weights with the smallest
    magnitude and grows as many with the largest dense-gradient magnitude among the rest
    (a weight dropped and grown again keeps its value). Grown weights start at zero with zero
    optimizer state, so every layer's sparsity, and the total, stay constant at every step."""

    needs_dense_gradient = True

    def __init__(self, prune: PruneConfig, total_steps: int):
        self.alpha, self.every = prune.rigl_fraction, prune.update_every
        self.end = round(prune.update_end * total_steps)

    def fraction_at(self, t: int) -> float:
        return self.alpha / 2.0 * (1.0 + math.cos(math.pi * t / self.end))

    def is_update_step(self, t: int) -> bool:
        return 0 < t < self.end and t % self.every == 0

    @torch.no_grad()
    def update(self, model: nn.Module, mask: Mask, optimizer: torch.optim.Optimizer, t: int) -> Mask:
        fraction = self.fraction_at(t)
        params = prunable_parameters(model)
        new = {}
        for name, old in mask.items():
            p = params[name]
            gradient = p.grad if p.grad is not None else torch.zeros_like(p)
            new[name] = drop_and_grow(old, p.detach(), gradient, int(fraction * int(old.sum())))
            grown = new[name] & ~old
            p[grown] = 0.0
            reset_optimizer_state(optimizer, p, old ^ new[name])
        apply_mask_(model, new)
        return new


def drop_and_grow(mask: torch.Tensor, weight: torch.Tensor, gradient: torch.Tensor, count: int) -> torch.Tensor:
    """One layer's RigL update: drop the `count` kept weights of smallest |weight|, then grow the
    `count` positions of largest |gradient| not kept after the drop. Ties go to the lower
    flat index (stable sorts), so the update is deterministic."""
    if count == 0:
        return mask.clone()
    flat_mask = mask.flatten()
    kept = flat_mask.nonzero().squeeze(1)
    by_magnitude = torch.sort(weight.flatten()[kept].abs(), descending=True, stable=True).indices
    after_drop = torch.zeros_like(flat_mask)
    after_drop[kept[by_magnitude[: kept.numel() - count]]] = True
    candidates = (~after_drop).nonzero().squeeze(1)
    by_gradient = torch.sort(gradient.flatten()[candidates].abs(), descending=True, stable=True).indices
    after_drop[candidates[by_gradient[:count]]] = True
    return after_drop.view(mask.shape)


def reset_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor) -> None:
    """Zero every per-weight optimizer buffer (momentum, Adam moments) of `param` at `where`."""
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value[where] = 0


def mask_schedule(method: str, prune: PruneConfig, total_steps: int) -> GradualMagnitudePruning | RigL | None:
    """The moving-mask rule of a method (gmp, rigl), or None when its mask changes only at
    cycle starts."""
    if method == "gmp":
        return GradualMagnitudePruning(prune, total_steps)
    if method == "rigl":
        return RigL(prune, total_steps)
    return None


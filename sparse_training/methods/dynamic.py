"""Masks that move during training: gradual magnitude pruning (GMP, Zhu & Gupta 2017) and
RigL (Evci et al. 2020), each one cycle. Both act after an optimizer step, at steps that are a
pure function of the clock, and keep no state beyond the mask and the optimizer (both already
in state.pt), so a resumed run equals an uninterrupted one.

`t` is the number of steps the cycle has done (1 after its first update)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import Config, PruneConfig, check
from ..masks import Mask, apply_mask_, prunable_parameters
from .base import CyclePlan, Method, MovingMask, Style, pruning_at_init


class DynamicSparsity(Method):
    """One cycle of cycles x epochs epochs whose mask moves by `rule`: from dense (gmp), or
    from a prune-at-init mask (rigl: random ERK by default) at constant sparsity."""

    def __init__(self, name: str, style: Style, *, rule: type[GradualMagnitudePruning] | type[RigL],
                 prune_at_init: bool):
        super().__init__(name, style)
        self.rule, self.prune_at_init = rule, prune_at_init

    def validate(self, config: Config) -> None:
        super().validate(config)
        self.rule.validate(config.prune)

    def default_allocation(self, config: Config) -> str:
        # From dense, the mask shrinks by magnitude: globally, as IMP and LRR prune.
        return super().default_allocation(config) if self.prune_at_init else "global"

    def plan(self, config: Config) -> list[CyclePlan]:
        run = config.run
        return [CyclePlan(0, run.epochs * run.cycles, pruning_at_init(config) if self.prune_at_init else None)]

    def moving_mask(self, config: Config, cycle_steps: int) -> MovingMask:
        return self.rule(config.prune, cycle_steps)


def _validate_updates(prune: PruneConfig) -> None:
    check(prune.update_every >= 1, "update-every must be at least 1")
    check(0.0 <= prune.update_start < prune.update_end <= 1.0, "need 0 <= update-start < update-end <= 1")


class GradualMagnitudePruning:
    """Sparsity s(t) = s_f (1 - (1 - (t - t0) / (t1 - t0))^3) from dense at t0 to the target
    s_f at t1 (Zhu & Gupta's cubic schedule with s_i = 0), magnitude pruning every
    `update_every` steps and at t1; fixed after t1. t0 and t1 are `update_start` and
    `update_end` of the cycle's steps."""

    needs_dense_gradient = False

    @staticmethod
    def validate(prune: PruneConfig) -> None:
        _validate_updates(prune)

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
        from ..pruners import magnitude_prune

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

    @staticmethod
    def validate(prune: PruneConfig) -> None:
        _validate_updates(prune)
        check(0.0 < prune.rigl_fraction < 1.0, f"rigl-fraction must be in (0, 1), got {prune.rigl_fraction}")

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


GMP = DynamicSparsity("gmp", Style("#949494", "X"), rule=GradualMagnitudePruning, prune_at_init=False)
RIGL = DynamicSparsity("rigl", Style("#d55e00", "*"), rule=RigL, prune_at_init=True)

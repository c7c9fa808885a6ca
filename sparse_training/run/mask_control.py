"""The mask of a run being trained and what follows it: the masked step that keeps pruned
weights (and their momentum) at exactly zero, the FLOP count of every step at the mask's
density, the mask changes at cycle starts (layer collapse reported), and a moving mask's
updates after optimizer steps (GMP, RigL). In a job of several processes every mask change is
decided by rank 0 and broadcast, weights included, so the ranks train bitwise-identical masks."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from ..config import Config
from ..data.base import batch_bounds
from ..distributed import Group
from ..flops import FlopCounter, layer_costs
from ..masks import Mask, MaskedStep, apply_mask_, collapsed_layers, ones_mask, sparsity, validate_mask
from ..methods import MaskChange, MaskInputs, MovingMask


class MaskControl:
    """Starts dense; `bind` an optimizer before the first step."""

    def __init__(self, model: nn.Module, config: Config, data: Any, device: str, moving: MovingMask | None,
                 log: Callable[[str], None], warn: Callable[[str], None], group: Group | None = None):
        self.model, self.config, self.data, self.device = model, config, data, device
        self.group = group if group is not None else Group()
        self.moving, self.log, self.warn = moving, log, warn
        self.mask = ones_mask(model)
        self.flops = FlopCounter(layer_costs(model, data.input_shape, device))
        self.batch_sizes = [stop - start for start, stop in
                            batch_bounds(data.num_samples("train"), config.optim.batch_size)]
        self.optimizer: torch.optim.Optimizer | None = None
        self.masked_step: MaskedStep | None = None

    @property
    def sparsity(self) -> float:
        return sparsity(self.mask)

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the pruned weights of the model and their state in `optimizer` at zero."""
        self.optimizer = optimizer
        self.masked_step = MaskedStep(self.model, self.mask, optimizer)

    def zero_pruned(self) -> None:
        """After every optimizer step; the current masked step, since a moving mask replaces it."""
        self.masked_step()

    def change(self, change: MaskChange, cycle: int) -> None:
        """The mask change at the start of `cycle`, from the weights the previous cycle trained.
        The new mask takes effect with `apply`, after the cycle's weight source is loaded."""
        started = time.perf_counter()
        self.mask = self._agreed(change.apply(MaskInputs(self.model, self.mask, self.config, self.data, self.device,
                                                         cycle)))
        self.log(f"cycle {cycle}: {change.describe()} to sparsity {self.sparsity:.4f} "
                 f"in {time.perf_counter() - started:.1f}s")
        collapsed = collapsed_layers(self.mask)
        if collapsed:
            self.warn(f"layer collapse at cycle {cycle}: {', '.join(collapsed)} keep no weights")

    def apply(self) -> None:
        """Zero the pruned weights and count the following steps at the mask's density."""
        apply_mask_(self.model, self.mask)
        self.flops.set_mask(self.mask)

    def moves_at(self, t: int) -> bool:
        """Whether step `t` of the cycle updates a moving mask."""
        return self.moving is not None and self.moving.is_update_step(t)

    def after_step(self, t: int, batch: int) -> None:
        """Count step `t` of the cycle (its `batch`-th batch of the epoch); a moving mask moves at
        its update steps (RigL's update uses this step's dense gradient, so the step counts dense)."""
        update = self.moves_at(t)
        self.flops.add_step(self.batch_sizes[batch - 1], dense_gradient=update and self.moving.needs_dense_gradient)
        if update:
            self.mask = self._agreed(self.moving.update(self.model, self.mask, self.optimizer, t))
            self.bind(self.optimizer)
            self.flops.set_mask(self.mask)

    def _agreed(self, mask: Mask) -> Mask:
        """The mask rank 0 decided, on every rank, with rank 0's weights: every rank decides
        from the same weights and data, but a nondeterministic kernel (a GPU's) could tip a
        tie, and the ranks must never train different masks. A single process keeps its own."""
        if not self.group.distributed:
            return mask
        local = {name: m.clone() for name, m in mask.items()}
        self.group.broadcast_([*mask.values(), *self.model.parameters()])
        differing = sum(int((local[name] != m).sum()) for name, m in mask.items())
        if self.group.any(differing > 0):
            self.log("note: the processes decided masks that differ in some weights; rank 0's mask and weights are "
                     "used (the epoch-end check compares the ranks' weights again)")
        return mask

    def restore(self, mask: Mask, optimizer: torch.optim.Optimizer, flops: int) -> None:
        """The mask, optimizer and FLOP count of a resume state."""
        validate_mask(mask, self.model)
        self.mask = mask
        self.bind(optimizer)
        self.flops.total = flops
        self.flops.set_mask(mask)

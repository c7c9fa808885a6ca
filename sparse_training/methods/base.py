"""What a training method is (ARCHITECTURE.md, "a training method"): a list of cycles, each
with an optional mask change at its start, a weight source and a number of epochs; some
methods also move the mask during training (GMP, RigL) or take the initial weights from
elsewhere (transfer). One `Method` subclass per family, one instance per registered name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..config import Config, check
from ..masks import Mask


@dataclass(frozen=True)
class Style:
    """How figures draw a method: a colour-blind-safe hue, and a marker so that lines stay
    apart in greyscale."""

    colour: str
    marker: str


@dataclass(frozen=True)
class MaskInputs:
    """What a mask change may read: the model as the previous cycle left it, its mask, the run's
    config and data, and the cycle it starts."""

    model: nn.Module
    mask: Mask
    config: Config
    data: Any
    device: str
    cycle: int


class MaskChange(ABC):
    """The change of the mask at the start of a cycle."""

    @abstractmethod
    def describe(self) -> str:
        """What chose the mask, for the log: 'snip pruning (global)'."""

    @abstractmethod
    def apply(self, inputs: MaskInputs) -> Mask:
        """The cycle's new mask."""


@dataclass(frozen=True)
class Pruning(MaskChange):
    """Prune to `sparsity` with the registered criterion `criterion` and `allocation`."""

    criterion: str
    allocation: str
    sparsity: float

    def describe(self) -> str:
        return f"{self.criterion} pruning ({self.allocation})"

    def apply(self, inputs: MaskInputs) -> Mask:
        from ..pruners import prune

        config = inputs.config
        return prune(
            inputs.model, inputs.mask, criterion=self.criterion, allocation=self.allocation, sparsity=self.sparsity,
            data=inputs.data, batch_size=config.optim.batch_size, batches=config.prune.score_batches,
            seed=config.run.seed + 1000 * inputs.cycle, device=inputs.device,
            synflow_rounds=config.prune.synflow_rounds, grasp_temperature=config.prune.grasp_temperature,
        )


def pruning_at_init(config: Config, sparsity: float | None = None) -> Pruning:
    """The run's prune-at-init step: its --pruner and --allocation, to `sparsity` (default
    --sparsity)."""
    prune = config.prune
    return Pruning(prune.pruner, prune.allocation, prune.sparsity if sparsity is None else sparsity)


@dataclass(frozen=True)
class CyclePlan:
    index: int
    epochs: int
    mask_change: MaskChange | None = None
    weights: str = "continue"  # continue | rewind (to rewind.pt) | init (to init.pt)
    save_rewind_at: int | None = None  # this cycle's epoch whose end is the rewind point (0: its start)


class MovingMask(Protocol):
    """A mask that moves during a cycle, after optimizer steps chosen by a pure function of the
    cycle's step count `t`, keeping no state beyond the mask and the optimizer (both in the
    resume state), so that a resumed run equals an uninterrupted one."""

    # The update needs the dense gradient of the step, so that step's backward costs dense.
    needs_dense_gradient: bool

    def is_update_step(self, t: int) -> bool: ...

    def update(self, model: nn.Module, mask: Mask, optimizer: torch.optim.Optimizer, t: int) -> Mask: ...


class Method(ABC):
    """A training method, registered by `name` in `sparse_training.methods`. A family class
    implements `plan`; it overrides `validate` for the settings it reads, `moving_mask` when
    its mask moves during training, `initialise` when its initial weights come from elsewhere."""

    # Every cycle after the first starts with a pruning step (an IMP/LRR level), so the end of
    # every cycle is a result at its own sparsity, not only the end of the last one.
    levelwise: bool = False
    # Prune settings only this method reads; unset (None) unless it is the method chosen.
    own_settings: tuple[str, ...] = ()

    def __init__(self, name: str, style: Style):
        self.name, self.style = name, style

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def validate(self, config: Config) -> None:
        """Raise a UserError on the first setting this method cannot run with. The config's
        generic checks have passed."""
        check(config.prune.sparsity > 0.0, f"method {self.name} needs --sparsity > 0")

    def default_allocation(self, config: Config) -> str:
        """The --allocation when none is given: that of the method's pruning criterion."""
        from ..pruners import get

        return get(config.prune.pruner).default_allocation

    def completed(self, config: Config) -> Config:
        """The validated config with this method's own defaults filled in."""
        return config

    @abstractmethod
    def plan(self, config: Config) -> list[CyclePlan]:
        """The cycles of a resolved config."""

    def moving_mask(self, config: Config, cycle_steps: int) -> MovingMask | None:
        """The rule that moves the mask during a cycle of `cycle_steps` steps, if any."""
        return None

    def initialise(self, model: nn.Module, config: Config) -> None:
        """Set the weights of step 0 (init.pt) when they come from elsewhere; read and check
        every source here, before the run writes anything."""

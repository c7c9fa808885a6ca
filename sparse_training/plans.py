"""Methods as cycle plans (DESIGN.md): every method is a list of cycles, each with an
optional mask change at its start, a weight source and a number of epochs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import Config


@dataclass(frozen=True)
class MaskChange:
    """Prune to `sparsity` with `criterion` (a pruner name, or "transfer") and `allocation`."""

    criterion: str
    allocation: str
    sparsity: float


@dataclass(frozen=True)
class CyclePlan:
    index: int
    epochs: int
    mask_change: MaskChange | None = None
    weights: str = "continue"  # continue | rewind (to rewind.pt) | init (to init.pt)
    save_rewind_at: int | None = None  # this cycle's epoch whose end is the rewind point (0: its start)


def iterative_sparsities(target: float, fraction: float) -> list[float]:
    """IMP/LRR levels: 1 - (1 - p)^k for k = 1, 2, ... until the target, the last one
    clipped to the target exactly."""
    levels = math.ceil(math.log(1.0 - target) / math.log(1.0 - fraction) - 1e-9)
    return [min(1.0 - (1.0 - fraction) ** k, target) for k in range(1, levels)] + [target]


def plan_cycles(config: Config) -> list[CyclePlan]:
    run, prune = config.run, config.prune
    method, epochs, cycles = run.method, run.epochs, run.cycles
    at_init = MaskChange(prune.pruner, prune.allocation, prune.sparsity)
    if method == "dense":
        return [CyclePlan(c, epochs) for c in range(cycles)]
    if method == "pai":
        return [CyclePlan(0, epochs * cycles, at_init)]
    if method == "pai-cyclic":
        return [CyclePlan(c, epochs, at_init if c == 0 else None) for c in range(cycles)]
    if method in ("imp", "lrr"):
        weights = "rewind" if method == "imp" else "continue"
        # lrr never rewinds, but its warm-up point (rewind.pt) is what the coupling
        # experiments transfer: save it too, at the end of the cycle if the cycle is shorter.
        first = CyclePlan(0, epochs, save_rewind_at=min(prune.rewind_epoch, epochs))
        levels = iterative_sparsities(prune.sparsity, prune.prune_fraction)
        return [first] + [
            CyclePlan(k, epochs, MaskChange("magnitude", "global", s), weights) for k, s in enumerate(levels, start=1)
        ]
    if method == "sculpt":
        initial = MaskChange(prune.pruner, prune.allocation, prune.initial_sparsity)
        cut = MaskChange("magnitude", "global", prune.sparsity)
        return [CyclePlan(c, epochs, initial if c == 0 else None) for c in range(cycles)] + [CyclePlan(cycles, epochs, cut)]
    if method == "transfer":
        return [CyclePlan(c, epochs, MaskChange("transfer", "transfer", prune.sparsity) if c == 0 else None)
                for c in range(cycles)]
    if method == "gmp":
        # One cycle from dense; the mask shrinks during training (sparse_training.dynamic).
        return [CyclePlan(0, epochs * cycles)]
    if method == "rigl":
        # One cycle from a prune-at-init mask (random ERK by default); the mask then moves at
        # constant sparsity (sparse_training.dynamic).
        return [CyclePlan(0, epochs * cycles, at_init)]
    raise ValueError(f"no cycle plan for method {method!r}")

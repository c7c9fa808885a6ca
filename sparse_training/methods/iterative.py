"""Iterative magnitude pruning: a dense cycle 0 (its epoch --rewind-epoch saved as rewind.pt),
then each cycle prunes --prune-fraction of the remaining weights by global magnitude of the
weights the previous cycle trained. `imp` (weight rewinding) rewinds the weights to the rewind
point with a fresh optimizer; `lrr` (learning-rate rewinding) lets them continue and only
restarts the learning-rate schedule."""

from __future__ import annotations

import math

from ..config import MAX_CYCLES, Config, check
from .base import CyclePlan, Method, Pruning, Style


class IterativePruning(Method):
    levelwise = True

    def __init__(self, name: str, style: Style, *, weights: str):
        super().__init__(name, style)
        self.weights = weights

    def validate(self, config: Config) -> None:
        super().validate(config)
        prune, epochs = config.prune, config.run.epochs
        check(0.0 < prune.prune_fraction < 1.0, f"prune-fraction must be in (0, 1), got {prune.prune_fraction}")
        levels = math.log1p(-prune.sparsity) / math.log1p(-prune.prune_fraction)
        check(levels <= MAX_CYCLES, f"pruning {prune.prune_fraction:g} of the weights per cycle needs {levels:.3g} "
                                    f"cycles to reach sparsity {prune.sparsity}; at most {MAX_CYCLES} are allowed, "
                                    "raise --prune-fraction")
        if self.weights == "rewind":
            check(0 <= prune.rewind_epoch <= epochs,
                  f"rewind-epoch {prune.rewind_epoch} is beyond the cycle of {epochs} epochs; choose 0..{epochs}")

    def plan(self, config: Config) -> list[CyclePlan]:
        prune, epochs = config.prune, config.run.epochs
        # lrr never rewinds, but its warm-up point (rewind.pt) is what the coupling
        # experiments transfer: save it too, at the end of the cycle if the cycle is shorter.
        first = CyclePlan(0, epochs, save_rewind_at=min(prune.rewind_epoch, epochs))
        levels = iterative_sparsities(prune.sparsity, prune.prune_fraction)
        return [first] + [CyclePlan(k, epochs, Pruning("magnitude", "global", s), self.weights)
                          for k, s in enumerate(levels, start=1)]


def iterative_sparsities(target: float, fraction: float) -> list[float]:
    """The levels: 1 - (1 - p)^k for k = 1, 2, ... until the target, the last one clipped to
    the target exactly."""
    levels = math.ceil(math.log(1.0 - target) / math.log(1.0 - fraction) - 1e-9)
    return [min(1.0 - (1.0 - fraction) ** k, target) for k in range(1, levels)] + [target]


# IMP and LRR, the pair most often compared, get hues far apart (orange vs reddish purple).
IMP = IterativePruning("imp", Style("#de8f05", "s"), weights="rewind")
LRR = IterativePruning("lrr", Style("#cc78bc", "D"), weights="continue")

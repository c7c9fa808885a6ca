"""Pruning at initialisation: prune to --sparsity with --pruner before any training, then
train the mask. `pai` trains one long cycle of cycles x epochs epochs, the same budget as
`pai-cyclic`, whose `--cycles` cycles restart the learning-rate schedule while the weights
continue."""

from __future__ import annotations

from ..config import Config
from .base import CyclePlan, Method, Style, pruning_at_init


class PruneAtInit(Method):
    def __init__(self, name: str, style: Style, *, cyclic: bool):
        super().__init__(name, style)
        self.cyclic = cyclic

    def plan(self, config: Config) -> list[CyclePlan]:
        run, at_init = config.run, pruning_at_init(config)
        if not self.cyclic:
            return [CyclePlan(0, run.epochs * run.cycles, at_init)]
        return [CyclePlan(c, run.epochs, at_init if c == 0 else None) for c in range(run.cycles)]


PAI = PruneAtInit("pai", Style("#56b4e9", "v"), cyclic=False)
PAI_CYCLIC = PruneAtInit("pai-cyclic", Style("#0173b2", "^"), cyclic=True)

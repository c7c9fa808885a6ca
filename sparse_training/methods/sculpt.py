"""SCULPT-ing: prune at initialisation to a low --initial-sparsity with --pruner, train
--cycles cycles, cut to --sparsity by one global magnitude pruning step, train one final
cycle."""

from __future__ import annotations

from ..config import Config, check
from .base import CyclePlan, Method, Pruning, Style, pruning_at_init


class Sculpt(Method):
    def validate(self, config: Config) -> None:
        super().validate(config)
        prune = config.prune
        check(0.0 < prune.initial_sparsity < 1.0, f"initial-sparsity must be in (0, 1), got {prune.initial_sparsity}")
        check(prune.sparsity > prune.initial_sparsity,
              f"sparsity {prune.sparsity} must be higher than initial-sparsity {prune.initial_sparsity}")

    def plan(self, config: Config) -> list[CyclePlan]:
        run, prune = config.run, config.prune
        initial = pruning_at_init(config, prune.initial_sparsity)
        cut = Pruning("magnitude", "global", prune.sparsity)
        return [CyclePlan(c, run.epochs, initial if c == 0 else None) for c in range(run.cycles)] + \
            [CyclePlan(run.cycles, run.epochs, cut)]


SCULPT = Sculpt("sculpt", Style("#029e73", "o"))

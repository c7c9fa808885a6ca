"""dense: `--cycles` cycles of the learning-rate schedule, no mask."""

from __future__ import annotations

from ..config import Config, check
from .base import CyclePlan, Method, Style


class Dense(Method):
    def validate(self, config: Config) -> None:
        check(config.prune.sparsity == 0.0, f"method {self.name} trains no mask; drop --sparsity or choose a pruning method")

    def plan(self, config: Config) -> list[CyclePlan]:
        return [CyclePlan(c, config.run.epochs) for c in range(config.run.cycles)]


DENSE = Dense("dense", Style("#222222", "h"))

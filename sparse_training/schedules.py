"""Learning rate as a pure function of the step within a cycle. Every cycle restarts the
schedule; the first step of a cycle runs at the warm-up's starting rate, never at full LR
(the authors' code ran its first epoch at full LR before warming up)."""

from __future__ import annotations

import bisect
import math

from .config import OptimConfig


def learning_rate(step: int, steps_per_cycle: int, optim: OptimConfig) -> float:
    """LR used by the update at `step` (0-based, within the cycle) of a cycle of
    `steps_per_cycle` steps."""
    if not 0 <= step < steps_per_cycle:
        raise ValueError(f"step {step} outside the cycle of {steps_per_cycle} steps")
    peak = optim.lr
    if optim.schedule == "constant":
        return peak
    warmup = int(round(optim.warmup_fraction * steps_per_cycle))
    if step < warmup:
        return peak * (optim.warmup_start + (1.0 - optim.warmup_start) * step / warmup)
    progress = (step - warmup) / max(steps_per_cycle - warmup, 1)  # 0 at the peak, -> 1 at the end
    if optim.schedule == "triangular":
        return peak * (1.0 - progress)
    if optim.schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    if optim.schedule == "step":
        passed = bisect.bisect_right(sorted(optim.milestones), step / steps_per_cycle)
        return peak * optim.gamma ** passed
    raise ValueError(f"unknown schedule {optim.schedule!r}")

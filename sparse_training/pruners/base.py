"""What a pruning criterion is: per-weight scores, higher = more worth keeping. Allocation
(how many weights each layer keeps) is kept apart (`allocation.py`), so every criterion works
with every allocation. Every criterion scores a copy of the model (or only reads it), so the
caller's weights, buffers (BatchNorm running statistics), dtype and train/eval mode are never
touched, whatever happens during scoring."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

Scores = dict[str, torch.Tensor]
MaskView = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ScoringInputs:
    """What a criterion may read besides the model and the mask. `data` (with `train_batches`
    and `input_shape`) is needed by the criteria with `needs_data`."""

    data: Any = None
    batch_size: int = 128
    batches: int = 1
    seed: int = 0
    device: str | torch.device = "cpu"
    synflow_rounds: int = 100
    grasp_temperature: float = 200.0


class Criterion(ABC):
    """A pruning criterion, registered by `name` in `sparse_training.pruners`. Implement
    `score`; a criterion that re-scores the shrinking mask over several rounds also overrides
    `rounds`, and `scorer` when each round should reuse what it prepared once."""

    name: str
    needs_data: bool = True
    # A random mask spreads by ERK by default (Evci et al.); a scored one is cut globally.
    default_allocation: str = "global"

    @abstractmethod
    def score(self, model: nn.Module, mask: MaskView, inputs: ScoringInputs) -> Scores:
        """Per-weight scores of `model`'s prunable weights with `mask` applied."""

    def scorer(self, model: nn.Module, inputs: ScoringInputs) -> Callable[[MaskView], Scores]:
        """The scores of `model` under a given mask, for every round of one pruning."""
        return lambda mask: self.score(model, mask, inputs)

    def rounds(self, inputs: ScoringInputs) -> int:
        """Pruning rounds: round r of R keeps density d0 * (d / d0) ** (r / R), re-scoring
        with the current mask each round."""
        return 1

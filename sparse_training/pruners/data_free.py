"""The criteria that need no data: random scores and weight magnitude."""

from __future__ import annotations

import torch
from torch import nn

from ..masks import prunable_parameters
from .base import Criterion, MaskView, Scores, ScoringInputs


class Random(Criterion):
    """Uniform random scores from the seed: a random mask of the allocation's layer densities."""

    name = "random"
    needs_data = False
    default_allocation = "erk"

    def score(self, model: nn.Module, mask: MaskView, inputs: ScoringInputs) -> Scores:
        # A CPU generator of its own: the same seed gives the same mask on every device, and the
        # global RNG (which training relies on) is left alone.
        generator = torch.Generator().manual_seed(inputs.seed)
        return {name: torch.rand(m.shape, generator=generator).to(inputs.device) for name, m in mask.items()}


class Magnitude(Criterion):
    """|w| of the kept weights (IMP, LRR, SCULPT's cut, GMP)."""

    name = "magnitude"
    needs_data = False

    def score(self, model: nn.Module, mask: MaskView, inputs: ScoringInputs) -> Scores:
        params = prunable_parameters(model)
        with torch.no_grad():
            return {name: (params[name].detach().abs() * m.to(params[name].device)).to(inputs.device)
                    for name, m in mask.items()}

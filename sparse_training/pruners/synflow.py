"""SynFlow (Tanaka et al. 2020), iterative as its authors meant it: many rounds, each
re-scoring the network under the shrinking mask."""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable

import torch
from torch import nn

from ..errors import UserError
from ..masks import apply_mask_, prunable_parameters
from .base import Criterion, MaskView, Scores, ScoringInputs


class SynFlow(Criterion):
    """Score |dR/dw * w|, R the sum of the outputs of the linearised, masked network on an
    all-ones input; `synflow_rounds` rounds (Tanaka et al.'s exponential schedule)."""

    name = "synflow"

    def score(self, model: nn.Module, mask: MaskView, inputs: ScoringInputs) -> Scores:
        return self.scorer(model, inputs)(mask)

    def scorer(self, model: nn.Module, inputs: ScoringInputs) -> Callable[[MaskView], Scores]:
        # The linearised copy is built once per pruning: masks only shrink, so masking it in
        # place each round is the same as masking fresh absolute weights.
        linearised = _linearised(model, inputs.device)
        ones = torch.ones((1, *inputs.data.input_shape), dtype=torch.float64, device=inputs.device)
        return lambda mask: _synflow_round(linearised, mask, ones)

    def rounds(self, inputs: ScoringInputs) -> int:
        if inputs.synflow_rounds < 1:
            raise UserError(f"synflow_rounds must be at least 1, got {inputs.synflow_rounds}")
        return inputs.synflow_rounds


def _linearised(model: nn.Module, device: Any) -> nn.Module:
    """SynFlow's linearised copy: float64 (the path products overflow float32 in deep nets),
    every floating parameter and buffer replaced by its absolute value, BatchNorm in eval mode
    (Tanaka et al.'s `linearize`)."""
    clone = copy.deepcopy(model).to(device=device, dtype=torch.float64).eval()
    with torch.no_grad():
        for tensor in itertools.chain(clone.parameters(), clone.buffers()):
            if tensor.is_floating_point():
                tensor.abs_()
    for weight in prunable_parameters(clone).values():
        weight.requires_grad_(True)
    return clone


def _synflow_round(linearised: nn.Module, mask: MaskView, ones: torch.Tensor) -> Scores:
    apply_mask_(linearised, mask)
    weights = [prunable_parameters(linearised)[name] for name in mask]
    flow = linearised(ones).sum()
    grads = torch.autograd.grad(flow, weights)
    return {name: (g * w).detach().abs() for name, g, w in zip(mask, grads, weights)}

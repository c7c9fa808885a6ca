"""The criteria that score by gradients of the training loss on a few batches: SNIP and
GraSP. Both score a masked copy in training mode (BatchNorm on batch statistics) with dropout
off, so that scores are deterministic and draw nothing from the global RNG."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..acceleration import twice_differentiable
from ..masks import apply_mask_, prunable_parameters
from .base import Criterion, MaskView, Scores, ScoringInputs

GRASP_EPS = 1e-10  # keeps GraSP's normalisation finite, as in Tanaka et al.'s code
Batches = list[tuple[torch.Tensor, torch.Tensor]]


class Snip(Criterion):
    """SNIP (Lee et al. 2019): |g * w|, g the gradient of the mean loss over the batches."""

    name = "snip"

    def score(self, model: nn.Module, mask: MaskView, inputs: ScoringInputs) -> Scores:
        training = _training_batches(inputs)
        clone = _scoring_copy(model, mask, inputs.device)
        weights = [prunable_parameters(clone)[name] for name in mask]
        grads = _mean_gradient(clone, weights, training, temperature=1.0)
        return {name: (g * w).detach().abs() for name, g, w in zip(mask, grads, weights)}


class Grasp(Criterion):
    """GraSP (Wang et al. 2020) as in Tanaka et al.'s code: keep score w * (H g) of the loss of
    logits / temperature, g treated as a constant, normalised by |sum of all scores|. A high
    score means removing the weight would reduce the gradient flow the most."""

    name = "grasp"

    def score(self, model: nn.Module, mask: MaskView, inputs: ScoringInputs) -> Scores:
        training = _training_batches(inputs)
        temperature = inputs.grasp_temperature
        clone = _scoring_copy(model, mask, inputs.device)
        weights = [prunable_parameters(clone)[name] for name in mask]
        stopped = [g.detach() for g in _mean_gradient(clone, weights, training, temperature)]
        hessian_g = [torch.zeros_like(w) for w in weights]
        # One batch at a time: the double-backward graph of all batches at once may not fit.
        for batch in training:
            with twice_differentiable():
                grads = _mean_gradient(clone, weights, [batch], temperature, create_graph=True)
            product = sum((g * s).sum() for g, s in zip(grads, stopped))
            terms = torch.autograd.grad(product, weights)
            hessian_g = [h + t / len(training) for h, t in zip(hessian_g, terms)]
        scores = {name: (w * h).detach() for name, w, h in zip(mask, weights, hessian_g)}
        norm = sum(s.sum() for s in scores.values()).abs() + GRASP_EPS
        return {name: s / norm for name, s in scores.items()}


def _scoring_copy(model: nn.Module, mask: MaskView, device: Any) -> nn.Module:
    clone = copy.deepcopy(model).to(device)
    apply_mask_(clone, mask)
    clone.train()
    for module in clone.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()
    for weight in prunable_parameters(clone).values():
        weight.requires_grad_(True)
    return clone


def _training_batches(inputs: ScoringInputs) -> Batches:
    batches = inputs.data.train_batches(inputs.batch_size, inputs.seed, 0, augment=False)
    return [(x.to(inputs.device), y.to(inputs.device)) for x, y in itertools.islice(batches, inputs.batches)]


def _mean_gradient(model: nn.Module, weights: list[torch.Tensor], training: Batches, temperature: float,
                   create_graph: bool = False) -> list[torch.Tensor]:
    total = [torch.zeros_like(w) for w in weights]
    for x, y in training:
        loss = F.cross_entropy(model(x) / temperature, y) / len(training)
        grads = torch.autograd.grad(loss, weights, create_graph=create_graph)
        total = [t + g for t, g in zip(total, grads)]
    return total

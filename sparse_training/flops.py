"""Theoretical training cost (FLOPs), counted per layer from its shape, the input
resolution and the layer's density at each step, so that methods compare iso-FLOP.

Conventions (those of the pruning literature, e.g. Evci et al. 2020):
- one multiply-add counts as one FLOP (ResNet-50 = 4.1 GFLOPs per 224x224 image);
- a Conv/Linear layer's forward costs (output positions x its kept weights) per sample:
  its dense multiply-adds times its density; its bias adds one per output element;
- BatchNorm, LayerNorm, GroupNorm and InstanceNorm cost 2 per output element (the batch
  statistics, then the fused scale-and-shift); they and biases are never pruned;
- activations, pooling, residual additions and the loss cost nothing (no multiply-adds);
- a training step costs batch x 3 x forward (backward = 2 x forward: the gradients with
  respect to the inputs and to the weights); at a RigL update step the gradient with
  respect to the weights is dense, so that step costs batch x (3 x forward + the
  multiply-adds of the pruned weights);
- evaluation and the scoring passes of pruning criteria are not counted: this is the cost
  of the training steps of all cycles.
Output sizes are measured once, by one forward pass of a dummy input with hooks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from .masks import PRUNABLE_TYPES, prunable_parameters

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
NORM_COST_PER_ELEMENT = 2
CONVENTION = ("theoretical cost of every training step of every cycle: one multiply-add = one FLOP, "
              "backward = 2 x forward, sparse layers at their density, RigL's dense gradients included, "
              "evaluation and pruning scores excluded (sparse_training/flops.py)")


@dataclass(frozen=True)
class LayerCost:
    """Per-sample forward cost of one layer. `weight` names the prunable weight (None for a
    normalisation layer); each of its weights does `uses` multiply-adds per sample (the
    output positions); `dense` multiply-adds (bias, normalisation) are never pruned."""

    module: str
    weight: str | None
    uses: int
    numel: int
    dense: int


def layer_costs(model: nn.Module, input_shape: Sequence[int], device: str | torch.device = "cpu") -> list[LayerCost]:
    """The cost of every counted layer, from one forward pass of a zero input of one sample
    (eval mode, no gradients; the model's mode is restored). A module called several times
    per forward (shared weights) accumulates its uses."""
    weight_names = {id(p): name for name, p in prunable_parameters(model).items()}
    outputs: dict[str, int] = {}
    modules = {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES + NORM_TYPES)}

    def hook(name: str):
        def record(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
            outputs[name] = outputs.get(name, 0) + output.numel()
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    costs = []
    for name, module in modules.items():
        elements = outputs.get(name, 0)
        if isinstance(module, PRUNABLE_TYPES):
            bias = elements if module.bias is not None else 0
            costs.append(LayerCost(name, weight_names[id(module.weight)], elements // module.weight.shape[0],
                                   module.weight.numel(), bias))
        else:
            costs.append(LayerCost(name, None, 0, 0, NORM_COST_PER_ELEMENT * elements))
    return costs


def forward_flops(costs: Sequence[LayerCost], mask: Mapping[str, torch.Tensor] | None = None) -> int:
    """Forward multiply-adds per sample with `mask` (dense when None)."""
    return sum(c.uses * _kept(c, mask) + c.dense for c in costs)


def _kept(cost: LayerCost, mask: Mapping[str, torch.Tensor] | None) -> int:
    if cost.weight is None:
        return 0
    return cost.numel if mask is None else int(mask[cost.weight].sum())


class FlopCounter:
    """Running total of training FLOPs. The per-sample cost is recomputed only when the mask
    changes (`set_mask`), so counting a step costs nothing on the device."""

    def __init__(self, costs: Sequence[LayerCost], total: int = 0):
        self.costs = list(costs)
        self.total = int(total)
        self.step_per_sample = 3 * forward_flops(self.costs)
        self.dense_gradient_extra = 0

    def set_mask(self, mask: Mapping[str, torch.Tensor]) -> None:
        sparse = forward_flops(self.costs, mask)
        self.step_per_sample = 3 * sparse
        # A dense weight gradient also multiplies the pruned weights' positions.
        self.dense_gradient_extra = forward_flops(self.costs) - sparse

    def add_step(self, batch_size: int, dense_gradient: bool = False) -> None:
        extra = self.dense_gradient_extra if dense_gradient else 0
        self.total += batch_size * (self.step_per_sample + extra)

"""Theoretical training cost (FLOPs), counted per layer from its shape, the input
resolution and the layer's density at each step, so that methods compare iso-FLOP.

Conventions (those of the pruning literature, e.g. Evci et al. 2020):
- one multiply-add counts as one FLOP (ResNet-50 = 4.1 GFLOPs per 224x224 image);
- a Conv/Linear layer's forward costs (output positions x its kept weights) per sample:
  its dense multiply-adds times its density; its bias adds one per output element;
- depthwise and grouped convolutions follow the same rule: a (C_out, C_in/groups, k, k)
  weight does one multiply-add per output position of its output channel;
- an `nn.MultiheadAttention` with query length L, key/value length S and embedding E (per
  call, summed over calls) costs: its query projection rows L uses each, its key and value
  rows S uses each, `out_proj` L uses (all at their density; the fused `in_proj_weight` is
  counted as two row ranges, [0, E) query and [E, 3E) key and value); Q K^T and attention x V
  L x S x E each, dense (S counts `add_bias_kv` and `add_zero_attn` extra keys); biases one
  add per output (L x E + 2 x S x E in, L x E out); scaling and softmax nothing. Counted by a
  hook on the attention module (its forward never calls `out_proj`, which is not counted
  again as a Linear);
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

from .masks import PRUNABLE_TYPES, attention_projections, prunable_parameters

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
NORM_COST_PER_ELEMENT = 2
CONVENTION = ("theoretical cost of every training step of every cycle: one multiply-add = one FLOP, "
              "backward = 2 x forward, sparse layers at their density, RigL's dense gradients included, "
              "evaluation and pruning scores excluded (sparse_training/flops.py)")


@dataclass(frozen=True)
class LayerCost:
    """Per-sample forward cost of one layer. `weight` names the prunable weight (None for a
    normalisation layer); each of its weights does `uses` multiply-adds per sample (the
    output positions); `dense` multiply-adds (bias, normalisation, attention matmuls) are
    never pruned. `rows` = (start, stop) restricts the cost to those rows of the weight (the
    query, or the key and value, part of a fused attention projection); `numel` is then the
    size of that slice."""

    module: str
    weight: str | None
    uses: int
    numel: int
    dense: int
    rows: tuple[int, int] | None = None


def layer_costs(model: nn.Module, input_shape: Sequence[int], device: str | torch.device = "cpu") -> list[LayerCost]:
    """The cost of every counted layer, from one forward pass of a zero input of one sample
    (eval mode, no gradients; the model's mode is restored). A module called several times
    per forward (shared weights) accumulates its uses."""
    weight_names = {id(p): name for name, p in prunable_parameters(model).items()}
    outputs: dict[str, int] = {}
    # Per attention module: [query tokens, key/value tokens, query x key pairs], summed over calls.
    attention_uses: dict[str, list[int]] = {}
    attentions = {name: m for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    # Counted through their attention module only (its forward uses the weight directly).
    out_projs = {id(m.out_proj) for m in attentions.values()}
    modules = {name: m for name, m in model.named_modules()
               if isinstance(m, PRUNABLE_TYPES + NORM_TYPES + (nn.MultiheadAttention,)) and id(m) not in out_projs}

    def hook(name: str):
        def record(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
            outputs[name] = outputs.get(name, 0) + output.numel()
        return record

    def attention_hook(name: str):
        def record(module: nn.MultiheadAttention, args, kwargs, _output) -> None:
            query = args[0] if len(args) > 0 else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs["key"]
            if query.dim() == 2:  # unbatched (L, E)
                batch, length, key_length = 1, query.shape[0], key.shape[0]
            elif module.batch_first:  # (N, L, E)
                batch, length, key_length = query.shape[0], query.shape[1], key.shape[1]
            else:  # (L, N, E)
                batch, length, key_length = query.shape[1], query.shape[0], key.shape[0]
            attended = key_length + int(module.bias_k is not None) + int(module.add_zero_attn)
            uses = attention_uses.setdefault(name, [0, 0, 0])
            uses[0] += batch * length
            uses[1] += batch * key_length
            uses[2] += batch * length * attended
        return record

    handles = [m.register_forward_hook(attention_hook(name), with_kwargs=True)
               if isinstance(m, nn.MultiheadAttention) else m.register_forward_hook(hook(name))
               for name, m in modules.items()]
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
        if isinstance(module, nn.MultiheadAttention):
            costs.extend(_attention_costs(name, module, attention_uses.get(name, [0, 0, 0]), weight_names))
            continue
        elements = outputs.get(name, 0)
        if isinstance(module, PRUNABLE_TYPES):
            bias = elements if module.bias is not None else 0
            costs.append(LayerCost(name, weight_names[id(module.weight)], elements // module.weight.shape[0],
                                   module.weight.numel(), bias))
        else:
            costs.append(LayerCost(name, None, 0, 0, NORM_COST_PER_ELEMENT * elements))
    return costs


def _attention_costs(name: str, attention: nn.MultiheadAttention, uses: Sequence[int],
                     weight_names: Mapping[int, str]) -> list[LayerCost]:
    """The input projections (by row range of the fused weight, or one per separate weight),
    the dense attention matmuls, then `out_proj`, for `uses` = (query tokens, key/value
    tokens, query x key pairs) per sample."""
    queries, keys, pairs = uses
    embed = attention.embed_dim
    has_bias = attention.in_proj_bias is not None
    costs = []
    if attention.in_proj_weight is not None:
        weight = weight_names[id(attention.in_proj_weight)]
        width = attention.in_proj_weight.shape[1]
        costs.append(LayerCost(name, weight, queries, embed * width, queries * embed if has_bias else 0, (0, embed)))
        costs.append(LayerCost(name, weight, keys, 2 * embed * width, 2 * keys * embed if has_bias else 0,
                               (embed, 3 * embed)))
    else:
        for projection, count in zip(attention_projections(attention), (queries, keys, keys)):
            param = getattr(attention, projection)
            costs.append(LayerCost(name, weight_names[id(param)], count, param.numel(),
                                   count * embed if has_bias else 0))
    # Q K^T and attention x V: heads x pairs x head_dim = pairs x E multiply-adds each.
    costs.append(LayerCost(name, None, 0, 0, 2 * pairs * embed))
    out_proj = attention.out_proj
    costs.append(LayerCost(f"{name}.out_proj" if name else "out_proj", weight_names[id(out_proj.weight)], queries,
                           out_proj.weight.numel(), queries * embed if out_proj.bias is not None else 0))
    return costs


def forward_flops(costs: Sequence[LayerCost], mask: Mapping[str, torch.Tensor] | None = None) -> int:
    """Forward multiply-adds per sample with `mask` (dense when None)."""
    return sum(c.uses * _kept(c, mask) + c.dense for c in costs)


def _kept(cost: LayerCost, mask: Mapping[str, torch.Tensor] | None) -> int:
    if cost.weight is None:
        return 0
    if mask is None:
        return cost.numel
    kept = mask[cost.weight]
    if cost.rows is not None:
        kept = kept[cost.rows[0]:cost.rows[1]]
    return int(kept.sum())


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

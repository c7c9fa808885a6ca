"""Masks: `{parameter_name: bool tensor}`, True = kept, over the weight matrices of Conv (all
kinds: depthwise and grouped too), Linear and attention layers (first conv or patch projection,
shortcut convs, classifier, the fused `in_proj_weight` and `out_proj` of `nn.MultiheadAttention`
included). Never pruned: biases, norm layers, embeddings, class tokens, position embeddings.

Pruned weights are kept exactly zero by `MaskedStep`, one fused in-place multiply after every
optimizer step; no forward hooks, so a masked model is an ordinary model."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from .errors import UserError

Mask = dict[str, torch.Tensor]

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of every Conv/Linear layer and the input projections of every attention
    layer, keyed by their state_dict name, in module order."""
    found = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, PRUNABLE_TYPES) and module.weight is not None:
            found[prefix + "weight"] = module.weight
        elif isinstance(module, nn.MultiheadAttention):
            # Fused (3E, E) when query, key and value share the embedding size, else three
            # matrices; `out_proj` is an nn.Linear child, found on its own.
            for name in attention_projections(module):
                found[prefix + name] = getattr(module, name)
    return found


def attention_projections(attention: nn.MultiheadAttention) -> tuple[str, ...]:
    """The names of the input projection weights of an attention layer."""
    if attention.in_proj_weight is not None:
        return ("in_proj_weight",)
    return ("q_proj_weight", "k_proj_weight", "v_proj_weight")


def ones_mask(model: nn.Module) -> Mask:
    """The dense mask: every prunable weight kept."""
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in prunable_parameters(model).items()}


def validate_mask(mask: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Raise UserError unless `mask` covers exactly the model's prunable weights with bool
    tensors of the same shapes."""
    params = prunable_parameters(model)
    missing = sorted(set(params) - set(mask))
    extra = sorted(set(mask) - set(params))
    if missing or extra:
        raise UserError(
            f"mask does not match the model: missing {missing[:3]}, unexpected {extra[:3]}; "
            "use a mask from a checkpoint of the same architecture"
        )
    for name, p in params.items():
        m = mask[name]
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise UserError(f"mask entry {name!r} is not a bool tensor")
        if tuple(m.shape) != tuple(p.shape):
            raise UserError(
                f"mask entry {name!r} has shape {tuple(m.shape)}, the weight has {tuple(p.shape)}; "
                "use a mask from a checkpoint of the same architecture"
            )


def kept_count(mask: Mapping[str, torch.Tensor]) -> int:
    return int(sum(int(m.sum()) for m in mask.values()))


def total_count(mask: Mapping[str, torch.Tensor]) -> int:
    return int(sum(m.numel() for m in mask.values()))


def sparsity(mask: Mapping[str, torch.Tensor]) -> float:
    """Fraction of prunable weights that are pruned."""
    total = total_count(mask)
    return 0.0 if total == 0 else 1.0 - kept_count(mask) / total


def layer_sparsity(mask: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {name: 1.0 - float(m.sum()) / m.numel() for name, m in mask.items()}


def collapsed_layers(mask: Mapping[str, torch.Tensor]) -> list[str]:
    """Layers with no kept weight: the network is disconnected there (layer collapse)."""
    return [name for name, m in mask.items() if not bool(m.any())]


def is_subset(inner: Mapping[str, torch.Tensor], outer: Mapping[str, torch.Tensor]) -> bool:
    """True when every weight kept by `inner` is kept by `outer` (masks only shrink)."""
    return all(not bool((inner[n] & ~outer[n]).any()) for n in inner)


def apply_mask_(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights of `model` in place."""
    params = prunable_parameters(model)
    with torch.no_grad():
        for name, m in mask.items():
            params[name].mul_(m.to(params[name].device, params[name].dtype))


class MaskedStep:
    """Keeps pruned weights at exactly zero after each optimizer step.

    One `torch._foreach_mul_` over the weights and their momentum buffers: multiplying the
    buffers too means a weight regrown later (RigL) does not inherit stale momentum."""

    def __init__(self, model: nn.Module, mask: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer):
        params = prunable_parameters(model)
        self.optimizer = optimizer
        self.params = [params[name] for name in mask]
        # In the weight's own memory format (channels-last or not): one layout per multiply.
        self.factors = [torch.empty_like(params[name]).copy_(mask[name]) for name in mask]
        self._tensors: list[torch.Tensor] | None = None
        self._factors: list[torch.Tensor] | None = None

    def _targets(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # Momentum buffers appear after the first step; cache the lists once they exist.
        if self._tensors is None:
            tensors, factors = list(self.params), list(self.factors)
            complete = True
            for p, f in zip(self.params, self.factors):
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is None:
                    complete = False
                else:
                    tensors.append(buf)
                    factors.append(f)
            if not complete:
                return tensors, factors
            self._tensors, self._factors = tensors, factors
        return self._tensors, self._factors

    @torch.no_grad()
    def __call__(self) -> None:
        if self.params:
            tensors, factors = self._targets()
            torch._foreach_mul_(tensors, factors)


def mask_from_weights(state_dict: Mapping[str, torch.Tensor], names: Iterable[str]) -> Mask:
    """The mask implied by exact zeros in a plain state_dict (for user checkpoints)."""
    return {name: state_dict[name] != 0 for name in names}

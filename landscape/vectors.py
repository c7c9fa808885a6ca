"""Parameter-vector algebra on `{name: tensor}` dicts for interpolation. Pure functions:
inputs are never modified."""

from __future__ import annotations

from typing import Mapping

import torch

Vector = dict[str, torch.Tensor]


def _same_keys(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    if a.keys() != b.keys():
        diff = sorted(set(a) ^ set(b))
        raise ValueError(f"vectors have different entries: {diff[:3]}")


def lerp(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float) -> Vector:
    """(1 - alpha) a + alpha b for floating-point tensors. Others (BatchNorm's integer
    num_batches_tracked) cannot be interpolated: they are taken from `a`."""
    _same_keys(a, b)
    out = {}
    for k, va in a.items():
        vb = b[k]
        if va.shape != vb.shape:
            raise ValueError(f"{k} has shape {tuple(va.shape)} in one vector and {tuple(vb.shape)} in the other")
        if va.is_floating_point():
            # Computed as a + alpha (b - a) in float64 so that alpha=0 and alpha=1 give the endpoints exactly.
            out[k] = va.double().lerp(vb.double(), alpha).to(va.dtype) if 0.0 < alpha < 1.0 else (va if alpha == 0.0 else vb).clone()
        else:
            out[k] = va.clone()
    return out

"""Parameter-vector algebra on `{name: tensor}` dicts, shared by interpolation, Hessian and
sign code. Pure functions: inputs are never modified; dot products accumulate in float64."""

from __future__ import annotations

from typing import Mapping

import torch

Vector = dict[str, torch.Tensor]


def _same_keys(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    if a.keys() != b.keys():
        diff = sorted(set(a) ^ set(b))
        raise ValueError(f"vectors have different entries: {diff[:3]}")


def dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    _same_keys(a, b)
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))


def norm(a: Mapping[str, torch.Tensor]) -> float:
    return dot(a, a) ** 0.5


def scale(alpha: float, x: Mapping[str, torch.Tensor]) -> Vector:
    return {k: alpha * v for k, v in x.items()}


def axpy(alpha: float, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> Vector:
    """alpha * x + y."""
    _same_keys(x, y)
    return {k: torch.add(y[k], x[k], alpha=alpha) for k in x}


def sub(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Vector:
    return axpy(-1.0, b, a)


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


def project_to_mask(v: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor]) -> Vector:
    """m * v on the masked entries; entries without a mask are returned unchanged (copied)."""
    return {k: (t * mask[k].to(t.dtype) if k in mask else t.clone()) for k, t in v.items()}


def flatten(v: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in v.values()]) if v else torch.zeros(0)


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> Vector:
    out, offset = {}, 0
    for k, t in like.items():
        out[k] = flat[offset:offset + t.numel()].view_as(t).to(t.dtype)
        offset += t.numel()
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, expected {offset}")
    return out

"""Power iteration with deflation: the textbook method behind PyHessian, kept as a backend
for comparison, but with the stopping test and the target fixed.

- It stops on the residual ||H v - lambda v|| <= tol |lambda| (a bound on the eigenvalue's
  error), not on the relative change between two iterations, which can be small long
  before the estimate is accurate when the top eigenvalues are close.
- Plain power iteration finds the largest eigenvalue in *magnitude*. When that one is
  negative, the iteration is shifted by it (H - lambda I is then positive semi-definite on
  the deflated space) and goes on, so the result is the largest *algebraic* eigenvalue.
- The residual returned is the one the stopping rule tested: ||P H v - lambda v|| with P the
  projection out of the eigenvectors found before (for the first eigenvalue, ||Hv - lambda v||).
  `HessianOperator.residual` (sharpness --verify) measures the undeflated one."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .hessian import Eigenpairs, dot64, gaussian_vector, generator, norm64
from .lanczos import Operator, warm_start_vector


def _deflate(w: torch.Tensor, found: list[torch.Tensor]) -> torch.Tensor:
    for u in found:
        w = w - dot64(u, w) * u
    return w


def power_top(op: Operator, k: int, tol: float, max_hvp: int, seed: int,
              starts: Sequence[torch.Tensor] = ()) -> Eigenpairs:
    """The k largest eigenvalues one after the other, each in the complement of those found
    before, each with at most `max_hvp` HVPs; returned largest first. The i-th starts from
    a seeded Gaussian vector, or from `starts[i]` (an approximate eigenvector, e.g. the
    previous checkpoint's) where there is one."""
    gen = generator(seed, 0)
    like = torch.zeros(0, dtype=op.dtype, device=op.device)
    start_count = op.hvp_count
    found: list[torch.Tensor] = []
    values, residuals, counts = [], [], []
    for i in range(k):
        v = gaussian_vector(op.dim, gen, like)
        if i < len(starts):
            warm = _deflate(warm_start_vector([starts[i]], v), found)
            if norm64(warm) > 1e-3:  # else it lay in the span of those found: the random start
                v = warm
        v = _deflate(v, found)
        v = v / norm64(v)
        shift, value, residual, vector = 0.0, 0.0, float("inf"), v
        for _ in range(max_hvp):
            hv = op.matvec(v)
            w = _deflate(hv, found)
            value, vector = dot64(v, w), v
            residual = norm64(w - value * v)
            if residual <= tol * abs(value):
                if value >= 0 or shift != 0.0:
                    break
                shift = value  # the dominant eigenvalue is negative: iterate on H - value I
            w = w - shift * v
            v = w / norm64(w)
        found.append(vector)
        values.append(value)
        residuals.append(residual)
        counts.append(op.hvp_count - start_count)
    order = np.argsort(values)[::-1]
    return Eigenpairs(
        values=np.array(values)[order], residuals=np.array(residuals)[order], hvp_counts=np.array(counts)[order],
        vectors=torch.stack(found)[torch.as_tensor(order.copy())],
    )

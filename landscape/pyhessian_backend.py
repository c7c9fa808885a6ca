"""The `pyhessian` backend: PyHessian 0.1's `hessian.eigenvalues` as published, on the same
model, subset and subspace, for side-by-side checks.

PyHessian's power iteration and its HVP over a data loader run unchanged on current torch
(checked with torch 2.15); only its `density()` fails there (it calls the removed
`torch.eig`), and this project does not use it. The one addition is a subclass whose
`dataloader_hv_product` counts the products and, in the masked subspace, applies the mask
to v before and to Hv after PyHessian's own product, which PyHessian itself knows nothing of.

What PyHessian returns is what this backend reports: the largest eigenvalues in magnitude,
found by power iteration stopped when two consecutive estimates differ by less than `tol`
(relative). The residuals ||Hv - lambda v|| are measured afterwards with this project's
operator, one HVP per eigenvector, not counted in `hvp_counts`; eigenvalues are returned
largest first."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from sparse_training.acceleration import twice_differentiable

from .hessian import Eigenpairs, HessianOperator, norm64


def pyhessian_top(op: HessianOperator, k: int, tol: float, max_hvp: int, seed: int) -> Eigenpairs:
    """PyHessian's top-k at `tol` and maxIter = `max_hvp` (both per eigenvalue, as PyHessian
    defines them); its random start vectors are drawn from torch's global generator, which is
    seeded with `seed` here and restored afterwards."""
    from pyhessian import hessian
    from pyhessian.utils import group_product

    counts: list[int] = []

    class CountedMaskedHessian(hessian):
        def dataloader_hv_product(self, v):
            v = op.expand(op.compress(v))
            _, hv = super().dataloader_hv_product(v)
            hv = op.expand(op.compress(hv))
            counts.append(1)
            if op.on_product is not None:  # PyHessian's own products bypass op.matvec
                op.on_product()
            return group_product(hv, v).cpu().item(), hv

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), twice_differentiable():
        # PyHessian calls backward(create_graph=True), about which torch warns; harmless here.
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(seed)
        solver = CountedMaskedHessian(op.model, nn.CrossEntropyLoss(), dataloader=op.batches, cuda=op.device.type == "cuda")
        values, vectors = solver.eigenvalues(maxIter=max_hvp, tol=tol, top_n=k)
    order = np.argsort(values)[::-1]
    values = np.array(values, dtype=np.float64)[order]
    flat = torch.stack([op.compress(vectors[i]) for i in order])
    residuals = np.array([norm64(op.matvec(u) - float(lam) * u) for lam, u in zip(values, flat)])
    # PyHessian finds its eigenvalues inside one call, so only the total is known.
    return Eigenpairs(values=values, residuals=residuals, hvp_counts=np.full(k, len(counts)), vectors=flat)

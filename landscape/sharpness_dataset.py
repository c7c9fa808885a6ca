"""The sharpness.nc dataset: per-checkpoint results (`Record`) to and from xarray.

Dims (checkpoint, eig_index, sample[, slq_node, grid]); coords checkpoint, cycle (-1 for
init/rewind/plain files), step (-1 when unknown), sparsity, eig_index, and the scalar coords
run and method. The spectral density is stored twice: the raw quadrature nodes and weights
of each checkpoint (what merging relies on) and their Gaussian smoothing on one eigenvalue
grid shared by all checkpoints, recomputed from the nodes whenever the file is rewritten."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import xarray as xr

from . import store
from .lanczos import density_on_grid

ANALYSIS = "sharpness"
DENSITY_GRID_POINTS = 401
DENSITY_SIGMA_FRACTION = 0.01  # Gaussian width as a fraction of the spectrum's span


@dataclass
class Record:
    """Everything computed for one checkpoint."""

    label: str
    path: str
    cycle: int
    step: int
    sparsity: float
    loss: float
    dim: int
    eigenvalues: np.ndarray
    residuals: np.ndarray
    hvp_counts: np.ndarray
    trace: tuple[float, float, int, float] | None = None  # mean, standard error, probes, deflated part
    slq: tuple[np.ndarray, np.ndarray] | None = None  # nodes, weights
    warm_started: bool = False  # the solve started from the previous checkpoint's eigenvectors
    verified: np.ndarray | None = None  # --verify: explicit ||Hv - lambda v|| / |lambda| per eigenvalue


RESIDUALS = {
    "lanczos": "the Lanczos recurrence's estimate beta_m |s_mi| of ||H v - lambda v|| for the unit Ritz vector v "
               "(beta_m the last off-diagonal of the tridiagonal matrix, s_mi the last component of its i-th "
               "eigenvector), the quantity the stopping test compares with tol |lambda|; with full "
               "reorthogonalisation it equals the explicit residual up to the rounding of the products. An "
               "explicit residual bounds |lambda - exact eigenvalue| (residual_verified, --verify)",
    "power": "the residual the power iteration's stopping test used: ||P H v - lambda v|| for the unit iterate v, "
             "P the projection out of the eigenvectors found before it (none for the largest); the undeflated "
             "||H v - lambda v||, which bounds |lambda - exact eigenvalue|, is residual_verified (--verify)",
    "pyhessian": "||H v - lambda v|| for PyHessian's unit eigenvector v, measured with one extra product after it "
                 "stopped (its own test is the relative change between iterations); it bounds "
                 "|lambda - exact eigenvalue|",
}


def build(records: list[Record], settings: Mapping[str, Any], subset: np.ndarray, run_name: str, method: str,
          base: Path | None) -> xr.Dataset:
    """One dataset for `records`, ordered by (cycle, step, label)."""
    records = sorted(records, key=lambda r: (r.cycle, r.step, r.label))
    d = store.describe
    ds = xr.Dataset(
        {
            "eigenvalue": d(_per_eig(records, "eigenvalues"), "Hessian eigenvalue", "1",
                            "largest algebraic eigenvalues of the Hessian of the mean training loss over the "
                            "evaluation subset (model in eval mode), restricted to the subspace; index 0 is the largest"),
            "residual": d(_per_eig(records, "residuals"), "eigenpair residual", "1",
                          RESIDUALS.get(str(settings.get("backend", "lanczos")), RESIDUALS["lanczos"])),
            "hvp_count": d(_per_eig(records, "hvp_counts"), "Hessian-vector products", "1",
                           "Hessian-vector products spent until this eigenvalue was accepted, cumulative over the "
                           "solve (lanczos accepts all k at once; pyhessian reports only its total); without "
                           "the products of --verify, --trace and --density"),
            "warm_started": d(_per_checkpoint([int(r.warm_started) for r in records]).astype(np.int8),
                              "warm-started", "1",
                              "1 if the solve started from the previous checkpoint's top eigenvectors restricted to "
                              "this checkpoint's subspace (--warm-start), 0 if from a seeded random vector"),
            "loss": d(_per_checkpoint([r.loss for r in records]), "mean training loss", "1",
                      "mean cross-entropy over the evaluation subset, model in eval mode"),
            "subspace_dim": d(_per_checkpoint([r.dim for r in records]), "subspace dimension", "1",
                              "number of trainable parameter entries the Hessian is restricted to"),
            "samples": d(xr.DataArray(len(subset)), "evaluation subset size", "1",
                         "number of training samples in the fixed, seeded evaluation subset"),
            "subset_index": d(xr.DataArray(subset.astype(np.int64), dims="sample"), "evaluation subset", "1",
                              "indices into the training split of the samples the loss is averaged over"),
        },
        coords={
            "checkpoint": [r.label for r in records],
            "cycle": ("checkpoint", np.array([r.cycle for r in records], dtype=np.int64)),
            "step": ("checkpoint", np.array([r.step for r in records], dtype=np.int64)),
            "sparsity": ("checkpoint", np.array([r.sparsity for r in records], dtype=np.float64)),
            "eig_index": np.arange(int(settings["top_k"])),
            "run": run_name,
            "method": method,
        },
    )
    if settings.get("verify"):
        ds["residual_verified"] = d(_per_eig(records, "verified"), "explicit relative residual", "1",
                                    "||H v - lambda v|| / |lambda| for the stored eigenvalue and its unit eigenvector "
                                    "v, H v computed by one more Hessian-vector product (--verify); a bound on the "
                                    "eigenvalue's relative error")
    if settings.get("trace"):
        _add_trace(ds, records)
    if settings.get("density"):
        _add_density(ds, records)
    inputs = [Path(r.path) if Path(r.path).is_absolute() or base is None else base / r.path for r in records]
    ds.attrs.update(store.provenance(inputs, settings, base=base, analysis=ANALYSIS))
    return ds


def _per_checkpoint(values: list) -> xr.DataArray:
    return xr.DataArray(np.array(values), dims="checkpoint")


def _per_eig(records: list[Record], name: str) -> xr.DataArray:
    return xr.DataArray(np.stack([np.asarray(getattr(r, name)) for r in records]), dims=("checkpoint", "eig_index"))


def _add_trace(ds: xr.Dataset, records: list[Record]) -> None:
    d = store.describe
    mean, stderr, probes, deflated = zip(*(r.trace for r in records))
    ds["trace"] = d(_per_checkpoint(mean), "Hessian trace", "1",
                    "trace of the (restricted) Hessian: trace_deflated plus the Hutchinson estimate, the mean of "
                    "(Pz)^T H (Pz) over Rademacher z, where P projects out the deflated eigenvectors")
    ds["trace_stderr"] = d(_per_checkpoint(stderr), "standard error of the trace", "1",
                           "sample standard deviation of (Pz)^T H (Pz) divided by the square root of the number of probes")
    ds["trace_samples"] = d(_per_checkpoint(probes), "trace probes", "1",
                            "number of Rademacher probes (one Hessian-vector product each)")
    ds["trace_deflated"] = d(_per_checkpoint(deflated), "exact part of the trace", "1",
                             "sum of the top eigenvalues whose Lanczos eigenvectors were projected out of the probes "
                             "(0 when none were: backends power and pyhessian)")


def _add_density(ds: xr.Dataset, records: list[Record]) -> None:
    width = max(len(r.slq[0]) for r in records)
    nodes = np.zeros((len(records), width))
    weights = np.zeros((len(records), width))
    for i, r in enumerate(records):  # padding nodes carry weight 0
        nodes[i, :len(r.slq[0])], weights[i, :len(r.slq[1])] = r.slq
    d = store.describe
    ds["slq_eigenvalue"] = d(xr.DataArray(nodes, dims=("checkpoint", "slq_node")), "quadrature node", "1",
                       "Ritz values of stochastic Lanczos quadrature (Rademacher start vectors)")
    ds["slq_weight"] = d(xr.DataArray(weights, dims=("checkpoint", "slq_node")), "quadrature weight", "1",
                         "squared first components of the tridiagonal eigenvectors, averaged over runs; sum to 1")
    live = nodes[weights > 0]
    low, high = float(live.min()), float(live.max())
    sigma = DENSITY_SIGMA_FRACTION * max(high - low, 1e-12 + 1e-3 * max(abs(low), abs(high)))
    grid = np.linspace(low - 5 * sigma, high + 5 * sigma, DENSITY_GRID_POINTS)
    ds["density"] = d(xr.DataArray(density_on_grid(nodes, weights, grid, sigma), dims=("checkpoint", "grid")),
                      "spectral density", "1",
                      "eigenvalue density of the (restricted) Hessian: quadrature nodes smoothed by a Gaussian of "
                      "standard deviation density_sigma; integrates to 1 over density_eigenvalue")
    ds.coords["density_eigenvalue"] = ("grid", grid)
    ds["density_sigma"] = d(xr.DataArray(sigma), "density smoothing width", "1",
                            f"standard deviation of the Gaussian kernel: {DENSITY_SIGMA_FRACTION} of the span of all nodes")


def records_of(ds: xr.Dataset) -> list[Record]:
    """The per-checkpoint records a stored dataset holds (the inverse of `build`)."""
    inputs = json.loads(ds.attrs.get("inputs", "[]"))
    records = []
    for i, label in enumerate(ds["checkpoint"].values.tolist()):
        one = ds.isel(checkpoint=i)
        trace = None
        if "trace" in ds:
            trace = (float(one["trace"]), float(one["trace_stderr"]), int(one["trace_samples"]),
                     float(one["trace_deflated"]))
        slq = None
        if "slq_eigenvalue" in ds:
            keep = one["slq_weight"].values > 0
            slq = (one["slq_eigenvalue"].values[keep], one["slq_weight"].values[keep])
        records.append(Record(
            label=str(label), path=inputs[i] if i < len(inputs) else str(label), cycle=int(one["cycle"]),
            step=int(one["step"]), sparsity=float(one["sparsity"]), loss=float(one["loss"]), dim=int(one["subspace_dim"]),
            eigenvalues=one["eigenvalue"].values, residuals=one["residual"].values, hvp_counts=one["hvp_count"].values,
            trace=trace, slq=slq,
            # files written before warm starts existed started every solve from a random vector
            warm_started=bool(one["warm_started"]) if "warm_started" in ds else False,
            verified=one["residual_verified"].values if "residual_verified" in ds else None,
        ))
    return records

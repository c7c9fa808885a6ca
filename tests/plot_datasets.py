"""Small hand-made datasets that follow the analysis schemas exactly (see the schemas in
ARCHITECTURE.md / landscape.store conventions), for drawing figures without training anything.
Like the datasets `landscape plot` draws, they carry the method registry's styles."""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

from landscape.plots import METHOD_STYLES_ATTR
from landscape.store import describe, provenance
from sparse_training.methods import style_table

# method -> (colour, marker), as figures draw them
METHOD_STYLE = {name: (entry["colour"], entry["marker"]) for name, entry in style_table().items()}
DESCRIBED = {METHOD_STYLES_ATTR: json.dumps(style_table())}

LAYERS = ["features.0.weight", "features.3.weight", "features.6.weight", "head.weight"]


def _var(dims, values, long_name, units, description) -> xr.DataArray:
    return describe(xr.DataArray(np.asarray(values), dims=dims), long_name, units, description)


def _finish(ds: xr.Dataset, analysis: str, run: str, method: str) -> xr.Dataset:
    ds = ds.assign_coords(run=run, method=method)
    ds.attrs.update(provenance([f"checkpoints/{run}.pt"], {"seed": 0}, analysis=analysis), **DESCRIBED)
    return ds


def connectivity(run: str = "pai-cyclic", method: str = "pai-cyclic", cycles: int = 4, points: int = 11,
                 height: float = 0.05) -> xr.Dataset:
    """Consecutive-cycle pairs whose error is a parabola above the chord of its endpoints."""
    alpha = np.linspace(0, 1, points)
    a = [f"cycle_{i:03d}" for i in range(cycles - 1)]
    b = [f"cycle_{i + 1:03d}" for i in range(cycles - 1)]
    pairs = [f"{x}..{y}" for x, y in zip(a, b)]
    splits = ["train", "test"]
    e0 = np.array([[0.10 - 0.01 * i, 0.14 - 0.01 * i] for i in range(len(pairs))])  # (pair, split)
    e1 = e0 - 0.01
    bump = height / (1 + np.arange(len(pairs)))[:, None, None] * 4 * alpha * (1 - alpha)
    error = (1 - alpha) * e0[..., None] + alpha * e1[..., None] + bump
    loss = 3 * error
    mid = np.full((len(pairs), 2), 0.5)
    barrier = error.max(-1) - (error[..., 0] + error[..., -1]) / 2
    lbarrier = loss.max(-1) - (loss[..., 0] + loss[..., -1]) / 2
    d3, d2 = ("pair", "split", "alpha"), ("pair", "split")
    ds = xr.Dataset(
        {
            "error": _var(d3, error, "error", "1", "1 - accuracy along the path"),
            "loss": _var(d3, loss, "cross-entropy loss", "nats", "mean loss along the path"),
            "error_barrier": _var(d2, barrier, "error barrier", "1", "max E - mean of endpoints"),
            "error_barrier_linear": _var(d2, barrier, "error barrier (linear)", "1", "max of E minus chord"),
            "error_barrier_alpha": _var(d2, mid, "alpha of the error barrier", "1", "arg max"),
            "loss_barrier": _var(d2, lbarrier, "loss barrier", "nats", "max L - mean of endpoints"),
            "loss_barrier_linear": _var(d2, lbarrier, "loss barrier (linear)", "nats", "max of L minus chord"),
            "loss_barrier_alpha": _var(d2, mid, "alpha of the loss barrier", "1", "arg max"),
            "endpoint_error_gap": _var(("pair", "split", "endpoint"), np.zeros((len(pairs), 2, 2)),
                                       "endpoint error gap", "1", "evaluated minus recorded"),
        },
        coords={
            "pair": pairs, "split": splits, "alpha": alpha, "endpoint": ["a", "b"],
            "checkpoint_a": ("pair", a), "checkpoint_b": ("pair", b),
            "cycle_a": ("pair", np.arange(len(pairs))), "cycle_b": ("pair", np.arange(1, len(pairs) + 1)),
        },
        attrs={"bn_mode": "recompute"},
    )
    ds["alpha"].attrs.update(long_name="interpolation coefficient alpha", units="1")
    out = _finish(ds, "connectivity", run, method)
    out.attrs["bn_mode"] = "recompute"
    return out


def sharpness(run: str = "pai-cyclic", method: str = "pai-cyclic", cycles: int = 4, k: int = 3,
              scale: float = 1.0, trace: bool = True, sparsity: float = 0.9) -> xr.Dataset:
    labels = ["init"] + [f"cycle_{i:03d}" for i in range(cycles)]
    top = scale * np.array([5.0] + [40.0 / (1 + i) for i in range(cycles)])
    eig = top[:, None] / (1 + np.arange(k))[None, :]
    d2 = ("checkpoint", "eig_index")
    data = {
        "eigenvalue": _var(d2, eig, "Hessian eigenvalue", "1", "largest algebraic eigenvalues"),
        "residual": _var(d2, np.full_like(eig, 1e-5), "Ritz residual", "1", "||Hv - lambda v||"),
        "hvp_count": _var(d2, np.full(eig.shape, 9), "Hessian-vector products", "1", "HVPs used"),
    }
    if trace:
        data["trace"] = _var(("checkpoint",), top * 12, "Hessian trace", "1", "Hutchinson estimate")
        data["trace_stderr"] = _var(("checkpoint",), top * 0.8, "standard error of the trace", "1", "s.e.")
        data["trace_samples"] = _var(("checkpoint",), np.full(len(labels), 50), "trace samples", "1", "probes")
    ds = xr.Dataset(data, coords={
        "checkpoint": labels, "eig_index": np.arange(k),
        "cycle": ("checkpoint", [-1] + list(range(cycles))),
        "step": ("checkpoint", [0] + [100 * (i + 1) for i in range(cycles)]),
        "sparsity": ("checkpoint", [sparsity] * (cycles + 1)), "samples": 512,
    })
    return _finish(ds, "sharpness", run, method)


def signs(run: str = "lrr", method: str = "lrr", cycles: int = 4, references=("init", "previous")) -> xr.Dataset:
    rows = []
    for ref in references:
        for c in range(cycles):
            if ref == "previous" and c == 0:
                continue
            reference = "init" if ref == "init" else f"cycle_{c - 1:03d}"
            rows.append((f"cycle_{c:03d}..{reference}", f"cycle_{c:03d}", reference, c))
    rng = np.random.default_rng(0)
    kept = rng.integers(200, 2000, size=(len(rows), len(LAYERS))).astype(float)
    flip = np.clip(rng.uniform(0.02, 0.3, size=kept.shape), 0, 1)
    flipped = np.round(kept * flip)
    d2 = ("pair", "layer")
    ds = xr.Dataset(
        {
            "kept_both": _var(d2, kept, "weights kept in both", "1", "count"),
            "flipped": _var(d2, flipped, "sign flips", "1", "count"),
            "flip_fraction": _var(d2, flipped / kept, "sign-flip fraction", "1", "flipped / kept_both"),
            "match_fraction": _var(d2, 1 - flipped / kept, "sign-match fraction", "1", "1 - flip"),
            "kept_both_total": _var(("pair",), kept.sum(1), "weights kept in both", "1", "count"),
            "flipped_total": _var(("pair",), flipped.sum(1), "sign flips", "1", "count"),
            "flip_fraction_total": _var(("pair",), flipped.sum(1) / kept.sum(1), "sign-flip fraction", "1", "overall"),
            "match_fraction_total": _var(("pair",), 1 - flipped.sum(1) / kept.sum(1), "sign-match fraction", "1", "overall"),
        },
        coords={"pair": [r[0] for r in rows], "checkpoint": ("pair", [r[1] for r in rows]),
                "reference": ("pair", [r[2] for r in rows]), "cycle": ("pair", [r[3] for r in rows]),
                "layer": LAYERS},
    )
    return _finish(ds, "signs", run, method)


def overlap(labels=("pai-cyclic/cycle_003", "lrr/cycle_004", "sculpt/cycle_003"), densities=(0.1, 0.1, 0.1)) -> xr.Dataset:
    n = len(labels)
    rng = np.random.default_rng(1)
    pa = np.asarray(densities)[:, None] * np.ones((n, n))
    pb = pa.T
    inter = np.where(np.eye(n, dtype=bool), pa, pa * pb * rng.uniform(1, 4, (n, n)))
    jac = inter / (pa + pb - inter)
    chance_i = pa * pb
    chance_j = chance_i / (pa + pb - chance_i)
    d2 = ("mask_a", "mask_b")
    d3 = d2 + ("layer",)
    data = {}
    for name, value, long in [("intersection", inter, "intersection"), ("jaccard", jac, "Jaccard index"),
                              ("coverage", inter / pb, "coverage of B"), ("hamming", pa + pb - 2 * inter, "Hamming fraction"),
                              ("chance_intersection", chance_i, "chance intersection"), ("chance_jaccard", chance_j, "chance Jaccard"),
                              ("intersection_ratio", inter / chance_i, "intersection / chance"),
                              ("jaccard_ratio", jac / chance_j, "Jaccard / chance")]:
        data[f"{name}_total"] = _var(d2, value, long, "1", long)
        data[name] = _var(d3, np.repeat(value[..., None], len(LAYERS), -1), long, "1", long)
    data["density_a"] = _var(("mask_a", "layer"), np.repeat(np.asarray(densities)[:, None], len(LAYERS), 1), "density of A", "1", "kept fraction")
    data["density_b"] = _var(("mask_b", "layer"), np.repeat(np.asarray(densities)[:, None], len(LAYERS), 1), "density of B", "1", "kept fraction")
    ds = xr.Dataset(data, coords={"mask_a": list(labels), "mask_b": list(labels), "layer": LAYERS})
    ds.attrs.update(provenance(list(labels), {}, analysis="overlap"), **DESCRIBED)
    return ds


RUNS = [  # (run, method, final sparsity, seed offset)
    ("dense-s0", "dense", 0.0, 0), ("dense-s1", "dense", 0.0, 1),
    ("pai-cyclic-s0", "pai-cyclic", 0.9, 0), ("pai-cyclic-s1", "pai-cyclic", 0.9, 1),
    ("lrr-s0", "lrr", 0.9, 0), ("sculpt-s0", "sculpt", 0.9, 0),
]


def metrics(runs=RUNS, cycles: int = 4, epochs: int = 5, flops: bool = True) -> xr.Dataset:
    """Training loss that plateaus within each cycle and jumps at each mask change."""
    names = [r[0] for r in runs]
    shape = (len(runs), cycles, epochs + 1, 2, 2)
    value = np.full(shape, np.nan)
    sparsity = np.full((len(runs), cycles), np.nan)
    lr = np.full(shape[:3], np.nan)
    step = np.full(shape[:3], -1)
    for r, (_, method, final, seed) in enumerate(runs):
        n_cycles = 1 if method == "dense" else cycles
        for c in range(n_cycles):
            sparsity[r, c] = final if method != "lrr" else 1 - (1 - final) ** ((c + 1) / n_cycles)
            for e in range(epochs + 1):
                level = 0.3 * np.exp(-e / 1.5) + 0.05 + 0.02 * c * (method == "lrr") + 0.005 * seed
                value[r, c, e, 0, 0] = level + (0.4 if e == 0 and c > 0 else 0)  # train loss
                value[r, c, e, 1, 0] = level * 1.3
                value[r, c, e, 0, 1] = 1 - level / 2
                value[r, c, e, 1, 1] = 0.93 - level / 2 - 0.01 * (method != "dense") - 0.003 * seed
                lr[r, c, e] = 0.1 * (1 - e / epochs)
                step[r, c, e] = (c * epochs + e) * 10
    dims = ("run", "cycle", "epoch", "split", "metric")
    data = {"value": _var(dims, value, "value", "1", "metric value")}
    data["value"].attrs["allow_nan"] = 1
    if flops:
        total = np.array([4e9 if m == "dense" else 4e9 * (1 - s) * cycles for _, m, s, _ in runs])
        data["training_flops"] = _var(("run",), total, "training FLOPs", "FLOPs", "total")
    ds = xr.Dataset(data, coords={
        "run": names, "cycle": np.arange(cycles), "epoch": np.arange(epochs + 1),
        "split": ["train", "test"], "metric": ["loss", "accuracy"],
        "method": ("run", [r[1] for r in runs]), "sparsity": (("run", "cycle"), sparsity),
        "lr": (("run", "cycle", "epoch"), lr), "step": (("run", "cycle", "epoch"), step),
    })
    ds.attrs.update(provenance(names, {}, analysis="metrics"), **DESCRIBED)
    return ds

"""Pairs of checkpoints, their paths (landscape.interpolate) and barriers (landscape.barrier),
gathered into one dataset with a `pair` dimension and merged into a file.

Which pairs: two checkpoint files (`landscape barrier`), consecutive cycle checkpoints of a
run (cycle_000..cycle_001, ...), or matching cycle checkpoints of two runs
(runA/cycle_001..runB/cycle_001). Pairs already in the output file with the same settings
are reused; the file is read, extended pair by pair and rewritten atomically under a lock,
so an interrupted computation leaves a complete file with the pairs done so far."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xarray as xr

from sparse_training.checkpoint import Checkpoint, load_checkpoint
from sparse_training.records import read_config
from sparse_training.rundir import RunDir, run_of_checkpoint
from sparse_training.errors import UserError

from . import store
from .barrier import with_barriers
from .interpolate import (DEFAULT_EVAL_BATCH_SIZE, PathCurves, PathSettings, check_compatible, evaluate_path,
                          recorded_error, recorded_loss, validated)

ANALYSIS = "connectivity"
GAP_WARNING = 0.02  # |evaluated - recorded| endpoint error above which the user is warned


@dataclass(frozen=True)
class Pair:
    label: str
    path_a: Path
    path_b: Path


@dataclass(frozen=True)
class LoadOptions:
    """--model/--model-kwargs/--data, for plain state_dict files."""

    model: str | None = None
    model_kwargs: dict[str, Any] | None = None
    data: str | None = None


@dataclass
class Outcome:
    dataset: xr.Dataset
    path: Path
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- which pairs

def _qualifier(path: Path) -> str:
    run = run_of_checkpoint(path)
    return run.path.name if run is not None else path.resolve().parent.name


def checkpoint_pair(path_a: str | Path, path_b: str | Path) -> Pair:
    """Two checkpoint files. Labels are file stems, qualified by the run (or folder) name
    when the two files do not lie in the same folder: 'runA/cycle_001..runB/cycle_001'."""
    a, b = Path(path_a), Path(path_b)
    for path in (a, b):
        if not path.is_file():
            raise UserError(f"{path} is not a checkpoint file" + (" (it is a directory; for a run use "
                            "`landscape connectivity RUN`)" if path.is_dir() else " (it does not exist)"))
    if a.resolve().parent == b.resolve().parent:
        return Pair(f"{a.stem}..{b.stem}", a, b)
    return Pair(f"{_qualifier(a)}/{a.stem}..{_qualifier(b)}/{b.stem}", a, b)


def consecutive_pairs(run: RunDir) -> list[Pair]:
    labels = run.cycle_labels()
    if len(labels) < 2:
        raise UserError(f"run {run.path} has {len(labels)} cycle checkpoint(s); consecutive-cycle connectivity "
                        "needs at least two (train with --cycles 2 or more)")
    return [Pair(f"{x}..{y}", run.checkpoint(x), run.checkpoint(y)) for x, y in zip(labels, labels[1:])]


def matching_pairs(run_a: RunDir, run_b: RunDir) -> list[Pair]:
    if run_a.path.resolve() == run_b.path.resolve():
        raise UserError(f"{run_a.path} was given twice; pass one run for consecutive cycles, or two different runs")
    common = [label for label in run_a.cycle_labels() if label in set(run_b.cycle_labels())]
    if not common:
        raise UserError(f"runs {run_a.path} and {run_b.path} have no cycle checkpoint label in common")
    name_a, name_b = run_a.path.name, run_b.path.name
    return [Pair(f"{name_a}/{x}..{name_b}/{x}", run_a.checkpoint(x), run_b.checkpoint(x)) for x in common]


def barrier_output(pair: Pair) -> Path:
    """RUN/analysis/barrier_<A>__<B>.nc for a checkpoint in a run, else beside the first file."""
    name = "barrier_" + pair.label.replace("..", "__").replace("/", "-")
    run = run_of_checkpoint(pair.path_a)
    return run.analysis_file(name) if run is not None else pair.path_a.parent / f"{name}.nc"


def connectivity_output(run_a: RunDir, run_b: RunDir | None = None) -> Path:
    """RUN/analysis/connectivity.nc, or RUN_A/analysis/connectivity_<RUN_B name>.nc."""
    return run_a.analysis_file(ANALYSIS if run_b is None else f"{ANALYSIS}_{run_b.path.name}")


def default_batch_size(run: RunDir | None) -> int:
    """The evaluation batch size the run was trained with, so that endpoints evaluated with
    --bn interpolate reproduce its recorded metrics bit for bit."""
    if run is None or not run.exists():
        return DEFAULT_EVAL_BATCH_SIZE
    return read_config(run).optim.eval_batch_size


# ---------------------------------------------------------------- one pair as a dataset

def pair_dataset(pair: Pair, a: Checkpoint, b: Checkpoint, curves: PathCurves) -> xr.Dataset:
    """The (pair=1, split, alpha) dataset of one path, barriers and endpoint gaps included."""
    splits = list(curves.splits)
    dims = ("pair", "split", "alpha")
    error_gap = [[curves.error[i, 0] - recorded_error(a, s), curves.error[i, -1] - recorded_error(b, s)]
                 for i, s in enumerate(splits)]
    loss_gap = [[curves.loss[i, 0] - recorded_loss(a, s), curves.loss[i, -1] - recorded_loss(b, s)]
                for i, s in enumerate(splits)]
    path = "at theta(alpha) = (1 - alpha) theta_A + alpha theta_B, evaluated on the split"
    gap = ("at alpha=0 (endpoint a) or alpha=1 (endpoint b) minus the {0} recorded in that checkpoint (NaN when it "
           "records none); nonzero when BatchNorm statistics are recomputed, a subset is evaluated, or the file "
           "does not hold what was evaluated")
    ds = xr.Dataset(
        {
            "error": store.describe(xr.DataArray(curves.error[None], dims=dims), "error", "1", f"1 - accuracy {path}"),
            "loss": store.describe(xr.DataArray(curves.loss[None], dims=dims), "loss", "nat",
                                   f"mean cross-entropy {path}"),
            "endpoint_error_gap": store.describe(
                xr.DataArray(np.array([error_gap]), dims=("pair", "split", "endpoint")),
                "endpoint error gap", "1", "evaluated error " + gap.format("error")),
            "endpoint_loss_gap": store.describe(
                xr.DataArray(np.array([loss_gap]), dims=("pair", "split", "endpoint")),
                "endpoint loss gap", "nat", "evaluated loss " + gap.format("loss")),
            "samples": store.describe(
                xr.DataArray(np.array([[curves.samples[s] for s in splits]]), dims=("pair", "split")),
                "evaluated samples", "1", "number of examples of the split evaluated at each alpha"),
            "bn_batches_used": store.describe(
                xr.DataArray(np.array([curves.bn_batches_used]), dims=("pair",)), "BatchNorm batches", "1",
                "training batches the BatchNorm running statistics were recomputed from at each alpha "
                "(0: not recomputed)"),
        },
        coords={
            "pair": [pair.label],
            "split": splits,
            "alpha": ("alpha", curves.alpha, {"long_name": "interpolation coefficient alpha", "units": "1"}),
            "endpoint": ["a", "b"],
            "checkpoint_a": ("pair", [pair.path_a.stem]),
            "checkpoint_b": ("pair", [pair.path_b.stem]),
            "cycle_a": ("pair", [_cycle(a)]),
            "cycle_b": ("pair", [_cycle(b)]),
            "run_a": ("pair", [_run_name(a)]),
            "run_b": ("pair", [_run_name(b)]),
            "sparsity_a": ("pair", [float(a.sparsity)]),
            "sparsity_b": ("pair", [float(b.sparsity)]),
        },
    )
    for name in ("endpoint_error_gap", "endpoint_loss_gap"):
        ds[name].attrs["allow_nan"] = 1
    return with_barriers(ds)


def _cycle(ckpt: Checkpoint) -> int:
    return -1 if ckpt.cycle is None else int(ckpt.cycle)


def _run_name(ckpt: Checkpoint) -> str:
    run = ckpt.run
    return "" if run is None else run.path.name


def gap_warnings(ds: xr.Dataset, labels: list[str], threshold: float = GAP_WARNING) -> list[str]:
    """One line per pair of `labels` where an endpoint's evaluated error is more than
    `threshold` away from the error its checkpoint records, naming the largest gap and the
    likely cause."""
    settings = store.settings_of(ds)
    if settings.get("bn") == "recompute" and int(ds.bn_batches_used.max()) > 0:
        cause = "recomputed BatchNorm statistics; --bn interpolate evaluates the checkpoints as stored"
    elif settings.get("samples") is not None:
        cause = "evaluated on a --samples subset"
    else:
        cause = "a checkpoint saved mid-epoch, other data, or a file that does not hold what was evaluated"
    lines = []
    for label in labels:
        gap = ds.endpoint_error_gap.sel(pair=label)
        worst = abs(gap).fillna(0).argmax(...)
        value = float(gap.isel(worst))
        if abs(value) > threshold:
            endpoint = str(gap.endpoint.values[int(worst["endpoint"])])
            name = ds[f"checkpoint_{endpoint}"].sel(pair=label).item()
            split = str(gap.split.values[int(worst["split"])])
            lines.append(f"warning: {label}: the {split} error of {name} evaluated here differs from the one it "
                         f"records by {value:+.4f} ({cause})")
    return lines


# ---------------------------------------------------------------- the file

def _read_existing(out: Path, settings: PathSettings) -> xr.Dataset | None:
    if not out.exists():
        return None
    try:
        ds = store.read_dataset(out)
    except UserError as error:
        raise UserError(f"{error}; pass --overwrite to replace it") from None
    if ds.attrs.get("analysis") != ANALYSIS or "pair" not in ds.dims:
        raise UserError(f"{out} exists and is not a connectivity dataset; pass --overwrite to replace it or --out elsewhere")
    stored, wanted = store.settings_of(ds), settings.as_dict()
    if stored != wanted:
        differ = ", ".join(f"{k}={stored.get(k)!r} there, {wanted.get(k)!r} now"
                           for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k))
        raise UserError(f"{out} was computed with other settings ({differ}); pass --overwrite to replace it "
                        "or --out to write elsewhere")
    return ds


def _stored_labels(ds: xr.Dataset | None) -> set[str]:
    return set() if ds is None else {str(p) for p in ds.pair.values}


def _load_all(pairs: list[Pair], options: LoadOptions) -> dict[Path, Checkpoint]:
    loaded: dict[Path, Checkpoint] = {}
    for pair in pairs:
        for path in (pair.path_a, pair.path_b):
            if path not in loaded:
                loaded[path] = load_checkpoint(path, model=options.model, model_kwargs=options.model_kwargs,
                                               data=options.data)
        check_compatible(loaded[pair.path_a], loaded[pair.path_b])
    return loaded


def _common(values: list[str]) -> str:
    return values[0] if values and all(v == values[0] for v in values) else ""


def _merged(existing: xr.Dataset | None, new: xr.Dataset, order: list[str]) -> xr.Dataset:
    """`existing` with the pair of `new` added (replacing one of the same label), pairs in
    `order` first and other stored pairs after them."""
    parts = [new.drop_vars(["run", "method"], errors="ignore")]
    if existing is not None:
        kept = [str(p) for p in existing.pair.values if str(p) not in set(new.pair.values)]
        parts.insert(0, existing.drop_vars(["run", "method"], errors="ignore").sel(pair=kept))
    return _ranked(xr.concat(parts, dim="pair", combine_attrs="override") if len(parts) > 1 else parts[0], order)


def _ranked(ds: xr.Dataset, order: list[str]) -> xr.Dataset:
    """`ds` with the pairs in `order` first, then the other stored pairs as they were."""
    labels = [str(p) for p in ds.pair.values]
    return ds.sel(pair=[p for p in order if p in labels] + [p for p in labels if p not in order])


def _attrs(existing: xr.Dataset | None, loaded: dict[Path, Checkpoint], settings: PathSettings,
           base: Path | None) -> dict[str, Any]:
    attrs = store.provenance(list(loaded), settings.as_dict(), base=base, analysis=ANALYSIS)
    inputs = json.loads(existing.attrs.get("inputs", "[]")) if existing is not None else []
    attrs["inputs"] = json.dumps(inputs + [p for p in json.loads(attrs["inputs"]) if p not in inputs])
    first = next(iter(loaded.values()))
    attrs.update(bn_mode=settings.bn, model=first.model.name if first.model else "",
                 data=first.data.name if first.data else "")
    target = (first.config.get("prune") or {}).get("sparsity")
    if target is not None:
        attrs["target_sparsity"] = float(target)
    return attrs


def _scalar_coords(ds: xr.Dataset, existing: xr.Dataset | None, loaded: dict[Path, Checkpoint]) -> xr.Dataset:
    runs = [_run_name(c) for c in loaded.values()]
    methods = [c.method or "" for c in loaded.values()]
    if existing is not None and "run" in existing.coords:
        runs.append(str(existing.run.item()))
        methods.append(str(existing.method.item()))
    return ds.assign_coords(run=_common(runs), method=_common(methods))


def compute_pairs(
    pairs: list[Pair], settings: PathSettings, out: str | Path, *, overwrite: bool = False, device: str = "cpu",
    options: LoadOptions = LoadOptions(), base: Path | None = None,
    progress: Callable[[], None] | None = None, log: Callable[[str], None] | None = None,
) -> Outcome:
    """Compute the pairs not yet in `out` (all of them with `overwrite`) and merge them into
    it. Every input is loaded and checked before anything is written."""
    from sparse_training.data import load_data

    out, settings = Path(out), validated(settings)
    order = [p.label for p in pairs]
    if len(set(order)) != len(order):
        raise UserError(f"pair {next(p for p in order if order.count(p) > 1)!r} was asked for twice")
    existing = None if overwrite else _read_existing(out, settings)
    todo = [p for p in pairs if p.label not in _stored_labels(existing)]
    if not todo:
        return Outcome(_ranked(existing, order), out, reused=order)
    loaded = _load_all(todo, options)
    datas: dict[Any, Any] = {}
    with store.locked(out):
        existing = None if overwrite else _read_existing(out, settings)
        reused = [p.label for p in pairs if p.label in _stored_labels(existing)]
        ds, computed = existing, []
        for pair in [p for p in todo if p.label not in reused]:
            a, b = loaded[pair.path_a], loaded[pair.path_b]
            if a.data not in datas:
                datas[a.data] = load_data(a.data, device)
            if log is not None:
                log(f"{pair.label}: {settings.points} points, BatchNorm {settings.bn}")
            curves = evaluate_path(a, b, datas[a.data], settings, device, progress)
            merged = _merged(ds, pair_dataset(pair, a, b, curves), order)
            merged = _scalar_coords(merged, ds, {pair.path_a: a, pair.path_b: b})
            merged.attrs = _attrs(ds, {pair.path_a: a, pair.path_b: b}, settings, base)
            store.write_dataset(merged, out)
            ds = merged
            computed.append(pair.label)
    return Outcome(ds, out, computed=computed, reused=reused)

"""A sweep's results as one dataset: every run's final metrics, training FLOPs, final
sparsity and analysis datasets on the sweep's grid, with intervals over seeds.

The sweep directory (written by `landscape sweep SPEC.toml --out SWEEP`):

    SWEEP/sweep.json        {"spec", "spec_text", "grid": {key: [values]}, "runs": [{"name", "point"}]}
    SWEEP/runs/<name>/      ordinary run directories
    SWEEP/runs/<name>/analyses/<analysis>.nc   (and RUN/analysis/*.nc, the run's own analyses)

The dataset's dims are the grid keys, in the grid's order (seed included), plus the analyses'
own dims (pair, split, alpha, checkpoint, ...). Per grid point:

- `done` (bool), `run` (its name, "" where the grid has no run), `status` (meta.json's, or
  "missing" where the run directory does not exist);
- `train_loss`, `train_accuracy`, `test_loss`, `test_accuracy`: the last cycle's final
  evaluation (metrics.csv; the final checkpoint's recorded metrics where metrics.csv lacks
  them), `final_sparsity` (the last cycle's recorded sparsity), `training_flops` (meta.json,
  multiply-adds);
- `<analysis>_<variable>` for every numeric variable of every analysis dataset of the runs,
  with that dataset's own dims (a dim that would clash with a grid key, or with another
  analysis's dim of other coordinates, becomes `<analysis>_<dim>`); non-index coordinates
  of the analyses are dropped, dims without coordinates get 0..n-1.

A run that is not done (no DONE) gives NaN everywhere and is listed in the `missing_runs`
attr. When the grid has a seed key (`seed`, or a dotted key ending in `.seed`), every
floating-point variable that has it gets `<var>_mean`, `<var>_std` (ddof=1), `<var>_ci95_low`,
`<var>_ci95_high` and `<var>_n` over it: the 95 % Student-t interval of the mean,
mean +- t(0.975, n-1) * std / sqrt(n), n the number of seeds with a value; the interval (and
std) is NaN where n < 2. Without a seed key there are no interval variables and the
`interval` attr says why.

Imports no torch unless a run's metrics.csv lacks its final metrics (then the final
checkpoint's recorded metrics are read)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import xarray as xr

from sparse_training.errors import IncompleteRunError, UserError
from sparse_training.io import read_json
from sparse_training.records import read_meta, read_metrics
from sparse_training.rundir import RunDir
from sparse_training.sweep.layout import SweepDir

from .results import AnalysisResult, update_whole
from .store import described, provenance

ANALYSIS = "aggregate"
KIND = "aggregate"  # what `landscape plot aggregate` draws
DEFAULT_OUT = "aggregate.nc"
SKIPPED_ANALYSES = ("metrics", ANALYSIS)  # metrics.csv is read directly; never nest an aggregate
INTERVAL = "95% Student-t interval of the mean over seeds"
CONFIDENCE = 0.95
STATS = ("mean", "std", "ci95_low", "ci95_high", "n")
NOT_A_SWEEP = "pass the folder written by `landscape sweep SPEC.toml --out SWEEP`"

FINAL_METRICS = {  # variable -> (split, metric) in metrics.csv, key in a checkpoint's metrics
    "train_loss": ("train", "loss"),
    "train_accuracy": ("train", "accuracy"),
    "test_loss": ("test", "loss"),
    "test_accuracy": ("test", "accuracy"),
}
DESCRIPTIONS = {
    "train_loss": ("final training loss", "1", "mean cross-entropy on the training set at the end of the run's last "
                   "cycle (its final checkpoint's evaluation)"),
    "train_accuracy": ("final training accuracy", "1", "fraction of training samples classified correctly at the end "
                       "of the run's last cycle (its final checkpoint's evaluation)"),
    "test_loss": ("final test loss", "1", "mean cross-entropy on the test set at the end of the run's last cycle (its "
                  "final checkpoint's evaluation)"),
    "test_accuracy": ("final test accuracy", "1", "fraction of test samples classified correctly at the end of the "
                      "run's last cycle (its final checkpoint's evaluation)"),
    "final_sparsity": ("final sparsity", "1", "fraction of prunable weights that are zero at the end of the run's "
                       "last cycle"),
    "training_flops": ("training FLOPs", "multiply-adds", "total theoretical training cost of the run as meta.json "
                       "records it (one multiply-add = one FLOP, backward = 2 x forward, sparse layers at their "
                       "density; see sparse_training/flops.py)"),
}


@dataclass
class Sweep:
    """What sweep.json says: the spec, the grid (key -> values, in order) and the runs."""

    path: Path
    spec: dict[str, Any]
    spec_text: str
    grid: dict[str, list[Any]]
    runs: list[tuple[str, dict[str, Any]]]

    @property
    def record(self) -> Path:
        return SweepDir(self.path).record

    def run_dir(self, name: str) -> RunDir:
        return RunDir(SweepDir(self.path).run(name))

    @property
    def seed_dim(self) -> str | None:
        return next((key for key in self.grid if key == "seed" or key.endswith(".seed")), None)


@dataclass
class RunRecord:
    """One run's contribution: its final numbers and its analyses (prepared for merging)."""

    name: str
    done: bool
    status: str
    values: dict[str, float] = field(default_factory=dict)
    analyses: dict[str, xr.Dataset] = field(default_factory=dict)


# ---------------------------------------------------------------- reading the sweep

def read_sweep(path: str | Path) -> Sweep:
    """The sweep at `path`; a one-line UserError (exit 2) saying what to pass when it is not one."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; {NOT_A_SWEEP}")
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a sweep directory; {NOT_A_SWEEP}")
    record_file = SweepDir(path).record
    if not record_file.exists():
        if RunDir(path).exists():
            raise UserError(f"{path} is a run directory, not a sweep (no {record_file.name}); {NOT_A_SWEEP}, "
                            f"or use `landscape metrics {path}` for one run")
        raise UserError(f"{path} is not a sweep directory (no {record_file.name}); {NOT_A_SWEEP}")
    record = SweepDir(path).read_record()
    bad = f"{record_file} is not a sweep record written by `landscape sweep`"
    grid, runs = record.get("grid"), record.get("runs")
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"{bad} (its \"grid\" must map each key to a non-empty list of values)")
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                             and isinstance(r.get("point"), dict) for r in runs):
        raise UserError(f"{bad} (its \"runs\" must be a list of {{\"name\", \"point\"}} objects)")
    for key, values in grid.items():
        keys = [_value_key(v) for v in values]
        if len(set(keys)) != len(keys):
            raise UserError(f"{bad} (grid key {key!r} lists a value twice)")
    names = []
    for run in runs:
        name = run["name"]
        # A name from a file becomes a path: a plain folder name only, never one that leaves runs/.
        if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
            raise UserError(f"{bad} (run name {name!r} is not a plain folder name)")
        if name in names:
            raise UserError(f"{bad} (run {name!r} is listed twice)")
        names.append(name)
        if set(run["point"]) != set(grid):
            raise UserError(f"{bad} (run {name!r} has point keys {sorted(run['point'])}, the grid {list(grid)})")
    spec = record.get("spec") if isinstance(record.get("spec"), dict) else {}
    spec_text = record.get("spec_text") if isinstance(record.get("spec_text"), str) else ""
    return Sweep(path, spec, spec_text, {str(k): list(v) for k, v in grid.items()},
                 [(r["name"], dict(r["point"])) for r in runs])


def _value_key(value: Any) -> tuple[str, Any]:
    """A grid value as a comparable key: 1 and 1.0 alike, True apart from 1."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", float(value))
    if isinstance(value, str):
        return ("text", value)
    return ("json", json.dumps(value, sort_keys=True, default=str))


def _coordinate(values: list[Any]) -> np.ndarray:
    """A grid key's values as a netCDF coordinate: numbers stay numbers (ints when all are),
    text stays text, anything else (booleans, lists, tables) becomes its JSON text."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.int64 if all(isinstance(v, int) for v in values) else np.float64)
    return np.array([v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str) for v in values],
                    dtype=str)


def _index(sweep: Sweep, name: str, point: Mapping[str, Any]) -> tuple[int, ...]:
    index = []
    for key, values in sweep.grid.items():
        keys = [_value_key(v) for v in values]
        wanted = _value_key(point[key])
        if wanted not in keys:
            raise UserError(f"{sweep.record}: run {name!r} has {key} = {point[key]!r}, which is not on the "
                            f"grid ({values}); the file is not a consistent sweep record")
        index.append(keys.index(wanted))
    return tuple(index)


# ---------------------------------------------------------------- one run

def read_run(sweep: Sweep, name: str, warn: Callable[[Path, str], None] = lambda path, reason: None) -> RunRecord:
    """A done run's final numbers and analyses; a run that is not done contributes nothing.
    An analysis file that cannot be read is skipped (NaN for this run) and reported to `warn`."""
    run = sweep.run_dir(name)
    if not run.exists():
        return RunRecord(name, False, "missing")
    meta = read_meta(run)
    status = str(meta.get("status", "")) or "unknown"
    if not run.is_done():
        return RunRecord(name, False, status)
    values = _final_metrics(run)
    flops = meta.get("training_flops")
    values["training_flops"] = float(flops) if isinstance(flops, (int, float)) and not isinstance(flops, bool) else np.nan
    analyses: dict[str, xr.Dataset] = {}
    for path in run.analysis_files():
        if path.stem in SKIPPED_ANALYSES:
            continue
        try:
            prepared = _prepared(path, sweep.grid)
        except UserError as error:
            warn(path, str(error))
            continue
        if prepared is not None:
            analyses[path.stem] = prepared
    return RunRecord(name, True, status, values, analyses)


def _final_metrics(run: RunDir) -> dict[str, float]:
    """The last cycle's final evaluation from metrics.csv (end-of-cycle epochs are always
    evaluated), and the sparsity recorded there; the final checkpoint's recorded metrics
    fill in anything metrics.csv lacks."""
    rows = read_metrics(run)
    values = {name: np.nan for name in [*FINAL_METRICS, "final_sparsity"]}
    if rows:
        last_cycle = max(row["cycle"] for row in rows)
        latest: dict[tuple[str, str], tuple[int, float]] = {}
        for row in rows:
            if row["cycle"] == last_cycle:
                key = (row["split"], row["metric"])
                if key not in latest or row["epoch"] >= latest[key][0]:
                    latest[key] = (row["epoch"], row["value"])
        for name, key in FINAL_METRICS.items():
            if key in latest:
                values[name] = latest[key][1]
        if ("train", "sparsity") in latest:
            values["final_sparsity"] = latest[("train", "sparsity")][1]
    if any(math.isnan(v) for v in values.values()) and run.cycle_labels():
        values = _from_checkpoint(run, run.cycle_labels()[-1], values)
    return values


def _from_checkpoint(run: RunDir, label: str, values: dict[str, float]) -> dict[str, float]:
    from sparse_training.io import torch_load_safe

    raw = torch_load_safe(run.checkpoint(label))
    recorded = raw.get("metrics") if isinstance(raw, dict) and isinstance(raw.get("metrics"), dict) else {}
    values = dict(values)
    for name in FINAL_METRICS:
        if math.isnan(values[name]) and isinstance(recorded.get(name), (int, float)):
            values[name] = float(recorded[name])
    if math.isnan(values["final_sparsity"]) and isinstance(raw, dict) and isinstance(raw.get("sparsity"), (int, float)):
        values["final_sparsity"] = float(raw["sparsity"])
    return values


def _prepared(path: Path, grid: Mapping[str, Any]) -> xr.Dataset | None:
    """An analysis dataset ready to merge: its numeric variables as float64 named
    `<analysis>_<variable>`, index coordinates only (0..n-1 for dims without), dims that a
    grid key also names renamed `<analysis>_<dim>`. None when it has no numeric variable."""
    from .store import read_dataset

    analysis = path.stem
    ds = read_dataset(path)
    numeric = [name for name, var in ds.data_vars.items() if var.dtype.kind in "biuf"]
    if not numeric:
        return None
    ds = ds[numeric]
    ds = ds.drop_vars([name for name in ds.coords if name not in ds.dims])
    ds = ds.assign_coords({dim: np.arange(size) for dim, size in ds.sizes.items() if dim not in ds.coords})
    ds = ds.rename({dim: f"{analysis}_{dim}" for dim in ds.dims if dim in grid})
    out = xr.Dataset(coords=ds.coords)
    for name, var in ds.data_vars.items():
        attrs = {k: v for k, v in var.attrs.items() if k in ("long_name", "units", "description")}
        attrs["long_name"] = f"{analysis}: {attrs.get('long_name', name)}"
        attrs.setdefault("units", "1")
        attrs["description"] = (f"{attrs.get('description', name)} (variable {name!r} of each run's {path.name}"
                                + (", stored as a number" if var.dtype.kind == "b" else "") + ")")
        out[f"{analysis}_{name}"] = xr.DataArray(var.values.astype(np.float64), dims=var.dims, attrs=attrs)
    return out


# ---------------------------------------------------------------- the dataset

def aggregate_dataset(sweep: Sweep, records: Sequence[RunRecord]) -> xr.Dataset:
    """Every run's record on the grid, the analyses' dims added, intervals over seeds."""
    dims = tuple(sweep.grid)
    shape = tuple(len(v) for v in sweep.grid.values())
    taken = sorted(set(dims) & ({"done", "run", "status"} | set(DESCRIPTIONS)))
    if taken:
        raise UserError(f"grid key {taken[0]!r} of {sweep.record} is also the name of a variable of the "
                        "aggregate; rename it in the sweep spec")
    coords = {key: (key, _coordinate(values)) for key, values in sweep.grid.items()}
    by_name = {r.name: r for r in records}
    placed = [(_index(sweep, name, point), by_name[name]) for name, point in sweep.runs]

    done = np.zeros(shape, dtype=bool)
    names = np.full(shape, "", dtype=object)
    status = np.full(shape, "not in sweep", dtype=object)
    scalars = {name: np.full(shape, np.nan) for name in DESCRIPTIONS}
    for index, record in placed:
        done[index], names[index], status[index] = record.done, record.name, record.status
        for name, value in record.values.items():
            scalars[name][index] = value
    variables = {
        "done": described(done, dims, "run done", "1", "whether the run at this grid point finished (its DONE "
                          "marker exists); every other variable is NaN where it did not"),
        "run": described(names.astype(str), dims, "run name", "1", "the run directory SWEEP/runs/<run> of this grid "
                         "point; empty where the sweep lists no run for it"),
        "status": described(status.astype(str), dims, "run status", "1", "the status meta.json records (done, "
                            "running, interrupted, failed, diverged), or missing where the run directory does not exist"),
    }
    for name, (long_name, units, description) in DESCRIPTIONS.items():
        variables[name] = described(scalars[name], dims, long_name, units, description)
    ds = xr.Dataset(variables, coords=coords)
    for key in dims:
        ds[key].attrs.update(long_name=key, description=f"grid key {key!r} of the sweep spec")
    for block in _analysis_blocks(placed, dims, shape):
        clash = sorted(set(block.data_vars) & set(ds.variables))
        if clash:
            raise UserError(f"analysis variable {clash[0]!r} clashes with a variable or grid key of the aggregate; "
                            "rename the grid key in the sweep spec")
        ds = xr.merge([ds, block], join="exact", combine_attrs="drop_conflicts")
    if sweep.seed_dim is not None:
        ds = with_intervals(ds, sweep.seed_dim)
    return ds


def _analysis_blocks(placed: list[tuple[tuple[int, ...], RunRecord]], dims: tuple[str, ...],
                     shape: tuple[int, ...]) -> list[xr.Dataset]:
    """One dataset per analysis: its variables over (grid dims + its own dims), the union of
    every run's coordinates along its own dims, NaN where a run lacks a value."""
    names = sorted({name for _, record in placed for name in record.analyses})
    blocks = {}
    for analysis in names:
        held = [(index, record.analyses[analysis]) for index, record in placed if analysis in record.analyses]
        aligned = xr.align(*[ds for _, ds in held], join="outer", fill_value=np.nan)
        template = aligned[0]
        variables: dict[str, xr.DataArray] = {}
        for ds in aligned:
            for name, var in ds.data_vars.items():
                variables.setdefault(name, var)
        block = xr.Dataset(coords={dim: template[dim] for dim in template.dims})
        for name, first in variables.items():
            values = np.full(shape + first.shape, np.nan)
            for (index, _), ds in zip(held, aligned):
                if name in ds and ds[name].dims == first.dims:
                    values[index] = ds[name].values
            block[name] = described(values, dims + first.dims, first.attrs["long_name"], first.attrs["units"],
                                    first.attrs["description"])
        blocks[analysis] = block
    return list(_separated(blocks).values())


def _separated(blocks: dict[str, xr.Dataset]) -> dict[str, xr.Dataset]:
    """A dim two analyses share with different coordinates becomes `<analysis>_<dim>` in each,
    so that neither is padded with the other's labels."""
    users: dict[str, list[str]] = {}
    for analysis, block in blocks.items():
        for dim in block.coords:
            users.setdefault(str(dim), []).append(analysis)
    for dim, analyses in users.items():
        first = blocks[analyses[0]][dim]
        if len(analyses) > 1 and not all(blocks[a][dim].equals(first) for a in analyses[1:]):
            for analysis in analyses:
                blocks[analysis] = blocks[analysis].rename({dim: f"{analysis}_{dim}"})
    return blocks


def with_intervals(ds: xr.Dataset, seed: str) -> xr.Dataset:
    """`ds` with <var>_mean, _std, _ci95_low, _ci95_high and _n over `seed` for every
    floating-point variable that has that dim (see the module docstring)."""
    from scipy import stats

    out = ds.copy()
    for name in [n for n, v in ds.data_vars.items() if v.dtype.kind == "f" and seed in v.dims]:
        var = ds[name]
        values = np.moveaxis(var.values, var.dims.index(seed), -1)
        kept = [d for d in var.dims if d != seed]
        n = np.isfinite(values).sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            total = np.where(np.isfinite(values), values, 0.0).sum(axis=-1)
            mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
            squares = np.where(np.isfinite(values), (values - mean[..., None]) ** 2, 0.0).sum(axis=-1)
            std = np.where(n > 1, np.sqrt(squares / np.maximum(n - 1, 1)), np.nan)
            t = np.where(n > 1, stats.t.ppf(0.5 + CONFIDENCE / 2, np.maximum(n - 1, 1)), np.nan)
            half = t * std / np.sqrt(n)
        long_name, units = var.attrs.get("long_name", name), var.attrs.get("units", "1")
        what = f"over the {seed} dim (n = {name}_n seeds with a value)"
        out[f"{name}_mean"] = described(mean, tuple(kept), f"{long_name}, mean over seeds", units,
                                        f"mean of {name} {what}; NaN where n = 0")
        out[f"{name}_std"] = described(std, tuple(kept), f"{long_name}, standard deviation over seeds", units,
                                       f"sample standard deviation (ddof=1) of {name} {what}; NaN where n < 2")
        out[f"{name}_ci95_low"] = described(mean - half, tuple(kept), f"{long_name}, 95 % interval low", units,
                                            f"mean - t(0.975, n-1) * std / sqrt(n): lower end of the {INTERVAL} of "
                                            f"{name}; NaN where n < 2")
        out[f"{name}_ci95_high"] = described(mean + half, tuple(kept), f"{long_name}, 95 % interval high", units,
                                             f"mean + t(0.975, n-1) * std / sqrt(n): upper end of the {INTERVAL} of "
                                             f"{name}; NaN where n < 2")
        out[f"{name}_n"] = described(n.astype(np.int64), tuple(kept), f"{long_name}, seeds with a value", "1",
                                     f"number of seeds at which {name} is not NaN (runs not done count out)")
    return out


# ---------------------------------------------------------------- the command's library entry

def aggregate(sweep_path: str | Path, *, out: str | Path | None = None, overwrite: bool = False,
              log: Callable[[str], None] = lambda message: None) -> AnalysisResult:
    """Aggregate the sweep at `sweep_path` into `out` (default SWEEP/aggregate.nc); reused
    when nothing it was built from has changed. Says on `log` how many runs are missing."""
    sweep = read_sweep(sweep_path)
    if not sweep.runs:
        raise UserError(f"{sweep.record} lists no runs; the sweep's spec has an empty grid")
    path = Path(out) if out is not None else sweep.path / DEFAULT_OUT
    if path.exists() and path.is_dir():
        raise UserError(f"--out {path} is a directory; give a file name such as {path / DEFAULT_OUT}")
    names = [name for name, _ in sweep.runs]
    for name, point in sweep.runs:
        _index(sweep, name, point)
    done = [name for name in names if sweep.run_dir(name).is_done()]
    if not done:
        raise IncompleteRunError(f"none of the {len(names)} runs of {sweep.path} is done yet; run or resume the sweep "
                                 f"(`landscape sweep SPEC.toml --out {sweep.path}`) first")
    settings = {"sweep": str(sweep.path.resolve()), "fingerprint": fingerprint(sweep)}
    inputs = [sweep.record] + [sweep.run_dir(name).metrics for name in done]
    attrs = provenance(inputs, settings, path.parent, ANALYSIS)
    attrs.update(_attrs(sweep), **_run_attrs(sweep, done))

    def compute() -> xr.Dataset:
        skipped: list[str] = []

        def warn(path: Path, reason: str) -> None:
            skipped.append(str(path))
            log(f"warning: {reason}; left out of the aggregate (NaN for that run)")

        records = [read_run(sweep, name, warn) for name in names]
        ds = aggregate_dataset(sweep, records)
        # update_whole gives the dataset `attrs` (a copy, taken after this returns): what only
        # the computation finds out goes in there. A run may finish while this reads: what
        # was read is what the dataset says.
        missing = [record.name for record in records if not record.done]
        attrs.update(runs_done=len(records) - len(missing), missing_runs=json.dumps(missing),
                     skipped_files=json.dumps(skipped))
        return ds

    result = update_whole(path, ANALYSIS, names, compute, attrs, overwrite=overwrite, log=log)
    missing = json.loads(result.dataset.attrs.get("missing_runs", "[]"))
    if missing:
        log(f"note: {len(missing)} of {len(names)} runs are not done; they are NaN in {result.path}: "
            + ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    return result


def _attrs(sweep: Sweep) -> dict[str, Any]:
    seed = sweep.seed_dim
    return {
        "kind": KIND,
        "sweep": str(sweep.path),
        "spec": json.dumps(sweep.spec, sort_keys=True, default=str),
        "spec_text": sweep.spec_text,
        "grid": json.dumps(sweep.grid, default=str),
        "seed_dim": seed or "",
        "interval": INTERVAL if seed else "none: the grid has no seed key, so there are no seeds to take an interval "
                                          "over (one run per grid point)",
        "runs_total": len(sweep.runs),
        "final_metrics": "the last cycle's final evaluation in each run's metrics.csv (the metrics its final "
                         "checkpoint records)",
    }


def _run_attrs(sweep: Sweep, done: list[str]) -> dict[str, Any]:
    """model and data, where every done run agrees (what figure titles say)."""
    found: dict[str, set[str]] = {"model": set(), "data": set()}
    for name in done:
        try:
            config = read_json(sweep.run_dir(name).config, "config.json")
        except UserError:
            continue
        for key in found:
            section = config.get(key)
            if isinstance(section, dict) and isinstance(section.get("name"), str):
                found[key].add(section["name"])
    return {key: values.pop() for key, values in found.items() if len(values) == 1}


def fingerprint(sweep: Sweep) -> str:
    """sha256 over everything the dataset is built from: sweep.json, and per run its DONE
    marker, meta.json, metrics.csv and analysis datasets. Equal fingerprints: nothing to redo."""
    digest = hashlib.sha256()

    def add(label: str, path: Path) -> None:
        digest.update(label.encode() + b"\0")
        if path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            digest.update(b"absent")

    add(sweep.record.name, sweep.record)
    for name, _ in sweep.runs:
        run = sweep.run_dir(name)
        for part in (run.done, run.meta, run.metrics):
            add(f"{name}/{part.name}", part)
        for path in run.analysis_files():
            add(f"{name}/{path.parent.name}/{path.name}", path)
    return digest.hexdigest()

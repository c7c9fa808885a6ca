"""Training dynamics: the metrics.csv of one or more runs as one dataset.

metrics.csv is long form (cycle, epoch, step, split, metric, value): per cycle an epoch-0
evaluation (right after the cycle's mask change, before training), then one block per epoch.
Every row lands in exactly one place, so the file can be rebuilt from the dataset:

- (train, lr)       -> coord lr(run, cycle, epoch): lr of the epoch's last step
- (train, sparsity) -> var epoch_sparsity(run, cycle, epoch); coord sparsity(run, cycle) is its
                       value at the cycle's last recorded epoch (the trained sparsity)
- (train, flops)    -> var flops(run, cycle, epoch): training FLOPs spent so far (cumulative),
                       present when some run records them
- any other (split, metric) -> var value(run, cycle, epoch, split, metric)
- step              -> coord step(run, cycle, epoch), one per (cycle, epoch); -1 where absent

Runs with fewer cycles or epochs than others get NaN (and step -1) there."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from sparse_training.errors import UserError
from sparse_training.records import METRICS_HEADER, read_config, read_meta, read_metrics
from sparse_training.rundir import RunDir, analysis_output

from .inputs import run_dir, run_names
from .results import AnalysisResult, update_whole
from .store import described, provenance

ANALYSIS = "metrics"
SPECIAL = {("train", "lr"): "lr", ("train", "sparsity"): "epoch_sparsity", ("train", "flops"): "flops"}
FIRST_SPLITS = ("train", "test")
FIRST_METRICS = ("loss", "accuracy")
CUBE = ("run", "cycle", "epoch")
CORRUPT = "it is corrupt and can be rebuilt only by re-running training"


def metrics(runs: Sequence[str | Path], *, out: str | Path | None = None, overwrite: bool = False,
            allow_incomplete: bool = False, log: Callable[[str], None] = lambda message: None) -> AnalysisResult:
    """The runs' metrics.csv as one dataset in `out`, by default RUN/analysis/metrics.nc for
    one run (several need `out`). Rebuilt whenever a metrics.csv changed."""
    dirs = [run_dir(arg, allow_incomplete, "`landscape metrics` takes run directories") for arg in runs]
    if out is None and len(dirs) > 1:
        raise UserError("several runs go to one dataset outside any run; say where with --out FILE.nc")
    path = Path(out) if out is not None else analysis_output(ANALYSIS, dirs[0], [])
    names = run_names(dirs, runs)
    settings = {"runs": names, "metrics_sha256": [metrics_fingerprint(d) for d in dirs]}
    base = dirs[0].path if len(dirs) == 1 and out is None else path.parent
    attrs = provenance([d.metrics for d in dirs], settings, base, ANALYSIS)
    return update_whole(path, ANALYSIS, names, lambda: metrics_dataset(dirs, names), attrs, overwrite=overwrite,
                        log=log)


def metrics_fingerprint(run: RunDir) -> str:
    """sha256 of a run's metrics.csv: a dataset built from the same bytes need not be rebuilt."""
    return hashlib.sha256(run.metrics.read_bytes()).hexdigest() if run.metrics.exists() else ""


def _ordered(found: set[str], first: Sequence[str]) -> list[str]:
    return [name for name in first if name in found] + sorted(found - set(first))


def _table(runs: Sequence[RunDir]) -> pd.DataFrame:
    """Every run's rows (read and typed by `records`), checked, with the run's index in `run`
    and the name of the special variable a row belongs to (None for a plain metric) in `special`."""
    frames = []
    for index, run in enumerate(runs):
        rows = pd.DataFrame(read_metrics(run), columns=list(METRICS_HEADER))
        if rows.empty:
            raise UserError(f"{run.metrics} holds no rows yet; train the run first")
        _check(run, rows)
        frames.append(rows.assign(run=index))
    table = pd.concat(frames, ignore_index=True)
    return table.assign(special=[SPECIAL.get(key) for key in zip(table["split"], table["metric"])])


def _check(run: RunDir, rows: pd.DataFrame) -> None:
    """One row per (cycle, epoch, split, metric) and one step per (cycle, epoch); the first bad
    row in file order is the one named, a duplicate before a step that disagrees."""
    twice = rows.duplicated(["cycle", "epoch", "split", "metric"])
    first_step = rows.groupby(["cycle", "epoch"])["step"].transform("first")
    other_step = rows["step"] != first_step
    if twice.any() and not (other_step.any() and other_step.idxmax() < twice.idxmax()):
        row = rows.loc[twice.idxmax()]
        raise UserError(f"{run.metrics} has two rows for cycle {row.cycle} epoch {row.epoch} {row.split} {row.metric}; "
                        f"{CORRUPT}")
    if other_step.any():
        row = rows.loc[other_step.idxmax()]
        raise UserError(f"{run.metrics} records steps {first_step[row.name]} and {row.step} for cycle {row.cycle} "
                        f"epoch {row.epoch}; {CORRUPT}")


def _cube(rows: pd.DataFrame, levels: dict[str, Sequence], column: str = "value", fill: float = np.nan) -> np.ndarray:
    """`column` of `rows` on the full grid of `levels` (one row per point, checked), `fill` where none."""
    grid = pd.MultiIndex.from_product(list(levels.values()), names=list(levels))
    values = rows.groupby(list(levels))[column].first().reindex(grid, fill_value=fill)
    return values.to_numpy().reshape([len(v) for v in levels.values()])


def metrics_dataset(runs: Sequence[RunDir], names: Sequence[str]) -> xr.Dataset:
    """One dataset from the runs' metrics.csv (see the module docstring); `names` label the runs."""
    table = _table(runs)
    plain = table[table["special"].isna()]
    cycles, epochs = sorted(set(table["cycle"])), sorted(set(table["epoch"]))
    splits, metric_names = _ordered(set(plain["split"]), FIRST_SPLITS), _ordered(set(plain["metric"]), FIRST_METRICS)
    levels = {"run": range(len(runs)), "cycle": cycles, "epoch": epochs}
    value = _cube(plain, {**levels, "split": splits, "metric": metric_names})
    special = {name: _cube(table[table["special"] == name], levels) for name in SPECIAL.values()}
    step = _cube(table, levels, "step", -1).astype(np.int64)
    sparsity = _cube(table[table["special"] == "epoch_sparsity"].dropna(subset=["value"]).sort_values("epoch")
                     .groupby(["run", "cycle"]).tail(1), {"run": levels["run"], "cycle": cycles})
    coords = {
        "run": list(names), "cycle": np.array(cycles, dtype=np.int64), "epoch": np.array(epochs, dtype=np.int64),
        "split": splits, "metric": metric_names,
        "method": ("run", [read_config(run).run.method for run in runs]),
        "sparsity": (("run", "cycle"), sparsity), "lr": (CUBE, special["lr"]), "step": (CUBE, step),
    }
    ds = xr.Dataset(_variables(runs, value, special), coords=coords)
    ds["lr"].attrs.update(long_name="learning rate", units="1",
                          description="lr of the epoch's last step, as training recorded it (epoch 0: before any step)")
    ds["sparsity"].attrs.update(long_name="sparsity", units="1", description="sparsity at the cycle's last recorded epoch")
    ds["step"].attrs.update(long_name="global step", units="1",
                            description="optimizer steps taken when the row was recorded; -1 where absent")
    return ds


def _variables(runs: Sequence[RunDir], value: np.ndarray, special: dict[str, np.ndarray]) -> dict[str, xr.DataArray]:
    variables = {
        "value": described(value, CUBE + ("split", "metric"), "recorded metric", "1",
                           "metric of the split recorded at the end of the epoch (epoch 0: right after the cycle's mask "
                           "change, before training); accuracy is a fraction in [0, 1], loss the mean cross-entropy; "
                           "NaN where the run has no such row"),
        "epoch_sparsity": described(special["epoch_sparsity"], CUBE, "sparsity at the epoch", "1",
                                    "fraction of prunable weights that are zero at the end of the epoch; NaN where not recorded"),
    }
    if not np.isnan(special["flops"]).all():
        variables["flops"] = described(special["flops"], CUBE, "training FLOPs so far", "FLOP",
                                       "training FLOPs spent from the start of the run to the end of the epoch (cumulative); "
                                       "NaN where not recorded")
    meta_flops = [read_meta(run).get("training_flops") for run in runs]
    if any(isinstance(f, (int, float)) for f in meta_flops):
        variables["training_flops"] = described(
            np.array([float(f) if isinstance(f, (int, float)) else np.nan for f in meta_flops]), ("run",),
            "training FLOPs", "FLOP", "total training FLOPs of the run as recorded in meta.json; NaN where not recorded")
    return variables

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
from typing import Any, Sequence

import numpy as np
import xarray as xr

from sparse_training.records import read_config, read_meta, read_metrics
from sparse_training.rundir import RunDir
from sparse_training.errors import UserError

from .store import described

SPECIAL = {("train", "lr"): "lr", ("train", "sparsity"): "epoch_sparsity", ("train", "flops"): "flops"}
FIRST_SPLITS = ("train", "test")
FIRST_METRICS = ("loss", "accuracy")


def metrics_fingerprint(run: RunDir) -> str:
    """sha256 of a run's metrics.csv: a dataset built from the same bytes need not be rebuilt."""
    return hashlib.sha256(run.metrics.read_bytes()).hexdigest() if run.metrics.exists() else ""


def _ordered(found: set[str], first: Sequence[str]) -> list[str]:
    return [name for name in first if name in found] + sorted(found - set(first))


def _read_all(runs: Sequence[RunDir]) -> list[list[dict[str, Any]]]:
    tables = [read_metrics(run) for run in runs]
    for run, rows in zip(runs, tables):
        if not rows:
            raise UserError(f"{run.metrics} holds no rows yet; train the run first")
    return tables


class _Grid:
    """Arrays over (run, cycle, epoch[, split, metric]) filled row by row."""

    def __init__(self, tables: list[list[dict[str, Any]]]):
        rows = [row for table in tables for row in table]
        plain = {(r["split"], r["metric"]) for r in rows} - set(SPECIAL)
        self.cycles = sorted({r["cycle"] for r in rows})
        self.epochs = sorted({r["epoch"] for r in rows})
        self.splits = _ordered({s for s, _ in plain}, FIRST_SPLITS)
        self.metrics = _ordered({m for _, m in plain}, FIRST_METRICS)
        shape = (len(tables), len(self.cycles), len(self.epochs))
        self.value = np.full(shape + (len(self.splits), len(self.metrics)), np.nan)
        self.special = {name: np.full(shape, np.nan) for name in SPECIAL.values()}
        self.step = np.full(shape, -1, dtype=np.int64)

    def fill(self, index: int, run: RunDir, rows: list[dict[str, Any]]) -> None:
        cycle_at, epoch_at = {c: i for i, c in enumerate(self.cycles)}, {e: i for i, e in enumerate(self.epochs)}
        seen = set()
        for r in rows:
            key = (r["cycle"], r["epoch"], r["split"], r["metric"])
            if key in seen:
                raise UserError(f"{run.metrics} has two rows for cycle {key[0]} epoch {key[1]} {key[2]} {key[3]}; "
                                "it is corrupt and can be rebuilt only by re-running training")
            seen.add(key)
            at = (index, cycle_at[r["cycle"]], epoch_at[r["epoch"]])
            if self.step[at] not in (-1, r["step"]):
                raise UserError(f"{run.metrics} records steps {self.step[at]} and {r['step']} for cycle {key[0]} "
                                f"epoch {key[1]}; it is corrupt and can be rebuilt only by re-running training")
            self.step[at] = r["step"]
            special = SPECIAL.get((r["split"], r["metric"]))
            if special:
                self.special[special][at] = r["value"]
            else:
                self.value[at + (self.splits.index(r["split"]), self.metrics.index(r["metric"]))] = r["value"]

    def cycle_sparsity(self) -> np.ndarray:
        """epoch_sparsity at each cycle's last recorded epoch (NaN when the cycle has none)."""
        per_epoch = self.special["epoch_sparsity"]
        out = np.full(per_epoch.shape[:2], np.nan)
        for index in np.ndindex(out.shape):
            recorded = per_epoch[index][~np.isnan(per_epoch[index])]
            if recorded.size:
                out[index] = recorded[-1]
        return out


def metrics_dataset(runs: Sequence[RunDir], names: Sequence[str]) -> xr.Dataset:
    """One dataset from the runs' metrics.csv (see the module docstring); `names` label the runs."""
    tables = _read_all(runs)
    grid = _Grid(tables)
    for index, (run, rows) in enumerate(zip(runs, tables)):
        grid.fill(index, run, rows)
    cube = ("run", "cycle", "epoch")
    variables = {
        "value": described(grid.value, cube + ("split", "metric"), "recorded metric", "1",
                           "metric of the split recorded at the end of the epoch (epoch 0: right after the cycle's mask "
                           "change, before training); accuracy is a fraction in [0, 1], loss the mean cross-entropy; "
                           "NaN where the run has no such row"),
        "epoch_sparsity": described(grid.special["epoch_sparsity"], cube, "sparsity at the epoch", "1",
                                    "fraction of prunable weights that are zero at the end of the epoch; NaN where not recorded"),
    }
    if not np.isnan(grid.special["flops"]).all():
        variables["flops"] = described(grid.special["flops"], cube, "training FLOPs so far", "FLOP",
                                       "training FLOPs spent from the start of the run to the end of the epoch (cumulative); "
                                       "NaN where not recorded")
    meta_flops = [read_meta(run).get("training_flops") for run in runs]
    if any(isinstance(f, (int, float)) for f in meta_flops):
        variables["training_flops"] = described(
            np.array([float(f) if isinstance(f, (int, float)) else np.nan for f in meta_flops]), ("run",),
            "training FLOPs", "FLOP", "total training FLOPs of the run as recorded in meta.json; NaN where not recorded")
    coords = {
        "run": list(names), "cycle": np.array(grid.cycles, dtype=np.int64), "epoch": np.array(grid.epochs, dtype=np.int64),
        "split": grid.splits, "metric": grid.metrics,
        "method": ("run", [read_config(run).run.method for run in runs]),
        "sparsity": (("run", "cycle"), grid.cycle_sparsity()),
        "lr": (cube, grid.special["lr"]), "step": (cube, grid.step),
    }
    ds = xr.Dataset(variables, coords=coords)
    ds["lr"].attrs.update(long_name="learning rate", units="1",
                          description="lr of the epoch's last step, as training recorded it (epoch 0: before any step)")
    ds["sparsity"].attrs.update(long_name="sparsity", units="1", description="sparsity at the cycle's last recorded epoch")
    ds["step"].attrs.update(long_name="global step", units="1",
                            description="optimizer steps taken when the row was recorded; -1 where absent")
    return ds

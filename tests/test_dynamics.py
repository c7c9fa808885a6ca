"""metrics.csv -> dataset: exact round trip, runs of different lengths, corrupt files."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from landscape.dynamics import metrics_dataset
from landscape.store import read_dataset, write_dataset
from sparse_training.io import write_json_atomic
from sparse_training.records import append_metrics
from sparse_training.rundir import RunDir
from sparse_training.config import Config
from sparse_training.errors import UserError

# The order training writes a block in (sparse_training/run/evaluation.py), plus FLOPs.
BLOCK = [("train", "loss"), ("train", "accuracy"), ("test", "loss"), ("test", "accuracy"),
         ("train", "lr"), ("train", "sparsity"), ("train", "flops")]


def write_metrics_run(path, method: str, cycles: int, epochs: int, seed: int, meta: dict | None = None) -> RunDir:
    """config.json, metrics.csv (values with all 17 significant digits) and optionally meta.json."""
    rng, run = random.Random(seed), RunDir(path)
    run.path.mkdir(parents=True)
    write_json_atomic(run.config, Config().replace("run", method=method, cycles=cycles, epochs=epochs).to_dict())
    if meta is not None:
        write_json_atomic(run.meta, meta)
    step, flops = 0, 0.0
    for cycle in range(cycles):
        sparsity = 1 - 0.8 ** (cycle + 1)
        for epoch in range(epochs + 1):
            step += 7 if epoch else 0
            flops += 1.234567e9 * (1 - sparsity) if epoch else 0.0
            values = {("train", "lr"): 0.0 if epoch == 0 else rng.random() * 0.1, ("train", "sparsity"): sparsity,
                      ("train", "flops"): flops}
            append_metrics(run, [(cycle, epoch, step, split, metric, repr(values.get((split, metric), rng.random())))
                                 for split, metric in BLOCK])
    run.done.write_text("done\n")
    return run


def csv_rows_of(ds, run_name: str) -> list[tuple]:
    """Rebuild a run's metrics.csv rows from the dataset, in training's block order."""
    one = ds.sel(run=run_name)
    special = {("train", "lr"): one.lr, ("train", "sparsity"): one.epoch_sparsity}
    if "flops" in one:
        special["train", "flops"] = one.flops
    rows = []
    for cycle in ds.cycle.values:
        for epoch in ds.epoch.values:
            step = int(one.step.sel(cycle=cycle, epoch=epoch))
            for split, metric in BLOCK if step >= 0 else []:
                if (split, metric) in special:
                    value = special[split, metric].sel(cycle=cycle, epoch=epoch).item()
                elif metric in ds.metric.values:
                    value = one.value.sel(cycle=cycle, epoch=epoch, split=split, metric=metric).item()
                else:
                    continue
                if not math.isnan(value):
                    rows.append((int(cycle), int(epoch), step, split, metric, repr(value)))
    return rows


def test_metrics_csv_round_trips_exactly_through_the_stored_dataset(tmp_path):
    run = write_metrics_run(tmp_path / "imp", "imp", cycles=3, epochs=4, seed=0)
    ds = read_dataset(write_dataset(metrics_dataset([run], ["imp"]), tmp_path / "metrics.nc"))
    rebuilt = RunDir(tmp_path / "rebuilt")
    rebuilt.path.mkdir()
    append_metrics(rebuilt, csv_rows_of(ds, "imp"))
    assert rebuilt.metrics.read_bytes() == run.metrics.read_bytes()


def test_runs_of_different_lengths_share_one_dataset(tmp_path):
    long = write_metrics_run(tmp_path / "a", "imp", cycles=3, epochs=4, seed=1, meta={"training_flops": 5.5e12})
    short = write_metrics_run(tmp_path / "b", "lrr", cycles=2, epochs=2, seed=2)
    ds = metrics_dataset([long, short], ["a", "b"])
    assert ds.value.dims == ("run", "cycle", "epoch", "split", "metric")
    assert ds.cycle.values.tolist() == [0, 1, 2] and ds.epoch.values.tolist() == [0, 1, 2, 3, 4]
    assert ds.split.values.tolist() == ["train", "test"] and ds.metric.values.tolist() == ["loss", "accuracy"]
    assert ds.method.values.tolist() == ["imp", "lrr"]
    assert np.isnan(ds.value.sel(run="b", cycle=2)).all() and np.isnan(ds.value.sel(run="b", epoch=3)).all()
    assert (ds.step.sel(run="b", cycle=2) == -1).all()
    assert ds.value.attrs["allow_nan"] == 1
    assert ds.sparsity.sel(run="a").values == pytest.approx([0.2, 0.36, 0.488])
    assert ds.training_flops.sel(run="a").item() == 5.5e12 and np.isnan(ds.training_flops.sel(run="b").item())
    for name in ("a", "b"):
        assert csv_rows_of(ds, name) == [tuple(row) for row in _raw_rows(tmp_path / name)]


def _raw_rows(path) -> list[tuple]:
    lines = (path / "metrics.csv").read_text().splitlines()[1:]
    return [(int(c), int(e), int(s), split, metric, value) for c, e, s, split, metric, value in (l.split(",") for l in lines)]


def test_a_run_without_rows_or_with_duplicate_rows_is_a_user_error(tmp_path):
    empty = RunDir(tmp_path / "empty")
    empty.path.mkdir()
    write_json_atomic(empty.config, Config().to_dict())
    with pytest.raises(UserError, match="no rows"):
        metrics_dataset([empty], ["empty"])
    run = write_metrics_run(tmp_path / "dup", "dense", cycles=1, epochs=1, seed=3)
    append_metrics(run, [(0, 1, 7, "train", "loss", "0.5")])
    with pytest.raises(UserError, match="two rows"):
        metrics_dataset([run], ["dup"])
    other = write_metrics_run(tmp_path / "steps", "dense", cycles=1, epochs=1, seed=3)
    append_metrics(other, [(0, 1, 99, "train", "grad_norm", "0.5")])
    with pytest.raises(UserError, match="records steps 7 and 99"):
        metrics_dataset([other], ["steps"])


def test_unknown_metrics_are_kept_as_extra_metric_labels(tmp_path):
    run = write_metrics_run(tmp_path / "x", "dense", cycles=1, epochs=1, seed=4)
    append_metrics(run, [(0, 1, 7, "test", "ece", "0.125")])
    ds = metrics_dataset([run], ["x"])
    assert ds.metric.values.tolist() == ["loss", "accuracy", "ece"]
    assert ds.value.sel(cycle=0, epoch=1, split="test", metric="ece").item() == 0.125

"""`landscape aggregate SWEEP`: a sweep's runs as one dataset on the grid, intervals over seeds."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from scipy import stats

from conftest import run_cli
from landscape import plots
from landscape.store import read_dataset, write_dataset

GRID = {"method": ["pai-cyclic", "lrr"], "sparsity": [0.5, 0.8], "seed": [0, 1, 2]}


def _name(point: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in point.items())


def write_sweep(root: Path, grid: dict, runs: list[dict]) -> Path:
    spec_text = "[grid]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in grid.items())
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps({"spec": {"grid": grid}, "spec_text": spec_text, "grid": grid,
                                                 "runs": runs}))
    return root


def fake_run(path: Path, accuracy: float, flops: float, sparsity: float, done: bool = True) -> None:
    """A run directory as `landscape train` leaves it, as far as aggregate reads it: config,
    meta (status, training_flops), metrics.csv (two cycles; the last one's final epoch counts), DONE."""
    from sparse_training.config import Config

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(Config().to_dict()))
    (path / "meta.json").write_text(json.dumps({"status": "done" if done else "interrupted", "training_flops": flops}))
    rows = ["cycle,epoch,step,split,metric,value"]
    for cycle, epoch, scale in ((0, 0, 0.1), (0, 1, 0.5), (1, 0, 0.5), (1, 1, 0.9), (1, 2, 1.0)):
        step = 10 * cycle + epoch
        rows += [f"{cycle},{epoch},{step},train,loss,{2.0 - scale}", f"{cycle},{epoch},{step},train,accuracy,{scale * 0.9}",
                 f"{cycle},{epoch},{step},test,loss,{2.5 - scale}", f"{cycle},{epoch},{step},test,accuracy,{scale * accuracy}",
                 f"{cycle},{epoch},{step},train,sparsity,{sparsity}"]
    (path / "metrics.csv").write_text("\n".join(rows) + "\n")
    if done:
        (path / "DONE").write_text("done\n")


def fake_sweep(root: Path, grid: dict = GRID, accuracy=None) -> Path:
    """Every grid point a done run; test accuracy 0.5/0.6/0.7 over seeds at the first point."""
    runs = []
    for index, values in enumerate(itertools.product(*grid.values())):
        point = dict(zip(grid, values))
        name = _name(point)
        runs.append({"name": name, "point": point})
        value = accuracy(point) if accuracy else 0.5 + 0.1 * point.get("seed", 0) + 0.01 * index
        fake_run(root / "runs" / name, value, flops=1e6 * (1 - point.get("sparsity", 0)) + point.get("seed", 0),
                 sparsity=point.get("sparsity", 0.0))
    return write_sweep(root, grid, runs)


def first_point_accuracy(point: dict) -> float:
    if point["method"] == "pai-cyclic" and point["sparsity"] == 0.5:
        return [0.5, 0.6, 0.7][point["seed"]]
    return 0.3 + 0.05 * point["seed"] + (0.1 if point["method"] == "lrr" else 0)


def aggregate(*args: str, expect: int = 0):
    result = run_cli("aggregate", *args, expect=expect)
    return result


# ---------------------------------------------------------------- real runs

@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory) -> Path:
    """Two tiny real runs (two seeds at one sparsity), trained through the CLI."""
    root = tmp_path_factory.mktemp("sweep")
    grid = {"sparsity": [0.5], "seed": [0, 1]}
    runs = []
    for seed in grid["seed"]:
        name = f"s0.5_seed{seed}"
        run_cli("train", "--data", "synthetic", "--model", "mlp", "--epochs", "1", "--cycles", "1", "--method",
                "pai-cyclic", "--pruner", "random", "--sparsity", "0.5", "--seed", str(seed), "--batch-size", "128",
                "--device", "cpu", "--out", str(root / "runs" / name))
        runs.append({"name": name, "point": {"sparsity": 0.5, "seed": seed}})
    return write_sweep(root, grid, runs)


def test_real_runs_values_equal_their_own_final_checkpoint(real_sweep):
    from sparse_training.checkpoint import load_checkpoint
    from sparse_training.records import read_meta
    from sparse_training.rundir import RunDir

    result = aggregate(str(real_sweep), "--json")
    out = json.loads(result.stdout)
    assert out["output"] == str(real_sweep / "aggregate.nc") and out["runs_done"] == 2 and out["missing_runs"] == []
    ds = read_dataset(real_sweep / "aggregate.nc")
    assert list(ds["test_accuracy"].dims) == ["sparsity", "seed"]
    assert ds.sparsity.values.tolist() == [0.5] and ds.seed.values.tolist() == [0, 1]
    for seed in (0, 1):
        run = RunDir(real_sweep / "runs" / f"s0.5_seed{seed}")
        final = load_checkpoint(run.checkpoint(run.cycle_labels()[-1]))
        at = ds.sel(sparsity=0.5, seed=seed)
        for name in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert float(at[name]) == pytest.approx(final.metrics[name], rel=1e-12)
        assert float(at["final_sparsity"]) == pytest.approx(final.sparsity, abs=1e-6)
        assert float(at["training_flops"]) == read_meta(run)["training_flops"]
        assert bool(at["done"]) and str(at["status"].item()) == "done" and str(at["run"].item()) == run.path.name
    point = out["points"][0]
    assert point["point"] == {"sparsity": 0.5} and point["n"] == 2
    assert point["test_accuracy_mean"] == pytest.approx(float(ds.test_accuracy.mean()))
    assert ds.attrs["kind"] == "aggregate" and ds.attrs["interval"] == "95% Student-t interval of the mean over seeds"
    assert ds.attrs["model"] == "mlp" and json.loads(ds.attrs["grid"]) == {"sparsity": [0.5], "seed": [0, 1]}
    assert ds.attrs["package_version"] and "[grid]" in ds.attrs["spec_text"]
    # Nothing changed: reused; the figure says n=2 honestly.
    assert json.loads(aggregate(str(real_sweep), "--json").stdout)["reused"]
    note = plots.plot_aggregate(ds)._supxlabel.get_text().replace("\n", " ")
    assert "n=2 seeds" in note and "1 degree of freedom" in note


# ---------------------------------------------------------------- hand-made sweeps

def test_dims_coords_and_values_follow_the_grid(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", accuracy=first_point_accuracy)
    aggregate(str(sweep), "--out", str(tmp_path / "agg.nc"))
    ds = read_dataset(tmp_path / "agg.nc")
    assert ds["test_accuracy"].dims == ("method", "sparsity", "seed")
    for key, values in GRID.items():
        assert ds[key].values.tolist() == values
    for values in itertools.product(*GRID.values()):
        point = dict(zip(GRID, values))
        at = ds.sel(point)
        assert float(at.test_accuracy) == pytest.approx(first_point_accuracy(point))  # last cycle's last epoch
        assert float(at.train_accuracy) == pytest.approx(0.9)
        assert float(at.test_loss) == pytest.approx(1.5) and float(at.train_loss) == pytest.approx(1.0)
        assert float(at.final_sparsity) == point["sparsity"]
        assert float(at.training_flops) == 1e6 * (1 - point["sparsity"]) + point["seed"]
        assert str(at.run.item()) == _name(point)
    assert ds["test_accuracy_mean"].dims == ("method", "sparsity")
    for name, var in ds.data_vars.items():
        assert {"long_name", "units", "description"} <= set(var.attrs), name


def test_mean_std_and_interval_match_a_hand_computation(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", accuracy=first_point_accuracy)
    result = aggregate(str(sweep), "--json")
    ds = read_dataset(sweep / "aggregate.nc").sel({"method": "pai-cyclic", "sparsity": 0.5})
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert half == pytest.approx(0.2484, abs=1e-4)
    assert float(ds.test_accuracy_mean) == pytest.approx(0.6)
    assert float(ds.test_accuracy_std) == pytest.approx(0.1)
    assert float(ds.test_accuracy_ci95_low) == pytest.approx(0.6 - half)
    assert float(ds.test_accuracy_ci95_high) == pytest.approx(0.6 + half)
    assert int(ds.test_accuracy_n) == 3
    row = next(r for r in json.loads(result.stdout)["points"] if r["point"] == {"method": "pai-cyclic", "sparsity": 0.5})
    assert row["test_accuracy_half_width"] == pytest.approx(half) and row["n"] == 3
    summary = aggregate(str(sweep)).stdout  # reused; the table shows mean ± half-width in %
    assert "60.00 ± 24.84 %" in summary and "pai-cyclic" in summary


def test_a_missing_run_is_nan_and_counted_out(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", accuracy=first_point_accuracy)
    (sweep / "runs" / _name({"method": "pai-cyclic", "sparsity": 0.5, "seed": 2}) / "DONE").unlink()
    import shutil

    shutil.rmtree(sweep / "runs" / _name({"method": "lrr", "sparsity": 0.8, "seed": 0}))
    result = aggregate(str(sweep), "--json")
    assert "2 of 12 runs are not done" in result.stderr
    ds = read_dataset(sweep / "aggregate.nc")
    at = ds.sel({"method": "pai-cyclic", "sparsity": 0.5})
    assert at.done.values.tolist() == [True, True, False]
    assert np.isnan(float(at.test_accuracy.sel(seed=2))) and np.isnan(float(at.training_flops.sel(seed=2)))
    assert int(at.test_accuracy_n) == 2 and float(at.test_accuracy_mean) == pytest.approx(0.55)
    half = stats.t.ppf(0.975, 1) * float(np.std([0.5, 0.6], ddof=1)) / math.sqrt(2)
    assert float(at.test_accuracy_ci95_high) == pytest.approx(0.55 + half)
    assert str(at.status.sel(seed=2).item()) == "done"  # meta says done; no DONE marker: not counted
    assert str(ds.status.sel({"method": "lrr", "sparsity": 0.8, "seed": 0}).item()) == "missing"
    assert sorted(json.loads(ds.attrs["missing_runs"])) == sorted(json.loads(result.stdout)["missing_runs"])
    assert len(json.loads(ds.attrs["missing_runs"])) == 2 and ds.attrs["runs_done"] == 10


def test_one_seed_gives_no_interval(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", grid={"sparsity": [0.5, 0.9], "seed": [0]})
    aggregate(str(sweep))
    ds = read_dataset(sweep / "aggregate.nc")
    assert ds.test_accuracy_n.values.tolist() == [1, 1]
    assert np.isnan(ds.test_accuracy_std.values).all() and np.isnan(ds.test_accuracy_ci95_low.values).all()
    assert ds.test_accuracy_mean.values == pytest.approx(ds.test_accuracy.values[:, 0])
    note = plots.plot_aggregate(ds)._supxlabel.get_text().replace("\n", " ")
    assert "no error bars" in note


def test_a_grid_without_seed_has_no_intervals_and_says_why(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", grid={"method": ["pai-cyclic", "lrr"], "sparsity": [0.5, 0.9]})
    result = aggregate(str(sweep))
    ds = read_dataset(sweep / "aggregate.nc")
    assert not [name for name in ds.data_vars if name.endswith("_mean")]
    assert "no seed" in ds.attrs["interval"] and ds.attrs["seed_dim"] == ""
    assert "no intervals" in result.stdout
    note = plots.plot_aggregate(ds)._supxlabel.get_text().replace("\n", " ")
    assert "no seed key" in note


def _connectivity(pairs: list[str], offset: float) -> xr.Dataset:
    alpha = np.linspace(0, 1, 3)
    error = offset + np.outer(np.arange(len(pairs)), np.ones(3)) + alpha
    ds = xr.Dataset(
        {"error": (("pair", "alpha"), error, {"long_name": "error", "units": "1", "description": "1 - accuracy"}),
         "error_barrier_linear": (("pair",), error.max(axis=1), {"long_name": "barrier", "units": "1",
                                                                  "description": "Entezari"}),
         "label_note": (("pair",), np.array(pairs), {"long_name": "t", "units": "1", "description": "text"})},
        coords={"pair": pairs, "alpha": alpha, "cycle_a": ("pair", np.arange(len(pairs))), "method": "x"},
    )
    ds.attrs["analysis"] = "connectivity"
    return ds


def test_analysis_datasets_are_carried_with_their_own_dims(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", accuracy=first_point_accuracy)
    seeds = {}
    for seed in (0, 1, 2):
        point = {"method": "pai-cyclic", "sparsity": 0.5, "seed": seed}
        pairs = ["cycle_000..cycle_001"] if seed == 2 else ["cycle_000..cycle_001", "cycle_001..cycle_002"]
        seeds[seed] = _connectivity(pairs, 0.1 * seed)
        write_dataset(seeds[seed], sweep / "runs" / _name(point) / "analysis" / "connectivity.nc")
    # A second analysis whose `pair` labels differ: each keeps its own, under a prefixed dim.
    signs = xr.Dataset({"flip": (("pair",), [0.25], {"long_name": "flips", "units": "1", "description": "d"})},
                       coords={"pair": ["init..cycle_000"]})
    write_dataset(signs, sweep / "runs" / _name({"method": "lrr", "sparsity": 0.8, "seed": 1}) / "analysis" / "signs.nc")
    aggregate(str(sweep))
    ds = read_dataset(sweep / "aggregate.nc")
    error = ds["connectivity_error"]
    assert error.dims == ("method", "sparsity", "seed", "connectivity_pair", "alpha")
    assert ds.connectivity_pair.values.tolist() == ["cycle_000..cycle_001", "cycle_001..cycle_002"]
    assert ds.alpha.values.tolist() == [0.0, 0.5, 1.0]
    at = error.sel({"method": "pai-cyclic", "sparsity": 0.5})
    for seed in (0, 1):
        np.testing.assert_allclose(at.sel(seed=seed).values, seeds[seed].error.values)
    assert np.isnan(at.sel(seed=2, connectivity_pair="cycle_001..cycle_002").values).all()
    assert np.isnan(error.sel({"method": "lrr"}).values).all()  # runs without the analysis
    assert "connectivity_label_note" not in ds and "cycle_a" not in ds.coords  # text variables, extra coords: dropped
    n = ds["connectivity_error_barrier_linear_n"].sel({"method": "pai-cyclic", "sparsity": 0.5})
    assert n.values.tolist() == [3, 2]
    at = {"method": "pai-cyclic", "sparsity": 0.5, "connectivity_pair": "cycle_000..cycle_001"}
    assert float(ds["connectivity_error_barrier_linear_mean"].sel(at)) == pytest.approx(1.1)
    assert ds["signs_flip"].dims == ("method", "sparsity", "seed", "signs_pair")
    at = {"method": "lrr", "sparsity": 0.8, "seed": 1, "signs_pair": "init..cycle_000"}
    assert float(ds["signs_flip"].sel(at)) == 0.25
    assert ds["connectivity_error"].attrs["long_name"] == "connectivity: error"


def test_the_plot_is_drawn_from_the_dataset(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", accuracy=first_point_accuracy)
    aggregate(str(sweep))
    result = run_cli("plot", "aggregate", str(sweep / "aggregate.nc"), "--out", str(tmp_path / "fig.png"), "--json")
    assert json.loads(result.stdout)["figure"] == str(tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    fig = plots.plot_aggregate(read_dataset(sweep / "aggregate.nc"))
    accuracy_ax, flops_ax = fig.get_axes()[:2]
    assert accuracy_ax.get_xlabel() == "sparsity (%)" and "test accuracy" in accuracy_ax.get_ylabel()
    assert flops_ax.get_yscale() == "log" and flops_ax.get_ylabel() == "training FLOPs (multiply-adds)"
    assert sorted(t.get_text() for t in flops_ax.get_legend().get_texts()) == ["lrr", "pai-cyclic"]
    assert "95 % Student-t interval" in fig._supxlabel.get_text() and "n=3 seeds" in fig._supxlabel.get_text()
    with pytest.raises(plots.PlotInputError):
        plots.plot_aggregate(read_dataset(sweep / "aggregate.nc").drop_vars("test_accuracy_mean"))


@pytest.mark.parametrize("case", ["absent", "file", "run", "plain-dir", "bad-json", "bad-point", "bad-name"])
def test_a_path_that_is_not_a_sweep_exits_2_with_one_line(tmp_path, case):
    path = tmp_path / "x"
    if case == "file":
        path.write_text("hello")
    elif case == "run":
        fake_run(path, 0.5, 1.0, 0.5)
    elif case == "plain-dir":
        path.mkdir()
    elif case == "bad-json":
        path.mkdir()
        (path / "sweep.json").write_text("{not json")
    elif case == "bad-point":
        write_sweep(path, {"seed": [0, 1]}, [{"name": "a", "point": {"seed": 5}}])
    elif case == "bad-name":
        write_sweep(path, {"seed": [0]}, [{"name": "../escape", "point": {"seed": 0}}])
    from cli.main import cli

    result = CliRunner().invoke(cli, ["aggregate", str(path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    if case in ("absent", "file", "run", "plain-dir"):
        assert "landscape sweep SPEC.toml --out SWEEP" in result.stderr


def test_a_sweep_with_no_run_done_exits_3(tmp_path):
    sweep = write_sweep(tmp_path / "sweep", {"seed": [0, 1]}, [{"name": f"r{s}", "point": {"seed": s}} for s in (0, 1)])
    result = aggregate(str(sweep), expect=3)
    assert "none of the 2 runs" in result.stderr and not (sweep / "aggregate.nc").exists()


def test_an_unreadable_analysis_file_is_left_out_and_said(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", grid={"seed": [0, 1]})
    bad = sweep / "runs" / "seed1" / "analysis" / "connectivity.nc"
    bad.parent.mkdir()
    bad.write_bytes(b"not a netCDF file")
    result = aggregate(str(sweep))
    assert "warning:" in result.stderr and "connectivity.nc" in result.stderr
    ds = read_dataset(sweep / "aggregate.nc")
    assert json.loads(ds.attrs["skipped_files"]) == [str(bad)] and bool(ds.done.all())

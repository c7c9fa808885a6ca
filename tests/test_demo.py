"""`landscape demo --quick`: the whole pipeline, end to end, and a re-run that finishes only
what is missing."""

from __future__ import annotations

import json

import xarray as xr
from click.testing import CliRunner

from cli.main import cli

METHODS = ("dense", "pai-cyclic", "lrr", "sculpt")
PER_RUN_DATASETS = ("connectivity", "sharpness", "signs", "metrics")
PER_RUN_FIGURES = ("connectivity", "sharpness", "signs", "metrics")
COMBINED_FIGURES = ("connectivity", "sharpness", "signs", "overlap", "metrics", "sparsity", "sparsity_flops")


def _demo(out):
    return CliRunner().invoke(cli, ["demo", "--quick", "--out", str(out), "--json"], catch_exceptions=False)


def test_quick_demo_produces_every_dataset_and_figure_and_resumes(tmp_path):
    out = tmp_path / "demo"
    result = _demo(out)
    assert result.exit_code == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout)  # stdout is the result only; progress went to stderr
    assert "[1/" in result.stderr and "$ landscape train" in result.stderr

    expected_data = {out / "runs" / m / "analysis" / f"{k}.nc" for m in METHODS for k in PER_RUN_DATASETS}
    expected_data |= {out / "analysis" / "overlap.nc", out / "analysis" / "metrics.nc"}
    expected_figures = {out / "runs" / m / "figures" / f"{k}.png" for m in METHODS for k in PER_RUN_FIGURES}
    expected_figures |= {out / "figures" / f"{k}.png" for k in COMBINED_FIGURES}
    assert set(map(str, expected_data)) == set(answer["datasets"])
    assert set(map(str, expected_figures)) == set(answer["figures"])
    assert all(path.stat().st_size > 10_000 for path in expected_figures)

    for method in METHODS:
        run = answer["runs"][method]
        assert (out / "runs" / method / "DONE").exists()
        assert run["sparsity"] == (0.0 if method == "dense" else 0.9)
        assert 0.0 <= run["test_accuracy"] <= 1.0
    metrics = xr.open_dataset(out / "analysis" / "metrics.nc", engine="h5netcdf")
    assert sorted(metrics.run.values) == sorted(METHODS)
    overlap = xr.open_dataset(out / "analysis" / "overlap.nc", engine="h5netcdf")
    assert overlap.sizes["mask_a"] == 5

    # An interrupted demo: one analysis and two figures lost. The re-run redoes only those.
    done_marker = (out / "runs" / "lrr" / "DONE").stat().st_mtime_ns
    kept_figure = (out / "figures" / "sharpness.png").stat().st_mtime_ns
    (out / "runs" / "lrr" / "analysis" / "signs.nc").unlink()
    (out / "runs" / "lrr" / "figures" / "signs.png").unlink()
    (out / "figures" / "signs.png").unlink()
    again = _demo(out)
    assert again.exit_code == 0, again.stderr[-3000:]
    assert set(json.loads(again.stdout)["figures"]) == set(map(str, expected_figures))
    assert (out / "runs" / "lrr" / "analysis" / "signs.nc").exists()
    assert (out / "runs" / "lrr" / "DONE").stat().st_mtime_ns == done_marker
    assert (out / "figures" / "sharpness.png").stat().st_mtime_ns == kept_figure
    assert "already complete" in again.stderr and "is already there" in again.stderr


def test_a_failing_step_stops_the_demo_with_its_exit_code(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(tmp_path / "d"), "--device", "abacus"],
                                catch_exceptions=False)
    assert result.exit_code == 2
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "unknown device" in errors[0] and "demo step `landscape train" in errors[1]
    assert "Traceback" not in result.stderr

"""A run directory and its datasets written by the code before the renovation (see
tests/fixtures/pre_renovation_run: resnet1d width 4, synthetic data, pai-cyclic at sparsity
0.5, 2 cycles of 1 epoch; made by `landscape train`, then connectivity --points 3, sharpness
--samples 64, signs, overlap --across-cycles, metrics and barrier cycle_000 cycle_001
--points 3). The renovated code must read all of it, reuse what it holds, extend it, and
compute the very same numbers again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from landscape.store import read_dataset

FIXTURE = Path(__file__).parent / "fixtures" / "pre_renovation_run"
ANALYSES = {  # file -> the command that wrote it (RUN stands for the run directory)
    "connectivity": ["connectivity", "RUN", "--points", "3"],
    "sharpness": ["sharpness", "RUN", "--samples", "64", "--no-warm-start"],  # the old file's cold starts
    "signs": ["signs", "RUN"],
    "overlap": ["overlap", "RUN", "--across-cycles"],
    "metrics": ["metrics", "RUN"],
    "barrier_cycle_000__cycle_001": ["barrier", "RUN/checkpoints/cycle_000.pt", "RUN/checkpoints/cycle_001.pt",
                                     "--points", "3"],
}


@pytest.fixture()
def old_run(tmp_path) -> Path:
    run = tmp_path / FIXTURE.name  # the same folder name: datasets record the run by name
    shutil.copytree(FIXTURE, run)
    return run


def _args(command: list[str], run: Path) -> list[str]:
    return [part.replace("RUN", str(run)) for part in command]


def _as_json(*args: str) -> dict:
    return json.loads(run_cli(*args, "--json").stdout)


# variables a recomputed file has that the old files predate
ADDED_SINCE = {"warm_started", "error_endpoint_difference", "error_barrier_gap_dominated",
               "loss_endpoint_difference", "loss_barrier_gap_dominated"}


def _same_numbers(a, b) -> None:
    assert sorted(a.data_vars) == sorted(set(b.data_vars) - (ADDED_SINCE - set(a.data_vars)))
    for name in a.data_vars:
        x, y = a[name].values, b[name].values
        if x.dtype.kind in "fc":
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9, equal_nan=True, err_msg=name)
        else:
            assert np.array_equal(x, y), name


def test_an_old_run_is_shown_and_its_checkpoints_load(old_run):
    info = _as_json("info", str(old_run))
    assert info["complete"] and info["method"] == "pai-cyclic" and info["cycles"] == 2
    assert [c["label"] for c in info["checkpoints"]] == ["init", "cycle_000", "cycle_001"]
    assert all("error" not in c for c in info["checkpoints"])
    assert {a["file"] for a in info["analyses"]} == {f"{name}.nc" for name in ANALYSES}
    assert all("error" not in a for a in info["analyses"])
    assert _as_json("train", "--resume", str(old_run))["status"] == "already complete"


@pytest.mark.parametrize("name", list(ANALYSES))
def test_an_old_dataset_is_reused_and_recomputed_to_the_same_numbers(old_run, tmp_path, name):
    stored = old_run / "analysis" / f"{name}.nc"
    before = stored.read_bytes()
    again = _as_json(*_args(ANALYSES[name], old_run))
    assert again["computed"] == [] and again["reused"], again
    assert stored.read_bytes() == before  # nothing recomputed, nothing rewritten
    fresh = tmp_path / f"fresh_{name}.nc"
    redone = _as_json(*_args(ANALYSES[name], old_run), "--out", str(fresh))
    assert redone["reused"] == [] and redone["computed"]
    _same_numbers(read_dataset(stored), read_dataset(fresh))


def test_an_old_dataset_is_extended(old_run):
    signs = _as_json("signs", str(old_run), "--reference", "previous")
    assert signs["computed"] == ["cycle_000..cycle_001"] and signs["reused"] == ["init..cycle_000"]
    ds = read_dataset(old_run / "analysis" / "signs.nc")
    assert list(ds.pair.values) == ["init..cycle_000", "init..cycle_001", "cycle_000..cycle_001"]


@pytest.mark.parametrize("kind", ["connectivity", "sharpness", "signs", "overlap", "metrics"])
def test_old_datasets_are_drawn(old_run, kind):
    figure = Path(_as_json("plot", kind, str(old_run))["figure"])
    assert figure.is_file() and figure.stat().st_size > 10_000

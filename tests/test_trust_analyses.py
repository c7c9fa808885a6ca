"""The analysis half of the trust issue: what a file, a label or a full disk can do to an
analysis. Each case ends in one line on stderr and the documented exit code (2 bad input,
1 a runtime failure), never a traceback, and leaves nothing behind it should not."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner

import plot_datasets
from cli.main import cli
from landscape.store import read_dataset
from reliability_harness import finish, start

ROOT = Path(__file__).resolve().parent.parent


def invoke(args: list, code: int):
    """`landscape ARGS` in-process: exit `code`, and when it fails exactly one line on stderr
    and no traceback."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, (args, result.output)
    if code:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        assert "this is a bug" not in lines[0] and "Traceback" not in result.output, lines
    return result


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory) -> Path:
    """A private copy of the session's finished pai-cyclic run (analyses write into it)."""
    copy = tmp_path_factory.mktemp("trust") / "run"
    shutil.copytree(tiny_run, copy)
    return copy


# ---------------------------------------------------------------- a full disk

COMMANDS = {
    "metrics": ["metrics", "{run}"],
    "signs": ["signs", "{run}"],
    "barrier": ["barrier", "{run}/checkpoints/cycle_001.pt", "{run}/checkpoints/cycle_002.pt", "--points", "2",
                "--samples", "32"],
    "connectivity": ["connectivity", "{run}", "--points", "2", "--samples", "32"],
    "sharpness": ["sharpness", "{run}", "--checkpoints", "cycle_002", "--top-k", "1", "--samples", "32"],
}


def _file_size_limit(limit: int):
    def apply() -> None:
        # Ignored, SIGXFSZ no longer kills the child: writes past the limit fail with EFBIG,
        # as they would with ENOSPC on a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_write_that_fails_is_one_line_exit_1_and_keeps_the_previous_file(run, tmp_path, name):
    out = tmp_path / f"{name}.nc"
    args = [a.format(run=run) for a in COMMANDS[name]] + ["--out", str(out), "--overwrite", "--quiet"]
    invoke(args, 0)
    before = out.read_bytes()
    child = subprocess.run([sys.executable, "-m", "cli", *args], cwd=tmp_path, capture_output=True, text=True,
                           preexec_fn=_file_size_limit(2048), timeout=300,
                           env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    lines = child.stderr.strip().splitlines()
    assert child.returncode == 1, child.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {out}"), child.stderr
    assert "intact" in lines[0]
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, f"{out.name}.lock"])


# ---------------------------------------------------------------- labels

def test_a_label_never_names_a_file_outside_the_run(run, tmp_path):
    outside = run.parent / "x.pt"
    shutil.copy(run / "checkpoints" / "init.pt", outside)
    result = invoke(["signs", f"{run}@init", f"{run}@../../x", "--out", tmp_path / "s.nc"], 2)
    assert "not a checkpoint label" in result.stderr
    result = invoke(["sharpness", run, "--checkpoints", "../../x", "--out", tmp_path / "h.nc"], 2)
    assert "not a checkpoint label" in result.stderr
    result = invoke(["overlap", f"{run}@init", f"{run}@../checkpoints/init", "--out", tmp_path / "o.nc"], 2)
    assert "not a checkpoint label" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_input_that_is_not_a_regular_file_is_refused(run, tmp_path):
    fifo, fifo_nc = tmp_path / "pipe.pt", tmp_path / "pipe.nc"
    os.mkfifo(fifo)
    os.mkfifo(fifo_nc)
    invoke(["signs", run / "checkpoints" / "init.pt", fifo, "--out", tmp_path / "s.nc"], 2)
    invoke(["plot", "sharpness", fifo_nc], 2)
    assert "not a regular file" in invoke(["info", fifo], 2).stderr


# ---------------------------------------------------------------- bad checkpoints

def test_complex_weights_are_refused(run, tmp_path):
    payload = torch.load(run / "checkpoints" / "cycle_002.pt", weights_only=True)
    name = next(k for k, v in payload["state_dict"].items() if v.dim() > 1)
    payload["state_dict"][name] = payload["state_dict"][name].to(torch.complex64)
    torch.save(payload, tmp_path / "complex.pt")
    result = invoke(["signs", run / "checkpoints" / "cycle_001.pt", tmp_path / "complex.pt", "--out",
                     tmp_path / "s.nc"], 2)
    assert "complex" in result.stderr


@pytest.mark.parametrize("command", ["sharpness", "barrier"])
def test_data_come_from_data_dir_never_from_the_checkpoint(run, tmp_path, monkeypatch, command):
    """The checkpoint names a download into X; X is never created, and the mnist1d cache is
    read from --data-dir (an empty default cache stays empty)."""
    payload = torch.load(run / "checkpoints" / "cycle_002.pt", weights_only=True)
    recorded = tmp_path / "X"
    payload["data"] = {**payload["data"], "name": "mnist1d", "data_dir": str(recorded), "download": True}
    torch.save(payload, tmp_path / "a.pt")
    torch.save(payload, tmp_path / "b.pt")
    given, default = tmp_path / "given", tmp_path / "default"
    given.mkdir()
    default.mkdir()
    for cached in (ROOT / "tests" / ".cache").glob("mnist1d-*.npz"):
        shutil.copy(cached, given)
    monkeypatch.setenv("SPARSE_LANDSCAPE_CACHE", str(default))
    inputs = [tmp_path / "a.pt"] + ([tmp_path / "b.pt", "--points", "2"] if command == "barrier" else ["--top-k", "1"])
    invoke([command, *inputs, "--samples", "32", "--data-dir", given, "--out", tmp_path / "r.nc", "--quiet"], 0)
    assert not recorded.exists()
    assert list(default.iterdir()) == []


# ---------------------------------------------------------------- a user's own model

@pytest.fixture(scope="module")
def factory_run(tmp_path_factory) -> Path:
    """A run trained with --model trust_factory:build, the module written here and put on sys.path."""
    from conftest import run_cli

    folder = tmp_path_factory.mktemp("factory")
    (folder / "trust_factory.py").write_text(
        "from torch import nn\n\n"
        "def build(num_classes=10):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, num_classes))\n")
    sys.path.insert(0, str(folder))
    run_cli("train", "--data", "synthetic", "--model", "trust_factory:build", "--epochs", "1", "--batch-size", "64",
            "--method", "pai-cyclic", "--pruner", "random", "--sparsity", "0.5", "--cycles", "2", "--device", "cpu",
            "--out", str(folder / "run"), "--quiet")
    yield folder / "run"
    sys.path.remove(str(folder))


FACTORY_COMMANDS = {
    "connectivity": (["connectivity", "{run}", "--points", "2", "--samples", "32"], True),
    "barrier": (["barrier", "{run}/checkpoints/cycle_000.pt", "{run}/checkpoints/cycle_001.pt", "--points", "2",
                 "--samples", "32"], True),
    "sharpness": (["sharpness", "{run}", "--top-k", "1", "--samples", "32"], True),
    "signs": (["signs", "{run}"], False),
    "overlap": (["overlap", "{run}", "--across-cycles"], False),
    "info": (["info", "{run}"], False),
}


@pytest.mark.parametrize("name", list(FACTORY_COMMANDS))
def test_every_command_that_reads_checkpoints_takes_the_users_model(factory_run, tmp_path, name):
    """With --model the run is analysed; without it, a command that must build the model says
    which flag allows importing it (and that flag exists); one that reads weights only works."""
    args, builds = FACTORY_COMMANDS[name]
    args = [a.format(run=factory_run) for a in args] + (["--out", tmp_path / "r.nc"] if name != "info" else [])
    without = invoke(args + ["--quiet"], 2 if builds else 0)
    if builds:
        assert "pass --model trust_factory:build" in without.stderr
    invoke(args + ["--model", "trust_factory:build", "--quiet"], 0)


# ---------------------------------------------------------------- two writers of one --out

def test_two_signs_writing_one_out_at_once_keep_both_results(run, tmp_path):
    out = tmp_path / "s.nc"
    children = [start(["signs", f"{run}@init", f"{run}@{label}", "--out", str(out)], cwd=tmp_path / label)
                for label in ("cycle_001", "cycle_002")]
    for child in children:
        outcome = finish(child)
        assert outcome.exitcode == 0, outcome.stderr
    assert sorted(str(p) for p in read_dataset(out).pair.values) == ["init..cycle_001", "init..cycle_002"]


# ---------------------------------------------------------------- crafted datasets for plot

MAIN = {"connectivity": ("error", "pair"), "sharpness": ("eigenvalue", "checkpoint"),
        "signs": ("flip_fraction", "pair"), "overlap": ("jaccard_total", "mask_a"), "metrics": ("value", "run")}


def _crafted(kind: str, case: str) -> xr.Dataset:
    ds = getattr(plot_datasets, kind)()
    variable, dim = MAIN[kind]
    if case == "all_nan":
        return ds.assign({name: ds[name].astype(float) * np.nan for name in ds.data_vars})
    if case == "strings":
        return ds.assign({variable: ds[variable].astype(str)})
    if case == "empty_dimension":
        return ds.isel({dim: slice(0, 0)})
    if case == "missing_variable":
        return ds.drop_vars(variable)
    return ds.rename_dims({dim: f"{dim}_renamed"})


@pytest.mark.parametrize("case", ["all_nan", "strings", "empty_dimension", "missing_variable", "renamed_dimension"])
@pytest.mark.parametrize("kind", list(MAIN))
def test_a_crafted_dataset_is_one_line_exit_2_for_plot(tmp_path, kind, case):
    path = tmp_path / f"{kind}.nc"
    _crafted(kind, case).to_netcdf(path, engine="h5netcdf")
    invoke(["plot", kind, path], 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_two_overlaps_writing_one_out_at_once_leave_one_whole_file_and_say_so(run, tmp_path):
    """A whole-dataset analysis cannot merge: the file is one complete result, and the
    process that replaced the other's result says so on stderr."""
    out = tmp_path / "o.nc"
    children = [start(["overlap", f"{run}@init", f"{run}@{label}", "--out", str(out)], cwd=tmp_path / label)
                for label in ("cycle_001", "cycle_002")]
    outcomes = [finish(child) for child in children]
    assert [outcome.exitcode for outcome in outcomes] == [0, 0], [outcome.stderr for outcome in outcomes]
    assert sum("replacing it" in outcome.stderr for outcome in outcomes) == 1, [o.stderr for o in outcomes]
    assert read_dataset(out).sizes["mask_a"] == 2


# ---------------------------------------------------------------- a model sized by a file

@pytest.mark.parametrize("command", [
    ["info", "{run}/checkpoints/cycle_002.pt"], ["signs", "{run}"], ["overlap", "{run}", "--across-cycles"],
    ["barrier", "{run}/checkpoints/cycle_001.pt", "{run}/checkpoints/cycle_002.pt", "--points", "2"],
    ["connectivity", "{run}", "--points", "2"], ["sharpness", "{run}", "--checkpoints", "cycle_002"],
])
def test_every_command_that_reads_checkpoints_takes_the_size_limit(run, tmp_path, command):
    """The tiny run's resnet1d has a few thousand parameters: a limit of 100 refuses it before
    anything is allocated or written; the default limit lets it through (checked elsewhere)."""
    args = [part.format(run=run) for part in command] + ["--max-parameters", "100"]
    if command[0] != "info":
        args += ["--out", tmp_path / "limited.nc"]
    line = invoke(args, 2).stderr
    assert "more than the limit of 100" in line and "--max-parameters" in line
    assert not (tmp_path / "limited.nc").exists()

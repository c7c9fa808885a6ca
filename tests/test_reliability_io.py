"""Guarantees 2 (concurrency), 5, 6 and 7 of issue 8: analyses of one run at the same time,
a full disk and a read-only place, numbers that are not numbers, and determinism on CPU.

A full disk and a read-only directory are simulated by making the system calls fail the way
the kernel does (OSError ENOSPC / EROFS): the tests run as root in CI, where permission bits
stop nothing."""

from __future__ import annotations

import builtins
import errno
import json
import os
import pathlib
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import sparse_training.records as records_module
from conftest import run_cli
from landscape import store
from reliability_harness import assert_every_file_complete, finish, landscape, start
from sparse_training.checkpoint import load_checkpoint
from sparse_training.rundir import RunDir
from sparse_training.run.session import RunSession

TINY = ["--data", "synthetic", "--model", "resnet1d", "--model-kwargs", '{"width": 8}', "--batch-size", "64",
        "--lr", "0.05", "--device", "cpu", "--epochs", "2", "--method", "pai-cyclic", "--pruner", "random",
        "--sparsity", "0.5", "--cycles", "3"]
PAIRS = ["cycle_000..cycle_001", "cycle_001..cycle_002"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("io") / "reference"
    run_cli("train", *TINY, "--out", str(out))
    return out


def same_checkpoints(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in (a / "checkpoints").iterdir())
    return names == sorted(p.name for p in (b / "checkpoints").iterdir()) and all(
        (a / "checkpoints" / n).read_bytes() == (b / "checkpoints" / n).read_bytes() for n in names)


def one_error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


# ---------------------------------------------------------------- guarantee 5: full disk, read-only places

def full_disk(monkeypatch, fragment: str) -> None:
    """Writes of a temporary file whose name contains `fragment` put half their bytes on disk
    and fail with ENOSPC, as write(2) does on a full disk."""
    original = pathlib.Path.write_bytes

    def write_bytes(self: Path, data: bytes) -> int:
        if fragment in self.name:
            original(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)


def test_full_disk_while_saving_a_checkpoint(reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    full_disk(monkeypatch, ".cycle_001.pt.")
    failed = run_cli("train", *TINY, "--out", str(out), expect=1)
    assert one_error_line(failed) == (f"error: cannot write {out}/checkpoints/cycle_001.pt (No space left on device); "
                                      "nothing was replaced: no partial file was left")
    assert RunDir(out).stray_temporaries() == [] and not (out / "checkpoints" / "cycle_001.pt").exists()
    assert_every_file_complete(out)
    assert (out / "checkpoints" / "cycle_000.pt").read_bytes() == (reference / "checkpoints" / "cycle_000.pt").read_bytes()
    monkeypatch.undo()  # space freed: the run resumes to the result it would have had
    run_cli("train", "--resume", str(out))
    assert same_checkpoints(out, reference)


class FullDiskFile:
    """A text file whose next write puts half its text on disk, then fails with ENOSPC."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, text: str) -> int:
        self.handle.write(text[: len(text) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_full_disk_while_appending_metrics(reference, tmp_path, monkeypatch):
    """The row cut short on a full disk is dropped on resume; metrics.csv ends as if nothing happened."""
    out = tmp_path / "run"
    appends = []

    def open_metrics(path, mode="r", *args, **kwargs):
        handle = builtins.open(path, mode, *args, **kwargs)
        if "a" in mode:
            appends.append(path)
            return FullDiskFile(handle) if len(appends) == 4 else handle
        return handle

    monkeypatch.setattr(records_module, "open", open_metrics, raising=False)
    failed = run_cli("train", *TINY, "--out", str(out), expect=1)
    assert one_error_line(failed).startswith(f"error: cannot write {out}/metrics.csv (No space left on device); a row cut")
    assert not (out / "metrics.csv").read_text().endswith("\n")  # the torn row is really there
    monkeypatch.undo()
    run_cli("train", "--resume", str(out))
    assert (out / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    assert same_checkpoints(out, reference)


def test_full_disk_while_writing_a_dataset_keeps_the_previous_one(reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    run_cli("connectivity", str(run), "--points", "2")
    target = run / "analysis" / "connectivity.nc"
    before = target.read_bytes()

    class FullDisk:
        """The dataset file (serialised in memory, then written plainly): half of it fits."""

        def __init__(self, file, mode="r"):
            self.handle = builtins.open(file, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[:len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "open", FullDisk, raising=False)
    failed = run_cli("connectivity", str(run), "--points", "3", "--overwrite", expect=1)
    assert one_error_line(failed) == (f"error: cannot write {target} (No space left on device); nothing was replaced: "
                                      "the previous connectivity.nc is intact")
    assert target.read_bytes() == before and not list(target.parent.glob(".*.tmp"))
    assert store.read_dataset(target).sizes["alpha"] == 2


def read_only(monkeypatch, folder: Path) -> None:
    """Every attempt to create a file or directory inside `folder` fails with EROFS."""
    inside = lambda path: Path(path).resolve().is_relative_to(folder.resolve())  # noqa: E731
    refuse = lambda path: OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))  # noqa: E731
    real_mkstemp, real_open, real_mkdir = tempfile.mkstemp, os.open, pathlib.Path.mkdir

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and inside(dir):
            raise refuse(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(self, *args, **kwargs):
        if inside(self) and not self.is_dir():
            raise refuse(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)


def test_analysing_a_read_only_run_says_so_and_writes_elsewhere_with_out(reference, tmp_path, monkeypatch):
    run = tmp_path / "shared" / "run"
    shutil.copytree(reference, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    read_only(monkeypatch, run)
    for args in (["connectivity", str(run), "--points", "2"], ["signs", str(run)], ["metrics", str(run)],
                 ["sharpness", str(run), "--checkpoints", "cycle_002", "--samples", "32", "--max-hvp", "4"]):
        failed = run_cli(*args, expect=1)
        line = one_error_line(failed)
        assert line.startswith(f"error: cannot write {run}/analysis/") and "Read-only file system" in line, line
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = run_cli("connectivity", str(run), "--points", "2", "--out", str(tmp_path / "mine.nc"), "--json")
    assert json.loads(result.stdout)["computed"] == PAIRS


def test_training_into_a_read_only_place(reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "DONE").unlink()
    state = (run / "state.pt").read_bytes()
    read_only(monkeypatch, tmp_path)
    resumed = run_cli("train", "--resume", str(run), expect=1)
    assert "Read-only file system" in one_error_line(resumed)
    fresh = run_cli("train", *TINY, "--out", str(tmp_path / "new"), expect=1)
    assert one_error_line(fresh) == f"error: cannot access {tmp_path / 'new'}: Read-only file system"
    assert (run / "state.pt").read_bytes() == state and not (tmp_path / "new").exists()


# ---------------------------------------------------------------- guarantee 2: analyses at the same time

def test_analyses_of_one_run_at_the_same_time_all_finish(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    commands = [["connectivity", str(run), "--points", "3", "--json"]] * 2 + [
        ["sharpness", str(run), "--checkpoints", "cycle_001,cycle_002", "--samples", "32", "--max-hvp", "6", "--json"]] * 2 + [
        ["signs", str(run), "--json"], ["signs", str(run), "--reference", "previous", "--json"]]
    children = [start(args, cwd=tmp_path / f"child{i}") for i, args in enumerate(commands)]
    outcomes = [finish(child) for child in children]
    assert [o.exitcode for o in outcomes] == [0] * len(commands), [o.stderr[-300:] for o in outcomes]
    for outcome in outcomes[:2]:
        result = json.loads(outcome.stdout)
        assert sorted(result["computed"] + result["reused"]) == PAIRS
    connectivity = store.read_dataset(run / "analysis" / "connectivity.nc")
    assert sorted(connectivity.pair.values.tolist()) == PAIRS
    assert bool(np.isfinite(connectivity.error.values).all())
    sharpness = store.read_dataset(run / "analysis" / "sharpness.nc")
    assert sorted(sharpness.checkpoint.values.tolist()) == ["cycle_001", "cycle_002"]
    signs = store.read_dataset(run / "analysis" / "signs.nc")
    # 3 cycles against init, and against the previous checkpoint (init again for cycle_000): 5 pairs once each
    assert len(set(signs.pair.values.tolist())) == signs.sizes["pair"] == 5
    assert (run / "analysis" / "connectivity.nc.lock").exists()


# ---------------------------------------------------------------- guarantee 6: numbers that are not numbers

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(reference, tmp_path, value):
    payload = torch.load(reference / "checkpoints" / "cycle_002.pt", weights_only=True)
    name = sorted(k for k in payload["state_dict"] if k.endswith("running_var"))[0]
    payload["state_dict"][name][1] = value
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    good = reference / "checkpoints" / "cycle_001.pt"
    for args in (["info", bad], ["barrier", good, bad], ["signs", good, bad, "--out", tmp_path / "s.nc"],
                 ["overlap", good, bad, "--out", tmp_path / "o.nc"], ["sharpness", bad]):
        result = run_cli(*map(str, args), expect=2)
        assert one_error_line(result) == f"error: {bad} has non-finite (NaN/Inf) values in {name}"
    assert list(tmp_path.glob("*.nc")) == []


def test_divergence_stops_at_the_first_non_finite_loss(tmp_path, monkeypatch):
    """The error names the cycle, epoch and step of the first non-finite loss, although the
    loop reads its on-device flag only every few steps, and nothing non-finite reaches a file."""
    from sparse_training.acceleration import StepRunner

    losses = []
    original = StepRunner.loss

    def record(self, model, x, y):
        loss = original(self, model, x, y)
        losses.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(StepRunner, "loss", record)
    out = tmp_path / "diverged"
    mlp = [*TINY[:2], "--model", "mlp", "--model-kwargs", '{"hidden_size": 8}', *TINY[6:]]
    result = run_cli("train", *[a if a != "0.05" else "1000" for a in mlp], "--out", str(out), expect=1)
    failing = next(step for step, value in enumerate(losses) if not np.isfinite(value))
    cycle, epoch = failing // 8, failing % 8 // 4 + 1  # 4 steps per epoch, 2 epochs per cycle; epochs count from 1
    assert failing > 8  # it trained a cycle first
    line = one_error_line(result)
    assert re.fullmatch(rf"error: training loss became (nan|-?inf) at cycle {cycle}, epoch {epoch}, step {failing}; "
                        r"lower --lr or check the data", line), line
    values = [row.split(",")[-1] for row in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert values and all(np.isfinite(float(v)) for v in values)
    assert json.loads((out / "meta.json").read_text())["status"] == "diverged"
    assert_every_file_complete(out)  # loading checks every tensor for NaN/Inf
    assert "nan" not in (out / "metrics.csv").read_text().lower()


def test_an_analysis_meeting_a_non_finite_loss_stops_and_stores_nothing(reference, tmp_path):
    payload = torch.load(reference / "checkpoints" / "cycle_002.pt", weights_only=True)
    payload["state_dict"]["classifier.weight"] *= 3e38  # finite, but the logits overflow to inf
    huge = tmp_path / "huge.pt"
    torch.save(payload, huge)
    good = reference / "checkpoints" / "cycle_001.pt"
    barrier = run_cli("barrier", str(good), str(huge), "--points", "3", "--bn", "interpolate", expect=1)
    assert one_error_line(barrier) == ("error: the train loss at alpha=0.5 is inf: the interpolated network overflows; "
                                       "check the checkpoints")
    sharpness = run_cli("sharpness", str(huge), "--samples", "32", expect=2)
    assert "on the evaluation subset: the network diverged" in one_error_line(sharpness)
    assert list(tmp_path.glob("*.nc")) == []


def test_write_dataset_refuses_unmarked_non_finite_values(tmp_path):
    ds = xr.Dataset({"v": store.describe(xr.DataArray([1.0, np.nan], dims=("alpha",)), "v", "1", "a value")})
    with pytest.raises(ValueError, match="non-finite"):
        store.write_dataset(ds, tmp_path / "v.nc")
    assert not (tmp_path / "v.nc").exists()


# ---------------------------------------------------------------- guarantee 7: determinism on CPU

def test_same_config_and_seed_give_identical_files_across_processes(reference, tmp_path):
    again = tmp_path / "again"
    run_cli("train", *TINY, "--out", str(again))
    assert same_checkpoints(again, reference)
    assert (again / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    child = tmp_path / "child"
    assert landscape(["train", *TINY, "--out", str(child)], cwd=tmp_path).exitcode == 0
    assert same_checkpoints(child, reference)
    other_seed = tmp_path / "seed1"
    run_cli("train", *TINY, "--seed", "1", "--out", str(other_seed))
    final = "cycle_002.pt"
    assert (other_seed / "checkpoints" / final).read_bytes() != (reference / "checkpoints" / final).read_bytes()
    a, b = load_checkpoint(other_seed / "checkpoints" / final), load_checkpoint(reference / "checkpoints" / final)
    assert not all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)

"""Guarantees 1 and 2 of issue 8: kill `landscape train` or an analysis at any moment, resume,
and get the uninterrupted result bit for bit; a killed process never leaves a partial file
under a final name; SIGTERM/SIGINT save the resume state and exit 1 with one line.

Every trial is a real child process (tests/reliability_harness.py) that dies by a real
SIGKILL at a named point: mid-epoch, mid-write of a checkpoint, of the resume state or of
metrics.csv, between a write and its rename, between cycles, mid-evaluation, before DONE."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from reliability_harness import Point, assert_every_file_complete, landscape
from sparse_training.io import exclusive_lock
from sparse_training.rundir import RunDir

TINY = ["--data", "synthetic", "--model", "resnet1d", "--model-kwargs", '{"width": 8}', "--batch-size", "64",
        "--lr", "0.05", "--device", "cpu", "--epochs", "2"]
PAI = TINY + ["--method", "pai-cyclic", "--pruner", "random", "--sparsity", "0.5", "--cycles", "3"]  # 3 x 2 epochs x 4 steps
IMP = TINY + ["--method", "imp", "--sparsity", "0.36", "--rewind-epoch", "1"]  # dense cycle 0, then two 20 % cuts
STEP = "sparse_training.run.session:RunSession.after_step"
WRITE = "pathlib:Path.write_bytes"


def train(args: list[str], out: Path, points: tuple[Point, ...] = ()):
    return landscape(["train", *args, "--out", str(out)], points, cwd=out.parent)


def resume(out: Path):
    return landscape(["train", "--resume", str(out)], cwd=out.parent)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs of each configuration, trained once."""
    base = tmp_path_factory.mktemp("references")
    runs = {"pai": (PAI, base / "pai"), "imp": (IMP, base / "imp")}
    for args, out in runs.values():
        outcome = train(args, out)
        assert outcome.exitcode == 0, outcome.stderr
    return {name: out for name, (_, out) in runs.items()}


def assert_same_run(run: Path, reference: Path) -> None:
    """Every checkpoint file and metrics.csv byte for byte as in the uninterrupted run; done;
    no temporary file left behind."""
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == names
    for name in names:
        assert (run / "checkpoints" / name).read_bytes() == (reference / "checkpoints" / name).read_bytes(), name
    assert (run / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    assert RunDir(run).is_done() and json.loads((run / "meta.json").read_text())["status"] == "done"
    assert RunDir(run).stray_temporaries() == []


def _seeded_steps(count: int, total: int = 24) -> list[int]:
    """Kill moments drawn once from a fixed seed: the trials are the same on every run."""
    return sorted(random.Random(8).sample(range(1, total), count))


# (label, points): each kills the pai-cyclic run once. Counts are per process (the child that dies).
PAI_KILLS = [
    ("before the first checkpoint", (Point("os:replace", match="init.pt"),)),
    ("mid-epoch in cycle 0", (Point(STEP, nth=3, when="after"),)),
    ("mid-write of the resume state", (Point(WRITE, nth=2, match=".state.pt.", torn=0.5),)),
    ("mid-append of metrics.csv", (Point("sparse_training.run.evaluation:append_metrics", nth=2, torn=0.6),)),
    ("checkpoint written, not renamed", (Point("os:replace", match="cycle_000.pt"),)),
    ("checkpoint renamed, resume state not saved", (Point("os:replace", match="cycle_000.pt", when="after"),)),
    ("between cycles", (Point("sparse_training.run.session:RunSession.start_cycle", nth=2),)),
    ("mid-evaluation in cycle 2", (Point("sparse_training.run.evaluation:evaluate", nth=16),)),
    ("mid-write of the final checkpoint", (Point(WRITE, match=".cycle_002.pt.", torn=0.3),)),
    ("after the last cycle, before DONE", (Point("sparse_training.procedures:update_meta", match="done"),)),
] + [(f"seeded step {step}", (Point(STEP, nth=step, when="after"),)) for step in _seeded_steps(3)]


@pytest.mark.parametrize("label, points", PAI_KILLS, ids=[label for label, _ in PAI_KILLS])
def test_sigkill_then_resume_equals_the_uninterrupted_run(references, tmp_path, label, points):
    out = tmp_path / "run"
    killed = train(PAI, out, points)
    assert killed.exitcode == -signal.SIGKILL, f"the kill point was not reached: {killed.stderr[-500:]}"
    assert not RunDir(out).is_done()
    assert_every_file_complete(out)
    resumed = resume(out)
    assert resumed.exitcode == 0, resumed.stderr
    assert_same_run(out, references["pai"])


IMP_KILLS = [
    ("rewind point renamed, resume state not saved", (Point("os:replace", match="rewind.pt", when="after"),)),
    ("mid-write of the rewind point", (Point(WRITE, match=".rewind.pt.", torn=0.5),)),
    ("after the cut, before rewinding", (Point("sparse_training.run.checkpointing:load_checkpoint"),)),
]


@pytest.mark.slow
@pytest.mark.parametrize("label, points", IMP_KILLS, ids=[label for label, _ in IMP_KILLS])
def test_sigkill_of_imp_around_its_rewind_point(references, tmp_path, label, points):
    out = tmp_path / "run"
    killed = train(IMP, out, points)
    assert killed.exitcode == -signal.SIGKILL, killed.stderr[-500:]
    assert_every_file_complete(out)
    assert resume(out).exitcode == 0
    assert_same_run(out, references["imp"])


def test_killed_before_config_json_reruns_with_the_same_command(references, tmp_path):
    """Killed before the run had a config.json: --resume cannot know the run and says so;
    the original command starts it again in the same directory."""
    out = tmp_path / "run"
    killed = train(PAI, out, (Point("os:replace", match="config.json"),))
    assert killed.exitcode == -signal.SIGKILL and out.is_dir() and not (out / "config.json").exists()
    refused = resume(out)
    assert refused.exitcode == 2 and "no config.json" in refused.error_lines[0] and len(refused.error_lines) == 1
    assert train(PAI, out).exitcode == 0
    assert_same_run(out, references["pai"])


@pytest.mark.parametrize("sig, step", [(signal.SIGTERM, 6), (signal.SIGINT, 13)])
def test_sigterm_and_sigint_save_the_resume_state_and_exit_1_with_one_line(references, tmp_path, sig, step):
    out = tmp_path / "run"
    stopped = train(PAI, out, (Point(STEP, nth=step, when="after", sig=sig),))
    assert stopped.exitcode == 1
    name = signal.Signals(sig).name
    cycle, epoch = divmod((step - 1) // 4, 2)  # 4 steps per epoch, 2 epochs per cycle
    assert stopped.error_lines == [f"error: {name}: stopped at cycle {cycle}, epoch {epoch}, step {step}; resume state "
                                   f"saved; continue with `landscape train --resume {out}`"]
    assert json.loads((out / "meta.json").read_text())["status"] == "interrupted"
    assert_every_file_complete(out)
    assert resume(out).exitcode == 0
    assert_same_run(out, references["pai"])


@pytest.mark.slow
def test_sigterm_from_outside_to_the_installed_command(tmp_path):
    """The `landscape` console script itself, stopped by a scheduler's SIGTERM at whatever
    step it has reached, resumes to the uninterrupted result."""
    longer = [a if a != "64" else "16" for a in PAI]  # 16 steps per epoch: still training when the signal comes
    reference = train(longer, tmp_path / "reference")
    assert reference.exitcode == 0
    out = tmp_path / "run"
    process = subprocess.Popen([shutil.which("landscape") or "landscape", "train", *longer, "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out / "state.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: SIGTERM: stopped at cycle 0") and "Traceback" not in stderr
    assert resume(out).exitcode == 0
    assert_same_run(out, tmp_path / "reference")


def test_a_second_trainer_of_the_same_run_is_refused(references, tmp_path):
    """Two jobs on one run (a requeued job while the old one still runs) would interleave
    their writes: the second one is refused and touches nothing; a killed trainer's lock is
    gone with its process."""
    out = tmp_path / "run"
    assert train(PAI, out, (Point(STEP, nth=10, when="after"),)).exitcode == -signal.SIGKILL
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with exclusive_lock(RunDir(out).lock):  # another trainer holds the run
        refused = resume(out)
    assert refused.exitcode == 2 and "being trained by another process" in refused.error_lines[0]
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert resume(out).exitcode == 0
    assert_same_run(out, references["pai"])


# ---------------------------------------------------------------- analyses (guarantee 2)

def _connectivity(run: Path, points: tuple[Point, ...] = ()):
    return landscape(["connectivity", str(run), "--points", "3", "--json"], points, cwd=run.parent)


@pytest.fixture(scope="module")
def connectivity_reference(references, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("analysis") / "pai"
    shutil.copytree(references["pai"], run)
    assert _connectivity(run).exitcode == 0
    return run / "analysis" / "connectivity.nc"


@pytest.mark.parametrize("label, point, done_before", [
    ("after the first pair", Point("landscape.connectivity:evaluate_path", nth=2), ["cycle_000..cycle_001"]),
    ("dataset written, not renamed", Point("os:replace", match="connectivity.nc"), []),
])
def test_killed_connectivity_leaves_a_valid_file_and_the_rerun_finishes_it(references, connectivity_reference,
                                                                         tmp_path, label, point, done_before):
    from landscape.store import read_dataset

    run = tmp_path / "pai"
    shutil.copytree(references["pai"], run)
    assert _connectivity(run, (point,)).exitcode == -signal.SIGKILL
    assert_every_file_complete(run)
    target = run / "analysis" / "connectivity.nc"
    assert ([str(p) for p in read_dataset(target).pair.values] if target.exists() else []) == done_before
    rerun = _connectivity(run)
    assert rerun.exitcode == 0, rerun.stderr
    result = json.loads(rerun.stdout)
    assert result["reused"] == done_before and result["computed"] == [
        p for p in ("cycle_000..cycle_001", "cycle_001..cycle_002") if p not in done_before]
    finished, reference = read_dataset(target), read_dataset(connectivity_reference)
    for name in ("error", "loss", "error_barrier", "loss_barrier_linear"):
        np.testing.assert_array_equal(finished[name].values, reference[name].values)


@pytest.mark.slow
def test_killed_sharpness_keeps_the_finished_checkpoints_and_the_rerun_adds_the_rest(references, tmp_path):
    from landscape.store import read_dataset

    run = tmp_path / "pai"
    shutil.copytree(references["pai"], run)
    args = ["sharpness", str(run), "--checkpoints", "cycle_000,cycle_001,cycle_002", "--samples", "64",
            "--max-hvp", "10", "--json"]
    killed = landscape(args, (Point("landscape.sharpness:analyse", nth=3),), cwd=tmp_path)
    assert killed.exitcode == -signal.SIGKILL, killed.stderr[-500:]
    assert_every_file_complete(run)
    assert read_dataset(run / "analysis" / "sharpness.nc").checkpoint.values.tolist() == ["cycle_000", "cycle_001"]
    rerun = landscape(args, cwd=tmp_path)
    assert rerun.exitcode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["computed"] == ["cycle_002"]
    assert read_dataset(run / "analysis" / "sharpness.nc").checkpoint.values.tolist() == ["cycle_000", "cycle_001",
                                                                                          "cycle_002"]

"""DistributedDataParallel training under torchrun (gloo, 2 CPU processes) against ground truth:
the single-process run of the same config (masks bitwise, weights to float tolerance, for
models without BatchNorm), and the uninterrupted DDP run for a DDP run stopped on one rank
and resumed (bitwise). The DDP runs of this file share one torchrun job (tests/ddp_jobs.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from sparse_training.checkpoint import load_checkpoint
from sparse_training.config import Config
from sparse_training.procedures import train_run
from sparse_training.records import read_meta, read_metrics
from sparse_training.rundir import RunDir

BASE = {"data": {"name": "synthetic"}, "optim": {"batch_size": 48, "lr": 0.05},
        "run": {"epochs": 2, "device": "cpu"}}
# 256 training samples in batches of 48: five full batches and a last one of 16, so the
# loss weighting by each rank's share of its batch meets batches of two sizes.
METHODS = {
    "pai-cyclic": ({"method": "pai-cyclic", "cycles": 2}, {"pruner": "snip", "sparsity": 0.6}),
    "lrr": ({"method": "lrr"}, {"sparsity": 0.5, "prune_fraction": 0.5, "rewind_epoch": 1}),
    "rigl": ({"method": "rigl"}, {"sparsity": 0.7, "update_every": 3}),
    "gmp": ({"method": "gmp"}, {"sparsity": 0.7, "update_every": 2}),
}
CASES = [("mlp", "pai-cyclic"), ("mlp", "lrr"), ("mlp", "rigl"), ("mlp", "gmp"),
         ("cnn1d", "pai-cyclic"), ("cnn1d", "lrr"), ("cnn1d", "rigl")]


def config(model: str, method: str) -> dict:
    run, prune = METHODS[method]
    return Config.from_dict({**BASE, "model": {"name": model}, "prune": prune,
                             "run": {**BASE["run"], **run}}).to_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every case trained in one process and under torchrun; plus a DDP run of mlp/pai-cyclic
    stopped by rank 1 alone mid-epoch and resumed by the same job. The ranks agree on stops at
    every 16th step and every epoch's last one (6 batches per epoch): steps 6, 12, then 16,
    batch 4 of cycle 1's first epoch, where rank 1 asks (its third agreement)."""
    root = tmp_path_factory.mktemp("ddp")
    jobs = [{"out": str(root / f"ddp-{model}-{method}"), "config": config(model, method)} for model, method in CASES]
    stopped = {"out": str(root / "stopped"), "config": config("mlp", "pai-cyclic")}
    jobs += [{**stopped, "stop_rank": 1, "stop_after": 2}, {**stopped, "resume": True}]
    (root / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(Path(__file__).parent / "ddp_jobs.py"), str(root / "jobs.json")],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for model, method in CASES:
        train_run(Config.from_dict(config(model, method)), root / f"single-{model}-{method}", log=lambda m: None)
    return root


def final(run: Path):
    run = RunDir(run)
    assert run.is_done()
    return [load_checkpoint(run.checkpoint(label)) for label in run.cycle_labels()]


@pytest.mark.parametrize("model,method", CASES)
def test_ddp_equals_the_single_process_run(runs, model, method):
    single, ddp = final(runs / f"single-{model}-{method}"), final(runs / f"ddp-{model}-{method}")
    assert len(single) == len(ddp) >= 1
    for a, b in zip(single, ddp):  # every cycle's checkpoint
        assert a.step == b.step
        assert a.masks.keys() == b.masks.keys()
        for name in a.masks:
            assert torch.equal(a.masks[name], b.masks[name]), (a.label, name)
        for name, value in a.state_dict.items():
            torch.testing.assert_close(b.state_dict[name], value, rtol=0, atol=1e-5, msg=f"{a.label} {name}")
        for metric in ("test_loss", "test_accuracy", "train_loss"):
            assert b.metrics[metric] == pytest.approx(a.metrics[metric], rel=1e-5, abs=1e-6)
    # FLOPs count the global batch, and only rank 0 wrote: one row per value in metrics.csv
    meta_single, meta_ddp = read_meta(RunDir(runs / f"single-{model}-{method}")), read_meta(RunDir(runs / f"ddp-{model}-{method}"))
    assert meta_ddp["training_flops"] == meta_single["training_flops"]
    assert meta_ddp["processes"] == 2
    assert len(read_metrics(RunDir(runs / f"ddp-{model}-{method}"))) == len(read_metrics(RunDir(runs / f"single-{model}-{method}")))


def test_a_stop_on_one_rank_stops_both_and_the_resumed_run_equals_the_uninterrupted_one(runs):
    resumed, whole = final(runs / "stopped"), final(runs / "ddp-mlp-pai-cyclic")
    for rank in (0, 1):  # both ranks stopped at rank 1's request, step 16, with the state saved
        stops = json.loads((runs / f"jobs.json.stops.rank{rank}").read_text())
        assert len(stops) == 1 and "stopped at cycle 1, epoch 0, step 16; resume state saved" in stops[0]
    for a, b in zip(whole, resumed):
        for name in a.masks:
            assert torch.equal(a.masks[name], b.masks[name])
        for name, value in a.state_dict.items():
            assert torch.equal(b.state_dict[name], value), name  # bitwise: same processes, same order
    rows = read_metrics(RunDir(runs / "stopped"))
    assert len(rows) == len(read_metrics(RunDir(runs / "ddp-mlp-pai-cyclic")))  # the stop left no duplicate rows


def test_nproc_launches_torchrun_and_sigterm_saves_the_state_for_a_resume_with_one_process(tmp_path):
    """`landscape train --nproc 2`, SIGTERM to the launcher mid-run: every rank stops, the
    resume state is saved, exit 1; a single process finishes it, ending where an uninterrupted
    single-process run ends (no BatchNorm: the same arithmetic to float tolerance)."""
    flags = ["--data", "synthetic", "--model", "mlp", "--batch-size", "32", "--lr", "0.05", "--method", "pai-cyclic",
             "--pruner", "random", "--sparsity", "0.5", "--cycles", "1", "--epochs", "100", "--device", "cpu"]
    run = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "cli", "train", "--nproc", "2", *flags, "--out", str(run)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (run / "metrics.csv").exists() or len(read_metrics(RunDir(run))) < 16:
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[1][-2000:]
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    stdout, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 1, stderr[-2000:]
    assert "resume state saved" in stderr and stdout == ""
    assert read_meta(RunDir(run))["status"] == "interrupted"
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr
    run_cli("train", "--resume", str(run), "--device", "cpu")
    run_cli("train", *flags, "--out", str(tmp_path / "whole"))
    resumed, whole = final(run)[-1], final(tmp_path / "whole")[-1]
    for name, value in whole.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[name], value, rtol=0, atol=1e-5)
    assert read_meta(RunDir(run))["processes"] == 1


def test_refusals_under_torchrun_are_one_line_from_rank_0(tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    result = subprocess.run([sys.executable, "-m", "cli", "train", "--nproc", "2", "--data", "synthetic", "--model",
                             "mlp", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "taken")],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [f"error: {tmp_path / 'taken'} exists and is not an empty directory or a run; choose another --out"]
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: a command that does not split its work refuses
    result = run_cli("signs", str(tmp_path), expect=2)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        "error: `landscape signs` does not run under torchrun (only train, barrier, connectivity, sharpness do); "
        "run it as one process")


def test_a_batch_that_cannot_give_every_rank_its_samples_is_refused():
    """256 samples in batches of 127: the last batch holds 2, one per rank of 2, which an MLP
    can train on and BatchNorm cannot (it needs two samples per rank)."""
    from sparse_training.data import load_data
    from sparse_training.distributed import Group
    from sparse_training.errors import UserError
    from sparse_training.models import build_model, model_config_for
    from sparse_training.run.session import _check_batch_split

    data = load_data(Config.from_dict(BASE).data)
    two_ranks = Group(rank=0, world=2)  # only its size is read: no process group needed
    for model, refused in (("mlp", False), ("resnet1d", True)):
        config = Config.from_dict({**BASE, "model": {"name": model}, "optim": {"batch_size": 127}})
        built = build_model(model_config_for(model, {}, data.num_classes, data.input_shape))
        if refused:
            with pytest.raises(UserError, match="smallest training batch \\(2 samples.*2 processes 2 sample"):
                _check_batch_split(data, config, built, two_ranks)
        else:
            _check_batch_split(data, config, built, two_ranks)

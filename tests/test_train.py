"""`landscape train` end to end: the run directory contract, resume == uninterrupted
(bitwise), re-running a finished run, and every bad input as a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import run_cli, train_tiny
from sparse_training.checkpoint import load_checkpoint
from sparse_training.records import read_metrics
from sparse_training.rundir import RunDir
from sparse_training.config import Config
from sparse_training.procedures import StopFlag, UserInterrupted, train_run

TINY = {"data": {"name": "synthetic"}, "model": {"name": "resnet1d", "kwargs": {"width": 8}},
        "optim": {"batch_size": 64, "lr": 0.05},
        "run": {"method": "pai-cyclic", "cycles": 2, "epochs": 2, "device": "cpu"},
        "prune": {"pruner": "snip", "sparsity": 0.7}}


def test_run_directory_contract(tiny_run):
    run = RunDir(tiny_run)
    assert run.is_done() and run.config.exists() and run.meta.exists() and run.metrics.exists()
    assert run.checkpoint_labels() == ["init", "cycle_000", "cycle_001", "cycle_002"]
    config = json.loads(run.config.read_text())
    assert config["run"]["method"] == "pai-cyclic" and config["model"]["kwargs"]["num_classes"] == 10
    assert json.loads(run.meta.read_text())["status"] == "done"
    for label in run.checkpoint_labels():
        raw = torch.load(run.checkpoint(label), weights_only=True)  # only tensors and plain values
        assert {"state_dict", "masks", "model", "data", "cycle", "epoch", "step", "sparsity", "metrics"} <= set(raw)
    final = load_checkpoint(run.checkpoint("cycle_002"))
    assert final.sparsity == pytest.approx(0.5, abs=1e-3) and final.cycle == 2 and final.epoch == 2
    for name, mask in final.masks.items():  # pruned weights are stored as exact zeros
        assert torch.count_nonzero(final.state_dict[name][~mask]) == 0
    rows = read_metrics(run)
    assert {(r["split"], r["metric"]) for r in rows} >= {("train", "loss"), ("test", "accuracy"), ("train", "lr"), ("train", "sparsity")}
    assert sorted({(r["cycle"], r["epoch"]) for r in rows}) == [(c, e) for c in range(3) for e in range(3)]
    model = final.build_model()
    assert model.training is False


class StopAfter(StopFlag):
    """Requests a stop at the n-th check (after the n-th optimizer step)."""

    def __init__(self, n: int):
        super().__init__()
        self.remaining = n

    def __bool__(self) -> bool:
        self.remaining -= 1
        if self.remaining == 0:
            self.signal_name = "SIGTERM"
        return self.signal_name is not None


def _tensors(path):
    return load_checkpoint(path).state_dict


@pytest.mark.parametrize("stop_at", [3, 4, 9])  # mid-epoch, at an epoch's last step, in the second cycle
def test_resume_equals_uninterrupted_bitwise(tmp_path, stop_at):
    config = Config.from_dict(TINY)
    quiet = lambda message: None  # noqa: E731
    train_run(config, tmp_path / "straight", log=quiet)
    with pytest.raises(UserInterrupted, match="resume"):
        train_run(config, tmp_path / "resumed", log=quiet, stop=StopAfter(stop_at))
    assert not RunDir(tmp_path / "resumed").is_done()
    train_run(config, tmp_path / "resumed", resume=True, log=quiet)
    a, b = RunDir(tmp_path / "straight"), RunDir(tmp_path / "resumed")
    assert a.checkpoint_labels() == b.checkpoint_labels()
    for label in a.checkpoint_labels():
        ta, tb = _tensors(a.checkpoint(label)), _tensors(b.checkpoint(label))
        assert all(torch.equal(ta[k], tb[k]) for k in ta), label
    assert a.metrics.read_text() == b.metrics.read_text()


def test_rerunning_a_finished_run_does_nothing(tiny_run):
    before = {p: p.stat().st_mtime_ns for p in RunDir(tiny_run).checkpoints.iterdir()}
    result = run_cli("train", "--resume", str(tiny_run), "--json")
    assert json.loads(result.stdout)["status"] == "already complete"
    assert before == {p: p.stat().st_mtime_ns for p in RunDir(tiny_run).checkpoints.iterdir()}


def test_same_command_on_a_finished_run_says_so(tmp_path):
    out = train_tiny(tmp_path / "dense", "--method", "dense")
    again = train_tiny(out, "--method", "dense")
    assert again == out
    result = run_cli("train", "--data", "synthetic", "--model", "resnet1d", "--model-kwargs", '{"width": 8}', "--epochs", "2",
                     "--batch-size", "64", "--lr", "0.05", "--device", "cpu", "--out", str(out), "--method", "dense")
    assert "already complete" in result.stdout


def _bad(tmp_path, *args):
    out = tmp_path / "bad"
    result = run_cli("train", "--out", str(out), "--epochs", "1", "--device", "cpu", *args, expect=None)
    assert not out.exists(), "nothing may be written for bad input"
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize("args, message", [
    (("--model", "resnet9000", "--data", "synthetic"), "unknown model"),
    (("--data", "imagenet22k"), "unknown data"),
    (("--method", "pai", "--pruner", "oracle", "--sparsity", "0.5", "--data", "synthetic"), "unknown pruner"),
    (("--method", "pai", "--sparsity", "1.0", "--data", "synthetic"), "sparsity must be in"),
    (("--method", "pai", "--sparsity", "-0.5", "--data", "synthetic"), "sparsity must be in"),
    (("--data", "cifar10", "--model", "resnet20"), "--data-dir"),
    (("--data", "synthetic", "--model-kwargs", "[1, 2]"), "JSON object"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    result = _bad(tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_npz_missing_keys_is_exit_2(tmp_path):
    path = tmp_path / "arrays.npz"
    np.savez(path, x_train=np.zeros((4, 40), np.float32), y_train=np.zeros(4, np.int64))
    result = _bad(tmp_path, "--data", f"npz:{path}", "--model", "mlp")
    assert result.exit_code == 2 and "x_test" in result.stderr


def test_out_holding_a_different_run_is_exit_2(tiny_dense_run):
    result = run_cli("train", "--out", str(tiny_dense_run), "--data", "synthetic", "--model", "mlp", "--device", "cpu", expect=2)
    assert "different run" in result.stderr


def test_nan_divergence_is_exit_1(tmp_path):
    out = tmp_path / "diverge"
    result = run_cli("train", "--out", str(out), "--data", "synthetic", "--model", "mlp", "--lr", "1e12",
                     "--epochs", "3", "--batch-size", "32", "--device", "cpu", expect=1)
    assert "cycle 0, epoch" in result.stderr and "step" in result.stderr and "Traceback" not in result.output
    assert not RunDir(out).is_done()
    assert json.loads(RunDir(out).meta.read_text())["status"] == "diverged"


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys; from click.testing import CliRunner; from cli.main import cli, COMMANDS;"
            "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0, r.output;"
            "assert 'torch' not in sys.modules and 'xarray' not in sys.modules, 'heavy import at help time';"
            "[CliRunner().invoke(cli, [name, '--help']) for name in COMMANDS];"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_every_command_has_help():
    from cli.main import COMMANDS

    for name in COMMANDS:
        result = run_cli(name, "--help")
        assert "Usage:" in result.stdout, name


def test_python_dash_m_cli_works():
    out = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout

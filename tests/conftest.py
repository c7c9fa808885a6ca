"""Shared fixtures: small finished runs trained once per test session through the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two cores shared by the whole suite: one thread each keeps runs reproducible and fast.
torch.set_num_threads(1)
os.environ.setdefault("SPARSE_LANDSCAPE_CACHE", str(Path(__file__).parent / ".cache"))


def run_cli(*args: str, expect: int | None = 0):
    """Invoke `landscape ARGS` in-process; check the exit code when `expect` is not None."""
    from click.testing import CliRunner

    from cli.main import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def train_tiny(out: Path, *extra: str) -> Path:
    run_cli("train", "--data", "synthetic", "--model", "resnet1d", "--model-kwargs", '{"width": 8}',
            "--epochs", "2", "--batch-size", "64", "--lr", "0.05", "--device", "cpu", "--out", str(out), *extra)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished pai-cyclic run: resnet1d (BatchNorm) at width 8, synthetic data,
    random ERK mask at sparsity 0.5, 3 cycles of 2 epochs."""
    return train_tiny(tmp_path_factory.mktemp("runs") / "pai_cyclic", "--method", "pai-cyclic", "--pruner", "random",
                      "--sparsity", "0.5", "--cycles", "3")


@pytest.fixture(scope="session")
def tiny_dense_run(tmp_path_factory) -> Path:
    """A finished dense run of the same model, 2 cycles of 2 epochs."""
    return train_tiny(tmp_path_factory.mktemp("runs") / "dense", "--method", "dense", "--cycles", "2")


def run_torchrun(*args: str, nproc: int = 2, expect: int | None = 0, timeout: float = 300):
    """`torchrun --standalone --nproc_per_node NPROC -m cli ARGS` as a user runs it (gloo on
    CPU, one thread per process); check the exit code when `expect` is not None."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "cli", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if expect is not None:
        assert result.returncode == expect, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result

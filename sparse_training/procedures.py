"""Procedures: train a config into a run directory, or continue one. Everything that can be
checked is checked before the first file is written; the training itself is a `RunSession`
(sparse_training/run/), driven here under the run's lock, its status kept in meta.json."""

from __future__ import annotations

import platform
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import __version__
from .checkpoint import load_checkpoint
from .config import Config, resolve
from .errors import SparseTrainingError, TrainingDiverged, UserError
from .flops import CONVENTION as FLOPS_CONVENTION
from .io import exclusive_lock, write_bytes_atomic, write_json_atomic
from .records import read_config, read_meta, truncate_metrics, update_meta
from .run.session import RunSession
from .rundir import RunDir
from .trainer import Interrupted, Position


# ---------------------------------------------------------------- stopping on a signal

class StopFlag:
    """Set by SIGTERM/SIGINT (a scheduler's pre-emption, Ctrl-C): the loop finishes its
    current step, saves the resume state and stops."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __bool__(self) -> bool:
        return self.signal_name is not None


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[StopFlag]:
    def handler(signum: int, _frame: Any) -> None:
        flag.signal_name = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- entry point

def _same_run(stored: Config, new: Config) -> bool:
    """Same run: every setting but the device equal; the stored model kwargs were completed
    from the data, so the new ones need only be a subset of them."""
    a, b = stored.to_dict(), new.to_dict()
    for raw in (a, b):
        raw["run"].pop("device")
    kwargs_a, kwargs_b = a["model"].pop("kwargs"), b["model"].pop("kwargs")
    return a == b and all(kwargs_a.get(k) == v for k, v in kwargs_b.items())


def _provenance(config: Config, command: str) -> dict[str, Any]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "package_version": __version__, "torch_version": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "git_sha": sha, "command": command, "device": config.run.device,
        "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "warnings": [],
    }


def prepare(config: Config, out: str | Path, resume: bool) -> tuple[RunDir, Config, bool]:
    """Decide what to do with `out` before anything is written. Returns (run, config, fresh)."""
    run = RunDir(out)
    if resume:
        if not run.exists():
            raise UserError(f"{run.path} holds no run to resume (no config.json); start one with `landscape train --out {run.path}`")
        stored = read_config(run)
        return run, stored.replace("run", device=config.run.device), False
    config = resolve(config)
    if run.exists():
        stored = read_config(run)
        if not _same_run(stored, config):
            raise UserError(f"{run.path} already holds a different run; choose another --out, or --resume {run.path} to continue it")
        return run, stored.replace("run", device=config.run.device), False
    leftovers = set(run.stray_temporaries()) | {run.lock}  # of a run killed before its config.json was written
    if run.path.exists() and (not run.path.is_dir() or any(p not in leftovers for p in run.path.iterdir())):
        raise UserError(f"{run.path} exists and is not an empty directory or a run; choose another --out")
    return run, config, True


def train_run(config: Config, out: str | Path, *, resume: bool = False, command: str = "",
              log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
              progress_factory: Callable[[int, int], Any] | None = None, stop: StopFlag | None = None) -> dict[str, Any]:
    """Train `config` into the run directory `out` (or continue it). Returns a summary dict.
    Everything that can be checked is checked before the first file is written."""
    from .data import load_data

    run, config, fresh = prepare(config, out, resume)
    if run.is_done():
        return {"run": str(run.path), "status": "already complete", **_final_summary(run)}
    data = load_data(config.data, config.run.device)
    stop = stop if stop is not None else StopFlag()
    session = RunSession(run, config, data, config.run.device, log, stop=lambda: bool(stop))
    if fresh:
        session.initialise()
    run.path.mkdir(parents=True, exist_ok=True)
    busy = (f"{run.path} is being trained by another process right now; wait for it to finish, or stop it "
            f"(it saves its resume state on SIGTERM) and then `landscape train --resume {run.path}`")
    with exclusive_lock(run.lock, wait=False, busy=busy):
        return _train_locked(session, fresh, command, log, progress_factory, stop)


def _train_locked(session: RunSession, fresh: bool, command: str, log: Callable[[str], None],
                  progress_factory: Callable[[int, int], Any] | None, stop: StopFlag) -> dict[str, Any]:
    """The part of train_run that writes: only one process at a time holds the run's lock."""
    run, config = session.run, session.config
    for leftover in run.stray_temporaries():  # of writes a killed process never finished
        leftover.unlink(missing_ok=True)
    if fresh:
        write_json_atomic(run.config, config.to_dict())
        write_json_atomic(run.meta, _provenance(config, command))
        position, cycle_started = Position(0, 0, 0, 0), False
        session.save_checkpoint("init", position, None, None)
    elif run.state.exists():
        position, cycle_started = session.load_state()
        truncate_metrics(run, (position.cycle, position.epoch) if cycle_started else (position.cycle - 1, 10**9))
        log(f"resuming {run.path} at cycle {position.cycle}, epoch {position.epoch}, step {position.step}")
    else:  # killed between config.json and the first state: start over inside the same directory
        position, cycle_started = Position(0, 0, 0, 0), False
        truncate_metrics(run, (-1, -1))
        session.initialise()
        session.save_checkpoint("init", position, None, None)
    update_meta(run, status="running", device=config.run.device)
    progress = progress_factory(session.total_steps, position.step) if progress_factory else None
    try:
        session.train(position, cycle_started, progress=progress.update if progress else None)
    except Interrupted as interrupted:
        update_meta(run, status="interrupted")
        raise UserInterrupted(run, interrupted.position, stop.signal_name or "stop") from None
    except TrainingDiverged:
        update_meta(run, status="diverged")
        raise
    finally:
        if progress is not None:
            progress.close()
    update_meta(run, status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), training_flops=session.masks.flops.total,
                training_flops_note=FLOPS_CONVENTION)
    write_bytes_atomic(run.done, b"done\n")
    return {"run": str(run.path), "status": "trained", **_final_summary(run)}


class UserInterrupted(SparseTrainingError):
    """Training stopped on a signal after saving its resume state. Exit code 1: the run is not done."""

    def __init__(self, run: RunDir, position: Position, signal_name: str):
        super().__init__(f"{signal_name}: stopped at cycle {position.cycle}, epoch {position.epoch}, step {position.step}; "
                         f"resume state saved; continue with `landscape train --resume {run.path}`")


def _final_summary(run: RunDir) -> dict[str, Any]:
    labels = run.cycle_labels()
    if not labels:
        return {}
    final = load_checkpoint(run.checkpoint(labels[-1]))
    return {"cycles": len(labels), "final_checkpoint": str(run.checkpoint(labels[-1])), "sparsity": final.sparsity,
            "step": final.step, "training_flops": read_meta(run).get("training_flops"),
            **{k: final.metrics[k] for k in sorted(final.metrics)}}

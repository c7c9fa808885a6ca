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

from . import __version__, distributed
from .checkpoint import load_checkpoint
from .config import Config, resolve
from .errors import SparseTrainingError, TrainingDiverged, UserError
from .flops import CONVENTION as FLOPS_CONVENTION
from .io import exclusive_lock, holder_file, write_bytes_atomic, write_json_atomic
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
    from the data, so the new ones need only be a subset of them, and a setting the new
    config leaves to its default (None) matches what the stored run resolved it to."""
    a, b = _with_precision(stored).to_dict(), new.to_dict()
    for raw in (a, b):
        raw["run"].pop("device")
    kwargs_a, kwargs_b = a["model"].pop("kwargs"), b["model"].pop("kwargs")
    for section, values in b.items():
        if isinstance(values, dict):
            values.update({k: a[section].get(k) for k, v in values.items() if v is None})
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


def prepare(config: Config, run: RunDir, resume: bool, typed_model: str | None = None) -> tuple[Config, bool]:
    """Decide what to do with the run directory, under its lock, before anything is written.
    Returns (config, fresh). What only the command line may say (device, data location,
    download, a model factory to import) comes from `config`, never from a stored file."""
    if resume:
        if not run.exists():
            raise UserError(f"{run.path} holds no run to resume (no config.json); start one with `landscape train --out {run.path}`")
        stored = read_config(run)
        _check_typed_model(run, stored.model.name, typed_model)
        return resolve(_from_command_line(stored, config)), False
    config = resolve(config)
    if run.exists():
        stored = read_config(run)
        if not _same_run(stored, config):
            raise UserError(f"{run.path} already holds a different run; choose another --out, or --resume {run.path} to continue it")
        return resolve(_from_command_line(stored, config)), False
    # Of a run killed before its config.json was written (the lock files are this process's own).
    leftovers = set(run.stray_temporaries()) | {run.lock, holder_file(run.lock)}
    if any(p not in leftovers for p in run.path.iterdir()):
        raise UserError(f"{run.path} exists and is not an empty directory or a run; choose another --out")
    return config, True


def _from_command_line(stored: Config, given: Config) -> Config:
    """The stored run with the settings a file may not choose taken from the command line:
    a file that says `download` or `data_dir` would make training fetch or write where it says."""
    data = given.data
    return (_with_precision(stored).replace("run", device=given.run.device)
            .replace("data", data_dir=data.data_dir, download=data.download))


def _with_precision(stored: Config) -> Config:
    """A run recorded before --precision existed trained in fp32."""
    return stored.replace("run", precision=stored.run.precision or "fp32")


def _check_typed_model(run: RunDir, stored: str, typed: str | None) -> None:
    """A module.path:factory read from config.json is imported only when the user types it."""
    from .models import imports_code

    if typed is not None and typed != stored:
        raise UserError(f"--model {typed} is not the model of {run.path} ({stored}); drop --model or pass --model {stored}")
    if imports_code(stored) and typed is None:
        raise UserError(f"{run.path} uses the model factory {stored}, which is imported only when typed on the command "
                        f"line: add --model {stored} to --resume if you trust it")


def train_run(config: Config, out: str | Path, *, resume: bool = False, command: str = "",
              log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
              progress_factory: Callable[[int, int], Any] | None = None, stop: StopFlag | None = None,
              typed_model: str | None = None, max_parameters: int | None = None) -> dict[str, Any]:
    """Train `config` into the run directory `out` (or continue it). Returns a summary dict.
    The run's lock is taken before anything about the directory is decided, and everything
    that can be checked is checked before the first file is written. On resume, `typed_model`
    is the --model the user typed (the only way a stored module.path:factory is imported).

    Under torchrun rank 0 does all of that and tells the other ranks what it decided (or that
    it refused); they then train beside it, writing nothing."""
    group = distributed.current()
    if group.distributed:
        config = config.replace("run", device=distributed.device_for(config.run.device, group))
    if not group.is_main:
        return _follow(config, RunDir(out), group, log, stop if stop is not None else StopFlag(), max_parameters)
    run, created = _run_directory(out, resume)
    busy = (f"{run.path} is being trained by another process right now; wait for it to finish, or stop it "
            f"(it saves its resume state on SIGTERM) and then `landscape train --resume {run.path}`")
    with exclusive_lock(run.lock, wait=False, busy=busy, record_holder=True):
        try:
            config, fresh, done = group.on_main(lambda: (*prepare(config, run, resume, typed_model), run.is_done()))
            if done:
                return {"run": str(run.path), "status": "already complete", **_final_summary(run)}
            return _train_locked(run, config, fresh, command, log, progress_factory,
                                 stop if stop is not None else StopFlag(), max_parameters, group)
        except BaseException:
            if created and set(run.path.iterdir()) <= {run.lock, holder_file(run.lock)}:  # refused before writing
                _remove_run_directory(run)
            raise


def _follow(config: Config, run: RunDir, group: distributed.Group, log: Callable[[str], None], stop: StopFlag,
            max_parameters: int | None) -> dict[str, Any]:
    """A rank other than 0: train what rank 0 decided, on this rank's device."""
    stored, fresh, done = group.on_main(lambda: None)  # the action runs on rank 0 only
    if done:
        return {"run": str(run.path), "status": "already complete"}
    config = stored.replace("run", device=config.run.device)
    return _train_locked(run, config, fresh, "", log, None, stop, max_parameters, group)


def _remove_run_directory(run: RunDir) -> None:
    """Leave no trace of a new run refused before it wrote anything (the lock is still ours)."""
    holder_file(run.lock).unlink(missing_ok=True)
    run.lock.unlink(missing_ok=True)
    run.path.rmdir()


def _run_directory(out: str | Path, resume: bool) -> tuple[RunDir, bool]:
    """The run directory, created if a new run goes there (its lock file lives inside), and
    whether this call created it."""
    flag = "--resume" if resume else "--out"
    if not str(out).strip():
        raise UserError(f"{flag} needs a directory; got an empty path")
    run = RunDir(out)
    if resume and not run.path.is_dir():
        raise UserError(f"{run.path} holds no run to resume (not a directory); start one with `landscape train --out {run.path}`")
    if run.path.exists() and not run.path.is_dir():
        raise UserError(f"{run.path} exists and is not an empty directory or a run; choose another --out")
    created = not run.path.exists()
    run.path.mkdir(parents=True, exist_ok=True)
    return run, created


def _train_locked(run: RunDir, config: Config, fresh: bool, command: str, log: Callable[[str], None],
                  progress_factory: Callable[[int, int], Any] | None, stop: StopFlag,
                  max_parameters: int | None, group: distributed.Group | None = None) -> dict[str, Any]:
    """The part of train_run that writes: only one process at a time holds the run's lock
    (under torchrun, rank 0; the other ranks train beside it and write nothing)."""
    from .data import load_data

    group = group if group is not None else distributed.Group()
    data = load_data(config.data, config.run.device)
    session = RunSession(run, config, data, config.run.device, log, stop=lambda: bool(stop),
                         max_parameters=max_parameters, group=group)
    if fresh:
        session.initialise()
    if not group.is_main:
        return _train_beside(session, fresh, stop)
    for leftover in run.stray_temporaries():  # of writes a killed process never finished
        leftover.unlink(missing_ok=True)
    if fresh:
        write_json_atomic(run.config, session.config.to_dict())
        write_json_atomic(run.meta, _provenance(session.config, command))
    elif not read_meta(run).get("started"):  # the first meta.json write failed: record the provenance now
        recovered = {**_provenance(session.config, command), "provenance_note": "recorded on resume"}
        write_json_atomic(run.meta, {**recovered, **read_meta(run)})
    try:
        resumed = not fresh and run.state.exists()
        position, cycle_started = _start_position(session, fresh, log)
        _record_processes(run, config.run.device, group.world, log, fresh)
        group.share(resumed)  # the other ranks start where rank 0 starts
        return _train_from(session, position, cycle_started, progress_factory, stop)
    except (UserInterrupted, TrainingDiverged):
        raise
    except Exception as error:
        _record_failure(run, error)
        raise


def _record_processes(run: RunDir, device: str, world: int, log: Callable[[str], None], fresh: bool) -> None:
    """meta.json says how many processes trained the run (a resume may use another number)."""
    before = read_meta(run).get("processes", 1)
    if not fresh and before != world:
        log(f"continuing a run trained by {before} process(es) with {world}: the global batch and the data order "
            "are unchanged")
    update_meta(run, status="running", device=device, processes=world)


def _train_beside(session: RunSession, fresh: bool, stop: StopFlag) -> dict[str, Any]:
    """A rank other than 0 under torchrun: the same steps as rank 0, no file written."""
    run = session.run
    position, cycle_started = Position(0, 0, 0, 0), False
    if session.group.share(None):  # rank 0 resumed (and has read the state this rank reads now)
        position, cycle_started = session.load_state()
    elif not fresh:  # rank 0 started over in a run killed before its first state
        session.initialise()
    try:
        session.train(position, cycle_started)
    except Interrupted as interrupted:
        raise UserInterrupted(run, interrupted.position, stop.signal_name or "stop") from None
    return {"run": str(run.path), "status": "trained"}


def _start_position(session: RunSession, fresh: bool, log: Callable[[str], None]) -> tuple[Position, bool]:
    run = session.run
    if fresh:
        session.save_checkpoint("init", Position(0, 0, 0, 0), None, None)
        return Position(0, 0, 0, 0), False
    if run.state.exists():
        position, cycle_started = session.load_state()
        truncate_metrics(run, (position.cycle, position.epoch) if cycle_started else (position.cycle - 1, 10**9))
        log(f"resuming {run.path} at cycle {position.cycle}, epoch {position.epoch}, step {position.step}")
        return position, cycle_started
    # killed between config.json and the first state: start over inside the same directory
    truncate_metrics(run, (-1, -1))
    session.initialise()
    session.save_checkpoint("init", Position(0, 0, 0, 0), None, None)
    return Position(0, 0, 0, 0), False


def _train_from(session: RunSession, position: Position, cycle_started: bool,
                progress_factory: Callable[[int, int], Any] | None, stop: StopFlag) -> dict[str, Any]:
    run = session.run
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


def _record_failure(run: RunDir, error: Exception) -> None:
    """meta.json says why the run stopped; when that write fails too, the original error is
    still the one reported."""
    lines = str(error).strip().splitlines()
    reason = lines[0] if isinstance(error, SparseTrainingError) and lines else f"{type(error).__name__}: {lines[0] if lines else ''}"
    try:
        update_meta(run, status="failed", error=reason[:300])
    except SparseTrainingError:
        pass


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

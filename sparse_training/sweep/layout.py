"""Every path of a sweep directory, its record (sweep.json) and the state of its runs.

SWEEP/
  sweep.json                  {"spec", "spec_text", "grid", "runs": [{"name", "point"}]}
  configs/<name>.toml         the config each run is trained from (`landscape train --config`)
  runs/<name>/                a run directory (sparse_training/rundir.py)
  runs/<name>/analysis/<analysis>.nc   each analysis of the spec, where the command puts it by default
  .submitit/                  submitit's pickles and logs (<job id>_0_log.err/.out)
  .locks/<name>.lock          held by the job working on the run
  .analysed/<name>/<analysis> written once that analysis of the run has finished"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..rundir import RunDir, StudyDir
from .spec import Spec

STATES = ("not started", "running", "interrupted", "failed", "done")


class SweepDir(StudyDir):
    """A study folder (runs/<name>/ ...) that a sweep made: its record, each run's config, the
    locks of the jobs working on runs, and submitit's folder."""

    @property
    def record(self) -> Path:
        return self.path / "sweep.json"

    @property
    def submitit(self) -> Path:
        return self.path / ".submitit"

    def config(self, name: str) -> Path:
        return self.path / "configs" / f"{name}.toml"

    def analysed(self, name: str, analysis: str) -> Path:
        """The marker a job writes once `analysis` of run `name` has finished: an analysis
        file alone may be partial (analyses write as they go, and a stopped job leaves what
        it had), and rerunning the analysis completes it, reusing what is there."""
        return self.path / ".analysed" / name / analysis

    def analysis_done(self, name: str, analysis: str) -> bool:
        return self.analysed(name, analysis).exists() and self.analysis(name, analysis).exists()

    def lock(self, name: str) -> Path:
        return self.path / ".locks" / f"{name}.lock"

    def analysis(self, name: str, analysis: str) -> Path:
        """Where run `name`'s analysis goes: the run's own analysis folder, as the command's default."""
        return RunDir(self.run(name)).analysis_file(analysis)

    def read_record(self) -> dict[str, Any] | None:
        if not self.record.exists():
            return None
        from ..io import read_json

        return read_json(self.record, "sweep.json")

    def write_record(self, spec: Spec) -> None:
        """Atomically (io.write_bytes_atomic, as write_json_atomic does), keys in grid order:
        the order of `grid` and of each `point` is the sweep's (write_json_atomic sorts keys)."""
        from ..io import write_bytes_atomic

        write_bytes_atomic(self.record, (json.dumps(record(spec), indent=2) + "\n").encode())


def record(spec: Spec) -> dict[str, Any]:
    return {"spec": spec.raw, "spec_text": spec.text, "grid": spec.grid,
            "runs": [{"name": run.name, "point": run.point} for run in spec.runs]}


def check_out(path: Path) -> None:
    """SWEEP is a new or empty directory, or a sweep."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory; choose another --out")
    if path.is_dir() and not (path / "sweep.json").exists() and any(path.iterdir()):
        raise UserError(f"{path} is neither empty nor a sweep (no sweep.json); choose another --out")


# ---------------------------------------------------------------- run states

def run_state(sweep: SweepDir, name: str) -> dict[str, Any]:
    """One run's state (one of STATES), how far it got (cycle, epoch, step of the last
    metrics row) and, when done, its final test accuracy. Reads files only."""
    from ..records import read_meta, read_metrics

    run = RunDir(sweep.run(name))
    entry: dict[str, Any] = {"name": name, "run": str(run.path), "state": "not started", "cycle": None,
                             "epoch": None, "step": None, "test_accuracy": None, "error": None,
                             "analyses": [p.stem for p in run.analysis_files() if sweep.analysis_done(name, p.stem)]}
    if not run.exists():
        entry["state"] = "running" if _held(sweep.lock(name)) else "not started"
        return entry
    try:
        meta = read_meta(run)
    except UserError as error:
        return {**entry, "state": "failed", "error": str(error)}
    try:
        rows = read_metrics(run)
    except UserError:  # a row being written: how far it got is unknown for now
        rows = []
    if rows:
        last = max(rows, key=lambda r: (r["step"], r["cycle"], r["epoch"]))
        entry.update(cycle=last["cycle"], epoch=last["epoch"], step=last["step"])
    status = meta.get("status")
    if run.is_done():
        entry["state"] = "done"
        final = [r for r in rows if r["split"] == "test" and r["metric"] == "accuracy"]
        entry["test_accuracy"] = max(final, key=lambda r: r["step"])["value"] if final else None
    elif _held(sweep.lock(name)) or (status == "running" and _live_holder(run.lock)):
        entry["state"] = "running"
    elif status in ("failed", "diverged"):
        entry.update(state="failed", error=meta.get("error") or status)
    else:  # interrupted, or "running" written by a process that is gone
        entry["state"] = "interrupted"
    return entry


def _held(lock: Path) -> bool:
    """Whether a sweep job holds `lock` now (a kernel lock: a dead job holds nothing)."""
    if not lock.exists():
        return False
    from filelock import FileLock, Timeout

    probe = FileLock(lock, timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    except OSError:
        return False
    probe.release()
    return False


def _live_holder(lock: Path) -> bool:
    """Whether the process recorded as training the run (`landscape train` outside a sweep job)
    is alive on this machine."""
    try:
        pid = int((lock.parent / f"{lock.name}.pid").read_text().strip())
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return True


def status(sweep: SweepDir) -> dict[str, Any]:
    stored = sweep.read_record()
    if stored is None:
        raise UserError(f"{sweep.path} is not a sweep (no sweep.json); run `landscape sweep SPEC --out {sweep.path}` "
                        "first")
    runs = [run_state(sweep, entry["name"]) | {"point": entry["point"]} for entry in stored.get("runs", [])]
    counts = {state: sum(r["state"] == state for r in runs) for state in STATES}
    return {"sweep": str(sweep.path), "runs": runs, "counts": counts}


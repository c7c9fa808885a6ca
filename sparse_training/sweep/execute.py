"""Running a sweep: what is left to do, one submitit job per run (local: at most `parallel`
at once, each pinned to its share of the CPUs and its own GPUs; SLURM: one job array), and
the outcome of every job. A finished run whose analyses are all there starts no job."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..rundir import RunDir
from .jobs import STOP_WAIT_S, RunJob, analysis_command, train_command
from .layout import SweepDir
from .spec import PlannedRun, Spec, to_toml

EXECUTORS = ("local", "slurm")
ANALYSES_WITH_DEVICE = ("connectivity", "sharpness")
LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # the local executor's time limit: none, in effect, unless --time says so
POLL_S = {"local": 0.25, "slurm": 15.0}


@dataclass(frozen=True)
class Resources:
    executor: str = "local"
    parallel: int = 1                   # local: jobs at once
    device: str = "cpu"                 # what `train --device` gets (local GPUs are remapped to cuda)
    gpus_per_run: int = 0
    cpus_per_run: int | None = None     # slurm: cpus per task; local: os CPUs // parallel
    partition: str | None = None
    time: int | None = None             # minutes
    array_parallelism: int | None = None
    python: str | None = None


def check_resources(res: Resources) -> None:
    if res.executor not in EXECUTORS:
        raise UserError(f"unknown executor {res.executor!r}; choose one of {', '.join(EXECUTORS)}")
    if res.parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {res.parallel}")
    if res.gpus_per_run < 0 or (res.cpus_per_run is not None and res.cpus_per_run < 1):
        raise UserError("--gpus-per-run must be >= 0 and --cpus-per-run >= 1")
    if res.device.startswith("cuda") and res.gpus_per_run < 1:
        raise UserError(f"--device {res.device} needs --gpus-per-run 1 or more")
    if not res.device.startswith("cuda") and res.gpus_per_run > 0:
        raise UserError(f"--gpus-per-run {res.gpus_per_run} needs a CUDA --device; drop it for --device {res.device}")
    if ":" in res.device and res.gpus_per_run > 1:
        raise UserError(f"--device {res.device} names one GPU; use --device cuda with --gpus-per-run "
                        f"{res.gpus_per_run}")
    if res.executor == "local":
        given = [flag for flag, value in (("--partition", res.partition), ("--slurm-array-parallelism",
                                          res.array_parallelism)) if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} belong(s) to --executor slurm; add it or drop them")
        if res.device.startswith("cuda") and res.gpus_per_run > len(visible_gpus()):
            raise UserError(f"--gpus-per-run {res.gpus_per_run} but this machine shows {len(visible_gpus())} GPU(s)")
    if res.time is not None and res.time < 1:
        raise UserError(f"--time is in minutes and must be at least 1, got {res.time}")


# ---------------------------------------------------------------- what is left to do

def prepare(spec: Spec, sweep: SweepDir) -> None:
    """Write sweep.json and every run's config file (the runs' own directories are written
    by training)."""
    from ..io import write_bytes_atomic

    sweep.write_record(spec)
    sweep.lock("x").parent.mkdir(exist_ok=True)
    for run in spec.runs:
        text = to_toml(run.config).encode()
        path = sweep.config(run.name)
        if not path.exists() or path.read_bytes() != text:
            write_bytes_atomic(path, text)


def todo(spec: Spec, sweep: SweepDir) -> tuple[list[PlannedRun], list[PlannedRun]]:
    """(runs that need a job, runs finished with every analysis there)."""
    left, finished = [], []
    for run in spec.runs:
        done = RunDir(sweep.run(run.name)).is_done()
        analyses = all(sweep.analysis_done(run.name, a) for a in spec.analyses)
        (finished if done and analyses else left).append(run)
    return left, finished


def make_job(spec: Spec, sweep: SweepDir, run: PlannedRun, res: Resources, env: dict[str, str],
             device: str) -> RunJob:
    path = sweep.run(run.name)
    train = train_command(sweep.config(run.name).absolute(), path.absolute(), device, max(1, res.gpus_per_run),
                          res.python)
    analyses = []
    for name, args in spec.analyses.items():
        out = sweep.analysis(run.name, name).absolute()
        command = analysis_command(name, path.absolute(), args, out,
                                   device if name in ANALYSES_WITH_DEVICE else None, res.python)
        analyses.append((name, command, str(out), str(sweep.analysed(run.name, name).absolute())))
    return RunJob(run.name, str(path.absolute()), train, analyses, env, str(sweep.lock(run.name).absolute()))


# ---------------------------------------------------------------- pinning

def visible_gpus() -> list[str]:
    """This process's GPUs, as CUDA_VISIBLE_DEVICES names them (or their indices)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_slot(res: Resources, slot: int) -> tuple[dict[str, str], str]:
    """(environment, device) of the job in `slot` (0 .. parallel-1): its share of the CPUs and
    its own GPU(s), which it sees as cuda (cuda:0 ...)."""
    processes = max(1, res.gpus_per_run)
    threads = str(max(1, cpu_count() // res.parallel // processes))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if not res.device.startswith("cuda"):
        return env | {"CUDA_VISIBLE_DEVICES": ""}, res.device
    gpus = visible_gpus()
    if ":" in res.device:
        index = int(res.device.split(":")[1])
        mine = [gpus[index]]
    else:
        mine = [gpus[(slot * res.gpus_per_run + k) % len(gpus)] for k in range(res.gpus_per_run)]
    return env | {"CUDA_VISIBLE_DEVICES": ",".join(mine)}, "cuda"


def slurm_env(res: Resources) -> dict[str, str]:
    if res.cpus_per_run is None:
        return {}
    threads = str(max(1, res.cpus_per_run // max(1, res.gpus_per_run)))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


# ---------------------------------------------------------------- executors

def local_executor(folder: Path, res: Resources):
    import submitit

    executor = submitit.LocalExecutor(folder=folder)
    # at the limit, the job is signalled this long before the end: its training saves its state, it is requeued
    delay = STOP_WAIT_S + 30 if res.time is None else min(STOP_WAIT_S + 30, max(10, res.time * 60 // 4))
    executor.update_parameters(timeout_min=res.time or LOCAL_TIMEOUT_MIN, signal_delay_s=delay)
    return executor


def slurm_parameters(res: Resources) -> dict[str, Any]:
    """SlurmExecutor parameters: one task per job, requeued on pre-emption or time-out (submitit
    signals the job `signal_delay_s` before the end; its checkpoint stops training and requeues)."""
    params: dict[str, Any] = {"job_name": "sweep", "nodes": 1, "ntasks_per_node": 1, "time": res.time or 60 * 24,
                              "signal_delay_s": STOP_WAIT_S + 60, "additional_parameters": {"requeue": True}}
    if res.partition:
        params["partition"] = res.partition
    if res.gpus_per_run:
        params["gpus_per_node"] = res.gpus_per_run
    if res.cpus_per_run:
        params["cpus_per_task"] = res.cpus_per_run
    if res.array_parallelism:
        params["array_parallelism"] = res.array_parallelism
    return params


def slurm_executor(folder: Path, res: Resources, max_requeues: int = 3):
    from submitit import SlurmExecutor

    try:
        executor = SlurmExecutor(folder=folder, max_num_timeout=max_requeues, python=res.python)
    except RuntimeError:
        raise UserError("--executor slurm needs SLURM (no `srun` on PATH); run the sweep on the cluster's login "
                        "node, or use --executor local") from None
    executor.update_parameters(**slurm_parameters(res))
    return executor


def sbatch_preview(folder: Path, res: Resources) -> str:
    """The sbatch script of one job, as `sbatch_text` gives it where SLURM is installed, else as
    submitit's own renderer writes it from the same parameters (nothing is submitted)."""
    import shlex
    import shutil
    import sys

    if shutil.which("srun"):
        return sbatch_text(slurm_executor(folder, res))
    from submitit.slurm.slurm import _make_sbatch_string

    python = shlex.quote(res.python or sys.executable)
    return _make_sbatch_string(command=f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}",
                               folder=folder, **slurm_parameters(res))


def sbatch_text(executor) -> str:
    """The sbatch script submitit would submit for one job of `executor` (nothing is submitted)."""
    return executor._make_submission_file_text(executor._submitit_command_str, "preview")


# ---------------------------------------------------------------- running

def dry_run(spec: Spec, sweep: SweepDir, res: Resources) -> dict[str, Any]:
    """What a sweep would run (each job's commands and environment; for SLURM, the sbatch
    script), writing nothing."""
    left, finished = todo(spec, sweep)
    jobs = []
    for i, run in enumerate(left):
        env, device = local_slot(res, i % res.parallel) if res.executor == "local" else (slurm_env(res), res.device)
        job = make_job(spec, sweep, run, res, env, device)
        jobs.append({"name": run.name, "point": run.point, "env": env, "train": job.train,
                     "analyses": [command for _, command, _, _ in job.analyses]})
    result = {"sweep": str(sweep.path), "runs": len(spec.runs), "to_run": jobs, "skipped": [r.name for r in finished]}
    if res.executor == "slurm":
        result["sbatch"] = sbatch_preview(sweep.submitit.absolute(), res)
    return result


def run_sweep(spec: Spec, sweep: SweepDir, res: Resources, log: Callable[[str], None]) -> dict[str, Any]:
    """Run every run that is not finished (and its missing analyses). A failed run does not
    stop the others. Returns the summary."""
    left, finished = todo(spec, sweep)
    for run in finished:
        log(f"{run.name}: done already, skipped")
    outcomes = (_run_local if res.executor == "local" else _run_slurm)(spec, sweep, res, left, log) if left else []
    failed = [o for o in outcomes if o["status"] != "done"]
    return {"sweep": str(sweep.path), "runs": len(spec.runs), "done": len(outcomes) - len(failed),
            "skipped": len(finished), "failed": len(failed), "jobs": len(outcomes),
            "failed_runs": [{"name": o["name"], "error": o.get("error"), "log": o.get("log")} for o in failed],
            "results": outcomes}


def _run_local(spec: Spec, sweep: SweepDir, res: Resources, left: list[PlannedRun], log) -> list[dict[str, Any]]:
    executor = local_executor(sweep.submitit, res)
    pending, active, free, outcomes = list(left), {}, list(range(res.parallel)), []
    try:
        with _sigterm_as_interrupt():
            while pending or active:
                while pending and free:
                    slot, run = free.pop(0), pending.pop(0)
                    env, device = local_slot(res, slot)
                    job = executor.submit(make_job(spec, sweep, run, res, env, device))
                    log(f"{run.name}: started (job {job.job_id}, log {job.paths.stderr})")
                    active[job] = (run, slot)
                time.sleep(POLL_S["local"])
                for job in [j for j in active if j.done()]:
                    run, slot = active.pop(job)
                    free.append(slot)
                    outcomes.append(_outcome(job, run, log))
    except KeyboardInterrupt:
        for job in active:
            job.cancel(check=False)
        log(f"interrupted: {len(active)} run(s) stopped (training saves its resume state); rerun the same command "
            "to continue")
        raise
    return outcomes


def _run_slurm(spec: Spec, sweep: SweepDir, res: Resources, left: list[PlannedRun], log) -> list[dict[str, Any]]:
    executor = slurm_executor(sweep.submitit, res)
    env = slurm_env(res)
    with executor.batch():
        jobs = [executor.submit(make_job(spec, sweep, run, res, env, res.device)) for run in left]
    for job, run in zip(jobs, left):
        log(f"{run.name}: submitted (job {job.job_id}, log {job.paths.stderr})")
    active, outcomes = dict(zip(jobs, left)), []
    try:
        while active:
            time.sleep(POLL_S["slurm"])
            for job in [j for j in active if j.done()]:
                outcomes.append(_outcome(job, active.pop(job), log))
    except KeyboardInterrupt:
        log(f"stopped waiting; {len(active)} job(s) keep running on the cluster (`landscape sweep --out {sweep.path} "
            f"--status` shows them; scancel {' '.join(sorted({str(j.job_id).split('_')[0] for j in active}))} stops "
            "them, and their runs save their resume state)")
        raise
    return outcomes


def _outcome(job, run: PlannedRun, log) -> dict[str, Any]:
    log_file = str(job.paths.stderr)
    try:
        result = job.result()
    except Exception as error:  # noqa: BLE001 - a job that died is one failed run, not the sweep's end
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        result = {"name": run.name, "status": "failed", "error": (lines[-1] if lines else type(error).__name__)[:300]}
    result = {**result, "job": str(job.job_id), "log": log_file}
    if result["status"] == "done":
        log(f"{run.name}: done")
    else:
        log(f"{run.name}: FAILED: {result.get('error')} (log: {log_file})")
    return result


class _sigterm_as_interrupt:
    """SIGTERM to the sweep stops it like Ctrl-C: its jobs are cancelled, their runs save state."""

    def __enter__(self):
        def handler(_signum, _frame):
            raise KeyboardInterrupt

        try:
            self.previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False

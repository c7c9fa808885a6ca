"""One sweep job: train one run (or continue it) and run its analyses, each as a `landscape`
subprocess. A submitit job pickles this callable; on pre-emption or time-out submitit calls
`checkpoint`, which stops the training process with SIGTERM (it saves its resume state) and
resubmits the same job, which continues the run: `landscape train --out RUN` on a run with
the same config continues it, and says "already complete" when it is done."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..rundir import RunDir

STOP_WAIT_S = 120  # how long a stopped child gets to save its resume state (SLURM signals 180 s before the end)
LOCK_WAIT_S = 10


def train_command(config: str | Path, run: str | Path, device: str, gpus: int = 1,
                  python: str | None = None) -> list[str]:
    """`python -P -m cli train --config CONFIG --out RUN --device DEVICE`, under torchrun when a
    run spans several GPUs. -P: the working directory is not searched, so a `cli` module there
    never stands in for the installed one."""
    python = python or sys.executable
    args = [python, "-P", "-m", "cli", "train", "--config", str(config), "--out", str(run), "--device", device]
    if gpus > 1:
        return [python, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                "--no-python", *args]
    return args


def analysis_command(name: str, run: str | Path, args: list[str], out: str | Path, device: str | None,
                     python: str | None = None) -> list[str]:
    """`python -P -m cli NAME RUN ARGS --out OUT [--device DEVICE]`."""
    command = [python or sys.executable, "-P", "-m", "cli", name, str(run), *args, "--out", str(out)]
    return command + (["--device", device] if device is not None else [])


class RunJob:
    """The callable a submitit job runs. `analyses` is [(name, command, output file, marker
    written when it finished)]; `env`
    holds the variables the job's processes get (threads, visible GPUs)."""

    def __init__(self, name: str, run: str, train: list[str], analyses: list[tuple[str, list[str], str, str]],
                 env: dict[str, str], lock: str):
        self.name, self.run, self.train, self.analyses, self.env, self.lock = name, run, train, analyses, env, lock
        self._child: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_child"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._child = None

    def __call__(self) -> dict[str, Any]:
        from filelock import FileLock, Timeout

        lock = FileLock(self.lock, timeout=LOCK_WAIT_S)
        try:
            lock.acquire()
        except Timeout:
            return self._result("failed", error=f"{self.run} is being run by another sweep job right now")
        try:
            return self._run()
        finally:
            lock.release()

    def _run(self) -> dict[str, Any]:
        trained = "already complete"
        if not RunDir(self.run).is_done():
            code, last = self._subprocess(self.train)
            if code != 0:
                return self._result("failed", error=f"training exited with {code}: {last}")
            trained = "trained"
        computed, skipped, errors = [], [], []
        for name, command, out, marker in self.analyses:
            if Path(out).exists() and Path(marker).exists():
                skipped.append(name)
                continue
            # A file without its marker is what a stopped job left: the analysis reuses what it holds.
            code, last = self._subprocess(command)
            if code != 0:
                errors.append(f"{name} exited with {code}: {last}")
            else:
                Path(marker).parent.mkdir(parents=True, exist_ok=True)
                Path(marker).touch()
                computed.append(name)
        return self._result("failed" if errors else "done", training=trained, analyses_computed=computed,
                            analyses_skipped=skipped, error="; ".join(errors) or None)

    def _result(self, status: str, **more: Any) -> dict[str, Any]:
        return {"name": self.name, "run": self.run, "status": status, **more}

    def _subprocess(self, command: list[str]) -> tuple[int, str]:
        """Run `command` (its stdout to the job's stdout, its stderr to the job's stderr);
        return its exit code and the last line it wrote to stderr."""
        print(f"[sweep] {shlex.join(command)}", file=sys.stderr, flush=True)
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        sys.stdout.flush()
        child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True,
                                 errors="replace", preexec_fn=_child_setup)
        self._child = child
        last = [""]
        reader = threading.Thread(target=_forward, args=(child.stderr, last), daemon=True)
        reader.start()
        try:
            code = child.wait()
        except BaseException:  # the job itself is stopped (Ctrl-C, cancel): let training save its state
            self._stop_child()
            raise
        finally:
            reader.join(timeout=5)
            self._child = None
        return code, last[0]

    def _stop_child(self) -> None:
        """SIGTERM to the child, then wait (STOP_WAIT_S at most) for it to exit, without
        reaping it: this runs inside submitit's signal handler while `_subprocess` is in
        `child.wait()`, which holds the Popen's wait lock (a second wait would spin until its
        timeout) and reaps the child once the handler returns."""
        child = self._child
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)
        if not _wait_exited(child, STOP_WAIT_S):
            child.kill()
            _wait_exited(child, 10)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Pre-emption or time-out (submitit's signal): stop training, which saves its resume
        state on SIGTERM, and requeue this job, which continues the run."""
        from submitit.helpers import DelayedSubmission

        print(f"[sweep] {self.name}: pre-empted or timed out; stopping training and requeueing", file=sys.stderr,
              flush=True)
        self._stop_child()
        return DelayedSubmission(RunJob(self.name, self.run, self.train, self.analyses, self.env, self.lock))


def _wait_exited(child: subprocess.Popen, timeout: float) -> bool:
    """Whether `child` exited within `timeout` seconds; it is left for its Popen to reap."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # reaped already
            return True
        except AttributeError:  # no waitid (not Linux): Popen's own poll
            if child.poll() is not None:
                return True
        time.sleep(0.05)
    return False


def _forward(stream, last: list[str]) -> None:
    for line in stream:
        sys.stderr.write(line)
        sys.stderr.flush()
        if line.strip():
            last[0] = line.strip()


def _child_setup() -> None:
    """In the child, before exec: ignore submitit's pre-emption signal (SLURM sends it to every
    process of the job; the job's `checkpoint` answers it and sends SIGTERM instead), and get
    SIGTERM when the job process dies, so that training never outlives its job unsaved."""
    usr = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG"),
                  signal.SIGUSR2)
    signal.signal(usr, signal.SIG_IGN)
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl() if sys.platform.startswith("linux") else None

"""Run `landscape ...` in a child process that dies at an exact, repeatable point.

A kill point names one library function and which call of it: the child wraps that function
(in the child only: the library has no test-only code path) so that the process sends itself
SIGKILL, which nothing can catch, as a scheduler or the OOM killer would, or SIGTERM/SIGINT,
a pre-emption. Children are forked from a small server process that imported torch and the CLI
once, so a trial costs a fork, not a fresh interpreter."""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

CHILD_TIMEOUT = 120  # seconds; a child still running by then is a hang, reported as a failure
# Imported once by the server and inherited by every child. torch._dynamo is what the first
# optimizer imports: 1.4 s that every child would otherwise pay again.
PRELOAD = ("torch", "torch._dynamo", "h5netcdf", "cli.main", "cli.train", "cli.info", "cli.connectivity", "cli.signs",
           "cli.sharpness", "cli.overlap", "cli.metrics", "landscape.connectivity", "landscape.sharpness", "sparse_training.procedures", "sparse_training.data",
           "sparse_training.pruners")


@dataclass(frozen=True)
class Point:
    """The child dies at the `nth` call of `target` ("module:qualname") whose str/Path
    arguments contain `match`: on entering it (`when="before"`) or once it returned
    ("after"). With `torn`, a Path.write_bytes call writes only that fraction of its bytes
    first, and an append_metrics call leaves its last row cut at that fraction."""

    target: str
    nth: int = 1
    when: str = "before"
    match: str = ""
    sig: int = signal.SIGKILL
    torn: float | None = None


@dataclass
class Outcome:
    exitcode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- in the child

def _texts(args: tuple, kwargs: dict) -> str:
    return " ".join(str(v) for v in (*args, *kwargs.values()) if isinstance(v, (str, Path)))


def _die(sig: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), sig)


def _torn_write_bytes(original: Callable, fraction: float) -> Callable:
    def write(self: Path, data: bytes) -> int:
        return original(self, data[: int(len(data) * fraction)])

    return write


def _torn_append(original: Callable, fraction: float) -> Callable:
    def append(run: Any, rows: list) -> None:
        before = run.metrics.stat().st_size if run.metrics.exists() else 0
        original(run, rows)
        after = run.metrics.stat().st_size
        os.truncate(run.metrics, before + int((after - before) * fraction))

    return append


def _install(point: Point) -> None:
    module_name, _, qualname = point.target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, attribute = qualname.split(".")
    for name in parents:
        owner = getattr(owner, name)
    original = getattr(owner, attribute)
    effect = original
    if point.torn is not None:
        effect = (_torn_write_bytes if attribute == "write_bytes" else _torn_append)(original, point.torn)
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        if point.match and point.match not in _texts(args, kwargs):
            return original(*args, **kwargs)
        calls += 1
        if calls != point.nth:
            return original(*args, **kwargs)
        if point.when == "before" and point.torn is None:
            _die(point.sig)
            return original(*args, **kwargs)
        result = effect(*args, **kwargs)
        _die(point.sig)
        return result

    setattr(owner, attribute, wrapper)


def _child(args: list[str], points: tuple[Point, ...], cwd: str, out: str, err: str) -> None:
    for fd, name in ((1, out), (2, err)):
        handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    os.chdir(cwd)
    import torch

    from cli.main import cli

    torch.set_num_threads(1)
    for point in points:
        _install(point)
    code: Any = 0
    try:
        cli.main(args, prog_name="landscape", standalone_mode=True)
    except SystemExit as exit_:
        code = exit_.code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


# ---------------------------------------------------------------- in the test

class _Server:
    """A Python process with torch and the CLI imported that forks one child per request.
    It runs no torch op and has a single thread, so forking it is safe."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-c", f"import {__name__}; {__name__}.serve()"],
                                        cwd=Path(__file__).parent, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def ask(self, request: dict, timeout: float | None = None) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self.answer(timeout)

    def answer(self, timeout: float | None = None) -> dict:
        """The next reply, or {} when none came within `timeout` seconds."""
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return {}
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the reliability harness server died")
        return json.loads(line)


def serve() -> None:
    """The server loop: {"start": ...} forks a child and answers its pid; {"wait": pid}
    answers its exit code (negative: killed by that signal)."""
    for module in PRELOAD:
        importlib.import_module(module)
    for line in sys.stdin:
        request = json.loads(line)
        if "start" in request:
            pid = os.fork()
            if pid == 0:
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                spec = request["start"]
                _child(spec["args"], tuple(Point(**p) for p in spec["points"]), spec["cwd"], spec["out"], spec["err"])
            reply = {"pid": pid}
        else:
            _, status = os.waitpid(request["wait"], 0)
            reply = {"exitcode": os.waitstatus_to_exitcode(status)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


_server: _Server | None = None


def _the_server() -> _Server:
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = _Server()
    return _server


@dataclass
class Child:
    pid: int
    out: Path
    err: Path


def start(args: list[str], points: tuple[Point, ...] = (), cwd: Path | None = None) -> Child:
    """Start `landscape ARGS` in a child (in `cwd`, where its stdout/stderr files go too)."""
    cwd = Path(cwd or Path.cwd())
    cwd.mkdir(parents=True, exist_ok=True)
    tag = len(list(cwd.glob("child-*.out")))
    out, err = cwd / f"child-{tag}.out", cwd / f"child-{tag}.err"
    out.touch()
    spec = {"args": list(args), "points": [asdict(p) for p in points], "cwd": str(cwd), "out": str(out), "err": str(err)}
    return Child(_the_server().ask({"start": spec})["pid"], out, err)


def finish(child: Child, timeout: float = CHILD_TIMEOUT) -> Outcome:
    """Wait for the child; one still running after `timeout` seconds is a hang: killed, and the test fails."""
    reply = _the_server().ask({"wait": child.pid}, timeout)
    if not reply:
        os.kill(child.pid, signal.SIGKILL)
        _the_server().answer()  # the server's pending wait returns now
        raise AssertionError(f"landscape did not finish within {timeout}s (a hang): {child.err.read_text()[-2000:]}")
    return Outcome(reply["exitcode"], child.out.read_text(), child.err.read_text())


def landscape(args: list[str], points: tuple[Point, ...] = (), cwd: Path | None = None) -> Outcome:
    """Run `landscape ARGS` in a child to its end, or to its kill point."""
    return finish(start(args, points, cwd))


# ---------------------------------------------------------------- what a kill may leave

def assert_every_file_complete(run: Path) -> None:
    """Every file of `run` under its final name is whole: each checkpoint and the resume
    state load, config/meta parse, each analysis dataset opens. Temporaries may be left."""
    from landscape.store import read_dataset
    from sparse_training.checkpoint import load_checkpoint
    from sparse_training.io import torch_load_safe
    from sparse_training.records import read_config, read_meta
    from sparse_training.rundir import RunDir

    run_dir = RunDir(run)
    if run_dir.config.exists():
        read_config(run_dir)
    read_meta(run_dir)
    for checkpoint in sorted(run_dir.checkpoints.glob("*.pt")):
        load_checkpoint(checkpoint)
    if run_dir.state.exists():
        torch_load_safe(run_dir.state, "resume state")
    for dataset in sorted(run_dir.analysis.glob("*.nc")):
        read_dataset(dataset)

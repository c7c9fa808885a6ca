"""What the arguments of an analysis name: runs and checkpoint files, their labels, the run
they all come from, and where the result goes when no --out is given.

A checkpoint argument is a file (ours, or a user's plain state_dict with --model), a run
directory (its final cycle checkpoint) or RUN@LABEL (`runs/a@cycle_002`, `runs/a@rewind`).
Paths come from `sparse_training.rundir` only."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from sparse_training.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoints
from sparse_training.errors import UserError
from sparse_training.records import read_config
from sparse_training.rundir import RunDir, analysis_output, require_label


@dataclass(frozen=True)
class LoadOptions:
    """--model/--model-kwargs/--data, for plain state_dict files and a run's user model
    factory; --data-dir, where evaluated data live (None: $SPARSE_LANDSCAPE_CACHE or the
    default cache)."""

    model: str | None = None
    model_kwargs: dict[str, Any] | None = None
    data: str | None = None
    data_dir: str | None = None
    max_parameters: int | None = None  # --max-parameters (None: the engine's default limit)


class Input(NamedTuple):
    """One checkpoint argument: the run it belongs to (None for a file outside any run) and its file."""

    run: RunDir | None
    path: Path


def load(path: str | Path, options: LoadOptions) -> Checkpoint:
    """A checkpoint for an analysis: real weights only, and data read from where the user
    says, never from where the checkpoint says (a file could name any directory to write a
    cache into, or ask for a download)."""
    ckpt = load_checkpoint(path, model=options.model, model_kwargs=options.model_kwargs, data=options.data,
                           max_parameters=options.max_parameters)
    for tensors in (ckpt.state_dict, ckpt.masks):
        complex_name = next((name for name, value in tensors.items() if value.is_complex()), None)
        if complex_name is not None:
            raise UserError(f"{path} holds complex values in {complex_name}; analyses read real-valued weights only")
    if ckpt.data is not None:
        ckpt.data = replace(ckpt.data, data_dir=options.data_dir, download=False)
    return ckpt


def loader(options: LoadOptions) -> Callable[[Path], Checkpoint]:
    """load(path) -> Checkpoint, remembering the last two (a reference is reused by the next pair)."""
    return functools.lru_cache(maxsize=2)(functools.partial(load, options=options))


def run_dir(arg: str | Path, allow_incomplete: bool, what: str) -> RunDir:
    """A run directory argument; `what` says what the command takes instead."""
    if not Path(arg).is_dir():
        raise UserError(f"{arg} is not a run directory; {what}")
    run = RunDir(arg)
    run.require_done(allow_incomplete)
    return run


def checkpoint_input(arg: str | Path, allow_incomplete: bool) -> Input:
    """FILE, RUN (its final cycle checkpoint) or RUN@LABEL."""
    path, label = Path(arg), None
    if not path.exists() and "@" in str(arg):
        head, label = str(arg).rsplit("@", 1)
        require_label(label)  # before any path is formed from it: a label never leaves the run
        path = Path(head)
        if not path.is_dir():
            raise UserError(f"{head} is not a run directory; RUN@LABEL names a checkpoint of a run (e.g. runs/a@cycle_002)")
    if path.is_dir() and label is None:
        run = RunDir(path)
        run.require_done(allow_incomplete)
        cycles = run.cycle_labels()
        if not cycles:
            raise UserError(f"run {path} has no cycle checkpoint yet; train at least one cycle or name a checkpoint file")
        label = cycles[-1]
    run, paths = resolve_checkpoints(path, [label] if label else None, allow_incomplete)
    return Input(run, paths[0])


def common_run(inputs: Sequence[Input]) -> RunDir | None:
    """The run every input belongs to, or None."""
    runs = {str(one.run.path.resolve()) if one.run is not None else None for one in inputs}
    return inputs[0].run if len(runs) == 1 and None not in runs else None


def unique(candidates: list[str], typed: Sequence[str]) -> list[str]:
    """`candidates` if they are distinct, else the arguments as typed; the same input twice is an error."""
    for names in (candidates, [str(t) for t in typed]):
        if len(set(names)) == len(names):
            return names
    typed = [str(t) for t in typed]
    twice = next(name for name in typed if typed.count(name) > 1)
    raise UserError(f"{twice} is given twice; name each run or checkpoint once")


def checkpoint_labels(inputs: Sequence[Input], typed: Sequence[str]) -> list[str]:
    """Checkpoint labels within one run; RUN_NAME/LABEL across runs."""
    one_run = common_run(inputs) is not None
    return unique([one.path.stem if one_run or one.run is None else f"{one.run.name}/{one.path.stem}"
                   for one in inputs], typed)


def run_names(runs: Sequence[RunDir], typed: Sequence[str]) -> list[str]:
    return unique([run.name for run in runs], typed)


def method_of(run: RunDir | None) -> str:
    return read_config(run).run.method if run is not None else ""


def output(out: str | Path | None, analysis: str, inputs: Sequence[Input], name: str | None = None) -> Path:
    """--out, else RUN/analysis/<name or analysis>.nc when every input comes from one run, else
    beside the first file when none comes from a run; inputs of several runs need --out."""
    if out is not None:
        return Path(out)
    run = common_run(inputs)
    if run is None and any(one.run is not None for one in inputs):
        raise UserError(f"the inputs do not all come from one run; say where the {analysis} dataset goes with "
                        "--out FILE.nc")
    return analysis_output(analysis, run, [one.path for one in inputs], name)

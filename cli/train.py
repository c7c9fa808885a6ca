"""`landscape train`: flags (or a TOML file, which flags override) -> a run directory."""

from __future__ import annotations

import sys

import click

from .options import given, settings_options
from .output import emit, handle_errors, json_option, log, progress_bar, progress_enabled


def train_options(func):
    """One option per setting of every config section (sparse_training/config.py is the one
    place that defines names, types, choices, defaults and help); the command receives each
    as `<section>__<field>`. The device has its own option: it is resolved (cuda if available)."""
    from sparse_training.config import SECTIONS

    for section, cls in reversed(SECTIONS.items()):
        exclude = ("device",) if section == "run" else ()
        func = settings_options(cls, prefix=f"{section}__", exclude=exclude)(func)
    return func


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory to create.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this directory (its config.json is used).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file with [data] [model] [optim] [prune] [run] tables; flags override it.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N. [cuda if available]")
@click.option("--max-parameters", type=click.IntRange(min=1), default=None,
              help="Refuse a model with more parameters than this (its size may come from config.json). [2e9]")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Train with N processes on this machine (DistributedDataParallel; --batch-size stays the global "
                   "batch): the same command under torchrun's launcher. [1]")
@train_options
@json_option
@handle_errors
def train(out, resume_dir, config_file, device, max_parameters, nproc, as_json, **flags):
    """Train a network by one of the methods into a run directory.

    \b
    Example:
      landscape train --method pai-cyclic --pruner snip --sparsity 0.9 --cycles 4 \\
          --epochs 20 --model resnet1d --data mnist1d --out runs/snip90
    """
    from sparse_training.config import SECTIONS, Config, load_toml, merge
    from sparse_training.torchrun import launched_by_torchrun
    from sparse_training.errors import UserError

    if nproc is not None and nproc > 1:
        if launched_by_torchrun():
            raise UserError("--nproc under torchrun: torchrun has started the processes already; drop --nproc")
        _launch(nproc)
    from sparse_training.procedures import StopFlag, stop_on_signals, train_run

    from .output import resolve_device

    if (out is None) == (resume_dir is None):
        raise UserError("give exactly one of --out RUN (a new run) or --resume RUN (continue one)")
    overrides = {section: given(cls, flags, f"{section}__") for section, cls in SECTIONS.items()}
    overrides = {section: values for section, values in overrides.items() if values}
    typed_model = overrides.get("model", {}).get("name")
    if resume_dir is not None and (_beyond_resume(overrides) or config_file):
        raise UserError("--resume takes the run's own config.json; besides --device, --data-dir, --download and "
                        "--max-parameters it accepts only --model (to allow importing the run's model factory)")
    stored = load_toml(config_file) if config_file else {}
    if isinstance(stored.get("data"), dict) and "download" in stored["data"]:
        raise UserError(f"{config_file} says whether to download; only the command line does: drop it and pass --download")
    overrides.setdefault("run", {})["device"] = resolve_device(device)
    config = Config.from_dict(merge(stored, overrides))
    with stop_on_signals(StopFlag()) as stop:
        result = train_run(config, out if resume_dir is None else resume_dir, resume=resume_dir is not None,
                           command=" ".join(["landscape"] + sys.argv[1:]), log=log,
                           progress_factory=_progress_bar if progress_enabled() else None, stop=stop,
                           typed_model=typed_model, max_parameters=max_parameters)
    emit(result, as_json, _summary(result))


def _launch(nproc: int) -> None:
    """This command line, without --nproc, under torchrun's launcher (a standalone rendezvous
    on this machine); exits with rank 0's exit code. A SIGTERM or Ctrl-C reaches every rank,
    which saves the resume state and stops."""
    import logging
    import os

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in list(logging.root.manager.loggerDict):  # the ranks say what went wrong, in one line
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # torchrun would give every rank one thread; share the cores instead, unless told.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # -P: the working directory is not searched, so a `cli` module there never stands in for ours.
    command = [sys.executable, "-P", "-m", "cli", *_without_nproc(sys.argv[1:])]
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", "--no-python", *command]))
    except ChildFailedError as error:
        # rank 0's code, unless torchrun stopped it because another rank ended first
        codes = [error.failures[rank].exitcode for rank in sorted(error.failures)]
        sys.exit(next((code for code in codes if code > 0), 1))
    except SignalException:
        sys.exit(1)
    sys.exit(0)


def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _beyond_resume(overrides: dict) -> bool:
    """Whether flags other than those --resume accepts were given: the command line still
    says where data lives and whether to download, and which model factory may be imported."""
    allowed = {"model": {"name"}, "data": {"data_dir", "download"}}
    return any(set(values) - allowed.get(section, set()) for section, values in overrides.items())


def _progress_bar(total: int, initial: int):
    return progress_bar(total, "training", "step", initial)


def _summary(result: dict) -> str:
    if "test_accuracy" not in result:
        return f"{result['run']}: {result['status']}"
    return (f"{result['run']}: {result['status']}; {result['cycles']} cycle(s), sparsity {result['sparsity']:.4f}, "
            f"test accuracy {result['test_accuracy']:.4f}, test loss {result['test_loss']:.4f}\n"
            f"training FLOPs: {_flops(result.get('training_flops'))}\n"
            f"final checkpoint: {result['final_checkpoint']}")


def _flops(value: int | None) -> str:
    return "not recorded" if value is None else f"{value:.4g} (multiply-adds of all training steps)"

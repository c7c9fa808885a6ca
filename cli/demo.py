"""`landscape demo`: a small study on MNIST-1D on the CPU, end to end.

Trains dense, pai-cyclic (random ERK mask), LRR and SCULPT at one high sparsity; runs
connectivity, sharpness, signs, overlap and metrics on them; draws every figure. Each step is
the `landscape` command a user would type (echoed on stderr), run in this process, so the demo
is also the tutorial. Every step skips what is already there: re-running finishes what is
missing."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from sparse_training.errors import SparseTrainingError

from .output import emit, handle_errors, json_option, log, quiet_enabled, table

MODEL = "resnet1d"  # the MNIST-1D ResNet with BatchNorm: connectivity recomputes its statistics
DATA = "mnist1d"
METHODS = ("dense", "pai-cyclic", "lrr", "sculpt")


@dataclass(frozen=True)
class Study:
    epochs: int  # per cycle
    cycles: int  # dense and pai-cyclic; lrr's cycles follow from lrr_fraction, sculpt has cycles - 1 + the cut
    batch_size: int
    lr: float
    sparsity: float
    lrr_fraction: float  # of the remaining weights pruned per LRR cycle: few levels up to `sparsity`
    sculpt_initial: float
    points: int  # on each interpolation line
    samples: int  # evaluation subset of connectivity, per split (0: all of it)
    hessian_samples: int
    trace: bool
    tol: float
    max_hvp: int
    seeds: int  # seed 0 is analysed; the others only trained, for the spread in the sparsity figure


FULL = Study(epochs=8, cycles=4, batch_size=128, lr=0.1, sparsity=0.9, lrr_fraction=0.55, sculpt_initial=0.5,
             points=11, samples=0, hessian_samples=1024, trace=True, tol=1e-3, max_hvp=40, seeds=2)
QUICK = Study(epochs=1, cycles=2, batch_size=256, lr=0.1, sparsity=0.9, lrr_fraction=0.7, sculpt_initial=0.5,
              points=3, samples=200, hessian_samples=128, trace=False, tol=2e-2, max_hvp=8, seeds=1)


class DemoStepFailed(SparseTrainingError):
    """A step's command failed after printing its one-line error; the demo exits with its code."""

    def __init__(self, args: list[str], exit_code: int):
        super().__init__(f"demo step `landscape {' '.join(args)}` failed (exit {exit_code}); fix that and run the demo again")
        self.exit_code = exit_code


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="landscape-demo", show_default=True,
              help="Folder for everything: runs/<method>, analysis/, figures/.")
@click.option("--quick", is_flag=True, help="A smaller study (under a minute) that checks the whole pipeline.")
@click.option("--device", default="cpu", show_default=True, help="torch device for training and analyses.")
@json_option
@handle_errors
def demo(out: str, quick: bool, device: str, as_json: bool) -> None:
    """A small study on MNIST-1D, analyses and figures included.

    \b
    Trains dense, pai-cyclic (random mask), LRR and SCULPT at 90 % sparsity (resnet1d, two
    seeds), analyses seed 0 (connectivity, sharpness, signs, overlap, metrics), then draws
    every figure. A few minutes on 2 CPU cores (--quick: under one). Progress goes to
    stderr; stdout gets where each result lies. Run it again to finish what is missing.
    """
    started = time.perf_counter()
    _one_thread_unless_asked(device)
    study = QUICK if quick else FULL
    from sparse_training.rundir import StudyDir

    root = StudyDir(out)
    runs = {method: root.run(method) for method in METHODS}  # seed 0: trained and analysed
    seeds = {f"{method}-seed{seed}": (method, seed, root.run(f"{method}-seed{seed}"))
             for seed in range(1, study.seeds) for method in METHODS}
    steps = _steps(study, root, runs, seeds, device)
    for index, (what, args, product) in enumerate(steps, start=1):
        if product is not None and product.exists():
            log(f"[{index}/{len(steps)}] {what}: {product} is already there")
            continue
        log(f"[{index}/{len(steps)}, {time.perf_counter() - started:.0f} s] {what}")
        _invoke(args)
    result = _result(root, {**runs, **{name: path for name, (_, _, path) in seeds.items()}},
                     time.perf_counter() - started)
    emit(result, as_json, _summary(result))


def _one_thread_unless_asked(device: str) -> None:
    """One CPU thread for torch unless OMP_NUM_THREADS says otherwise. The demo's models are
    tiny: a second thread gains little, and on a busy 2-core machine its spin-waiting cost us
    10x (sharpness of one run: 4 s with one thread, 30-50 s with two)."""
    import os

    import torch

    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def _steps(study: Study, root, runs: dict[str, Path], seeds: dict[str, tuple[str, int, Path]],
           device: str) -> list[tuple[str, list[str], Path | None]]:
    """(what, `landscape` arguments, the file whose presence means done or None) in order."""
    from sparse_training.rundir import RunDir

    steps = [(f"train {method}", _train_args(method, 0, study, run, device), None) for method, run in runs.items()]
    steps += [(f"train {name}", _train_args(method, seed, study, run, device), None)
              for name, (method, seed, run) in seeds.items()]
    for method, run in runs.items():
        steps += _analyses(method, run, study, device)
    every_seed = [*map(str, runs.values()), *(str(run) for _, _, run in seeds.values())]
    # Final masks of the three sparse runs, and the lower-sparsity masks they came from.
    masks = [str(runs["pai-cyclic"]), f"{runs['lrr']}@cycle_001", str(runs["lrr"]), f"{runs['sculpt']}@cycle_000",
             str(runs["sculpt"])]
    steps += [
        ("overlap of the sparse runs' masks", ["overlap", *masks, "--out", str(root.analysis_file("overlap"))], None),
        ("metrics of all runs", ["metrics", *every_seed, "--out", str(root.analysis_file("metrics"))], None),
    ]
    for method, run in runs.items():
        for kind in ("connectivity", "sharpness", "signs", "metrics"):
            steps.append((f"{kind} figure of {method}", ["plot", kind, str(run)], RunDir(run).figure_file(kind)))
    analysed = list(map(str, runs.values()))
    combined = [
        ("connectivity", analysed, []), ("sharpness", analysed, []), ("signs", analysed, []),
        ("overlap", [str(root.analysis_file("overlap"))], []), ("metrics", analysed, []),
        ("sparsity", [str(root.analysis_file("metrics"))], []),
        ("sparsity_flops", [str(root.analysis_file("metrics"))], ["--x", "flops"]),
    ]
    for name, inputs, extra in combined:
        target = root.figure_file(name)
        steps.append((f"{name} figure of all runs", ["plot", name.split("_")[0], *inputs, *extra, "--out", str(target)],
                      target))
    return steps


def _analyses(method: str, run: Path, study: Study, device: str) -> list[tuple[str, list[str], None]]:
    subset = ["--samples", str(study.samples)] if study.samples else []
    trace = ["--trace", "--trace-tol", "0.05"] if study.trace else []
    return [
        (f"connectivity of {method}", ["connectivity", str(run), "--points", str(study.points), *subset,
                                       "--device", device], None),
        (f"sharpness of {method}", ["sharpness", str(run), "--samples", str(study.hessian_samples), "--tol",
                                    str(study.tol), "--max-hvp", str(study.max_hvp), *trace, "--device", device], None),
        (f"sign flips of {method} against init", ["signs", str(run), "--reference", "init"], None),
        (f"sign flips of {method} against the previous cycle", ["signs", str(run), "--reference", "previous"], None),
        (f"metrics of {method}", ["metrics", str(run)], None),
    ]


def _train_args(method: str, seed: int, study: Study, run: Path, device: str) -> list[str]:
    args = ["train", "--method", method, "--model", MODEL, "--data", DATA, "--epochs", str(study.epochs),
            "--batch-size", str(study.batch_size), "--lr", str(study.lr), "--seed", str(seed), "--device", device,
            "--out", str(run)]
    if method in ("dense", "pai-cyclic"):
        args += ["--cycles", str(study.cycles)]
    if method == "pai-cyclic":
        args += ["--pruner", "random", "--sparsity", str(study.sparsity)]
    if method == "lrr":
        args += ["--sparsity", str(study.sparsity), "--prune-fraction", str(study.lrr_fraction), "--rewind-epoch", "1"]
    if method == "sculpt":
        args += ["--sparsity", str(study.sparsity), "--initial-sparsity", str(study.sculpt_initial),
                 "--cycles", str(study.cycles - 1)]
    return args


def _invoke(args: list[str]) -> None:
    """`landscape ARGS` in this process; its stdout goes to stderr (the demo's stdout is its
    own result). A failure has printed its one-line error; DemoStepFailed carries the code."""
    from .main import cli

    root = click.get_current_context(silent=True)
    debug = bool(root and isinstance(root.find_root().obj, dict) and root.find_root().obj.get("debug"))
    log("$ landscape " + " ".join(args))
    with contextlib.redirect_stdout(sys.stderr):
        try:
            flags = (["--debug"] if debug else []) + (["--quiet"] if quiet_enabled() else [])
            cli.main(flags + args, prog_name="landscape", standalone_mode=False)
        except click.ClickException as error:
            error.show()
            raise DemoStepFailed(args, error.exit_code) from None
        except SystemExit as stop:
            if stop.code:
                raise DemoStepFailed(args, int(stop.code)) from None


# ---------------------------------------------------------------- the result

def _result(root, runs: dict[str, Path], seconds: float) -> dict[str, Any]:
    """Where everything lies, and each run's final sparsity and test accuracy."""
    from sparse_training.checkpoint import load_checkpoint
    from sparse_training.rundir import RunDir

    summary = {}
    for name, path in runs.items():
        run = RunDir(path)
        final = load_checkpoint(run.checkpoint(run.cycle_labels()[-1]))
        summary[name] = {"path": str(path), "cycles": len(run.cycle_labels()), "sparsity": final.sparsity,
                           "test_accuracy": final.metrics.get("test_accuracy")}
    datasets = [str(p) for p in root.datasets()]
    figures = [str(p) for p in root.figures()]
    return {"out": str(root.path), "seconds": round(seconds, 1), "model": MODEL, "data": DATA, "runs": summary,
            "datasets": datasets, "figures": figures}


def _summary(result: dict[str, Any]) -> str:
    from sparse_training.rundir import RunDir, StudyDir

    minutes, seconds = divmod(int(result["seconds"]), 60)
    rows = [[name, r["cycles"], r["sparsity"], r["test_accuracy"], r["path"]] for name, r in result["runs"].items()]
    root = StudyDir(result["out"])
    combined = [p for p in result["figures"] if root.is_study_figure(p)]
    lines = [
        f"landscape demo: {result['model']} on {result['data']}, finished in {minutes} min {seconds} s",
        table(rows, ["run", "cycles", "sparsity", "test accuracy", "directory"]),
        "",
        f"datasets ({len(result['datasets'])}):", *[f"  {p}" for p in result["datasets"]],
        f"figures of all runs ({len(combined)}):", *[f"  {p}" for p in combined],
        f"figures per analysed run: {RunDir(root.run('<method>')).figures}/*.png "
        f"({len(result['figures']) - len(combined)} in all)",
    ]
    return "\n".join(lines)

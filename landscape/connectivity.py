"""Connectivity: barriers between pairs of checkpoints (a path from landscape.interpolate,
its barriers from landscape.barrier), gathered into one dataset with a `pair` dimension.

Which pairs: two checkpoint files (`landscape barrier`), consecutive cycle checkpoints of a
run (cycle_000..cycle_001, ...), or matching cycle checkpoints of two runs
(runA/cycle_001..runB/cycle_001). `results.update_labels` keeps the file: pairs already there
with the same settings are reused, the others added and written one by one, so an interrupted
computation leaves a complete file with the pairs done so far.

Under torchrun every rank evaluates every point of every pair, each on its shard of the
samples and of the BatchNorm batches (`interpolate.PointEvaluator`), so the curves are those
of one process to float rounding; only rank 0 reads and writes the file (`results`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import xarray as xr

from sparse_training import distributed
from sparse_training.checkpoint import Checkpoint
from sparse_training.errors import UserError
from sparse_training.records import read_config
from sparse_training.rundir import RunDir, analysis_output, run_of_checkpoint

from . import store
from .barrier import with_barriers
from .inputs import LoadOptions, load, run_dir
from .interpolate import PathCurves, check_compatible, evaluate_path, recorded_error, recorded_loss
from .results import AnalysisResult, Progress, merge_along, update_labels
from .settings import DEFAULT_EVAL_BATCH_SIZE, PathSettings, validated

ANALYSIS = "connectivity"
GAP_WARNING = 0.02  # |evaluated - recorded| endpoint error above which the user is warned


@dataclass(frozen=True)
class Pair:
    label: str
    path_a: Path
    path_b: Path


def connectivity(
    inputs: Sequence[str | Path], settings: PathSettings, *, files: bool = False, out: str | Path | None = None,
    overwrite: bool = False, allow_incomplete: bool = False, device: str = "cpu", options: LoadOptions = LoadOptions(),
    progress: Progress | None = None, log: Callable[[str], None] = lambda message: None,
    checkpoints: Sequence[str] | None = None,
) -> AnalysisResult:
    """Barriers between the pairs `inputs` name: with `files`, two checkpoint files (`landscape
    barrier`); else the consecutive cycles of one run (or consecutive entries of the ordered
    label sequence `checkpoints`), or the matching cycles (or `checkpoints`) of two runs.
    The dataset goes to `out`, by default RUN/analysis/barrier_<A>__<B>.nc (<A>__<B>.barrier.nc
    beside files outside any run), RUN/analysis/connectivity.nc or connectivity_<RUN_B>.nc."""
    if files:
        pair = checkpoint_pair(*inputs)
        run = run_of_checkpoint(pair.path_a)
        name = "barrier_" + pair.label.replace("..", "__").replace("/", "-")
        target = analysis_output("barrier", run, [pair.path_a, pair.path_b], name)
        pairs = [pair]
    else:
        runs = [run_dir(path, allow_incomplete, "pass one run directory, or two (matching cycles)") for path in inputs]
        pairs = consecutive_pairs(runs[0], checkpoints) if len(runs) == 1 else matching_pairs(*runs, checkpoints)
        run = runs[0]
        target = analysis_output(ANALYSIS, run, [], ANALYSIS if len(runs) == 1 else f"{ANALYSIS}_{runs[1].path.name}")
    return compute_pairs(pairs, settings, out if out is not None else target, run=run, overwrite=overwrite,
                         device=device, options=options, progress=progress, log=log)


# ---------------------------------------------------------------- which pairs

def _qualifier(path: Path) -> str:
    run = run_of_checkpoint(path)
    return run.path.name if run is not None else path.resolve().parent.name


def checkpoint_pair(path_a: str | Path, path_b: str | Path) -> Pair:
    """Two checkpoint files. Labels are file stems, qualified by the run (or folder) name
    when the two files do not lie in the same folder: 'runA/cycle_001..runB/cycle_001'."""
    a, b = Path(path_a), Path(path_b)
    for path in (a, b):
        if not path.is_file():
            raise UserError(f"{path} is not a checkpoint file" + (" (it is a directory; for a run use "
                            "`landscape connectivity RUN`)" if path.is_dir() else " (it does not exist)"))
    if a.resolve().parent == b.resolve().parent:
        return Pair(f"{a.stem}..{b.stem}", a, b)
    return Pair(f"{_qualifier(a)}/{a.stem}..{_qualifier(b)}/{b.stem}", a, b)


def consecutive_pairs(run: RunDir, labels: Sequence[str] | None = None) -> list[Pair]:
    """Pairs of consecutive cycle checkpoints, or of consecutive entries of `labels`: any
    ordered sequence of the run's checkpoints (the epoch checkpoints of a one-cycle run at
    another run's cycle boundaries, say)."""
    if labels is not None:
        labels = _checked_sequence(run, labels)
        return [Pair(f"{x}..{y}", run.checkpoint(x), run.checkpoint(y)) for x, y in zip(labels, labels[1:])]
    labels = run.cycle_labels()
    if len(labels) < 2:
        raise UserError(f"run {run.path} has {len(labels)} cycle checkpoint(s); consecutive-cycle connectivity "
                        "needs at least two (train with --cycles 2 or more)")
    return [Pair(f"{x}..{y}", run.checkpoint(x), run.checkpoint(y)) for x, y in zip(labels, labels[1:])]


def _checked_sequence(run: RunDir, labels: Sequence[str]) -> list[str]:
    """`labels` as an ordered path through checkpoints `run` holds: at least two."""
    if len(labels) < 2:
        raise UserError(f"--checkpoints names {len(labels)} checkpoint(s); a path needs at least two, in order "
                        "(e.g. --checkpoints cycle_000,cycle_001,cycle_002)")
    return _held(run, labels)


def _held(run: RunDir, labels: Sequence[str]) -> list[str]:
    """`labels` (already through the label grammar), each once, each a checkpoint of `run`."""
    labels = list(labels)
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UserError(f"--checkpoints names {repeated[0]} twice; each checkpoint may appear once")
    missing = [label for label in labels if not run.checkpoint(label).is_file()]
    if missing:
        available = ", ".join(run.checkpoint_labels(include_intermediate=True)) or "none"
        raise UserError(f"run {run.path} has no checkpoint {missing[0]}; it has {available} (train with "
                        "--save-every N for epoch checkpoints)")
    return labels


def matching_pairs(run_a: RunDir, run_b: RunDir, labels: Sequence[str] | None = None) -> list[Pair]:
    """Pairs of the checkpoints both runs hold under the same label: the cycle checkpoints, or `labels`."""
    if run_a.path.resolve() == run_b.path.resolve():
        raise UserError(f"{run_a.path} was given twice; pass one run for consecutive cycles, or two different runs")
    if labels is not None:
        _held(run_a, labels)
        common = _held(run_b, labels)
    else:
        common = [label for label in run_a.cycle_labels() if label in set(run_b.cycle_labels())]
    if not common:
        raise UserError(f"runs {run_a.path} and {run_b.path} have no cycle checkpoint label in common")
    name_a, name_b = run_a.path.name, run_b.path.name
    return [Pair(f"{name_a}/{x}..{name_b}/{x}", run_a.checkpoint(x), run_b.checkpoint(x)) for x in common]


def default_batch_size(run: RunDir | None) -> int:
    """The evaluation batch size the run was trained with, so that endpoints evaluated with
    --bn interpolate reproduce its recorded metrics bit for bit."""
    if run is None or not run.exists():
        return DEFAULT_EVAL_BATCH_SIZE
    return read_config(run).optim.eval_batch_size


# ---------------------------------------------------------------- one pair as a dataset

def pair_dataset(pair: Pair, a: Checkpoint, b: Checkpoint, curves: PathCurves) -> xr.Dataset:
    """The (pair=1, split, alpha) dataset of one path, barriers and endpoint gaps included."""
    splits = list(curves.splits)
    dims = ("pair", "split", "alpha")
    error_gap = [[curves.error[i, 0] - recorded_error(a, s), curves.error[i, -1] - recorded_error(b, s)]
                 for i, s in enumerate(splits)]
    loss_gap = [[curves.loss[i, 0] - recorded_loss(a, s), curves.loss[i, -1] - recorded_loss(b, s)]
                for i, s in enumerate(splits)]
    path = "at theta(alpha) = (1 - alpha) theta_A + alpha theta_B, evaluated on the split"
    gap = ("at alpha=0 (endpoint a) or alpha=1 (endpoint b) minus the {0} recorded in that checkpoint (NaN when it "
           "records none); nonzero when BatchNorm statistics are recomputed, a subset is evaluated, or the file "
           "does not hold what was evaluated")
    ds = xr.Dataset(
        {
            "error": store.describe(xr.DataArray(curves.error[None], dims=dims), "error", "1", f"1 - accuracy {path}"),
            "loss": store.describe(xr.DataArray(curves.loss[None], dims=dims), "loss", "nat",
                                   f"mean cross-entropy {path}"),
            "endpoint_error_gap": store.describe(
                xr.DataArray(np.array([error_gap]), dims=("pair", "split", "endpoint")),
                "endpoint error gap", "1", "evaluated error " + gap.format("error")),
            "endpoint_loss_gap": store.describe(
                xr.DataArray(np.array([loss_gap]), dims=("pair", "split", "endpoint")),
                "endpoint loss gap", "nat", "evaluated loss " + gap.format("loss")),
            "samples": store.describe(
                xr.DataArray(np.array([[curves.samples[s] for s in splits]]), dims=("pair", "split")),
                "evaluated samples", "1", "number of examples of the split evaluated at each alpha"),
            "bn_batches_used": store.describe(
                xr.DataArray(np.array([curves.bn_batches_used]), dims=("pair",)), "BatchNorm batches", "1",
                "training batches the BatchNorm running statistics were recomputed from at each alpha "
                "(0: not recomputed)"),
        },
        coords={
            "pair": [pair.label],
            "split": splits,
            "alpha": ("alpha", curves.alpha, {"long_name": "interpolation coefficient alpha", "units": "1"}),
            "endpoint": ["a", "b"],
            "checkpoint_a": ("pair", [pair.path_a.stem]),
            "checkpoint_b": ("pair", [pair.path_b.stem]),
            "cycle_a": ("pair", [_cycle(a)]),
            "cycle_b": ("pair", [_cycle(b)]),
            "run_a": ("pair", [_run_name(a)]),
            "run_b": ("pair", [_run_name(b)]),
            "sparsity_a": ("pair", [float(a.sparsity)]),
            "sparsity_b": ("pair", [float(b.sparsity)]),
        },
    )
    for name in ("endpoint_error_gap", "endpoint_loss_gap"):
        ds[name].attrs["allow_nan"] = 1
    return with_barriers(ds)


def _with_provenance(ds: xr.Dataset, pair: Pair, a: Checkpoint, b: Checkpoint, settings: PathSettings,
                     base: Path | None) -> xr.Dataset:
    """Scalar coords run and method (where both checkpoints agree) and the global attrs."""
    inputs = list(dict.fromkeys([pair.path_a, pair.path_b]))
    ds.attrs = store.provenance(inputs, settings.as_dict(), base=base, analysis=ANALYSIS)
    ds.attrs.update(bn_mode=settings.bn, model=a.model.name if a.model else "", data=a.data.name if a.data else "")
    target = (a.config.get("prune") or {}).get("sparsity")
    if target is not None:
        ds.attrs["target_sparsity"] = float(target)
    return ds.assign_coords(run=_common([_run_name(a), _run_name(b)]), method=_common([a.method or "", b.method or ""]))


def _common(values: list[str]) -> str:
    return values[0] if all(v == values[0] for v in values) else ""


def _cycle(ckpt: Checkpoint) -> int:
    return -1 if ckpt.cycle is None else int(ckpt.cycle)


def _run_name(ckpt: Checkpoint) -> str:
    run = ckpt.run
    return "" if run is None else run.path.name


def gap_warnings(ds: xr.Dataset, labels: list[str], threshold: float = GAP_WARNING) -> list[str]:
    """One line per pair of `labels` where an endpoint's evaluated error is more than
    `threshold` away from the error its checkpoint records, naming the largest gap and the
    likely cause."""
    settings = store.settings_of(ds)
    if settings.get("bn") == "recompute" and int(ds.bn_batches_used.max()) > 0:
        cause = "recomputed BatchNorm statistics; --bn interpolate evaluates the checkpoints as stored"
    elif settings.get("samples") is not None:
        cause = "evaluated on a --samples subset"
    else:
        cause = "a checkpoint saved mid-epoch, other data, or a file that does not hold what was evaluated"
    lines = []
    for label in labels:
        gap = ds.endpoint_error_gap.sel(pair=label)
        worst = abs(gap).fillna(0).argmax(...)
        value = float(gap.isel(worst))
        if abs(value) > threshold:
            endpoint = str(gap.endpoint.values[int(worst["endpoint"])])
            name = ds[f"checkpoint_{endpoint}"].sel(pair=label).item()
            split = str(gap.split.values[int(worst["split"])])
            lines.append(f"warning: {label}: the {split} error of {name} evaluated here differs from the one it "
                         f"records by {value:+.4f} ({cause})")
    return lines


# ---------------------------------------------------------------- the file

def _load_all(pairs: list[Pair], options: LoadOptions) -> dict[Path, Checkpoint]:
    loaded: dict[Path, Checkpoint] = {}
    for pair in pairs:
        for path in (pair.path_a, pair.path_b):
            if path not in loaded:
                loaded[path] = load(path, options)
        check_compatible(loaded[pair.path_a], loaded[pair.path_b])
    return loaded


def _ranked(ds: xr.Dataset, order: list[str]) -> xr.Dataset:
    """`ds` with the pairs in `order` first, then the other stored pairs as they were."""
    labels = [str(p) for p in ds.pair.values]
    return ds.sel(pair=[p for p in order if p in labels] + [p for p in labels if p not in order])


def compute_pairs(
    pairs: list[Pair], settings: PathSettings, out: str | Path, *, run: RunDir | None = None, overwrite: bool = False,
    device: str = "cpu", options: LoadOptions = LoadOptions(), progress: Progress | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> AnalysisResult:
    """Compute the pairs not yet in `out` (all of them with `overwrite`) and merge them into
    it. `run` is the run the pairs belong to: its evaluation batch size is the default and the
    inputs are recorded relative to it. Every input is loaded and checked before anything is
    written."""
    from sparse_training.data import load_data

    group = distributed.current()  # under torchrun: the points' work is split across the ranks
    device = distributed.device_for(device, group)
    if not group.is_main:
        progress = None  # rank 0 reports for the job
    if settings.batch_size is None:
        settings = replace(settings, batch_size=default_batch_size(run))
    settings, by_label = validated(settings), {p.label: p for p in pairs}
    order = [p.label for p in pairs]

    def prepare(todo: list[str]) -> Callable[[str], xr.Dataset]:
        loaded, datas = _load_all([by_label[label] for label in todo], options), {}
        if progress is not None:
            progress.total = len(todo) * settings.points

        def compute(label: str) -> xr.Dataset:
            pair = by_label[label]
            a, b = loaded[pair.path_a], loaded[pair.path_b]
            if a.data not in datas:
                datas[a.data] = load_data(a.data, device)
            aligned = None
            if settings.align == "weights":
                from .align import align_checkpoint, permutation_dataset

                b, aligned = align_checkpoint(a.build_model(device), a, b, datas[a.data], device)
                log(f"{label}: second checkpoint aligned to the first ({len(aligned.spec.groups)} permutation "
                    f"groups, {aligned.iterations} sweeps)")
            log(f"{label}: {settings.points} points, BatchNorm {settings.bn}")
            step = (lambda: progress.update(1)) if progress is not None else None
            ds = pair_dataset(pair, a, b, evaluate_path(a, b, datas[a.data], settings, device, step, group))
            if aligned is not None:
                ds = ds.merge(permutation_dataset([aligned], "pair", [label]))
            ds = _with_provenance(ds, pair, a, b, settings, run.path if run is not None else None)
            for line in gap_warnings(ds, [label]):
                log(line)
            return ds

        return compute

    # Barriers are recomputed from the curves of every pair, stored ones included, so that a
    # file written before a barrier variable existed gains it (in the result at once, in the
    # file when a pair is next added).
    result = update_labels(out, ANALYSIS, order, prepare,
                           lambda ds, new: with_barriers(_ranked(merge_along(ds, new, "pair"), order)),
                           dim="pair", settings=settings.as_dict(), overwrite=overwrite)
    return replace(result, dataset=with_barriers(result.dataset))

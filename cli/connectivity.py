"""`landscape barrier CKPT_A CKPT_B` and `landscape connectivity RUN [RUN_B]`."""

from __future__ import annotations

import math

import click

from .output import (allow_incomplete_option, device_option, emit, handle_errors, json_option, log,
                     model_data_options, parse_model_kwargs, progress_enabled, resolve_device, table)


def path_options(func):
    """The settings of a path (landscape.interpolate.PathSettings) and where it goes."""
    options = [
        click.option("--points", type=int, default=11, show_default=True,
                     help="Points on the line, both endpoints included (at least 2)."),
        click.option("--split", "splits", default="train,test", show_default=True,
                     help="Splits to evaluate: train, test or train,test."),
        click.option("--bn", "bn", type=click.Choice(["recompute", "interpolate", "none"]), default="recompute",
                     show_default=True,
                     help="BatchNorm running statistics at each point: recomputed from training batches, or "
                          "interpolated like the weights (none is the same as interpolate: the interpolated "
                          "state_dict as it is)."),
        click.option("--bn-batches", type=int, default=20, show_default=True,
                     help="Training batches the BatchNorm statistics are recomputed from."),
        click.option("--samples", type=int, default=None,
                     help="Evaluate on a fixed seeded subset of this many examples per split. [all]"),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the --samples subset and of the BatchNorm batches."),
        click.option("--batch-size", type=int, default=None,
                     help="Evaluation batch size. [the run's eval batch size, else 1024]"),
        click.option("--out", type=click.Path(dir_okay=False), default=None, help="Dataset file to write."),
        click.option("--overwrite", is_flag=True, help="Recompute pairs already in the output file."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _settings(points, splits, bn, bn_batches, samples, seed, batch_size, run):
    from landscape.connectivity import default_batch_size
    from landscape.interpolate import PathSettings, parse_splits, validated

    return validated(PathSettings(points=points, splits=parse_splits(splits), bn=bn, bn_batches=bn_batches,
                                  samples=samples, seed=seed,
                                  batch_size=batch_size if batch_size is not None else default_batch_size(run)))


def _compute(pairs, settings, out, overwrite, device, options, base):
    """Run the pairs with a progress bar on a terminal; warnings and logs go to stderr."""
    from tqdm import tqdm

    from landscape.connectivity import compute_pairs, gap_warnings

    with tqdm(total=len(pairs) * settings.points, desc="alpha points", unit="pt", leave=False,
              disable=not progress_enabled()) as bar:
        outcome = compute_pairs(pairs, settings, out, overwrite=overwrite, device=device, options=options,
                                base=base, progress=lambda: bar.update(1), log=log)
    for line in gap_warnings(outcome.dataset, outcome.computed):
        log(line)
    if outcome.reused:
        log(f"reused {len(outcome.reused)} pair(s) already in {outcome.path} (--overwrite recomputes them)")
    return outcome


def _pair_summary(ds, label: str) -> dict:
    one = ds.sel(pair=label)
    per_split = {}
    for split in one.split.values:
        s = one.sel(split=split)
        per_split[str(split)] = {
            name: float(s[name]) for name in (
                "error_barrier", "error_barrier_linear", "error_barrier_alpha", "error_barrier_linear_alpha",
                "loss_barrier", "loss_barrier_linear", "loss_barrier_alpha", "loss_barrier_linear_alpha")
        } | {
            "error": [float(v) for v in s.error.values],
            "loss": [float(v) for v in s.loss.values],
            "endpoint_error_gap": {str(e): _finite_or_none(s.endpoint_error_gap.sel(endpoint=e)) for e in ("a", "b")},
        }
    return {"checkpoint_a": str(one.checkpoint_a.item()), "checkpoint_b": str(one.checkpoint_b.item()),
            "splits": per_split}


def _finite_or_none(da) -> float | None:
    value = float(da)
    return value if math.isfinite(value) else None


def _result(outcome, labels: list[str]) -> dict:
    ds = outcome.dataset
    return {
        "output": str(outcome.path), "computed": outcome.computed, "reused": outcome.reused,
        "bn_mode": str(ds.attrs.get("bn_mode", "")), "alpha": [float(a) for a in ds.alpha.values],
        "pairs": {label: _pair_summary(ds, label) for label in labels},
    }


def _summary(result: dict) -> str:
    rows = []
    for label, pair in result["pairs"].items():
        for split, s in pair["splits"].items():
            gap = [g for g in s["endpoint_error_gap"].values() if g is not None]
            rows.append([label, split, s["error_barrier"], s["error_barrier_linear"], s["error_barrier_alpha"],
                         s["loss_barrier"], s["loss_barrier_linear"], max(gap, key=abs) if gap else "-"])
    header = ["pair", "split", "error barrier", "linear", "at alpha", "loss barrier", "linear", "endpoint gap"]
    where = f"{result['output']} (BatchNorm: {result['bn_mode']}, {len(result['alpha'])} points)"
    return table(rows, header) + f"\nwritten to {where}"


def _options(model_name, model_kwargs, data_name):
    from landscape.connectivity import LoadOptions

    return LoadOptions(model=model_name, model_kwargs=parse_model_kwargs(model_kwargs), data=data_name)


@click.command()
@click.argument("checkpoint_a", type=click.Path(path_type=str))
@click.argument("checkpoint_b", type=click.Path(path_type=str))
@path_options
@model_data_options
@device_option
@json_option
@handle_errors
def barrier(checkpoint_a, checkpoint_b, points, splits, bn, bn_batches, samples, seed, batch_size, out, overwrite,
            model_name, model_kwargs, data_name, device, as_json):
    """Error and loss barriers on the straight line between two checkpoints.

    Writes a dataset to --out, by default RUN/analysis/barrier_<A>__<B>.nc when CHECKPOINT_A
    lies in a run, else barrier_<A>__<B>.nc beside it. Plain state_dict files need --model
    (and --model-kwargs) and --data.

    \b
    Example:
      landscape barrier runs/a/checkpoints/cycle_002.pt runs/a/checkpoints/cycle_003.pt
    """
    from pathlib import Path

    from landscape.connectivity import barrier_output, checkpoint_pair
    from sparse_training.rundir import run_of_checkpoint

    pair = checkpoint_pair(checkpoint_a, checkpoint_b)
    run = run_of_checkpoint(pair.path_a)
    settings = _settings(points, splits, bn, bn_batches, samples, seed, batch_size, run)
    options = _options(model_name, model_kwargs, data_name)
    target = Path(out) if out else barrier_output(pair)
    outcome = _compute([pair], settings, target, overwrite, resolve_device(device), options,
                       run.path if run else None)
    result = _result(outcome, [pair.label])
    emit(result, as_json, _summary(result))


@click.command()
@click.argument("run", type=click.Path(path_type=str))
@click.argument("run_b", type=click.Path(path_type=str), required=False)
@path_options
@allow_incomplete_option
@device_option
@json_option
@handle_errors
def connectivity(run, run_b, points, splits, bn, bn_batches, samples, seed, batch_size, out, overwrite,
                 allow_incomplete, device, as_json):
    """Barriers between consecutive cycle checkpoints of RUN, or between the matching cycle
    checkpoints of RUN and RUN_B (instability analysis).

    One dataset with a `pair` dimension: RUN/analysis/connectivity.nc, or
    RUN/analysis/connectivity_<RUN_B name>.nc for two runs. Pairs already there with the same
    settings are reused unless --overwrite.

    \b
    Examples:
      landscape connectivity runs/lrr
      landscape connectivity runs/seed0 runs/seed1
    """
    from pathlib import Path

    from landscape.connectivity import LoadOptions, connectivity_output, consecutive_pairs, matching_pairs
    from sparse_training.rundir import RunDir

    runs = [RunDir(path) for path in (run, run_b) if path is not None]
    for one in runs:
        one.require_done(allow_incomplete)
    pairs = consecutive_pairs(runs[0]) if len(runs) == 1 else matching_pairs(runs[0], runs[1])
    settings = _settings(points, splits, bn, bn_batches, samples, seed, batch_size, runs[0])
    target = Path(out) if out else connectivity_output(*runs)
    outcome = _compute(pairs, settings, target, overwrite, resolve_device(device), LoadOptions(), runs[0].path)
    result = _result(outcome, [p.label for p in pairs])
    emit(result, as_json, _summary(result))

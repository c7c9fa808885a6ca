"""`landscape barrier CKPT_A CKPT_B` and `landscape connectivity RUN [RUN_B]`."""

from __future__ import annotations

import click

from landscape.settings import PathSettings

from .analysis import architecture_options, data_dir_option, emit_result, load_options, number, output_options
from .options import build, settings_options
from .output import (allow_incomplete_option, device_option, handle_errors, json_option, label_list, log,
                     model_data_options, progress_bar, resolve_device, table)

BARRIERS = ("error_barrier_linear", "error_barrier_linear_alpha", "error_barrier", "error_barrier_alpha",
            "error_endpoint_difference", "loss_barrier_linear", "loss_barrier_linear_alpha", "loss_barrier",
            "loss_barrier_alpha", "loss_endpoint_difference")


@click.command()
@click.argument("checkpoint_a", type=click.Path(path_type=str))
@click.argument("checkpoint_b", type=click.Path(path_type=str))
@settings_options(PathSettings)
@output_options
@model_data_options
@data_dir_option
@device_option
@json_option
@handle_errors
def barrier(checkpoint_a, checkpoint_b, out, overwrite, model_name, model_kwargs, data_name, data_dir, device,
            as_json, **settings):
    """Error and loss barriers on the straight line between two checkpoints.

    Writes a dataset to --out, by default RUN/analysis/barrier_<A>__<B>.nc when CHECKPOINT_A
    lies in a run, else <A>__<B>.barrier.nc beside it. Plain state_dict files need --model
    (and --model-kwargs) and --data.

    \b
    Example:
      landscape barrier runs/a/checkpoints/cycle_002.pt runs/a/checkpoints/cycle_003.pt
    """
    _run([checkpoint_a, checkpoint_b], settings, as_json, files=True, out=out, overwrite=overwrite,
         device=resolve_device(device), options=load_options(model_name, model_kwargs, data_name, data_dir))


@click.command()
@click.argument("run", type=click.Path(path_type=str))
@click.argument("run_b", type=click.Path(path_type=str), required=False)
@click.option("--checkpoints", default=None,
              help="Comma-separated checkpoint labels: the path through them in this order (one run), or the labels "
                   "to match (two runs), e.g. cycle_000_epoch_010,cycle_000_epoch_020,cycle_000. [every cycle]")
@settings_options(PathSettings)
@output_options
@architecture_options
@data_dir_option
@allow_incomplete_option
@device_option
@json_option
@handle_errors
def connectivity(run, run_b, checkpoints, out, overwrite, model_name, model_kwargs, data_dir, allow_incomplete,
                 device, as_json, **settings):
    """Barriers between consecutive cycle checkpoints of RUN (or consecutive entries of
    --checkpoints), or between the matching cycle checkpoints of RUN and RUN_B (instability
    analysis).

    One dataset with a `pair` dimension: RUN/analysis/connectivity.nc, or
    RUN/analysis/connectivity_<RUN_B name>.nc for two runs. Pairs already there with the same
    settings are reused unless --overwrite.

    \b
    Examples:
      landscape connectivity runs/lrr
      landscape connectivity runs/seed0 runs/seed1
      landscape connectivity runs/one-cycle --checkpoints cycle_000_epoch_050,cycle_000_epoch_100,cycle_000
    """
    _run([path for path in (run, run_b) if path is not None], settings, as_json, out=out, overwrite=overwrite,
         allow_incomplete=allow_incomplete, device=resolve_device(device), checkpoints=label_list(checkpoints),
         options=load_options(model_name, model_kwargs, data_dir=data_dir))


def _run(inputs: list[str], settings: dict, as_json: bool, **how) -> None:
    """The one library call, with a bar over alpha points on a terminal."""
    from landscape.connectivity import connectivity

    with progress_bar(0, "alpha points", "pt") as bar:
        result = connectivity(inputs, build(PathSettings, settings), progress=bar, log=log, **how)
    ds = result.dataset
    own = {"bn_mode": str(ds.attrs.get("bn_mode", "")), "alpha": [float(a) for a in ds.alpha.values],
           "pairs": {label: _pair_summary(ds, label) for label in result.labels}}
    emit_result(result, own, as_json, _summary(str(result.path), own), "pair(s)")


def _pair_summary(ds, label: str) -> dict:
    one = ds.sel(pair=label)
    per_split = {}
    for split in one.split.values:
        s = one.sel(split=split)
        per_split[str(split)] = {name: float(s[name]) for name in BARRIERS} | {
            "error_barrier_gap_dominated": bool(s.error_barrier_gap_dominated),
            "error": [float(v) for v in s.error.values],
            "loss": [float(v) for v in s.loss.values],
            "endpoint_error_gap": {str(e): number(s.endpoint_error_gap.sel(endpoint=e)) for e in ("a", "b")},
        }
    return {"checkpoint_a": str(one.checkpoint_a.item()), "checkpoint_b": str(one.checkpoint_b.item()),
            "splits": per_split}


def _summary(output: str, result: dict) -> str:
    """The linear (Entezari) barriers first; the midpoint (Frankle) error barrier beside them,
    starred where the endpoints' errors differ by more than it (it then measures that gap)."""
    rows, starred = [], False
    for label, pair in result["pairs"].items():
        for split, s in pair["splits"].items():
            gap = [g for g in s["endpoint_error_gap"].values() if g is not None]
            midpoint = f"{s['error_barrier']:.4g}" + ("*" if s["error_barrier_gap_dominated"] else "")
            starred |= s["error_barrier_gap_dominated"]
            rows.append([label, split, s["error_barrier_linear"], s["error_barrier_linear_alpha"],
                         s["loss_barrier_linear"], midpoint, s["error_endpoint_difference"],
                         max(gap, key=abs) if gap else "-"])
    header = ["pair", "split", "error barrier (linear)", "at alpha", "loss (linear)", "error (midpoint)",
              "|E(1) - E(0)|", "gap vs recorded"]
    notes = ["linear: max over alpha of E(alpha) above the straight line between the endpoints (Entezari et al. "
             "2022); midpoint: max E(alpha) - (E(0) + E(1)) / 2 (Frankle et al. 2020)"]
    if starred:
        notes.append("* the endpoints' errors differ by more than this midpoint barrier: it mostly measures that "
                     "difference, not a rise along the path; read the linear barrier")
    where = f"{output} (BatchNorm: {result['bn_mode']}, {len(result['alpha'])} points)"
    return "\n".join([table(rows, header), *notes, f"written to {where}"])

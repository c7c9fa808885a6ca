"""`landscape surface RUN|CKPT ...`: loss and error on a grid of networks."""

from __future__ import annotations

import click

from landscape.settings import SurfaceSettings

from .analysis import checkpoint_analysis_options, emit_result, load_options, number
from .options import build, settings_options
from .output import handle_errors, label_list, log, progress_bar, resolve_device, table


@click.command()
@click.argument("inputs", metavar="RUN|CKPT...", nargs=-1, required=True)
@click.option("--through", default=None,
              help="Comma-separated checkpoint labels of RUN the line or plane goes through, e.g. "
                   "cycle_001,cycle_002,cycle_003.")
@settings_options(SurfaceSettings)
@checkpoint_analysis_options
@handle_errors
def surface(inputs, through, out, overwrite, model_name, model_kwargs, data_name, data_dir, allow_incomplete, device,
            as_json, **settings):
    """Loss and error on a grid around one checkpoint (random filter-normalised directions,
    Li et al. 2018) or through two or three checkpoints (a line or a plane).

    BatchNorm statistics are recomputed at every point from the same training batches, and
    random directions stay inside the checkpoint's mask (--subspace full: all weights). Each
    checkpoint is also evaluated at its own coordinates. Checkpoints of different runs can be
    aligned first (--align weights). The dataset goes to RUN/analysis/surface_<labels>.nc
    (surface_random_<label>.nc around one checkpoint); draw it with `landscape plot surface`.

    \b
    Examples:
      landscape surface runs/cyclic --through cycle_001,cycle_002,cycle_003
      landscape surface runs/cyclic@cycle_003 --grid 21 --range 0.5
      landscape surface runs/seed0 runs/seed1 --align weights --out seeds.nc
    """
    from landscape.surface import surface as compute

    with progress_bar(0, "grid points", "pt") as bar:
        result = compute(inputs, build(SurfaceSettings, settings), through=label_list(through), out=out,
                         overwrite=overwrite, allow_incomplete=allow_incomplete, device=resolve_device(device),
                         options=load_options(model_name, model_kwargs, data_name, data_dir), progress=bar, log=log)
    ds = result.dataset
    own = {"directions": str(ds.attrs.get("directions", "")), "bn_mode": str(ds.attrs.get("bn_mode", "")),
           "alpha": [float(a) for a in ds.alpha.values], "beta": [float(b) for b in ds.beta.values],
           "checkpoints": {str(c): _checkpoint(ds, str(c)) for c in ds.checkpoint.values},
           "splits": {str(s): _extremes(ds.sel(split=s)) for s in ds.split.values}}
    emit_result(result, own, as_json, _summary(str(result.path), own), "surface(s)")


def _checkpoint(ds, label: str) -> dict:
    one = ds.sel(checkpoint=label)
    return {"alpha": float(one.checkpoint_alpha), "beta": float(one.checkpoint_beta),
            "error": {str(s): number(one.checkpoint_error.sel(split=s)) for s in ds.split.values},
            "loss": {str(s): number(one.checkpoint_loss.sel(split=s)) for s in ds.split.values}}


def _extremes(one) -> dict:
    lowest = one.loss.argmin(...)
    return {"min_loss": number(one.loss.min()), "max_loss": number(one.loss.max()),
            "min_error": number(one.error.min()), "max_error": number(one.error.max()),
            "argmin_loss": {"alpha": float(one.alpha[lowest["alpha"]]), "beta": float(one.beta[lowest["beta"]])}}


def _summary(output: str, result: dict) -> str:
    rows = [[label, c["alpha"], c["beta"], *[c["error"][s] for s in result["splits"]]]
            for label, c in result["checkpoints"].items()]
    header = ["checkpoint", "alpha", "beta", *[f"{s} error" for s in result["splits"]]]
    ranges = "; ".join(f"{s} loss {v['min_loss']:.4g} to {v['max_loss']:.4g}" for s, v in result["splits"].items())
    grid = f"{len(result['alpha'])} x {len(result['beta'])}"
    return (table(rows, header) + f"\n{ranges}\nwritten to {output} ({grid} points, {result['directions']} "
            f"directions, BatchNorm: {result['bn_mode']})")

"""`landscape overlap`: pairwise overlap of masks against chance, as a dataset."""

from __future__ import annotations

import click

from landscape.settings import OverlapSettings

from .analysis import architecture_options, emit_result, load_options, number, output_options
from .options import build, settings_options
from .output import allow_incomplete_option, handle_errors, json_option, log, table

COLUMNS = ["mask_a", "mask_b", "jaccard", "chance_jaccard", "jaccard_ratio", "intersection", "chance_intersection",
           "hamming", "coverage"]


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@settings_options(OverlapSettings)
@output_options
@architecture_options
@allow_incomplete_option
@json_option
@handle_errors
def overlap(inputs, out, overwrite, model_name, model_kwargs, allow_incomplete, as_json, **settings):
    """Pairwise mask overlap of RUN, RUN@LABEL or checkpoint files, against chance.

    Intersection, Jaccard, coverage |A and B|/|B| and Hamming fraction, per layer and over all
    layers, with the levels expected of independent masks with the same per-layer densities.
    A dense checkpoint's mask is all ones. The dataset goes to RUN/analysis/overlap.nc when the
    masks come from one run, beside the first file when none comes from a run, else to --out.

    \b
    Examples:
      landscape overlap runs/snip90 runs/lrr90 --out snip_vs_lrr.nc
      landscape overlap runs/lrr90 --across-cycles
    """
    from landscape.overlap import overlap as compute

    result = compute(inputs, build(OverlapSettings, settings), out=out, overwrite=overwrite,
                     allow_incomplete=allow_incomplete, options=load_options(model_name, model_kwargs), log=log)
    ds, masks = result.dataset, result.labels
    pairs = [_pair(ds, a, b) for i, a in enumerate(masks) for b in masks[i + 1:]]
    own = {"masks": masks, "pairs": pairs,
           "density": {label: number(ds.density_a_total.sel(mask_a=label, mask_b=label).values) for label in masks}}
    summary = (f"mask overlap -> {result.path}{' (already there)' if result.reused else ''}\n"
               + table([[p[c] for c in COLUMNS] for p in pairs], COLUMNS))
    emit_result(result, own, as_json, summary, "mask(s)")


def _pair(ds, a: str, b: str) -> dict:
    one = ds.sel(mask_a=a, mask_b=b)
    row = {"mask_a": a, "mask_b": b}
    for name in ("intersection", "jaccard", "coverage", "hamming"):
        for key in (name, f"chance_{name}", f"{name}_ratio"):
            row[key] = number(one[f"{key}_total"].values)
    row["coverage_reverse"] = number(ds.coverage_total.sel(mask_a=b, mask_b=a).values)
    return row

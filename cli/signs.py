"""`landscape signs`: sign flips of kept weights between checkpoints, as a dataset."""

from __future__ import annotations

import click

from landscape.settings import SignsSettings

from .analysis import architecture_options, emit_result, load_options, number, output_options
from .options import build, settings_options
from .output import allow_incomplete_option, handle_errors, json_option, table

COLUMNS = ["pair", "kept_both", "flipped", "flip_fraction", "match_fraction"]


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@settings_options(SignsSettings)
@output_options
@architecture_options
@allow_incomplete_option
@json_option
@handle_errors
def signs(inputs, out, overwrite, model_name, model_kwargs, allow_incomplete, as_json, **settings):
    """Sign flips of kept weights: RUN (every cycle against --reference), or REFERENCE CHECKPOINT.

    A checkpoint is a file, a run (its final cycle) or RUN@LABEL. Only weights kept in both
    masks count; a weight exactly zero in either checkpoint has no sign (neither flipped nor
    matched). Pairs go to signs.nc (dims pair, layer) in RUN/analysis/ (beside the first file
    for files outside any run), added to the pairs already there.

    \b
    Examples:
      landscape signs runs/imp --reference rewind
      landscape signs runs/a@init runs/a@cycle_003
    """
    from landscape.signs import signs as compute

    result = compute(inputs, build(SignsSettings, settings), out=out, overwrite=overwrite,
                     allow_incomplete=allow_incomplete, options=load_options(model_name, model_kwargs))
    pairs = [_pair(result.dataset, label) for label in result.labels]
    done = f"{len(result.computed)} computed, {len(result.reused)} already there"
    emit_result(result, {"pairs": pairs}, as_json,
                f"sign flips -> {result.path} ({done})\n" + table([[p[c] for c in COLUMNS] for p in pairs], COLUMNS),
                "pair(s)")


def _pair(ds, label: str) -> dict:
    one = ds.sel(pair=label)
    row = {"pair": label, "checkpoint": str(one.checkpoint.values), "reference": str(one.reference.values),
           "cycle": int(one.cycle.values)}
    for name in ("kept_both", "flipped", "flip_fraction", "match_fraction"):
        row[name] = number(one[f"{name}_total"].values)
    row["layers"] = {str(layer): {"kept_both": number(one.kept_both.sel(layer=layer).values),
                                  "flip_fraction": number(one.flip_fraction.sel(layer=layer).values)}
                     for layer in ds.layer.values}
    return row

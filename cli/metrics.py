"""`landscape metrics`: runs' metrics.csv as one dataset."""

from __future__ import annotations

from typing import Any

import click

from .analysis import emit_result, number, output_options
from .output import allow_incomplete_option, handle_errors, json_option, log, table

COLUMNS = ["run", "cycle", "sparsity", "epochs", "train_loss", "test_accuracy"]


@click.command()
@click.argument("runs", nargs=-1, required=True)
@output_options
@allow_incomplete_option
@json_option
@handle_errors
def metrics(runs, out, overwrite, allow_incomplete, as_json):
    """Runs' metrics.csv as one dataset: dims (run, cycle, epoch, split, metric).

    With one run it goes to RUN/analysis/metrics.nc; several runs need --out FILE.nc.

    \b
    Example:
      landscape metrics runs/imp runs/lrr --out curves.nc
    """
    from landscape.dynamics import metrics as compute

    result = compute(runs, out=out, overwrite=overwrite, allow_incomplete=allow_incomplete, log=log)
    rows = _final_rows(result.dataset)
    summary = (f"metrics -> {result.path}{' (already there)' if result.reused else ''}\n"
               + table([[r.get(c, "") for c in COLUMNS] for r in rows], COLUMNS))
    emit_result(result, {"runs": result.labels, "cycles": rows}, as_json, summary, "run(s)")


def _final_rows(ds: Any) -> list[dict[str, Any]]:
    """Per run and cycle: the sparsity and the metrics at the cycle's last recorded epoch."""
    import numpy as np

    rows = []
    for run in ds.run.values:
        for cycle in ds.cycle.values:
            steps = ds.step.sel(run=run, cycle=cycle).values
            if not (steps >= 0).any():
                continue
            last = int(ds.epoch.values[np.flatnonzero(steps >= 0)[-1]])
            at = ds.value.sel(run=run, cycle=cycle, epoch=last)
            row = {"run": str(run), "cycle": int(cycle), "sparsity": number(ds.sparsity.sel(run=run, cycle=cycle).values),
                   "epochs": last}
            for split in ds.split.values:
                for metric in ds.metric.values:
                    row[f"{split}_{metric}"] = number(at.sel(split=split, metric=metric).values)
            rows.append(row)
    return rows

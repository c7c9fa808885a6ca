"""`landscape aggregate SWEEP`: one dataset of a sweep's results, with intervals over seeds."""

from __future__ import annotations

from typing import Any

import click

from .analysis import emit_result, number
from .output import handle_errors, json_option, log, table


@click.command()
@click.argument("sweep", type=click.Path(path_type=str))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Dataset file to write. [SWEEP/aggregate.nc]")
@click.option("--overwrite", is_flag=True, help="Rebuild the dataset even if nothing changed; replace another file at --out.")
@json_option
@handle_errors
def aggregate(sweep: str, out: str | None, overwrite: bool, as_json: bool) -> None:
    """One dataset of a sweep's results: dims are the grid keys (seed included) plus the
    analyses' own dims.

    Per run: final train/test loss and accuracy, final sparsity, training FLOPs
    (multiply-adds) and every analysis dataset in its analyses/ folder; runs not done are
    NaN. Over the seed key: <var>_mean, _std, _ci95_low, _ci95_high (95 % Student-t
    interval of the mean) and _n. stdout: test accuracy mean +- half-width per grid point.

    \b
    Example:
      landscape aggregate sweeps/lrr-vs-pai
      landscape plot aggregate sweeps/lrr-vs-pai/aggregate.nc
    """
    from landscape.aggregate import aggregate as compute

    result = compute(sweep, out=out, overwrite=overwrite, log=log)
    ds = result.dataset
    rows = summary_rows(ds)
    seed = str(ds.attrs.get("seed_dim", ""))
    keys = [str(d) for d in ds["done"].dims if d != seed]
    done, total = int(ds.attrs.get("runs_done", 0)), int(ds.attrs.get("runs_total", 0))
    header = keys + (["seeds", "test accuracy", "training FLOPs"] if seed else ["test accuracy", "training FLOPs"])
    cells = []
    for row in rows:
        accuracy = _percent(row["test_accuracy_mean"], row.get("test_accuracy_half_width"), row.get("n"))
        flops = _flops(row["training_flops_mean"], row.get("training_flops_half_width"))
        counts = [f"{row['n']}/{row['seeds']}"] if seed else []
        cells.append([str(row["point"][k]) for k in keys] + counts + [accuracy, flops])
    note = (f"mean ± half-width of the {ds.attrs.get('interval')} (none where fewer than 2 seeds)" if seed
            else "one run per grid point (no seed key in the grid): no intervals")
    summary = (f"aggregate -> {result.path}{' (already up to date)' if result.reused else ''}; "
               f"{done} of {total} runs done\n" + table(cells, header) + f"\n{note}")
    emit_result(result, {"sweep": str(ds.attrs.get("sweep", sweep)), "runs_total": total, "runs_done": done,
                         "missing_runs": _json_list(ds.attrs.get("missing_runs")), "seed_dim": seed or None,
                         "interval": ds.attrs.get("interval"), "points": rows}, as_json, summary, "sweep runs")


def summary_rows(ds: Any) -> list[dict[str, Any]]:
    """Per grid point (the seed key summarised): test accuracy and training FLOPs, with the
    95 % interval over seeds where the grid has a seed key."""
    import numpy as np

    seed = str(ds.attrs.get("seed_dim", ""))
    keys = [str(d) for d in ds["done"].dims if d != seed]
    rows = []
    for index in np.ndindex(*[ds.sizes[k] for k in keys]):
        at = {k: i for k, i in zip(keys, index)}
        point = {k: ds[k].values[i].item() for k, i in at.items()}
        row: dict[str, Any] = {"point": point}
        if seed:
            row["seeds"] = int(ds.sizes[seed])
            row["n"] = int(ds["test_accuracy_n"].isel(at).item())
            for name in ("test_accuracy", "training_flops"):
                mean = float(ds[f"{name}_mean"].isel(at).item())
                low, high = (float(ds[f"{name}_ci95_{end}"].isel(at).item()) for end in ("low", "high"))
                row[f"{name}_mean"] = number(mean)
                row[f"{name}_std"] = number(float(ds[f"{name}_std"].isel(at).item()))
                row[f"{name}_ci95_low"], row[f"{name}_ci95_high"] = number(low), number(high)
                row[f"{name}_half_width"] = number((high - low) / 2)
        else:
            row["run"] = str(ds["run"].isel(at).item())
            for name in ("test_accuracy", "training_flops"):
                row[f"{name}_mean"] = number(float(ds[name].isel(at).item()))
        rows.append(row)
    return rows


def _percent(mean: float | None, half: float | None, n: int | None) -> str:
    if mean is None:
        return "not done"
    text = f"{100 * mean:.2f}"
    if half is not None:
        return f"{text} ± {100 * half:.2f} %"
    return f"{text} %" + (f" (n={n})" if n is not None else "")


def _flops(mean: float | None, half: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3g}" + (f" ± {half:.2g}" if half else "")


def _json_list(text: Any) -> list[str]:
    import json

    try:
        value = json.loads(text) if isinstance(text, str) else []
    except json.JSONDecodeError:
        return []
    return value if isinstance(value, list) else []

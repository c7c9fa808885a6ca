"""A sweep's aggregate (`landscape aggregate SWEEP`): final test accuracy and training FLOPs
against the first numeric grid key, one line per value of the other keys, error bars the 95 %
Student-t interval of the mean over seeds (n stated; none where fewer than two seeds)."""

from __future__ import annotations

import itertools
import textwrap
from typing import Any, Sequence

import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from .style import (PlotInputError, as_list, legend_outside, method_order, methods_described, method_style,
                    new_figure, plain_log_axis, set_title, styled)

KIND = "aggregate"
WRITTEN_BY = "pass the aggregate.nc written by `landscape aggregate SWEEP`"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
FLOPS_LABEL = "training FLOPs (multiply-adds)"
LOG_SPREAD = 2.0  # FLOPs on a log axis once they span this factor


@styled
def plot_aggregate(datasets: xr.Dataset | Sequence[xr.Dataset]) -> Figure:
    """Left: final test accuracy (mean over seeds) against the first numeric grid key other
    than the seed, one line and marker per value of the other keys, error bars the 95 %
    t-interval. Right: training FLOPs, the same lines, on a log axis (linear where they vary
    by less than a factor of LOG_SPREAD, which a log axis would show as one tick)."""
    items = as_list(datasets)
    if len(items) > 1:
        raise PlotInputError(f"the {KIND} figure draws one sweep at a time; got {len(items)} datasets")
    ds = items[0]
    seed = _seed_dim(ds)
    _check(ds, seed)
    keys = [str(d) for d in ds["done"].dims if d != seed]
    x_key = next((k for k in keys if ds[k].dtype.kind in "iuf"), keys[0] if keys else None)
    others = [k for k in keys if k != x_key]
    series = list(itertools.product(*[range(ds.sizes[k]) for k in others]))
    if others:
        series.sort(key=lambda idx: _series_order(ds, others, idx))
    x, x_label, ticks = _x_axis(ds, x_key)

    fig = new_figure(10.5, 4.2)
    accuracy_ax, flops_ax = fig.subplots(1, 2)
    handles, labels, counts = [], [], []
    spread = (np.nanmax(x) - np.nanmin(x)) if len(x) > 1 else 1.0
    for number, idx in enumerate(series):
        at = dict(zip(others, idx))
        colour, marker = _style(ds, others, idx, number)
        dodge = (number - (len(series) - 1) / 2) * 0.012 * spread if len(series) > 1 else 0.0
        acc = _summary(ds, "test_accuracy", seed, at, x_key)
        flops = _summary(ds, "training_flops", seed, at, x_key)
        counts.extend(acc["n"][np.isfinite(acc["mean"])].tolist())
        handle = _draw(accuracy_ax, x + dodge, 100 * acc["mean"], 100 * acc["low"], 100 * acc["high"], acc["n"],
                       colour, marker)
        _draw(flops_ax, x + dodge, flops["mean"], flops["low"], flops["high"], flops["n"], colour, marker)
        handles.append(handle)
        labels.append(_series_label(ds, others, idx))

    for ax in (accuracy_ax, flops_ax):
        ax.set_xlabel(x_label)
        if ticks is not None:
            ax.set_xticks(x, ticks)
        elif x_key is not None:
            ax.set_xticks(x, [f"{v:g}" for v in x])
    accuracy_ax.set_ylabel("final test accuracy (%)")
    accuracy_ax.set_title("test accuracy" + (", mean over seeds" if seed else ""))
    flops_ax.set_ylabel(FLOPS_LABEL)
    flops_ax.set_title("training cost" + (", mean over seeds" if seed else ""))
    shown = _finite(flops_ax)
    if shown.size and (shown > 0).all() and shown.max() >= LOG_SPREAD * shown.min():
        plain_log_axis(flops_ax, "y", engineering=True)
    else:  # FLOPs that hardly vary read better on a linear axis
        flops_ax.yaxis.set_major_formatter(EngFormatter(sep=" "))
    if others:
        legend_outside(flops_ax, handles, labels, title=others[0] if len(others) == 1 else None)
    # A footnote across the figure, wrapped to its width (about 15 small characters an inch).
    fig.supxlabel(textwrap.fill(interval_note(seed, counts), int(fig.get_figwidth() * 15)), fontsize="small",
                  ha="left", x=0.01, multialignment="left")
    done, total = ds.attrs.get("runs_done"), ds.attrs.get("runs_total")
    extra = f"{done} of {total} runs done" if done is not None and total is not None and done != total else ""
    set_title(fig, "Sweep", [ds], extra)
    return fig


def interval_note(seed: str | None, counts: Sequence[int]) -> str:
    """What the error bars are, with the number of seeds behind them, never claiming an
    interval that fewer than two seeds cannot give, and saying so when only two back it."""
    if seed is None:
        return "One run per grid point (the sweep has no seed key): no error bars."
    counts = [int(c) for c in counts if c >= 1]
    if not counts or max(counts) < 2:
        return "One seed per grid point: no error bars (an interval needs at least 2 seeds)."
    low, high = min(counts), max(counts)
    seeds = f"n={low} seeds" if low == high else f"n={low}–{high} seeds per point"
    parts = [f"Error bars: 95 % Student-t interval of the mean over {seeds}"]
    if low < 2:
        parts.append("open markers: 1 seed, no interval")
    if low <= 2:
        parts.append("with 2 seeds the interval has 1 degree of freedom and is wide")
    return "; ".join(parts) + "."


# ---------------------------------------------------------------- reading the dataset

def _seed_dim(ds: xr.Dataset) -> str | None:
    seed = str(ds.attrs.get("seed_dim", "") or "")
    if seed and seed in ds.dims:
        return seed
    return "seed" if "seed" in ds.dims and "test_accuracy_mean" in ds else None


def _check(ds: xr.Dataset, seed: str | None) -> None:
    source = ds.attrs.get("source_path") or "the dataset"
    needed = ["done", "test_accuracy", "training_flops"]
    if seed is not None:
        needed += [f"{name}_{stat}" for name in ("test_accuracy", "training_flops")
                   for stat in ("mean", "ci95_low", "ci95_high", "n")]
    missing = [name for name in needed if name not in ds.variables]
    if missing:
        raise PlotInputError(f"{source} lacks {', '.join(missing)} needed for the {KIND} figure; {WRITTEN_BY}")
    grid = set(ds["done"].dims)
    for name in needed:
        if ds[name].dtype.kind not in "biuf":
            raise PlotInputError(f"{source}: {name} holds {ds[name].dtype} values where numbers belong; {WRITTEN_BY}")
        if not set(ds[name].dims) <= grid:
            raise PlotInputError(f"{source}: {name} has dims ({', '.join(map(str, ds[name].dims))}) outside the "
                                 f"grid ({', '.join(map(str, grid))}); {WRITTEN_BY}")
    if any(ds.sizes[d] == 0 for d in grid):
        raise PlotInputError(f"{source} has an empty grid; {WRITTEN_BY}")
    if not np.isfinite(np.asarray(ds["test_accuracy"].values, dtype=float)).any():
        raise PlotInputError(f"{source} holds no finite test accuracy (no run of the sweep is done)")


def _summary(ds: xr.Dataset, name: str, seed: str | None, at: dict[str, int], x_key: str | None) -> dict[str, np.ndarray]:
    """mean, interval ends and n along the x key at one series (the values themselves and n=1
    without a seed dim)."""
    def along(var: str) -> np.ndarray:
        da = ds[var].isel(at)
        if x_key is None:
            return np.atleast_1d(np.asarray(da.values, dtype=float))
        return np.asarray(da.transpose(x_key).values, dtype=float)

    if seed is None:
        mean = along(name)
        return {"mean": mean, "low": np.full_like(mean, np.nan), "high": np.full_like(mean, np.nan),
                "n": np.isfinite(mean).astype(int)}
    return {"mean": along(f"{name}_mean"), "low": along(f"{name}_ci95_low"), "high": along(f"{name}_ci95_high"),
            "n": along(f"{name}_n").astype(int)}


def _x_axis(ds: xr.Dataset, x_key: str | None) -> tuple[np.ndarray, str, list[str] | None]:
    """x positions, axis label and tick labels (None: numeric ticks at the grid values)."""
    if x_key is None:
        return np.zeros(1), "", ["all runs"]
    values = ds[x_key].values
    if values.dtype.kind not in "iuf":
        return np.arange(len(values), dtype=float), x_key, [str(v) for v in values]
    values = values.astype(float)
    if x_key.split(".")[-1] == "sparsity" and np.all((values >= 0) & (values <= 1)):
        return 100 * values, "sparsity (%)", None
    return values, x_key, None


def _series_order(ds: xr.Dataset, others: list[str], idx: tuple[int, ...]) -> tuple[Any, ...]:
    """Methods in the registry's legend order, everything else in grid order."""
    return tuple(method_order(str(ds[k].values[i])) if _is_method(k) else i for k, i in zip(others, idx))


def _is_method(key: str) -> bool:
    return key.split(".")[-1] == "method"


def _series_label(ds: xr.Dataset, others: list[str], idx: tuple[int, ...]) -> str:
    if not others:
        return "all runs"
    values = [_text(ds[k].values[i]) for k, i in zip(others, idx)]
    return values[0] if len(others) == 1 else ", ".join(f"{k}={v}" for k, v in zip(others, values))


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)


def _style(ds: xr.Dataset, others: list[str], idx: tuple[int, ...], number: int) -> tuple[str, str]:
    """A method's own colour and marker when the lines are methods the datasets describe;
    otherwise a colour-blind-safe palette and distinct markers."""
    if len(others) == 1 and _is_method(others[0]):
        method = str(ds[others[0]].values[idx[0]])
        if method in methods_described(ds):
            return method_style(method)
    palette = sns.color_palette("colorblind", 10)
    colour = palette[number % len(palette)]
    return colour, MARKERS[number % len(MARKERS)]


def _draw(ax: Axes, x: np.ndarray, mean: np.ndarray, low: np.ndarray, high: np.ndarray, n: np.ndarray,
          colour: Any, marker: str):
    """A line with markers through the means; error bars where the interval exists (n >= 2);
    open markers where it does not."""
    order = np.argsort(x)
    x, mean, low, high, n = x[order], mean[order], low[order], high[order], n[order]
    has = np.isfinite(low) & np.isfinite(high)
    yerr = np.vstack([np.where(has, mean - low, 0.0), np.where(has, high - mean, 0.0)])
    container = ax.errorbar(x, mean, yerr=yerr, color=colour, marker=marker, capsize=3, elinewidth=1.1)
    lonely = np.isfinite(mean) & ~has
    if lonely.any():
        ax.plot(x[lonely], mean[lonely], linestyle="none", marker=marker, markerfacecolor="white",
                markeredgecolor=colour, zorder=3)
    return container


def _finite(ax: Axes) -> np.ndarray:
    values = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    values = np.concatenate(values) if values else np.array([])
    return values[np.isfinite(values)]

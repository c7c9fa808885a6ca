"""Figures from training metrics (metrics.nc): loss and accuracy across cycles (the
plateaus), and final test accuracy against sparsity or training FLOPs per method."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from .style import (
    NUMBER, TEXT, by_method, DENSE, PlotInputError, as_list, axis_label, is_levelwise,
    legend_outside, method_of, method_order,
    method_style, new_figure, percent, plain_log_axis, require, run_labels, set_title, styled,
)

REQUIRED = {"value": (("run", "cycle", "epoch", "split", "metric"), NUMBER), "run": (("run",), TEXT),
            "cycle": (("cycle",), NUMBER), "epoch": (("epoch",), NUMBER), "split": (("split",), TEXT),
            "metric": (("metric",), TEXT)}
BOUNDARY_COLOUR = "0.55"


def runs_of(datasets: Sequence[xr.Dataset]) -> list[xr.Dataset]:
    """One dataset per run (scalar coords run/method, sparsity over cycle), first seen kept."""
    runs, seen = [], set()
    for ds in as_list(datasets):
        require(ds, REQUIRED, "metrics")
        for index in range(ds.sizes["run"]):
            one = ds.isel(run=index)
            if str(one.run.item()) not in seen:
                seen.add(str(one.run.item()))
                runs.append(one)
    return runs


def _series(run: xr.Dataset, split: str, metric: str) -> xr.DataArray:
    if split not in run.split.values or metric not in run.metric.values:
        raise PlotInputError(f"run {run.run.item()} has no {split} {metric} in its metrics; was it evaluated?")
    return run.value.sel(split=split, metric=metric)


def _cycle_epochs(series: xr.DataArray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(cycle, epochs, values) of every cycle that has data, NaN rows dropped."""
    out = []
    for cycle in series.cycle.values:
        row = series.sel(cycle=cycle)
        finite = np.isfinite(row.values)
        if finite.any():
            out.append((int(cycle), row.epoch.values[finite].astype(float), row.values[finite].astype(float)))
    return out


def _cumulative(cycles: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Epochs counted across cycles: cycle c starts where c-1 ended, so its epoch-0 evaluation
    (just after the mask change) sits above the previous cycle's last point."""
    xs, ys, boundaries, offset = [], [], [], 0.0
    for index, (_, epochs, values) in enumerate(cycles):
        if index:
            boundaries.append(offset)
        xs.append(offset + epochs)
        ys.append(values)
        offset += epochs.max()
    return np.concatenate(xs), np.concatenate(ys), boundaries


@styled
def plot_metrics(datasets: xr.Dataset | Sequence[xr.Dataset]) -> Figure:
    """Training loss (log scale) and test accuracy against cumulative epoch, one line per run,
    cycle boundaries marked: the loss plateaus within cycles and the jumps at mask changes."""
    runs = by_method(runs_of(datasets))
    fig = new_figure(9.5, 6.0)
    loss_ax, accuracy_ax = fig.subplots(2, 1, sharex=True)
    handles, labels, all_boundaries, dense_finals = [], [], [], []
    for run, name in zip(runs, run_labels(runs)):
        colour, marker = method_style(method_of(run))
        style = dict(color=colour, linestyle="--" if method_of(run) == DENSE else "-", marker=marker,
                     markersize=3, markevery=1)
        x, y, boundaries = _cumulative(_cycle_epochs(_series(run, "train", "loss")))
        loss_ax.plot(x, y, **style)
        x, y, _ = _cumulative(_cycle_epochs(_series(run, "test", "accuracy")))
        (line,) = accuracy_ax.plot(x, 100 * y, **style)
        handles.append(line)
        labels.append(name)
        all_boundaries.append(tuple(boundaries))
        if method_of(run) == DENSE:
            dense_finals.append(y[-1])
    if dense_finals:
        # The dense reference: its final test accuracy across the whole run, labelled.
        colour, _ = method_style(DENSE)
        handles.append(accuracy_ax.axhline(100 * np.mean(dense_finals), color=colour, linestyle=":", linewidth=1.0))
        runs_text = f" (mean of {len(dense_finals)} runs)" if len(dense_finals) > 1 else ""
        labels.append(f"dense: final test accuracy {percent(float(np.mean(dense_finals)))}{runs_text}")
    boundary = _draw_boundaries([loss_ax, accuracy_ax], all_boundaries)
    if boundary is not None:
        handles.append(boundary)
        labels.append("cycle boundary (mask change,\nlearning-rate restart)")
    plain_log_axis(loss_ax)
    loss_ax.set_ylabel("training loss")
    accuracy_ax.set_ylabel("test accuracy (%)")
    accuracy_ax.set_xlabel("epoch, counted across cycles")
    accuracy_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    legend_outside(loss_ax, handles, labels)
    set_title(fig, "Training dynamics", runs if len(runs) > 1 else runs[:1])
    return fig


def _draw_boundaries(axes: list[Axes], per_run: list[tuple[float, ...]]) -> Line2D | None:
    """Every run's cycle boundaries, once each, in grey (a run that stopped earlier simply has
    no line after its last boundary)."""
    boundaries = sorted({x for run in per_run for x in run})
    style = dict(color=BOUNDARY_COLOUR, linestyle=(0, (1, 2)), linewidth=1.0)
    for ax in axes:
        for x in boundaries:
            ax.axvline(x, zorder=0, **style)
    return Line2D([], [], **style) if boundaries else None


# ---------------------------------------------------------------- accuracy against sparsity

def _final(series: xr.DataArray) -> list[tuple[int, float]]:
    """(cycle, test accuracy at the cycle's last evaluated epoch) for every cycle with data."""
    return [(cycle, float(values[-1])) for cycle, _, values in _cycle_epochs(series)]


def _points(run: xr.Dataset, x: str) -> list[tuple[float, float, float]]:
    """(sparsity, x, final test accuracy) of a run: on the sparsity axis every level of
    IMP/LRR, otherwise the end of the last cycle; x is the sparsity or the run's FLOPs."""
    finals = _final(_series(run, "test", "accuracy"))
    if not finals:
        return []
    sparsity = run.sparsity.values if run.sparsity.ndim else np.full(run.sizes["cycle"], float(run.sparsity))
    at = {int(c): float(sparsity[i]) for i, c in enumerate(run.cycle.values)}
    if x == "flops":
        return [(at[finals[-1][0]], float(run.training_flops), finals[-1][1])]
    # A level-wise method's every cycle is a result; the others count at the end of the last one.
    chosen = finals if is_levelwise(method_of(run)) else finals[-1:]
    points = [(at[c], at[c], acc) for c, acc in chosen if np.isfinite(at[c])]
    # An IMP/LRR level 0 is a dense network after one cycle: the dense runs are the reference there.
    return [p for p in points if p[0] > 0 or not is_levelwise(method_of(run))]


def _grouped(runs: list[xr.Dataset], x: str) -> dict[str, list[tuple[float, float, float, int]]]:
    """method -> [(x, mean accuracy, s.d. over seeds, number of seeds)] sorted by x. Seeds of
    one setting share method and sparsity (their FLOPs differ a little with their masks)."""
    by_method: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for run in runs:
        for sparsity, xv, acc in _points(run, x):
            key = round(sparsity, 4)
            by_method.setdefault(method_of(run), {}).setdefault(key, []).append((xv, acc))
    grouped = {}
    for method, points in by_method.items():
        rows = []
        for values in points.values():
            xs, accs = np.array(values).T
            rows.append((float(xs.mean()), float(accs.mean()), float(accs.std(ddof=1)) if len(accs) > 1 else 0.0, len(accs)))
        grouped[method] = sorted(rows)
    return grouped


@styled
def plot_sparsity(datasets: xr.Dataset | Sequence[xr.Dataset], x: str = "sparsity") -> Figure:
    """Final test accuracy against sparsity (or training FLOPs, x="flops"), one line per
    method: mean over seeds, error bars +-1 s.d.; the dense runs as a labelled line and band."""
    if x not in ("sparsity", "flops"):
        raise PlotInputError(f"x must be sparsity or flops, got {x!r}")
    runs = runs_of(datasets)
    if x == "flops":
        for run in runs:
            require(run, {"training_flops": ((), NUMBER)}, "metrics")
    grouped = _grouped(runs, x)
    if not grouped:
        raise PlotInputError("no run has a test accuracy to plot")
    fig = new_figure(8.5, 4.6)
    ax = fig.subplots()
    handles, labels = [], []
    for method in sorted(grouped, key=method_order):
        colour, marker = method_style(method)
        xs, means, spreads, seeds = (np.array(v) for v in zip(*grouped[method]))
        shown_x = xs if x == "flops" else 100 * xs
        if method == DENSE:
            handles += _dense_reference(ax, means, spreads, seeds, colour)
            labels += _dense_labels(means, spreads, seeds)
            if x == "flops":
                ax.plot(shown_x, 100 * means, color=colour, marker=marker, linestyle="none")
            continue
        container = ax.errorbar(shown_x, 100 * means, yerr=100 * spreads, color=colour, marker=marker, capsize=3)
        handles.append(container)
        labels.append(f"{method} ({_seed_text(seeds)})")
    if x == "flops":
        plain_log_axis(ax, "x", engineering=True)
        ax.set_xlabel(axis_label(runs[0].training_flops))
    else:
        ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("final test accuracy (%)")
    several = any(n > 1 for rows in grouped.values() for *_, n in rows)
    legend_outside(ax, handles, labels, title="mean ± s.d. over seeds" if several else "one seed per setting")
    what = "Final test accuracy vs " + ("training FLOPs" if x == "flops" else "sparsity")
    set_title(fig, what, runs)
    return fig


def _seed_text(seeds: np.ndarray) -> str:
    low, high = int(seeds.min()), int(seeds.max())
    count = str(low) if low == high else f"{low}-{high}"
    return f"{count} seed" + ("" if high == 1 else "s")


def _dense_reference(ax: Axes, means, spreads, seeds, colour) -> list:
    """The dense accuracy across the whole axis, its seed spread as a band; both in the legend."""
    mean, spread = 100 * float(means[0]), 100 * float(spreads[0])
    line = ax.axhline(mean, color=colour, linestyle="--", linewidth=1.4)
    if int(seeds[0]) < 2:
        return [line]
    band = ax.axhspan(mean - spread, mean + spread, color=colour, alpha=0.12, linewidth=0)
    return [line, Patch(facecolor=band.get_facecolor(), edgecolor="none")]


def _dense_labels(means, spreads, seeds) -> list[str]:
    labels = [f"dense: {percent(float(means[0]))} ({_seed_text(seeds)})"]
    if int(seeds[0]) >= 2:
        labels.append(f"dense ± 1 s.d. ({percent(float(spreads[0]))})")
    return labels

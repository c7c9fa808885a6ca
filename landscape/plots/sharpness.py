"""Largest Hessian eigenvalue (and the trace with its standard error) at every checkpoint,
several runs overlaid, the dense run's end point drawn as a labelled reference line."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .style import (
    NUMBER, TEXT, by_method, DENSE, as_list, axis_label, checkpoint_order,
    legend_outside, method_of, method_style, new_figure, plain_log_axis,
    require, run_labels, short_checkpoint, set_title, styled,
)

REQUIRED = {"eigenvalue": (("checkpoint", "eig_index"), NUMBER), "checkpoint": (("checkpoint",), TEXT),
            "eig_index": (("eig_index",), NUMBER)}
LOG_SPREAD = 30.0  # a log axis once the values span more than this factor


@styled
def plot_sharpness(datasets: xr.Dataset | Sequence[xr.Dataset]) -> Figure:
    """Top eigenvalue against checkpoint (a categorical axis: init, rewind, c0, c1, ...);
    a second panel with the Hutchinson trace and +-1 standard error when any run has it."""
    datasets = by_method(as_list(datasets))
    for ds in datasets:
        require(ds, REQUIRED, "sharpness")
    labels = sorted({str(c) for ds in datasets for c in ds.checkpoint.values}, key=checkpoint_order)
    position = {label: i for i, label in enumerate(labels)}
    with_trace = any("trace" in ds for ds in datasets)

    fig = new_figure(3.0 + 0.45 * len(labels) + (4.0 if with_trace else 0) + 2.6, 3.8)
    axes = fig.subplots(1, 2 if with_trace else 1, squeeze=False)[0]
    handles, names = [], []
    for ds, name in zip(datasets, run_labels(datasets)):
        x = [position[str(c)] for c in ds.checkpoint.values]
        for handle, label in _draw_run(axes[0], x, ds.eigenvalue.sel(eig_index=0).values, None, ds, name):
            handles.append(handle)
            names.append(label)
        if with_trace and "trace" in ds:
            stderr = ds["trace_stderr"].values if "trace_stderr" in ds else None
            _draw_run(axes[1], x, ds["trace"].values, stderr, ds, name)

    axes[0].set_ylabel(f"top {axis_label(datasets[0].eigenvalue)}")
    axes[0].set_title("largest eigenvalue")
    if with_trace:
        reference = next(ds for ds in datasets if "trace" in ds)
        axes[1].set_ylabel(axis_label(reference["trace"]))
        axes[1].set_title("trace (error bars: ±1 standard error)")
    for ax in axes:
        _checkpoint_axis(ax, labels)
        _log_if_spread(ax)
    legend_outside(axes[-1], handles, names)
    samples = {int(ds.samples) for ds in datasets if "samples" in ds.variables}
    extra = f"Hessian of the training loss on {', '.join(map(str, sorted(samples)))} samples" if samples else ""
    set_title(fig, "Sharpness", datasets, extra)
    return fig


def _draw_run(ax: Axes, x: list[int], y, yerr, ds: xr.Dataset, name: str) -> list[tuple]:
    """Draw one run; return its legend entries (handle, label)."""
    colour, marker = method_style(method_of(ds))
    order = np.argsort(x)
    x, y = np.asarray(x)[order], np.asarray(y, dtype=float)[order]
    yerr = None if yerr is None else np.asarray(yerr, dtype=float)[order]
    dense = method_of(ds) == DENSE
    line = ax.errorbar(x, y, yerr=yerr, color=colour, marker=marker, capsize=3 if yerr is not None else 0,
                       linestyle="--" if dense else "-")
    entries = [(line, name)]
    if dense:
        # The dense network at the end of training is the reference every sparse run is read against.
        reference = ax.axhline(y[-1], color=colour, linestyle=":", linewidth=1.0)
        entries.append((reference, f"{name}: end of training"))
    return entries


def _checkpoint_axis(ax: Axes, labels: list[str]) -> None:
    ax.set_xticks(range(len(labels)), [short_checkpoint(label) for label in labels])
    ax.set_xlim(-0.4, len(labels) - 0.6)
    ax.set_xlabel("checkpoint (cN: end of cycle N)")


def _log_if_spread(ax: Axes) -> None:
    low, high = np.inf, -np.inf
    for line in ax.get_lines():
        y = np.asarray(line.get_ydata(), dtype=float)
        y = y[np.isfinite(y)]
        if y.size:
            low, high = min(low, y.min()), max(high, y.max())
    if low > 0 and high / low > LOG_SPREAD:
        plain_log_axis(ax)

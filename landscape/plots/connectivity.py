"""Error and loss along the linear path between checkpoints (connectivity.nc), one panel per
split, with each pair's barrier in the legend and drawn as a segment at its arg-max alpha.

Barriers are read in the linear convention (Entezari et al. 2022): the rise of the path above
the straight line between its endpoints. The midpoint convention measures half of any
difference between the endpoints as a barrier, so a path that falls monotonically from one
endpoint to the other would show one; it stays in the dataset, not in the figure."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..barrier import barrier_linear
from .style import (
    NUMBER, TEXT, by_method, PlotInputError, as_list, axis_label, header_handle,
    legend_outside, mark_unit_interval, method_of, method_style,
    new_figure, percent, require, run_labels, scaled, short_checkpoint, set_title, styled,
)

PATH = ("pair", "split", "alpha")
REQUIRED = {"error": (PATH, NUMBER), "loss": (PATH, NUMBER), "alpha": (("alpha",), NUMBER),
            "split": (("split",), TEXT), "pair": (("pair",), TEXT)}
SPLIT_ORDER = ("train", "test")
QUANTITIES = (("error", True), ("loss", False))  # (variable, shown in %)


@styled
def plot_connectivity(datasets: xr.Dataset | Sequence[xr.Dataset]) -> Figure:
    """Rows error and loss, columns the splits; one line per pair, coloured by the run's
    method, lighter for earlier pairs."""
    datasets = by_method(as_list(datasets))
    for ds in datasets:
        require(ds, REQUIRED, "connectivity", may_be_empty=("pair",))  # a one-cycle run: no pairs yet
    drawn = [(ds, label) for ds, label in zip(datasets, run_labels(datasets)) if ds.sizes["pair"]]
    if not drawn:
        raise PlotInputError("the connectivity dataset has no pairs; a run needs at least two cycles")
    splits = [s for s in SPLIT_ORDER if any(s in ds.split.values for ds, _ in drawn)]
    splits += sorted({str(s) for ds, _ in drawn for s in ds.split.values} - set(splits))

    fig = new_figure(3.6 * len(splits) + 3.4, 6.2)
    axes = fig.subplots(len(QUANTITIES), len(splits), sharex=True, squeeze=False)
    handles, labels, headers = [], [], []
    for ds, run_label in drawn:
        if len(drawn) > 1:
            headers.append(len(handles))
            handles.append(header_handle())
            labels.append(run_label)
        for colour, pair in zip(_pair_colours(ds), ds.pair.values):
            one = ds.sel(pair=pair)
            for row, (name, as_pct) in enumerate(QUANTITIES):
                for col, split in enumerate(splits):
                    if split in one.split.values:
                        _draw_path(axes[row, col], one.sel(split=split), name, as_pct, colour)
            handles.append(Line2D([], [], color=colour, marker="o", markersize=3))
            labels.append(_pair_legend(one, splits))

    reference = drawn[0][0]
    for col, split in enumerate(splits):
        axes[0, col].set_title(f"{split} split")
        axes[-1, col].set_xlabel(axis_label(reference.alpha, fallback="interpolation coefficient alpha"))
        for row, (name, as_pct) in enumerate(QUANTITIES):
            mark_unit_interval(axes[row, col])
            if col == 0:
                axes[row, col].set_ylabel(axis_label(reference[name], as_pct))
    legend_outside(axes[0, -1], handles, labels, headers=headers,
                   title=f"pair: linear error barrier ({' / '.join(splits)})\n(cN: end of cycle N, cNeK: its epoch K)")
    bn = {str(ds.attrs.get("bn_mode", "")) for ds, _ in drawn} - {""}
    set_title(fig, "Linear interpolation between checkpoints", [d for d, _ in drawn],
              "barrier: rise above the line between the endpoints (dotted), linear convention"
              + (f"; BatchNorm statistics: {', '.join(sorted(bn))}" if bn else ""))
    return fig


def _pair_colours(ds: xr.Dataset) -> list:
    """The method's colour, from light (first pair) to full (last): pairs stay apart in
    greyscale, runs keep the colour they have in every other figure."""
    colour, _ = method_style(method_of(ds))
    n = ds.sizes["pair"]
    if n == 1:
        return [colour]
    light = sns.blend_palette(["#e8e8e8", colour], 8)[3]
    return sns.blend_palette([light, colour], n)


def _draw_path(ax, da_split: xr.Dataset, name: str, as_pct: bool, colour) -> None:
    alpha = np.asarray(da_split.alpha.values, dtype=float)
    values = scaled(da_split[name].values, as_pct)
    ax.plot(alpha, values, color=colour, marker="o", markersize=3)
    # The linear barrier: the chord between the endpoints, and a segment from it up to the
    # path where the path is furthest above it (nothing where the path never rises above).
    chord = values[0] + alpha * (values[-1] - values[0])
    ax.plot(alpha[[0, -1]], chord[[0, -1]], color=colour, linewidth=0.8, linestyle=":")
    at = int(np.argmax(values - chord))
    if values[at] > chord[at]:
        ax.plot([alpha[at], alpha[at]], [chord[at], values[at]], color=colour, linewidth=1.2)


def _pair_legend(one: xr.Dataset, splits: list[str]) -> str:
    a = str(one.checkpoint_a.item()) if "checkpoint_a" in one.coords else ""
    b = str(one.checkpoint_b.item()) if "checkpoint_b" in one.coords else ""
    name = f"{short_checkpoint(a)} → {short_checkpoint(b)}" if a and b else str(one.pair.item())
    barriers = [percent(float(barrier_linear(one.error.sel(split=s)))) if s in one.split.values else "–"
                for s in splits]
    return f"{name}: {' / '.join(barriers)}"

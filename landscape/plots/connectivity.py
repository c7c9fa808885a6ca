"""Error and loss along the linear path between checkpoints (connectivity.nc), one panel per
split, with each pair's barrier in the legend and drawn as a segment at its arg-max alpha."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .style import (
    NUMBER, TEXT, by_method, PlotInputError, as_list, axis_label, header_handle,
    legend_outside, mark_unit_interval, method_of, method_style,
    new_figure, percent, require, run_labels, scaled, short_checkpoint, set_title, styled,
)

PATH = ("pair", "split", "alpha")
REQUIRED = {"error": (PATH, NUMBER), "loss": (PATH, NUMBER), "alpha": (("alpha",), NUMBER),
            "split": (("split",), TEXT), "pair": (("pair",), TEXT), "error_barrier": (("pair", "split"), NUMBER)}
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
                   title=f"pair: error barrier ({' / '.join(splits)})")
    bn = {str(ds.attrs.get("bn_mode", "")) for ds, _ in drawn} - {""}
    set_title(fig, "Linear interpolation between checkpoints", [d for d, _ in drawn],
              f"BatchNorm statistics: {', '.join(sorted(bn))}" if bn else "")
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
    barrier_alpha = f"{name}_barrier_alpha"
    if barrier_alpha in da_split and np.isfinite(float(da_split[barrier_alpha])):
        # The barrier as a segment: from the mean of the endpoints up to the path's maximum.
        at = float(da_split[barrier_alpha])
        peak = float(np.interp(at, alpha, values))
        base = (values[0] + values[-1]) / 2
        ax.plot([at, at], [base, peak], color=colour, linewidth=1.0, linestyle=":")


def _pair_legend(one: xr.Dataset, splits: list[str]) -> str:
    a = str(one.checkpoint_a.item()) if "checkpoint_a" in one.coords else ""
    b = str(one.checkpoint_b.item()) if "checkpoint_b" in one.coords else ""
    name = f"{short_checkpoint(a)} → {short_checkpoint(b)}" if a and b else str(one.pair.item())
    barriers = [percent(float(one.error_barrier.sel(split=s))) if s in one.split.values else "–" for s in splits]
    return f"{name}: {' / '.join(barriers)}"

"""Loss and error surfaces (surface_*.nc): filled contours with the checkpoints marked at
their coordinates, one column per split; a 1-D surface is drawn as curves."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xarray as xr
from matplotlib import colors
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .style import NUMBER, TEXT, PlotInputError, as_list, new_figure, percent, require, set_title, styled

GRID = ("split", "beta", "alpha")
REQUIRED = {"error": (GRID, NUMBER), "loss": (GRID, NUMBER), "checkpoint_error": (("split", "checkpoint"), NUMBER),
            "checkpoint_alpha": (("checkpoint",), NUMBER), "checkpoint_beta": (("checkpoint",), NUMBER),
            "split": (("split",), TEXT)}
QUANTITIES = (("loss", False), ("error", True))  # (variable, shown in %)
LEVELS = 14
MARKERS = "o^s"
ASPECT = (0.4, 1.5)


@styled
def plot_surface(datasets: xr.Dataset | Sequence[xr.Dataset]) -> Figure:
    """One surface: rows loss and error, columns the splits."""
    datasets = as_list(datasets)
    if len(datasets) != 1:
        raise PlotInputError("a surface figure draws one surface dataset; plot each file on its own")
    ds = datasets[0]
    require(ds, REQUIRED, "surface")
    splits = [str(s) for s in ds.split.values]
    line = ds.sizes["beta"] == 1
    panel = 3.6 * (1.0 if line else _aspect(ds))  # a panel's height: the plane's true shape, within reason
    fig = new_figure(4.6 * len(splits) + 0.6, 2 * panel + 1.6)
    axes = fig.subplots(len(QUANTITIES), len(splits), squeeze=False, sharex=True, sharey=line is False)
    for col, split in enumerate(splits):
        one = ds.sel(split=split)
        for row, (name, as_pct) in enumerate(QUANTITIES):
            ax = axes[row, col]
            if line:
                _curve(ax, one, name, as_pct)
            else:
                _contours(fig, ax, one, name, as_pct)
            _mark_checkpoints(ax, one, name, as_pct, line)
            if row == 0:
                ax.set_title(f"{split} split")
            if row == len(QUANTITIES) - 1:
                ax.set_xlabel("alpha (along d1)")
            if col == 0:
                ax.set_ylabel(_quantity(name, as_pct) if line else "beta (along d2)")
    set_title(fig, f"{'Loss along a line' if line else 'Loss surface'}", [ds], _subtitle(ds))
    return fig


def _aspect(ds: xr.Dataset) -> float:
    """Height over width of the plane's box, kept within ASPECT (equal axes within that)."""
    span = [float(np.ptp(ds[axis].values)) or 1.0 for axis in ("alpha", "beta")]
    return float(np.clip(span[1] / span[0], *ASPECT))


def _quantity(name: str, as_pct: bool) -> str:
    return "error (%)" if as_pct else "loss (cross-entropy, nat)"


def _subtitle(ds: xr.Dataset) -> str:
    directions = str(ds.attrs.get("directions", ""))
    subspace = str(ds.attrs.get("subspace", ""))
    if directions == "random":
        where = f"filter-normalised random directions, {subspace} subspace"
        if subspace == "masked":
            where += " (pruned weights stay zero)"
    else:
        where = "through the checkpoints (axes in units of |theta_2 - theta_1|)"
    bn = str(ds.attrs.get("bn_mode", ""))
    return where + (f"; BatchNorm statistics: {bn}" if bn else "")


def _contours(fig: Figure, ax, one: xr.Dataset, name: str, as_pct: bool) -> None:
    values = np.asarray(one[name].values, dtype=float) * (100.0 if as_pct else 1.0)
    alpha, beta = np.asarray(one.alpha.values, float), np.asarray(one.beta.values, float)
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    logarithmic = not as_pct and low > 0 and high / low > 10  # losses far from a minimum span decades
    if high <= low:
        high = low + 1e-12
    if logarithmic:
        levels, norm = np.geomspace(low, high, LEVELS), colors.LogNorm(low, high)
    else:  # round numbers, covering the values
        levels, norm = MaxNLocator(LEVELS).tick_values(low, high), None
    filled = ax.contourf(alpha, beta, values, levels=levels, cmap="viridis", norm=norm, extend="neither")
    ax.contour(alpha, beta, values, levels=levels, colors="white", linewidths=0.4, alpha=0.6, norm=norm)
    if ASPECT[0] <= np.ptp(beta) / max(np.ptp(alpha), 1e-12) <= ASPECT[1]:  # else too thin to read at 1:1
        ax.set_aspect("equal", adjustable="box")
    bar = fig.colorbar(filled, ax=ax, fraction=0.05, pad=0.03)
    if not logarithmic:
        ticks = MaxNLocator(5).tick_values(levels[0], levels[-1])
        bar.set_ticks(ticks[(ticks >= levels[0]) & (ticks <= levels[-1])])
    bar.set_label(_quantity(name, as_pct) + (", log scale" if logarithmic else ""))



def _curve(ax, one: xr.Dataset, name: str, as_pct: bool) -> None:
    values = np.asarray(one[name].isel(beta=0).values, dtype=float) * (100.0 if as_pct else 1.0)
    ax.plot(one.alpha.values, values, color="#404040", marker="o", markersize=3)


def _mark_checkpoints(ax, one: xr.Dataset, name: str, as_pct: bool, line: bool) -> None:
    for k, label in enumerate(one.checkpoint.values):
        point = one.sel(checkpoint=label)
        value = float(point[f"checkpoint_{name}"]) * (100.0 if as_pct else 1.0)
        x, y = float(point.checkpoint_alpha), (value if line else float(point.checkpoint_beta))
        shown = percent(value / 100.0) if as_pct else f"{value:.3g}"
        ax.plot([x], [y], marker=MARKERS[k % len(MARKERS)], color="#d62728", markeredgecolor="white", markersize=7,
                linestyle="none", zorder=5)
        low, high = ax.get_xlim()
        right = x > low + 0.65 * (high - low)  # label on the inner side, inside the axes
        ax.annotate(f"{label}: {shown}", (x, y), textcoords="offset points", xytext=(-6 if right else 6, 6),
                    ha="right" if right else "left", fontsize=7, color="#d62728" if line else "white", zorder=6)

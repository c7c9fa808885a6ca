"""Figures about masks and kept weights: sign flips (signs.nc) per layer and cycle, and the
overlap of masks (overlap.nc) as annotated Jaccard and observed/chance matrices."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from .style import (
    NUMBER, TEXT, by_method, PlotInputError, as_list, axis_label, legend_outside,
    method_of, method_style, new_figure, require,
    run_labels, scaled, set_title, short_checkpoint, styled,
)

SIGNS_REQUIRED = {"flip_fraction": (("pair", "layer"), NUMBER), "flip_fraction_total": (("pair",), NUMBER),
                  "pair": (("pair",), TEXT), "layer": (("layer",), TEXT), "reference": (("pair",), TEXT),
                  "cycle": (("pair",), NUMBER)}
MATRIX = ("mask_a", "mask_b")
OVERLAP_REQUIRED = {"jaccard_total": (MATRIX, NUMBER), "jaccard_ratio_total": (MATRIX, NUMBER),
                    "mask_a": (("mask_a",), TEXT), "mask_b": (("mask_b",), TEXT)}
SEQUENTIAL = "rocket_r"  # light = low: reads the same in greyscale
REFERENCE_LINES = {"init": "-", "rewind": "--", "previous cycle": ":"}
ANNOTATE_MAX_CELLS = 120  # beyond this the numbers in the cells become unreadable


def reference_kind(label: str) -> str:
    """A pair's reference as its kind: init, rewind, or the previous cycle's checkpoint."""
    return label if label in ("init", "rewind") else "previous cycle"


@styled
def plot_signs(datasets: xr.Dataset | Sequence[xr.Dataset]) -> Figure:
    """Top: overall sign-flip fraction against cycle, one line per run and reference.
    Below: per run, the flip fraction of every layer (rows) and checkpoint (columns)."""
    datasets = by_method(as_list(datasets))
    for ds in datasets:
        require(ds, SIGNS_REQUIRED, "signs")
    names = run_labels(datasets)
    columns = 1 if len(datasets) == 1 else 2
    heat_rows = -(-len(datasets) // columns)
    layers = max(ds.sizes["layer"] for ds in datasets)
    pairs = max(ds.sizes["pair"] for ds in datasets)
    heat_height = 1.2 + 0.28 * layers
    fig = new_figure(max(9.0, columns * (2.8 + 0.45 * pairs) + 1.5), 3.2 + heat_rows * heat_height)
    # Two subfigures, each laid out on its own: the legend beside the line plot cannot
    # squeeze the heatmaps, nor the colour bar the line plot.
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.0, heat_rows * heat_height])
    _overall_flips(top.subplots(), datasets, names)

    vmax = max((float(np.nanmax(ds.flip_fraction.values)) for ds in datasets if ds.flip_fraction.size), default=1.0)
    heat_axes = bottom.subplots(heat_rows, columns, squeeze=False).ravel()
    for ax, ds, name in zip(heat_axes, datasets, names):
        mesh = _flip_heatmap(ax, ds, 100 * vmax)
        ax.set_title(name)
    for ax in heat_axes[len(datasets):]:
        ax.set_axis_off()
    colourbar = bottom.colorbar(mesh, ax=list(heat_axes), shrink=0.9, aspect=30)
    colourbar.set_label(axis_label(datasets[0].flip_fraction, as_percent=True))
    set_title(fig, "Sign flips of weights kept in both checkpoints", datasets)
    return fig


def _overall_flips(ax: Axes, datasets: list[xr.Dataset], names: list[str]) -> None:
    handles, labels = [], []
    for ds, name in zip(datasets, names):
        colour, marker = method_style(method_of(ds))
        kinds = np.array([reference_kind(str(r)) for r in ds.reference.values])
        for kind in [k for k in REFERENCE_LINES if k in kinds]:
            chosen = ds.isel(pair=np.flatnonzero(kinds == kind)).sortby("cycle")
            (line,) = ax.plot(chosen.cycle.values, scaled(chosen.flip_fraction_total.values, True),
                              color=colour, marker=marker, linestyle=REFERENCE_LINES[kind])
            handles.append(line)
            labels.append(f"{name}, against {kind}" if len(datasets) > 1 else f"against {kind}")
    cycles = sorted({int(c) for ds in datasets for c in ds.cycle.values})
    ax.set_xticks(cycles)
    ax.set_xlabel("cycle")
    ax.set_ylabel(axis_label(datasets[0].flip_fraction_total, as_percent=True))
    ax.set_title("all prunable layers")
    legend_outside(ax, handles, labels)


def _flip_heatmap(ax: Axes, ds: xr.Dataset, vmax_percent: float):
    order = sorted(range(ds.sizes["pair"]), key=lambda i: (
        list(REFERENCE_LINES).index(reference_kind(str(ds.reference.values[i]))), int(ds.cycle.values[i])))
    chosen = ds.isel(pair=order)
    values = scaled(chosen.flip_fraction.transpose("layer", "pair").values, True)
    columns = [f"{short_checkpoint(str(c))} vs {short_checkpoint(str(r))}"
               for c, r in zip(chosen.checkpoint.values, chosen.reference.values)] if "checkpoint" in chosen.coords \
        else [str(p) for p in chosen.pair.values]
    rows = [_layer_name(str(layer)) for layer in chosen.layer.values]
    sns.heatmap(values, ax=ax, cmap=SEQUENTIAL, vmin=0, vmax=vmax_percent, cbar=False, linewidths=0.5,
                annot=values.size <= ANNOTATE_MAX_CELLS, fmt=".0f", annot_kws={"fontsize": 7},
                xticklabels=columns, yticklabels=rows)
    _rotate_x(ax, 45)
    ax.grid(False)
    ax.set_xlabel("")
    ax.set_ylabel("layer")
    return ax.collections[0]


def _layer_name(name: str) -> str:
    """The layer a weight belongs to: `conv.weight` -> `conv`, `attn.in_proj_weight` -> `attn.in_proj`."""
    return name.removesuffix(".weight").removesuffix("_weight")


@styled
def plot_overlap(datasets: xr.Dataset | Sequence[xr.Dataset]) -> Figure:
    """Jaccard index of every pair of masks, and Jaccard / chance for independent masks of
    the same per-layer densities (1 = no more overlap than chance)."""
    datasets = as_list(datasets)
    if len(datasets) != 1:
        raise PlotInputError("the overlap figure draws one overlap.nc; compare more masks in one `landscape overlap` call")
    ds = datasets[0]
    require(ds, OVERLAP_REQUIRED, "overlap")
    labels_a = [short_checkpoint(str(m)) for m in ds.mask_a.values]
    labels_b = [short_checkpoint(str(m)) for m in ds.mask_b.values]
    # A mask against itself (Jaccard 1, ratio 1/chance) says nothing and would set the colour
    # scale: those cells are left blank.
    itself = np.equal.outer(ds.mask_a.values.astype(str), ds.mask_b.values.astype(str))
    side = 1.4 + 0.6 * max(len(labels_a), len(labels_b))
    fig = new_figure(2 * side + 2.6, side + 0.9)
    left, right = fig.subplots(1, 2)
    jaccard = ds.jaccard_total.transpose("mask_a", "mask_b").values
    ratio = ds.jaccard_ratio_total.transpose("mask_a", "mask_b").values
    _matrix(left, jaccard, itself, labels_a, labels_b, dict(cmap=SEQUENTIAL, vmin=0, vmax=1),
            axis_label(ds.jaccard_total), "observed")
    limits = _ratio_limits(ratio, itself)
    _matrix(right, np.clip(ratio, *limits), itself, labels_a, labels_b,
            dict(cmap="vlag", norm=LogNorm(*limits)), axis_label(ds.jaccard_ratio_total),
            "relative to chance", annotations=ratio)
    _ratio_ticks(right.collections[0].colorbar, limits)
    masks = len(set(labels_a) | set(labels_b))
    set_title(fig, "Mask overlap", [ds], f"{masks} masks, all prunable layers")
    return fig


def _ratio_limits(ratio: np.ndarray, itself: np.ndarray) -> tuple[float, float]:
    """Log-symmetric limits around 1, so that 'twice chance' and 'half chance' look alike."""
    values = ratio[~itself & np.isfinite(ratio) & (ratio > 0)]
    spread = 1.5  # at least: a matrix of near-chance values stays pale rather than saturated
    if values.size:
        spread = max(spread, float(values.max()), float(1 / values.min()))
    return 1 / spread, spread


def _ratio_ticks(colourbar, limits: tuple[float, float]) -> None:
    """Plain numbers (0.5, 0.8, 1, 1.25, 2) on the log colour bar instead of powers of ten."""
    low, high = limits
    ticks = [t for t in (0.1, 0.2, 0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 5, 10, 20, 50, 100) if low <= t <= high]
    colourbar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    colourbar.ax.minorticks_off()


def _matrix(ax: Axes, values: np.ndarray, blank: np.ndarray, rows: list[str], columns: list[str], colours: dict,
            colour_label: str, title: str, annotations: np.ndarray | None = None) -> None:
    shown = values if annotations is None else annotations
    sns.heatmap(values, ax=ax, mask=blank, annot=shown if shown.size <= ANNOTATE_MAX_CELLS else False, fmt=".2f",
                square=True, xticklabels=columns, yticklabels=rows, linewidths=0.5,
                cbar_kws={"label": colour_label, "shrink": 0.8}, **colours)
    ax.set_title(title)
    ax.grid(False)
    ax.set_xlabel("mask B")
    ax.set_ylabel("mask A")
    ax.tick_params(axis="y", labelrotation=0)
    _rotate_x(ax, 35)


def _rotate_x(ax: Axes, degrees: float) -> None:
    ax.tick_params(axis="x", labelrotation=degrees)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
        label.set_rotation_mode("anchor")

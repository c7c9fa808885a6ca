"""The one figure style: a seaborn theme, a fixed colour and marker per method, axis labels
from `long_name`/`units`, titles from what the datasets say was run, legends outside the axes.

Imports neither torch nor sparse_training, so figures can be redrawn from .nc files anywhere.
What a figure knows of the methods (colour, marker, legend order, whether every cycle is a
level) comes with the datasets: `landscape plot` writes the engine's method registry into
their attrs (METHOD_STYLES_ATTR); a method no dataset describes is drawn in a neutral style."""

from __future__ import annotations

import contextvars
import functools
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import matplotlib
import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, FuncFormatter

FORMATS = ("png", "pdf", "svg")
DPI = 200

# {method: {"colour", "marker", "levelwise"}} as JSON, in legend order.
METHOD_STYLES_ATTR = "method_styles"
UNKNOWN_STYLE = ("#7f7f7f", ".")
DENSE = "dense"
# The methods of the datasets being drawn: set by `styled` for the duration of one figure.
_METHODS: contextvars.ContextVar[dict[str, dict[str, Any]]] = contextvars.ContextVar("methods", default={})

_RC = {
    **sns.axes_style("whitegrid"),
    **sns.plotting_context("paper", font_scale=1.15),
    "axes.edgecolor": "0.3",
    "grid.color": "0.9",
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.bbox": "tight",
    "lines.linewidth": 1.6,
    "lines.markersize": 5,
}


class PlotInputError(ValueError):
    """A dataset that cannot be drawn (missing variables, nothing to plot); one line."""


def styled(func: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw the datasets (the first argument) under the project style and the method styles
    they carry, without touching the caller's global rcParams."""

    @functools.wraps(func)
    def wrapper(datasets: xr.Dataset | Sequence[xr.Dataset], *args: Any, **kwargs: Any) -> Figure:
        token = _METHODS.set(methods_described(datasets))
        try:
            with matplotlib.rc_context(_RC):
                return func(datasets, *args, **kwargs)
        finally:
            _METHODS.reset(token)

    return wrapper


def methods_described(datasets: xr.Dataset | Sequence[xr.Dataset]) -> dict[str, dict[str, Any]]:
    """{method: {"colour", "marker", "levelwise"}} from the datasets' METHOD_STYLES_ATTR, in
    legend order; an attr that is not such a table is ignored."""
    table: dict[str, dict[str, Any]] = {}
    for ds in [datasets] if isinstance(datasets, xr.Dataset) else datasets:
        try:
            described = json.loads(ds.attrs.get(METHOD_STYLES_ATTR, "{}"))
        except (TypeError, json.JSONDecodeError):
            continue
        if isinstance(described, dict):
            for method, entry in described.items():
                if isinstance(entry, dict):
                    table.setdefault(method, entry)
    return table


def new_figure(width: float, height: float) -> Figure:
    # Figure() rather than pyplot: no GUI backend chosen, nothing registered, nothing to close.
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Figure, path: str | Path, fmt: str | None = None) -> Path:
    """Write `fig` to `path` (format from `fmt` or the suffix), creating the folder."""
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".") or "png"
    if fmt not in FORMATS:
        raise PlotInputError(f"unknown figure format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Legends taken out of the layout (see legend_outside) must still count for the crop;
    # the list given replaces the default one, so that one goes in too.
    legends = [ax.get_legend() for ax in fig.get_axes() if ax.get_legend() is not None]
    with matplotlib.rc_context(_RC):
        fig.savefig(path, format=fmt, dpi=DPI, bbox_extra_artists=fig.get_default_bbox_extra_artists() + legends)
    return path


# ---------------------------------------------------------------- checking inputs

def as_list(datasets: xr.Dataset | Sequence[xr.Dataset]) -> list[xr.Dataset]:
    items = [datasets] if isinstance(datasets, xr.Dataset) else list(datasets)
    if not items:
        raise PlotInputError("no dataset to plot")
    return items


def by_method(datasets: list[xr.Dataset]) -> list[xr.Dataset]:
    """Runs in the fixed method order (dense first), so legends read alike in every figure."""
    return sorted(datasets, key=lambda ds: method_order(method_of(ds)))


NUMBER, TEXT = "number", "text"  # what a required variable of a figure holds
Schema = Mapping[str, tuple[tuple[str, ...], str]]  # name -> (its dims, NUMBER or TEXT)


def require(ds: xr.Dataset, schema: Schema, kind: str, may_be_empty: Iterable[str] = ()) -> None:
    """`ds` must hold every variable of `schema` with its dims, numbers where numbers belong,
    no empty dimension (other than `may_be_empty`) and at least one finite value in every
    numeric data variable: a file that was edited or crafted is one line, never a crash
    inside matplotlib."""
    source = ds.attrs.get("source_path") or "the dataset"
    written_by = f"pass a {kind}.nc written by `landscape {kind}`"
    missing = [name for name in schema if name not in ds.variables]
    if missing:
        raise PlotInputError(f"{source} lacks {', '.join(missing)} needed for the {kind} figure; {written_by}")
    for name, (dims, holds) in schema.items():
        problem = _problem(ds[name], dims, holds, set(may_be_empty), name in ds.data_vars)
        if problem:
            raise PlotInputError(f"{source}: {name} {problem}, which the {kind} figure cannot draw; {written_by}")


def _problem(da: xr.DataArray, dims: tuple[str, ...], holds: str, may_be_empty: set[str], data: bool) -> str | None:
    """What is wrong with one required variable, or None."""
    if da.dims != dims:
        return f"has dims ({', '.join(map(str, da.dims))}) where ({', '.join(dims)}) belong"
    empty = next((dim for dim in dims if da.sizes[dim] == 0 and dim not in may_be_empty), None)
    if empty is not None:
        return f"has no {empty} entries"
    if holds == NUMBER and da.dtype.kind not in "iuf":
        return f"holds {da.dtype} values where numbers belong"
    if holds == NUMBER and data and da.size and not bool(np.isfinite(da.values).any()):
        return "holds no finite value"
    return None


# ---------------------------------------------------------------- what was run

def method_style(method: str) -> tuple[str, str]:
    entry = _METHODS.get().get(method, {})
    return str(entry.get("colour", UNKNOWN_STYLE[0])), str(entry.get("marker", UNKNOWN_STYLE[1]))


def method_order(method: str) -> int:
    names = list(_METHODS.get())
    return names.index(method) if method in names else len(names)


def is_levelwise(method: str) -> bool:
    """Every cycle of the method ends at a new sparsity that is itself a result (an IMP/LRR level)."""
    return bool(_METHODS.get().get(method, {}).get("levelwise", False))


def scalar(ds: xr.Dataset, name: str, default: Any = "") -> Any:
    """A scalar coord or attr (coords first: what code relies on lives there)."""
    if name in ds.coords and ds.coords[name].ndim == 0:
        return ds.coords[name].item()
    return ds.attrs.get(name, default)


def method_of(ds: xr.Dataset) -> str:
    return str(scalar(ds, "method") or "")


def sparsity_of(ds: xr.Dataset) -> float | None:
    """The run's target sparsity (attr set from its config), else the largest recorded."""
    value = ds.attrs.get("target_sparsity")
    if value is not None and value != "":
        return float(value)
    if "sparsity" in ds.coords and ds.coords["sparsity"].size:
        values = np.asarray(ds.coords["sparsity"].values, dtype=float)
        if np.isfinite(values).any():
            return float(np.nanmax(values))
    return None


def percent(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f} %"


def sparsity_text(value: float) -> str:
    """0.9 -> '90 %', 0.968 -> '96.8 %': as many digits as the value has, up to two."""
    return f"{round(100 * value, 2):g} %"


def run_label(ds: xr.Dataset, with_run: bool = False) -> str:
    """'pai-cyclic, 90 % sparse' (the run name added where two inputs would read alike)."""
    method = method_of(ds) or str(scalar(ds, "run")) or "run"
    sparsity = sparsity_of(ds)
    label = method if method == DENSE or not sparsity else f"{method}, {sparsity_text(sparsity)} sparse"
    run = str(scalar(ds, "run"))
    return f"{label} ({run})" if with_run and run else label


def run_labels(datasets: Sequence[xr.Dataset]) -> list[str]:
    plain = [run_label(ds) for ds in datasets]
    return [run_label(ds, with_run=plain.count(p) > 1) for ds, p in zip(datasets, plain)]


def set_title(fig: Figure, what: str, datasets: Sequence[xr.Dataset], extra: str = "") -> None:
    """'<what>: <model> on <data>; <method, sparsity>; <extra>' from what the datasets record,
    wrapped to the figure's width."""
    models = sorted({str(ds.attrs.get("model", "")) for ds in datasets} - {""})
    data = sorted({str(ds.attrs.get("data", "")) for ds in datasets} - {""})
    parts = []
    if models or data:
        parts.append(" on ".join(filter(None, [", ".join(models), ", ".join(data)])))
    if len(datasets) == 1 and method_of(datasets[0]):
        parts.append(run_label(datasets[0]))
    if extra:
        parts.append(extra)
    characters = int(fig.get_figwidth() * 10)  # about what fits at the title's font size
    lines = [f"{what}:" if parts else what]
    for part in parts:  # break between parts, never inside "90 % sparse"
        joined = f"{lines[-1]} {part}" if lines[-1].endswith(":") else f"{lines[-1]}; {part}"
        lines[-1:] = [joined] if len(joined) <= characters else [lines[-1] + ("" if lines[-1].endswith(":") else ";"), part]
    fig.suptitle("\n".join(lines))


# ---------------------------------------------------------------- axes

def axis_label(da: xr.DataArray, as_percent: bool = False, fallback: str = "") -> str:
    """'long_name (units)'; dimensionless units ('1') are left out, fractions shown in %."""
    name = str(da.attrs.get("long_name") or fallback or da.name or "")
    units = "%" if as_percent else str(da.attrs.get("units", ""))
    redundant = units in ("", "1") or units.lower() in name.lower()  # "training FLOPs (FLOPs)"
    return name if redundant else f"{name} ({units})"


def plain_log_axis(ax: Axes, axis: str = "y", engineering: bool = False) -> None:
    """A log axis labelled 0.1, 0.2, 0.5 (or 2 G, 5 G) rather than powers of ten: decades,
    and between them only the 2s, 3s and 5s so the labels never crowd."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    plain = EngFormatter(sep=" ") if engineering else FuncFormatter(lambda value, _: f"{value:g}")

    def minor(value: float, position: int) -> str:
        mantissa = round(value / 10 ** np.floor(np.log10(value)), 6) if value > 0 else 0
        return plain(value, position) if mantissa in (2, 3, 5) else ""

    target.set_major_formatter(plain)
    target.set_minor_formatter(FuncFormatter(minor))
    target.set_tick_params(which="both", length=3, pad=3)  # minor labels level with major ones


def scaled(values: Any, as_percent: bool) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return 100 * values if as_percent else values


def legend_outside(ax: Axes, handles: list, labels: list[str], title: str | None = None,
                   headers: Sequence[int] = ()) -> None:
    """The figure's one legend, right of `ax` (the top-right axes), so it never covers data
    and stays below the title; entries at `headers` are bold group names."""
    if not handles:
        return
    legend = ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.03, 1.0), borderaxespad=0.0,
                       title=title, alignment="left")
    for index in headers:
        legend.get_texts()[index].set_fontweight("bold")
    _keep_rows_when_taller(ax, legend)


def _keep_rows_when_taller(ax: Axes, legend) -> None:
    """A legend taller than its axes would stretch that row of the layout: take it out of the
    layout and widen the figure by its width instead, so the axes keep their size."""
    fig = ax.get_figure(root=True)
    fig.draw_without_rendering()
    if legend.get_window_extent().height <= ax.get_window_extent().height:
        return
    legend.set_in_layout(False)
    share = (legend.get_window_extent().width + 0.3 * fig.dpi) / fig.bbox.width
    fig.set_figwidth(fig.get_figwidth() / (1 - share))
    fig.get_layout_engine().set(rect=(0, 0, 1 - share, 1))


def header_handle() -> Line2D:
    """An invisible legend handle, for a group name written in the legend."""
    return Line2D([], [], linestyle="none")


def mark_unit_interval(ax: Axes, axis: str = "x") -> None:
    (ax.set_xlim if axis == "x" else ax.set_ylim)(-0.02, 1.02)


def short_checkpoint(label: str) -> str:
    """'cycle_003' -> 'c3', 'cycle_003_epoch_010' -> 'c3e10', 'runA/cycle_001' -> 'runA/c1';
    init, rewind and other names stay."""
    run, _, stem = label.rpartition("/")
    parts = stem.split("_")
    if parts[0] != "cycle" or not all(p.isdigit() for p in parts[1::2]) or len(parts) not in (2, 4):
        return label
    text = f"c{int(parts[1])}" + (f"e{int(parts[3])}" if len(parts) == 4 else "")
    return f"{run}/{text}" if run else text


def checkpoint_order(label: str) -> tuple[int, str]:
    """init, rewind, then cycles in order: the order training wrote them."""
    return {"init": (0, ""), "rewind": (1, "")}.get(label, (2, label))

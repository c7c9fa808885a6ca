"""Figures from analysis datasets: each function takes xarray datasets and returns a
matplotlib Figure. Imports neither torch nor sparse_training, so a figure can be redrawn
from .nc files on any machine."""

from .aggregate import plot_aggregate
from .connectivity import plot_connectivity
from .masks import plot_overlap, plot_signs
from .sharpness import plot_sharpness
from .surface import plot_surface
from .style import FORMATS, METHOD_STYLES_ATTR, PlotInputError, save_figure
from .training import plot_metrics, plot_sparsity

# figure kind -> (function, the analysis dataset it draws: RUN/analysis/<name>.nc)
PLOTS = {
    "connectivity": (plot_connectivity, "connectivity"),
    "sharpness": (plot_sharpness, "sharpness"),
    "signs": (plot_signs, "signs"),
    "overlap": (plot_overlap, "overlap"),
    "metrics": (plot_metrics, "metrics"),
    "sparsity": (plot_sparsity, "metrics"),
    "surface": (plot_surface, "surface"),
    "aggregate": (plot_aggregate, "aggregate"),
}

__all__ = [
    "FORMATS", "METHOD_STYLES_ATTR", "PLOTS", "PlotInputError", "plot_aggregate", "plot_connectivity", "plot_metrics",
    "plot_overlap", "plot_sharpness", "plot_signs", "plot_sparsity", "plot_surface", "save_figure",
]

"""`landscape plot KIND INPUT...`: figures from analysis datasets.

An INPUT is a run directory (its analysis/KIND.nc is drawn; metrics come straight from its
metrics.csv) or a .nc file. One run in, RUN/figures/KIND.png out; a lone .nc file gets its
figure beside it; several runs go to ./KIND.png unless --out says otherwise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .output import emit, handle_errors, json_option

KINDS = {
    "connectivity": "Error and loss along the line between checkpoints, train and test, barrier per pair.",
    "sharpness": "Top Hessian eigenvalue (and trace +- standard error) per checkpoint, runs overlaid.",
    "signs": "Sign-flip fraction per layer and cycle (heatmap) and overall against cycle.",
    "overlap": "Jaccard index of masks and its ratio to chance, as annotated matrices.",
    "metrics": "Training loss and test accuracy against epoch across cycles, boundaries marked.",
    "sparsity": "Final test accuracy against sparsity (or --x flops) per method, dense reference drawn.",
    "surface": "Loss and error contours of a surface dataset, checkpoints marked at their coordinates.",
    "aggregate": "A sweep's test accuracy and training FLOPs against its first numeric grid key, 95 % t-intervals over seeds.",
}
FORMATS = ("png", "pdf", "svg")  # landscape.plots.FORMATS, repeated so --help needs no matplotlib
METRICS_KINDS = ("metrics", "sparsity")  # drawn from training metrics, not an analysis file


@click.group()
def plot() -> None:
    """Figures from analysis datasets (PNG by default; --format pdf|svg).

    \b
    Examples:
      landscape plot connectivity runs/lrr90
      landscape plot sharpness runs/dense runs/lrr90 runs/sculpt90 --out sharpness.pdf
      landscape plot sparsity runs/* --x flops
    """


def _command(kind: str, help_text: str) -> click.Command:
    @click.command(name=kind, help=help_text + "\n\nINPUT: run directories or .nc files.")
    @click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
    @click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="Image format. [png, or --out's suffix]")
    @click.option("--out", type=click.Path(dir_okay=False), default=None,
                  help="Figure file. [RUN/figures/KIND.FORMAT for one run; beside a lone .nc; else ./KIND.FORMAT]")
    @json_option
    @handle_errors
    def command(inputs: tuple[str, ...], fmt: str | None, out: str | None, as_json: bool, **options: Any) -> None:
        path = draw(kind, inputs, out=out, fmt=fmt, **options)
        emit({"kind": kind, "figure": str(path), "inputs": list(inputs)}, as_json, f"{kind} figure -> {path}")

    if kind == "sparsity":
        command = click.option("--x", "x", type=click.Choice(["sparsity", "flops"]), default="sparsity", show_default=True,
                               help="x-axis: the runs' sparsity, or their total training FLOPs (iso-FLOP view).")(command)
    return command


for _kind, _help in KINDS.items():
    plot.add_command(_command(_kind, _help))


# ---------------------------------------------------------------- library entry (also used by `landscape demo`)

def draw(kind: str, inputs: tuple[str, ...] | list[str], out: str | Path | None = None, fmt: str | None = None,
         **options: Any) -> Path:
    """Read the inputs, draw the `kind` figure, write it; return where it went."""
    from landscape import plots
    from sparse_training.errors import UserError

    datasets, homes, places = [], [], []
    for item, run_name in zip(inputs, _run_names(inputs)):
        ds, home, place = _load(kind, Path(item), run_name)
        datasets.append(ds)
        homes.append(home)
        places.append(place)
    path, fmt = _output_path(kind, homes, places, out, fmt)
    function, _ = plots.PLOTS[kind]
    try:
        figure = function(datasets, **options)
    except plots.PlotInputError as error:
        raise UserError(str(error)) from None
    return plots.save_figure(figure, path, fmt)


def _run_names(inputs) -> list[str]:
    """Run names for metrics: directory names, the typed paths where two would clash."""
    names = [Path(item).resolve().name for item in inputs]
    return [name if names.count(name) == 1 else str(item) for name, item in zip(names, inputs)]


def _load(kind: str, path: Path, run_name: str):
    """(dataset, the run it belongs to or None, where its own figure goes less the suffix)."""
    from landscape.store import read_dataset
    from sparse_training.errors import UserError
    from sparse_training.rundir import RunDir, figure_output, run_of_analysis

    if path.is_dir():
        run = RunDir(path)
        if not run.exists():
            raise UserError(f"{path} is neither a run directory (no config.json) nor a .nc dataset")
        if kind in METRICS_KINDS:
            from landscape.dynamics import metrics_dataset

            ds = metrics_dataset([run], [run_name])
        else:
            source = _analysis_file(run, kind, path)
            if not source.exists():
                raise UserError(f"{path} has no {source.relative_to(run.path)} yet; compute it with "
                                f"`landscape {kind} {path}`")
            ds = read_dataset(source)
        return _annotated(ds, [run]), run, run.figure_file(kind).with_suffix("")
    ds = read_dataset(path)
    ds.attrs["source_path"] = str(path)
    run = run_of_analysis(path)
    place = figure_output(path, kind).with_suffix("")
    return _annotated(ds, [run] if run is not None else _runs_of_inputs(ds, path)), run, place


def _analysis_file(run, kind: str, path: Path) -> Path:
    """RUN/analysis/<kind>.nc, or the one <kind>_*.nc there (surfaces are named after their
    checkpoints); several of those need the file named."""
    from sparse_training.errors import UserError

    source = run.analysis_file(kind)
    if source.exists():
        return source
    named = sorted(source.parent.glob(f"{kind}_*.nc"))
    if len(named) > 1:
        raise UserError(f"{path} has {len(named)} {kind} datasets ({', '.join(p.name for p in named)}); "
                        "name the one to draw")
    return named[0] if named else source


def _runs_of_inputs(ds, path: Path) -> list:
    """The runs a dataset was computed from, found through its provenance `inputs`
    (checkpoints or metrics.csv files, relative to the dataset's folder), where they still exist."""
    from sparse_training.rundir import run_of_file

    try:
        inputs = json.loads(ds.attrs.get("inputs", "[]"))
    except (TypeError, json.JSONDecodeError):
        return []
    runs = {}
    for item in inputs if isinstance(inputs, list) else []:
        run = run_of_file(path.parent / str(item))
        if run is not None:
            runs.setdefault(str(run.path.resolve()), run)
    return list(runs.values())


def _annotated(ds, runs: list):
    """Add what the figure titles need from the runs' configs: model and data (when the runs
    agree), and for one run its target sparsity and method; what the dataset records wins. The
    method registry's styles go in too: figures never import the engine."""
    from landscape.plots import METHOD_STYLES_ATTR
    from sparse_training.methods import style_table
    from sparse_training.records import read_config

    ds.attrs.setdefault(METHOD_STYLES_ATTR, json.dumps(style_table()))
    configs = [read_config(run) for run in runs]
    for key, values in (("model", {c.model.name for c in configs}), ("data", {c.data.name for c in configs})):
        if len(values) == 1:
            ds.attrs.setdefault(key, values.pop())
    if len(configs) == 1 and "run" not in ds.dims:
        ds.attrs.setdefault("target_sparsity", float(configs[0].prune.sparsity))
        if "method" not in ds.coords or not str(ds.coords["method"].item()):
            ds = ds.assign_coords(method=configs[0].run.method)
    return ds


def _output_path(kind: str, homes: list, places: list[Path], out: str | Path | None, fmt: str | None) -> tuple[Path, str]:
    from sparse_training.errors import UserError

    if out is not None:
        out = Path(out)
        suffix = out.suffix.lstrip(".").lower()
        if suffix and suffix not in FORMATS:
            raise UserError(f"--out {out} has suffix .{suffix}; figures are {', '.join(FORMATS)}")
        if fmt and suffix and suffix != fmt:
            raise UserError(f"--out {out} and --format {fmt} disagree; give one of them")
        fmt = fmt or suffix or "png"
        return (out if suffix else out.with_name(f"{out.name}.{fmt}")), fmt
    fmt = fmt or "png"
    if len(places) == 1:
        return places[0].with_name(f"{places[0].name}.{fmt}"), fmt
    runs = {str(home.path.resolve()) if home is not None else None for home in homes}
    if len(runs) == 1 and None not in runs:
        return homes[0].figure_file(kind, fmt), fmt
    return Path.cwd() / f"{kind}.{fmt}", fmt

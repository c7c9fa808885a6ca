"""What every analysis command shares: where its dataset goes (--out, --overwrite), the
architecture of plain state_dict files, and its result on stdout: one JSON object whose
top-level keys `computed`, `reused` and `output` every analysis has, or a summary."""

from __future__ import annotations

import math
from typing import Any, Callable

import click

from .output import (allow_incomplete_option, device_option, emit, json_option, log, max_parameters,
                     max_parameters_option, model_data_options, parse_model_kwargs)


def output_options(func: Callable) -> Callable:
    func = click.option("--overwrite", is_flag=True,
                        help="Recompute what the dataset already holds for these inputs; replace a dataset computed "
                             "with other settings.")(func)
    return click.option("--out", type=click.Path(dir_okay=False), default=None,
                        help="Dataset file to write. [in RUN/analysis/ when the inputs come from one run, else beside "
                             "the first checkpoint file]")(func)


def architecture_options(func: Callable) -> Callable:
    """--model and --model-kwargs only: for commands that take no --data (signs and overlap,
    which never evaluate; connectivity, whose runs record their data)."""
    func = max_parameters_option(func)
    func = click.option("--model-kwargs", default=None, help="JSON object of model keyword arguments.")(func)
    return click.option("--model", "model_name", default=None,
                        help="Model name for plain state_dict files (their masks are their exact zeros), or the "
                             "module.path:factory a run was trained with (allows importing it).")(func)


def data_dir_option(func: Callable) -> Callable:
    """--data-dir for the commands that evaluate: where data come from is the user's choice,
    never the checkpoint's (a file's recorded data_dir/download is ignored)."""
    return click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                        help="Where the evaluated data set lives (torchvision layout, mnist1d cache). "
                             "[$SPARSE_LANDSCAPE_CACHE, else ~/.cache/sparse-landscape]")(func)


def checkpoint_analysis_options(func: Callable) -> Callable:
    """The options of a command that evaluates checkpoints of runs or plain files (sharpness,
    surface): --out/--overwrite, --model/--model-kwargs/--data, --data-dir,
    --allow-incomplete, --device, --json."""
    for option in (json_option, device_option, allow_incomplete_option, data_dir_option, model_data_options,
                   output_options):
        func = option(func)
    return func


def load_options(model_name: str | None, model_kwargs: str | None, data_name: str | None = None,
                 data_dir: str | None = None):
    from landscape.inputs import LoadOptions

    return LoadOptions(model=model_name, model_kwargs=parse_model_kwargs(model_kwargs), data=data_name,
                       data_dir=data_dir, max_parameters=max_parameters())


def emit_result(result, own: dict[str, Any], as_json: bool, summary: str, what: str) -> None:
    """Print an analysis's result (a landscape.results.AnalysisResult and its own keys); say
    on stderr what was taken from the file rather than computed."""
    if result.reused:
        log(f"reused {len(result.reused)} {what} already in {result.path} (--overwrite recomputes them)")
    emit({"output": str(result.path), "computed": result.computed, "reused": result.reused, **own}, as_json, summary)


def number(value: Any) -> float | int | None:
    """A JSON-safe number: NaN (an undefined fraction) becomes null."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value

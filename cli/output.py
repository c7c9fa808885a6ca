"""Shared CLI plumbing: error handling, --json, logging to stderr, progress bars."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click


def _debug_enabled() -> bool:
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if isinstance(ctx.obj, dict) and ctx.obj.get("debug"):
            return True
        ctx = ctx.parent
    return False


def handle_errors(func: Callable) -> Callable:
    """Turn library errors into one line on stderr and the documented exit code:
    2 bad input, 3 incomplete run, 1 anything else. --debug re-raises for a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from sparse_training.errors import FailedOnMain, SparseTrainingError

        try:
            return func(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except SparseTrainingError as error:
            from sparse_training.torchrun import environment_rank

            if _debug_enabled():
                raise
            if isinstance(error, FailedOnMain):  # rank 0 failed, reports it, and its exit code is the job's
                sys.exit(0)
            if environment_rank() == 0:  # under torchrun every rank meets the same error; rank 0 says it
                click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except OSError as error:
            if _debug_enabled():
                raise
            where = f" {error.filename}" if getattr(error, "filename", None) else ""
            click.echo(f"error: cannot access{where}: {error.strerror or error}", err=True)
            sys.exit(1)
        except Exception as error:  # noqa: BLE001 - the last line of defence
            if _debug_enabled():
                raise
            click.echo(f"error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
                       "(this is a bug; rerun with `landscape --debug ...` for the traceback)", err=True)
            sys.exit(1)

    return wrapper


def json_option(func: Callable) -> Callable:
    """--json, and --quiet with it: every command has both."""
    func = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary.")(func)
    return quiet_option(func)


def device_option(func: Callable) -> Callable:
    return click.option("--device", default=None, help="torch device (cpu, cuda, cuda:1); default: cuda if available.")(func)


def allow_incomplete_option(func: Callable) -> Callable:
    return click.option("--allow-incomplete", is_flag=True, help="Analyse a run that has no DONE marker.")(func)


def model_data_options(func: Callable) -> Callable:
    """For plain state_dict files from a user's own training code."""
    func = max_parameters_option(func)
    func = click.option("--data", "data_name", default=None, help="Data set a plain state_dict was trained on (e.g. mnist1d).")(func)
    func = click.option("--model-kwargs", default=None, help="JSON object of model keyword arguments.")(func)
    func = click.option("--model", "model_name", default=None,
                        help="Model name for a plain state_dict file, or the module.path:factory a checkpoint names "
                             "(allows importing it).")(func)
    return func


def parse_model_kwargs(text: str | None) -> dict[str, Any] | None:
    from sparse_training.errors import UserError

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"--model-kwargs must be a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise UserError(f"--model-kwargs must be a JSON object, got {text!r}")
    return value


def resolve_device(name: str | None) -> str:
    import torch

    from sparse_training.errors import UserError

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} asked for but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):  # meta, mps, xla, ...: not supported by the engine
        raise UserError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    return str(device)


QUIET = "landscape.quiet"  # key in the click context's meta, shared by the group and its command


def _set_quiet(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[QUIET] = True


def quiet_option(func: Callable) -> Callable:
    """-q/--quiet on the group and on every command: no progress bars, no log lines (errors
    and the result on stdout still appear)."""
    return click.option("-q", "--quiet", is_flag=True, expose_value=False, is_eager=True, callback=_set_quiet,
                        help="No progress bars or log lines on stderr; the result and errors still appear.")(func)


MAX_PARAMETERS = "landscape.max_parameters"  # likewise: set by --max-parameters, read by load_options


def _set_max_parameters(ctx: click.Context, _param: click.Parameter, value: int | None) -> None:
    if value is not None:
        ctx.meta[MAX_PARAMETERS] = value


def max_parameters_option(func: Callable) -> Callable:
    """--max-parameters on every command that builds a model a file describes: its size is
    counted on the meta device first and refused above this."""
    return click.option("--max-parameters", type=click.IntRange(min=1), default=None, expose_value=False,
                        callback=_set_max_parameters,
                        help="Refuse a model a file describes with more parameters than this. [2000000000]")(func)


def max_parameters() -> int | None:
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(MAX_PARAMETERS) if ctx is not None else None


def quiet_enabled() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(QUIET))


def log(message: str) -> None:
    """A log line on stderr, written through tqdm so that it never breaks a progress bar.
    Under torchrun only rank 0 speaks: the ranks of one job log the same events."""
    from sparse_training.torchrun import environment_rank

    if quiet_enabled() or environment_rank() != 0:
        return
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def emit(result: dict[str, Any], as_json: bool, summary: str) -> None:
    """The command's result: one JSON object, or the human summary, on stdout (rank 0's alone
    under torchrun)."""
    from sparse_training.torchrun import environment_rank

    if environment_rank() != 0:
        return
    if as_json:
        click.echo(json.dumps(result, default=_jsonable, sort_keys=True))
    else:
        click.echo(summary)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def progress_enabled() -> bool:
    """Progress bars only when stderr is a terminal and --quiet is not given."""
    return sys.stderr.isatty() and not quiet_enabled()


def progress_bar(total: int, desc: str, unit: str, initial: int = 0):
    """A tqdm bar on stderr (a context manager with `update`), switched off when
    `progress_enabled()` is false. Log lines go through `log`, which writes above it."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=not progress_enabled())


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain fixed-width table for summaries."""
    cells = [header] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def label_list(text: str | None) -> list[str] | None:
    """Comma-separated checkpoint labels (`init,cycle_003`), each checked against the label
    grammar before any path is formed from it, so that none names a file outside the run."""
    from sparse_training.rundir import require_label

    return [require_label(label.strip()) for label in (text or "").split(",") if label.strip()] or None

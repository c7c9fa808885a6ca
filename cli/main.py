"""The `landscape` click group. Subcommands are imported only when invoked, so that
`landscape --help` never imports torch."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

import click

from .output import quiet_option

# name -> (module, attribute, one-line help shown by `landscape --help`)
COMMANDS = {
    "train": ("cli.train", "train", "Train a dense or sparse network into a run directory."),
    "sweep": ("cli.sweep", "sweep", "Run a grid of runs (and their analyses) through submitit."),
    "info": ("cli.info", "info", "Show what a run or checkpoint holds."),
    "barrier": ("cli.connectivity", "barrier", "Error/loss barrier on the line between two checkpoints."),
    "connectivity": ("cli.connectivity", "connectivity", "Barriers between consecutive cycles, or between two runs."),
    "sharpness": ("cli.sharpness", "sharpness", "Top Hessian eigenvalues (mask-aware Lanczos) and trace."),
    "surface": ("cli.surface", "surface", "Loss surface around a checkpoint or through two or three."),
    "signs": ("cli.signs", "signs", "Sign flips of kept weights against init, rewind or previous cycle."),
    "overlap": ("cli.overlap", "overlap", "Pairwise overlap of masks, against chance."),
    "metrics": ("cli.metrics", "metrics", "Runs' metrics.csv as one dataset."),
    "aggregate": ("cli.aggregate", "aggregate", "One dataset of a sweep's results, with intervals over seeds."),
    "plot": ("cli.plot", "plot", "Figures from analysis datasets."),
    "demo": ("cli.demo", "demo", "A small study on MNIST-1D, analyses and figures included."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if _available(name)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or not _available(name):
            return None
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Click's own handling, except that a usage error is one line, `error: <what is
        wrong>; <what to do>`, exit 2, like every other error of the tool."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as error:
            from sparse_training.torchrun import environment_rank

            if environment_rank() == 0:  # under torchrun every rank meets the same error
                click.echo(f"error: {usage_error_line(error)}", err=True)
            sys.exit(2)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def usage_error_line(error: click.UsageError) -> str:
    """One line: what is wrong, then where the valid usage is."""
    if isinstance(error, click.BadParameter) and str(error.message).startswith("unknown "):
        what = error.message  # our choices say what is known already
    else:
        what = error.format_message()
        what = what[0].lower() + what[1:] if what else "bad usage"
    where = error.ctx.command_path if error.ctx is not None else "landscape"
    return f"{' '.join(what.split()).rstrip('.')}; see `{where} --help`"


def _available(name: str) -> bool:
    return importlib.util.find_spec(COMMANDS[name][0]) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@quiet_option
@click.version_option(package_name="sparse-landscape", prog_name="landscape")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Sparse training and loss-landscape analysis.

    Results go to stdout (a short summary, or one JSON object with --json); progress and logs
    go to stderr. Exit codes: 0 done, 1 runtime failure, 2 bad input, 3 incomplete run."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _check_torchrun(ctx)


# The commands that split their work across the processes torchrun starts.
DISTRIBUTED_COMMANDS = ("train", "barrier", "connectivity", "sharpness")


def _check_torchrun(ctx: click.Context) -> None:
    """Under torchrun, only the commands that split their work run, and the process group is
    left when the command ends; every other command would run N times and race on its files."""
    from sparse_training.torchrun import launched_by_torchrun

    if not launched_by_torchrun() or ctx.invoked_subcommand is None:
        return
    if ctx.invoked_subcommand not in DISTRIBUTED_COMMANDS:
        raise click.UsageError(f"`landscape {ctx.invoked_subcommand}` does not run under torchrun (only "
                               f"{', '.join(DISTRIBUTED_COMMANDS)} do); run it as one process", ctx)
    from sparse_training.distributed import leave

    ctx.call_on_close(leave)


def main() -> None:
    cli(prog_name="landscape")


if __name__ == "__main__":
    main()

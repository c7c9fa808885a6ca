"""`landscape sweep SPEC.toml --out SWEEP`: a grid of runs and their analyses through submitit."""

from __future__ import annotations

import click

from .output import emit, handle_errors, json_option, label_list, log, table

# Options of an analysis command that the sweep itself decides.
DECIDED = {"out": "the sweep writes RUN/analysis/NAME.nc", "device": "pass `landscape sweep --device`",
           "json": "the sweep reads no analysis output", "quiet": "pass `landscape sweep --quiet`",
           "q": "pass `landscape sweep --quiet`", "help": "it is not an option", "h": "it is not an option"}


@click.command()
@click.argument("spec_file", metavar="SPEC.toml", type=click.Path(dir_okay=False), required=False)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Sweep directory (created, or continued).")
@click.option("--status", "show_status", is_flag=True, help="Show every run's state; start nothing (SPEC not needed).")
@click.option("--executor", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
              help="local: jobs on this machine; slurm: one job array on the cluster.")
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="local: runs at once, each on its share of the CPUs and its own GPU(s).")
@click.option("--device", default=None, help="cpu, cuda, cuda:N for every run. [local: cuda if available; slurm: "
                                             "cuda with --gpus-per-run, else cpu]")
@click.option("--gpus-per-run", type=click.IntRange(min=0), default=None,
              help="GPUs of each run; more than 1 trains under torchrun. [1 on CUDA, else 0]")
@click.option("--cpus-per-run", type=click.IntRange(min=1), default=None, help="slurm: CPUs of each job.")
@click.option("--partition", default=None, help="slurm: partition.")
@click.option("--time", "time_min", type=click.IntRange(min=1), default=None,
              help="Minutes per job; at the limit the run saves its state and the job is requeued. [slurm: 1440; "
                   "local: none]")
@click.option("--slurm-array-parallelism", type=click.IntRange(min=1), default=None,
              help="slurm: runs of the array at once. [256]")
@click.option("--dry-run", is_flag=True, help="Check the spec and show what would run (and the sbatch script); "
                                              "write nothing.")
@json_option
@handle_errors
def sweep(spec_file, out, show_status, executor, parallel, device, gpus_per_run, cpus_per_run, partition, time_min,
          slurm_array_parallelism, dry_run, as_json):
    """Train every point of a grid of configs (and analyse every finished run) through submitit.

    SPEC.toml has [base] (training options named as `landscape train`'s flags, with _ or -),
    [grid] (lists; the sweep is their Cartesian product, in the order written) and, optionally,
    [analyses] (connectivity, sharpness, signs, overlap = true or a table of their options).
    Runs go to SWEEP/runs/<key=value,...>; a rerun skips finished runs and continues
    interrupted ones. Exit code 1 when a run failed (the summary names its log).

    \b
    Examples:
      landscape sweep study.toml --out sweeps/study --parallel 4
      landscape sweep study.toml --out sweeps/study --status
      landscape sweep study.toml --out sweeps/study --executor slurm --partition gpu --gpus-per-run 1 --time 240
    """
    from sparse_training import sweep as lib
    from sparse_training.errors import SparseTrainingError, UserError

    target = lib.SweepDir(out)
    if show_status:
        result = lib.status(target)
        emit(result, as_json, _status_summary(result))
        return
    if spec_file is None:
        raise UserError("give the sweep's SPEC.toml (or --status to see the state of its runs)")
    text = lib.read_spec(spec_file)
    keys = train_keys()
    spec = lib.parse_spec(text, keys, analysis_args, where=spec_file)
    res = _resources(executor, parallel, device, gpus_per_run, cpus_per_run, partition, time_min,
                     slurm_array_parallelism)
    lib.check_out(target.path)
    stored = target.read_record()
    if stored is not None:
        lib.check_compatible(stored, spec, keys, target.path)
    lib.validate_configs(spec, res.device, where=spec_file)
    if dry_run:
        result = lib.dry_run(spec, target, res)
        emit(result, as_json, _dry_summary(result))
        return
    lib.prepare(spec, target)
    summary = lib.run_sweep(spec, target, res, log)
    emit(summary, as_json, _summary(summary))
    if summary["failed"]:
        raise SparseTrainingError(f"{summary['failed']} run(s) failed: "
                                  + ", ".join(f"{f['name']} (log: {f['log']})" for f in summary["failed_runs"]))


def train_keys() -> dict[str, tuple[str, str]]:
    """`landscape train`'s flag names (without dashes) -> (config section, field)."""
    import dataclasses

    from sparse_training.config import SECTIONS

    from .options import flag_of

    return {flag_of(f)[2:]: (section, f.name) for section, cls in SECTIONS.items()
            for f in dataclasses.fields(cls) if f.init}


def analysis_args(name: str, options: dict) -> list[str]:
    """The arguments of `landscape NAME RUN ...` for the options of [analyses] NAME, each
    checked against that command's own options (names with _ or -, values by its types)."""
    from sparse_training.errors import UserError

    from .main import cli

    command = cli.get_command(click.Context(cli), name)
    params: dict[str, tuple[click.Option, bool]] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            params.update({opt.lstrip("-"): (param, True) for opt in param.opts})
            params.update({opt.lstrip("-"): (param, False) for opt in param.secondary_opts})
    args: list[str] = []
    for written, value in options.items():
        key = written.replace("_", "-")
        where = f"[analyses] {name}: {written}"
        if key in DECIDED:
            raise UserError(f"{where}: {DECIDED[key]}; drop it from the spec")
        if key not in params:
            known = sorted(k for k, (p, positive) in params.items() if positive and len(k) > 1 and k not in DECIDED)
            raise UserError(f"{where} is not an option of `landscape {name}`; known: {', '.join(known)}")
        param, positive = params[key]
        if param.is_flag:
            if not isinstance(value, bool):
                raise UserError(f"{where} is a switch: write {written} = true or false")
            if value == positive:
                args.append(param.opts[0])
            elif param.secondary_opts:
                args.append(param.secondary_opts[0])
            continue
        text = _option_text(value)
        try:
            param.type.convert(text, param, None)
            if param.name == "checkpoints":
                label_list(text)  # the label grammar, checked now rather than in every job
        except click.BadParameter as error:
            raise UserError(f"{where}: {' '.join(error.format_message().split())}") from None
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
        args += [param.opts[0], text]
    return args


def _option_text(value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_option_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)


def _resources(executor, parallel, device, gpus_per_run, cpus_per_run, partition, time_min, array_parallelism):
    import re

    from sparse_training.errors import UserError
    from sparse_training.sweep import Resources, check_resources

    from .output import resolve_device

    if executor == "local":
        device = resolve_device(device)
    else:
        device = device or ("cuda" if gpus_per_run else "cpu")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", device):  # the cluster's nodes, not this machine, have the GPUs
            raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if gpus_per_run is None:
        gpus_per_run = 1 if device.startswith("cuda") else 0
    if executor == "local" and cpus_per_run is not None:
        raise UserError("--cpus-per-run belongs to --executor slurm (local runs share the CPUs by --parallel)")
    if executor == "slurm" and parallel != 1:
        raise UserError("--parallel belongs to --executor local; on SLURM use --slurm-array-parallelism")
    res = Resources(executor=executor, parallel=parallel, device=device, gpus_per_run=gpus_per_run,
                    cpus_per_run=cpus_per_run, partition=partition, time=time_min,
                    array_parallelism=array_parallelism)
    check_resources(res)
    return res


def _dry_summary(result: dict) -> str:
    import shlex

    lines = [f"{result['sweep']}: {len(result['to_run'])} of {result['runs']} run(s) to run, "
             f"{len(result['skipped'])} finished (dry run: nothing written)"]
    for job in result["to_run"]:
        lines.append(f"{job['name']}: {shlex.join(job['train'])}")
        lines += [f"  then {shlex.join(command)}" for command in job["analyses"]]
    if "sbatch" in result:
        lines += ["sbatch script of each job:", result["sbatch"].rstrip()]
    return "\n".join(lines)


def _summary(summary: dict) -> str:
    line = (f"{summary['sweep']}: {summary['runs']} run(s): {summary['done']} done, {summary['skipped']} skipped "
            f"(finished before), {summary['failed']} failed")
    failed = [f"  {f['name']}: {f['error']} (log: {f['log']})" for f in summary["failed_runs"]]
    return "\n".join([line, *(["failed:"] + failed if failed else [])])


def _status_summary(result: dict) -> str:
    rows = [[r["name"], r["state"], _dash(r["cycle"]), _dash(r["epoch"]), _dash(r["step"]), _dash(r["test_accuracy"]),
             ",".join(r["analyses"]) or "-"] for r in result["runs"]]
    counts = ", ".join(f"{n} {state}" for state, n in result["counts"].items() if n)
    return (table(rows, ["run", "state", "cycle", "epoch", "step", "test acc", "analyses"])
            + f"\n{result['sweep']}: {len(rows)} run(s): {counts or 'none'}")


def _dash(value):
    return "-" if value is None else value

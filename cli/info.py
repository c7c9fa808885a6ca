"""`landscape info RUN|CKPT`: what a run directory or a checkpoint file holds."""

from __future__ import annotations

import click

from .output import emit, handle_errors, json_option, max_parameters, model_data_options, parse_model_kwargs, table

METRIC_COLUMNS = ("train_accuracy", "train_loss", "test_accuracy", "test_loss")


@click.command()
@click.argument("path", type=click.Path(path_type=str))
@model_data_options
@json_option
@handle_errors
def info(path, model_name, model_kwargs, data_name, as_json):
    """Show what a run directory or a checkpoint holds: method, model, data, cycles, and per
    checkpoint the step, sparsity and metrics; for a run also the analyses and figures
    present. Plain state_dict files need --model (and --model-kwargs).

    \b
    Examples:
      landscape info runs/lrr
      landscape info runs/lrr/checkpoints/cycle_003.pt --json
    """
    from pathlib import Path

    from sparse_training.rundir import RunDir
    from sparse_training.errors import UserError

    target = Path(path)
    if target.is_dir():
        result = run_info(RunDir(target))
        emit(result, as_json, run_summary(result))
    elif target.is_file():
        result = checkpoint_info(target, model_name, parse_model_kwargs(model_kwargs), data_name)
        emit(result, as_json, checkpoint_summary(result))
    elif target.exists():  # a FIFO or a device: opening it could block forever
        raise UserError(f"{target} is not a regular file; pass a run directory or a checkpoint file")
    else:
        raise UserError(f"{target} does not exist; pass a run directory or a checkpoint file")


# ---------------------------------------------------------------- gathering

def checkpoint_entry(ckpt) -> dict:
    """The per-checkpoint facts shared by run and checkpoint info."""
    from sparse_training.masks import kept_count, total_count

    return {
        "label": ckpt.path.stem, "cycle": ckpt.cycle, "epoch": ckpt.epoch, "step": ckpt.step,
        "sparsity": ckpt.sparsity, "method": ckpt.method, "metrics": dict(ckpt.metrics),
        "prunable_weights": total_count(ckpt.masks), "kept_weights": kept_count(ckpt.masks),
    }


def checkpoint_info(path, model_name=None, model_kwargs=None, data_name=None) -> dict:
    from sparse_training.checkpoint import load_checkpoint
    from sparse_training.masks import layer_sparsity

    ckpt = load_checkpoint(path, model=model_name, model_kwargs=model_kwargs, data=data_name,
                           max_parameters=max_parameters())
    run = ckpt.run
    tensors = [t for t in ckpt.state_dict.values() if t.is_floating_point()]
    return {
        "kind": "checkpoint", "path": str(path), "run": str(run.path) if run else None, "plain": ckpt.plain,
        "model": {"name": ckpt.model.name, "kwargs": ckpt.model.kwargs} if ckpt.model else None,
        "data": ckpt.data.name if ckpt.data else None,
        "parameters": sum(t.numel() for t in tensors),
        **checkpoint_entry(ckpt),
        "layer_sparsity": layer_sparsity(ckpt.masks),
    }


def run_info(run) -> dict:
    from sparse_training.checkpoint import load_checkpoint
    from sparse_training.records import read_config, read_meta
    from sparse_training.errors import UserError

    if not run.exists():
        raise UserError(f"{run.path} is not a run directory (no config.json); pass a run made by `landscape train` "
                        "or a checkpoint file")
    config, meta = read_config(run), read_meta(run)
    checkpoints = []
    for label in run.checkpoint_labels(include_intermediate=True):
        try:
            checkpoints.append(checkpoint_entry(load_checkpoint(run.checkpoint(label), max_parameters=max_parameters())))
        except UserError as error:  # one damaged file should not hide the rest of the run
            checkpoints.append({"label": label, "error": str(error)})
    return {
        "kind": "run", "path": str(run.path), "complete": run.is_done(), "status": meta.get("status"),
        "method": config.run.method, "model": {"name": config.model.name, "kwargs": config.model.kwargs},
        "data": config.data.name, "cycles": len(run.cycle_labels()), "epochs_per_cycle": config.run.epochs,
        "target_sparsity": config.prune.sparsity, "pruner": config.prune.pruner, "seed": config.run.seed,
        "checkpoints": checkpoints, "analyses": analyses_of(run),
        "figures": [p.name for p in run.figure_files()],
        "warnings": meta.get("warnings", []),
    }


def analyses_of(run) -> list[dict]:
    """Every dataset in RUN/analysis: its analysis, dims and settings, or why it is unreadable."""
    from landscape.store import read_dataset, settings_of
    from sparse_training.errors import UserError

    found = []
    for path in run.analysis_files():
        try:
            ds = read_dataset(path)
        except UserError as error:
            found.append({"file": path.name, "error": str(error)})
            continue
        found.append({"file": path.name, "analysis": str(ds.attrs.get("analysis", "")),
                      "dims": {str(k): int(v) for k, v in ds.sizes.items()}, "settings": settings_of(ds)})
    return found


# ---------------------------------------------------------------- summaries

def _model_text(model: dict | None) -> str:
    if not model:
        return "unknown"
    kwargs = ", ".join(f"{k}={v}" for k, v in sorted(model["kwargs"].items()))
    return f"{model['name']}({kwargs})"


def _rows(checkpoints: list[dict]) -> list[list]:
    rows = []
    for c in checkpoints:
        if "error" in c:
            rows.append([c["label"], "unreadable", "", "", "", "", "", "", ""])
            continue
        metrics = c["metrics"]
        rows.append([c["label"], _dash(c["cycle"]), _dash(c["epoch"]), _dash(c["step"]), c["sparsity"],
                     *(_dash(metrics.get(m)) for m in METRIC_COLUMNS)])
    return rows


def _dash(value):
    return "-" if value is None else value


HEADER = ["checkpoint", "cycle", "epoch", "step", "sparsity", "train acc", "train loss", "test acc", "test loss"]


def run_summary(r: dict) -> str:
    lines = [
        f"run       {r['path']} ({'complete' if r['complete'] else 'incomplete: no DONE'}"
        + (f", status {r['status']})" if r["status"] else ")"),
        f"method    {r['method']}, target sparsity {r['target_sparsity']}, pruner {r['pruner']}, seed {r['seed']}",
        f"model     {_model_text(r['model'])}",
        f"data      {r['data']}",
        f"cycles    {r['cycles']} x {r['epochs_per_cycle']} epochs",
        "",
        table(_rows(r["checkpoints"]), HEADER) if r["checkpoints"] else "no checkpoints",
        "",
        "analyses  " + (", ".join(f"{a['file']} ({a.get('analysis') or 'unreadable'}"
                                  + "".join(f", {k} {v}" for k, v in a.get("dims", {}).items()) + ")"
                                  for a in r["analyses"]) or "none"),
        "figures   " + (", ".join(r["figures"]) or "none"),
    ]
    lines += [f"warning   {w}" for w in r["warnings"]]
    for c in r["checkpoints"]:
        if "error" in c:
            lines.append(f"error     {c['error']}")
    return "\n".join(lines)


def checkpoint_summary(c: dict) -> str:
    return "\n".join([
        f"checkpoint {c['path']}" + (" (plain state_dict)" if c["plain"] else "") + (f", run {c['run']}" if c["run"] else ""),
        f"method     {c['method'] or '-'}",
        f"model      {_model_text(c['model'])}, {c['parameters']} parameters",
        f"data       {c['data'] or '-'}",
        f"weights    {c['kept_weights']} of {c['prunable_weights']} prunable kept (sparsity {c['sparsity']:.4f})",
        "",
        table(_rows([c]), HEADER),
    ])

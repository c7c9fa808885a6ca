"""`landscape sharpness RUN|CKPT`: top Hessian eigenvalues, trace and spectral density."""

from __future__ import annotations

import click

from .output import (allow_incomplete_option, device_option, emit, handle_errors, json_option, log,
                     model_data_options, parse_model_kwargs, resolve_device, table)

MAX_TABLE_EIGENVALUES = 5


def _labels(text: str | None) -> list[str] | None:
    return [label.strip() for label in text.split(",") if label.strip()] if text else None


def _result(report) -> dict:
    ds = report.dataset
    shown = set(report.computed) | set(report.skipped)
    checkpoints = {}
    for label in ds.checkpoint.values.tolist():
        if label not in shown:
            continue
        one = ds.sel(checkpoint=label)
        entry = {
            "cycle": int(one.cycle), "step": int(one.step), "sparsity": float(one.sparsity), "loss": float(one.loss),
            "subspace_dim": int(one.subspace_dim), "eigenvalues": one.eigenvalue.values.tolist(),
            "residuals": one.residual.values.tolist(), "hvp_counts": one.hvp_count.values.tolist(),
        }
        if "trace" in ds:
            entry.update(trace=float(one.trace), trace_stderr=float(one.trace_stderr), trace_samples=int(one.trace_samples),
                         trace_deflated=float(one.trace_deflated))
        checkpoints[str(label)] = entry
    from landscape.store import settings_of

    return {"output": str(report.path), "computed": report.computed, "skipped": report.skipped,
            "samples": int(ds.samples), "settings": settings_of(ds), "checkpoints": checkpoints}


def _summary(result: dict) -> str:
    k = min(result["settings"]["top_k"], MAX_TABLE_EIGENVALUES)
    with_trace = result["settings"]["trace"]
    header = ["checkpoint", "cycle", "sparsity", "loss"] + [f"lambda_{i + 1}" for i in range(k)]
    header += ["max rel. residual", "HVPs"] + (["trace", "+-"] if with_trace else [])
    rows = []
    for label, c in result["checkpoints"].items():
        relative = max(r / abs(v) if v else float("inf") for v, r in zip(c["eigenvalues"], c["residuals"]))
        row = [label, c["cycle"], c["sparsity"], c["loss"]] + c["eigenvalues"][:k] + [relative, max(c["hvp_counts"])]
        rows.append(row + ([c["trace"], c["trace_stderr"]] if with_trace else []))
    s = result["settings"]
    where = (f"{result['output']} ({s['backend']}, {s['subspace']} subspace, {result['samples']} samples, "
             f"tol {s['tol']:g})")
    return table(rows, header) + f"\nwritten to {where}"


@click.command()
@click.argument("path", metavar="RUN|CKPT", type=click.Path(path_type=str))
@click.option("--checkpoints", default=None, help="Comma-separated checkpoint labels of RUN, e.g. init,cycle_003. [all]")
@click.option("--top-k", type=int, default=1, show_default=True, help="Number of largest eigenvalues.")
@click.option("--trace", is_flag=True, help="Also estimate the trace (Hutchinson, Rademacher probes).")
@click.option("--density", is_flag=True, help="Also the eigenvalue density (stochastic Lanczos quadrature).")
@click.option("--samples", type=int, default=None,
              help="Size of the fixed, seeded training subset the loss is averaged over. [4096 or all if fewer]")
@click.option("--batch-size", type=int, default=1024, show_default=True,
              help="Batch size of the Hessian-vector products (does not change the result).")
@click.option("--subspace", type=click.Choice(["masked", "full"]), default="masked", show_default=True,
              help="masked: only the weights the mask keeps (plus biases and norm parameters); full: all parameters.")
@click.option("--backend", type=click.Choice(["lanczos", "power", "pyhessian"]), default="lanczos", show_default=True,
              help="lanczos (default); power iteration with deflation or the PyHessian package, for comparison.")
@click.option("--tol", type=float, default=1e-3, show_default=True,
              help="Stop when ||Hv - lambda v|| <= tol |lambda|, a bound on each eigenvalue's relative error "
                   "(pyhessian: its relative change between iterations).")
@click.option("--trace-tol", type=float, default=0.05, show_default=True,
              help="Stop the trace when its standard error is at most this fraction of it. The top-k "
                   "eigenpairs are projected out of the probes, so a larger --top-k gives a tighter trace.")
@click.option("--max-hvp", type=int, default=100, show_default=True,
              help="Most Hessian-vector products per eigenvalue, and most trace probes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subset and of the random vectors.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Dataset file. [RUN/analysis/sharpness.nc, or <stem>.sharpness.nc beside a lone checkpoint]")
@click.option("--overwrite", is_flag=True,
              help="Recompute checkpoints already in the file; replace a file with other settings.")
@model_data_options
@allow_incomplete_option
@device_option
@json_option
@handle_errors
def sharpness(path, checkpoints, top_k, trace, density, samples, batch_size, subspace, backend, tol, trace_tol, max_hvp,
              seed, out, overwrite, model_name, model_kwargs, data_name, allow_incomplete, device, as_json):
    """Top Hessian eigenvalues of the mean training loss for every checkpoint of RUN (or of
    one checkpoint file), restricted to each checkpoint's mask, by Lanczos.

    Every eigenvalue comes with the Hessian-vector products it cost and its residual
    ||Hv - lambda v||. Checkpoints already in the dataset with the same settings are skipped.

    \b
    Examples:
      landscape sharpness runs/lrr
      landscape sharpness runs/lrr --checkpoints init,cycle_003 --top-k 5 --trace
      landscape sharpness my_model.pt --model resnet20 --data cifar10
    """
    from landscape.sharpness import SharpnessSettings, sharpness as compute

    settings = SharpnessSettings(top_k=top_k, trace=trace, density=density, samples=samples, subspace=subspace,
                                 backend=backend, tol=tol, trace_tol=trace_tol, max_hvp=max_hvp, seed=seed)
    report = compute(path, settings, labels=_labels(checkpoints), batch_size=batch_size, device=resolve_device(device),
                     overwrite=overwrite, allow_incomplete=allow_incomplete, out=out, model=model_name,
                     model_kwargs=parse_model_kwargs(model_kwargs), data=data_name, log=log)
    if report.skipped:
        log(f"skipped {len(report.skipped)} checkpoint(s) already in {report.path} with the same settings "
            "(--overwrite recomputes them)")
    result = _result(report)
    emit(result, as_json, _summary(result))

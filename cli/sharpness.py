"""`landscape sharpness RUN|CKPT`: top Hessian eigenvalues, trace and spectral density."""

from __future__ import annotations

import click

from landscape.settings import SharpnessSettings

from .analysis import checkpoint_analysis_options, emit_result, load_options
from .options import build, settings_options
from .output import handle_errors, label_list, log, progress_bar, resolve_device, table

MAX_TABLE_EIGENVALUES = 5


@click.command()
@click.argument("path", metavar="RUN|CKPT", type=click.Path(path_type=str))
@click.option("--checkpoints", default=None, help="Comma-separated checkpoint labels of RUN, e.g. init,cycle_003. [all]")
@settings_options(SharpnessSettings, exclude=("density_steps", "density_runs"))
@checkpoint_analysis_options
@handle_errors
def sharpness(path, checkpoints, out, overwrite, model_name, model_kwargs, data_name, data_dir, allow_incomplete,
              device, as_json, **settings):
    """Top Hessian eigenvalues of the mean training loss for every checkpoint of RUN (or of
    one checkpoint file), restricted to each checkpoint's mask, by Lanczos.

    Every eigenvalue comes with the Hessian-vector products it cost and the residual
    ||Hv - lambda v|| its stopping test used (Lanczos: the recurrence's estimate; --verify
    adds the explicit one). Each checkpoint's solve starts from the previous one's
    eigenvectors (--no-warm-start: from a random vector). The dataset goes to
    RUN/analysis/sharpness.nc, or <stem>.sharpness.nc beside a checkpoint outside any run;
    checkpoints already there with the same settings are skipped.

    \b
    Examples:
      landscape sharpness runs/lrr
      landscape sharpness runs/lrr --checkpoints init,cycle_003 --top-k 5 --trace
      landscape sharpness my_model.pt --model resnet20 --data cifar10
    """
    from landscape.sharpness import sharpness as compute
    from landscape.store import settings_of

    labels = label_list(checkpoints)
    with progress_bar(0, "Hessian-vector products", "HVP") as bar:
        result = compute(path, build(SharpnessSettings, settings), labels=labels, out=out, overwrite=overwrite,
                         allow_incomplete=allow_incomplete, device=resolve_device(device),
                         options=load_options(model_name, model_kwargs, data_name, data_dir), progress=bar, log=log)
    ds = result.dataset
    own = {"samples": int(ds.samples), "settings": settings_of(ds),
           "checkpoints": {label: _checkpoint(ds, label) for label in ds.checkpoint.values.tolist()
                           if label in result.labels}}
    emit_result(result, own, as_json, _summary(str(result.path), own), "checkpoint(s)")


def _checkpoint(ds, label: str) -> dict:
    one = ds.sel(checkpoint=label)
    entry = {
        "cycle": int(one.cycle), "step": int(one.step), "sparsity": float(one.sparsity), "loss": float(one.loss),
        "subspace_dim": int(one.subspace_dim), "eigenvalues": one.eigenvalue.values.tolist(),
        "residuals": one.residual.values.tolist(), "hvp_counts": one.hvp_count.values.tolist(),
        "warm_started": bool(one.warm_started) if "warm_started" in ds else False,
    }
    if "residual_verified" in ds:
        entry["residuals_verified"] = one.residual_verified.values.tolist()
    if "trace" in ds:
        entry.update(trace=float(one.trace), trace_stderr=float(one.trace_stderr), trace_samples=int(one.trace_samples),
                     trace_deflated=float(one.trace_deflated))
    return entry


def _summary(output: str, result: dict) -> str:
    s = result["settings"]
    k = min(s["top_k"], MAX_TABLE_EIGENVALUES)
    header = ["checkpoint", "cycle", "sparsity", "loss"] + [f"lambda_{i + 1}" for i in range(k)]
    header += ["max rel. residual" + (" (verified)" if s.get("verify") else ""), "HVPs"] + (["trace", "+-"] if s["trace"] else [])
    rows = []
    for label, c in result["checkpoints"].items():
        relative = max(r / abs(v) if v else float("inf") for v, r in zip(c["eigenvalues"], c["residuals"]))
        relative = max(c.get("residuals_verified", [relative]))
        row = [label, c["cycle"], c["sparsity"], c["loss"]] + c["eigenvalues"][:k] + [relative, max(c["hvp_counts"])]
        rows.append(row + ([c["trace"], c["trace_stderr"]] if s["trace"] else []))
    where = f"{output} ({s['backend']}, {s['subspace']} subspace, {result['samples']} samples, tol {s['tol']:g})"
    return table(rows, header) + f"\nwritten to {where}"

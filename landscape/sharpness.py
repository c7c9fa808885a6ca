"""Hessian sharpness of every checkpoint of a run (or of one checkpoint file) into one
dataset: top-k eigenvalues with their residuals and HVP counts, optionally the Hutchinson
trace and the spectral density.

Checkpoints already in the output file with the same settings are skipped. After each
checkpoint the file is re-read, extended and rewritten atomically under `store.locked`, so an
interrupted run keeps what it finished and two analyses of the same run do not lose each
other's results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import xarray as xr

from sparse_training.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoints
from sparse_training.rundir import RunDir
from sparse_training.config import DataConfig
from sparse_training.errors import UserError
from sparse_training.masks import kept_count

from . import store
from .hessian import Eigenpairs, HessianOperator, hutchinson_trace
from .lanczos import lanczos_top, slq_nodes
from .power import power_top
from .sharpness_dataset import ANALYSIS, Record, build, records_of

BACKEND_NAMES = ("lanczos", "power", "pyhessian")
SUBSPACES = ("masked", "full")
DEFAULT_SAMPLES = 4096
DEFAULT_BATCH_SIZE = 1024


@dataclass(frozen=True)
class SharpnessSettings:
    """What defines the result (batch size and device do not: the products are the same)."""

    top_k: int = 1
    trace: bool = False
    density: bool = False
    samples: int | None = None  # None: min(DEFAULT_SAMPLES, training samples)
    subspace: str = "masked"
    backend: str = "lanczos"
    tol: float = 1e-3  # relative residual of each eigenvalue, a bound on its relative error
    trace_tol: float = 0.05  # standard error of the trace relative to its magnitude
    max_hvp: int = 100  # per eigenvalue; the trace's probe limit
    seed: int = 0
    density_steps: int = 100
    density_runs: int = 1

    def validated(self) -> SharpnessSettings:
        checks = [
            (self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}"),
            (self.samples is None or self.samples >= 1, f"--samples must be at least 1, got {self.samples}"),
            (self.subspace in SUBSPACES, f"--subspace must be masked or full, got {self.subspace!r}"),
            (self.backend in BACKEND_NAMES, f"--backend must be one of {', '.join(BACKEND_NAMES)}, got {self.backend!r}"),
            (0 < self.tol < 1, f"--tol must be in (0, 1), got {self.tol}"),
            (0 < self.trace_tol < 1, f"--trace-tol must be in (0, 1), got {self.trace_tol}"),
            (self.max_hvp >= 2, f"--max-hvp must be at least 2, got {self.max_hvp}"),
            (self.density_steps >= 2 and self.density_runs >= 1, "density needs at least 2 Lanczos steps and 1 run"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self


@dataclass
class Report:
    path: Path
    dataset: xr.Dataset
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def output_path(run: RunDir | None, checkpoint: Path, out: str | Path | None) -> Path:
    """--out, else RUN/analysis/sharpness.nc, else <stem>.sharpness.nc next to a lone file."""
    if out is not None:
        return Path(out)
    if run is not None:
        return run.analysis_file(ANALYSIS)
    return checkpoint.with_name(f"{checkpoint.stem}.{ANALYSIS}.nc")


def sharpness(
    path: str | Path, settings: SharpnessSettings, *, labels: list[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "cpu", overwrite: bool = False, allow_incomplete: bool = False, out: str | Path | None = None,
    model: str | None = None, model_kwargs: dict[str, Any] | None = None, data: str | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> Report:
    """Analyse the checkpoints of `path` (a run directory, or one checkpoint file)."""
    settings = settings.validated()
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    run, paths = resolve_checkpoints(path, labels, allow_incomplete)
    target = output_path(run, paths[0], out)
    base = run.path if run is not None else target.parent
    existing = store.read_dataset(target) if target.exists() else None
    report = Report(path=target, dataset=xr.Dataset())
    loaded: dict[DataConfig, Any] = {}
    for checkpoint_path in paths:
        label = checkpoint_path.stem
        ckpt = load_checkpoint(checkpoint_path, model=model, model_kwargs=model_kwargs, data=data)
        data_set = _data_for(ckpt, loaded, device)
        resolved = _resolve_samples(settings, ckpt, data_set)
        subset = data_set.subset_indices("train", resolved.samples, resolved.seed)
        compatible = existing is not None and _same(existing, resolved, subset)
        if existing is not None and not compatible and not overwrite:
            raise UserError(f"{target} holds results computed with other settings; pass --overwrite to replace it, "
                            "or --out FILE to write elsewhere")
        if compatible and not overwrite and label in existing["checkpoint"].values.tolist():
            report.skipped.append(label)
            continue
        log(f"sharpness: {label} ({resolved.backend}, top-{resolved.top_k}, {resolved.samples} samples, "
            f"{resolved.subspace} subspace)")
        record = analyse(ckpt, data_set, subset, resolved, batch_size, device, _relative(checkpoint_path, base), log)
        report.dataset = _merge(target, record, resolved, subset, run, ckpt, base, overwrite)
        report.computed.append(label)
    if not report.computed:
        report.dataset = existing
    return report


def _same(ds: xr.Dataset, settings: SharpnessSettings, subset: torch.Tensor) -> bool:
    """Whether `ds` was computed with these settings on this very subset."""
    return (store.settings_of(ds) == _settings_dict(settings) and "subset_index" in ds
            and np.array_equal(ds["subset_index"].values, subset.numpy()))


def _settings_dict(settings: SharpnessSettings) -> dict[str, Any]:
    return asdict(settings)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def _data_for(ckpt: Checkpoint, loaded: dict, device: str):
    from sparse_training.data import load_data

    if ckpt.data is None:
        raise UserError(f"{ckpt.path} records no data set; say which with --data NAME")
    if ckpt.data not in loaded:
        loaded[ckpt.data] = load_data(ckpt.data, device)
    return loaded[ckpt.data]


def _resolve_samples(settings: SharpnessSettings, ckpt: Checkpoint, data_set) -> SharpnessSettings:
    available = data_set.num_samples("train")
    if settings.samples is None:
        return replace(settings, samples=min(DEFAULT_SAMPLES, available))
    if settings.samples > available:
        raise UserError(f"--samples {settings.samples} is more than the {available} training samples of "
                        f"{data_set.name} ({ckpt.path.name}); choose 1..{available}")
    return settings


def analyse(ckpt: Checkpoint, data_set, subset: torch.Tensor, settings: SharpnessSettings, batch_size: int, device: str,
            relative_path: str, log: Callable[[str], None]) -> Record:
    """Eigenvalues (and trace, density) of one checkpoint."""
    label = ckpt.path.stem
    model = ckpt.build_model(device)
    batches = [(x.to(device), y.to(device)) for x, y in data_set.eval_batches("train", batch_size, indices=subset)]
    op = operator_for(ckpt, model, batches, settings)
    loss = op.loss()
    if not np.isfinite(loss):
        raise UserError(f"the loss of {ckpt.path} is {loss} on the evaluation subset: the network diverged; "
                        "leave this checkpoint out with --checkpoints")
    if settings.top_k > op.dim:
        raise UserError(f"--top-k {settings.top_k} is more than the {op.dim} parameters of {label} in the "
                        f"{settings.subspace} subspace; choose 1..{op.dim}")
    pairs = eigenpairs(op, settings)
    loose = [i for i, (lam, r) in enumerate(zip(pairs.values, pairs.residuals)) if not r <= settings.tol * abs(lam)]
    if loose:
        hint = ("PyHessian stops on the change between iterations, not on the residual" if settings.backend == "pyhessian"
                else "raise --max-hvp for a tighter value")
        log(f"warning: {label}: eigenvalue {loose[0]} has a relative residual above --tol {settings.tol} after "
            f"{int(pairs.hvp_counts[loose[0]])} HVPs; {hint}")
    trace = None
    if settings.trace:
        # Only Lanczos' Ritz vectors satisfy V^T H V = diag(values) exactly, as deflation needs.
        deflate = pairs if settings.backend == "lanczos" else None
        estimate = hutchinson_trace(op, settings.trace_tol, settings.max_hvp, settings.seed, deflate=deflate)
        trace = (estimate.mean, estimate.stderr, estimate.samples, estimate.deflated)
        if not estimate.stderr <= settings.trace_tol * abs(estimate.mean):
            log(f"warning: {label}: the trace's standard error is {estimate.stderr:.3g} "
                f"({estimate.stderr / abs(estimate.mean):.1%}) after {estimate.samples} probes, above --trace-tol "
                f"{settings.trace_tol}; raise --max-hvp for more probes")
    slq = slq_nodes(op, settings.density_steps, settings.density_runs, settings.seed) if settings.density else None
    log(f"  {label}: lambda_max {pairs.values[0]:.6g} (residual {pairs.residuals[0]:.2g}, "
        f"{int(pairs.hvp_counts[-1])} HVPs)" + (f", trace {trace[0]:.6g} +- {trace[1]:.2g}" if trace else ""))
    return Record(
        label=label, path=relative_path, cycle=-1 if ckpt.cycle is None else int(ckpt.cycle),
        step=-1 if ckpt.step is None else int(ckpt.step), sparsity=float(ckpt.sparsity), loss=loss, dim=op.dim,
        eigenvalues=pairs.values, residuals=pairs.residuals, hvp_counts=pairs.hvp_counts.astype(np.int64),
        trace=trace, slq=slq,
    )


def operator_for(ckpt: Checkpoint, model: torch.nn.Module, batches, settings: SharpnessSettings) -> HessianOperator:
    if settings.subspace == "full":
        return HessianOperator(model, batches)
    if kept_count(ckpt.masks) == 0:
        raise UserError(f"{ckpt.path} keeps no prunable weight (sparsity 1.0): its masked Hessian is empty; "
                        "pass --subspace full or leave it out with --checkpoints")
    return HessianOperator(model, batches, ckpt.masks)


def eigenpairs(op: HessianOperator, settings: SharpnessSettings) -> Eigenpairs:
    if settings.backend == "pyhessian":
        from .pyhessian_backend import pyhessian_top as solve
    else:
        solve = power_top if settings.backend == "power" else lanczos_top
    return solve(op, settings.top_k, settings.tol, settings.max_hvp, settings.seed)


def _merge(target: Path, record: Record, settings: SharpnessSettings, subset: torch.Tensor, run: RunDir | None,
           ckpt: Checkpoint, base: Path, overwrite: bool) -> xr.Dataset:
    """Add `record` to the file at `target`, replacing an older result for the same label;
    a file with other settings is replaced only with `overwrite`."""
    with store.locked(target):
        records: list[Record] = []
        if target.exists():
            current = store.read_dataset(target)
            if _same(current, settings, subset):
                records = [r for r in records_of(current) if r.label != record.label]
            elif not overwrite:
                raise UserError(f"{target} was rewritten with other settings meanwhile; pass --overwrite to replace it, "
                                "or --out FILE to write elsewhere")
        ds = build(records + [record], _settings_dict(settings), subset.numpy(), run.path.name if run else "",
                   ckpt.method or "", base)
        store.write_dataset(ds, target)
    return ds

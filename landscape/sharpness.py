"""Hessian sharpness of every checkpoint of a run (or of one checkpoint file) into one
dataset: top-k eigenvalues with their residuals and HVP counts, optionally the Hutchinson
trace and the spectral density.

The checkpoints are visited in run order and, with --warm-start, each solve starts from the
previous checkpoint's top eigenvectors restricted to its mask (`hessian.WarmStart`): the same
stopping test, fewer products when consecutive checkpoints are close. `--verify` measures each
eigenpair's explicit residual with one more product.

`results.update_labels` keeps the file: checkpoints already there with the same settings (and
the same evaluation subset) are skipped, each other one is added and the file rewritten
atomically, so an interrupted run keeps what it finished.

Under torchrun every rank takes part in every Hessian-vector product: each holds a
contiguous shard of the evaluation subset and the products are summed over the ranks
(`hessian.HessianOperator` with the job's group), so the eigenvalues and the trace are those
of one process to float rounding; only rank 0 reads and writes the file (`results`). The
pyhessian backend runs PyHessian's own loop over the data and is refused there."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import xarray as xr

from sparse_training import distributed
from sparse_training.checkpoint import Checkpoint, resolve_checkpoints
from sparse_training.distributed import Group
from sparse_training.errors import UserError
from sparse_training.masks import kept_count
from sparse_training.rundir import analysis_output

from .hessian import Eigenpairs, HessianOperator, WarmStart, hutchinson_trace
from .inputs import LoadOptions, load
from .lanczos import lanczos_top, slq_nodes
from .power import power_top
from .results import AnalysisResult, Progress, update_labels
from .settings import DEFAULT_SAMPLES, SharpnessSettings
from .sharpness_dataset import ANALYSIS, Record, build, records_of

def sharpness(
    path: str | Path, settings: SharpnessSettings, *, labels: list[str] | None = None, out: str | Path | None = None,
    overwrite: bool = False, allow_incomplete: bool = False, device: str = "cpu", options: LoadOptions = LoadOptions(),
    progress: Progress | None = None, log: Callable[[str], None] = lambda message: None,
) -> AnalysisResult:
    """Analyse the checkpoints of `path` (a run directory, or one checkpoint file) into `out`,
    by default RUN/analysis/sharpness.nc, or <stem>.sharpness.nc beside a file outside any run."""
    settings = settings.validated()
    group = distributed.current()
    if group.distributed and settings.backend == "pyhessian":
        raise UserError("the pyhessian backend runs PyHessian's own loop in one process and cannot be split across "
                        "torchrun's processes; run it without torchrun, or use --backend lanczos or power")
    device = distributed.device_for(device, group)
    if not group.is_main:
        progress = None  # rank 0 reports for the job
    run, paths = resolve_checkpoints(path, labels, allow_incomplete)
    target = Path(out) if out is not None else analysis_output(ANALYSIS, run, paths)
    base = run.path if run is not None else target.parent
    first = load(paths[0], options)
    data_set = _data_for(first, device)
    settings = _resolve_samples(settings, first, data_set)
    subset = data_set.subset_indices("train", settings.samples, settings.seed)
    by_label = {p.stem: p for p in paths}

    def prepare(todo: list[str]) -> Callable[[str], tuple[Record, str]]:
        budget = settings.max_products()
        if progress is not None:
            progress.total = len(todo) * budget
        # Labels are computed in run order: each solve may start from the one before's eigenvectors.
        warm: WarmStart | None = None

        def compute(label: str) -> tuple[Record, str]:
            ckpt = first if by_label[label] == paths[0] else load(by_label[label], options)
            if ckpt.data != first.data:
                raise UserError(f"{ckpt.path} was trained on other data than {first.path}; analyse it into "
                                "another --out")
            log(f"sharpness: {label} ({settings.backend}, top-{settings.top_k}, {settings.samples} samples, "
                f"{settings.subspace} subspace)")
            nonlocal warm
            spent = 0

            def product() -> None:
                nonlocal spent
                spent += 1
                progress.update(1)

            record, warm = analyse(ckpt, data_set, subset, settings, device, _relative(ckpt.path, base), log,
                                   product if progress is not None else None, warm, group)
            if progress is not None:  # the budget is an upper bound: the bar ends where the work does
                progress.total -= budget - spent
            return record, ckpt.method or ""

        return compute

    def merge(ds: xr.Dataset | None, part: tuple[Record, str]) -> xr.Dataset:
        record, method = part
        records = [r for r in records_of(ds) if r.label != record.label] if ds is not None else []
        return build(records + [record], settings.as_dict(), subset.numpy(), run.path.name if run else "", method, base)

    return update_labels(target, ANALYSIS, list(by_label), prepare, merge, dim="checkpoint", settings=settings.as_dict(),
                         check=lambda ds: _other_subset(ds, subset), overwrite=overwrite)


def _other_subset(ds: xr.Dataset, subset: torch.Tensor) -> str | None:
    """Why `ds` was not computed on this very evaluation subset, or None."""
    if "subset_index" in ds and np.array_equal(ds["subset_index"].values, subset.numpy()):
        return None
    return "another evaluation subset: other --samples, --seed or training data"


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def _data_for(ckpt: Checkpoint, device: str):
    from sparse_training.data import load_data

    if ckpt.data is None:
        raise UserError(f"{ckpt.path} records no data set; say which with --data NAME")
    return load_data(ckpt.data, device)


def _resolve_samples(settings: SharpnessSettings, ckpt: Checkpoint, data_set) -> SharpnessSettings:
    available = data_set.num_samples("train")
    if settings.samples is None:
        return replace(settings, samples=min(DEFAULT_SAMPLES, available))
    if settings.samples > available:
        raise UserError(f"--samples {settings.samples} is more than the {available} training samples of "
                        f"{data_set.name} ({ckpt.path.name}); choose 1..{available}")
    return settings


def analyse(ckpt: Checkpoint, data_set, subset: torch.Tensor, settings: SharpnessSettings, device: str,
            relative_path: str, log: Callable[[str], None], on_product: Callable[[], None] | None = None,
            warm: WarmStart | None = None, group: Group | None = None) -> tuple[Record, WarmStart | None]:
    """Eigenvalues (and trace, density) of one checkpoint, and its eigenvectors to warm-start
    the next one (None where its backend takes no start: pyhessian). `on_product` is called
    after every Hessian-vector product; `warm` holds the previous checkpoint's eigenvectors
    (used with --warm-start). With a distributed `group` (every rank calls this alike) each
    rank holds a contiguous shard of `subset` and the products are summed over the ranks."""
    label = ckpt.path.stem
    group = group if group is not None else Group()
    dtype = torch.float64 if settings.precision == "fp64" else torch.float32
    model = ckpt.build_model(device).to(dtype)
    mine = group.shard(subset) if group.distributed else subset
    batches = [(x.to(device, dtype if x.is_floating_point() else x.dtype), y.to(device))
               for x, y in (data_set.eval_batches("train", settings.batch_size, indices=mine) if len(mine) else ())]
    op = operator_for(ckpt, model, batches, settings, on_product, group)
    loss = op.loss()
    if not np.isfinite(loss):
        raise UserError(f"the loss of {ckpt.path} is {loss} on the evaluation subset: the network diverged; "
                        "leave this checkpoint out with --checkpoints")
    if settings.top_k > op.dim:
        raise UserError(f"--top-k {settings.top_k} is more than the {op.dim} parameters of {label} in the "
                        f"{settings.subspace} subspace; choose 1..{op.dim}")
    starts = warm.starts(op) if warm is not None and settings.warm_start and settings.backend != "pyhessian" else []
    pairs = eigenpairs(op, settings, starts)
    verified = None
    if settings.verify:
        verified = np.array([op.residual(float(lam), v) / max(abs(float(lam)), np.finfo(float).tiny)
                             for lam, v in zip(pairs.values, pairs.vectors)])
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
    # The solvers decide alike on every rank (the same products, the same seeded vectors); checked, cheaply.
    group.check_identical(f"eigenvalues of {label}", [torch.as_tensor(pairs.values)]
                          + ([torch.tensor(trace[:2], dtype=torch.float64)] if trace else []))
    log(f"  {label}: lambda_max {pairs.values[0]:.6g} (residual {pairs.residuals[0]:.2g}, "
        f"{int(pairs.hvp_counts[-1])} HVPs{', warm start' if starts else ''})"
        + (f", trace {trace[0]:.6g} +- {trace[1]:.2g}" if trace else ""))
    record = Record(
        label=label, path=relative_path, cycle=-1 if ckpt.cycle is None else int(ckpt.cycle),
        step=-1 if ckpt.step is None else int(ckpt.step), sparsity=float(ckpt.sparsity), loss=loss, dim=op.dim,
        eigenvalues=pairs.values, residuals=pairs.residuals, hvp_counts=pairs.hvp_counts.astype(np.int64),
        trace=trace, slq=slq, warm_started=bool(starts), verified=verified,
    )
    return record, (WarmStart.of(op, pairs) if settings.backend != "pyhessian" else None)


def operator_for(ckpt: Checkpoint, model: torch.nn.Module, batches, settings: SharpnessSettings,
                 on_product: Callable[[], None] | None = None, group: Group | None = None) -> HessianOperator:
    if settings.subspace == "full":
        return HessianOperator(model, batches, on_product=on_product, group=group)
    if kept_count(ckpt.masks) == 0:
        raise UserError(f"{ckpt.path} keeps no prunable weight (sparsity 1.0): its masked Hessian is empty; "
                        "pass --subspace full or leave it out with --checkpoints")
    return HessianOperator(model, batches, ckpt.masks, on_product=on_product, group=group)


def eigenpairs(op: HessianOperator, settings: SharpnessSettings, starts: list[torch.Tensor] | None = None) -> Eigenpairs:
    """The top-k eigenpairs by the settings' backend; lanczos and power start from `starts`
    (approximate eigenvectors in op's subspace) when given."""
    if settings.backend == "pyhessian":
        from .pyhessian_backend import pyhessian_top

        return pyhessian_top(op, settings.top_k, settings.tol, settings.max_hvp, settings.seed)
    solve = power_top if settings.backend == "power" else lanczos_top
    return solve(op, settings.top_k, settings.tol, settings.max_hvp, settings.seed, starts=starts or ())

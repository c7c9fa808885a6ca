"""Loss surfaces: loss and error on a grid of networks around one checkpoint (filter-normalised
random directions) or through two or three checkpoints (a line or a plane), with the
checkpoints' own coordinates and values.

What the public tools get wrong and this does not: BatchNorm running statistics are
recomputed at every grid point from the same training batches (`--bn recompute`, the default;
interpolating them, or keeping the centre's, describes a network nobody would evaluate), and
random directions stay inside the checkpoint's mask (`--subspace masked`, the default), so a
sparse network's surface is the surface of sparse networks. The coordinates are defined in
`landscape.directions`; the point evaluation is the one paths use
(`landscape.interpolate.PointEvaluator`). With `--align weights` the second and third
checkpoints are first permuted to match the first (`landscape.align`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import xarray as xr

from sparse_training.checkpoint import Checkpoint
from sparse_training.errors import UserError
from sparse_training.rundir import RunDir

from . import store
from .connectivity import default_batch_size
from .directions import Frame, checkpoint_frame, grid_axes, random_frame
from .inputs import LoadOptions, checkpoint_input, checkpoint_labels, common_run, load, output
from .interpolate import PointEvaluator, check_compatible
from .results import AnalysisResult, Progress, update_whole
from .settings import SurfaceSettings, validated

ANALYSIS = "surface"
DEFAULT_RANGE = {"random": 1.0, "checkpoints": 0.25}


def surface(
    inputs: Sequence[str | Path], settings: SurfaceSettings, *, through: Sequence[str] | None = None,
    out: str | Path | None = None, overwrite: bool = False, allow_incomplete: bool = False, device: str = "cpu",
    options: LoadOptions = LoadOptions(), progress: Progress | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> AnalysisResult:
    """The surface around one checkpoint or through two or three (`inputs`: files, RUN or
    RUN@LABEL; or one RUN and the labels `through`). The dataset goes to `out`, by default
    RUN/analysis/surface_<labels>.nc (surface_random_<label>.nc around one checkpoint), or
    <stem>.surface.nc beside a file outside any run."""
    typed = _typed_inputs(inputs, through)
    found = [checkpoint_input(arg, allow_incomplete) for arg in typed]
    labels = checkpoint_labels(found, typed)
    settings = resolved(settings, len(found), found[0].run)
    run = common_run(found)
    prefix = "surface_random_" if settings.directions == "random" else "surface_"
    target = output(out, ANALYSIS, found, prefix + "__".join(labels).replace("/", "-"))
    attrs = store.provenance([one.path for one in found], settings.as_dict(), base=run.path if run else None,
                             analysis=ANALYSIS)
    attrs.update(directions=settings.directions, bn_mode=settings.bn,
                 subspace=settings.subspace if settings.directions == "random" else "checkpoints")

    def compute() -> xr.Dataset:
        from sparse_training.data import load_data

        checkpoints = [load(one.path, options) for one in found]
        for other in checkpoints[1:]:
            check_compatible(checkpoints[0], other)
        data = load_data(checkpoints[0].data, device)
        return surface_dataset(checkpoints, labels, data, settings, device, progress, log)

    return update_whole(target, ANALYSIS, labels, compute, attrs, overwrite=overwrite, log=log)


def _typed_inputs(inputs: Sequence[str | Path], through: Sequence[str] | None) -> list[str]:
    if not through:
        return [str(arg) for arg in inputs]
    if len(inputs) != 1 or not Path(inputs[0]).is_dir():
        raise UserError("--through names checkpoints of one run: pass exactly one run directory with it")
    return [f"{inputs[0]}@{label}" for label in through]


def resolved(settings: SurfaceSettings, count: int, run: RunDir | None = None) -> SurfaceSettings:
    """`settings` with the directions, dims and range `count` inputs imply and the batch size
    (`run`'s evaluation batch size by default, as connectivity's), checked."""
    if not 1 <= count <= 3:
        raise UserError(f"a surface is drawn around one checkpoint or through two or three; got {count} inputs")
    directions = settings.directions or ("random" if count == 1 else "checkpoints")
    if directions == "random" and count != 1:
        raise UserError(f"random directions are drawn around one checkpoint; got {count} (drop --directions random "
                        "for the line or plane through them)")
    if directions == "checkpoints" and count == 1:
        raise UserError("--directions checkpoints needs two checkpoints (a line) or three (a plane)")
    dims = settings.dims or (1 if count == 2 else 2)
    if directions == "checkpoints" and dims != count - 1:
        raise UserError(f"{count} checkpoints span a {'line' if count == 2 else 'plane'}: use --dims {count - 1}, "
                        "or give " + ("a third checkpoint" if count == 2 else "two checkpoints for a line"))
    if settings.align == "weights" and count == 1:
        raise UserError("--align weights aligns the second and third checkpoints to the first; give two or three")
    extent = DEFAULT_RANGE[directions] if settings.range is None else settings.range
    batch_size = default_batch_size(run) if settings.batch_size is None else settings.batch_size
    return validated(replace(settings, directions=directions, dims=dims, range=float(extent), batch_size=batch_size))


# ---------------------------------------------------------------- computing it

def surface_dataset(
    checkpoints: list[Checkpoint], labels: list[str], data, settings: SurfaceSettings, device: str,
    progress: Progress | None = None, log: Callable[[str], None] = lambda message: None,
) -> xr.Dataset:
    """Evaluate the grid and the checkpoints; `settings` resolved (`resolved`)."""
    model = checkpoints[0].build_model(device)  # a scratch module: the checkpoints are only read
    names = [name for name, _ in model.named_parameters()]
    states, permutations = _states(checkpoints, labels, model, data, settings, device, log)
    on_device = [{k: v.to(device) for k, v in state.items()} for state in states]
    if settings.directions == "random":
        masks = {k: v.to(device) for k, v in checkpoints[0].masks.items()} if settings.subspace == "masked" else None
        frame = random_frame(on_device[0], names, masks, settings.dims, settings.seed, settings.move_bias_norm)
    else:
        frame = checkpoint_frame(on_device, names, labels)
    alpha, beta = grid_axes(frame, settings.grid, settings.range, settings.directions == "random")
    evaluator = PointEvaluator(model, data, settings, device)
    if progress is not None:
        progress.total = alpha.size * beta.size + len(states)
    log(f"surface: {alpha.size} x {beta.size} points, {settings.directions} directions, BatchNorm {settings.bn}")
    shape = (len(settings.splits), beta.size, alpha.size)
    error, loss = np.empty(shape), np.empty(shape)
    for j, b in enumerate(beta):
        for i, a in enumerate(alpha):
            point = frame.state(float(a), float(b), on_device[0])
            error[:, j, i], loss[:, j, i] = evaluator(point, f"alpha={a:.4g}, beta={b:.4g}")
            if progress is not None:
                progress.update(1)
    own = np.empty((2, len(settings.splits), len(states)))
    for k, state in enumerate(on_device):  # each checkpoint itself, at its coordinates
        own[0, :, k], own[1, :, k] = evaluator(state, labels[k])
        if progress is not None:
            progress.update(1)
    ds = _dataset(frame, names, alpha, beta, error, loss, own, checkpoints, labels, settings, evaluator)
    return ds if permutations is None else ds.merge(permutations)


def _states(checkpoints: list[Checkpoint], labels: list[str], model: torch.nn.Module, data, settings: SurfaceSettings,
            device: str, log: Callable[[str], None]) -> tuple[list[dict[str, torch.Tensor]], xr.Dataset | None]:
    """The checkpoints' state_dicts, the later ones aligned to the first with --align weights
    (their permutations as a dataset along `aligned`)."""
    states = [dict(ckpt.state_dict) for ckpt in checkpoints]
    if settings.align != "weights":
        return states, None
    from .align import align_checkpoint, permutation_dataset

    alignments = []
    for k, other in enumerate(checkpoints[1:], start=1):
        aligned, alignment = align_checkpoint(model, checkpoints[0], other, data, device)
        log(f"aligned {labels[k]} to {labels[0]}: {len(alignment.spec.groups)} permutation groups, "
            f"{alignment.iterations} sweeps")
        states[k] = aligned.state_dict
        alignments.append(alignment)
    return states, permutation_dataset(alignments, "aligned", labels[1:])


def _dataset(frame: Frame, names: list[str], alpha: np.ndarray, beta: np.ndarray, error: np.ndarray,
             loss: np.ndarray, own: np.ndarray, checkpoints: list[Checkpoint], labels: list[str],
             settings: SurfaceSettings, evaluator: PointEvaluator) -> xr.Dataset:
    splits = list(settings.splits)
    where = ("at theta(alpha, beta) = theta_0 + alpha d_1 + beta d_2, d the stored directions, evaluated on the "
             "split" + (" with BatchNorm statistics recomputed at every point" if evaluator.recompute else ""))
    moved = [name for name in names if any(name in d for d in frame.directions)]
    sizes = [int(frame.base[name].numel()) for name in moved]
    values = np.stack([np.concatenate([d[name].flatten().float().cpu().numpy() if name in d
                                       else np.zeros(frame.base[name].numel(), np.float32) for name in moved])
                       for d in frame.directions])
    direction_kind = ("filter-normalised Gaussian direction, seed " + str(settings.seed)
                      if settings.directions == "random" else "basis vector of the line or plane through the "
                      "checkpoints (theta_2 - theta_1, then the orthogonal part of theta_3 - theta_1 scaled to its "
                      "length)")
    return xr.Dataset(
        {
            "error": store.described(error, ("split", "beta", "alpha"), "error", "1", f"1 - accuracy {where}"),
            "loss": store.described(loss, ("split", "beta", "alpha"), "loss", "nat", f"mean cross-entropy {where}"),
            "checkpoint_error": store.described(own[0], ("split", "checkpoint"), "error at the checkpoint", "1",
                                                "1 - accuracy of each checkpoint itself, evaluated as the grid is"),
            "checkpoint_loss": store.described(own[1], ("split", "checkpoint"), "loss at the checkpoint", "nat",
                                               "mean cross-entropy of each checkpoint itself, evaluated as the grid "
                                               "is"),
            "samples": store.described(np.array([evaluator.samples()[s] for s in splits]), ("split",),
                                       "evaluated samples", "1", "examples of the split evaluated at each point"),
            "bn_batches_used": store.described(np.array(evaluator.bn_batches_used), (), "BatchNorm batches", "1",
                                               "training batches the running statistics were recomputed from at "
                                               "each point (0: not recomputed)"),
            "direction_vector": store.described(values, ("direction", "element"), "direction", "1",
                                                f"{direction_kind}: the entries of the tensors `tensor`, flattened "
                                                "and concatenated in that order (tensor_offset)"),
            "direction_norm": store.described(
                np.array([[float(d[name].norm()) if name in d else 0.0 for name in moved] for d in frame.directions]),
                ("direction", "tensor"), "direction norm per tensor", "1",
                "Euclidean norm of each direction's entries of each tensor"),
            "sparsity": store.described(np.array([float(c.sparsity) for c in checkpoints]), ("checkpoint",),
                                        "sparsity", "1", "fraction of prunable weights the checkpoint's mask prunes"),
        },
        coords={
            "split": splits,
            "alpha": ("alpha", alpha, {"long_name": "coordinate along d_1", "units": "1"}),
            "beta": ("beta", beta, {"long_name": "coordinate along d_2 (0 on a line)", "units": "1"}),
            "checkpoint": labels,
            "checkpoint_alpha": ("checkpoint", frame.points[:, 0], {"long_name": "alpha of the checkpoint",
                                                                    "units": "1"}),
            "checkpoint_beta": ("checkpoint", frame.points[:, 1], {"long_name": "beta of the checkpoint",
                                                                   "units": "1"}),
            "direction": [f"d{k + 1}" for k in range(len(frame.directions))],
            "tensor": moved,
            "tensor_offset": ("tensor", np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
                              if sizes else np.zeros(0, np.int64)),
        },
    )

"""Loss and error along the straight line between two checkpoints.

theta(a) = (1 - a) theta_A + a theta_B for every floating-point tensor of the state_dict, a on
an evenly spaced grid from 0 to 1 (both endpoints included). The model at each a is a scratch
module that receives the complete interpolated state_dict (strict load: every parameter and
buffer overwritten, nothing carried over from the previous point); the endpoints' tensors are
never modified.

BatchNorm modes (`bn`):
- "recompute" (default): the running statistics at every a, endpoints included, are
  recomputed from training batches: reset, momentum=None (a cumulative average over the
  batches), forward passes under no_grad with only the norm layers in train mode (dropout
  stays off, so the statistics describe the network that is evaluated), then eval mode.
  The same first `bn_batches` batches of a fixed, unaugmented training order are used at
  every a, so the path is not noisier than the evaluation itself.
- "interpolate": the interpolated state_dict is used as it is, running statistics included
  (they are interpolated like the weights). At a=0 and a=1 the model is exactly the
  checkpoint, so the endpoints reproduce each checkpoint's own evaluation bit for bit.
"none" (no BatchNorm treatment, the state_dict as it is) is the same thing as "interpolate"
and is accepted as its alias; the mode is recorded as "interpolate".

Under torchrun (`sparse_training.distributed`) the work of every point is split across the
ranks and the results are those of one process, to float rounding: each rank evaluates a
contiguous shard of the evaluation samples and the loss sums and correct counts are summed
over ranks in float64, once per split and point; the BatchNorm batches are dealt out whole (batch i to
rank i mod world), each rank averages its own batches' statistics as one process does, and
the ranks' averages, weighted by their batch counts, are summed once per point, so every
rank ends with the average over the same `bn_batches` batches as one process.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from sparse_training import distributed
from sparse_training.checkpoint import Checkpoint
from sparse_training.distributed import Group
from sparse_training.errors import SparseTrainingError, UserError

from . import vectors
from .settings import EvaluationSettings, PathSettings


def alpha_grid(points: int) -> np.ndarray:
    """`points` evenly spaced values from exactly 0.0 to exactly 1.0."""
    return np.linspace(0.0, 1.0, points)


# ---------------------------------------------------------------- compatibility

def check_compatible(a: Checkpoint, b: Checkpoint) -> None:
    """Raise UserError unless `a` and `b` are the same architecture with the same tensors."""
    if a.model != b.model:
        raise UserError(f"{a.path} is model {_describe(a)} but {b.path} is {_describe(b)}; "
                        "a path needs two checkpoints of the same architecture")
    keys_a, keys_b = set(a.state_dict), set(b.state_dict)
    if keys_a != keys_b:
        only = sorted(keys_a ^ keys_b)[0]
        where = a.path if only in keys_a else b.path
        raise UserError(f"only {where} has the tensor {only!r}; a path needs two checkpoints of the same architecture")
    for name, ta in a.state_dict.items():
        tb = b.state_dict[name]
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            raise UserError(f"{name} is {tuple(ta.shape)} {ta.dtype} in {a.path} but {tuple(tb.shape)} {tb.dtype} in "
                            f"{b.path}; a path needs two checkpoints of the same architecture")
    if a.data is None:
        raise UserError(f"{a.path} records no data set; say which with --data NAME")
    if b.data is not None and (a.data.name, a.data.seed) != (b.data.name, b.data.seed):
        raise UserError(f"{a.path} was trained on {a.data.name} (seed {a.data.seed}) but {b.path} on "
                        f"{b.data.name} (seed {b.data.seed}); compare checkpoints trained on the same data")


def _describe(ckpt: Checkpoint) -> str:
    if ckpt.model is None:
        return "unknown (plain state_dict)"
    return f"{ckpt.model.name} {ckpt.model.kwargs}" if ckpt.model.kwargs else ckpt.model.name


# ---------------------------------------------------------------- BatchNorm

def running_stat_layers(model: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
    """Norm layers that keep running statistics (BatchNorm, InstanceNorm with tracking)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, batches: Iterable[Any], max_batches: int, device: str | torch.device,
                            precision: str = "fp32", group: Group | None = None) -> int:
    """Reset the running statistics of `model` and recompute them as the plain average over
    the first `max_batches` of `batches` (forward passes in `precision`); returns how many
    batches were used. The model is left in eval mode.

    Under torchrun (`group`, by default the job's) every rank passes the same `batches`;
    batch i is forwarded by rank i mod world only, and the ranks' averages are combined into
    the average over all of them: one all-reduce, after which every rank holds the running
    statistics one process would have (to float rounding) and the same count."""
    from sparse_training.acceleration import autocast

    group = group if group is not None else distributed.current()
    layers = running_stat_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average: every batch weighs the same
        layer.train()
    used = 0
    try:
        for i, (x, _) in enumerate(itertools.islice(batches, max_batches)):
            if i % group.world != group.rank:
                continue  # another rank's batch
            with autocast(device, precision):
                model(x.to(device, non_blocking=True))
            used += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.eval()
    if group.distributed:
        used = _combine_running_statistics(layers, used, group)
    if used == 0:
        raise UserError("the training split yielded no batch to recompute BatchNorm statistics from")
    return used


def _combine_running_statistics(layers: list[nn.modules.batchnorm._NormBase], used: int, group: Group) -> int:
    """Replace every rank's running statistics (its average over its `used` batches) by the
    average over all ranks' batches: sum_r used_r * average_r / sum_r used_r, summed in
    float64 in one all-reduce; returns the total number of batches."""
    parts = [torch.tensor([float(used)], dtype=torch.float64)]
    for layer in layers:
        for stat in (layer.running_mean, layer.running_var):
            if stat is not None:
                parts.append(stat.detach().double().cpu().reshape(-1) * used)
    summed = group.all_reduce_sum(torch.cat(parts))
    total = int(round(float(summed[0])))
    if total == 0:
        return 0
    offset = 1
    for layer in layers:
        for stat in (layer.running_mean, layer.running_var):
            if stat is not None:
                n = stat.numel()
                stat.copy_((summed[offset:offset + n] / total).view_as(stat).to(stat.device, stat.dtype))
                offset += n
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.fill_(total)
    return total


# ---------------------------------------------------------------- the path

@dataclass
class PathCurves:
    """Loss and error on each split (rows, in `splits` order) at each alpha (columns)."""

    alpha: np.ndarray
    splits: tuple[str, ...]
    error: np.ndarray
    loss: np.ndarray
    samples: dict[str, int]
    bn_batches_used: int


def subset_of(data: Any, split: str, settings: EvaluationSettings) -> torch.Tensor | None:
    """The fixed seeded evaluation subset of `split`, or None for the whole split."""
    if settings.samples is None or settings.samples >= data.num_samples(split):
        return None
    return data.subset_indices(split, settings.samples, settings.seed)


class PointEvaluator:
    """Evaluates `model` (a scratch module of the right architecture, on `device`) at any
    state_dict: strict load, BatchNorm statistics recomputed as `settings.bn` says (the same
    batches at every point), then the loss and error of each split. What paths and surfaces
    share.

    Under torchrun (`group`, by default the job's) every rank calls it at the same points:
    each evaluates its contiguous shard of every split's samples and the sums are added up
    over the ranks (`trainer.evaluate`, one all-reduce per split), so every rank returns the
    single-process numbers to float rounding."""

    def __init__(self, model: nn.Module, data: Any, settings: EvaluationSettings, device: str | torch.device,
                 group: Group | None = None):
        from sparse_training.acceleration import StepRunner

        self.model, self.data, self.settings, self.device = model, data, settings, device
        self.group = group if group is not None else distributed.current()
        self.runner = StepRunner(device, settings.precision)
        self.subsets = {split: subset_of(data, split, settings) for split in settings.splits}
        self.recompute = settings.bn == "recompute" and bool(running_stat_layers(model))
        self.bn_batches_used = 0

    def __call__(self, state: Mapping[str, torch.Tensor], where: str) -> tuple[np.ndarray, np.ndarray]:
        """(error, loss) per split at `state`; `where` names the point in errors."""
        from sparse_training.trainer import evaluate

        settings = self.settings
        self.model.load_state_dict(state, strict=True)
        if self.recompute:
            batches = self.data.train_batches(settings.batch_size, settings.seed, 0, augment=False)
            self.bn_batches_used = recompute_bn_statistics(self.model, batches, settings.bn_batches, self.device,
                                                           settings.precision, self.group)
        error, loss = np.empty(len(settings.splits)), np.empty(len(settings.splits))
        for i, split in enumerate(settings.splits):
            result = evaluate(self.model, self.data, split, settings.batch_size, self.device, self.subsets[split],
                              self.runner, self.group)
            if not np.isfinite(result["loss"]):
                raise SparseTrainingError(f"the {split} loss at {where} is {result['loss']}: the interpolated "
                                          "network overflows; check the checkpoints")
            error[i], loss[i] = 1.0 - result["accuracy"], result["loss"]
        return error, loss

    def samples(self) -> dict[str, int]:
        return {split: self.data.num_samples(split) if subset is None else int(subset.numel())
                for split, subset in self.subsets.items()}


def evaluate_states_path(
    model: nn.Module, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], data: Any,
    settings: PathSettings, device: str | torch.device, progress: Callable[[], None] | None = None,
    group: Group | None = None,
) -> PathCurves:
    """Evaluate `model` (a scratch module of the right architecture, on `device`) at every
    point between the state_dicts `state_a` and `state_b` (split across the ranks of `group`,
    by default the job's: see `PointEvaluator`)."""
    evaluator = PointEvaluator(model, data, settings, device, group)
    alphas = alpha_grid(settings.points)
    on_device_a = {k: v.to(device) for k, v in state_a.items()}
    on_device_b = {k: v.to(device) for k, v in state_b.items()}
    error = np.empty((len(settings.splits), alphas.size))
    loss = np.empty_like(error)
    for j, alpha in enumerate(alphas):
        state = vectors.lerp(on_device_a, on_device_b, float(alpha))
        error[:, j], loss[:, j] = evaluator(state, f"alpha={alpha:.4g}")
        if progress is not None:
            progress()
    return PathCurves(alphas, settings.splits, error, loss, evaluator.samples(), evaluator.bn_batches_used)


def evaluate_path(
    a: Checkpoint, b: Checkpoint, data: Any, settings: PathSettings, device: str | torch.device,
    progress: Callable[[], None] | None = None, group: Group | None = None,
) -> PathCurves:
    """The path between two loaded, compatible checkpoints (see `check_compatible`)."""
    model = a.build_model(device)  # a scratch module of its own: the loaded state_dicts are only read
    return evaluate_states_path(model, a.state_dict, b.state_dict, data, settings, device, progress, group)


def recorded_error(ckpt: Checkpoint, split: str) -> float:
    """The error the checkpoint records for `split` (NaN when it records none)."""
    accuracy = ckpt.metrics.get(f"{split}_accuracy")
    return float("nan") if accuracy is None else 1.0 - float(accuracy)


def recorded_loss(ckpt: Checkpoint, split: str) -> float:
    value = ckpt.metrics.get(f"{split}_loss")
    return float("nan") if value is None else float(value)

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
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from sparse_training.checkpoint import Checkpoint
from sparse_training.errors import SparseTrainingError, UserError

from . import vectors
from .settings import PathSettings


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
                            precision: str = "fp32") -> int:
    """Reset the running statistics of `model` and recompute them as the plain average over
    the first `max_batches` of `batches` (forward passes in `precision`); returns how many
    batches were used. The model is left in eval mode."""
    from sparse_training.acceleration import autocast

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
        for x, _ in itertools.islice(batches, max_batches):
            with autocast(device, precision):
                model(x.to(device, non_blocking=True))
            used += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.eval()
    if used == 0:
        raise UserError("the training split yielded no batch to recompute BatchNorm statistics from")
    return used


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


def subset_of(data: Any, split: str, settings: PathSettings) -> torch.Tensor | None:
    """The fixed seeded evaluation subset of `split`, or None for the whole split."""
    if settings.samples is None or settings.samples >= data.num_samples(split):
        return None
    return data.subset_indices(split, settings.samples, settings.seed)


def evaluate_states_path(
    model: nn.Module, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], data: Any,
    settings: PathSettings, device: str | torch.device, progress: Callable[[], None] | None = None,
) -> PathCurves:
    """Evaluate `model` (a scratch module of the right architecture, on `device`) at every
    point between the state_dicts `state_a` and `state_b`."""
    from sparse_training.acceleration import StepRunner
    from sparse_training.trainer import evaluate

    runner = StepRunner(device, settings.precision)
    alphas = alpha_grid(settings.points)
    on_device_a = {k: v.to(device) for k, v in state_a.items()}
    on_device_b = {k: v.to(device) for k, v in state_b.items()}
    subsets = {split: subset_of(data, split, settings) for split in settings.splits}
    error = np.empty((len(settings.splits), alphas.size))
    loss = np.empty_like(error)
    recompute = settings.bn == "recompute" and bool(running_stat_layers(model))
    used = 0
    for j, alpha in enumerate(alphas):
        model.load_state_dict(vectors.lerp(on_device_a, on_device_b, float(alpha)), strict=True)
        if recompute:
            batches = data.train_batches(settings.batch_size, settings.seed, 0, augment=False)
            used = recompute_bn_statistics(model, batches, settings.bn_batches, device, settings.precision)
        model.eval()
        for i, split in enumerate(settings.splits):
            result = evaluate(model, data, split, settings.batch_size, device, subsets[split], runner)
            if not np.isfinite(result["loss"]):
                raise SparseTrainingError(f"the {split} loss at alpha={alpha:.4g} is {result['loss']}: the "
                                          "interpolated network overflows; check the checkpoints")
            error[i, j] = 1.0 - result["accuracy"]
            loss[i, j] = result["loss"]
        if progress is not None:
            progress()
    samples = {split: data.num_samples(split) if subsets[split] is None else int(subsets[split].numel())
               for split in settings.splits}
    return PathCurves(alphas, settings.splits, error, loss, samples, used)


def evaluate_path(
    a: Checkpoint, b: Checkpoint, data: Any, settings: PathSettings, device: str | torch.device,
    progress: Callable[[], None] | None = None,
) -> PathCurves:
    """The path between two loaded, compatible checkpoints (see `check_compatible`)."""
    model = a.build_model(device)  # a scratch module of its own: the loaded state_dicts are only read
    return evaluate_states_path(model, a.state_dict, b.state_dict, data, settings, device, progress)


def recorded_error(ckpt: Checkpoint, split: str) -> float:
    """The error the checkpoint records for `split` (NaN when it records none)."""
    accuracy = ckpt.metrics.get(f"{split}_accuracy")
    return float("nan") if accuracy is None else 1.0 - float(accuracy)


def recorded_loss(ckpt: Checkpoint, split: str) -> float:
    value = ckpt.metrics.get(f"{split}_loss")
    return float("nan") if value is None else float(value)

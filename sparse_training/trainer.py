"""The one training loop. It does no file I/O: a RunSession (run/session.py) drives it cycle
by cycle and receives every epoch's end (and an interruption) through callbacks."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .acceleration import DivergenceWatch, StepRunner
from .config import OptimConfig
from .data.base import batch_bounds
from .distributed import Group
from .masks import MaskedStep, prunable_parameters
from .schedules import learning_rate


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """SGD and Adam decay every parameter (the protocol of the CNN pruning literature);
    AdamW follows the transformer recipe (DeiT, timm): only the weight matrices, the prunable
    weights, decay, never biases, norms, embeddings, class tokens or position embeddings."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                               nesterov=optim.nesterov and optim.momentum > 0)
    if optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    matrices = {id(p) for p in prunable_parameters(model).values()}
    groups = [{"params": [p for p in params if id(p) in matrices], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if id(p) not in matrices], "weight_decay": 0.0}]
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=optim.lr)


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, split: str, batch_size: int, device: str | torch.device = "cpu",
             indices: torch.Tensor | None = None, runner: StepRunner | None = None, group: Group | None = None
             ) -> dict[str, float]:
    """Mean cross-entropy and accuracy over a split (or the `indices` subset), in eval mode, in
    the arithmetic of `runner` (fp32 by default). The model's train/eval mode is restored.
    With a `group` of several processes each evaluates its shard of the samples and the sums
    are all-reduced, so every rank returns the numbers of the whole split."""
    runner = runner if runner is not None else StepRunner(device, "fp32")
    if group is not None and group.distributed:
        indices = group.shard(data.check_indices(split, indices))
    was_training = model.training
    model.eval()
    # loss sum, correct predictions, samples: float64 holds the counts exactly
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in data.eval_batches(split, batch_size, indices=indices):
        x, y = runner.inputs(x, y)
        with runner.autocast():
            logits = model(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        sums[1] += (logits.argmax(dim=1) == y).sum()
        sums[2] += y.numel()
    model.train(was_training)
    if group is not None:
        group.all_reduce_sum(sums)
    loss_sum, correct, count = sums.tolist()
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1)}


@dataclass(frozen=True)
class CycleSpan:
    """Where a cycle sits on the global clock."""

    index: int
    epochs: int
    steps_per_epoch: int
    start_step: int  # global step of the cycle's first update
    first_epoch: int  # global epoch index of the cycle's first epoch (seeds the data order)

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass
class Position:
    """The loop's place: `epoch` epochs of the cycle done, plus `batch` batches of the next."""

    cycle: int
    epoch: int
    batch: int
    step: int


class LoopCallbacks(Protocol):
    def after_step(self, position: Position) -> None: ...
    def end_of_epoch(self, position: Position, lr: float) -> None: ...
    def should_stop(self) -> bool: ...
    def stopped(self, position: Position) -> None: ...


class Interrupted(Exception):
    """Raised after the callbacks saved the resume state because a stop was requested."""

    def __init__(self, position: Position):
        super().__init__(f"stopped at cycle {position.cycle}, epoch {position.epoch}, step {position.step}")
        self.position = position


def train_cycle(
    *, model: nn.Module, optimizer: torch.optim.Optimizer, masked_step: Callable[[], None] | MaskedStep,
    data: Any, optim: OptimConfig, span: CycleSpan, start: Position, seed: int, augment: bool,
    runner: StepRunner, watch: DivergenceWatch, callbacks: LoopCallbacks,
    progress: Callable[[int], Any] | None = None, group: Group | None = None,
) -> Position:
    """Train the cycle `span` from `start` to its end, `model` being the module that runs the
    forward pass (compiled or not, DistributedDataParallel in a job of several processes) in
    the arithmetic of `runner`. Raises TrainingDiverged (through `watch`, read every few
    steps, at every epoch's end and before a stop) naming the first non-finite loss, and
    Interrupted (after `callbacks.stopped`) on a stop request.

    With a `group` of several processes each rank trains on its part of every global batch;
    its mean loss is weighted by its share of the batch, so that the gradient DDP averages
    over ranks is the mean over the whole batch, as in one process."""
    position = Position(start.cycle, start.epoch, start.batch, start.step)
    shard = group if group is not None and group.distributed else None
    sizes = None if shard is None else [b - a for a, b in batch_bounds(data.num_samples("train"), optim.batch_size)]
    model.train()
    for epoch in range(start.epoch, span.epochs):
        batches = data.train_batches(optim.batch_size, seed, span.first_epoch + epoch, augment=augment, shard=shard)
        for x, y in itertools.islice(batches, position.batch, None):
            lr = learning_rate(position.step - span.start_step, span.steps, optim)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            x, y = runner.inputs(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss = runner.loss(model, x, y)
            watch.observe(loss, position.step, span.index, epoch + 1)
            if shard is not None:
                loss = loss * (len(y) * shard.world / sizes[position.batch])
            runner.update(loss, optimizer)
            masked_step()
            position.step += 1
            position.batch += 1
            callbacks.after_step(position)
            if progress is not None:
                progress(1)
            if callbacks.should_stop():
                watch.check()  # never save a resume state with weights past a non-finite loss
                callbacks.stopped(position)
                raise Interrupted(position)
        position.epoch, position.batch = epoch + 1, 0
        watch.check()
        callbacks.end_of_epoch(position, learning_rate(position.step - 1 - span.start_step, span.steps, optim))
        model.train()
    return position

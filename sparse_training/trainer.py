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
             indices: torch.Tensor | None = None, runner: StepRunner | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy over a split (or the `indices` subset), in eval mode, in
    the arithmetic of `runner` (fp32 by default). The model's train/eval mode is restored."""
    runner = runner if runner is not None else StepRunner(device, "fp32")
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for x, y in data.eval_batches(split, batch_size, indices=indices):
        x, y = runner.inputs(x, y)
        with runner.autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(dim=1) == y).sum()
        count += y.numel()
    model.train(was_training)
    return {"loss": float(loss_sum) / max(count, 1), "accuracy": float(correct) / max(count, 1)}


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
    progress: Callable[[int], Any] | None = None,
) -> Position:
    """Train the cycle `span` from `start` to its end, `model` being the module that runs the
    forward pass (compiled or not) in the arithmetic of `runner`. Raises TrainingDiverged
    (through `watch`, read every few steps, at every epoch's end and before a stop) naming
    the first non-finite loss, and Interrupted (after `callbacks.stopped`) on a stop request."""
    position = Position(start.cycle, start.epoch, start.batch, start.step)
    model.train()
    for epoch in range(start.epoch, span.epochs):
        batches = data.train_batches(optim.batch_size, seed, span.first_epoch + epoch, augment=augment)
        for x, y in itertools.islice(batches, position.batch, None):
            lr = learning_rate(position.step - span.start_step, span.steps, optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = runner.inputs(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss = runner.loss(model, x, y)
            watch.observe(loss, position.step, span.index, epoch + 1)
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

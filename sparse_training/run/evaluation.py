"""Evaluation of a run being trained, in eval mode and the run's precision: the train and
test sets at the start of every cycle (epoch 0) and at the end of every `eval_every`-th epoch
(cycle ends and checkpoints always), one row per value into metrics.csv, the latest values
kept for the checkpoints and the log.

With `eval_train_samples` the per-epoch train metrics come from that fixed seeded subset of
the training split, the points that are checkpointed or start a cycle from the whole split;
each train evaluation then also records its sample count (train, samples). In a job of
several processes each rank evaluates its shard of the samples and rank 0 writes the rows."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..acceleration import StepRunner
from ..config import Config
from ..distributed import Group
from ..records import append_metrics
from ..rundir import RunDir
from ..trainer import Position, evaluate


class Evaluation:
    def __init__(self, run: RunDir, data: Any, config: Config, runner: StepRunner, log: Callable[[str], None],
                 group: Group | None = None):
        self.run, self.data, self.runner, self.log = run, data, runner, log
        self.group = group if group is not None else Group()
        self.batch_size = config.optim.eval_batch_size
        samples = config.run.eval_train_samples
        # The subset depends only on the run's seed, so it is the same after a resume.
        self.train_subset = None if samples is None else data.subset_indices("train", samples, config.run.seed)
        self.metrics: dict[str, float] = {}

    def record(self, model: nn.Module, position: Position, lr: float, sparsity: float, flops: int,
               full: bool = True) -> None:
        """Evaluate `model` at `position`; append its rows, with the LR, sparsity and FLOPs so far."""
        where = (position.cycle, position.epoch, position.step)
        rows = []
        for split in ("train", "test"):
            indices = self.train_subset if split == "train" and not full else None
            result = evaluate(model, self.data, split, self.batch_size, self.runner.device, indices, self.runner,
                              self.group)
            for metric, value in result.items():
                self.metrics[f"{split}_{metric}"] = value
                rows.append((*where, split, metric, repr(value)))
            if split == "train" and self.train_subset is not None:
                count = self.data.num_samples("train") if indices is None else len(indices)
                rows.append((*where, "train", "samples", repr(count)))
        rows.append((*where, "train", "lr", repr(lr)))
        rows.append((*where, "train", "sparsity", repr(sparsity)))
        rows.append((*where, "train", "flops", repr(flops)))
        if self.group.is_main:
            append_metrics(self.run, rows)

    def log_epoch(self, position: Position, epochs: int, lr: float, sparsity: float, evaluated: bool = True) -> None:
        head = f"cycle {position.cycle} epoch {position.epoch}/{epochs} step {position.step}: "
        tail = f"lr {lr:.4g} sparsity {sparsity:.4f}"
        if not evaluated:
            self.log(head + tail + " (not evaluated: --eval-every)")
            return
        m = self.metrics
        self.log(head + f"train loss {m['train_loss']:.4f} acc {m['train_accuracy']:.4f} | "
                 f"test loss {m['test_loss']:.4f} acc {m['test_accuracy']:.4f} | " + tail)

"""Evaluation of a run being trained: the full train and test sets in eval mode at the start
of every cycle (epoch 0) and the end of every epoch, one row per value into metrics.csv, the
latest values kept for the checkpoints and the log."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..records import append_metrics
from ..rundir import RunDir
from ..trainer import Position, evaluate


class Evaluation:
    def __init__(self, run: RunDir, data: Any, batch_size: int, device: str, log: Callable[[str], None]):
        self.run, self.data, self.batch_size, self.device, self.log = run, data, batch_size, device, log
        self.metrics: dict[str, float] = {}

    def record(self, model: nn.Module, position: Position, lr: float, sparsity: float, flops: int) -> None:
        """Evaluate `model` at `position`; append its rows, with the LR, sparsity and FLOPs so far."""
        where = (position.cycle, position.epoch, position.step)
        rows = []
        for split in ("train", "test"):
            result = evaluate(model, self.data, split, self.batch_size, self.device)
            for metric, value in result.items():
                self.metrics[f"{split}_{metric}"] = value
                rows.append((*where, split, metric, repr(value)))
        rows.append((*where, "train", "lr", repr(lr)))
        rows.append((*where, "train", "sparsity", repr(sparsity)))
        rows.append((*where, "train", "flops", repr(flops)))
        append_metrics(self.run, rows)

    def log_epoch(self, position: Position, epochs: int, lr: float, sparsity: float) -> None:
        m = self.metrics
        self.log(f"cycle {position.cycle} epoch {position.epoch}/{epochs} step {position.step}: "
                 f"train loss {m['train_loss']:.4f} acc {m['train_accuracy']:.4f} | "
                 f"test loss {m['test_loss']:.4f} acc {m['test_accuracy']:.4f} | lr {lr:.4g} sparsity {sparsity:.4f}")

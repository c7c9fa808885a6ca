"""The files a run being trained writes besides its metrics: the checkpoints analyses read
(init, rewind, cycle_NNN, cycle_NNN_epoch_NNN) and the resume state (state.pt) that only
training reads: model, optimizer, mask, position, metrics, FLOPs and the RNG, written at the
start of every cycle, at the end of every epoch and on a requested stop."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..acceleration import contiguous_copy
from ..checkpoint import checkpoint_payload, load_checkpoint, save_checkpoint
from ..config import Config
from ..errors import UserError
from ..io import torch_load_safe, torch_save_atomic
from ..masks import Mask, sparsity
from ..rundir import RunDir
from ..trainer import Position

STATE_SCHEMA = 1


class Checkpointing:
    def __init__(self, run: RunDir, config: Config):
        self.run, self.config = run, config

    def save(self, label: str, model: nn.Module, mask: Mask, position: Position, cycle: int | None,
             epoch: int | None, metrics: Mapping[str, float]) -> None:
        config = self.config
        save_checkpoint(self.run.checkpoint(label), checkpoint_payload(
            model=model, masks=mask, model_config=config.model, data_config=config.data, label=label, cycle=cycle,
            epoch=epoch, step=position.step, sparsity=sparsity(mask), method=config.run.method, metrics=metrics,
            config=config.to_dict(),
        ))

    def load_weights(self, label: str, model: nn.Module, device: str) -> None:
        """Load the weights of the run's checkpoint `label` (a cycle's weight source: rewind, init)."""
        source = load_checkpoint(self.run.checkpoint(label))
        model.load_state_dict({k: v.to(device) for k, v in source.state_dict.items()})

    def save_state(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, mask: Mask, position: Position,
                   cycle_started: bool, metrics: dict[str, float], flops: int, grad_scaler: dict[str, Any]) -> None:
        optimizer_state = optimizer.state_dict()
        optimizer_state["state"] = {k: contiguous_copy(v) for k, v in optimizer_state["state"].items()}
        torch_save_atomic({
            "schema_version": STATE_SCHEMA,
            "model": contiguous_copy(model.state_dict()),
            "optimizer": optimizer_state,
            "masks": contiguous_copy(mask),
            "grad_scaler": grad_scaler,
            "position": asdict(position),
            "cycle_started": cycle_started,
            "metrics": metrics,
            "flops": flops,
            "torch_rng": torch.get_rng_state(),
        }, self.run.state)

    @contextmanager
    def reading_state(self) -> Iterator[dict[str, Any]]:
        """The resume state, for the with-block that restores the run from it: whatever in it
        does not fit (a missing entry, a wrong shape) is a one-line UserError."""
        state = torch_load_safe(self.run.state, "resume state")
        try:
            yield state
        except (KeyError, TypeError, RuntimeError, ValueError, IndexError, AttributeError) as error:
            lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
            reason = " ".join(lines[:2])[:200] if lines else type(error).__name__  # torch's text spans lines
            raise UserError(f"{self.run.state} is damaged or does not fit the model ({reason}); delete it to "
                            "restart the run from scratch") from None

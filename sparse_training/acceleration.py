"""How a run uses its device: precision (autocast; fp16 with a gradient scaler), memory
format (channels-last for 2-D convolutions), compilation, and the divergence watch that keeps
the non-finite-loss check on the device.

Only the arithmetic changes: weights, masks and optimizer state stay fp32, the masked step
multiplies the fp32 weights, so pruned weights are exactly zero in every precision."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TrainingDiverged, UserError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Steps between reads of the divergence flag: one host-device synchronisation per this many steps.
CHECK_EVERY = 32


def default_precision(device: str | torch.device) -> str:
    """bf16 on CUDA devices that support it (Ampere and later), fp32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device: str | torch.device, precision: str) -> ContextManager[Any]:
    """The autocast region of `precision` on `device` (nothing for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AUTOCAST_DTYPES[precision])


def twice_differentiable() -> ContextManager[Any]:
    """Attention in its composite (math) form inside: the fused scaled-dot-product kernels
    (flash, memory-efficient, CPU flash) have no second derivative, which Hessian-vector
    products and GraSP take. Only the forward passes run inside need it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def channels_last_for(model: nn.Module, device: str | torch.device, requested: str) -> bool:
    """Whether `model` trains in channels-last: `auto` on CUDA for 2-D convolutional models."""
    if requested == "contiguous":
        return False
    if requested == "channels-last":
        if not has_conv2d(model):
            raise UserError("--memory-format channels-last applies to models with 2-D convolutions, and this one has "
                            "none; use --memory-format auto or contiguous")
        return True
    return has_conv2d(model) and torch.device(device).type == "cuda"


def check_compile_supported(device: str | torch.device) -> None:
    """Compile and run a one-line function, so that a missing compiler or an unsupported
    platform is a one-line message before training starts, not a traceback at step 1."""
    try:
        probe = torch.compile(lambda t: torch.relu(t) * 2)
        probe(torch.ones(4, device=device))
    except Exception as error:  # inductor reports a missing toolchain through many exception types
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"--compile is not supported here ({reason}); train without --compile") from None


def contiguous_copy(state: dict[str, Any]) -> dict[str, Any]:
    """A state_dict with every tensor in the usual contiguous layout: files never depend on
    the memory format a run trained in."""
    return {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


class StepRunner:
    """The arithmetic of one run on one device: forward passes under autocast, backward and
    optimizer step (scaled in fp16), inputs in the model's memory format."""

    def __init__(self, device: str | torch.device, precision: str, channels_last: bool = False):
        self.device, self.precision, self.channels_last = torch.device(device), precision, channels_last
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    def autocast(self) -> ContextManager[Any]:
        return autocast(self.device, self.precision)

    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return F.cross_entropy(model(x), y)

    def update(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then shrinks
            self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class DivergenceWatch:
    """The first non-finite training loss, without a host-device synchronisation per step:
    losses are copied into a buffer on the device (one copy per step) and `check` reads the
    buffer, raising TrainingDiverged that names the exact step of the first non-finite one."""

    def __init__(self, device: str | torch.device):
        self.losses = torch.zeros(CHECK_EVERY, dtype=torch.float32, device=device)
        self.pending: list[tuple[int, int, int]] = []  # (step, cycle, epoch) of each buffered loss

    def observe(self, loss: torch.Tensor, step: int, cycle: int, epoch: int) -> None:
        """Record the loss of global step `step`, taken in `epoch` (1-based) of `cycle`."""
        self.losses[len(self.pending)] = loss.detach()
        self.pending.append((step, cycle, epoch))
        if len(self.pending) == CHECK_EVERY:
            self.check()

    def check(self) -> None:
        pending, self.pending = self.pending, []
        if not pending:
            return
        losses = self.losses[:len(pending)].cpu()
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            index = int(bad[0])
            step, cycle, epoch = pending[index]
            raise TrainingDiverged(f"training loss became {float(losses[index])} at cycle {cycle}, epoch {epoch}, "
                                   f"step {step}; lower --lr or check the data")

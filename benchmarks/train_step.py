"""Time per training step: the engine's masked step against a plain PyTorch dense loop,
side by side in one process, on the same model and batch.

    python benchmarks/train_step.py [--steps 60] [--repeats 5] [--device cpu|cuda]

The engine step is `sparse_training.trainer.train_cycle` itself (LR schedule, loss check,
optimizer step and the fused mask multiply), fed one fixed batch; the plain loop is
zero_grad/forward/backward/step. Rounds alternate between the two and the median is taken,
so drift on a shared machine hits both alike. The last column times the mask multiply (weights
and momentum) alone: the part of the engine's step that sparsity adds."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparse_training.config import OptimConfig
from sparse_training.masks import MaskedStep, prunable_parameters
from sparse_training.models import build_model, model_config_for
from sparse_training.acceleration import DivergenceWatch, StepRunner
from sparse_training.trainer import CycleSpan, Position, make_optimizer, train_cycle


class OneBatch:
    """Data stand-in that yields the same batch `steps` times per epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int, global_batch: int | None = None):
        self.x, self.y, self.steps = x, y, steps
        self.global_batch = global_batch or len(y)  # under DDP (ddp_step.py) x, y are one rank's part

    def num_samples(self, split):
        return self.steps * self.global_batch

    def train_batches(self, batch_size, seed, epoch, augment=True, shard=None):
        return ((self.x, self.y) for _ in range(self.steps))


class NoCallbacks:
    def after_step(self, position): pass
    def end_of_epoch(self, position, lr): pass
    def should_stop(self): return False
    def stopped(self, position): pass


def random_mask(model: torch.nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {n: (torch.rand(p.shape, generator=generator) >= sparsity).to(p.device) for n, p in prunable_parameters(model).items()}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_engine(model, optim, x, y, steps, device, sparsity=0.9) -> float:
    optimizer = make_optimizer(model, optim)
    masked = MaskedStep(model, random_mask(model, sparsity), optimizer)
    span = CycleSpan(0, 1, steps, 0, 0)
    sync(device)
    start = time.perf_counter()
    train_cycle(model=model, optimizer=optimizer, masked_step=masked, data=OneBatch(x, y, steps), optim=optim,
                span=span, start=Position(0, 0, 0, 0), seed=0, augment=False, runner=StepRunner(device, "fp32"),
                watch=DivergenceWatch(device), callbacks=NoCallbacks())
    sync(device)
    return (time.perf_counter() - start) / steps


def time_plain(model, optim, x, y, steps, device) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    model.train()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    sync(device)
    return (time.perf_counter() - start) / steps


def time_mask_multiply(model, optim, x, y, calls, device, sparsity=0.9) -> float:
    """The fused multiply of weights and momentum by the mask alone, per call."""
    optimizer = make_optimizer(model, optim)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()  # creates the momentum buffers the multiply also covers
    masked = MaskedStep(model, random_mask(model, sparsity), optimizer)
    masked()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        masked()
    sync(device)
    return (time.perf_counter() - start) / calls


def bench(name: str, kwargs: dict, input_shape: tuple, batch: int, steps: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    model = build_model(model_config_for(name, kwargs, 10, input_shape)).to(device)
    x = torch.randn(batch, *input_shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    optim = OptimConfig(lr=0.01)
    time_plain(model, optim, x, y, 5, device)  # warm-up: allocator, kernels, momentum buffers
    time_engine(model, optim, x, y, 5, device)
    engine, plain = [], []
    for _ in range(repeats):
        plain.append(time_plain(model, optim, x, y, steps, device))
        engine.append(time_engine(model, optim, x, y, steps, device))
    e, p = statistics.median(engine), statistics.median(plain)
    multiply = time_mask_multiply(model, optim, x, y, 100, device)
    return {"model": name, "kwargs": kwargs, "batch": batch, "dense_ms": 1e3 * p, "masked_ms": 1e3 * e, "ratio": e / p,
            "multiply_ms": 1e3 * multiply}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    cases = [("mlp", {}, (40,), 512), ("resnet1d", {}, (40,), 512), ("vit1d", {}, (40,), 512),
             ("resnet20", {"width": 0.5}, (3, 32, 32), 128), ("mobilenetv2", {"width": 0.5}, (3, 32, 32), 64),
             ("vit", {"width": 96, "depth": 4, "heads": 3}, (3, 32, 32), 64)]
    if args.device.startswith("cuda"):
        cases += [("resnet20", {}, (3, 32, 32), 512), ("mobilenetv2", {}, (3, 32, 32), 512), ("vit", {}, (3, 32, 32), 512)]
    print(f"device: {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'model':<11} {'kwargs':<40} {'batch':>5} {'dense ms':>9} {'masked ms':>10} {'masked/dense':>13} "
          f"{'multiply ms':>12}")
    for name, kwargs, shape, batch in cases:
        r = bench(name, kwargs, shape, batch, args.steps, args.repeats, args.device)
        print(f"{r['model']:<11} {str(r['kwargs']):<40} {r['batch']:>5} {r['dense_ms']:>9.3f} {r['masked_ms']:>10.3f} "
              f"{r['ratio']:>13.3f} {r['multiply_ms']:>12.3f}")


if __name__ == "__main__":
    main()

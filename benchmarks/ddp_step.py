"""What DistributedDataParallel costs the engine's step: under torchrun, every rank times the
engine's masked step on its part of the global batch twice, alone (no communication) and
under DDP (gradient all-reduce, the loss weighted by the rank's share), in alternating rounds;
rank 0 prints the medians and their ratio. With one process the ratio is DDP's wrapper
overhead; with N it adds the all-reduce, which is what N-GPU scaling loses per step.

    torchrun --standalone --nproc_per_node N benchmarks/ddp_step.py [--device cuda] [--steps 20]

(`landscape train` itself never wraps a one-process job in DDP: torchrun with one process
trains exactly as a plain process.)"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sparse_training.acceleration import DivergenceWatch, StepRunner
from sparse_training.config import OptimConfig
from sparse_training.distributed import Group
from sparse_training.masks import MaskedStep
from sparse_training.models import build_model, model_config_for
from sparse_training.trainer import CycleSpan, Position, make_optimizer, train_cycle
from train_step import NoCallbacks, OneBatch, random_mask, sync


def time_steps(model, forward, group, optim, x, y, steps, device) -> float:
    optimizer = make_optimizer(model, optim)
    masked = MaskedStep(model, random_mask(model, 0.9), optimizer)
    data = OneBatch(x, y, steps, optim.batch_size)
    sync(device)
    start = time.perf_counter()
    train_cycle(model=forward, optimizer=optimizer, masked_step=masked, data=data, optim=optim,
                span=CycleSpan(0, 1, steps, 0, 0), start=Position(0, 0, 0, 0), seed=0, augment=False,
                runner=StepRunner(device, "fp32"), watch=DivergenceWatch(device), callbacks=NoCallbacks(), group=group)
    sync(device)
    return (time.perf_counter() - start) / steps


def bench(name, kwargs, shape, batch, steps, repeats, group, device) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model(model_config_for(name, kwargs, 10, shape)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[torch.device(device)] if device.startswith("cuda") else None)
    lo, hi = group.span(0, batch)
    x = torch.randn(batch, *shape, device=device)[lo:hi]
    y = torch.randint(0, 10, (batch,), device=device)[lo:hi]
    optim = OptimConfig(lr=0.01, batch_size=batch)
    time_steps(model, model, None, optim, x, y, 3, device)  # warm-up
    time_steps(model, ddp, group, optim, x, y, 3, device)
    alone, together = [], []
    for _ in range(repeats):
        alone.append(time_steps(model, model, None, optim, x, y, steps, device))
        together.append(time_steps(model, ddp, group, optim, x, y, steps, device))
    return statistics.median(alone), statistics.median(together)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = f"cuda:{local}" if args.device.startswith("cuda") else "cpu"
    if device != "cpu":
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device != "cpu" else "gloo")
    group = Group(rank, world, local, device)
    cases = [("mlp", {}, (40,), 512), ("resnet1d", {}, (40,), 512), ("resnet20", {"width": 0.5}, (3, 32, 32), 128)]
    if device != "cpu":
        cases = [("resnet20", {}, (3, 32, 32), 512), ("resnet18", {}, (3, 32, 32), 512),
                 ("tv:resnet50", {}, (3, 224, 224), 64 * world)]
    if rank == 0:
        print(f"{world} process(es) on {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
        print(f"{'model':<12} {'global batch':>12} {'alone ms':>9} {'DDP ms':>8} {'DDP/alone':>10}")
    for name, kwargs, shape, batch in cases:
        alone, together = bench(name, kwargs, shape, batch, args.steps, args.repeats, group, device)
        if rank == 0:
            print(f"{name:<12} {batch:>12} {1e3 * alone:>9.2f} {1e3 * together:>8.2f} {together / alone:>10.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

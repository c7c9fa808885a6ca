"""Training throughput: the engine's loop against a plain PyTorch loop, and the image-folder input rate.

    python benchmarks/throughput.py [--device cpu|cuda] [--precision bf16,fp16] [--compile] [--quick]

Engine: a real RunSession (method pai, random pruner, 90 % sparsity, the run's precision,
memory format and compilation, as `landscape train` builds it) pruned by its first cycle
start, then `trainer.train_cycle` through `RunSession.train_span`, as training calls it (LR
schedule, divergence watch, masked step, FLOP count, mask callbacks). Per-epoch evaluation and
checkpoints are excluded: `end_of_epoch` and `stopped` are no-ops here, and the plain loop has
neither. Plain: the same architecture dense, in the same memory format, autocast dtype (a
GradScaler for fp16) and compilation, SGD with the same hyperparameters, fed by the same data
object. One round is one epoch of the on-device data (steps x batch random images; resnet20:
CIFAR-shaped uint8 with the CIFAR normalisation, crop and flip; resnet50: 224 px, no
augmentation). Rounds alternate engine/plain (order swapped every round) after a warm-up round
each (compilation); the medians are compared. Targets (reported, not asserted): engine/plain
>= 0.97; resnet20 one 50,000-image epoch <= 1.0 s on an H100-class GPU in bf16 channels-last;
image-folder input >= 3000 images/s at 224 px (JPEGs written here, ~500x375, ~100 KB)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparse_training.config import Config, DataConfig, ModelConfig, OptimConfig, PruneConfig, RunConfig, resolve
from sparse_training.data import TensorData, load_data
from sparse_training.data.jpeg import IMAGENET_MEAN, IMAGENET_STD
from sparse_training.data.readers import CIFAR
from sparse_training.models import build_model, model_config_for
from sparse_training.run.session import RunSession
from sparse_training.rundir import RunDir
from sparse_training.trainer import Position

SPARSITY, CLASSES, EPOCH_IMAGES = 0.9, 10, 50_000
# (batch, steps per round) by model, for (device type, quick). The project's resnet50 keeps the
# CIFAR stem (3x3, no max-pool): at 224 px it costs ~16x the FLOPs and activation memory of the
# ImageNet ResNet-50 (tv:resnet50), hence batch 64 on CUDA; on CPU it is impractical (~7 s per
# image forward here), so CPU runs resnet20 unless --models asks.
SIZES = {("cuda", False): {"resnet20": (512, 98), "resnet50": (64, 20), "tv:resnet50": (256, 20)},  # 98 x 512 ~ CIFAR-10
         ("cuda", True): {"resnet20": (512, 20), "resnet50": (32, 5), "tv:resnet50": (64, 5)},
         # CPU: batch 512 takes ~10 s per resnet20 step on 2 cores, so smaller batches there.
         ("cpu", False): {"resnet20": (256, 8), "resnet50": (4, 2), "tv:resnet50": (16, 4)},
         ("cpu", True): {"resnet20": (64, 2), "resnet50": (2, 1), "tv:resnet50": (8, 2)}}
SHAPES = {"resnet20": (3, 32, 32), "resnet50": (3, 224, 224), "tv:resnet50": (3, 224, 224)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_data(model: str, images: int, device: torch.device) -> TensorData:
    """Random uint8 images on the device, normalised (and for CIFAR shapes augmented) as the real sources are."""
    generator = torch.Generator().manual_seed(0)
    shape = SHAPES[model]
    test = min(images, 256)  # evaluated once, at the cycle start
    x = torch.randint(0, 256, (images + test, *shape), dtype=torch.uint8, generator=generator)
    y = torch.randint(0, CLASSES, (images + test,), generator=generator)
    cifar = model == "resnet20"
    mean, std = (CIFAR["cifar10"].mean, CIFAR["cifar10"].std) if cifar else (IMAGENET_MEAN, IMAGENET_STD)
    return TensorData("random", x[:images], y[:images], x[images:], y[images:], CLASSES, device, scale=255.0,
                      mean=mean, std=std, crop_padding=4 if cifar else 0, flip=cifar, augment=True)


class TimingCallbacks:
    """The session's per-step callbacks; epoch ends and stops do nothing (no evaluation, no files)."""

    def __init__(self, session: RunSession):
        self.session = session

    def after_step(self, position: Position) -> None:
        self.session.after_step(position)

    def should_stop(self) -> bool:
        return self.session.should_stop()

    def end_of_epoch(self, position: Position, lr: float) -> None:
        pass

    def stopped(self, position: Position) -> None:
        pass


def engine_session(model: str, precision: str, args, batch: int, data: TensorData, folder: str) -> RunSession:
    config = resolve(Config(data=DataConfig(name="synthetic"), model=ModelConfig(name=model),
                            optim=OptimConfig(batch_size=batch), prune=PruneConfig(pruner="random", sparsity=SPARSITY),
                            run=RunConfig(method="pai", epochs=1, device=str(args.device), precision=precision,
                                          memory_format=args.memory_format, compile=args.compile)))
    run = RunDir(Path(folder) / f"{model}-{precision}")
    run.path.mkdir(parents=True)
    session = RunSession(run, config, data, str(args.device), log=lambda message: print(f"  engine: {message}"),
                         stop=lambda: False)
    session.start_cycle(session.plan, session.spans[0], Position(0, 0, 0, 0))  # prunes to 90 %, evaluates once
    print(f"  engine: mask sparsity {session.masks.sparsity:.4f}")
    if abs(session.masks.sparsity - SPARSITY) > 0.01:
        raise SystemExit(f"expected sparsity {SPARSITY}, got {session.masks.sparsity}")
    return session


def engine_round(session: RunSession, epoch: int) -> None:
    """One epoch through the session's own loop call; `epoch` seeds the data order."""
    span = dataclasses.replace(session.spans[0], first_epoch=epoch)
    session.train_span(span, Position(0, 0, 0, span.start_step), callbacks=TimingCallbacks(session))


class PlainLoop:
    """The loop anyone would write: dense model, same arithmetic, layout and compilation."""

    def __init__(self, session: RunSession):
        config, device = session.config, session.runner.device
        torch.manual_seed(1)
        self.model = build_model(model_config_for(config.model.name, {}, CLASSES, session.data.input_shape)).to(device)
        self.channels_last = session.runner.channels_last  # the engine's `auto` decision, copied
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if config.run.compile else self.model
        o = config.optim
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay, nesterov=o.nesterov)
        precision = config.run.precision
        self.autocast = dict(device_type=device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                             enabled=precision != "fp32")
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.data, self.batch, self.seed, self.device = session.data, o.batch_size, config.run.seed, device

    def round(self, epoch: int) -> None:
        self.model.train()
        for x, y in self.data.train_batches(self.batch, self.seed, epoch, augment=True):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(**self.autocast):
                loss = F.cross_entropy(self.forward(x), y)
            if self.scaler is None:
                loss.backward()
                self.optimizer.step()
            else:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench_model(model: str, precision: str, args, folder: str) -> None:
    batch, steps = SIZES[(args.device.type, args.quick)][model]
    batch, steps = args.batch or batch, args.steps or steps
    images = batch * steps  # one round = one epoch, all batches full (no recompilation for a short last batch)
    started = time.perf_counter()
    session = engine_session(model, precision, args, batch, tensor_data(model, images, args.device), folder)
    plain = PlainLoop(session)
    sides = {"engine": lambda epoch: engine_round(session, epoch), "plain": plain.round}
    seconds = {"engine": [], "plain": []}
    for name, run in sides.items():  # warm-up: compilation, allocator, cuDNN/oneDNN plans, momentum buffers
        print(f"  warm-up {name}: {timed(lambda: run(0), args.device):.2f} s")
    for r in range(args.rounds):
        for name in (("engine", "plain") if r % 2 == 0 else ("plain", "engine")):
            seconds[name].append(timed(lambda: sides[name](r + 1), args.device))
    rate = {name: images / statistics.median(s) for name, s in seconds.items()}
    layout = "channels-last" if session.runner.channels_last else "contiguous"
    label = f"{model} {precision} {layout}{' compiled' if args.compile else ''} batch {batch}"
    for name in ("engine", "plain"):
        spread = ", ".join(f"{images / s:.0f}" for s in seconds[name])
        print(f"  {name:<7} {rate[name]:>10.1f} images/s   (rounds: {spread})")
    if model == "resnet20":
        print(f"  engine  {EPOCH_IMAGES / rate['engine']:>10.2f} s per 50,000-image epoch (projected)")
    print(f"engine/plain {rate['engine'] / rate['plain']:.3f}   {label}   ({time.perf_counter() - started:.0f} s)")
    del session, plain, sides
    if args.device.type == "cuda":
        torch.cuda.empty_cache()


def write_jpeg(job: tuple[str, int]) -> int:
    """A ~500x375 JPEG of ~100 KB: a smooth random colour field plus noise (pure noise or flat
    colour would give unrealistic file sizes and decode times)."""
    from PIL import Image

    path, seed = job
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(400, 600)), int(rng.integers(300, 450))
    field = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 20, (height, width, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    return os.path.getsize(path)


def write_folder(root: Path, images: int, classes: int, workers: int) -> float:
    jobs = []
    for split, count in (("train", images), ("val", 2 * classes)):
        for i in range(count):
            directory = root / split / f"class_{i % classes}"
            directory.mkdir(parents=True, exist_ok=True)
            jobs.append((str(directory / f"{i:06d}.jpg"), len(jobs)))
    with ProcessPoolExecutor(max(workers, 1)) as pool:
        sizes = list(pool.map(write_jpeg, jobs, chunksize=64))
    return statistics.mean(sizes)


def bench_folder(args, folder: str) -> None:
    images, batch = args.folder_images, 64 if args.quick else 256
    root = Path(folder) / "images"
    started = time.perf_counter()
    mean_size = write_folder(root, images, 4, args.workers)
    print(f"image folder: {images} train JPEGs, mean {mean_size / 1e3:.0f} KB, written in "
          f"{time.perf_counter() - started:.1f} s; batch {batch}, {args.workers} workers, 224 px")
    for mode in args.decoding.split(","):
        data = load_data(DataConfig(name=f"imagefolder:{root}", image_decoding=mode, num_workers=args.workers),
                         args.device)

        def epoch(e: int) -> None:  # every epoch starts its own DataLoader, as in training: worker start-up counts
            for x, y in data.train_batches(batch, seed=0, epoch=e):
                pass

        seconds = [timed(lambda: epoch(e), args.device) for e in range(args.rounds + 1)][1:]  # epoch 0: warm-up
        rates = ", ".join(f"{images / s:.0f}" for s in seconds)
        print(f"  {mode:<7} {images / statistics.median(seconds):>10.1f} images/s   (epochs: {rates})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="fp32, bf16, fp16 or a comma list [bf16 on CUDA, fp32 on CPU]")
    parser.add_argument("--memory-format", default="auto", choices=("auto", "channels-last", "contiguous"))
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides")
    parser.add_argument("--models", default=None, help="comma list of resnet20, resnet50, tv:resnet50 (empty: none) "
                                                         "[resnet20,tv:resnet50 on CUDA, resnet20 on CPU]")
    parser.add_argument("--quick", action="store_true", help="few steps, small batches, a small image folder")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per side [5; quick 3]")
    parser.add_argument("--steps", type=int, default=None, help="steps per round (overrides the table SIZES)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (overrides the table SIZES)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-folder DataLoader workers")
    parser.add_argument("--folder-images", type=int, default=None, help="train JPEGs written [4096; quick 512; 0 skips]")
    parser.add_argument("--decoding", default="pil,device", help="image-folder image_decoding modes to time")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    args.rounds = args.rounds or (3 if args.quick else 5)
    if args.models is None:
        args.models = "resnet20,tv:resnet50" if args.device.type == "cuda" else "resnet20"
    args.folder_images = (512 if args.quick else 4096) if args.folder_images is None else args.folder_images
    from sparse_training.acceleration import default_precision

    precisions = (args.precision or default_precision(args.device)).split(",")
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"device: {args.device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"precision {','.join(precisions)}, memory format {args.memory_format}, compile {args.compile}, "
          f"rounds {args.rounds}{', quick' if args.quick else ''}, sparsity {SPARSITY} (pai, random)")
    with tempfile.TemporaryDirectory(prefix="throughput-") as folder:
        for model in filter(None, args.models.split(",")):
            for precision in precisions:
                print(f"{model}, {precision}:")
                bench_model(model, precision, args, folder)
        if args.folder_images > 0:
            bench_folder(args, folder)


if __name__ == "__main__":
    main()

"""A K-point barrier with BatchNorm recomputation against the ideal: K plain evaluations
of one already-built model, each after the same BatchNorm passes, side by side in one
process on the same model, data and device.

    python benchmarks/barrier.py [--points 11] [--bn-batches 20] [--batch-size 1024]
                                 [--model resnet1d] [--width 10] [--data mnist1d] [--samples N]
                                 [--repeats 5] [--device cpu] [--threads 1]

"path" is `landscape.interpolate.evaluate_path` as `landscape barrier` runs it: a scratch
model built from checkpoint A, then at every alpha the interpolated state_dict (float64
lerp), a strict load, the BatchNorm reset and passes, and the evaluation of each split.
"ideal" does only the BatchNorm passes and the evaluations, K times, on a model whose
weights never change. The overhead is everything else; the ratio path / ideal is the
figure of merit (target <= 1.1). Timings are the median of --repeats interleaved runs."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from landscape.interpolate import PathSettings, evaluate_path, recompute_bn_statistics, subset_of
from sparse_training.checkpoint import Checkpoint
from sparse_training.config import DataConfig
from sparse_training.data import load_data
from sparse_training.masks import ones_mask
from sparse_training.models import build_model, model_config_for
from sparse_training.trainer import evaluate


def endpoint(model_config, data_config, seed: int) -> Checkpoint:
    """An in-memory checkpoint of a freshly initialised model (timings do not depend on training)."""
    torch.manual_seed(seed)
    model = build_model(model_config)
    return Checkpoint(path=Path(f"seed{seed}.pt"), state_dict=model.state_dict(),
                      masks=ones_mask(model), model=model_config, data=data_config, label=f"seed{seed}")


def ideal(a: Checkpoint, data, settings: PathSettings, device: str) -> None:
    model = a.build_model(device)
    subsets = {split: subset_of(data, split, settings) for split in settings.splits}
    for _ in range(settings.points):
        batches = data.train_batches(settings.batch_size, settings.seed, 0, augment=False)
        recompute_bn_statistics(model, batches, settings.bn_batches, device)
        for split in settings.splits:
            evaluate(model, data, split, settings.batch_size, device, indices=subsets[split])


def seconds(device: str, work) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def evaluation_arguments(description: str, repeats: int) -> argparse.ArgumentParser:
    """The options this benchmark shares with benchmarks/surface.py."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--bn-batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--model", default="resnet1d")
    parser.add_argument("--width", type=int, default=None, help="resnet1d width [10]")
    parser.add_argument("--data", default="mnist1d")
    parser.add_argument("--samples", type=int, default=None, help="evaluate on a subset of this size per split")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    return parser


def model_and_data(args: argparse.Namespace):
    """(model config, data config, data) the options name; sets the torch threads."""
    torch.set_num_threads(args.threads)
    data_config = DataConfig(name=args.data)
    data = load_data(data_config, args.device)
    kwargs = {"width": args.width} if args.width else {}
    return model_config_for(args.model, kwargs, data.num_classes, data.input_shape), data_config, data


def main() -> None:
    parser = evaluation_arguments(__doc__.splitlines()[0], repeats=5)
    parser.add_argument("--points", type=int, default=11)
    args = parser.parse_args()
    model_config, data_config, data = model_and_data(args)
    a, b = endpoint(model_config, data_config, 0), endpoint(model_config, data_config, 1)
    settings = PathSettings(points=args.points, bn_batches=args.bn_batches, batch_size=args.batch_size,
                            samples=args.samples)
    used = evaluate_path(a, b, data, settings, args.device).bn_batches_used  # also the warm-up
    ideal(a, data, settings, args.device)

    path_times, ideal_times = [], []
    for _ in range(args.repeats):
        path_times.append(seconds(args.device, lambda: evaluate_path(a, b, data, settings, args.device)))
        ideal_times.append(seconds(args.device, lambda: ideal(a, data, settings, args.device)))
    path_s, ideal_s = statistics.median(path_times), statistics.median(ideal_times)
    parameters = sum(t.numel() for t in a.state_dict.values() if t.is_floating_point())
    evaluated = {s: data.num_samples(s) if subset_of(data, s, settings) is None else settings.samples for s in settings.splits}
    print(f"{args.model} {model_config.kwargs} ({parameters} parameters) on {args.data} {evaluated}, device {args.device}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{settings.points} points, BatchNorm recompute from {used} batches of {settings.batch_size}, "
          f"median of {args.repeats}")
    print(f"{'':6}{'seconds':>10}{'per point':>12}")
    for name, value in (("path", path_s), ("ideal", ideal_s)):
        print(f"{name:6}{value:10.3f}{value / settings.points * 1000:10.1f}ms")
    print(f"ratio path / ideal: {path_s / ideal_s:.3f} (target <= 1.1)")


if __name__ == "__main__":
    main()

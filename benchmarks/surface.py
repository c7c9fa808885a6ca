"""A G x G loss surface with BatchNorm recomputation against the ideal, and the time of one
weight-matching alignment, side by side in one process.

    python benchmarks/surface.py [--grid 11] [--bn-batches 20] [--batch-size 1024]
                                 [--model resnet1d] [--width 10] [--data mnist1d] [--samples N]
                                 [--repeats 3] [--device cpu] [--threads 1]
                                 [--align-models resnet20,resnet18,vgg16]

"surface" is `landscape.surface.surface_dataset` as `landscape surface` runs it on the plane
through three checkpoints: the frame, then at every grid point the state_dict (float64), a
strict load, the BatchNorm reset and passes, the evaluation of each split; then the three
checkpoints at their own coordinates. "ideal" is the same number of evaluations (G*G + 3) of
one already-built model, each after the same BatchNorm passes (`barrier.ideal`). The ratio
surface / ideal is the figure of merit (target <= 1.1). "align" is
`landscape.align.align` of the second checkpoint to the first: tracing the model, weight
matching until no group improves, permuting the state_dict and mask; also for two
independent inits of each of --align-models. Medians of --repeats."""

from __future__ import annotations

import statistics

import torch

from barrier import endpoint, evaluation_arguments, ideal, model_and_data, seconds
from landscape.align import align
from landscape.settings import PathSettings, SurfaceSettings
from landscape.surface import resolved, surface_dataset
from sparse_training.config import DataConfig
from sparse_training.models import model_config_for


def main() -> None:
    parser = evaluation_arguments(__doc__.splitlines()[0], repeats=3)
    parser.add_argument("--grid", type=int, default=11)
    parser.add_argument("--align-models", default="resnet20,resnet18,vgg16",
                        help="CIFAR-shaped models whose alignment is also timed (comma-separated; empty: none)")
    args = parser.parse_args()
    model_config, data_config, data = model_and_data(args)
    checkpoints = [endpoint(model_config, data_config, seed) for seed in (0, 1, 2)]
    settings = resolved(SurfaceSettings(grid=args.grid, bn_batches=args.bn_batches, batch_size=args.batch_size,
                                        samples=args.samples), 3)
    points = args.grid * args.grid + len(checkpoints)
    equivalent = PathSettings(points=points, bn_batches=args.bn_batches, batch_size=args.batch_size,
                              samples=args.samples)

    def run_surface() -> None:
        surface_dataset(checkpoints, ["a", "b", "c"], data, settings, args.device)

    model = checkpoints[0].build_model(args.device)
    example = next(iter(data.eval_batches("train", 2)))[0].to(args.device)

    def run_align() -> None:
        align(model, example, checkpoints[0].state_dict, checkpoints[1].state_dict, checkpoints[1].masks)

    used = int(surface_dataset(checkpoints, ["a", "b", "c"], data, settings, args.device).bn_batches_used)  # warm-up
    surface_times, ideal_times, align_times = [], [], []
    for _ in range(args.repeats):
        surface_times.append(seconds(args.device, run_surface))
        ideal_times.append(seconds(args.device, lambda: ideal(checkpoints[0], data, equivalent, args.device)))
        align_times.append(seconds(args.device, run_align))
    surface_s, ideal_s = statistics.median(surface_times), statistics.median(ideal_times)
    parameters = sum(t.numel() for t in checkpoints[0].state_dict.values() if t.is_floating_point())
    print(f"{args.model} {model_config.kwargs} ({parameters} parameters) on {args.data}, device {args.device}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{args.grid} x {args.grid} surface + 3 checkpoints = {points} evaluations, BatchNorm recomputed from "
          f"{used} batches of {settings.batch_size}, median of {args.repeats}")
    print(f"{'':8}{'seconds':>10}{'per point':>12}")
    for name, value in (("surface", surface_s), ("ideal", ideal_s)):
        print(f"{name:8}{value:10.3f}{value / points * 1000:10.1f}ms")
    print(f"ratio surface / ideal: {surface_s / ideal_s:.3f} (target <= 1.1)")
    print(f"one alignment (weight matching of two independent inits): {statistics.median(align_times):.3f} s")
    for name in filter(None, args.align_models.split(",")):
        print(f"one alignment of {name}: {image_model_alignment(name, args.device):.3f} s")


def image_model_alignment(name: str, device: str) -> float:
    """Seconds to align two independent inits of a CIFAR-shaped model (no data needed)."""
    config = model_config_for(name, {}, 10, (3, 32, 32))
    a, b = (endpoint(config, DataConfig(name="cifar10"), seed) for seed in (0, 1))
    model, example = a.build_model(device), torch.randn(2, 3, 32, 32, device=device)
    return seconds(device, lambda: align(model, example, a.state_dict, b.state_dict, b.masks))


if __name__ == "__main__":
    main()

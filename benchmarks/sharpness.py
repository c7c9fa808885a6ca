"""Top Hessian eigenvalues: PyHessian 0.1 at its defaults against this project's Lanczos,
side by side in one process, on the same model, evaluation subset and device.

    python benchmarks/sharpness.py [--samples 2048] [--epochs 10] [--seeds 0,1,2,3,4]
        [--ks 1,5] [--tols 3e-2,1e-2,1e-3] [--context] [--run RUN --checkpoint cycle_002]
        [--device cpu] [--threads 1]

The models are the ~11k-parameter MNIST-1D `resnet1d` (BatchNorm), trained here for a few
epochs from each of several seeds (how many HVPs power iteration needs depends on the gap
between the top eigenvalues, which differs from model to model), or one checkpoint of a run
with --run. The reference eigenvalues come from `eigsh` run to tol 1e-10 on a float64 copy
of the model; every other solver runs in float32 on the same batches. PyHessian is called
as published (`hessian(...).eigenvalues(top_n=k)`, tol 1e-3, maxIter 100); the only
addition is a counter wrapped around its HVP method. Lanczos runs at several tolerances
(each bounds the relative error: |theta - lambda| <= residual <= tol |theta|); the ratios
are taken, over all models together, against the loosest one whose error, verified against
the reference, is at most 1e-3 on every model. With --context, also `eigsh` and this
project's power iteration at tol 1e-3."""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from landscape.hessian import Eigenpairs, HessianOperator
from landscape.lanczos import eigsh_top, lanczos_top
from landscape.power import power_top
from sparse_training.checkpoint import load_checkpoint
from sparse_training.rundir import RunDir
from sparse_training.config import DataConfig
from sparse_training.data import load_data
from sparse_training.models import build_model, model_config_for


def trained_model(args, data, seed: int) -> nn.Module:
    if args.run:
        return load_checkpoint(RunDir(args.run).checkpoint(args.checkpoint)).build_model(args.device)
    torch.manual_seed(seed)
    model = build_model(model_config_for("resnet1d", {}, data.num_classes, data.input_shape)).to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in range(args.epochs):
        model.train()
        for x, y in data.train_batches(128, seed, epoch, augment=False):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, solve) -> tuple[Eigenpairs, float]:
    sync(device)
    start = time.perf_counter()
    pairs = solve()
    sync(device)
    return pairs, time.perf_counter() - start


def pyhessian_as_published(model: nn.Module, batches, k: int, seed: int, device: str) -> Eigenpairs:
    """PyHessian 0.1's `eigenvalues(top_n=k)` at its defaults; a counter wraps its HVP."""
    import warnings

    from pyhessian import hessian

    warnings.filterwarnings("ignore", message=".*create_graph=True.*")
    torch.manual_seed(seed)
    solver = hessian(model, nn.CrossEntropyLoss(), dataloader=batches, cuda=device.startswith("cuda"))
    product, calls = solver.dataloader_hv_product, []

    def counted(v):
        calls.append(1)
        return product(v)

    solver.dataloader_hv_product = counted
    values, _ = solver.eigenvalues(top_n=k)
    return Eigenpairs(np.array(values), np.full(k, np.nan), np.full(k, len(calls)), torch.zeros(0))


def relative_error(values: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(np.sort(values)[::-1] - reference[:len(values)]) / np.abs(reference[:len(values)])))


def compare(args, data, seed: int, ks: list[int]) -> list[tuple]:
    """Every solver on one model: rows (seed, k, method, HVPs, seconds, max rel. error)."""
    model = trained_model(args, data, seed)
    subset = data.subset_indices("train", args.samples, 0)
    batches = [(x.to(args.device), y.to(args.device))
               for x, y in data.eval_batches("train", args.batch_size, indices=subset)]
    op = HessianOperator(model, batches)
    op64 = HessianOperator(copy.deepcopy(model).double(), [(x.double(), y) for x, y in batches])
    reference, seconds = timed(args.device, lambda: eigsh_top(op64, max(ks), 1e-10, 10_000, 0))
    print(f"model seed {seed}: {op.dim} parameters, loss {op.loss():.4f}; reference (eigsh, float64, tol 1e-10, "
          f"{int(reference.hvp_counts[0])} HVPs, {seconds:.1f} s, max residual {reference.residuals.max():.1e}): "
          f"{reference.values.round(4).tolist()}")
    rows = []
    for k in ks:
        solvers = {"pyhessian 0.1 (tol 1e-3, maxIter 100)":
                   lambda: pyhessian_as_published(model, batches, k, 0, args.device)}
        for tol in args.tols:
            solvers[f"lanczos (ours, tol {tol:g})"] = lambda tol=tol: lanczos_top(op, k, tol, 100, 0)
        if args.context:
            solvers["eigsh (tol 1e-3)"] = lambda: eigsh_top(op, k, 1e-3, 100, 0, verify=False)
            solvers["power (ours, tol 1e-3)"] = lambda: power_top(op, k, 1e-3, 100, 0)
        for name, solve in solvers.items():
            pairs, seconds = timed(args.device, solve)
            error = relative_error(pairs.values, reference.values)
            rows.append((seed, k, name, int(pairs.hvp_counts.max()), seconds, error))
    return rows


def summary(rows: list[tuple], k: int, tols: list[float]) -> list[str]:
    """Totals over the models: PyHessian against the loosest Lanczos tolerance whose error is
    at most 1e-3 on every model (one tolerance for all: no choosing per model), and against
    the default tolerance 1e-3."""
    def totals(prefix: str) -> tuple[int, float, float]:
        chosen = [r for r in rows if r[1] == k and r[2].startswith(prefix)]
        return sum(r[3] for r in chosen), sum(r[4] for r in chosen), max(r[5] for r in chosen)

    theirs = totals("pyhessian")
    verified = [t for t in sorted(tols, reverse=True) if totals(f"lanczos (ours, tol {t:g})")[2] <= 1e-3]
    lines = [] if verified else [f"top-{k}: no Lanczos tolerance reached a verified error <= 1e-3 on every model"]
    for tol in sorted(set(verified[:1]) | ({1e-3} & set(tols)), reverse=True):
        ours = totals(f"lanczos (ours, tol {tol:g})")
        lines.append(f"top-{k}, all models: PyHessian {theirs[0]} HVPs {theirs[1]:.1f} s max error {theirs[2]:.1e}; "
                     f"Lanczos tol {tol:g}: {ours[0]} HVPs {ours[1]:.1f} s max error {ours[2]:.1e}; "
                     f"ratio {theirs[0] / ours[0]:.1f}x HVPs, {theirs[1] / ours[1]:.1f}x time")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="training seeds: one model each")
    parser.add_argument("--tols", type=lambda text: [float(t) for t in text.split(",")], default=[3e-2, 1e-2, 1e-3],
                        help="Lanczos tolerances to try (comma-separated)")
    parser.add_argument("--ks", default="1,5", help="comma-separated numbers of eigenvalues")
    parser.add_argument("--context", action="store_true", help="also eigsh and power iteration at tol 1e-3")
    parser.add_argument("--run", default=None, help="take the model from this run instead of training them")
    parser.add_argument("--checkpoint", default="cycle_000")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    seeds = [0] if args.run else [int(s) for s in args.seeds.split(",")]
    data = load_data(DataConfig(name="mnist1d"), args.device)
    print(f"resnet1d on MNIST-1D, {args.samples} samples, device {args.device}, {args.threads} thread(s)")
    rows = [row for seed in seeds for row in compare(args, data, seed, ks)]

    print(f"\n{'seed':>4} {'k':>2}  {'method':<40} {'HVPs':>5} {'seconds':>8} {'max rel. error':>15}")
    for seed, k, name, hvps, seconds, error in rows:
        print(f"{seed:>4} {k:>2}  {name:<40} {hvps:>5} {seconds:>8.2f} {error:>15.2e}")
    print()
    for k in ks:
        print("\n".join(summary(rows, k, args.tols)))


if __name__ == "__main__":
    main()

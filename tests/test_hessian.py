"""Hessian-vector products, eigensolvers, trace and density against a dense Hessian from
torch.autograd.functional.hessian on models of a few hundred parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from landscape.hessian import HessianOperator, dot64, generator, hutchinson_trace, rademacher_vector
from landscape.lanczos import density_on_grid, eigsh_top, lanczos_top, slq_nodes
from landscape.power import power_top
from landscape.pyhessian_backend import pyhessian_top
from landscape.sharpness_dataset import Record, build, records_of
from landscape.store import read_dataset, write_dataset

N_SAMPLES = 50


def with_bn() -> nn.Module:
    """16 + 8 + 165 = 189 parameters: Conv1d, BatchNorm1d, tanh, Linear."""
    return nn.Sequential(nn.Unflatten(1, (1, 10)), nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.Tanh(), nn.Flatten(),
                         nn.Linear(32, 5))


def without_bn() -> nn.Module:
    """132 + 65 = 197 parameters."""
    return nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 5))


def setup(factory, dtype=torch.float64, seed=0):
    """A model with non-trivial BatchNorm statistics, in eval mode, a mask over its weights,
    the data, and the dense Hessian of the mean loss (in float64)."""
    torch.manual_seed(seed)
    model = factory().to(dtype)
    x = torch.randn(N_SAMPLES, 10, dtype=dtype)
    y = torch.randint(0, 5, (N_SAMPLES,))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + 0.5 * torch.randn_like(x))
    model.eval()
    mask = {name: torch.rand(p.shape) > 0.4 for name, p in model.named_parameters() if p.dim() > 1}
    return model, x, y, mask, dense_hessian(model, x, y)


def dense_hessian(model, x, y) -> torch.Tensor:
    model64 = _double(model)
    names = [n for n, _ in model64.named_parameters()]
    shapes = [p.shape for _, p in model64.named_parameters()]
    sizes = [p.numel() for _, p in model64.named_parameters()]
    buffers = dict(model64.named_buffers())

    def loss(flat):
        params = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model64, (params, buffers), (x.double(),)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in model64.parameters()])
    return torch.autograd.functional.hessian(loss, flat)


def _double(model):
    import copy

    return copy.deepcopy(model).double().eval()


def keep_vector(model, mask) -> torch.Tensor:
    return torch.cat([mask[n].reshape(-1) if n in mask else torch.ones(p.numel(), dtype=torch.bool)
                      for n, p in model.named_parameters()])


def restricted(hessian, model, mask) -> torch.Tensor:
    """The dense Hessian without the rows and columns of the pruned weights."""
    keep = keep_vector(model, mask)
    return hessian[keep][:, keep]


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


class MatrixOperator:
    """A symmetric matrix behind the solvers' operator interface."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix, self.dim = matrix, matrix.shape[0]
        self.device, self.dtype, self.hvp_count = matrix.device, matrix.dtype, 0

    def matvec(self, v):
        self.hvp_count += 1
        return self.matrix @ v


def matrix_with_spectrum(values, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q.T


# ---------------------------------------------------------------- the product

@pytest.mark.parametrize("factory", [with_bn, without_bn])
def test_hvp_equals_dense_hessian_times_v_in_both_subspaces(factory):
    model, x, y, mask, hessian = setup(factory)
    for op, dense in ((HessianOperator(model, batches(x, y, 16), mask), restricted(hessian, model, mask)),
                      (HessianOperator(model, batches(x, y, 16)), hessian)):
        assert op.dim == dense.shape[0]
        for seed in range(3):
            v = torch.randn(op.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
    assert op.hvp_count == 3


def test_masked_product_is_m_times_h_times_m_v():
    # The definition in the issue, in full coordinates: v <- m*v before and after the product.
    model, x, y, mask, hessian = setup(with_bn)
    m = keep_vector(model, mask).double()
    op = HessianOperator(model, batches(x, y, 16), mask)
    v = torch.randn(m.numel(), dtype=torch.float64)
    full = torch.cat([t.reshape(-1) for t in op.expand(op.matvec(op.compress(op.expand(v[m.bool()]))))])
    torch.testing.assert_close(full, m * (hessian @ (m * v)), rtol=1e-10, atol=1e-12)


def test_short_last_batch_is_weighted_by_its_size():
    # 50 samples in batches of 16 (the last holds 2), of 7, and all at once: the same Hessian of the mean.
    model, x, y, mask, hessian = setup(with_bn)
    v = torch.randn(hessian.shape[0], dtype=torch.float64)
    for size in (16, 7, 50):
        product = HessianOperator(model, batches(x, y, size)).matvec(v)
        torch.testing.assert_close(product, hessian @ v, rtol=1e-10, atol=1e-12)


def test_kept_gradient_graphs_give_identical_products():
    model, x, y, mask, hessian = setup(with_bn)
    kept = HessianOperator(model, batches(x, y, 16), mask)
    recomputed = HessianOperator(model, batches(x, y, 16), mask, graph_budget=0)
    for seed in range(3):
        v = torch.randn(kept.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert torch.equal(kept.matvec(v), recomputed.matvec(v))
    assert kept.keep_graphs is True and recomputed.keep_graphs is False


def test_float32_model_products_agree_with_float64_hessian():
    model, x, y, mask, hessian = setup(with_bn, dtype=torch.float32)
    op = HessianOperator(model, batches(x, y, 16))
    v = torch.randn(op.dim, dtype=torch.float32)
    assert op.matvec(v).dtype == torch.float32
    torch.testing.assert_close(op.matvec(v).double(), hessian @ v.double(), rtol=1e-4, atol=1e-5)


def test_operator_puts_model_in_eval_mode():
    model, x, y, mask, _ = setup(with_bn)
    model.train()
    HessianOperator(model, batches(x, y, 16))
    assert not model.training


# ---------------------------------------------------------------- eigenvalues

@pytest.mark.parametrize("factory", [with_bn, without_bn])
@pytest.mark.parametrize("solver", [lanczos_top, eigsh_top, power_top])
def test_top_k_equal_eigvalsh_of_restricted_dense_hessian(factory, solver):
    model, x, y, mask, hessian = setup(factory)
    exact = np.linalg.eigvalsh(restricted(hessian, model, mask).numpy())[::-1][:4]
    pairs = solver(HessianOperator(model, batches(x, y, 16), mask), 4, 1e-10, 2000, 0)
    np.testing.assert_allclose(pairs.values, exact, rtol=1e-6)
    assert pairs.hvp_counts.min() >= 1 and np.all(np.diff(pairs.hvp_counts) >= 0)


def test_masked_and_full_differ_as_the_restricted_hessian_says():
    model, x, y, mask, hessian = setup(with_bn)
    full_exact = np.linalg.eigvalsh(hessian.numpy())[::-1][:3]
    masked_exact = np.linalg.eigvalsh(restricted(hessian, model, mask).numpy())[::-1][:3]
    assert not np.allclose(full_exact, masked_exact, rtol=1e-3)  # the mask matters on this model
    full = lanczos_top(HessianOperator(model, batches(x, y, 16)), 3, 1e-10, 500, 0)
    masked = lanczos_top(HessianOperator(model, batches(x, y, 16), mask), 3, 1e-10, 500, 0)
    np.testing.assert_allclose(full.values, full_exact, rtol=1e-6)
    np.testing.assert_allclose(masked.values, masked_exact, rtol=1e-6)
    # Cauchy interlacing: a principal submatrix's eigenvalues never exceed the full ones.
    assert np.all(masked.values <= full.values + 1e-12)


def test_reported_residuals_are_the_true_residuals():
    model, x, y, mask, _ = setup(with_bn)
    op = HessianOperator(model, batches(x, y, 16), mask)
    pairs = lanczos_top(op, 3, 1e-3, 100, 0)
    true = [op.residual(float(lam), v) for lam, v in zip(pairs.values, pairs.vectors)]
    np.testing.assert_allclose(pairs.residuals, true, rtol=1e-6, atol=1e-12)
    assert np.all(pairs.residuals <= 1e-3 * np.abs(pairs.values))
    np.testing.assert_allclose(torch.linalg.norm(pairs.vectors, dim=1).numpy(), 1.0, rtol=1e-10)


def test_lanczos_stops_as_soon_as_the_tolerance_holds():
    values = [10.0, 5.0] + [1.0 - 0.01 * i for i in range(60)]
    op = MatrixOperator(matrix_with_spectrum(values))
    loose, tight = lanczos_top(op, 1, 1e-2, 100, 0), lanczos_top(op, 1, 1e-9, 100, 0)
    assert loose.hvp_counts[0] < tight.hvp_counts[0] < 62
    assert loose.residuals[0] <= 1e-2 * 10.0 and abs(loose.values[0] - 10.0) <= loose.residuals[0]
    assert abs(tight.values[0] - 10.0) <= 1e-8


def test_largest_algebraic_even_when_a_negative_eigenvalue_dominates():
    values = [-20.0, 3.0, 2.0, 1.0, 0.5, -1.0, 0.1, 0.0]
    op = MatrixOperator(matrix_with_spectrum(values))
    for solver in (lanczos_top, power_top):
        np.testing.assert_allclose(solver(op, 2, 1e-10, 3000, 0).values, [3.0, 2.0], rtol=1e-8)


def test_invariant_subspace_breakdown_restarts_in_the_complement():
    # Five distinct eigenvalues: the Krylov space of any start vector is invariant after 5
    # steps; a sixth eigenvalue needs a fresh direction orthogonal to it.
    op = MatrixOperator(torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)))
    pairs = lanczos_top(op, 6, 1e-10, 100, 0)
    np.testing.assert_allclose(pairs.values, [5.0, 4.0, 3.0, 2.0, 1.0, 1.0], rtol=1e-10)
    assert pairs.hvp_counts[0] == 6 and np.all(pairs.residuals <= 1e-12)


@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_pyhessian_backend_agrees_with_lanczos_within_its_tolerance(tol):
    model, x, y, mask, hessian = setup(with_bn)
    exact = np.linalg.eigvalsh(restricted(hessian, model, mask).numpy())[::-1]
    op = HessianOperator(model, batches(x, y, 16), mask)
    ours = lanczos_top(op, 1, 1e-10, 200, 0)
    theirs = pyhessian_top(op, 1, tol, 1000, 0)
    assert ours.values[0] == pytest.approx(exact[0], rel=1e-9)
    # PyHessian stops once an estimate changes by less than tol (relative). Power iteration's
    # changes then shrink by rho^2 = (lambda_2 / lambda_1)^2 per step, so what remains is
    # about tol * rho^2 / (1 - rho^2): its tolerance, read correctly (3x for the pre-asymptotic steps).
    rho2 = (max(abs(exact[1]), abs(exact[-1])) / exact[0]) ** 2
    difference = abs(theirs.values[0] - ours.values[0])
    assert 0 < difference <= 3 * tol * rho2 / (1 - rho2) * ours.values[0]
    assert difference <= theirs.residuals[0]  # the residual bounds any eigenvalue estimate


def test_same_seed_identical_results_other_seed_other_start():
    model, x, y, mask, _ = setup(with_bn)
    op = HessianOperator(model, batches(x, y, 16), mask)
    for solver in (lanczos_top, power_top, pyhessian_top):
        a, b = solver(op, 2, 1e-4, 200, 3), solver(op, 2, 1e-4, 200, 3)
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.hvp_counts, b.hvp_counts)
    a, b = lanczos_top(op, 2, 1e-4, 200, 3), lanczos_top(op, 2, 1e-4, 200, 4)
    assert not np.array_equal(a.values, b.values)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-3)
    assert hutchinson_trace(op, 1e-2, 30, 5) == hutchinson_trace(op, 1e-2, 30, 5)


# ---------------------------------------------------------------- trace and density

def test_hutchinson_within_three_standard_errors_of_exact_trace():
    model, x, y, mask, hessian = setup(with_bn)
    exact = float(torch.trace(restricted(hessian, model, mask)))
    estimate = hutchinson_trace(HessianOperator(model, batches(x, y, 25), mask), 0.02, 400, 0)
    assert 10 <= estimate.samples <= 400
    assert abs(estimate.mean - exact) <= 3 * estimate.stderr
    assert estimate.stderr <= 0.02 * abs(estimate.mean) or estimate.samples == 400


def test_deflated_hutchinson_is_exact_part_plus_smaller_variance():
    model, x, y, mask, hessian = setup(with_bn)
    exact = float(torch.trace(restricted(hessian, model, mask)))
    op = HessianOperator(model, batches(x, y, 25), mask)
    top = lanczos_top(op, 5, 1e-8, 200, 0)
    plain = hutchinson_trace(op, 1e-9, 60, 0)
    deflated = hutchinson_trace(op, 1e-9, 60, 0, deflate=top)
    assert deflated.deflated == pytest.approx(float(np.sum(top.values)))
    assert abs(deflated.mean - exact) <= 3 * deflated.stderr
    assert deflated.stderr < 0.7 * plain.stderr
    everything = lanczos_top(op, op.dim, 1e-8, 200, 0)  # all eigenpairs: nothing left to estimate
    complete = hutchinson_trace(op, 1e-3, 60, 0, deflate=everything)
    assert complete.mean == pytest.approx(exact, rel=1e-8) and complete.samples == 10


def test_hutchinson_stops_on_standard_error_not_on_the_running_mean():
    values = [5.0] * 10 + [-4.0] * 10
    op = MatrixOperator(matrix_with_spectrum(values, seed=1))  # trace 10, large variance
    estimate = hutchinson_trace(op, 0.05, 5000, 0)
    assert estimate.stderr <= 0.05 * abs(estimate.mean)
    assert op.hvp_count == estimate.samples > 10
    assert abs(estimate.mean - 10.0) <= 3 * estimate.stderr
    identity = MatrixOperator(torch.eye(30, dtype=torch.float64))  # z^T z = 30 exactly: no variance
    assert hutchinson_trace(identity, 0.05, 5000, 0).samples == 10


def test_slq_is_gauss_quadrature_of_the_start_vector():
    op = MatrixOperator(matrix_with_spectrum(np.linspace(-1.0, 3.0, 40)))
    nodes, weights = slq_nodes(op, 8, 1, 7)
    z = rademacher_vector(40, generator(7, 2), torch.zeros(0, dtype=torch.float64))
    z = z / z.norm()
    power = z.clone()
    for p in range(0, 15):  # 8-point Gauss quadrature is exact for polynomials of degree < 16
        assert float(np.sum(weights * nodes ** p)) == pytest.approx(dot64(z, power), rel=1e-8, abs=1e-10)
        power = op.matrix @ power
    grid = np.linspace(-2, 4, 2001)
    density = density_on_grid(nodes[None], weights[None], grid, 0.05)
    assert float(np.trapezoid(density[0], grid)) == pytest.approx(1.0, rel=1e-6)


# ---------------------------------------------------------------- dataset

def test_dataset_round_trips(tmp_path):
    rng = np.random.default_rng(0)

    def record(label, cycle, step):
        return Record(label=label, path=f"checkpoints/{label}.pt", cycle=cycle, step=step, sparsity=0.5, loss=0.3,
                      dim=120, eigenvalues=np.sort(rng.random(3))[::-1], residuals=rng.random(3) * 1e-4,
                      hvp_counts=np.array([9, 9, 9]), trace=(4.0, 0.1, 30, 2.5),
                      slq=(np.sort(rng.random(5 + cycle)), np.full(5 + cycle, 1 / (5 + cycle))))

    records = [record("cycle_001", 1, 20), record("init", -1, 0), record("cycle_000", 0, 10)]
    settings = {"top_k": 3, "trace": True, "density": True, "seed": 0}
    ds = build(records, settings, np.arange(7), "run", "lrr", tmp_path)
    assert ds.checkpoint.values.tolist() == ["init", "cycle_000", "cycle_001"]
    write_dataset(ds, tmp_path / "s.nc")
    back = read_dataset(tmp_path / "s.nc")
    assert back.equals(ds) and back.attrs == ds.attrs
    assert back.density.dims == ("checkpoint", "grid")
    np.testing.assert_allclose(np.trapezoid(back.density.values, back.density_eigenvalue.values, axis=1), 1.0, rtol=1e-6)
    again = records_of(back)
    assert [r.label for r in again] == ["init", "cycle_000", "cycle_001"]
    by_label = {r.label: r for r in records}
    for r in again:
        original = by_label[r.label]
        for field in ("path", "cycle", "step", "sparsity", "loss", "dim", "trace"):
            assert getattr(r, field) == getattr(original, field)
        np.testing.assert_array_equal(r.eigenvalues, original.eigenvalues)
        np.testing.assert_array_equal(r.slq[0], original.slq[0])
    assert build(again, settings, np.arange(7), "run", "lrr", tmp_path).equals(ds)

"""Cheaper sharpness at the same accuracy: warm starts from the previous checkpoint's
eigenvectors, gradient graphs kept across products, and --verify's explicit residuals
(against the dense Hessians of test_hessian's tiny models, and on the session's tiny run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_hessian import batches, keep_vector, restricted, setup, with_bn

from landscape import store
from landscape.hessian import HessianOperator, WarmStart
from landscape.lanczos import lanczos_top
from landscape.power import power_top

FAST = ("--samples", "96", "--batch-size", "96", "--max-hvp", "40")


def sharpness_json(*args) -> dict:
    return json.loads(run_cli("sharpness", *[str(a) for a in args], "--json").stdout)


def test_warm_start_same_eigenvalues_fewer_products_on_the_run(tiny_run, tmp_path):
    warm = sharpness_json(tiny_run, "--top-k", "2", "--out", tmp_path / "warm.nc", *FAST)
    cold = sharpness_json(tiny_run, "--top-k", "2", "--no-warm-start", "--out", tmp_path / "cold.nc", *FAST)
    labels = ["init", "cycle_000", "cycle_001", "cycle_002"]  # the run's order, in which they are computed
    assert sorted(warm["checkpoints"]) == sorted(labels)
    assert [warm["checkpoints"][c]["warm_started"] for c in labels] == [False, True, True, True]
    assert not any(cold["checkpoints"][c]["warm_started"] for c in labels)
    for c in labels:
        w, k = warm["checkpoints"][c], cold["checkpoints"][c]
        # Both stop on residual <= 1e-3 |lambda|: each is within 1e-3 of the truth, so of the other.
        np.testing.assert_allclose(w["eigenvalues"], k["eigenvalues"], rtol=2e-3)
        assert np.all(np.array(w["residuals"]) <= 1e-3 * np.abs(w["eigenvalues"]))
    assert warm["checkpoints"]["init"] == cold["checkpoints"]["init"]  # the first one starts cold: bit-identical
    total = {name: sum(r["checkpoints"][c]["hvp_counts"][-1] for c in labels) for name, r in (("warm", warm), ("cold", cold))}
    assert total["warm"] <= total["cold"], total
    # The warm start is not a stored setting (the result is the same to --tol): both files' settings agree.
    ds = store.read_dataset(tmp_path / "warm.nc")
    assert store.settings_of(ds) == store.settings_of(store.read_dataset(tmp_path / "cold.nc"))
    assert "warm_start" not in store.settings_of(ds) and "verify" not in store.settings_of(ds)
    assert ds.warm_started.values.tolist() == [0, 1, 1, 1] and "residual_verified" not in ds
    for name in ("warm_started", "residual", "hvp_count"):
        assert {"long_name", "units", "description"} <= set(ds[name].attrs)
    assert "recurrence" in ds.residual.attrs["description"]


def test_verify_stores_explicit_residuals_close_to_the_recurrence_estimate(tiny_run, tmp_path):
    out = sharpness_json(tiny_run, "--checkpoints", "cycle_001,cycle_002", "--verify", "--top-k", "2",
                         "--out", tmp_path / "v.nc", *FAST)
    ds = store.read_dataset(tmp_path / "v.nc")
    assert store.settings_of(ds)["verify"] is True
    assert ds.residual_verified.dims == ("checkpoint", "eig_index")
    assert {"long_name", "units", "description"} <= set(ds.residual_verified.attrs)
    relative = ds.residual / np.abs(ds.eigenvalue)
    # float32 products: the explicit residual is the recurrence's estimate up to rounding.
    np.testing.assert_allclose(ds.residual_verified.values, relative.values, rtol=0.2, atol=2e-5)
    assert float(ds.residual_verified.max()) <= 1.2e-3
    assert out["checkpoints"]["cycle_002"]["residuals_verified"] == ds.residual_verified.sel(
        checkpoint="cycle_002").values.tolist()
    # Other settings than the file's: --verify is stored, so leaving it off is refused, not mixed in.
    result = run_cli("sharpness", str(tiny_run), "--checkpoints", "cycle_001", "--out", str(tmp_path / "v.nc"), *FAST,
                     expect=2)
    assert "other settings" in result.stderr


@pytest.mark.parametrize("solver", [lanczos_top, power_top])
def test_verified_residuals_bound_the_error_against_the_dense_hessian(solver):
    model, x, y, mask, hessian = setup(with_bn)
    exact = np.linalg.eigvalsh(restricted(hessian, model, mask).numpy())[::-1]
    op = HessianOperator(model, batches(x, y, 16), mask)
    pairs = solver(op, 3, 1e-2, 400, 0)
    before = op.hvp_count
    explicit = np.array([op.residual(float(lam), v) for lam, v in zip(pairs.values, pairs.vectors)])
    assert op.hvp_count == before + 3  # one product per eigenvalue
    for lam, r in zip(pairs.values, explicit):
        assert np.min(np.abs(exact - lam)) <= r * (1 + 1e-9)  # Weyl: some eigenvalue within the residual
    np.testing.assert_allclose(pairs.values, exact[:3], rtol=3e-2)
    if solver is lanczos_top:  # the recurrence estimate is the explicit residual (fp64, full reorthogonalisation)
        np.testing.assert_allclose(pairs.residuals, explicit, rtol=1e-6, atol=1e-12)
    else:  # power's first residual is undeflated; the later ones are those of the deflated operator
        assert pairs.residuals[0] == pytest.approx(explicit[0], rel=1e-8)


def test_kept_graphs_equal_streamed_products_with_batchnorm_and_mask():
    model, x, y, mask, hessian = setup(with_bn, dtype=torch.float32)
    kept = HessianOperator(model, batches(x, y, 16), mask)
    streamed = HessianOperator(model, batches(x, y, 16), mask, graph_budget=0)
    for seed in range(2):
        v = torch.randn(kept.dim, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(kept.matvec(v), streamed.matvec(v), rtol=1e-6, atol=1e-7)
    assert kept.keep_graphs and kept._graphs is not None and not streamed.keep_graphs and streamed._graphs is None


def test_warm_start_maps_through_full_coordinates_and_falls_back():
    model, x, y, mask, hessian = setup(with_bn)
    full = HessianOperator(model, batches(x, y, 25))
    masked = HessianOperator(model, batches(x, y, 25), mask)
    keep = keep_vector(model, mask)
    pairs = lanczos_top(full, 2, 1e-8, 200, 0)
    starts = WarmStart.of(full, pairs).starts(masked)
    assert len(starts) == 2
    for v, s in zip(pairs.vectors, starts):  # the pruned entries dropped, then normalised
        torch.testing.assert_close(s, v[keep] / v[keep].norm())
    # Masked -> full: zeros at the pruned entries.
    back = WarmStart.of(masked, lanczos_top(masked, 1, 1e-8, 200, 0)).starts(full)[0]
    assert torch.all(back[~keep] == 0)
    # Other parameters: nothing to start from; a warm start reaches the cold one's eigenvalues.
    other, *_ = setup(lambda: torch.nn.Sequential(torch.nn.Linear(10, 5)))
    assert WarmStart.of(full, pairs).starts(HessianOperator(other, batches(x, y, 25))) == []
    exact = np.linalg.eigvalsh(restricted(hessian, model, mask).numpy())[::-1][:2]
    warm = lanczos_top(masked, 2, 1e-8, 200, 0, starts=starts)
    np.testing.assert_allclose(warm.values, exact, rtol=1e-6)

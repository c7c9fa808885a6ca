"""Barrier definitions (landscape.barrier) against hand-computed values and invariants."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from landscape.barrier import (barrier, barrier_alpha, barrier_linear, barrier_linear_alpha, excess_over_chord,
                               with_barriers)


def curve(values, alpha=None) -> xr.DataArray:
    values = np.asarray(values, dtype=float)
    alpha = np.linspace(0, 1, values.shape[-1]) if alpha is None else np.asarray(alpha)
    dims = ("split", "alpha")[-values.ndim:]
    return xr.DataArray(values, dims=dims, coords={"alpha": alpha})


def test_hand_computed_barriers_differ_between_conventions():
    # E = 0.1, 0.3, 0.35, 0.5, 0.5 on alpha 0, .25, .5, .75, 1: mean of ends 0.3, chord 0.1 + 0.4 a.
    e = curve([0.1, 0.3, 0.35, 0.5, 0.5])
    assert float(barrier(e)) == pytest.approx(0.5 - 0.3)
    assert float(barrier_alpha(e)) == 0.75  # first maximum of E
    # E - chord: 0, 0.1, 0.05, 0.1, 0 -> 0.1, first attained at alpha 0.25
    assert float(barrier_linear(e)) == pytest.approx(0.1)
    assert float(barrier_linear_alpha(e)) == 0.25


def test_barriers_per_split_and_described():
    ds = xr.Dataset({"error": curve([[0.2, 0.6, 0.2], [0.1, 0.1, 0.1]]), "loss": curve([[1.0, 3.0, 2.0], [0.5, 0.4, 0.3]])})
    out = with_barriers(ds)
    np.testing.assert_allclose(out.error_barrier.values, [0.4, 0.0])
    np.testing.assert_allclose(out.loss_barrier.values, [3.0 - 1.5, 0.5 - 0.4])
    np.testing.assert_allclose(out.loss_barrier_linear.values, [3.0 - 1.5, 0.0], atol=1e-15)
    np.testing.assert_array_equal(out.error_barrier_alpha.values, [0.5, 0.0])
    for name in ("error_barrier", "error_barrier_linear", "error_barrier_alpha", "loss_barrier_linear_alpha"):
        assert {"long_name", "units", "description"} <= set(out[name].attrs)
        assert out[name].dims == ("split",)


def test_constant_curve_has_zero_barriers():
    e = curve([0.37] * 7)
    assert float(barrier(e)) == 0.0
    assert float(barrier_linear(e)) == pytest.approx(0.0, abs=1e-15)


def test_grid_without_both_endpoints_is_rejected():
    with pytest.raises(ValueError, match="from 0 to 1"):
        barrier(curve([0.1, 0.2, 0.3], alpha=[0.0, 0.5, 0.9]))


finite = st.floats(-10, 10, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.integers(2, 12), elements=finite), finite, finite)
def test_invariants(values, shift, slope):
    e = curve(values)
    alpha = e.alpha
    assert float(barrier(e)) >= 0.0
    assert float(barrier_linear(e)) >= -1e-12
    assert float(excess_over_chord(e).isel(alpha=0)) == 0.0
    assert float(excess_over_chord(e).isel(alpha=-1)) == pytest.approx(0.0, abs=1e-12)
    # a constant shift changes neither barrier; a linear trend does not change the linear one
    assert float(barrier(e + shift)) == pytest.approx(float(barrier(e)), abs=1e-9)
    assert float(barrier_linear(e + shift + slope * alpha)) == pytest.approx(float(barrier_linear(e)), abs=1e-9)
    # the arg-max alpha is where each barrier is attained
    assert float(e.sel(alpha=barrier_alpha(e))) == float(e.max())


@settings(max_examples=30, deadline=None)
@given(finite, finite, st.integers(2, 12))
def test_straight_line_has_no_linear_barrier_and_half_the_rise_as_midpoint_barrier(e0, e1, points):
    e = curve(np.linspace(e0, e1, points))
    assert float(barrier_linear(e)) == pytest.approx(0.0, abs=1e-9)
    assert float(barrier(e)) == pytest.approx(abs(e1 - e0) / 2, abs=1e-9)


def test_a_monotone_path_has_no_linear_barrier_and_its_midpoint_barrier_is_flagged():
    """The demo's misleading case: error falling from 12.7 % to 6.3 % along the path."""
    out = with_barriers(xr.Dataset({"error": curve(np.linspace(0.127, 0.063, 11))}))
    assert float(out.error_barrier_linear) == pytest.approx(0.0, abs=1e-12)
    assert float(out.error_barrier) == pytest.approx(0.032)  # half the endpoints' difference, no barrier at all
    assert float(out.error_endpoint_difference) == pytest.approx(0.064)
    assert int(out.error_barrier_gap_dominated) == 1


def test_a_rise_larger_than_the_endpoint_difference_is_not_flagged():
    # E = 0.1, 0.4, 0.15: midpoint barrier 0.4 - 0.125 = 0.275 > |0.15 - 0.1|; linear 0.4 - 0.125 = 0.275
    out = with_barriers(xr.Dataset({"error": curve([0.1, 0.4, 0.15]), "loss": curve([[1.0, 1.2, 3.0]])}))
    assert float(out.error_barrier) == pytest.approx(0.275) and float(out.error_barrier_linear) == pytest.approx(0.275)
    assert int(out.error_barrier_gap_dominated) == 0
    # loss 1.0, 1.2, 3.0: midpoint 1.0 (the far endpoint) < difference 2.0 -> flagged; linear 0
    assert out.loss_barrier_gap_dominated.values.tolist() == [1]
    assert float(out.loss_barrier_linear.squeeze()) == pytest.approx(0.0, abs=1e-12)

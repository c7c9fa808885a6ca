"""Barriers along a linear path: pure functions of a path dataset (xarray only, no torch).

For a curve E(a) on a grid that starts at a=0 and ends at a=1 (error or loss):

    barrier        = max_a E(a) - (E(0) + E(1)) / 2             (Frankle et al. 2020)
    barrier_linear = max_a [E(a) - ((1 - a) E(0) + a E(1))]     (Entezari et al. 2022)

Both are >= 0 on any grid that includes the endpoints. Each comes with the a at which its
maximum is attained (the first one on ties).

The linear convention is the one to read: the midpoint one is at least half the difference
between the endpoints whenever they differ, so a path that falls monotonically from one
endpoint to the other (no barrier at all) has a midpoint barrier of half that fall. Where the
endpoints differ by more than the midpoint barrier itself, that barrier mostly measures the
difference, and `<curve>_barrier_gap_dominated` says so."""

from __future__ import annotations

import numpy as np
import xarray as xr

QUANTITIES = {"error": "1 - accuracy", "loss": "mean cross-entropy"}
UNITS = {"error": "1", "loss": "nat"}


def _check_grid(curve: xr.DataArray, dim: str) -> None:
    grid = curve[dim].values
    if grid.size < 2 or grid[0] != 0.0 or grid[-1] != 1.0 or not bool(np.all(np.diff(grid) > 0)):
        raise ValueError(f"{dim} must increase from 0 to 1 with both endpoints included, got {grid}")


def excess_over_endpoint_mean(curve: xr.DataArray, dim: str = "alpha") -> xr.DataArray:
    """E(a) - (E(0) + E(1)) / 2 at every a."""
    _check_grid(curve, dim)
    return curve - (curve.isel({dim: 0}, drop=True) + curve.isel({dim: -1}, drop=True)) / 2


def excess_over_chord(curve: xr.DataArray, dim: str = "alpha") -> xr.DataArray:
    """E(a) - ((1 - a) E(0) + a E(1)) at every a; exactly 0 at both endpoints."""
    _check_grid(curve, dim)
    alpha = curve[dim]
    return curve - ((1 - alpha) * curve.isel({dim: 0}, drop=True) + alpha * curve.isel({dim: -1}, drop=True))


def barrier(curve: xr.DataArray, dim: str = "alpha") -> xr.DataArray:
    """max_a E(a) - (E(0) + E(1)) / 2."""
    return excess_over_endpoint_mean(curve, dim).max(dim)


def barrier_linear(curve: xr.DataArray, dim: str = "alpha") -> xr.DataArray:
    """max_a [E(a) - ((1 - a) E(0) + a E(1))]."""
    return excess_over_chord(curve, dim).max(dim)


def endpoint_difference(curve: xr.DataArray, dim: str = "alpha") -> xr.DataArray:
    """|E(1) - E(0)|."""
    _check_grid(curve, dim)
    return abs(curve.isel({dim: -1}, drop=True) - curve.isel({dim: 0}, drop=True))


def gap_dominated(curve: xr.DataArray, dim: str = "alpha") -> xr.DataArray:
    """Where the endpoints differ by more than the midpoint barrier: that barrier is then
    mostly the endpoints' difference, not a rise along the path."""
    return endpoint_difference(curve, dim) > barrier(curve, dim)


def barrier_alpha(curve: xr.DataArray, dim: str = "alpha") -> xr.DataArray:
    """The a where E(a) is largest: where `barrier` is attained."""
    _check_grid(curve, dim)
    return curve.idxmax(dim)


def barrier_linear_alpha(curve: xr.DataArray, dim: str = "alpha") -> xr.DataArray:
    """The a where E(a) is furthest above the chord: where `barrier_linear` is attained."""
    return excess_over_chord(curve, dim).idxmax(dim)


def barrier_variables(ds: xr.Dataset, dim: str = "alpha") -> dict[str, xr.DataArray]:
    """For each of `error` and `loss` in `ds`: both barriers and their arg-max a, described."""
    out: dict[str, xr.DataArray] = {}
    for name, what in QUANTITIES.items():
        if name not in ds:
            continue
        curve, units = ds[name], UNITS[name]
        out[f"{name}_barrier"] = barrier(curve, dim).assign_attrs(
            long_name=f"{name} barrier (midpoint convention)", units=units,
            description=f"max over alpha of {name}(alpha) - ({name}(0) + {name}(1)) / 2, {name} = {what} "
                        "(Frankle et al. 2020)")
        out[f"{name}_barrier_linear"] = barrier_linear(curve, dim).assign_attrs(
            long_name=f"{name} barrier (linear convention)", units=units,
            description=f"max over alpha of {name}(alpha) - ((1 - alpha) {name}(0) + alpha {name}(1)), "
                        f"{name} = {what} (Entezari et al. 2022)")
        out[f"{name}_endpoint_difference"] = endpoint_difference(curve, dim).assign_attrs(
            long_name=f"{name} difference between the endpoints", units=units,
            description=f"|{name}(1) - {name}(0)|: the midpoint-convention barrier is at least half of it")
        out[f"{name}_barrier_gap_dominated"] = gap_dominated(curve, dim).astype(np.int8).assign_attrs(
            long_name=f"midpoint {name} barrier dominated by the endpoints' difference", units="1",
            description=f"1 where |{name}(1) - {name}(0)| exceeds {name}_barrier (midpoint convention): that "
                        f"barrier then mostly measures the difference between the endpoints; read "
                        f"{name}_barrier_linear")
        out[f"{name}_barrier_alpha"] = barrier_alpha(curve, dim).assign_attrs(
            long_name=f"alpha of the {name} barrier", units="1",
            description=f"the alpha where {name}(alpha) is largest, i.e. where {name}_barrier is attained "
                        "(the first such alpha on ties)")
        out[f"{name}_barrier_linear_alpha"] = barrier_linear_alpha(curve, dim).assign_attrs(
            long_name=f"alpha of the linear {name} barrier", units="1",
            description=f"the alpha where {name}(alpha) is furthest above the chord between the endpoints, "
                        f"i.e. where {name}_barrier_linear is attained (the first such alpha on ties)")
    return out


def with_barriers(ds: xr.Dataset, dim: str = "alpha") -> xr.Dataset:
    """`ds` with the barrier variables of its `error` and `loss` curves added."""
    return ds.assign(barrier_variables(ds, dim))

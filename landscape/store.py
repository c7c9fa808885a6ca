"""The one writer and reader of analysis datasets: netCDF4 files through h5netcdf, written
atomically (temporary file + rename), attrs sanitised, every variable described.

Conventions: dims are singular snake_case; coordinates are always stored; every data
variable has `long_name`, `units` ("1" when dimensionless) and `description`; global attrs
carry provenance (inputs, settings as a JSON string, package version, command).

Every file written here ends with a SHA-256 footer of the bytes before it. HDF5 ignores bytes
after its end of file; the reader checks the footer before HDF5 parses anything, because the
HDF5 library can loop forever on a flipped byte (found by tests/test_reliability_inputs.py).
A file without the footer (written by other tools) is read as it is."""

from __future__ import annotations

import gc
import hashlib
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import xarray as xr

from sparse_training import __version__
from sparse_training.io import atomic_path, exclusive_lock
from sparse_training.errors import UserError

ENGINE = "h5netcdf"
CHECKSUM_TAG = b"\n# landscape sha256 "  # + 64 hex digits + newline, after the HDF5 bytes
CHECKSUM_FOOTER = len(CHECKSUM_TAG) + 64 + 1
REQUIRED_VAR_ATTRS = ("long_name", "units", "description")


def describe(da: xr.DataArray, long_name: str, units: str, description: str) -> xr.DataArray:
    """Attach the CF-style attributes every stored variable carries."""
    da.attrs.update(long_name=long_name, units=units, description=description)
    return da


def described(values: Any, dims: tuple[str, ...], long_name: str, units: str, description: str) -> xr.DataArray:
    """A new described DataArray, marked `allow_nan` when it holds NaN (an undefined fraction,
    a row a run does not have): write_dataset refuses unmarked non-finite values."""
    da = describe(xr.DataArray(values, dims=dims), long_name, units, description)
    if da.dtype.kind == "f" and not bool(np.isfinite(da.values).all()):
        da.attrs["allow_nan"] = 1
    return da


def provenance(inputs: list[str | Path], settings: Mapping[str, Any], base: str | Path | None = None, analysis: str = "") -> dict[str, str]:
    """Global attrs: inputs (relative to `base`, usually the run), settings, version, command."""
    def rel(p: str | Path) -> str:
        p = Path(p)
        if base is not None:
            try:
                return str(p.resolve().relative_to(Path(base).resolve()))
            except ValueError:
                pass
        return str(p)

    return {
        "analysis": analysis,
        "inputs": json.dumps([rel(p) for p in inputs]),
        "settings": settings_json(settings),
        "package_version": __version__,
        "command": " ".join(["landscape"] + sys.argv[1:]) if sys.argv else "",
    }


def settings_json(settings: Mapping[str, Any]) -> str:
    """The settings attr: JSON with sorted keys, what `settings_of` reads back."""
    return json.dumps(dict(settings), sort_keys=True, default=str)


def _sanitise(value: Any) -> Any:
    """netCDF attrs take strings and numbers: dicts/lists become JSON, None becomes ""."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (str, int, float, np.integer, np.floating)):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "if":
        return value
    return json.dumps(value, sort_keys=True, default=str)


def sanitised(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    ds.attrs = {k: _sanitise(v) for k, v in ds.attrs.items()}
    for name in ds.variables:
        ds[name].attrs = {k: _sanitise(v) for k, v in ds[name].attrs.items()}
    return ds


def check_described(ds: xr.Dataset) -> None:
    """Every data variable must say what it is; a programming error otherwise."""
    for name, var in ds.data_vars.items():
        missing = [a for a in REQUIRED_VAR_ATTRS if a not in var.attrs]
        if missing:
            raise ValueError(f"variable {name!r} lacks attrs {missing}")


def write_dataset(ds: xr.Dataset, path: str | Path) -> Path:
    """Write `ds` to `path` atomically; the previous file stays intact if anything fails."""
    path = Path(path)
    check_described(ds)
    ds = sanitised(ds)
    for name, var in ds.data_vars.items():
        if var.dtype.kind == "f" and not bool(np.isfinite(var.values).all()) and not var.attrs.get("allow_nan"):
            raise ValueError(f"variable {name!r} holds non-finite values")
    # Serialised in memory, then written by plain file I/O: HDF5 writing onto a full disk
    # raises RuntimeError ("Disable slist on flush dest failure") or segfaults inside the write
    # (exit 139), which nothing can catch. A plain write fails with OSError, which atomic_path
    # turns into one line (exit 1) naming `path`, the old file intact, no temporary file left.
    content = bytes(ds.to_netcdf(engine=ENGINE))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(content + CHECKSUM_TAG + hashlib.sha256(content).hexdigest().encode() + b"\n")
    return path


def check_footer(path: Path) -> None:
    """A UserError if `path` ends with our checksum footer and its bytes do not match it."""
    data = path.read_bytes()
    footer = data[-CHECKSUM_FOOTER:]
    if len(data) > CHECKSUM_FOOTER and footer.startswith(CHECKSUM_TAG) and footer.endswith(b"\n"):
        if hashlib.sha256(data[:-CHECKSUM_FOOTER]).hexdigest().encode() != footer[len(CHECKSUM_TAG):-1]:
            raise UserError(f"{path} is corrupt (its bytes do not match the checksum written with it); "
                            "recompute it (--overwrite) or restore it from a copy")


def read_dataset(path: str | Path) -> xr.Dataset:
    """Load a dataset fully into memory and close the file; a one-line UserError if it is
    missing or is not a netCDF dataset."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file; pass a .nc dataset written by landscape")
    check_footer(path)
    hook = sys.unraisablehook
    # On some bad bytes h5netcdf's File fails in __init__ and then again in __del__, which
    # Python would print as "Exception ignored ... Traceback": that object dies quietly here.
    sys.unraisablehook = lambda unraisable: None
    try:
        try:
            with xr.open_dataset(path, engine=ENGINE) as ds:
                # Without dropping the encoding, fixed-width string dtypes read from disk would
                # silently truncate longer labels added before the next write.
                return ds.load().drop_encoding()
        except Exception as error:  # noqa: BLE001 - h5py/xarray raise many types for bad bytes
            reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        gc.collect()
    finally:
        sys.unraisablehook = hook
    raise UserError(f"{path} is not a readable netCDF dataset ({reason})")


def settings_of(ds: xr.Dataset) -> dict[str, Any]:
    try:
        return json.loads(ds.attrs.get("settings", "{}"))
    except json.JSONDecodeError:
        return {}


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """An exclusive lock beside `path` (path + '.lock'), so that two analyses of the same
    run read-modify-write the dataset one after the other."""
    with exclusive_lock(f"{path}.lock"):
        yield

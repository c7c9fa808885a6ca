"""The one way an analysis updates its dataset file, so that every analysis reuses, extends
and protects its results alike.

Two shapes of analysis share it:

- labelled (barrier and connectivity along `pair`, signs along `pair`, sharpness along
  `checkpoint`): labels already in the file are reused, each missing one is computed on its
  own, merged in and the file rewritten atomically, so an interrupted run keeps what it
  finished. A file computed with other settings is an error, unless `overwrite`.
- whole (overlap along `mask_a`/`mask_b`, metrics along `run`): one dataset computed at once
  from all its inputs. It is reused when the file holds the same inputs and settings, else
  recomputed and replaced: nothing in it could be kept.

Both read and write under `store.locked`, so two analyses of the same file never lose each
other's work. With `overwrite` the labels asked for are recomputed; a labelled file with the
same settings keeps its other labels (they are valid results), any other file is replaced.

Under torchrun (`sparse_training.distributed`) only rank 0 reads, locks and writes the file:
it decides which labels to compute and tells the other ranks (so every rank computes the
same labels in the same order and runs the same collectives), merges and writes each one,
and at the end every rank returns rank 0's result. An error raised where only rank 0 works
is raised on every rank."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import xarray as xr

from sparse_training import distributed
from sparse_training.errors import UserError

from . import store

SCALARS = ("run", "method")  # scalar coords shared by all labels of a file; "" where they differ
ELSEWHERE = "pass --overwrite to replace it, or --out to write elsewhere"


@dataclass
class AnalysisResult:
    """What every analysis returns: its dataset (every label the file holds), the file, and
    which of the labels asked for were computed now and which were taken from the file."""

    dataset: xr.Dataset
    path: Path
    labels: list[str]
    computed: list[str]
    reused: list[str]


class Progress(Protocol):
    """Where an analysis reports progress (a tqdm bar fits): `total` is set once the work is
    known, `update(1)` is called after each unit of it."""

    total: float | None

    def update(self, n: float = 1) -> Any: ...


def update_labels(
    path: str | Path, analysis: str, labels: Sequence[str], prepare: Callable[[list[str]], Callable[[str], Any]],
    merge: Callable[[xr.Dataset | None, Any], xr.Dataset], *, dim: str, settings: Mapping[str, Any] | None = None,
    check: Callable[[xr.Dataset], str | None] | None = None, overwrite: bool = False,
) -> AnalysisResult:
    """Bring the labelled dataset at `path` up to date with `labels` (along `dim`).

    `prepare(todo)` loads and checks the inputs of the labels to compute and returns
    `compute(label)`; it runs before the lock is taken, so bad input leaves nothing behind.
    `merge(dataset or None, compute(label))` adds one label. The file must hold `analysis`
    computed with `settings` (compared with its stored settings; None: nothing to compare) and
    pass `check` (which names any other difference, e.g. sharpness's evaluation subset)."""
    path, labels = Path(path), list(labels)
    twice = next((label for label in labels if labels.count(label) > 1), None)
    if twice is not None:
        raise UserError(f"{dim} {twice!r} was asked for twice")
    group = distributed.current()  # under torchrun: every rank computes, rank 0 alone reads, locks and writes
    state: dict[str, Any] = {}  # rank 0's dataset

    def look() -> list[str]:
        state["ds"] = _labelled(path, analysis, dim, settings, check, overwrite)
        return _missing(state["ds"], labels, dim, overwrite)

    missing: list[str] = []
    todo = group.on_main(look)
    if todo:
        compute, planned = prepare(todo), set(todo)  # on every rank: each loads the inputs
        with contextlib.ExitStack() as held:
            def look_locked() -> list[str]:  # another process may have added labels, or removed some
                held.enter_context(store.locked(path))
                return look()

            missing = group.on_main(look_locked)
            if not planned.issuperset(missing):  # their inputs are loaded too
                compute = prepare(missing)
            for label in missing:
                part = compute(label)  # on every rank: the collectives of the computation

                def keep(part: Any = part) -> None:
                    state["ds"] = merge(state["ds"], part)
                    store.write_dataset(state["ds"], path)

                group.on_main(keep)
    # Every rank returns rank 0's dataset: what the file now holds.
    final = group.on_main(lambda: state["ds"])
    return AnalysisResult(final, path, labels, missing, [label for label in labels if label not in missing])


def update_whole(
    path: str | Path, analysis: str, labels: Sequence[str], compute: Callable[[], xr.Dataset], attrs: Mapping[str, str],
    *, overwrite: bool = False, log: Callable[[str], None] = lambda message: None,
) -> AnalysisResult:
    """The dataset at `path` if it holds `analysis` of the same inputs and settings (`attrs`,
    from `store.provenance`), else `compute()` with `attrs`, written in its place."""
    path, labels = Path(path), list(labels)
    group = distributed.current()  # under torchrun: every rank computes, rank 0 alone reads and writes
    stored = group.on_main(lambda: None if overwrite else _readable(path, analysis, None, overwrite))
    if _same_inputs(stored, attrs):
        return AnalysisResult(stored, path, labels, [], labels)
    ds = compute()  # before the lock: bad input leaves nothing behind
    ds.attrs = dict(attrs)

    def write() -> xr.Dataset | None:
        """None once `ds` is written, else the dataset found in its place."""
        with store.locked(path):
            # Checked again where it is written: another process may have written the file since,
            # and replacing its result must be said, never silent.
            stored = None if overwrite else _readable(path, analysis, None, overwrite)
            if _same_inputs(stored, attrs):
                return stored
            if stored is not None:
                log(f"note: {path} was computed from other inputs or settings; replacing it")
            store.write_dataset(ds, path)
        return None

    stored = group.on_main(write)
    if stored is not None:
        return AnalysisResult(stored, path, labels, [], labels)
    return AnalysisResult(ds, path, labels, labels, [])


def _same_inputs(stored: xr.Dataset | None, attrs: Mapping[str, str]) -> bool:
    return stored is not None and all(stored.attrs.get(key) == attrs[key] for key in ("inputs", "settings"))


def _readable(path: Path, analysis: str, dim: str | None, overwrite: bool) -> xr.Dataset | None:
    """The dataset at `path` when it is one of `analysis`; None when there is none, or when
    `overwrite` replaces an unreadable file or another analysis's."""
    if not path.exists():
        return None
    try:
        ds = store.read_dataset(path)
    except UserError as error:
        if overwrite:
            return None
        raise UserError(f"{error}; {ELSEWHERE}") from None
    if ds.attrs.get("analysis") == analysis and (dim is None or dim in ds.dims):
        return ds
    if overwrite:
        return None
    raise UserError(f"{path} exists and is not a {analysis} dataset; {ELSEWHERE}")


def _labelled(path: Path, analysis: str, dim: str, settings: Mapping[str, Any] | None,
              check: Callable[[xr.Dataset], str | None] | None, overwrite: bool) -> xr.Dataset | None:
    """The dataset at `path` to merge into: one of `analysis` computed with `settings`."""
    ds = _readable(path, analysis, dim, overwrite)
    if ds is None:
        return None
    differ = _differences(store.settings_of(ds), settings) if settings is not None else None
    differ = differ or (check(ds) if check is not None else None)
    if differ is None:
        return ds
    if overwrite:
        return None
    raise UserError(f"{path} was computed with other settings ({differ}); {ELSEWHERE}")


def _differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    """`key=stored there, wanted now` for every setting that differs, or None. Compared as
    stored: through JSON, where tuples are lists."""
    wanted = json.loads(store.settings_json(wanted))
    keys = sorted(key for key in set(stored) | set(wanted) if stored.get(key) != wanted.get(key))
    return ", ".join(f"{k}={stored.get(k)!r} there, {wanted.get(k)!r} now" for k in keys) or None


def _missing(ds: xr.Dataset | None, labels: list[str], dim: str, overwrite: bool) -> list[str]:
    if ds is None or overwrite:
        return labels
    stored = {str(label) for label in ds[dim].values}
    return [label for label in labels if label not in stored]


def merge_along(existing: xr.Dataset | None, new: xr.Dataset, dim: str) -> xr.Dataset:
    """`existing` with the labels of `new` added along `dim` (replacing labels of the same
    name, appended after the others). The scalar coords run and method are kept where both
    agree, else ""; variable attrs are `new`'s (marked allow_nan where the merged values need
    it); global attrs are `new`'s, with the inputs of both."""
    if existing is None:
        return new.drop_vars(list(SCALARS), errors="ignore").assign_coords(_scalars(new, new))
    # A dataset read from disk may keep its on-disk encoding (fixed-width strings): dropped, or
    # longer labels of `new` would be cut when the merge is written.
    kept = existing.drop_encoding().drop_sel({dim: [p for p in new[dim].values if p in set(existing[dim].values)]})
    merged = xr.concat([kept.drop_vars(list(SCALARS), errors="ignore"), new.drop_vars(list(SCALARS), errors="ignore")],
                       dim=dim, data_vars="all", coords="different", compat="equals", join="exact",
                       combine_attrs="override")
    for name in merged.data_vars:
        merged[name].attrs = dict(new[name].attrs)
        if merged[name].dtype.kind == "f" and not np.isfinite(merged[name].values).all():
            merged[name].attrs["allow_nan"] = 1
    merged.attrs = dict(new.attrs)
    if "inputs" in new.attrs:
        inputs = json.loads(existing.attrs.get("inputs", "[]"))
        merged.attrs["inputs"] = json.dumps(inputs + [p for p in json.loads(new.attrs["inputs"]) if p not in inputs])
    return merged.assign_coords(_scalars(existing, new))


def _scalars(existing: xr.Dataset, new: xr.Dataset) -> dict[str, str]:
    values = {}
    for name in SCALARS:
        if name in new.coords:
            ours = str(new[name].values)
            values[name] = ours if name not in existing.coords or str(existing[name].values) == ours else ""
    return values
